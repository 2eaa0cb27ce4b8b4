"""GUARD's sampling settings, validated once so that the sampler never runs on a bad value.

Defaults are the published GUARD run (Zhao et al., arXiv 2603.00133, sections 3-4 and their
experimental setup); :data:`PRESETS` names the other published variants, including one that
reproduces the paper's released code path.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Optional

from guard_kernels.validation import real_number

METHODS = ("guard", "attenuation", "cfg", "ren", "jain", "somepalli", "wen")
SCHEDULES = ("cosine", "linear", "sine", "constant")
#: Memorization scores the gate can decide on (guard.detection has their definitions).
DETECTORS = ("cosine", "wen", "entropy", "spike_share")
#: The scores the "linear" gate weighs, in the order of ``GuardConfig.gate_weights``.
LINEAR_DETECTORS = ("wen", "cosine", "entropy")
#: What the gate can decide on: one score, or "linear", a weighted sum of three (gate_weights).
GATE_DETECTORS = DETECTORS + ("linear",)
#: What the default (``blocks=None``: the paper's rule, every down block with cross-attention and
#: the mid block, resolved on the UNet a run uses; see guard.attention.default_blocks) comes to on
#: SD 1.x / 2.x.
DEFAULT_BLOCKS = ("down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block")

#: Number of UNet row groups each method runs per step (unconditional, attenuated, plain prompt).
BRANCHES = {"guard": 3, "attenuation": 2, "cfg": 2, "ren": 2, "jain": 2, "somepalli": 2, "wen": 2}
#: Which tokens the attenuated rows attenuate: each check's own spikes (the paper), or each image's
#: spike tokens fixed after the first step(s).
SPIKE_TOKENS = ("per-check", "first-step")
#: Jain et al.'s transition points: a fixed timestep, or the first local minimum of the text-conditional noise.
TRANSITIONS = ("static", "dynamic")

# A module-name prefix: dot-separated identifiers or indices, e.g. "down_blocks.1" or "mid_block".
_BLOCK_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


def _real(name: str, value: Any, *, minimum: float | None = 0.0) -> float:
    """The kernel's own check (guard_kernels.validation), so both refuse the same values alike."""
    return real_number(f"GuardConfig.{name}", value, minimum=minimum)


