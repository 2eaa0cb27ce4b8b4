"""What GUARD saw during one sampling run, so that users can tell why an image changed.

The pipeline gathers everything on the device during the loop and moves it to the host once,
at the end; this module only formats host-side tensors.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from .config import GuardConfig
from .detection import DetectionScores, gate_rule

#: Label of text positions after the prompt's first EOS (padding, whatever token id pads).
PAD_LABEL = "<pad>"


def token_labels(tokenizer, input_ids: Sequence[int], num_keys: int) -> list[str]:
    """One readable label per text position: the decoded token, then :data:`PAD_LABEL` after EOS.

    Padding positions are still keys of the cross-attention and can be flagged; naming them apart
    from the real EOS keeps "the prompt's words" and "the padding" distinguishable in the report.
    """
    labels: list[str] = []
    eos_id = getattr(tokenizer, "eos_token_id", None)
    after_eos = False
    for token_id in list(input_ids)[:num_keys]:
        if after_eos:
            labels.append(PAD_LABEL)
            continue
        text = tokenizer.decode([int(token_id)]).strip()
        labels.append(text or str(tokenizer.convert_ids_to_tokens(int(token_id))))
        after_eos = eos_id is not None and int(token_id) == eos_id
    labels.extend([PAD_LABEL] * (num_keys - len(labels)))
    return labels


def position_labels(num_keys: int) -> list[str]:
    """Labels when only embeddings were given (no token ids to decode)."""
    return [f"<position {j}>" for j in range(num_keys)]


@dataclass(eq=False)
class GuardReport:
    """Per prompt: the tokens GUARD flagged (how often, in which layers) and per-step guidance norms.

    flag_counts: (prompts, layers, tokens) int64; entry [p, l, j] counts the (step, head, image)
        triples in which layer ``layer_names[l]`` flagged text position j of prompt p's attenuated
        rows, over the images GUARD guided (a cleared image's flags did not act and are not
        counted). Its maximum per layer is ``num_steps * layer_heads[l] * guided_images[p]``.
    attraction_norms, repulsion_norms, cosines: (steps, prompts, images) float32; see
        :class:`guard.guidance.GuidanceNorms` (a cleared image's are those of its CFG guidance:
        no repulsion, cosine NaN).
    cleared: (prompts, images) bool, the images the memorization gate (``GuardConfig.gate_threshold``)
        cleared, judged not memorized and guided by plain CFG; None when the gate is off.
    detection: the memorization scores of the first step(s) (:class:`guard.detection.DetectionScores`).
    embedding_optimization: method "wen" only, per prompt the losses and updates of Wen et al.'s
        optimisation (:class:`guard.wen.EmbeddingOptimization`).
    """

    config: GuardConfig
    prompts: list[Optional[str]]
    token_labels: list[list[str]]
    layer_names: tuple[str, ...]
    layer_heads: tuple[int, ...]
    flag_counts: torch.Tensor
    images_per_prompt: int
    num_steps: int
    repulsion_weights: list[float]
    attraction_norms: torch.Tensor
    repulsion_norms: torch.Tensor
    cosines: torch.Tensor
    cleared: Optional[torch.Tensor] = None
    detection: Optional[DetectionScores] = None
    embedding_optimization: Optional[Any] = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def guidance_norms(self) -> dict[str, torch.Tensor]:
        """Per-step norms by name, each (steps, prompts, images)."""
        return {"attraction": self.attraction_norms, "repulsion": self.repulsion_norms, "cosine": self.cosines}

    def _positions(self, prompt_index: int):
        counts = self.flag_counts[prompt_index]  # (L, Nk)
        return counts, self.token_labels[prompt_index]

    @property
    def flagged_tokens(self) -> list[dict[str, int]]:
        """Per prompt: token string -> total flag count (positions with equal strings summed),
        most flagged first; tokens never flagged are left out."""
        if "tokens" not in self._cache:
            result = []
            for p in range(len(self.prompts)):
                counts, labels = self._positions(p)
                totals: dict[str, int] = {}
                for j, count in enumerate(counts.sum(dim=0).tolist()):
                    if count:
                        totals[labels[j]] = totals.get(labels[j], 0) + int(count)
                result.append(dict(sorted(totals.items(), key=lambda item: (-item[1], item[0]))))
            self._cache["tokens"] = result
        return self._cache["tokens"]

    @property
    def flagged_layers(self) -> list[dict[str, dict[str, int]]]:
        """Per prompt: token string -> {layer name -> flag count} for the layers that flagged it."""
        if "layers" not in self._cache:
            result = []
            for p in range(len(self.prompts)):
                counts, labels = self._positions(p)
                per_token: dict[str, dict[str, int]] = {}
                for layer_index, layer in enumerate(self.layer_names):
                    for j, count in enumerate(counts[layer_index].tolist()):
                        if count:
                            layers = per_token.setdefault(labels[j], {})
                            layers[layer] = layers.get(layer, 0) + int(count)
                result.append(per_token)
            self._cache["layers"] = result
        return self._cache["layers"]

    @property
    def guided_images(self) -> list[int]:
        """Per prompt: how many images GUARD guided (all of them unless the gate cleared some)."""
        if self.cleared is None:
            return [self.images_per_prompt] * len(self.prompts)
        return [int(n) for n in (~self.cleared).sum(dim=1).tolist()]

    @property
    def checks_per_prompt(self) -> list[int]:
        """Per prompt: the (step, layer, head, image) spike decisions that acted on each of its text
        positions (images the gate cleared excluded)."""
        return [self.num_steps * sum(self.layer_heads) * images for images in self.guided_images]

    def _guided_mean(self, values: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        """Mean of (steps, prompts, images) ``values`` over ``dims``, counting only the images GUARD
        guided (NaN where the gate cleared every one of them)."""
        if self.cleared is None:
            return values.mean(dim=dims)
        keep = (~self.cleared).to(values.dtype).expand_as(values)
        return (torch.nan_to_num(values) * keep).sum(dim=dims) / keep.sum(dim=dims)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (JSON-serialisable) for logs and files."""
        return {
            "method": self.method,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self.config).items()},
            "prompts": list(self.prompts),
            "layers": list(self.layer_names),
            "checks_per_prompt": self.checks_per_prompt,
            "flagged_tokens": self.flagged_tokens,
            "flagged_layers": self.flagged_layers,
            "repulsion_weights": list(self.repulsion_weights),
            "cleared": None if self.cleared is None else self.cleared.tolist(),
            "detection": None if self.detection is None else self.detection.to_dict(),
            "embedding_optimization": None
            if self.embedding_optimization is None
            else dataclasses.asdict(self.embedding_optimization),
            # per step and prompt, the mean over the images GUARD guided (None where the gate cleared all)
            "guidance_norms": {
                name: [[_finite_or_none(x) for x in step] for step in self._guided_mean(values, (2,)).tolist()]
                for name, values in self.guidance_norms.items()
            },
        }

    def summary(self, max_tokens: int = 8) -> str:
        """A readable multi-line account: flagged tokens per prompt, then the guidance norms."""
        lines = [
            f"GUARD report: method={self.method}, {self.num_steps} steps, "
            f"{self.images_per_prompt} image(s) per prompt, {len(self.layer_names)} attenuated layer(s)"
        ]
        for p, prompt in enumerate(self.prompts):
            checks = self.checks_per_prompt[p]
            lines.append(f"prompt {p}: {prompt!r}" if prompt is not None else f"prompt {p}: (embeddings)")
            tokens = self.flagged_tokens[p]
            if self.cleared is not None:
                cleared = [i for i, flag in enumerate(self.cleared[p].tolist()) if flag]
                which = f" (image {', '.join(map(str, cleared))})" if cleared else ""
                lines.append(
                    f"  memorization gate ({gate_rule(self.config)}): {len(cleared)} of "
                    f"{self.images_per_prompt} image(s) cleared{which} and guided by plain CFG, "
                    f"{self.images_per_prompt - len(cleared)} by GUARD"
                )
            if self.embedding_optimization is not None:
                losses = self.embedding_optimization.losses[p]
                lines.append(
                    f"  Wen et al.'s embedding optimisation: {self.embedding_optimization.updates[p]} update(s), "
                    f"loss {losses[0]:.4g} -> {losses[-1]:.4g} (target {self.config.wen_target_loss:g})"
                    if losses
                    else "  Wen et al.'s embedding optimisation: no iteration"
                )
            if not self.layer_names:
                lines.append(f"  no spike attenuation (method {self.method!r})")
            elif checks == 0 and self.num_steps:
                lines.append("  no attenuation acted: every image was cleared by the memorization gate")
            elif not tokens:
                lines.append("  no token flagged")
            positions = Counter(self.token_labels[p])
            for token, count in list(tokens.items())[:max_tokens]:
                layers = self.flagged_layers[p][token]
                spread = f" over {positions[token]} positions" if positions[token] > 1 else ""
                share = f" ({100.0 * count / (checks * positions[token]):.0f}% of checks{spread})" if checks else ""
                where = ", ".join(
                    f"{_short_layer(name)} x{n}" for name, n in sorted(layers.items(), key=lambda kv: -kv[1])
                )
                lines.append(f"  {token!r}: flagged {count}x{share} in {where}")
            if len(tokens) > max_tokens:
                lines.append(f"  ... and {len(tokens) - max_tokens} more token(s)")
        lines += self._step_table()
        return "\n".join(lines)

    def _step_table(self) -> list[str]:
        """Per-step GUARD terms, only for GUARD runs (other methods have no repulsion to show) and only
        over the images GUARD guided."""
        if self.method != "guard" or not self.num_steps:
            return []
        if self.cleared is not None and bool(self.cleared.all()):
            return ["per-step GUARD terms: none, every image was cleared by the memorization gate (plain CFG)"]
        over = "images" if self.cleared is None else "the images GUARD guided"
        lines = [f"step  w_neg   |attraction|  |repulsion|  cos(v_pos,v_neg)   (means over {over})"]
        attraction, repulsion, cosine = (
            self._guided_mean(values, (1, 2)).tolist()
            for values in (self.attraction_norms, self.repulsion_norms, self.cosines)
        )
        for i in range(self.num_steps):
            lines.append(
                f"{i:4d}  {self.repulsion_weights[i]:5.3f}  {attraction[i]:12.4g}  {repulsion[i]:11.4g}"
                f"  {_format_cos(cosine[i])}"
            )
        return lines

    def __str__(self) -> str:
        return self.summary()


def _short_layer(name: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn2`` -> ``down_blocks.0.attentions.0``."""
    suffix = ".transformer_blocks.0.attn2"
    return name[: -len(suffix)] if name.endswith(suffix) else name


def _finite_or_none(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def _format_cos(value: float) -> str:
    return f"{value:16.4f}" if math.isfinite(value) else f"{'-':>16}"
