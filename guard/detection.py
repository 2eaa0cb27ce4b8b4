"""Memorization detection from the predictions a GUARD step already makes: no extra UNet call.

Per image, at the first step(s) of sampling:

- ``wen``: the magnitude of the text-conditional noise, ``||eps_c - eps_u||_2`` over the image's
  whole prediction (Wen et al., "Detecting, Explaining, and Mitigating Memorization in Diffusion
  Models", ICLR 2024; github.com/YuxinWenRick/diffusion_memorization, ``local_sd_pipeline.py``:
  no guidance scale, no normalisation), ``eps_c`` the plain prompt's prediction. Higher means
  memorized: a memorized prompt pulls the first prediction hard toward one image.
- ``cosine``: the cosine between GUARD's attenuated and plain-prompt guidance directions,
  ``cos(eps_pos - eps_u, eps_neg - eps_u)`` (this project's gate). Lower means memorized:
  attenuating the spike tokens moves a memorized prompt's prediction, not a plain one's.
- ``entropy``: the entropy of the cross-attention distribution over the text positions, on the
  plain prompt's rows (Ren et al., "Unveiling and Mitigating Memorization in Text-to-image
  Diffusion Models through Cross Attention", ECCV 2024; github.com/renjie3/MemAttn,
  ``detect.py``). Per layer, the attention averaged over queries and heads (which the fused
  kernel's per-token mass gives exactly, without an attention map), its entropy over all
  positions (natural log, 0 log 0 = 0), averaged over GUARD's attenuated layers (Ren et al.'s
  score E reads one layer, ``down_blocks.1.attentions.1``; the score here reads the layers GUARD
  attenuates, the mid block among them). Higher means memorized.
- ``spike_share``: the largest share of one UNet call's spike checks (GUARD's attenuated layers
  times their heads, on the attenuated rows) that flagged a single text token, BOS excluded. Higher
  means memorized: a memorized prompt's trigger stands out in most heads, a caption's own words in
  a few. It reads the spike counts the kernel already returns; it is this project's, not a paper's.

:func:`detect` screens prompts before generation by running only the first step(s); the same
scores are on every :class:`~guard.report.GuardReport` (``report.detection``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import DETECTORS, LINEAR_DETECTORS

#: Per detector (guard.config.DETECTORS): whether a higher score means "more likely memorized".
MEMORIZED_IF_HIGH: dict[str, bool] = {"wen": True, "cosine": False, "entropy": True, "spike_share": True}
assert tuple(sorted(MEMORIZED_IF_HIGH)) == tuple(sorted(DETECTORS))


def wen_score(eps_u: torch.Tensor, eps_c: torch.Tensor) -> torch.Tensor:
    """Per image, ``||eps_c - eps_u||_2`` over all of its elements, float32 (float64 stays float64)."""
    delta = eps_c - eps_u
    delta = delta if delta.dtype == torch.float64 else delta.float()
    return torch.linalg.vector_norm(delta.flatten(1), dim=1)


def attention_entropy(mass: torch.Tensor) -> torch.Tensor:
    """Entropy (natural log) of per-row attention distributions over the text positions.

    ``mass``: (rows, Nk), each row the head- and query-averaged attention (non-negative, summing
    to 1 unless keys were masked); positions with no attention add nothing (0 log 0 = 0).
    """
    p = mass.float().clamp_min(0.0)
    logs = torch.where(p > 0, torch.log(torch.where(p > 0, p, 1.0)), 0.0)
    return -(p * logs).sum(dim=-1)


def spike_share(counts: torch.Tensor, checks: int) -> torch.Tensor:
    """Per image, the largest share of ``checks`` spike checks that flagged one token, BOS excluded.

    ``counts``: (images, tokens) integer flag counts of one UNet call, summed over the attenuated
    layers and their heads (``checks`` in all). float32.
    """
    if counts.shape[-1] < 2:
        return counts.new_zeros(counts.shape[0], dtype=torch.float32)
    return counts[:, 1:].amax(dim=1).float() / checks


def linear_score(scores: dict[str, torch.Tensor], weights) -> torch.Tensor:
    """``weights`` (wen, cosine, entropy) times the scores, summed; higher means memorized."""
    total = None
    for name, weight in zip(LINEAR_DETECTORS, weights, strict=True):
        if weight == 0:
            continue
        if name not in scores:
            raise ValueError(f"the gate's weights use the {name!r} score, which this run has not computed")
        term = weight * scores[name]
        total = term if total is None else total + term
    return total


def gate_score(config, scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """The score ``config``'s gate decides on, from the run's mean scores."""
    if config.gate_detector == "linear":
        return linear_score(scores, config.gate_weights)
    if config.gate_detector not in scores:
        raise ValueError(
            f"the memorization gate's detector {config.gate_detector!r} has no score in this run"
            " (cosine, entropy and spike_share need GUARD's attenuated branch and layers)"
        )
    return scores[config.gate_detector]


def gate_rule(config) -> str:
    """The gate's decision rule in words, for reports ("first-step cosine > 0.95")."""
    steps = "first-step" if config.gate_steps == 1 else f"first {config.gate_steps} steps'"
    if config.gate_detector == "linear":
        terms = " + ".join(f"{w:g} {name}" for name, w in zip(LINEAR_DETECTORS, config.gate_weights) if w)
        return f"{steps} {terms} < {config.gate_threshold:g}"
    side = "<" if MEMORIZED_IF_HIGH[config.gate_detector] else ">"
    return f"{steps} {config.gate_detector} {side} {config.gate_threshold:g}"


