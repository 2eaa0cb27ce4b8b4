"""Fused Triton cross-attention with GUARD's per-token statistics and spike attenuation.

Why this shape of kernel: in a text-to-image UNet the keys are the text tokens, so Nk is small
(77, 154, 231) and a whole key set fits in one register tile (``BLOCK_N`` = next power of two,
at most 256). Each program therefore owns one block of queries of one (row, head) and sees every
key at once: the softmax is exact in one pass (no online rescaling), and the per-token
statistics of the block are plain column reductions of tiles it already holds. Nothing of size
(Nq x Nk) ever reaches memory.

Launches (``grid = (query blocks, B*H)`` for both kernels):

1. ``_spike_peaks_kernel`` runs only when ``spike_rows`` is given. GUARD's spike rule needs each
   token's peak logit over *all* queries before any probability of that (row, head) can be
   formed, so spike rows sweep their queries twice; this first sweep computes only Q.K^T (no V,
   no softmax, no output). Programs of rows outside ``spike_rows`` return at once, which avoids
   a host sync (``nonzero()``) inside the denoising loop. Each program writes its block's peaks to
   a partial buffer; the last program of a (row, head) to arrive (an integer arrival counter)
   reduces the partials and applies the z-score rule, writing one spike flag per token.
2. ``_attention_kernel`` runs once over the whole batch: logits, modulation
   ``l * (token_scale * spike factor) + token_bias``, masked softmax, ``P V``. With statistics
   requested, each program writes its block's per-token max logit and probability mass to
   partial buffers, and the last program of each (row, head) reduces them. With no statistics the
   whole statistics path is compiled out (``STATS`` is a constexpr).

Determinism: the only atomics are integer arrival counters; float partials are reduced by one
program in a fixed block order, so statistics are bit-identical from run to run. The extra
memory is O(B * H * Nk * query blocks) floats plus B*H counters.

Non-finite inputs follow :func:`guard_kernels.cross_attention`'s rules, as the PyTorch path does.
The softmax needs no extra work for them; the statistics' block and cross-block maxima propagate
NaN explicitly (``tl.max`` alone would drop it), at no cost to the plain path.

Precision: the dots accumulate in fp32 (fp16/bf16 operands use tensor cores on a GPU; fp32
operands use 3-pass TF32, accurate to about fp32, never plain TF32). The Triton CPU interpreter
mishandles bf16 arithmetic, so when interpreting, bf16 tiles are upcast to fp32 right after
loading.
"""

import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .limits import TRITON_DTYPES, tile_limit_error
from .stats import SPIKE_STD_EPS, AttentionStats

#: tl.dot rejects tile dimensions under 16 on a GPU (the interpreter would silently accept them).
MIN_BLOCK = 16

_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
#: How the block reductions propagate NaN (see _column_max).
_COUNT_NANS = tl.constexpr(_INTERPRETING)

#: Allocation hook: every buffer the launcher allocates without initialising goes through it, so
#: tests can poison them (fill with NaN) and prove that every output element is written.
_empty = torch.empty


class KernelConfig(NamedTuple):
    """Launch parameters of one kernel: query rows per program, warps, pipeline stages."""

    block_m: int
    num_warps: int
    num_stages: int = 1


class LaunchPlan(NamedTuple):
    """Configs of the two kernels for one (D, Nk) tile shape."""

    attention: KernelConfig
    peaks: KernelConfig


def _next_pow2(n: int) -> int:
    return max(MIN_BLOCK, triton.next_power_of_2(n))


def head_dim_chunk(head_dim: int) -> int:
    """Channels per dot operand tile: D <= 64 in one power-of-two tile, wider D in 32/64 chunks.

    Chunking keeps register tiles small and avoids padding D=80/160 up to 128/256: the logits
    accumulate over the chunks, and P V is computed and stored one chunk of channels at a time.
    """
    if head_dim <= 64:
        return _next_pow2(head_dim)
    return 64 if head_dim % 64 == 0 else 32


