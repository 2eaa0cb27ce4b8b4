"""GUARD's cross-attention attenuation installed on a diffusers UNet, for the duration of a block.

Every ``attn2`` (cross-attention) layer gets a :class:`GuardCrossAttnProcessor` that runs the fused
kernel ``guard_kernels.cross_attention``; in the layers under ``config.blocks`` the spike rule runs
on the rows marked in ``spike_rows`` (GUARD's positive rows), elsewhere the kernel is plain
attention. The per-step state (which rows, which thresholds, the running statistics) lives on the
processors through one shared :class:`AttenuationSession`, never in ``cross_attention_kwargs``:
diffusers passes those to self-attention too and warns on unknown keys. Optional per-row token
factors and offsets (the kernel's ``token_scale`` / ``token_bias``) apply in every ``attn2`` layer,
which is how Ren et al.'s mitigation runs. Self-attention layers are left alone, and the original
processors come back when the block exits.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from diffusers.models import attention_processor as diffusers_processors

from guard_kernels import cross_attention
from guard_kernels.api import BACKENDS

from .config import GuardConfig

#: Processors whose cross-attention is exactly ``softmax(scale q k^T + mask) v`` with the layer's
#: own projections, so replacing them changes nothing but the attention kernel. Processors that
#: carry weights or extra inputs (IP-Adapter, custom diffusion, added KV) are refused rather than
#: silently dropped.
_REPLACEABLE_PROCESSORS = tuple(
    getattr(diffusers_processors, name)
    for name in (
        "AttnProcessor",
        "AttnProcessor2_0",
        "FusedAttnProcessor2_0",
        "SlicedAttnProcessor",
        "XFormersAttnProcessor",
        "AttnProcessorNPU",
        "XLAFlashAttnProcessor2_0",
    )
    if hasattr(diffusers_processors, name)
)

CROSS_ATTENTION_SUFFIX = ".attn2"


_COMPILED_PREFIX = "_orig_mod."  # torch.compile wraps the model; names inside carry this prefix


def cross_attention_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The UNet's cross-attention modules (diffusers names them ``...attn2``), by module name
    (as in the uncompiled model, so that block prefixes match a ``torch.compile``-d UNet too)."""
    return {
        name[len(_COMPILED_PREFIX) :] if name.startswith(_COMPILED_PREFIX) else name: module
        for name, module in unet.named_modules()
        if name.endswith(CROSS_ATTENTION_SUFFIX) and isinstance(module, diffusers_processors.Attention)
    }


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def select_attenuated_layers(layer_names, blocks) -> tuple[str, ...]:
    """The ``attn2`` layer names under any of ``blocks``; every prefix must match at least one.

    A prefix that matches nothing is almost always a typo or a UNet with a different layout, and
    silently attenuating fewer layers than asked would change the method without a trace.
    """
    names = list(layer_names)
    for prefix in blocks:
        if not any(_under(name, prefix) for name in names):
            tops = sorted({name.split(".attentions.")[0] for name in names})
            raise ValueError(
                f"GuardConfig.blocks entry {prefix!r} matches no cross-attention (attn2) module of this UNet;"
                f" blocks with cross-attention: {tops}"
            )
    return tuple(name for name in names if any(_under(name, prefix) for prefix in blocks))


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _token_tensor(name: str, value: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() != 2:
        raise TypeError(
            f"{name} must be None or a float tensor of shape (UNet batch, num_tokens), got {_describe(value)}"
        )
    return value


class AttenuationSession:
    """What the installed processors share: the row layout, the spike rule's settings, statistics.

    ``spike_rows`` is a bool tensor over the UNet batch (True = run the spike rule on that row).
    Spike statistics accumulate on the device, per attenuated layer, as int32 counts of shape
    (batch, num_tokens): for each row and token, how many (call, head) pairs flagged it. Reading
    them is the caller's single host transfer, after the loop.
    """

    def __init__(
        self,
        config: GuardConfig,
        spike_rows: Optional[torch.Tensor],
        layer_names: tuple[str, ...],
        attenuated_layers: tuple[str, ...],
        collect_stats: bool,
        backend: str,
    ) -> None:
        self.config = config
        self.layer_names = layer_names
        self.attenuated_layers = attenuated_layers
        self.collect_stats = collect_stats
        self.backend = backend
        self.heads: dict[str, int] = {}
        self._counts: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {name: 0 for name in attenuated_layers}
        self._spike_rows: Optional[torch.Tensor] = None
        self.spike_rows = spike_rows
        self._token_scale: Optional[torch.Tensor] = None
        self._token_bias: Optional[torch.Tensor] = None

    @property
    def spike_rows(self) -> Optional[torch.Tensor]:
        return self._spike_rows

    @spike_rows.setter
    def spike_rows(self, rows: Optional[torch.Tensor]) -> None:
        """Change the row layout (e.g. between sampler phases); statistics are kept."""
        if rows is not None and (not isinstance(rows, torch.Tensor) or rows.dtype != torch.bool or rows.dim() != 1):
            raise TypeError(f"spike_rows must be None or a 1-D bool tensor over the UNet batch, got {_describe(rows)}")
        self._spike_rows = rows

    @property
    def token_scale(self) -> Optional[torch.Tensor]:
        """None or (batch, num_tokens) float: per-row logit factors applied in EVERY attn2 layer."""
        return self._token_scale

    @token_scale.setter
    def token_scale(self, value: Optional[torch.Tensor]) -> None:
        self._token_scale = _token_tensor("token_scale", value)

    @property
    def token_bias(self) -> Optional[torch.Tensor]:
        """None or (batch, num_tokens) float: per-row logit offsets (-inf masks) in EVERY attn2 layer."""
        return self._token_bias

    @token_bias.setter
    def token_bias(self, value: Optional[torch.Tensor]) -> None:
        self._token_bias = _token_tensor("token_bias", value)

    @property
    def calls(self) -> dict[str, int]:
        """Per attenuated layer: how many UNet calls ran the spike rule there."""
        return dict(self._calls)

    def spike_counts(self) -> dict[str, torch.Tensor]:
        """Per attenuated layer that has run: (batch, num_tokens) int32 device tensor of flag counts."""
        return dict(self._counts)

    def reset_statistics(self) -> None:
        self._counts.clear()
        self._calls = {name: 0 for name in self.attenuated_layers}

    def _record(self, layer: str, spikes: torch.Tensor) -> None:
        per_token = spikes.sum(dim=1, dtype=torch.int32)  # (B, Nk): summed over heads
        counts = self._counts.get(layer)
        if counts is None:
            self._counts[layer] = per_token
        elif counts.shape != per_token.shape:
            raise ValueError(
                f"layer {layer} saw a batch of shape {tuple(per_token.shape)} after {tuple(counts.shape)};"
                " call reset_statistics() before changing the UNet batch size"
            )
        else:
            counts.add_(per_token)
        self._calls[layer] += 1


class GuardCrossAttnProcessor:
    """Cross-attention through ``guard_kernels.cross_attention``, spike rule on the session's rows.

    Handles what ``AttnProcessor2_0`` handles for Stable Diffusion: 3-D and 4-D hidden states,
    ``spatial_norm``, ``group_norm``, ``norm_cross``, ``norm_q``/``norm_k``, an encoder attention
    mask (an additive or boolean per-token mask, passed as the kernel's ``token_bias``),
    ``residual_connection`` and ``rescale_output_factor``. Called as self-attention (no encoder
    states) it defers to the processor it replaced.
    """

    def __init__(self, name: str, attenuate: bool, session: AttenuationSession, original) -> None:
        self.name = name
        self.attenuate = attenuate
        self.session = session
        self.original = original

    def _defers_to_original(self, hidden_states: torch.Tensor) -> bool:
        """Plain attention that would take the PyTorch path anyway: the replaced processor (SDPA)
        computes the same thing faster on the CPU."""
        session = self.session
        plain = (not self.attenuate or session.spike_rows is None) and session.token_scale is None
        plain = plain and session.token_bias is None
        torch_path = session.backend == "torch" or (session.backend == "auto" and not hidden_states.is_cuda)
        return plain and torch_path

    def _mask_bias(self, attn, attention_mask, batch: int, num_keys: int) -> Optional[torch.Tensor]:
        if attention_mask is None:
            return None
        mask = attn.prepare_attention_mask(attention_mask, num_keys, batch)
        mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
        if mask.shape[2] != 1:
            raise ValueError(
                f"{self.name}: GUARD's cross-attention supports per-token encoder masks of shape (B, 1, Nk), got a"
                f" per-query mask of shape {tuple(attention_mask.shape)}"
            )
        mask = mask[:, :, 0, :]
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
        return mask.float()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or self._defers_to_original(hidden_states):
            if temb is not None:
                kwargs["temb"] = temb
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        num_keys = encoder_hidden_states.shape[1]
        token_bias = self._mask_bias(attn, attention_mask, batch, num_keys)

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        heads = attn.heads
        head_dim = key.shape[-1] // heads
        query = query.view(batch, -1, heads, head_dim)
        key = key.view(batch, -1, heads, head_dim)
        value = value.view(batch, -1, heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        session = self.session
        spike_rows = session.spike_rows if self.attenuate else None
        for label, rows in (("spike_rows", spike_rows), ("token_scale", session.token_scale),
                            ("token_bias", session.token_bias)):  # fmt: skip
            if rows is not None and rows.shape[0] != batch:
                raise ValueError(
                    f"{self.name}: {label} covers {rows.shape[0]} rows but the UNet batch has {batch};"
                    f" {label} must cover every row of the UNet batch"
                )
        if session.token_bias is not None:
            extra = session.token_bias.float()
            token_bias = extra if token_bias is None else token_bias + extra.unsqueeze(1)
        config = session.config
        want_stats = spike_rows is not None and session.collect_stats
        result = cross_attention(
            query,
            key,
            value,
            scale=attn.scale,
            spike_rows=spike_rows,
            spike_threshold=config.spike_threshold,
            spike_scale=config.spike_scale,
            token_scale=session.token_scale,
            token_bias=token_bias,
            return_stats=want_stats,
            backend=session.backend,
        )
        if want_stats:
            hidden_states, stats = result
            session._record(self.name, stats.spikes)
        else:
            hidden_states = result
        session.heads[self.name] = heads

        hidden_states = hidden_states.reshape(batch, -1, heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def attenuate_cross_attention(
    unet: torch.nn.Module,
    spike_rows: Optional[torch.Tensor],
    config: GuardConfig,
    *,
    collect_stats: bool = True,
    backend: str = "auto",
    token_scale: Optional[torch.Tensor] = None,
    token_bias: Optional[torch.Tensor] = None,
) -> Iterator[AttenuationSession]:
    """Install GUARD's cross-attention on every ``attn2`` layer of ``unet`` for a ``with`` block.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (or any model whose cross-attention modules are
            diffusers ``Attention`` layers named ``...attn2``).
        spike_rows: bool tensor over the UNet batch: rows that get the spike rule (GUARD's
            positive rows), or None for plain fused attention everywhere (then no layer is
            attenuated and ``config.blocks`` is not checked). Changeable later via
            ``session.spike_rows`` within the layers chosen here.
        config: supplies ``blocks``, ``spike_threshold`` and ``spike_scale``.
        collect_stats: accumulate per-token spike counts on the device.
        backend: the kernel backend ("auto", "triton", "torch").
        token_scale, token_bias: optional (UNet batch, num_tokens) float tensors that modulate the
            logits in every ``attn2`` layer (``l * token_scale + token_bias``; -inf masks a token),
            e.g. for Ren et al.'s mitigation. Changeable later on the session.

    Yields the :class:`AttenuationSession`; the original processors are restored on exit, also on
    an exception.
    """
    if not isinstance(config, GuardConfig):
        raise TypeError(f"config must be a GuardConfig, got {type(config).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    layers = cross_attention_layers(unet)
    if not layers:
        raise ValueError(f"{type(unet).__name__} has no cross-attention (attn2) Attention modules to attenuate")
    for name, module in layers.items():
        if not isinstance(module.processor, _REPLACEABLE_PROCESSORS + (GuardCrossAttnProcessor,)):
            raise ValueError(
                f"{name} uses {type(module.processor).__name__}, which GUARD cannot replace without changing the"
                " model (it carries extra weights or inputs); supported: "
                + ", ".join(cls.__name__ for cls in _REPLACEABLE_PROCESSORS)
            )
    # Without spike rows nothing is attenuated, so config.blocks need not match this UNet (e.g. Ren et
    # al.'s token modulation, which acts on every layer).
    attenuated = select_attenuated_layers(layers, config.blocks) if spike_rows is not None else ()
    session = AttenuationSession(config, spike_rows, tuple(layers), attenuated, collect_stats, backend)
    session.token_scale = token_scale
    session.token_bias = token_bias
    originals = {name: module.processor for name, module in layers.items()}
    try:
        for name, module in layers.items():
            module.set_processor(GuardCrossAttnProcessor(name, name in attenuated, session, originals[name]))
        yield session
    finally:
        for name, module in layers.items():
            module.set_processor(originals[name])
