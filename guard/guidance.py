"""Combining the UNet's branch predictions into one guided noise prediction (arXiv 2603.00133, sec. 3-4).

Everything here is device-side tensor arithmetic with Python-float weights, so a sampler can call
it every step without a host synchronisation (the orthogonalisation's per-image condition is a
``torch.where``, not an ``if``).
"""

from __future__ import annotations

import math
import operator
from typing import NamedTuple

import torch

from guard_kernels.validation import real_number

from .config import GuardConfig

#: Added under the square roots and to the denominator of the orthogonalisation, as released.
ORTHO_EPS = 1e-8


class GuidanceNorms(NamedTuple):
    """Per-image magnitudes of one step's guidance terms, float32 tensors of shape (B,).

    attraction: ``|w_pos * v_pos|`` (after orthogonalisation), the pull toward the attenuated
        (or, for plain CFG, the conditional) prediction.
    repulsion: ``|w_neg * v_neg|``, the push away from the plain-prompt prediction (0 without it).
    cosine: cosine between ``v_pos`` and ``v_neg`` before orthogonalisation; near 1 means the
        attenuation barely changed the prediction (NaN for methods without a repulsive branch).
    """

    attraction: torch.Tensor
    repulsion: torch.Tensor
    cosine: torch.Tensor


def _step(step_index, num_steps) -> tuple[int, int]:
    try:
        steps = operator.index(num_steps)
        index = operator.index(step_index)
    except TypeError:
        raise TypeError(f"step_index and num_steps must be integers, got {step_index!r} and {num_steps!r}") from None
    if isinstance(num_steps, bool) or isinstance(step_index, bool):
        raise TypeError("step_index and num_steps must be integers, not bools")
    if steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {steps}")
    if not 0 <= index < steps:
        raise ValueError(f"step_index must be in [0, num_steps={steps}), got {index}")
    return index, steps


def repulsion_weight(step_index: int, num_steps: int, config: GuardConfig) -> float:
    """``w_neg(i)``: the repulsion scale times the schedule at ``progress = i / num_steps``.

    The repulsion matters early, when the layout (and with it a memorised image) is decided, and
    the default cosine schedule fades it out toward the end.
    """
    index, steps = _step(step_index, num_steps)
    progress = index / steps
    r = config.repulsion_scale
    schedule = config.repulsion_schedule
    if schedule == "cosine":
        return r * math.cos(math.pi / 2 * progress)
    if schedule == "linear":
        return r * (1.0 - progress)
    if schedule == "sine":
        return r * math.sin(math.pi / 2 * progress)
    return r  # "constant"


def _check_predictions(**predictions: torch.Tensor) -> None:
    reference_name, reference = next(iter(predictions.items()))
    for name, value in predictions.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.dim() < 1 or value.shape[0] < 1:
            raise ValueError(f"{name} must have a leading batch dim of at least 1, got shape {tuple(value.shape)}")
        if value.shape != reference.shape:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)} but {reference_name} has {tuple(reference.shape)};"
                " every branch prediction must have the same shape"
            )
        if value.dtype != reference.dtype or value.device != reference.device:
            raise ValueError(
                f"{name} is {value.dtype} on {value.device} but {reference_name} is {reference.dtype} on"
                f" {reference.device}"
            )


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precisions to float32 for reductions; float32 and float64 stay as they are."""
    return x if x.dtype == torch.float64 else x.float()


def _per_image_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(_upcast(x.flatten(1)), dim=1)


def _alignment(v_pos: torch.Tensor, v_neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, in float32 (float64 for float64 inputs): the coefficient of ``v_pos`` projected
    on ``v_neg``, and their cosine (both with the released code's epsilon)."""
    pos = _upcast(v_pos.flatten(1))
    neg = _upcast(v_neg.flatten(1))
    dot = (pos * neg).sum(dim=1)
    pos_sq = (pos * pos).sum(dim=1)
    neg_sq = (neg * neg).sum(dim=1)
    return dot / (neg_sq + ORTHO_EPS), dot / (torch.sqrt(pos_sq + ORTHO_EPS) * torch.sqrt(neg_sq + ORTHO_EPS))