@dataclass(frozen=True)
class GuardConfig:
    """How one sampling run guides: the method, its scales, and where attenuation applies.

    method: "guard" (3 branches: unconditional, attenuated prompt, plain prompt), "attenuation"
        (CFG whose conditional branch is attenuated), "cfg" (plain classifier-free guidance), or
        one of the related inference-time mitigations the paper compares GUARD with, all on
        2 branches: "ren" (Ren et al. 2024: text positions after the prompt's
        EOS masked and the BOS logit scaled by ``bos_scale`` on the conditional rows, in every
        cross-attention layer), "jain" (Jain et al. 2025, static transition: guidance scale
        ``early_guidance_scale`` while the timestep exceeds ``transition_timestep``, then
        ``guidance_scale``), "somepalli" (Somepalli et al. 2023: Gaussian noise of standard
        deviation ``embedding_noise_scale`` added once to the prompt embedding).
    guidance_scale: attraction weight ``s`` (the CFG scale for "attenuation" and "cfg").
    repulsion_scale: ``r``, peak weight of the repulsion from the plain-prompt prediction.
    repulsion_schedule: how the repulsion weight decays over the steps.
    spike_threshold, spike_scale: the spike rule's z-score threshold ``tau`` and logit factor
        ``alpha``.
    spike_tokens: "per-check" (the paper): every (step, layer, head) flags its own spike tokens.
        "first-step" (not in the paper): after the first ``gate_steps`` steps (1 without a gate), each
        image's spike tokens are fixed, the tokens flagged at least half as often as its
        most-flagged one, and from then on they, and only they, get the factor ``alpha`` in every
        head of the attenuated layers. At a high ``tau`` the rule also flags a caption's own words
        in a few checks, which costs the caption; a memorized trigger stands out in most of them.
        Detection scores read after that point count the fixed tokens as flagged in every head.
    blocks: module-name prefixes whose ``attn2`` layers are attenuated. None (the default) is the
        paper's rule, resolved on the UNet a run uses: the down blocks that have cross-attention
        and the mid block (on SD 1.x / 2.x exactly :data:`DEFAULT_BLOCKS`; on SDXL
        ``down_blocks.1``, ``down_blocks.2`` and ``mid_block``, every transformer layer in them).
        Explicit prefixes must each match at least one ``attn2`` module of that UNet.
    orthogonalize, ortho_cos_threshold, ortho_coef_clip: the released code's optional removal of
        the repulsion direction from the attraction direction (in the authors' released code, off in
        the paper's runs).
    gate_threshold, gate_detector, gate_steps: the memorization gate, "guard" only, off (None) by
        default and not part of the paper. After the first ``gate_steps`` UNet calls, an image
        whose memorization score (``gate_detector``, see :mod:`guard.detection`: "cosine",
        between GUARD's attenuated and plain-prompt guidance, cleared above the threshold; "wen",
        the text-conditional noise norm, "entropy", Ren et al.'s cross-attention entropy, or
        "spike_share", the largest share of a step's spike checks that flagged one token, cleared
        below it; "linear", ``gate_weights`` (wen, cosine, entropy) times the three
        scores, summed, cleared below the threshold, so that any combination and either
        direction can be calibrated for a model) says it is not memorized is cleared: guided by
        plain classifier-free guidance from then on, on its unconditional and plain rows only
        (CFG's cost); the others keep GUARD's three rows. The scores come from GUARD's own
        branches: no extra UNet call.
    bos_scale: "ren" only, the BOS logit factor c1 on the conditional rows.
    transition_timestep, early_guidance_scale: "jain" only; the early scale enters the same
        formula ``eps_u + scale * (eps_c - eps_u)`` as ``guidance_scale``, so 1.0 means no
        guidance (the conditional prediction alone) and negative values guide away from the prompt.
    transition: "jain" only: "static" (the timestep above) or "dynamic" (Jain et al.'s dynamic
        transition point, per image: the first step j >= 2 whose ``||eps_c - eps_u||`` makes the
        step before it a strict local minimum; guidance ``guidance_scale`` from step j on).
    embedding_noise_scale: "somepalli" only, the standard deviation of the embedding noise.
    wen_learning_rate, wen_iterations, wen_target_loss: "wen" only (Wen et al. 2024, see
        :mod:`guard.wen`): AdamW's learning rate, the most updates, and the loss (the released
        ``||eps_c - eps_u||_2`` over all of a prompt's images) at which the optimisation stops.
    """

    method: str = "guard"
    guidance_scale: float = 7.5
    repulsion_scale: float = 2.0
    repulsion_schedule: str = "cosine"
    spike_threshold: float = 0.1
    spike_scale: float = 0.3
    spike_tokens: str = "per-check"
    blocks: Optional[tuple[str, ...]] = None
    orthogonalize: bool = False
    ortho_cos_threshold: float = 0.9
    ortho_coef_clip: float = 2.0
    gate_threshold: Optional[float] = None
    gate_detector: str = "cosine"
    gate_steps: int = 1
    gate_weights: Optional[tuple[float, float, float]] = None
    bos_scale: float = 1.25
    transition_timestep: float = 500.0
    early_guidance_scale: float = 1.0
    embedding_noise_scale: float = 0.1
    transition: str = "static"
    wen_learning_rate: float = 0.05
    wen_iterations: int = 10
    wen_target_loss: float = 3.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"GuardConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.repulsion_schedule not in SCHEDULES:
            raise ValueError(
                f"GuardConfig.repulsion_schedule must be one of {SCHEDULES}, got {self.repulsion_schedule!r}"
            )
        if self.spike_tokens not in SPIKE_TOKENS:
            raise ValueError(f"GuardConfig.spike_tokens must be one of {SPIKE_TOKENS}, got {self.spike_tokens!r}")
        if self.spike_tokens != "per-check" and not self.attenuates:
            raise ValueError(
                f"GuardConfig.spike_tokens {self.spike_tokens!r} needs a method with attenuated rows ('guard' or"
                f" 'attenuation'), got method {self.method!r}"
            )
        set_ = object.__setattr__  # frozen dataclass: normalise in place once
        set_(self, "guidance_scale", _real("guidance_scale", self.guidance_scale))
        set_(self, "repulsion_scale", _real("repulsion_scale", self.repulsion_scale))
        # The threshold is a z-score: negative values are meaningful (flag tokens below the mean).
        set_(self, "spike_threshold", _real("spike_threshold", self.spike_threshold, minimum=None))
        set_(self, "spike_scale", _real("spike_scale", self.spike_scale))
        set_(self, "ortho_cos_threshold", _real("ortho_cos_threshold", self.ortho_cos_threshold, minimum=-1.0))
        if self.ortho_cos_threshold > 1.0:
            raise ValueError(f"GuardConfig.ortho_cos_threshold must be in [-1, 1], got {self.ortho_cos_threshold}")
        set_(self, "ortho_coef_clip", _real("ortho_coef_clip", self.ortho_coef_clip))
        set_(self, "bos_scale", _real("bos_scale", self.bos_scale))
        set_(self, "transition_timestep", _real("transition_timestep", self.transition_timestep))
        # Negative is Jain et al.'s "opposite guidance".
        set_(self, "early_guidance_scale", _real("early_guidance_scale", self.early_guidance_scale, minimum=None))
        set_(self, "embedding_noise_scale", _real("embedding_noise_scale", self.embedding_noise_scale))
        if self.transition not in TRANSITIONS:
            raise ValueError(f"GuardConfig.transition must be one of {TRANSITIONS}, got {self.transition!r}")
        set_(self, "wen_learning_rate", _real("wen_learning_rate", self.wen_learning_rate))
        set_(self, "wen_target_loss", _real("wen_target_loss", self.wen_target_loss))
        if isinstance(self.wen_iterations, bool) or not isinstance(self.wen_iterations, int) or self.wen_iterations < 0:
            raise ValueError(f"GuardConfig.wen_iterations must be a non-negative integer, got {self.wen_iterations!r}")
        if self.gate_detector not in GATE_DETECTORS:
            raise ValueError(f"GuardConfig.gate_detector must be one of {GATE_DETECTORS}, got {self.gate_detector!r}")
        if (self.gate_detector == "linear") != (self.gate_weights is not None):
            raise ValueError(
                "GuardConfig.gate_weights (wen, cosine, entropy) go with gate_detector 'linear', and only there"
            )
        if self.gate_weights is not None:
            weights = tuple(self.gate_weights) if isinstance(self.gate_weights, (list, tuple)) else ()
            if len(weights) != len(LINEAR_DETECTORS):
                raise ValueError(
                    f"GuardConfig.gate_weights must be 3 numbers (wen, cosine, entropy), got {self.gate_weights!r}"
                )
            weights = tuple(_real(f"gate_weights[{i}]", w, minimum=None) for i, w in enumerate(weights))
            if not any(weights):
                raise ValueError("GuardConfig.gate_weights must not all be 0")
            set_(self, "gate_weights", weights)
        if isinstance(self.gate_steps, bool) or not isinstance(self.gate_steps, int) or self.gate_steps < 1:
            raise ValueError(f"GuardConfig.gate_steps must be a positive integer, got {self.gate_steps!r}")
        if self.gate_threshold is None and (self.gate_detector != "cosine" or self.gate_steps != 1):
            raise ValueError("GuardConfig.gate_detector and gate_steps choose how the gate decides: set gate_threshold")
        if self.gate_threshold is not None:
            minimum = {"cosine": -1.0, "linear": None}.get(self.gate_detector, 0.0)
            gate = _real("gate_threshold", self.gate_threshold, minimum=minimum)
            if self.gate_detector == "cosine" and gate > 1.0:
                raise ValueError(f"GuardConfig.gate_threshold must be in [-1, 1] or None, got {gate}")
            if self.gate_detector == "spike_share" and gate > 1.0:
                raise ValueError(f"GuardConfig.gate_threshold of the spike_share gate must be in [0, 1], got {gate}")
            if self.method != "guard":
                raise ValueError(
                    f"GuardConfig.gate_threshold needs method 'guard' (the memorization gate compares GUARD's "
                    f"attenuated and plain-prompt branches), got method {self.method!r}; leave it None"
                )
            set_(self, "gate_threshold", gate)
        if not isinstance(self.orthogonalize, bool):
            raise TypeError(f"GuardConfig.orthogonalize must be a bool, got {self.orthogonalize!r}")
        set_(self, "blocks", _validate_blocks(self.blocks))

    @property
    def branches(self) -> int:
        """UNet row groups per prompt image: 3 for "guard", 2 otherwise."""
        return BRANCHES[self.method]

    @property
    def attenuates(self) -> bool:
        """Whether any rows get GUARD's spike rule ("guard" and "attenuation")."""
        return self.method in ("guard", "attenuation")

    def replace(self, **changes: Any) -> "GuardConfig":
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "GuardConfig":
        """The named published setting (see :data:`PRESETS`), with ``overrides`` applied."""
        if name not in PRESETS:
            raise ValueError(f"unknown GuardConfig preset {name!r}; available: {sorted(PRESETS)}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown GuardConfig field(s) in overrides: {sorted(unknown)}")
        return cls(**{**PRESETS[name], **overrides})


