"""Generating a run's images: one seeded noise stream per image, so batching never changes an image.

Image ``j`` of seed ``s`` (``n`` images per seed) is drawn from its own CPU ``torch.Generator``
seeded ``s * n + j`` (:func:`image_seed`). Given a list of generators, diffusers draws every
row's noise from that row's generator alone (``randn_tensor``: the initial latents, and any later
noise such as an ancestral scheduler's or Somepalli et al.'s embedding noise), and the UNet treats
rows independently, so an image is the same whether it is generated alone, with the other images of
its prompt, or beside other prompts in one batch (:meth:`PipelineGenerator.batch`), up to float
rounding of the batched kernels. CPU generators give the same starting noise on any device.
With one image per seed, image ``s`` is seeded ``s`` (the testbed's convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

#: Recorded in run.json: rows made under another seeding rule are not resumed into this one.
SEEDING = "cpu generator per image, seed * images + position"


def image_seed(seed: int, position: int, num_images: int) -> int:
    """The generator seed of image ``position`` of ``seed`` when each seed has ``num_images`` images."""
    return seed * num_images + position


def image_generators(num_prompts: int, seeds: Sequence[int], num_images: int) -> list[torch.Generator]:
    """CPU generators for ``num_prompts`` prompts x seeds x images, in the pipeline's row order."""
    return [
        torch.Generator(device="cpu").manual_seed(image_seed(int(seed), position, num_images))
        for _ in range(num_prompts)
        for seed in seeds
        for position in range(num_images)
    ]


@dataclass(frozen=True)
class Generation:
    """One prompt's images (seed-major: seed 0's images, then seed 1's, ...) and what the run reported.

    info: JSON fields added to the prompt's row, e.g. ``flagged`` (token -> share of the spike checks
    that attenuated it) and ``cleared`` (per image, whether the memorization gate cleared it).
    """

    images: list
    info: dict = field(default_factory=dict)


def flagged_shares(report, prompt_index: int) -> dict[str, float]:
    """Token -> share of its spike checks in which it was attenuated (BOS excluded by the rule)."""
    checks = report.checks_per_prompt[prompt_index]  # images the gate cleared are not counted
    if not checks:
        return {}
    labels = report.token_labels[prompt_index]
    totals = report.flagged_tokens[prompt_index]
    return {token: count / (checks * labels.count(token)) for token, count in totals.items()}


def report_info(report, prompt_index: int) -> dict[str, Any]:
    """The row fields a GUARD report gives one prompt: what was flagged, what the gate cleared."""
    if report is None:
        return {}
    cleared = None if report.cleared is None else [bool(flag) for flag in report.cleared[prompt_index].tolist()]
    return {"flagged": flagged_shares(report, prompt_index), "cleared": cleared}


class PipelineGenerator:
    """Generation over a GUARD pipeline; the method value is its ``GuardConfig`` (or a preset name).

    ``batch(prompts, method, seeds, num_images)`` runs one pipeline call for all of them;
    calling it with one prompt and one seed is the runner's one-by-one form. ``call_kwargs`` go to
    every pipeline call (``num_inference_steps``, ``output_type="np"`` for float arrays, ...).
    """

    def __init__(self, pipe: Any, **call_kwargs: Any):
        if "generator" in call_kwargs or "num_images_per_prompt" in call_kwargs:
            raise ValueError("generator and num_images_per_prompt are set per call by the generator itself")
        self.pipe = pipe
        self.call_kwargs = call_kwargs

    def batch(self, prompts: Sequence[str], method: Any, seeds: Sequence[int], num_images: int) -> list[Generation]:
        """Per prompt, its ``len(seeds) * num_images`` images from one pipeline call."""
        prompts, seeds = list(prompts), list(seeds)
        per_prompt = len(seeds) * num_images
        output = self.pipe(
            prompts,
            guard_config=method,
            generator=image_generators(len(prompts), seeds, num_images),
            num_images_per_prompt=per_prompt,
            **self.call_kwargs,
        )
        images = output.images
        images = list(images) if isinstance(images, (list, tuple, np.ndarray)) else images
        if not isinstance(images, list) or len(images) != len(prompts) * per_prompt:
            got = f"{len(images)} images" if isinstance(images, list) else type(images).__name__
            raise ValueError(f"the pipeline returned {got}; expected {len(prompts) * per_prompt}")
        report = getattr(output, "report", None)
        return [
            Generation(images[index * per_prompt : (index + 1) * per_prompt], report_info(report, index))
            for index in range(len(prompts))
        ]

    def __call__(self, prompt: str, method: Any, seed: int, num_images: int) -> list:
        return self.batch([prompt], method, [seed], num_images)[0].images


def pipeline_generate_fn(pipe: Any, **call_kwargs: Any) -> PipelineGenerator:
    """A :class:`PipelineGenerator` (kept under its earlier name)."""
    return PipelineGenerator(pipe, **call_kwargs)
