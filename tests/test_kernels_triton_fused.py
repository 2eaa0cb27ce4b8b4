"""The fused Triton kernel (guard_kernels.triton_fused) against the float64 reference of guard_kernels.testing.

Runs on the CPU through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), or on a
GPU when one is present. Every buffer the launcher allocates is poisoned (NaN / True / 1) so an
element the kernels forget to write fails the comparison. Each interpreted program costs ~10 ms,
so the cases below are a covering set (every shape, dtype, layout and option appears at least
once) rather than a cross-product, with B = 2 or 3 and at most two heads. What the interpreter
cannot show (GPU compilation, register spills, vectorised loads) is checked by compiling real
launches for sm_90 with Triton's bundled ptxas, which needs no GPU.
"""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import zlib
from typing import NamedTuple, Optional

import pytest
import torch
import triton
import triton.language as tl

from guard_kernels import cross_attention, limits, triton_fused
from guard_kernels.testing import error_budget, reference_attention, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- inputs


class Case(NamedTuple):
    batch: int
    heads: int
    num_queries: int
    num_keys: int
    head_dim: int
    dtype: torch.dtype
    spike_rows: Optional[tuple]  # None = no spike rule
    token_scale: Optional[str]  # None, "BN" or "BHN"
    token_bias: Optional[str]  # None, "some" (a few tokens masked) or "row" (one row fully masked, others some)
    layout: str  # "contiguous", "fused" (slices of a packed projection buffer) or "heads_first"
    threshold: float = 0.1


CASES = {
    "nq100-nk77-d40-fp32-some-fused": Case(2, 2, 100, 77, 40, torch.float32, (False, True), None, None, "fused"),
    "nq257-nk77-d64-fp16-all-scaleBN-biasSome": Case(
        2, 2, 257, 77, 64, torch.float16, (True, True), "BN", "some", "contiguous"
    ),
    "nq100-nk154-d80-bf16-some-scaleBHN-headsfirst": Case(
        2, 2, 100, 154, 80, torch.bfloat16, (True, False), "BHN", None, "heads_first"
    ),
    # A negative threshold would flag token 1 if the "fewer than two non-BOS tokens" guard were missing.
    "nq100-nk2-d160-fp32-all-biasRow-thrNeg": Case(
        2, 1, 100, 2, 160, torch.float32, (True, True), None, "row", "contiguous", threshold=-0.5
    ),
    "nq100-nk1-d64-fp16-nospikerule": Case(2, 2, 100, 1, 64, torch.float16, None, None, None, "fused"),
    "nq257-nk77-d160-fp16-none-scaleBHN-biasRow": Case(
        2, 1, 257, 77, 160, torch.float16, (False, False), "BHN", "row", "fused"
    ),
    "nq100-nk154-d40-bf16-some-thr2-biasSome": Case(
        2, 2, 100, 154, 40, torch.bfloat16, (False, True), "BN", "some", "contiguous", threshold=2.0
    ),
    "nq64-nk77-d64-fp32-guardbatch-headsfirst": Case(
        3, 1, 64, 77, 64, torch.float32, (False, True, False), None, "some", "heads_first"
    ),
    # SDXL's cross-attention: head dim 64, 10 heads (down_blocks.1) and 20 heads (down_blocks.2,
    # mid_block), 77 tokens; few queries (the interpreter's cost is per program, i.e. per row-head).
    "sdxl-nq40-nk77-d64-h10-fp16-guardbatch-fused": Case(
        3, 10, 40, 77, 64, torch.float16, (False, True, False), None, None, "fused"
    ),
    "sdxl-nq16-nk77-d64-h20-fp32-guardbatch": Case(
        2, 20, 16, 77, 64, torch.float32, (False, True), None, None, "contiguous"
    ),
}


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def _layout(t: torch.Tensor, layout: str, gen: torch.Generator, slot: int) -> torch.Tensor:
    """Return t's values as a (B, N, H, D) view with the requested memory layout (no copy of the view)."""
    batch, n, heads, dim = t.shape
    if layout == "contiguous":
        return t.contiguous()
    if layout == "fused":  # e.g. q sliced from a (B, N, 3*H*D) qkv projection, then .view
        packed = torch.randn(batch, n, 3 * heads * dim, generator=gen).to(device=t.device, dtype=t.dtype)
        packed[..., slot * heads * dim : (slot + 1) * heads * dim] = t.reshape(batch, n, heads * dim)
        view = packed[..., slot * heads * dim : (slot + 1) * heads * dim].view(batch, n, heads, dim)
        assert not view.is_contiguous()
        return view
    if layout == "heads_first":  # a (B, H, N, D) buffer seen as (B, N, H, D)
        return t.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    raise ValueError(layout)