def _validate_blocks(blocks: Any) -> Optional[tuple[str, ...]]:
    if blocks is None:
        return None
    if isinstance(blocks, str):
        raise TypeError(
            f"GuardConfig.blocks must be a sequence of module-name prefixes, got the string {blocks!r}; "
            f"write ({blocks!r},)"
        )
    try:
        items = tuple(blocks)
    except TypeError:
        raise TypeError(f"GuardConfig.blocks must be a sequence of module-name prefixes, got {blocks!r}") from None
    if not items:
        raise ValueError("GuardConfig.blocks must name at least one module prefix, e.g. ('mid_block',)")
    for item in items:
        if not isinstance(item, str) or not _BLOCK_PATTERN.match(item):
            raise ValueError(
                f"GuardConfig.blocks entries must be dotted module-name prefixes like 'down_blocks.0', got {item!r}"
            )
    if len(set(items)) != len(items):
        raise ValueError(f"GuardConfig.blocks has duplicates: {items}")
    return items


#: Published settings by name. "guard": the paper's GUARD run; "attenuation": the attenuation-only
#: variant (tau 0.01); "guard-released": the released code path (orthogonalisation left on);
#: "cfg": plain classifier-free guidance, the unmitigated baseline; "ren", "jain" (no guidance
#: before t = 500), "jain-opposite" (guidance scale -2 before it), "jain-dynamic" (no guidance
#: before the dynamic transition point), "somepalli" and "wen" (Wen et al.'s embedding
#: optimisation, the paper's main baseline): the related methods at their published settings.
PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "guard": MappingProxyType({}),
        "attenuation": MappingProxyType({"method": "attenuation", "spike_threshold": 0.01, "spike_scale": 0.3}),
        "guard-released": MappingProxyType({"orthogonalize": True}),
        "cfg": MappingProxyType({"method": "cfg"}),
        "ren": MappingProxyType({"method": "ren", "bos_scale": 1.25}),
        "jain": MappingProxyType({"method": "jain", "transition_timestep": 500.0, "early_guidance_scale": 1.0}),
        "jain-opposite": MappingProxyType(
            {"method": "jain", "transition_timestep": 500.0, "early_guidance_scale": -2.0}
        ),
        "jain-dynamic": MappingProxyType({"method": "jain", "transition": "dynamic", "early_guidance_scale": 1.0}),
        "somepalli": MappingProxyType({"method": "somepalli", "embedding_noise_scale": 0.1}),
        "wen": MappingProxyType(
            {"method": "wen", "wen_learning_rate": 0.05, "wen_iterations": 10, "wen_target_loss": 3.0}
        ),
    }
)