def choose_plan(head_dim: int, num_keys: int, dtype: torch.dtype = torch.float16) -> LaunchPlan:
    """Heuristic launch table keyed by the key tile and dtype (autotuning would need a GPU driver).

    The attention kernel holds a BLOCK_M x BLOCK_N fp32 logit tile plus its probabilities in
    registers. ptxas for sm_90 (fp16/bf16, statistics on) gives: BLOCK_N = 128 with 64 rows per 4
    warps, ~190 registers per thread and no spills; BLOCK_N = 256 needs 32 rows per 8 warps (~240;
    64 rows spill). The peak pre-pass holds no probabilities or output and takes twice the rows
    (~110). fp32 operands go through 3-pass TF32 dots (fp32-accurate on tensor cores), whose split
    operands need 32 rows per 8 warps. D is tiled in chunks (head_dim_chunk), so it does not set
    the row count. The same plan serves statistics on and off, so both give bit-identical
    outputs. Under the interpreter every program costs ~10 ms of Python, so one generous block
    size serves all shapes there.
    """
    if _INTERPRETING:
        return LaunchPlan(KernelConfig(64, 4), KernelConfig(64, 4))
    if dtype == torch.float32:
        return LaunchPlan(KernelConfig(32, 8), KernelConfig(32, 8))
    if _next_pow2(num_keys) <= 128:
        return LaunchPlan(KernelConfig(64, 4), KernelConfig(128, 8))
    return LaunchPlan(KernelConfig(32, 8), KernelConfig(64, 8))


@triton.jit
def _block_logits(
    q_ptr,
    k_ptr,
    row,
    head,
    offs_m,
    offs_n,
    num_queries,
    num_keys,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    scale,
    HEAD_DIM: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """scale * Q_block . K^T in fp32, (BLOCK_M, BLOCK_N); padded rows/keys/channels read as 0."""
    q_rows = (row * stride_qb + head * stride_qh + offs_m * stride_qn) * ALIGN
    k_rows = (row * stride_kb + head * stride_kh + offs_n * stride_kn) * ALIGN
    q_valid = offs_m < num_queries
    k_valid = offs_n < num_keys
    scores = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for chunk in tl.static_range(0, HEAD_DIM, BLOCK_D):
        offs_d = chunk + tl.arange(0, BLOCK_D)
        d_valid = offs_d < HEAD_DIM
        q_tile = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=q_valid[:, None] & d_valid[None, :], other=0.0)
        k_tile = tl.load(k_ptr + k_rows[:, None] + offs_d[None, :], mask=k_valid[:, None] & d_valid[None, :], other=0.0)
        if UPCAST:
            q_tile = q_tile.to(tl.float32)
            k_tile = k_tile.to(tl.float32)
        scores = tl.dot(q_tile, tl.trans(k_tile), scores, input_precision=DOT_PRECISION)
    return scores * scale


@triton.jit
def _nan_max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _column_max(logits, query_valid, COUNT_NANS: tl.constexpr):
    """Per-token max over the block's valid queries, NaN wherever one of them is NaN (as torch.amax).

    ``tl.max`` ignores NaN (maxnum on a GPU, nanmax in the interpreter). On a GPU the reduction
    combines with a NaN-propagating max instead, at the cost of ``tl.max``; the interpreter runs
    such a custom reduction element by element in Python (~100x slower), so there the NaNs are
    counted beside ``tl.max``, which on a GPU would cost ~40 registers.
    """
    x = tl.where(query_valid[:, None], logits, float("-inf"))
    if COUNT_NANS:
        nans = tl.sum((x != x).to(tl.int32), axis=0)
        return tl.where(nans > 0, float("nan"), tl.max(x, axis=0))
    return tl.reduce(x, 0, _nan_max)


#: Integer arguments are not specialised (on ==1 or divisibility by 16): tile alignment comes
#: from the constexpr ALIGN instead, so each (dtype, D, Nk tile, flags) compiles exactly once
#: rather than once per combination of layer sizes.
_SHAPE_ARGS = ["num_queries", "num_keys", "num_heads", "num_blocks"]
_QK_STRIDES = ["stride_qb", "stride_qn", "stride_qh", "stride_kb", "stride_kn", "stride_kh"]
_OTHER_STRIDES = ["stride_vb", "stride_vn", "stride_vh", "stride_ob", "stride_on", "stride_oh"]
_TOKEN_STRIDES = ["stride_tsb", "stride_tsh", "stride_tsn", "stride_tbb", "stride_tbh", "stride_tbn"]