def _orthogonalize(v_pos: torch.Tensor, v_neg: torch.Tensor, config: GuardConfig):
    """Remove the repulsion direction from ``v_pos`` per image when the two nearly align."""
    coef, cosine = _alignment(v_pos, v_neg)
    clip = config.ortho_coef_clip
    shift = torch.where(cosine > config.ortho_cos_threshold, coef.clamp(-clip, clip), torch.zeros_like(coef))
    shape = (-1,) + (1,) * (v_pos.dim() - 1)
    return v_pos - shift.view(shape) * v_neg, cosine


def guidance_cosine(eps_u: torch.Tensor, eps_pos: torch.Tensor, eps_neg: torch.Tensor) -> torch.Tensor:
    """Per image, the cosine between the attenuated and the plain-prompt guidance directions.

    Near 1 when attenuating the spike tokens barely moves the prediction (nothing in the prompt
    dominates it); lower for a memorized prompt. float32 (float64 for float64 inputs).
    """
    _check_predictions(eps_u=eps_u, eps_pos=eps_pos, eps_neg=eps_neg)
    base = _upcast(eps_u)
    return _alignment(_upcast(eps_pos) - base, _upcast(eps_neg) - base)[1]


def memorization_gate(
    eps_u: torch.Tensor, eps_pos: torch.Tensor, eps_neg: torch.Tensor, config: GuardConfig
) -> torch.Tensor:
    """Per image, True where the cosine memorization gate clears it (no host sync).

    An image is cleared (judged not memorized, and guided by plain CFG) when its attenuated and
    plain-prompt guidance directions agree above ``config.gate_threshold``: attenuating its
    spike tokens barely moved the prediction. Call it on the first step's predictions and pass
    the result to every step as ``cleared``. The other detectors are in :mod:`guard.detection`.
    """
    if not isinstance(config, GuardConfig):
        raise TypeError(f"config must be a GuardConfig, got {type(config).__name__}")
    if config.gate_threshold is None or config.gate_detector != "cosine":
        raise ValueError("memorization_gate needs a config with gate_threshold set and gate_detector 'cosine'")
    return guidance_cosine(eps_u, eps_pos, eps_neg) > config.gate_threshold


def guard_guidance(
    eps_u: torch.Tensor,
    eps_pos: torch.Tensor,
    eps_neg: torch.Tensor,
    step_index: int,
    num_steps: int,
    config: GuardConfig,
    *,
    return_norms: bool = False,
    cleared: torch.Tensor | None = None,
):
    """GUARD's guided prediction ``v_u + w_pos * v_pos - w_neg(i) * v_neg`` (arXiv 2603.00133, sec. 3).

    Args:
        eps_u, eps_pos, eps_neg: the unconditional, attenuated-prompt and plain-prompt predictions,
            same shape (B, ...) and dtype; image b of each belongs together.
        step_index, num_steps: position in the sampling loop (0-based), for the repulsion schedule.
        config: a :class:`GuardConfig` with ``method="guard"``.
        return_norms: also return :class:`GuidanceNorms` (device tensors; no host sync).
        cleared: optional bool tensor (B,), the images the memorization gate cleared (see
            :func:`memorization_gate`); they get classifier-free guidance on the plain prompt,
            ``eps_u + s * v_neg``, instead, and their norms are those of that guidance.

    Returns ``eps_hat`` in the inputs' dtype, or ``(eps_hat, norms)``. With orthogonalisation the
    arithmetic runs in float32 (float64 for float64 inputs); without it, in the inputs' dtype, so
    that with ``repulsion_scale`` 0 it is bit-for-bit classifier-free guidance.
    """
    if not isinstance(config, GuardConfig):
        raise TypeError(f"config must be a GuardConfig, got {type(config).__name__}")
    if config.method != "guard":
        raise ValueError(
            f"guard_guidance needs a config with method='guard', got method={config.method!r};"
            " use cfg_guidance (or combine_predictions) for 'attenuation' and 'cfg'"
        )
    _check_predictions(eps_u=eps_u, eps_pos=eps_pos, eps_neg=eps_neg)
    w_neg = repulsion_weight(step_index, num_steps, config)
    w_pos = config.guidance_scale
    if config.orthogonalize:
        base = _upcast(eps_u)
        v_neg = _upcast(eps_neg) - base
        v_pos, cosine = _orthogonalize(_upcast(eps_pos) - base, v_neg, config)
        eps_hat = (base + w_pos * v_pos - w_neg * v_neg).to(eps_u.dtype)
    else:
        v_pos = eps_pos - eps_u
        v_neg = eps_neg - eps_u
        eps_hat = eps_u + w_pos * v_pos - w_neg * v_neg
        cosine = None
    if cleared is not None:
        plain = _image_mask(cleared, eps_u)
        per_image = plain.view((-1,) + (1,) * (eps_u.dim() - 1))
        eps_hat = torch.where(per_image, cfg_guidance(eps_u, eps_neg, w_pos), eps_hat)
    if not return_norms:
        return eps_hat
    if cosine is None:
        cosine = _alignment(v_pos, v_neg)[1]
    neg_norm = _per_image_norm(v_neg)
    attraction = w_pos * _per_image_norm(v_pos)
    repulsion = w_neg * neg_norm
    if cleared is not None:  # what acted on a cleared image is CFG: no repulsion, no GUARD cosine
        attraction = torch.where(plain, w_pos * neg_norm, attraction)
        repulsion = torch.where(plain, torch.zeros_like(repulsion), repulsion)
        cosine = torch.where(plain, torch.full_like(cosine, float("nan")), cosine)
    return eps_hat, GuidanceNorms(attraction=attraction, repulsion=repulsion, cosine=cosine)