def draw_case(name: str, case: Case, margin: float = 1e-3):
    """Fresh random inputs for a case, redrawn until no spike-rule z-score is within margin of the threshold."""
    gen = torch.Generator().manual_seed(_seed(name))
    b, h, nq, nk, d = case.batch, case.heads, case.num_queries, case.num_keys, case.head_dim
    for _ in range(50):
        q = torch.randn(b, nq, h, d, generator=gen)
        k = torch.randn(b, nk, h, d, generator=gen)
        v = torch.randn(b, nk, h, d, generator=gen)
        if nk >= 6:  # clear spikes: a few keys aligned with a shared query direction
            k[:, 3] += 2.0 * q[:, : nq // 2].mean(dim=1)
            k[:, nk // 2] *= 2.5
        q, k, v = (t.to(case.dtype) for t in (q, k, v))
        spike_rows = None if case.spike_rows is None else torch.tensor(case.spike_rows)
        z = reference_attention(q, k, v, spike_rows=spike_rows, spike_threshold=case.threshold).z
        if spike_rows is None or nk < 3 or torch.nan_to_num((z - case.threshold).abs(), nan=1.0).min() > margin:
            break
    else:
        raise RuntimeError(f"could not draw inputs for {name} with no z-score near the threshold")

    token_scale = None
    if case.token_scale == "BN":
        token_scale = 0.5 + torch.rand(b, nk, generator=gen)
    elif case.token_scale == "BHN":
        token_scale = 0.5 + torch.rand(b, h, nk, generator=gen)
    token_bias = None
    if case.token_bias is not None:
        token_bias = 0.5 * torch.randn(b, nk, generator=gen)
        token_bias[:, max(1, nk // 3) :: 4] = -math.inf  # mask some tokens, never token 0
        if case.token_bias == "row":
            token_bias[0] = -math.inf
    to_device = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    q, k, v = (_layout(to_device(t), case.layout, gen, slot) for slot, t in enumerate((q, k, v)))
    return q, k, v, to_device(spike_rows), to_device(token_scale), to_device(token_bias)


def kernel_args(q, case, spike_rows, token_scale, token_bias):
    """The launcher's normalised arguments, as guard_kernels.cross_attention would pass them."""
    b, h, nk = case.batch, case.heads, case.num_keys

    def expand(token):
        if token is None:
            return None
        token = token.float()
        return (token[:, None, :] if token.dim() == 2 else token).expand(b, h, nk)

    return dict(
        scale=case.head_dim**-0.5,
        spike_rows=spike_rows,
        spike_threshold=case.threshold,
        spike_scale=0.3,
        token_scale=expand(token_scale),
        token_bias=expand(token_bias),
    )


def run_kernel(q, k, v, args, return_stats):
    return triton_fused.triton_cross_attention(
        q,
        k,
        v,
        args["scale"],
        args["spike_rows"],
        args["spike_threshold"],
        args["spike_scale"],
        args["token_scale"],
        args["token_bias"],
        return_stats,
    )


def finite_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """rel_err, after checking that every element was written (the launcher's buffers start as NaN)."""
    assert torch.isfinite(actual).all(), "non-finite values (a poisoned element was never written?)"
    return rel_err(actual, expected)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def poisoned_allocations(monkeypatch):
    """Poison every buffer the launcher allocates (floats NaN, bools True, ints 1); count them."""
    real_empty = torch.empty
    allocated = []

    def poisoned_empty(*shape, **kwargs):
        t = real_empty(*shape, **kwargs)
        if t.is_floating_point():
            t.fill_(math.nan)
        elif t.dtype == torch.bool:
            t.fill_(True)
        else:
            t.fill_(1)
        allocated.append(t)
        return t

    monkeypatch.setattr(triton_fused, "_empty", poisoned_empty)
    return allocated


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name, poisoned_allocations):
    case = CASES[name]
    q, k, v, spike_rows, token_scale, token_bias = draw_case(name, case)
    args = kernel_args(q, case, spike_rows, token_scale, token_bias)
    out, stats = run_kernel(q, k, v, args, return_stats=True)
    assert len(poisoned_allocations) >= 4, "the poisoning hook was bypassed"

    mods = dict(spike_rows=spike_rows, spike_threshold=case.threshold, token_scale=token_scale, token_bias=token_bias)
    ref = reference_attention(q, k, v, **mods)
    yardstick = reference_attention(q, k, v, **mods, dtype=case.dtype, spikes=ref.spikes)

    assert out.shape == (case.batch, case.num_queries, case.heads, case.head_dim)
    assert out.dtype == case.dtype and out.is_contiguous() and out.device == q.device
    assert torch.isfinite(out).all()
    budget = error_budget(out, ref.out, yardstick.out)
    assert budget.ok, budget
    if case.dtype == torch.float16:
        assert finite_rel_err(out, ref.out) <= 2e-3

    assert stats.spikes.dtype == torch.bool
    assert torch.equal(stats.spikes, ref.spikes)
    if case.spike_rows is not None and any(case.spike_rows) and case.num_keys >= 6:
        assert ref.spikes.any(), "the case was meant to contain spikes"
    for got, want in ((stats.max_logit, ref.max_logit), (stats.mass, ref.mass)):
        assert got.dtype == torch.float32 and got.shape == (case.batch, case.heads, case.num_keys)
        assert finite_rel_err(got, want) <= 1e-4
    if case.token_bias == "row":  # a fully masked row: zeros, never NaN
        assert torch.equal(out[0].cpu(), torch.zeros_like(out[0].cpu()))
        assert torch.equal(stats.mass[0].cpu(), torch.zeros_like(stats.mass[0].cpu()))


def test_stats_flag_and_repeats_give_bit_identical_results(poisoned_allocations):
    name = "nq257-nk77-d64-fp16-all-scaleBN-biasSome"
    case = CASES[name]._replace(spike_rows=(True, False))
    q, k, v, spike_rows, token_scale, token_bias = draw_case(name, case)
    args = kernel_args(q, case, spike_rows, token_scale, token_bias)
    out_a, stats_a = run_kernel(q, k, v, args, return_stats=True)
    out_c, stats_c = run_kernel(q, k, v, args, return_stats=False)
    # A strided spike_rows view (every other element of a longer mask) selects the same rows.
    strided_rows = torch.stack([spike_rows, ~spike_rows], dim=1).reshape(-1)[::2]
    assert not strided_rows.is_contiguous() and torch.equal(strided_rows, spike_rows)
    out_b, stats_b = run_kernel(q, k, v, {**args, "spike_rows": strided_rows}, return_stats=True)
    assert stats_c is None
    assert torch.equal(out_a, out_b) and torch.equal(out_a, out_c)
    for first, second in zip(stats_a, stats_b):
        assert torch.equal(first, second)
    assert stats_a.spikes[0].any() and not stats_a.spikes[1].any()


def test_plain_path_allocates_only_the_output(poisoned_allocations):
    """No spike rule and no statistics: one kernel, no workspace (the hot path of unattenuated layers)."""
    case = Case(2, 2, 100, 77, 40, torch.float16, None, None, None, "fused")
    q, k, v, _, _, _ = draw_case("plain", case)
    out, stats = run_kernel(q, k, v, kernel_args(q, case, None, None, None), return_stats=False)
    assert stats is None and len(poisoned_allocations) == 1 and poisoned_allocations[0] is out
    assert finite_rel_err(out, reference_attention(q, k, v).out) <= 2e-3


@pytest.mark.parametrize(
    "dtype,spike_rows,token_bias",
    [(torch.float32, (True, False), True), (torch.float16, None, False)],
)
def test_public_api_triton_matches_torch_backend(dtype, spike_rows, token_bias):
    name = f"api-{dtype}-{spike_rows}-{token_bias}"
    case = Case(2, 2, 100, 77, 64, dtype, spike_rows, "BN", "some" if token_bias else None, "fused")
    q, k, v, spike_rows, token_scale, token_bias = draw_case(name, case)
    kwargs = dict(spike_rows=spike_rows, token_scale=token_scale, token_bias=token_bias, return_stats=True)
    out_t, stats_t = cross_attention(q, k, v, backend="triton", **kwargs)
    out_r, stats_r = cross_attention(q, k, v, backend="torch", **kwargs)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out_t.float(), out_r.float(), rtol=0, atol=tol)
    torch.testing.assert_close(stats_t.max_logit, stats_r.max_logit.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats_t.mass, stats_r.mass.float(), rtol=1e-4, atol=1e-4)
    assert torch.equal(stats_t.spikes, stats_r.spikes)
    assert torch.equal(cross_attention(q, k, v, backend="triton", **{**kwargs, "return_stats": False}), out_t)


def non_finite_inputs(dtype):
    """Inputs with NaN/inf planted where each rule of cross_attention's docstring applies.

    Row 0: a NaN query (head 0, in the second query block) and a NaN key (head 1). Row 1: NaN and
    +inf in v (head 0), +inf in v at a masked key (head 1). Row 2: +inf and NaN token_bias. Row 3:
    every key masked. Spike rows everywhere, so both kernels' reductions see the NaNs.
    """
    gen = torch.Generator().manual_seed(7)
    batch, nq, heads, nk, dim = 4, 70, 2, 20, 16
    q = 0.5 * torch.randn(batch, nq, heads, dim, generator=gen)
    k = torch.randn(batch, nk, heads, dim, generator=gen)
    k[:, 2] *= 3.0  # a spike on every (row, head)
    v = torch.randn(batch, nk, heads, dim, generator=gen)
    token_bias = 0.1 * torch.randn(batch, heads, nk, generator=gen)
    clean = tuple(t.to(DEVICE, dtype, copy=True) for t in (q, k, v)) + (token_bias.to(DEVICE, copy=True),)
    q[0, 66, 0, 3] = math.nan
    k[0, 7, 1, 2] = math.nan
    v[1, 4, 0, 5], v[1, 6, 0, 9] = math.nan, math.inf
    token_bias[1, 1, 3], v[1, 3, 1, 1] = -math.inf, math.inf
    token_bias[2, 0, 8], token_bias[2, 1, 9] = math.inf, math.nan
    token_bias[3] = -math.inf
    planted = tuple(t.to(DEVICE, dtype) for t in (q, k, v)) + (token_bias.to(DEVICE),)
    return clean, planted


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning", "ignore:All-NaN slice:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_finite_inputs_follow_the_documented_rules_on_both_paths(dtype, poisoned_allocations):
    (q0, k0, v0, bias0), (q, k, v, token_bias) = non_finite_inputs(dtype)
    rows = torch.ones(4, dtype=torch.bool, device=DEVICE)
    kwargs = dict(spike_rows=rows, token_bias=token_bias, return_stats=True)
    out, stats = cross_attention(q, k, v, backend="triton", **kwargs)
    out_torch, stats_torch = cross_attention(q, k, v, backend="torch", **kwargs)
    ref = reference_attention(q, k, v, spike_rows=rows, token_bias=token_bias)
    tol = dict(rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-3, equal_nan=True)
    torch.testing.assert_close(out.float(), out_torch.float(), **tol)  # NaN and inf in the same places
    torch.testing.assert_close(out.double(), ref.out, **tol)
    for got, want, expected in zip(stats, stats_torch, ref[1:4]):
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-4, atol=1e-4, equal_nan=True)
        torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-4, atol=1e-4, equal_nan=True)
    plain = cross_attention(q, k, v, token_bias=token_bias, backend="triton")  # no statistics, no spike rule
    assert torch.equal(torch.isnan(plain), torch.isnan(out)) and torch.equal(torch.isinf(plain), torch.isinf(out))

    finite = torch.isfinite
    clean_spikes = cross_attention(q0, k0, v0, spike_rows=rows, token_bias=bias0, return_stats=True)[1].spikes
    assert clean_spikes[:2].all(dim=-1).logical_not().all() and clean_spikes[:2].any(dim=-1).all()
    # Row 0: a NaN raw logit makes its query NaN, its token's max_logit NaN, and the spike rule flag nothing.
    assert torch.isnan(out[0, 66, 0]).all() and finite(out[0, :66, 0]).all() and finite(out[0, 67:, 0]).all()
    assert torch.isnan(stats.max_logit[0, 0]).all() and not stats.spikes[0].any()
    assert torch.isnan(out[0, :, 1]).all() and torch.isnan(stats.max_logit[0, 1, 7])
    assert finite(stats.max_logit[0, 1, :7]).all() and finite(stats.max_logit[0, 1, 8:]).all()
    assert torch.isnan(stats.mass[0]).all()
    # Row 1: v's NaN and inf go through P V; a masked key holding inf gives 0 * inf = NaN.
    assert torch.isnan(out[1, :, 0, 5]).all() and torch.equal(
        out[1, :, 0, 9], torch.full_like(out[1, :, 0, 9], math.inf)
    )
    assert torch.isnan(out[1, :, 1, 1]).all()
    assert finite(out[1, :, :, [0, 2, 3, 4, 6, 7, 8, 10, 11, 12, 13, 14, 15]]).all() and finite(stats.mass[1]).all()
    assert torch.equal(stats.spikes[1], clean_spikes[1])
    # Row 2: a +inf or NaN final logit makes every query of its (row, head) NaN; raw statistics stay finite.
    assert torch.isnan(out[2]).all() and torch.isnan(stats.mass[2]).all() and finite(stats.max_logit[2]).all()
    # Row 3: every key masked: zeros.
    assert torch.equal(out[3], torch.zeros_like(out[3])) and torch.equal(stats.mass[3], torch.zeros_like(stats.mass[3]))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_a_minus_inf_logit_masks_its_key_and_padded_queries_add_no_mass(poisoned_allocations):
    """q > 0 on channel 0 and k = -inf there: key 5 gets -inf logits for every real query, while the
    zero-padded queries of the last block compute 0 * -inf = NaN, which must stay out of the mass.
    (float16: a float32 GPU dot splits operands for 3-pass TF32 and would make these logits NaN.)"""
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(2, 70, 1, 16, generator=gen)
    q[..., 0] = q[..., 0].abs() + 0.1
    k, v = torch.randn(2, 2, 12, 1, 16, generator=gen)
    k[:, 5, 0, 0] = -math.inf
    q, k, v = (t.to(DEVICE, torch.float16) for t in (q, k, v))
    rows = torch.tensor([True, False], device=DEVICE)
    out, stats = cross_attention(q, k, v, spike_rows=rows, return_stats=True, backend="triton")
    out_torch, stats_torch = cross_attention(q, k, v, spike_rows=rows, return_stats=True, backend="torch")
    assert torch.isfinite(out).all() and torch.isfinite(stats.mass).all()
    assert not stats.mass[:, :, 5].any() and (stats.max_logit[:, :, 5] == -math.inf).all()
    assert not stats.spikes.any()  # a -inf peak makes row 0's z-scores NaN
    torch.testing.assert_close(out, out_torch, rtol=0, atol=2e-3)
    for got, want in zip(stats, stats_torch):
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-4, atol=1e-4)


