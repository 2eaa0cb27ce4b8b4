"""GUARD's cross-attention on a diffusers UNet, for the duration of a block, safe to share.

Every ``attn2`` (cross-attention) layer gets a :class:`GuardCrossAttnProcessor` that runs the fused
kernel ``guard_kernels.cross_attention``; in the layers under ``config.blocks`` the spike rule runs
on the session's spike rows (GUARD's attenuated rows), elsewhere the kernel is plain attention.
Optional per-row token factors and offsets (the kernel's ``token_scale`` / ``token_bias``) apply
in every ``attn2`` layer, which is how Ren et al.'s mitigation runs. Self-attention layers are
left alone.

Servers share one UNet between concurrent requests, so nothing of a call lives on the UNet: the
processors are stateless, and each call's :class:`AttenuationSession` (its rows, thresholds and
statistics) is found through a context variable, which every thread (and asyncio task) sees on
its own. A UNet call outside any session, a stock pipeline's in another thread say, runs the
processors the layers had before. The processors are installed when the first session on a UNet
opens and the layers' own come back when the last one closes. Reading a context variable and
the session's attributes is traceable by ``torch.compile`` (no graph break).
"""

from __future__ import annotations

import contextvars
import threading
import weakref
from contextlib import contextmanager
from typing import Iterator, Optional, Union

import torch
import torch.nn.functional as F
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

#: IP-Adapter processors: the text attention is exactly the replaceable kind, and the image tokens'
#: attention (with the processor's own weights) is added to it; GUARD keeps that part as it is.
_IP_ADAPTER_PROCESSORS = tuple(
    getattr(diffusers_processors, name)
    for name in ("IPAdapterAttnProcessor", "IPAdapterAttnProcessor2_0")
    if hasattr(diffusers_processors, name)
)

CROSS_ATTENTION_SUFFIX = ".attn2"
_COMPILED_PREFIX = "_orig_mod."  # torch.compile wraps the model; names inside carry this prefix

#: The session of the sampling call running in this thread / task (None outside any).
_CURRENT_SESSION: contextvars.ContextVar[Optional["AttenuationSession"]] = contextvars.ContextVar(
    "guard_attention_session", default=None
)

SpikeRows = Union[torch.Tensor, slice, None]


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


def default_blocks(layer_names) -> tuple[str, ...]:
    """The paper's attenuated blocks on a given UNet: every down block with cross-attention, and
    the mid block (where the image's layout, and with it a memorized image, is decided).

    On SD 1.x / 2.x this is ``down_blocks.0-2`` and ``mid_block`` (down_blocks.3 has no
    cross-attention). On SDXL it is ``down_blocks.1``, ``down_blocks.2`` and ``mid_block`` with all
    of their transformer layers (2 and 10 per attention block): the paper chooses blocks, and the
    released code's "first transformer layer of each attention block" is the same set on SD 1.x /
    2.x, where every attention block holds one layer; on SDXL it would leave 9 of 10 layers of the
    deepest blocks plain. Prefixes such as ``down_blocks.2.attentions.0.transformer_blocks.0``
    select single layers.
    """
    tops = dict.fromkeys(name.split(".attentions.")[0] for name in layer_names)
    chosen = tuple(top for top in tops if top.startswith("down_blocks.") or top == "mid_block")
    if not chosen:
        raise ValueError(f"this UNet has no cross-attention in its down or mid blocks (blocks: {list(tops)})")
    return chosen