def _image_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"cleared must be a bool tensor, got {mask!r}")
    if mask.shape != like.shape[:1]:
        raise ValueError(f"cleared must have shape ({like.shape[0]},), one entry per image, got {tuple(mask.shape)}")
    if mask.device != like.device:
        raise ValueError(f"cleared is on {mask.device} but the predictions are on {like.device}")
    return mask


def cfg_guidance(
    eps_u: torch.Tensor,
    eps_cond: torch.Tensor,
    guidance_scale: float,
    *,
    return_norms: bool = False,
):
    """Classifier-free guidance ``eps_u + s * (eps_cond - eps_u)``, written as diffusers writes it.

    For the "attenuation" method ``eps_cond`` is the attenuated conditional prediction.
    """
    _check_predictions(eps_u=eps_u, eps_cond=eps_cond)
    guidance_scale = real_number("guidance_scale", guidance_scale)
    delta = eps_cond - eps_u
    eps_hat = eps_u + guidance_scale * delta
    if not return_norms:
        return eps_hat
    attraction = guidance_scale * _per_image_norm(delta)
    norms = GuidanceNorms(
        attraction=attraction,
        repulsion=torch.zeros_like(attraction),
        cosine=torch.full_like(attraction, float("nan")),
    )
    return eps_hat, norms


def transition_guidance(
    eps_u: torch.Tensor,
    eps_cond: torch.Tensor,
    timestep,
    config: GuardConfig,
    *,
    return_norms: bool = False,
):
    """Jain et al.'s static transition: scale ``early_guidance_scale`` while ``timestep`` is above
    ``transition_timestep`` (inside the attraction basin), ``guidance_scale`` after.

    The choice is a ``torch.where`` on the (possibly on-device) timestep, so no host sync.
    """
    if not isinstance(config, GuardConfig):
        raise TypeError(f"config must be a GuardConfig, got {type(config).__name__}")
    _check_predictions(eps_u=eps_u, eps_cond=eps_cond)
    t = torch.as_tensor(timestep, device=eps_u.device)
    if t.numel() != 1:
        raise ValueError(f"timestep must be a scalar, got shape {tuple(t.shape)}")
    early = torch.as_tensor(config.early_guidance_scale, dtype=eps_u.dtype, device=eps_u.device)
    late = torch.as_tensor(config.guidance_scale, dtype=eps_u.dtype, device=eps_u.device)
    scale = torch.where(t.reshape(()) > config.transition_timestep, early, late)
    delta = eps_cond - eps_u
    eps_hat = eps_u + scale * delta
    if not return_norms:
        return eps_hat
    attraction = scale.float() * _per_image_norm(delta)
    return eps_hat, GuidanceNorms(attraction, torch.zeros_like(attraction), torch.full_like(attraction, float("nan")))


