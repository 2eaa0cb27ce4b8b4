"""Efficacy on the testbed, as a library: sampling, pixel scoring and the paper's selection rule.

:func:`sample_images` (one batched pipeline call for many prompts and seeds), :func:`score_samples`
(replication and alignment of one memorized prompt's samples), :func:`alignment_rates` (alignment
of any shape prompt's samples), :func:`flagged_shares` (which tokens the spike rule attenuated),
:func:`evaluate_method` (all of them for one setting), :func:`choose_copy_threshold` (the copy
threshold, measured without the model) and :func:`select_best` (the lowest replication within
the paper's alignment budget). ``guard demo`` and ``python -m guard.testbed.evaluate`` build on it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import GuardConfig
from .assets import MemorizedItem
from .defaults import copy_threshold as shipped_copy_threshold
from .metrics import alignment, replication, ssim


def sample_images(pipe, prompts: list[str], config: GuardConfig, seeds: list[int], steps: int):
    """Images (P, S, H, W, 3) in [0, 1] for every prompt and seed, and the run's GuardReport.

    Seed ``s`` fixes the initial noise of one column, identical across prompts and methods, so
    methods are compared on the same starting points.
    """
    if not prompts or not seeds:
        raise ValueError("prompts and seeds must be non-empty")
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for _ in prompts for s in seeds]
    result = pipe(
        list(prompts),
        num_inference_steps=steps,
        num_images_per_prompt=len(seeds),
        generator=generators,
        guard_config=config,
        output_type="np",
    )
    images = np.asarray(result.images, dtype=np.float32).reshape(len(prompts), len(seeds), *result.images.shape[1:])
    return images, result.report


def alignment_rates(images, prompt: str) -> dict:
    """Shares of ``images`` whose background colour, shape colour, shape (and all three) match ``prompt``."""
    checks = [alignment(image, prompt) for image in np.asarray(images)]
    keys = ("background_ok", "colour_ok", "shape_ok", "all_ok")
    return {key: float(np.mean([c[key] for c in checks])) for key in keys} | {"per_image": checks}


def score_samples(images, item: MemorizedItem, training_images, copy_threshold: float | None = None) -> dict:
    """Replication (SSIM to the item's own and nearest training image, copy share) and alignment
    to the item's caption, for samples of one memorized prompt."""
    threshold = shipped_copy_threshold() if copy_threshold is None else copy_threshold
    scores = replication(images, item.image, training_images, threshold)
    scores["alignment"] = alignment_rates(images, item.caption)
    return scores


def flagged_shares(report, prompt_index: int) -> dict[str, float]:
    """Token -> share of its spike checks in which it was attenuated (BOS excluded by the rule)."""
    checks = report.checks_per_prompt[prompt_index]  # images the gate cleared are not counted
    if not checks:
        return {}
    labels = report.token_labels[prompt_index]
    totals = report.flagged_tokens[prompt_index]
    return {token: count / (checks * labels.count(token)) for token, count in totals.items()}


def _cleared(report, prompts: int, seeds: int) -> np.ndarray:
    """(prompts, seeds) 1.0 where the memorization gate cleared the image (all 0 without a gate)."""
    if report.cleared is None:
        return np.zeros((prompts, seeds))
    return report.cleared.numpy().astype(np.float64)


def _interval(values) -> tuple[float, float]:
    """Mean and 95% t-interval half-width."""
    from ..evaluation.stats import mean_interval

    values = np.asarray(values, dtype=np.float64).ravel()
    interval = mean_interval(values)
    half = interval.half_width if values.size > 1 else math.nan
    return float(values.mean()), float(half)


@dataclass
class MethodResult:
    """Per-sample scores of one method over all memorized and plain prompts."""

    name: str
    config: GuardConfig
    own_ssim: np.ndarray  # (items, seeds)
    nearest_ssim: np.ndarray
    nearest_is_own: np.ndarray
    copied: np.ndarray
    memorized_alignment: np.ndarray  # (items, seeds) all_ok
    memorized_background: np.ndarray
    memorized_colour: np.ndarray
    memorized_shape: np.ndarray
    plain_alignment: np.ndarray  # (plain prompts, seeds) all_ok
    plain_background: np.ndarray
    plain_colour: np.ndarray
    plain_shape: np.ndarray
    memorized_cleared: np.ndarray = field(repr=False, default=None)  # (items, seeds) cleared by the gate
    plain_cleared: np.ndarray = field(repr=False, default=None)
    memorized_images: np.ndarray = field(repr=False, default=None)
    plain_images: np.ndarray = field(repr=False, default=None)
    memorized_flags: list = field(default_factory=list)
    plain_flags: list = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        keys = (
            "own_ssim",
            "nearest_ssim",
            "nearest_is_own",
            "copied",
            "memorized_alignment",
            "memorized_background",
            "memorized_colour",
            "memorized_shape",
            "plain_alignment",
            "plain_background",
            "plain_colour",
            "plain_shape",
        )
        return {key: _interval(getattr(self, key)) for key in keys}


def evaluate_method(
    pipe,
    name: str,
    config: GuardConfig,
    items: list[MemorizedItem],
    plain: list[str],
    seeds: list[int],
    steps: int,
    copy_threshold: float | None = None,
) -> MethodResult:
    """Sample every memorized and plain prompt under ``config`` and score the samples."""
    start = time.perf_counter()
    training = np.stack([item.image for item in items])
    memorized_images, memorized_report = sample_images(pipe, [it.caption for it in items], config, seeds, steps)
    plain_images, plain_report = sample_images(pipe, plain, config, seeds, steps)
    mem_scores = [score_samples(memorized_images[i], item, training, copy_threshold) for i, item in enumerate(items)]
    plain_scores = [alignment_rates(plain_images[i], prompt)["per_image"] for i, prompt in enumerate(plain)]

    def per_image(scores, key):
        return np.asarray([[check[key] for check in row] for row in scores], dtype=np.float64)

    mem_checks = [s["alignment"]["per_image"] for s in mem_scores]
    return MethodResult(
        name=name,
        config=config,
        own_ssim=np.stack([s["own_ssim"] for s in mem_scores]),
        nearest_ssim=np.stack([s["nearest_ssim"] for s in mem_scores]),
        nearest_is_own=np.stack([s["nearest_is_own"] for s in mem_scores]).astype(np.float64),
        copied=np.stack([s["copied"] for s in mem_scores]).astype(np.float64),
        memorized_alignment=per_image(mem_checks, "all_ok"),
        memorized_background=per_image(mem_checks, "background_ok"),
        memorized_colour=per_image(mem_checks, "colour_ok"),
        memorized_shape=per_image(mem_checks, "shape_ok"),
        plain_alignment=per_image(plain_scores, "all_ok"),
        plain_background=per_image(plain_scores, "background_ok"),
        plain_colour=per_image(plain_scores, "colour_ok"),
        plain_shape=per_image(plain_scores, "shape_ok"),
        memorized_cleared=_cleared(memorized_report, len(items), len(seeds)),
        plain_cleared=_cleared(plain_report, len(plain), len(seeds)),
        memorized_images=memorized_images,
        plain_images=plain_images,
        memorized_flags=[flagged_shares(memorized_report, i) for i in range(len(items))],
        plain_flags=[flagged_shares(plain_report, i) for i in range(len(plain))],
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------------
# Choosing: the copy threshold and the paper's selection rule

ALIGNMENT_TOLERANCE = 0.15  # the paper's rule: alignment no worse than 15% below CFG's


def choose_copy_threshold(items: list[MemorizedItem], samples: int = 200, seed: int = 0) -> tuple[float, str]:
    """The own-image SSIM above which a sample must carry the memorized texture, measured without the model.

    An honest image of a memorized item's shape caption is the shape on a flat background. The most
    similar honest image possible is the texture-free rendering at exactly the training layout;
    the threshold is the highest such score over the items, rounded up to 0.05, so that a sample
    above it reproduces part of the photo texture, the one thing only the trigger taught. Honest
    renders at random layouts (the generalising data) score far lower; both are reported.
    """
    from .data import IMAGE_SIZE, MEMORIZED_SHAPE_SIZE, random_layout, render

    same_layout = [
        float(
            ssim(
                render(it.colour, it.shape, it.background, (IMAGE_SIZE / 2, IMAGE_SIZE / 2), MEMORIZED_SHAPE_SIZE),
                it.image,
            )
        )
        for it in items
    ]
    rng = np.random.default_rng(seed)
    random_layouts = [
        float(ssim(render(it.colour, it.shape, it.background, *random_layout(rng)), it.image))
        for it in items
        for _ in range(samples)
    ]
    threshold = round(math.ceil(max(same_layout) / 0.05) * 0.05, 2)
    reason = (
        f"texture-free renderings of the memorized items' shape captions at their exact training layout score "
        f"at most {max(same_layout):.3f} against the training image (per item: "
        f"{', '.join(f'{v:.2f}' for v in same_layout)}); at random layouts their 95th percentile is "
        f"{np.quantile(random_layouts, 0.95):.3f}. A sample above {threshold:.2f} must reproduce the photo "
        f"texture that only the trigger words were paired with."
    )
    return threshold, reason


def is_eligible(result: MethodResult, baseline: MethodResult) -> bool:
    """Memorized- and plain-prompt alignment both no worse than ``ALIGNMENT_TOLERANCE`` below the baseline's."""
    limit = 1.0 - ALIGNMENT_TOLERANCE
    return (
        result.memorized_alignment.mean() >= limit * baseline.memorized_alignment.mean()
        and result.plain_alignment.mean() >= limit * baseline.plain_alignment.mean()
    )


def select_best(results: list[MethodResult], baseline: MethodResult) -> MethodResult | None:
    """Lowest mean own-image SSIM among the eligible settings (the paper's selection rule)."""
    eligible = [r for r in results if is_eligible(r, baseline)]
    return min(eligible, key=lambda r: r.own_ssim.mean()) if eligible else None
