"""The upcast reference of :func:`guard_kernels.cross_attention` and the error budget its kernels meet.

Modelled on FlagAttention's ``testing`` references and its accuracy rule: a low-precision kernel
is judged against a materialising reference computed in float64, and its error must stay within
twice the error of plain PyTorch computing the same thing in the inputs' own dtype (plus a small
absolute floor). The factor is relative to what the dtype allows, so one rule serves fp32, fp16
and bf16. The kernel tests and the benchmarks (``bench/``) all use this one reference.

The reference follows the paper's spike rule (GUARD, arXiv 2603.00133, and its released code):
peaks of the raw logit over all queries, z-scores over tokens 1..Nk-1 with the unbiased standard
deviation + 1e-6, strict ``z > threshold``, BOS never a spike, nothing flagged with fewer than
two non-BOS tokens. It runs on whatever device its inputs are on.
"""

import math
from typing import NamedTuple, Optional

import torch

from .stats import SPIKE_STD_EPS

#: Kernel error may be this many times the error of PyTorch at the inputs' dtype.
ERROR_FACTOR = 2.0
#: Absolute slack on top, so that an exact yardstick (error 0) does not demand bit equality.
ERROR_FLOOR = 1e-5


class Reference(NamedTuple):
    """What :func:`reference_attention` computes, all in its compute dtype.

    out: (B, Nq, H, D). max_logit, mass, spikes (bool), z: (B, H, Nk); ``z`` is the spike rule's
    z-score of every token on every row (spike rows or not), NaN for BOS and when fewer than two
    non-BOS tokens leave the standard deviation undefined.
    """

    out: torch.Tensor
    max_logit: torch.Tensor
    mass: torch.Tensor
    spikes: torch.Tensor
    z: torch.Tensor


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Optional[float] = None,
    spike_rows: Optional[torch.Tensor] = None,
    spike_threshold: float = 0.1,
    spike_scale: float = 0.3,
    token_scale: Optional[torch.Tensor] = None,
    token_bias: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float64,
    spikes: Optional[torch.Tensor] = None,
) -> Reference:
    """GUARD cross-attention with the (Nq x Nk) logits materialised, every step in ``dtype``.

    Arguments mean what they mean for :func:`guard_kernels.cross_attention`, including its
    non-finite rules (a NaN or +inf final logit makes its query NaN, a query with every key at
    -inf outputs zeros). ``dtype=torch.float64`` is the upcast reference; ``dtype=q.dtype`` is
    the low-precision yardstick of :func:`error_budget`, which should take the float64
    reference's decisions through ``spikes`` (bool (B, H, Nk)) so that a z-score that rounds to
    the other side of the threshold does not change which logits are attenuated.
    """
    batch, _, heads, head_dim = q.shape
    num_keys = k.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    q, k, v = (t.to(dtype) for t in (q, k, v))
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    peaks = logits.amax(dim=2)  # NaN-propagating, as the statistics are defined

    z = torch.full_like(peaks, math.nan)
    if num_keys >= 3:
        body = peaks[..., 1:]
        std = body.std(dim=-1, correction=1, keepdim=True)
        z[..., 1:] = (body - body.mean(dim=-1, keepdim=True)) / (std + SPIKE_STD_EPS)
    if spikes is None:
        rows = torch.zeros(batch, dtype=torch.bool) if spike_rows is None else spike_rows
        spikes = (z > spike_threshold) & rows.to(peaks.device).view(batch, 1, 1)
    spikes = spikes.to(peaks.device)

    # masked_fill writes the Python float straight into `dtype` (torch.where(spikes, 0.3, 1.0)
    # would round 0.3 through float32 first).
    factor = torch.ones_like(peaks).masked_fill_(spikes, spike_scale)
    if token_scale is not None:
        factor = factor * _per_head(token_scale, heads, peaks)
    modulated = logits * factor[:, :, None, :]
    if token_bias is not None:
        modulated = modulated + _per_head(token_bias, heads, peaks)[:, :, None, :]

    row_max = modulated.amax(dim=-1, keepdim=True)
    weights = torch.exp(modulated - row_max.masked_fill(row_max == -math.inf, 0.0))
    total = weights.sum(dim=-1, keepdim=True)
    probs = weights / total.masked_fill(total == 0, 1.0)  # total is 0 only when every key is masked
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return Reference(out=out, max_logit=peaks, mass=probs.sum(dim=2), spikes=spikes, z=z)


def _per_head(token: torch.Tensor, heads: int, like: torch.Tensor) -> torch.Tensor:
    """(B, Nk) or (B, H, Nk) -> (B, H, Nk) in ``like``'s dtype and device."""
    token = token.to(device=like.device, dtype=like.dtype)
    return token[:, None, :].expand(-1, heads, -1) if token.dim() == 2 else token


def abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected|, compared in float64; inf if ``actual`` holds NaN or inf.

    A non-finite value in a kernel output is never a small error: it is an element the kernel
    failed to write (the tests poison every buffer with NaN) or an overflow.
    """
    actual = actual.double()
    if not torch.isfinite(actual).all():
        return math.inf
    return (actual - expected.double()).abs().max().item()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: the per-tensor relative error (inf as in abs_err)."""
    scale = expected.double().abs().max().clamp_min(1e-30).item()
    return abs_err(actual, expected) / scale


class ErrorBudget(NamedTuple):
    """One application of the rule: ``error <= ERROR_FACTOR * yardstick_error + ERROR_FLOOR``."""

    error: float
    yardstick_error: float
    limit: float

    @property
    def ok(self) -> bool:
        return self.error <= self.limit

    def __str__(self) -> str:
        verdict = "within" if self.ok else "OVER"
        return (
            f"error {self.error:.3g} {verdict} budget {self.limit:.3g}"
            f" (torch at the inputs' dtype: {self.yardstick_error:.3g})"
        )


def error_budget(
    actual: torch.Tensor,
    reference: torch.Tensor,
    yardstick: torch.Tensor,
    *,
    factor: float = ERROR_FACTOR,
    floor: float = ERROR_FLOOR,
) -> ErrorBudget:
    """Judge ``actual`` (a kernel's output) against the float64 ``reference``.

    ``yardstick`` is the same quantity computed by PyTorch in the inputs' dtype
    (``reference_attention(..., dtype=q.dtype, spikes=ref.spikes).out``): what that dtype
    costs anyway. Errors are max absolute differences (:func:`abs_err`).
    """
    yardstick_error = abs_err(yardstick, reference)
    if not math.isfinite(yardstick_error):  # an overflowing yardstick would excuse any error
        raise ValueError("the yardstick holds NaN or inf: the error budget is undefined for these inputs")
    return ErrorBudget(abs_err(actual, reference), yardstick_error, factor * yardstick_error + floor)