def select_attenuated_layers(layer_names, blocks) -> tuple[str, ...]:
    """The ``attn2`` layer names under any of ``blocks`` (None: :func:`default_blocks`); every
    prefix must match at least one.

    A prefix that matches nothing is almost always a typo or a UNet with a different layout, and
    silently attenuating fewer layers than asked would change the method without a trace.
    """
    names = list(layer_names)
    if blocks is None:
        blocks = default_blocks(names)
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
    """One sampling call's cross-attention: the row layout, the spike rule's settings, statistics.

    ``spike_rows`` marks the UNet rows that get the spike rule: a 1-D bool tensor over the UNet
    batch, or a ``slice`` of it (the attenuated branch of GUARD's layout), which lets the PyTorch
    path run the other rows through the layer's own attention (SDPA) and only the spike rows
    through the materialising kernel path. Spike statistics accumulate on the device, per
    attenuated layer, as int32 counts of shape (count rows, num_tokens): for each counted row and
    token, how many (call, head) pairs flagged it. ``count_index`` maps each UNet row to its count
    row (default: the row itself), so that a sampler can change the batch's layout between calls
    and keep counting per image. Reading them is the caller's single host transfer, after the loop.

    ``mass_rows`` (a slice, usually None) asks for the per-token attention mass of those rows
    in the attenuated layers: per layer, (rows, num_tokens) float32, the head- and query-averaged
    attention each token received, accumulated over calls (the input of Ren et al.'s entropy).
    """

    def __init__(
        self,
        config: GuardConfig,
        spike_rows: SpikeRows,
        layer_heads: dict[str, int],
        attenuated_layers: tuple[str, ...],
        collect_stats: bool,
        backend: str,
        installation: Optional["_Installation"] = None,
    ) -> None:
        self.config = config
        self.layer_names = tuple(layer_heads)
        self.heads = dict(layer_heads)
        self.attenuated_layers = attenuated_layers
        self._attenuated = frozenset(attenuated_layers)
        self.collect_stats = collect_stats
        self.backend = backend
        self.installation = installation
        self._counts: dict[str, torch.Tensor] = {}
        self._mass: dict[str, torch.Tensor] = {}
        self._spike_rows: SpikeRows = None
        self.spike_rows = spike_rows
        self.count_index: Optional[torch.Tensor] = None
        self.mass_rows: Optional[slice] = None
        self._token_scale: Optional[torch.Tensor] = None
        self._token_bias: Optional[torch.Tensor] = None
        self._fixed_spikes: Optional[torch.Tensor] = None
        self.fixed_factor: Optional[torch.Tensor] = None  # (spike rows, num_tokens) float32, from fixed_spikes

    @property
    def spike_rows(self) -> SpikeRows:
        return self._spike_rows

    @spike_rows.setter
    def spike_rows(self, rows: SpikeRows) -> None:
        """Change the row layout (e.g. between sampler phases); statistics are kept."""
        is_mask = isinstance(rows, torch.Tensor) and rows.dtype == torch.bool and rows.dim() == 1
        is_slice = isinstance(rows, slice) and rows.step in (None, 1)
        if rows is not None and not (is_mask or is_slice):
            raise TypeError(
                "spike_rows must be None, a 1-D bool tensor over the UNet batch or a slice of it, "
                f"got {_describe(rows)}"
            )
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
    def fixed_spikes(self) -> Optional[torch.Tensor]:
        """None, or (spike rows, num_tokens) bool: each spike row's tokens fixed for the rest of the run.
        In the attenuated layers they get the logit factor ``spike_scale`` in every head and the spike
        rule no longer runs (``GuardConfig.spike_tokens="first-step"``); ``spike_rows`` must be a slice.
        They count as flagged in every head, so the statistics say what acted."""
        return self._fixed_spikes

    @fixed_spikes.setter
    def fixed_spikes(self, value: Optional[torch.Tensor]) -> None:
        if value is not None and (not isinstance(value, torch.Tensor) or value.dtype != torch.bool or value.dim() != 2):
            raise TypeError(
                f"fixed_spikes must be None or a 2-D bool tensor (spike rows, num_tokens), got {_describe(value)}"
            )
        self._fixed_spikes = value
        # Their logit factors, built once here rather than in every layer of every call.
        self.fixed_factor = None
        if value is not None:
            self.fixed_factor = torch.ones(value.shape, dtype=torch.float32, device=value.device)
            self.fixed_factor.masked_fill_(value, self.config.spike_scale)

    @property
    def unet_kwargs(self) -> dict:
        """``cross_attention_kwargs`` that hand this session to the processors of a UNet call."""
        return {"guard_session": self}

    def attenuates(self, layer: str) -> bool:
        return self._spike_rows is not None and layer in self._attenuated

    def spike_counts(self) -> dict[str, torch.Tensor]:
        """Per attenuated layer that has run: (count rows, num_tokens) int32 device tensor of flag counts."""
        return dict(self._counts)

    def image_flags(self, rows: int) -> tuple[Optional[torch.Tensor], int]:
        """(rows, num_tokens) int32: the first ``rows`` count rows (one per image) summed over the
        attenuated layers that have counts, and the number of (layer, head) checks per call they sum;
        (None, 0) before any."""
        layers = [name for name in self.attenuated_layers if name in self._counts]
        if not layers:
            return None, 0
        total = torch.stack([self._counts[name][:rows] for name in layers]).sum(dim=0)
        return total, sum(self.heads[name] for name in layers)

    def attention_mass(self) -> dict[str, torch.Tensor]:
        """Per attenuated layer that ran with ``mass_rows`` set: (rows, num_tokens) float32 device tensor."""
        return dict(self._mass)

    def prepare_counts(self, count_rows: int, num_tokens: int, device) -> None:
        """Allocate the count buffers before the first call (a compiled UNet then traces one graph)."""
        for layer in self.attenuated_layers:
            self._counts[layer] = torch.zeros(count_rows, num_tokens, dtype=torch.int32, device=device)

    def reset_statistics(self) -> None:
        self._counts.clear()
        self._mass.clear()

    def reset_mass(self) -> None:
        self._mass.clear()

    def _record(self, layer: str, spikes: torch.Tensor, batch: int, rows: Optional[slice] = None) -> None:
        """Add one call's spike flags, (B', H, Nk) for the UNet rows ``rows`` of a batch of ``batch``
        rows (all of them for None)."""
        per_token = spikes.sum(dim=1, dtype=torch.int32)  # (B', Nk): summed over heads
        index = self.count_index
        if index is not None and rows is not None:
            index = index[rows]
        counts = self._counts.get(layer)
        if counts is None:
            if index is not None:
                raise ValueError("count_index is set: call prepare_counts() before the first UNet call")
            counts = self._counts[layer] = per_token.new_zeros(batch, per_token.shape[1])
        if index is not None:
            counts.index_add_(0, index, per_token)
            return
        if counts.shape[0] != batch:
            raise ValueError(
                f"layer {layer} saw a batch of {batch} rows after {counts.shape[0]}; set count_index or call"
                " reset_statistics() before changing the UNet batch size"
            )
        (counts if rows is None else counts[rows]).add_(per_token)

    def _record_mass(self, layer: str, mass: torch.Tensor, num_queries: int) -> None:
        per_token = mass.float().mean(dim=1) / num_queries  # (rows, Nk): head- and query-averaged attention
        previous = self._mass.get(layer)
        self._mass[layer] = per_token if previous is None else previous + per_token