def is_cleared(detector: str, score: torch.Tensor, threshold: float) -> torch.Tensor:
    """The gate's decision per image: True where the score says "not memorized"."""
    if detector == "linear":
        return score < threshold
    if detector not in DETECTORS:
        raise ValueError(f"detector must be one of {DETECTORS + ('linear',)}, got {detector!r}")
    return score < threshold if MEMORIZED_IF_HIGH[detector] else score > threshold


@dataclass
class DetectionScores:
    """Per-image memorization scores of a run, means over the first ``steps`` UNet calls.

    Each field is a (prompts, images) float32 tensor on the host, or None where the run could
    not compute it (``cosine`` needs GUARD's attenuated branch, ``entropy`` the fused kernel on
    the plain prompt's rows, ``spike_share`` the spike counts of attenuated layers; ``wen`` any
    method with an unconditional branch).
    """

    steps: int
    wen: Optional[torch.Tensor] = None
    cosine: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    spike_share: Optional[torch.Tensor] = None

    def get(self, name: str) -> Optional[torch.Tensor]:
        if name not in DETECTORS:
            raise ValueError(f"detector must be one of {DETECTORS}, got {name!r}")
        return getattr(self, name)

    def to_dict(self) -> dict:
        return {"steps": self.steps} | {
            name: None if self.get(name) is None else self.get(name).tolist() for name in DETECTORS
        }


class ScoreAccumulator:
    """Device-side sums of the scores over the detection calls (no host sync until ``result``)."""

    def __init__(self) -> None:
        self.calls = 0
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, **scores: Optional[torch.Tensor]) -> None:
        for name, value in scores.items():
            if value is None:
                continue
            self.sums[name] = value if name not in self.sums else self.sums[name] + value
        self.calls += 1

    def means(self) -> dict[str, torch.Tensor]:
        """Per score, the mean over the calls so far, on the device."""
        return {name: total / self.calls for name, total in self.sums.items()}

    def result(self, prompts: int, images: int) -> DetectionScores:
        means = {name: value.float().cpu().view(prompts, images) for name, value in self.means().items()}
        return DetectionScores(steps=self.calls, **means)


def detect(pipe, prompt, *, steps: int = 1, guard_config=None, **call_kwargs) -> DetectionScores:
    """Memorization scores of ``prompt`` (a string or a list) from the first ``steps`` steps only.

    Runs ``pipe`` (a GUARD pipeline) with ``guard_config`` (default: the published GUARD run, so
    every score is available) and stops after ``steps`` denoising steps without decoding; the
    other keyword arguments (``num_images_per_prompt``, ``generator``, ``num_inference_steps``,
    ``negative_prompt``, ...) are the pipeline's. Scores depend on the timestep schedule, so pass
    the ``num_inference_steps`` you will sample with. Returns (prompts, images) scores.
    """
    from .config import GuardConfig
    from .pipeline import resolve_config

    config = resolve_config(guard_config if guard_config is not None else GuardConfig())
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    for name in ("output_type", "callback_on_step_end", "detection_steps"):
        if name in call_kwargs:
            raise TypeError(f"detect sets {name} itself")

    def stop_after(pipeline, step_index, timestep, tensors):
        if step_index + 1 >= steps:
            pipeline._interrupt = True
        return {}

    output = pipe(
        prompt,
        guard_config=config,
        output_type="latent",
        callback_on_step_end=stop_after,
        detection_steps=steps,
        **call_kwargs,
    )
    return output.report.detection