class DynamicTransition:
    """Jain et al.'s dynamic transition point, per image, over one sampling run (no host sync).

    Jain et al., "Classifier-Free Guidance inside the Attraction Basin May Cause Memorization"
    (CVPR 2025; github.com/SonyResearch/mitigating_memorization, ``generate_test_dataset_dtp.py``):
    with ``d_j = ||eps_c - eps_u||_2`` at step j, the transition fires at the first j >= 2 where
    ``d_{j-2} > d_{j-1} < d_j`` (the step before is a strict local minimum, seen one step late);
    from step j on the image gets ``guidance_scale``, before it ``early_guidance_scale``.
    """

    def __init__(self, config: GuardConfig) -> None:
        if config.method != "jain" or config.transition != "dynamic":
            raise ValueError("DynamicTransition needs a config with method 'jain' and transition 'dynamic'")
        self.config = config
        self.history: list[torch.Tensor] = []  # the last two d's
        self.switched: torch.Tensor | None = None  # (images,) bool

    def __call__(self, eps_u: torch.Tensor, eps_cond: torch.Tensor, *, return_norms: bool = False):
        _check_predictions(eps_u=eps_u, eps_cond=eps_cond)
        delta = eps_cond - eps_u
        d = _per_image_norm(delta)
        if self.switched is None:
            self.switched = torch.zeros(d.shape, dtype=torch.bool, device=d.device)
        if len(self.history) == 2:
            before, last = self.history
            self.switched = self.switched | ((before > last) & (last < d))
        self.history = (self.history + [d])[-2:]
        early, late = self.config.early_guidance_scale, self.config.guidance_scale
        scale = torch.where(self.switched, late, early).to(delta.dtype)
        eps_hat = eps_u + scale.view((-1,) + (1,) * (delta.dim() - 1)) * delta
        if not return_norms:
            return eps_hat
        attraction = scale.float() * d
        return eps_hat, GuidanceNorms(
            attraction, torch.zeros_like(attraction), torch.full_like(attraction, float("nan"))
        )


def combine_predictions(
    noise_pred: torch.Tensor,
    step_index: int,
    num_steps: int,
    config: GuardConfig,
    *,
    timestep=None,
    return_norms: bool = False,
    cleared: torch.Tensor | None = None,
):
    """Split one UNet output into the method's row groups and guide.

    ``noise_pred`` holds ``config.branches`` equal groups stacked on dim 0, in the order
    unconditional, attenuated (or conditional), and for "guard" the plain-prompt group.
    ``timestep`` (the scheduler's, a scalar) is needed by "jain" only; ``cleared`` ("guard"
    only) is passed on to :func:`guard_guidance`.
    """
    if not isinstance(config, GuardConfig):
        raise TypeError(f"config must be a GuardConfig, got {type(config).__name__}")
    if not isinstance(noise_pred, torch.Tensor) or noise_pred.dim() < 1:
        raise TypeError("noise_pred must be a tensor with a leading batch dim")
    groups = config.branches
    if noise_pred.shape[0] % groups:
        raise ValueError(
            f"noise_pred has {noise_pred.shape[0]} rows, not a multiple of the {groups} branches of"
            f" method {config.method!r}"
        )
    if config.method == "guard":
        eps_u, eps_pos, eps_neg = noise_pred.chunk(3)
        return guard_guidance(
            eps_u, eps_pos, eps_neg, step_index, num_steps, config, return_norms=return_norms, cleared=cleared
        )
    if cleared is not None:
        raise ValueError(f"cleared (the memorization gate's decision) needs method 'guard', got {config.method!r}")
    _step(step_index, num_steps)
    eps_u, eps_cond = noise_pred.chunk(2)
    if config.method == "jain":
        if timestep is None:
            raise ValueError("method 'jain' needs the scheduler's timestep: combine_predictions(..., timestep=t)")
        return transition_guidance(eps_u, eps_cond, timestep, config, return_norms=return_norms)
    return cfg_guidance(eps_u, eps_cond, config.guidance_scale, return_norms=return_norms)