class GuardCrossAttnProcessor:
    """Cross-attention through ``guard_kernels.cross_attention``, as the current session asks.

    Handles what ``AttnProcessor2_0`` handles for Stable Diffusion: 3-D and 4-D hidden states,
    ``spatial_norm``, ``group_norm``, ``norm_cross``, ``norm_q``/``norm_k``, an encoder attention
    mask (an additive or boolean per-token mask, passed as the kernel's ``token_bias``),
    ``residual_connection`` and ``rescale_output_factor``. Outside a session of its own UNet, or
    called as self-attention (no encoder states), it defers to the processor it replaced.
    """

    def __init__(self, name: str, original, installation: "_Installation") -> None:
        self.name = name
        self.original = original
        self.installation = installation

    def _defer(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, args, kwargs):
        if temb is not None:
            kwargs["temb"] = temb
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)

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
        guard_session: Optional[AttenuationSession] = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        session = guard_session if guard_session is not None else _CURRENT_SESSION.get()
        if encoder_hidden_states is None or session is None or session.installation is not self.installation:
            return self._defer(attn, hidden_states, encoder_hidden_states, attention_mask, temb, args, kwargs)
        ip_states = None
        if isinstance(self.original, _IP_ADAPTER_PROCESSORS):
            if kwargs.get("ip_adapter_masks") is not None:
                raise ValueError(f"{self.name}: GUARD's cross-attention does not support ip_adapter_masks")
            if not isinstance(encoder_hidden_states, tuple):
                raise ValueError(f"{self.name}: an IP-Adapter layer needs (text states, image states) as its input")
            encoder_hidden_states, ip_states = encoder_hidden_states
        attenuate = session.attenuates(self.name)
        modulated = session.token_scale is not None or session.token_bias is not None
        torch_path = session.backend == "torch" or (session.backend == "auto" and not hidden_states.is_cuda)
        if not attenuate and not modulated and torch_path:
            # Plain attention on the PyTorch path: the replaced processor (SDPA) is the same maths, faster.
            text = encoder_hidden_states if ip_states is None else (encoder_hidden_states, ip_states)
            return self._defer(attn, hidden_states, text, attention_mask, temb, args, kwargs)

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

        spike_rows = session.spike_rows if attenuate else None
        self._check_rows(session, spike_rows, batch)
        if session.token_bias is not None:
            extra = session.token_bias.float()
            token_bias = extra if token_bias is None else token_bias + extra.unsqueeze(1)
        if spike_rows is not None and session.fixed_spikes is not None:
            hidden_states = self._fixed(session, attn, query, key, value, spike_rows, token_bias, torch_path)
        elif isinstance(spike_rows, slice) and torch_path and not modulated and token_bias is None:
            hidden_states = self._split_rows(session, attn, query, key, value, spike_rows)
        else:
            hidden_states = self._fused(session, attn, query, key, value, spike_rows, token_bias)

        hidden_states = hidden_states.reshape(batch, -1, heads * head_dim).to(query.dtype)
        if ip_states is not None:
            hidden_states = hidden_states + self._image_attention(attn, query, ip_states, batch, heads, head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _image_attention(self, attn, query, ip_states, batch: int, heads: int, head_dim: int) -> torch.Tensor:
        """The IP-Adapter's part: attention of the same queries over each adapter's image tokens,
        with the adapter's own key/value weights and scale, as ``IPAdapterAttnProcessor2_0`` adds it."""
        adapter = self.original
        q = query.transpose(1, 2)  # (B, H, Nq, D)
        total = torch.zeros(batch, q.shape[2], heads * head_dim, dtype=query.dtype, device=query.device)
        for states, scale, to_k, to_v in zip(ip_states, adapter.scale, adapter.to_k_ip, adapter.to_v_ip):
            if all(s == 0 for s in scale) if isinstance(scale, list) else scale == 0:
                continue
            if isinstance(scale, list):
                raise ValueError(f"{self.name}: GUARD supports one IP-Adapter scale per adapter, got a list {scale}")
            k = to_k(states).view(batch, -1, heads, head_dim).transpose(1, 2)
            v = to_v(states).view(batch, -1, heads, head_dim).transpose(1, 2)
            image = F.scaled_dot_product_attention(q, k, v)
            total = total + scale * image.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        return total

    def _check_rows(self, session: AttenuationSession, spike_rows: SpikeRows, batch: int) -> None:
        if isinstance(spike_rows, slice):
            if spike_rows.stop is not None and spike_rows.stop > batch:
                raise ValueError(f"{self.name}: spike_rows {spike_rows} reaches beyond the UNet batch of {batch} rows")
            return
        for label, rows in (
            ("spike_rows", spike_rows),
            ("token_scale", session.token_scale),
            ("token_bias", session.token_bias),
        ):
            if rows is not None and rows.shape[0] != batch:
                raise ValueError(
                    f"{self.name}: {label} covers {rows.shape[0]} rows but the UNet batch has {batch};"
                    f" {label} must cover every row of the UNet batch"
                )

    def _kernel(self, session, attn, query, key, value, spike_rows, token_bias, *, stats: bool):
        config = session.config
        return cross_attention(
            query,
            key,
            value,
            scale=attn.scale,
            spike_rows=spike_rows,
            spike_threshold=config.spike_threshold,
            spike_scale=config.spike_scale,
            token_scale=session.token_scale,
            token_bias=token_bias,
            return_stats=stats,
            backend=session.backend,
        )

    def _fused(self, session, attn, query, key, value, spike_rows, token_bias) -> torch.Tensor:
        """Every row in one kernel call (the Triton kernel on a GPU; masks, token modulation)."""
        if isinstance(spike_rows, slice):
            mask = torch.zeros(query.shape[0], dtype=torch.bool, device=query.device)
            mask[spike_rows] = True
            spike_rows = mask
        counting = spike_rows is not None and session.collect_stats
        mass_rows = session.mass_rows if spike_rows is not None else None
        if not (counting or mass_rows is not None):
            return self._kernel(session, attn, query, key, value, spike_rows, token_bias, stats=False)
        out, stats = self._kernel(session, attn, query, key, value, spike_rows, token_bias, stats=True)
        if counting:
            session._record(self.name, stats.spikes, query.shape[0])
        if mass_rows is not None:
            session._record_mass(self.name, stats.mass[mass_rows], query.shape[1])
        return out

    def _fixed(self, session, attn, query, key, value, spike_rows, token_bias, torch_path: bool) -> torch.Tensor:
        """The spike rows with their fixed tokens (``session.fixed_spikes``) scaled by ``spike_scale``
        in every head, no spike rule; on the PyTorch path the other rows through SDPA."""
        if not isinstance(spike_rows, slice):
            raise ValueError(f"{self.name}: fixed spike tokens need spike_rows as a slice of the UNet batch")
        batch, num_keys, heads = query.shape[0], key.shape[1], query.shape[2]
        start, stop, _ = spike_rows.indices(batch)
        fixed = session.fixed_spikes
        if tuple(fixed.shape) != (stop - start, num_keys):
            raise ValueError(
                f"{self.name}: fixed_spikes has shape {tuple(fixed.shape)}, expected (spike rows, num_tokens)="
                f"({stop - start}, {num_keys})"
            )
        if session.collect_stats:  # what acted: the fixed tokens, in every head
            session._record(self.name, fixed.unsqueeze(1).expand(-1, heads, -1), batch, slice(start, stop))
        if torch_path and session.token_scale is None and token_bias is None:
            return self._split_rows(session, attn, query, key, value, spike_rows)
        ones = session.fixed_factor.new_ones
        scale = torch.cat([ones(start, num_keys), session.fixed_factor, ones(batch - stop, num_keys)])
        if session.token_scale is not None:
            scale = scale * session.token_scale.float()
        result = cross_attention(
            query, key, value, scale=attn.scale, token_scale=scale, token_bias=token_bias,
            return_stats=session.mass_rows is not None, backend=session.backend,
        )  # fmt: skip
        if session.mass_rows is None:
            return result
        out, stats = result
        session._record_mass(self.name, stats.mass[session.mass_rows], query.shape[1])
        return out

    def _split_rows(self, session, attn, query, key, value, spike_rows: slice) -> torch.Tensor:
        """The PyTorch path with the spike rows a contiguous slice: those rows through the kernel's
        materialising path, every other row through SDPA (the cost of plain attention), and
        statistics only where they are used. With fixed spike tokens the spike rows take their factors
        instead of the rule (``_fixed`` has recorded them)."""
        batch = query.shape[0]
        start, stop, _ = spike_rows.indices(batch)
        out = torch.empty_like(query)
        rows = slice(start, stop)
        if stop > start and session.fixed_factor is not None:
            out[rows] = cross_attention(
                query[rows], key[rows], value[rows], scale=attn.scale, token_scale=session.fixed_factor,
                backend=session.backend,
            )  # fmt: skip
        elif stop > start:
            every = torch.ones(stop - start, dtype=torch.bool, device=query.device)
            result = self._kernel(
                session, attn, query[rows], key[rows], value[rows], every, None, stats=session.collect_stats
            )
            if session.collect_stats:
                result, stats = result
                session._record(self.name, stats.spikes, batch, rows)
            out[rows] = result
        mass = None if session.mass_rows is None else range(*session.mass_rows.indices(batch))
        for first, last in ((0, start), (stop, batch)):
            if last <= first:
                continue
            plain = slice(first, last)
            if mass is not None and first <= mass.start and mass.stop <= last:  # the rows the detector reads
                out[plain], stats = self._kernel(
                    session, attn, query[plain], key[plain], value[plain], None, None, stats=True
                )
                session._record_mass(self.name, stats.mass[mass.start - first : mass.stop - first], query.shape[1])
            else:
                q, k, v = (t[plain].transpose(1, 2) for t in (query, key, value))
                out[plain] = F.scaled_dot_product_attention(q, k, v, scale=attn.scale).transpose(1, 2)
        return out


class _SessionBlind:
    """A self-attention processor that takes ``guard_session`` and ignores it.

    diffusers passes a UNet call's ``cross_attention_kwargs`` to self- and cross-attention alike
    and warns, on every call, about keys a processor does not name; the session a GUARD call
    passes is for the cross-attention layers only.
    """

    def __init__(self, original) -> None:
        self.original = original

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        guard_session: Optional[AttenuationSession] = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if temb is not None:
            kwargs["temb"] = temb
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


class _Installation:
    """GUARD's processors on one UNet while any session on it is open (reference-counted)."""

    def __init__(self) -> None:
        self.sessions = 0
        self.originals: dict[str, object] = {}
        self.self_attention: dict[str, torch.nn.Module] = {}


_INSTALL_LOCK = threading.Lock()
_INSTALLATIONS: "weakref.WeakKeyDictionary[torch.nn.Module, _Installation]" = weakref.WeakKeyDictionary()


def _open(unet: torch.nn.Module, layers: dict[str, torch.nn.Module]) -> _Installation:
    """Install the processors if no session on this UNet is open yet; count this session in."""
    unet = getattr(unet, "_orig_mod", unet)  # a torch.compile-d UNet and the UNet it wraps are one UNet
    with _INSTALL_LOCK:
        installation = _INSTALLATIONS.get(unet)
        if installation is None:
            installation = _INSTALLATIONS[unet] = _Installation()
        if installation.sessions == 0:
            for name, module in layers.items():
                if not isinstance(module.processor, _REPLACEABLE_PROCESSORS + _IP_ADAPTER_PROCESSORS):
                    raise ValueError(
                        f"{name} uses {type(module.processor).__name__}, which GUARD cannot replace without changing"
                        " the model (it carries extra weights or inputs); supported: "
                        + ", ".join(cls.__name__ for cls in _REPLACEABLE_PROCESSORS + _IP_ADAPTER_PROCESSORS)
                    )
            installation.originals = {name: module.processor for name, module in layers.items()}
            for name, module in layers.items():
                module.set_processor(GuardCrossAttnProcessor(name, installation.originals[name], installation))
            # The other attention layers with standard processors take the session argument and ignore it.
            installation.self_attention = {
                name: module
                for name, module in unet.named_modules()
                if isinstance(module, diffusers_processors.Attention)
                and module not in layers.values()
                and isinstance(module.processor, _REPLACEABLE_PROCESSORS)
            }
            for name, module in installation.self_attention.items():
                installation.originals[name] = module.processor
                module.set_processor(_SessionBlind(module.processor))
        installation.sessions += 1
        return installation


def _close(unet: torch.nn.Module, layers: dict[str, torch.nn.Module], installation: _Installation) -> None:
    """Count this session out; the last one to leave puts the layers' own processors back."""
    with _INSTALL_LOCK:
        installation.sessions -= 1
        if installation.sessions == 0:
            for name, module in list(layers.items()) + list(installation.self_attention.items()):
                module.set_processor(installation.originals[name])
            installation.originals, installation.self_attention = {}, {}


@contextmanager
def attenuate_cross_attention(
    unet: torch.nn.Module,
    spike_rows: SpikeRows,
    config: GuardConfig,
    *,
    collect_stats: bool = True,
    backend: str = "auto",
    token_scale: Optional[torch.Tensor] = None,
    token_bias: Optional[torch.Tensor] = None,
) -> Iterator[AttenuationSession]:
    """GUARD's cross-attention on every ``attn2`` layer of ``unet`` for UNet calls inside a ``with`` block.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (or any model whose cross-attention modules are
            diffusers ``Attention`` layers named ``...attn2``).
        spike_rows: the UNet rows that get the spike rule (GUARD's attenuated rows): a bool tensor
            over the UNet batch or a slice of it; None for plain fused attention everywhere (then
            no layer is attenuated and ``config.blocks`` is not checked). Changeable later via
            ``session.spike_rows`` within the layers chosen here.
        config: supplies ``blocks``, ``spike_threshold`` and ``spike_scale``.
        collect_stats: accumulate per-token spike counts on the device.
        backend: the kernel backend ("auto", "triton", "torch").
        token_scale, token_bias: optional (UNet batch, num_tokens) float tensors that modulate the
            logits in every ``attn2`` layer (``l * token_scale + token_bias``; -inf masks a token),
            e.g. for Ren et al.'s mitigation. Changeable later on the session.

    Yields the :class:`AttenuationSession`. UNet calls in this thread (or asyncio task) see it, and
    calls given ``cross_attention_kwargs=session.unet_kwargs`` anywhere (which is also how a
    ``torch.compile``-d UNet traces it without a graph break), so several sessions may run on one
    UNet at once. The layers' own processors come back when the last open session on the UNet
    exits, also on an exception.
    """
    if not isinstance(config, GuardConfig):
        raise TypeError(f"config must be a GuardConfig, got {type(config).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    layers = cross_attention_layers(unet)
    if not layers:
        raise ValueError(f"{type(unet).__name__} has no cross-attention (attn2) Attention modules to attenuate")
    # Without spike rows nothing is attenuated, so config.blocks need not match this UNet (e.g. Ren et
    # al.'s token modulation, which acts on every layer).
    attenuated = select_attenuated_layers(layers, config.blocks) if spike_rows is not None else ()
    heads = {name: module.heads for name, module in layers.items()}
    session = AttenuationSession(config, spike_rows, heads, attenuated, collect_stats, backend)
    session.token_scale = token_scale
    session.token_bias = token_bias
    installation = _open(unet, layers)
    session.installation = installation
    token = _CURRENT_SESSION.set(session)
    try:
        yield session
    finally:
        _CURRENT_SESSION.reset(token)
        _close(unet, layers, installation)
