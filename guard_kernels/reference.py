"""PyTorch path of :func:`guard_kernels.cross_attention`: the CPU fallback, with the kernel's semantics.

It computes exactly what the fused kernel computes (non-finite inputs included), with the queries
processed in chunks so that memory stays bounded (at most ``chunk_elements`` logits alive at once)
even for SDXL-sized layers. Inputs are upcast to float32; float64 inputs stay float64 throughout.
The materialising reference both paths are tested against is :mod:`guard_kernels.testing`.
"""

from typing import Optional

import torch

from .stats import AttentionStats, spike_mask_from_peaks

#: Logits materialised at once per chunk (B*H*chunk*Nk elements): 16 Mi floats = 64 MB in fp32.
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other supported dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over keys; a row whose logits are all -inf (every key masked) gives zeros.

    A NaN or +inf logit makes its row NaN, as in torch.softmax and the kernel. Fully masked rows
    can come from a -inf token_bias or from infinite inputs, so the fix-up is unconditional.
    """
    probs = torch.softmax(logits, dim=-1)
    return probs.masked_fill_(logits.amax(dim=-1, keepdim=True) == float("-inf"), 0.0)


def torch_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    spike_rows: Optional[torch.Tensor],
    spike_threshold: float,
    spike_scale: float,
    token_scale: Optional[torch.Tensor],
    token_bias: Optional[torch.Tensor],
    return_stats: bool,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
):
    """Chunked PyTorch implementation; arguments already validated by :func:`cross_attention`.

    ``token_scale`` / ``token_bias`` are (B, H, Nk) tensors (possibly expanded views) or None.
    Returns ``(out, stats_or_None)``.
    """
    batch, num_queries, heads, head_dim = q.shape
    num_keys = k.shape[1]
    acc = compute_dtype(q.dtype)
    keys = k.permute(0, 2, 3, 1).to(acc)  # (B, H, D, Nk)
    values = v.permute(0, 2, 1, 3).to(acc)  # (B, H, Nk, D)
    queries = q.permute(0, 2, 1, 3)  # (B, H, Nq, D), a view
    chunk = max(1, min(num_queries, chunk_elements // max(1, batch * heads * num_keys)))
    bounds = [(start, min(start + chunk, num_queries)) for start in range(0, num_queries, chunk)]

    def compute_logits(start: int, stop: int) -> torch.Tensor:
        # Unscaled q.k: the scale is folded into the one multiply of each logit below (the scale is
        # positive, so it commutes with the max over queries).
        return torch.matmul(queries[:, :, start:stop].to(acc), keys)  # (B, H, n, Nk)

    # When every query fits in one chunk, both sweeps share one logits tensor.
    single = compute_logits(0, num_queries) if len(bounds) == 1 else None

    def logits(start: int, stop: int) -> torch.Tensor:
        return single if single is not None else compute_logits(start, stop)

    peaks = None
    multiplier = token_scale
    spikes = torch.zeros((batch, heads, num_keys), dtype=torch.bool, device=q.device)
    if spike_rows is not None:
        # The spike rule needs every query's logit before any probability: a first sweep.
        peaks = torch.stack([logits(a, b).amax(dim=2) for a, b in bounds]).amax(dim=0) * scale
        spikes = spike_mask_from_peaks(peaks, spike_threshold) & spike_rows.view(batch, 1, 1)
        # masked_fill writes the Python float straight into acc; torch.where(spikes, spike_scale, 1.0)
        # would build a float32 tensor first and round 0.3 on the float64 path.
        spike_factor = torch.ones(spikes.shape, dtype=acc, device=q.device).masked_fill_(spikes, spike_scale)
        multiplier = spike_factor if multiplier is None else multiplier * spike_factor
    # One multiply per logit: scale x token_scale x spike factor.
    multiplier = scale if multiplier is None else (multiplier * scale).unsqueeze(2)

    out = torch.empty((batch, num_queries, heads, head_dim), dtype=q.dtype, device=q.device)
    mass = torch.zeros((batch, heads, num_keys), dtype=acc, device=q.device) if return_stats else None
    running_max = None
    for start, stop in bounds:
        chunk_logits = logits(start, stop)
        if return_stats and peaks is None:
            block_max = chunk_logits.amax(dim=2) * scale
            running_max = block_max if running_max is None else torch.maximum(running_max, block_max)
        # In place: each chunk's logits serve nothing else once the peak sweep is done.
        chunk_logits = chunk_logits.mul_(multiplier)
        if token_bias is not None:
            chunk_logits = chunk_logits.add_(token_bias.unsqueeze(2))
        probs = _softmax(chunk_logits)
        if mass is not None:
            mass += probs.sum(dim=2)
        out[:, start:stop] = torch.matmul(probs, values).permute(0, 2, 1, 3).to(q.dtype)

    if not return_stats:
        return out, None
    max_logit = peaks if peaks is not None else running_max
    return out, AttentionStats(max_logit=max_logit, mass=mass, spikes=spikes)