@triton.jit
def _column_max_probe(x_ptr, valid_ptr, out_ptr, M: tl.constexpr, N: tl.constexpr, COUNT_NANS: tl.constexpr):
    offs_m, offs_n = tl.arange(0, M), tl.arange(0, N)
    x = tl.load(x_ptr + offs_m[:, None] * N + offs_n[None, :])
    valid = tl.load(valid_ptr + offs_m) != 0
    tl.store(out_ptr + offs_n, triton_fused._column_max(x, valid, COUNT_NANS))


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
@pytest.mark.parametrize("count_nans", [True, False], ids=["interpreter-variant", "gpu-variant"])
def test_block_column_max_propagates_nan_like_torch_amax(count_nans):
    """Both variants of the block reduction (the GPU's runs here through the interpreter, slowly)."""
    x = torch.randn(16, 16, device=DEVICE)
    x[3, 1] = x[0, 2] = x[15, 3] = math.nan  # NaN in valid rows: columns 1-3 NaN
    x[5, 4], x[6, 5], x[6, 6] = math.inf, -math.inf, math.inf
    x[5, 10], x[6, 10] = math.inf, math.nan  # inf and NaN: NaN
    x[1, 7] = x[8, 8] = math.nan  # rows 1 and 8 are invalid (padding): ignored
    x[:, 9] = -math.inf
    valid = torch.ones(16, dtype=torch.bool, device=DEVICE)
    valid[[1, 8]] = False
    out = torch.empty(16, device=DEVICE)
    _column_max_probe[(1,)](x, valid.to(torch.uint8), out, 16, 16, count_nans)
    torch.testing.assert_close(out, x[valid].amax(dim=0), rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(out[[1, 2, 3, 10]]).all() and torch.isfinite(out[7:9]).all() and out[9] == -math.inf


def test_launcher_rejects_what_it_cannot_tile(monkeypatch):
    q = torch.randn(1, 8, 1, 16, device=DEVICE)
    k = torch.randn(1, limits.MAX_KEYS + 1, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="Nk=257"):
        triton_fused.triton_cross_attention(q, k, k, 0.25, None, 0.1, 0.3, None, None, False)
    wide = torch.randn(1, 8, 1, limits.MAX_HEAD_DIM + 1, device=DEVICE)
    with pytest.raises(ValueError, match="D=257"):
        triton_fused.triton_cross_attention(wide, wide, wide, 0.25, None, 0.1, 0.3, None, None, False)
    small = torch.randn(1, 8, 1, 16, device=DEVICE)
    tiny = triton_fused.KernelConfig(block_m=8, num_warps=4)
    with pytest.raises(ValueError, match="block_m must be >= 16"):
        triton_fused.triton_cross_attention(
            q, small, small, 0.25, None, 0.1, 0.3, None, None, False, plan=triton_fused.LaunchPlan(tiny, tiny)
        )
    if DEVICE == "cpu":
        monkeypatch.setattr(triton_fused, "_INTERPRETING", False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            triton_fused.triton_cross_attention(q, small, small, 0.25, None, 0.1, 0.3, None, None, False)


def test_dispatcher_and_launcher_share_one_limit_rule(monkeypatch):
    """Shrinking limits.MAX_KEYS moves both refusals at once: neither keeps a copy of the limit."""
    monkeypatch.setattr(limits, "MAX_KEYS", 16)
    q = torch.randn(1, 20, 1, 16, device=DEVICE)
    fits, too_many = (torch.randn(1, n, 1, 16, device=DEVICE) for n in (16, 17))
    with pytest.raises(ValueError, match=r"Nk <= 16 .*Nk=17; use backend='torch'"):
        cross_attention(q, too_many, too_many, backend="triton")
    with pytest.raises(ValueError, match=r"Nk <= 16 .*Nk=17$"):
        triton_fused.triton_cross_attention(q, too_many, too_many, 0.25, None, 0.1, 0.3, None, None, False)
    torch.testing.assert_close(
        cross_attention(q, fits, fits, backend="triton"), cross_attention(q, fits, fits, backend="torch")
    )


def test_gpu_check_dry_run(tmp_path):
    """bench/gpu_check.py runs end to end on tiny shapes (so the GPU run has no typos)."""
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    results = gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    assert results["correctness"] and all(row["ok"] for row in results["correctness"])
    assert (tmp_path / "results.json").is_file() and (tmp_path / "results.md").is_file()


# ----------------------------------------------------------------------------- GPU compilation
# The interpreter cannot show what the GPU compiler does with the kernels. Triton's compiler and
# its bundled ptxas run without a GPU, so the launches below are compiled for sm_90 (H100/H200)
# exactly as a launch would specialise them, and the register report is checked for spills.

AOT_CASES = [
    # (B, Nq, H, D, Nk, dtype, spike rows and stats)
    (3, 4096, 8, 40, 77, "float16", True),  # SD 1.5 64x64, GUARD batch
    (3, 256, 8, 160, 77, "bfloat16", False),  # SD 1.5 16x16, plain rows
    (2, 1024, 10, 64, 231, "float16", True),  # three 77-token chunks
]


def _aot_report(cases):
    """Compile the launches of each case for sm_90 (no GPU needed); return their resource usage."""
    import re
    import subprocess

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32"}
    types.update({torch.int8: "i8", torch.uint8: "u8"})
    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    calls = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.fn, args, kwargs))

    def specialise(fn, args, kwargs):
        """The signature, constants and divisibility hints Triton's JIT derives from the arguments."""
        options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages")}
        signature, constants, attrs = {}, dict(kwargs), {}
        for index, (name, value) in enumerate(zip(fn.arg_names, args)):
            if isinstance(value, torch.Tensor):
                signature[name] = "*" + types[value.dtype]
                aligned = value.data_ptr() % 16 == 0
            elif isinstance(value, float):
                signature[name], aligned = "fp32", False
            elif fn.params[index].do_not_specialize:
                signature[name], aligned = "i32", False
            elif value == 1:
                signature[name], constants[name], aligned = "constexpr", 1, False
            else:
                signature[name], aligned = "i32", value % 16 == 0
            if aligned:
                attrs[(index,)] = [["tt.divisibility", 16]]
        signature.update({name: "constexpr" for name in kwargs})
        return ASTSource(fn, signature, constexprs=constants, attrs=attrs), options

    real = triton_fused._spike_peaks_kernel, triton_fused._attention_kernel
    triton_fused._spike_peaks_kernel, triton_fused._attention_kernel = (Recorder(fn) for fn in real)
    triton_fused._check_launchable = lambda *tensors: None
    report = []
    for batch, nq, heads, dim, nk, dtype, guard in cases:
        dtype = getattr(torch, dtype)
        q = torch.zeros(batch, nq, heads * dim, dtype=dtype).view(batch, nq, heads, dim)
        kv = torch.zeros(batch, nk, 2 * heads * dim, dtype=dtype)
        k, v = kv[..., : heads * dim].view(batch, nk, heads, dim), kv[..., heads * dim :].view(batch, nk, heads, dim)
        rows = torch.arange(batch) % 3 == 1 if guard else None
        calls.clear()
        triton_fused.triton_cross_attention(q, k, v, dim**-0.5, rows, 0.1, 0.3, None, None, guard)
        for fn, args, kwargs in list(calls):
            source, options = specialise(fn, args, dict(kwargs))
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
            with tempfile.TemporaryDirectory() as folder:
                cubin = pathlib.Path(folder) / "kernel.cubin"
                cubin.write_bytes(compiled.asm["cubin"])
                usage = subprocess.run(
                    [str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True, text=True
                )
            registers, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage.stdout).groups())
            ptx = compiled.asm["ptx"]
            report.append(
                dict(
                    case=[batch, nq, heads, dim, nk, str(dtype), guard],
                    kernel=fn.__name__,
                    registers=registers,
                    stack=stack,
                    tensor_cores="wgmma" in ptx or "mma.sync" in ptx,
                    scalar_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.(?:b16|u16)\s", ptx)),
                    nan_max=len(re.findall(r"max\.NaN\.f32", ptx)),
                )
            )
    triton_fused._spike_peaks_kernel, triton_fused._attention_kernel = real
    return report


def test_kernels_compile_for_hopper_without_spills():
    """sm_90 compilation of real launches: no register spills, tensor cores, vectorised loads."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [sys.executable, __file__, "aot-report"], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report) == 5  # two launches for each GUARD case, one for the plain case
    for entry in report:
        assert entry["stack"] == 0, f"register spills: {entry}"
        assert entry["tensor_cores"], f"no tensor-core dot: {entry}"
        assert entry["scalar_loads"] == 0, f"unvectorised 16-bit loads: {entry}"
        # Statistics and spike peaks reduce with a NaN-propagating max; the plain path has none.
        assert (entry["nan_max"] > 0) == entry["case"][-1], f"NaN-propagating max: {entry}"


if __name__ == "__main__" and sys.argv[1:] == ["aot-report"]:
    print(json.dumps(_aot_report(AOT_CASES)))