@triton.jit
def _arrived_last(counter_ptr, row_head, num_blocks):
    """Count this program in for its (row, head); true for the last of the ``num_blocks`` to arrive.

    Last-arrival reduction: every thread's partial store is ordered before the release of the
    counter increment (barrier + acq_rel atomic); the last program acquires them all, and its
    caller puts a barrier before reading the partials back.
    """
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr + row_head, 1, sem="acq_rel", scope="gpu")
    return arrived == num_blocks - 1


@triton.jit(do_not_specialize=_QK_STRIDES + _SHAPE_ARGS)
def _spike_peaks_kernel(
    q_ptr,
    k_ptr,
    spike_rows_ptr,
    peak_partial_ptr,
    spike_flag_ptr,
    counter_ptr,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    num_queries,
    num_keys,
    num_heads,
    num_blocks,
    scale,
    spike_threshold,
    std_eps,
    HEAD_DIM: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """First sweep of a spike row: per-token peak logits, then (last program) the z-score rule."""
    block = tl.program_id(0)
    row_head = tl.program_id(1)
    row = row_head // num_heads
    head = row_head % num_heads
    if tl.load(spike_rows_ptr + row) == 0:
        return

    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    logits = _block_logits(
        q_ptr, k_ptr, row, head, offs_m, offs_n, num_queries, num_keys,
        stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, scale,
        HEAD_DIM, ALIGN, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, DOT_PRECISION,
    )  # fmt: skip
    block_peak = _column_max(logits, offs_m < num_queries, _COUNT_NANS)
    partial_base = peak_partial_ptr + row_head * num_blocks * BLOCK_N
    tl.store(partial_base + block * BLOCK_N + offs_n, block_peak)

    if _arrived_last(counter_ptr, row_head, num_blocks):
        tl.debug_barrier()
        peak = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        for other in range(0, num_blocks):
            partial = tl.load(partial_base + other * BLOCK_N + offs_n, cache_modifier=".cg")
            peak = tl.maximum(peak, partial, propagate_nan=tl.PropagateNan.ALL)
        # GUARD spike rule (guard_kernels.stats.spike_mask_from_peaks): tokens 1..Nk-1 only,
        # unbiased std, z > threshold; fewer than two such tokens -> no spikes. A NaN or infinite
        # peak makes the mean, hence every z-score, NaN: nothing is flagged.
        body = (offs_n >= 1) & (offs_n < num_keys)
        count = num_keys * 1.0 - 1.0
        mean = tl.sum(tl.where(body, peak, 0.0), axis=0) / tl.maximum(count, 1.0)
        centred = tl.where(body, peak - mean, 0.0)
        std = tl.sqrt(tl.sum(centred * centred, axis=0) / tl.maximum(count - 1.0, 1.0))
        z = centred / (std + std_eps)
        is_spike = body & (z > spike_threshold) & (num_keys >= 3)
        tl.store(spike_flag_ptr + row_head * BLOCK_N + offs_n, is_spike.to(tl.int8))


@triton.jit(do_not_specialize=_QK_STRIDES + _OTHER_STRIDES + _TOKEN_STRIDES + _SHAPE_ARGS)
def _attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    spike_rows_ptr,
    spike_flag_ptr,
    token_scale_ptr,
    token_bias_ptr,
    max_partial_ptr,
    mass_partial_ptr,
    max_logit_ptr,
    mass_ptr,
    spikes_ptr,
    counter_ptr,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_ob,
    stride_on,
    stride_oh,
    stride_tsb,
    stride_tsh,
    stride_tsn,
    stride_tbb,
    stride_tbh,
    stride_tbn,
    num_queries,
    num_keys,
    num_heads,
    num_blocks,
    scale,
    spike_scale,
    HEAD_DIM: tl.constexpr,
    ALIGN: tl.constexpr,
    HAS_SPIKE_ROWS: tl.constexpr,
    HAS_TOKEN_SCALE: tl.constexpr,
    HAS_TOKEN_BIAS: tl.constexpr,
    STATS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One query block of one (row, head): modulated masked softmax, P V, optional statistics."""
    block = tl.program_id(0)
    row_head = tl.program_id(1)
    row = row_head // num_heads
    head = row_head % num_heads

    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    query_valid = offs_m < num_queries
    key_valid = offs_n < num_keys

    logits = _block_logits(
        q_ptr, k_ptr, row, head, offs_m, offs_n, num_queries, num_keys,
        stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, scale,
        HEAD_DIM, ALIGN, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, DOT_PRECISION,
    )  # fmt: skip
    if STATS:  # raw peaks first, so the unmodulated tile need not stay live
        block_max = _column_max(logits, query_valid, _COUNT_NANS)

    # Per-token multiplier token_scale * (spike_scale on spikes), then bias, as in the reference.
    modulated = logits
    if HAS_TOKEN_SCALE or HAS_SPIKE_ROWS:
        multiplier = tl.full((BLOCK_N,), 1.0, tl.float32)
        if HAS_SPIKE_ROWS:
            # Flags exist only for spike rows (other rows' pre-pass programs wrote nothing).
            is_spike_row = tl.load(spike_rows_ptr + row) != 0
            flags = tl.load(spike_flag_ptr + row_head * BLOCK_N + offs_n, mask=key_valid, other=0)
            multiplier = tl.where(is_spike_row & (flags != 0), spike_scale, 1.0)
        if HAS_TOKEN_SCALE:
            multiplier *= tl.load(
                token_scale_ptr + row * stride_tsb + head * stride_tsh + offs_n * stride_tsn, mask=key_valid, other=1.0
            )
        modulated = modulated * multiplier[None, :]
    if HAS_TOKEN_BIAS:
        token_bias = tl.load(
            token_bias_ptr + row * stride_tbb + head * stride_tbh + offs_n * stride_tbn, mask=key_valid, other=0.0
        )
        modulated = modulated + token_bias[None, :]
    modulated = tl.where(key_valid[None, :], modulated, float("-inf"))

    # Softmax whose fully masked rows (all -inf) give zeros rather than NaN, while a NaN or +inf
    # logit makes its row NaN (as torch.softmax): total is 0 only when every weight is 0, and NaN
    # when a weight is (the NaN-ignoring row max still leaves exp(NaN) or exp(inf - inf) there).
    # Normalisation is applied after P V (a BLOCK_M x BLOCK_D scaling instead of BLOCK_M x
    # BLOCK_N). Padded query rows are never stored and are left out of the token mass.
    row_max = tl.max(modulated, axis=1)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    weights = tl.exp(modulated - row_max[:, None])
    total = tl.sum(weights, axis=1)
    inv_total = 1.0 / tl.where(total == 0.0, 1.0, total)
    if STATS:
        block_mass = tl.sum(tl.where(query_valid[:, None], weights * inv_total[:, None], 0.0), axis=0)

    # P V one chunk of channels at a time.
    weights = weights.to(tl.float32 if UPCAST else v_ptr.dtype.element_ty)
    v_rows = (row * stride_vb + head * stride_vh + offs_n * stride_vn) * ALIGN
    out_rows = (row * stride_ob + head * stride_oh + offs_m * stride_on) * ALIGN
    for chunk in tl.static_range(0, HEAD_DIM, BLOCK_D):
        offs_d = chunk + tl.arange(0, BLOCK_D)
        d_valid = offs_d < HEAD_DIM
        v_mask = key_valid[:, None] & d_valid[None, :]
        v_tile = tl.load(v_ptr + v_rows[:, None] + offs_d[None, :], mask=v_mask, other=0.0)
        if UPCAST:
            v_tile = v_tile.to(tl.float32)
        out_tile = tl.dot(weights, v_tile, input_precision=DOT_PRECISION) * inv_total[:, None]
        tl.store(
            out_ptr + out_rows[:, None] + offs_d[None, :],
            out_tile.to(out_ptr.dtype.element_ty),
            mask=query_valid[:, None] & d_valid[None, :],
        )

    if STATS:
        partial_offset = row_head * num_blocks * BLOCK_N
        tl.store(max_partial_ptr + partial_offset + block * BLOCK_N + offs_n, block_max)
        tl.store(mass_partial_ptr + partial_offset + block * BLOCK_N + offs_n, block_mass)

        if _arrived_last(counter_ptr, row_head, num_blocks):
            tl.debug_barrier()
            peak = tl.full((BLOCK_N,), float("-inf"), tl.float32)
            mass = tl.zeros((BLOCK_N,), tl.float32)
            for other in range(0, num_blocks):  # fixed order: deterministic float sums
                offset = partial_offset + other * BLOCK_N + offs_n
                partial = tl.load(max_partial_ptr + offset, cache_modifier=".cg")
                peak = tl.maximum(peak, partial, propagate_nan=tl.PropagateNan.ALL)
                mass += tl.load(mass_partial_ptr + offset, cache_modifier=".cg")
            stats_offset = row_head * num_keys + offs_n
            tl.store(max_logit_ptr + stats_offset, peak, mask=key_valid)
            tl.store(mass_ptr + stats_offset, mass, mask=key_valid)
            spiked = tl.zeros((BLOCK_N,), tl.int8)
            if HAS_SPIKE_ROWS:
                is_spike_row = tl.load(spike_rows_ptr + row) != 0
                flags = tl.load(spike_flag_ptr + row_head * BLOCK_N + offs_n, mask=key_valid, other=0)
                spiked = tl.where(is_spike_row & (flags != 0), 1, 0).to(tl.int8)
            tl.store(spikes_ptr + stats_offset, spiked, mask=key_valid)


def _token_strides(token: Optional[torch.Tensor]):
    return tuple(token.stride()) if token is not None else (0, 0, 0)


def _stride_unit(*tensors: torch.Tensor) -> int:
    """Largest power of two (<= 16 bytes' worth of elements) dividing every non-D stride.

    Row/query/head strides are passed to the kernels in these units and multiplied back by the
    constexpr ALIGN, so the compiler can prove each tile row starts ALIGN-aligned and vectorise
    its loads. Triton itself only infers "multiple of 16" from runtime integers, which e.g. the
    head stride 40 of SD 1.5's first layers is not.
    """
    unit = max(1, 16 // tensors[0].element_size())
    for t in tensors:
        for stride in _index_strides(t):
            while stride % unit:
                unit //= 2
    return unit


def _index_strides(t: torch.Tensor):
    """Strides of the (B, N, H) dims; 0 for size-1 dims, whose stride is never used."""
    return tuple(stride if size > 1 else 0 for size, stride in zip(t.shape[:-1], t.stride()[:-1]))


def _check_launchable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.device.type != "cuda" and not _INTERPRETING:
        raise RuntimeError(
            f"the Triton kernel needs CUDA tensors (got {q.device}) or TRITON_INTERPRET=1 set before"
            " guard_kernels.triton_fused is imported"
        )
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32 for the Triton kernel, got {q.dtype}")
    too_large = tile_limit_error(q.shape[-1], k.shape[1])
    if too_large is not None:
        raise ValueError(too_large)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must have unit stride on D, got strides {tuple(t.stride())}")
        span = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        if max(span, t.numel()) >= 2**31:
            raise ValueError(f"{name} spans {span + 1} elements; the Triton kernel indexes with int32 (< 2**31)")


def triton_cross_attention(
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
    *,
    plan: Optional[LaunchPlan] = None,
):
    """Launch the fused kernels; arguments already validated by :func:`guard_kernels.cross_attention`.

    ``token_scale`` / ``token_bias`` are float32 (B, H, Nk) tensors (stride-0 expanded views are
    read through their strides, never materialised) or None. ``plan`` overrides the heuristic
    launch configuration (used by the GPU benchmark to compare configurations).
    Returns ``(out, stats)``; ``stats`` is None unless ``return_stats``.
    """
    _check_launchable(q, k, v)
    batch, num_queries, num_heads, head_dim = q.shape
    num_keys = k.shape[1]
    device = q.device
    block_n, block_d = _next_pow2(num_keys), head_dim_chunk(head_dim)
    plan = plan or choose_plan(head_dim, num_keys, q.dtype)
    for config in plan:
        if config.block_m < MIN_BLOCK:
            raise ValueError(f"block_m must be >= {MIN_BLOCK} for tl.dot, got {config.block_m}")
    upcast = _INTERPRETING and q.dtype == torch.bfloat16
    align = _stride_unit(q, k, v)  # also bounded by out's strides below
    dot_precision = "tf32x3" if q.dtype == torch.float32 else "tf32"
    row_heads = batch * num_heads

    out = _empty((batch, num_queries, num_heads, head_dim), dtype=q.dtype, device=device)
    align = min(align, _stride_unit(out))
    q_strides, k_strides, v_strides, out_strides = (
        tuple(stride // align for stride in _index_strides(t)) for t in (q, k, v, out)
    )
    stats = None
    if return_stats:
        stats = AttentionStats(
            max_logit=_empty((batch, num_heads, num_keys), dtype=torch.float32, device=device),
            mass=_empty((batch, num_heads, num_keys), dtype=torch.float32, device=device),
            spikes=_empty((batch, num_heads, num_keys), dtype=torch.bool, device=device),
        )
    if row_heads == 0:
        return out, stats

    # Pointer arguments a launch never dereferences (their constexpr flag is off) get `out`, so
    # the plain path (no spike rule, no statistics) launches one kernel and allocates nothing else.
    unused = out
    counters = spike_rows_u8 = spike_flags = unused
    if spike_rows is not None or return_stats:
        # One zeroed buffer holds both kernels' arrival counters (a single memset).
        counters = torch.zeros(2 * row_heads, dtype=torch.int32, device=device)
    if spike_rows is not None:
        spike_rows_u8 = spike_rows.contiguous().view(torch.uint8)  # the kernels index it with stride 1

    if spike_rows is not None:
        peaks_cfg = plan.peaks
        peak_blocks = triton.cdiv(num_queries, peaks_cfg.block_m)
        peak_partial = _empty((row_heads, peak_blocks, block_n), dtype=torch.float32, device=device)
        spike_flags = _empty((row_heads, block_n), dtype=torch.int8, device=device)
        _spike_peaks_kernel[(peak_blocks, row_heads)](
            q, k, spike_rows_u8, peak_partial, spike_flags, counters[:row_heads],
            *q_strides, *k_strides, num_queries, num_keys, num_heads, peak_blocks,
            float(scale), float(spike_threshold), SPIKE_STD_EPS, HEAD_DIM=head_dim, ALIGN=align,
            BLOCK_M=peaks_cfg.block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            UPCAST=upcast, DOT_PRECISION=dot_precision,
            num_warps=peaks_cfg.num_warps, num_stages=peaks_cfg.num_stages,
        )  # fmt: skip

    attn_cfg = plan.attention
    num_blocks = triton.cdiv(num_queries, attn_cfg.block_m)
    if return_stats:
        max_partial = _empty((row_heads, num_blocks, block_n), dtype=torch.float32, device=device)
        mass_partial = _empty((row_heads, num_blocks, block_n), dtype=torch.float32, device=device)
        max_logit, mass, spikes = stats.max_logit, stats.mass, stats.spikes.view(torch.uint8)
        stats_counters = counters[row_heads:]
    else:  # the statistics path is compiled out
        max_partial = mass_partial = max_logit = mass = spikes = stats_counters = unused
    ts_strides, tb_strides = _token_strides(token_scale), _token_strides(token_bias)
    _attention_kernel[(num_blocks, row_heads)](
        q, k, v, out, spike_rows_u8, spike_flags,
        token_scale if token_scale is not None else unused,
        token_bias if token_bias is not None else unused,
        max_partial, mass_partial, max_logit, mass, spikes, stats_counters,
        *q_strides, *k_strides, *v_strides, *out_strides, *ts_strides, *tb_strides,
        num_queries, num_keys, num_heads, num_blocks, float(scale), float(spike_scale),
        HEAD_DIM=head_dim, ALIGN=align,
        HAS_SPIKE_ROWS=spike_rows is not None, HAS_TOKEN_SCALE=token_scale is not None,
        HAS_TOKEN_BIAS=token_bias is not None, STATS=bool(return_stats),
        BLOCK_M=attn_cfg.block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        UPCAST=upcast, DOT_PRECISION=dot_precision,
        num_warps=attn_cfg.num_warps, num_stages=attn_cfg.num_stages,
    )  # fmt: skip
    return out, stats
