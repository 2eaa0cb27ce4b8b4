"""guard_kernels.cross_attention: argument checking, dispatch, and the PyTorch path (guard_kernels.reference).

The PyTorch path is compared with the materialising float64 reference of guard_kernels.testing,
which shares no code with it (tests/test_kernels_testing.py checks that reference in turn).
"""

import math
import types

import numpy as np
import pytest
import torch

import guard_kernels
from guard_kernels import AttentionStats, api, cross_attention, limits
from guard_kernels.reference import torch_cross_attention
from guard_kernels.testing import error_budget, reference_attention, rel_err


def spiky_inputs(batch, nq, nk, heads, dim, dtype=torch.float32, seed=0, clear_margin=1e-3, threshold=0.1):
    """Random q/k/v with a few boosted keys; redrawn until no z-score sits near the threshold."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(100):
        q = torch.randn(batch, nq, heads, dim, generator=gen)
        k = torch.randn(batch, nk, heads, dim, generator=gen)
        if nk > 3:
            k[:, 2] *= 3.0  # a clear spike candidate
        v = torch.randn(batch, nk, heads, dim, generator=gen)
        q, k, v = (t.to(dtype) for t in (q, k, v))
        z = reference_attention(q, k, v).z
        if nk < 3 or (z[..., 1:] - threshold).abs().min() > clear_margin:
            return q, k, v
    raise RuntimeError("could not draw inputs away from the threshold")


@pytest.mark.parametrize(
    "batch,nq,nk,heads,dim",
    [(2, 100, 77, 2, 40), (3, 257, 154, 1, 64), (1, 33, 2, 2, 80), (2, 17, 1, 1, 160), (3, 64, 5, 2, 8)],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_path_matches_float64_reference(batch, nq, nk, heads, dim, dtype):
    q, k, v = spiky_inputs(batch, nq, nk, heads, dim, dtype, seed=nq + nk)
    spike_rows = torch.tensor([b % 2 == 1 for b in range(batch)])
    out, stats = cross_attention(q, k, v, spike_rows=spike_rows, return_stats=True, backend="torch")
    ref = reference_attention(q, k, v, spike_rows=spike_rows)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert out.dtype == dtype and out.shape == (batch, nq, heads, dim) and out.is_contiguous()
    torch.testing.assert_close(out.double(), ref.out, rtol=0, atol=tol)
    torch.testing.assert_close(stats.max_logit.double(), ref.max_logit, rtol=1e-5, atol=tol)
    assert rel_err(stats.mass, ref.mass) <= (1e-12 if dtype == torch.float64 else 1e-5)
    assert torch.equal(stats.spikes, ref.spikes)
    assert stats.max_logit.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if nk > 3:
        assert ref.spikes[1::2].any(), "the test inputs should contain spikes on spiked rows"


#: SDXL's cross-attention layers: head dim 64, 77 tokens, 10 heads at 64x64 latents (down_blocks.1)
#: and 20 heads at 32x32 (down_blocks.2, mid_block); GUARD's batch puts the attenuated branch in
#: the middle third.
SDXL_SHAPES = {"sdxl-h20-32x32": (3, 1024, 77, 20, 64), "sdxl-h10": (2, 512, 77, 10, 64)}


@pytest.mark.parametrize("shape", list(SDXL_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_path_on_sdxl_shapes_within_the_error_budget(shape, dtype, monkeypatch):
    """The PyTorch path on SDXL shapes, GUARD spike rows and statistics on, against the float64
    reference under guard_kernels.testing's error-budget rule; its output buffer is poisoned
    (NaN), in one chunk and in several, so a query it forgets to write fails."""
    batch, nq, nk, heads, dim = SDXL_SHAPES[shape]
    # Thousands of z-scores: a 1e-3 margin around the threshold is rarely clear of all of them; the
    # path's fp32 z-scores are far closer to the float64 ones than 1e-4.
    q, k, v = spiky_inputs(batch, nq, nk, heads, dim, dtype, seed=heads + nq, clear_margin=1e-4)
    rows = torch.tensor([b % 3 == 1 for b in range(batch)])
    ref = reference_attention(q, k, v, spike_rows=rows)
    yardstick = reference_attention(q, k, v, spike_rows=rows, dtype=dtype, spikes=ref.spikes)
    assert ref.spikes[1].any() and not ref.spikes[0].any()

    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        return real_empty(*args, **kwargs).fill_(math.nan)

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    out, stats = cross_attention(q, k, v, spike_rows=rows, return_stats=True, backend="torch")
    args = (dim**-0.5, rows, 0.1, 0.3, None, None, True)
    chunked, chunked_stats = torch_cross_attention(q, k, v, *args, chunk_elements=batch * heads * nk * 100)
    monkeypatch.undo()

    assert out.dtype == dtype and out.shape == (batch, nq, heads, dim) and torch.isfinite(out).all()
    budget = error_budget(out, ref.out, yardstick.out)
    assert budget.ok, budget
    assert torch.equal(stats.spikes, ref.spikes)
    assert rel_err(stats.max_logit, ref.max_logit) <= 1e-5 and rel_err(stats.mass, ref.mass) <= 1e-5
    assert torch.isfinite(chunked).all() and error_budget(chunked, ref.out, yardstick.out).ok
    assert torch.equal(chunked_stats.spikes, stats.spikes)
    torch.testing.assert_close(chunked_stats.mass, stats.mass, rtol=1e-5, atol=1e-4)


def test_float64_path_computes_everything_in_float64():
    """No step of the float64 path rounds through float32 (e.g. the spike factor 0.3)."""
    q, k, v = spiky_inputs(2, 64, 77, 2, 40, torch.float64, seed=11)
    q, k = 3 * q, 3 * k  # large logits: a float32-rounded factor would move them by ~1e-7
    kwargs = dict(spike_rows=torch.tensor([True, True]), spike_scale=0.3, token_scale=0.5 + torch.rand(2, 77))
    out, stats = cross_attention(q, k, v, return_stats=True, backend="torch", **kwargs)
    ref = reference_attention(q, k, v, **kwargs)
    assert ref.spikes.any() and out.dtype == stats.mass.dtype == stats.max_logit.dtype == torch.float64
    assert torch.equal(stats.spikes, ref.spikes)
    for got, want in ((out, ref.out), (stats.mass, ref.mass), (stats.max_logit, ref.max_logit)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_token_scale_and_bias_masking_including_a_fully_masked_row():
    q, k, v = spiky_inputs(3, 50, 77, 2, 40, torch.float64, seed=3)
    token_scale = 0.5 + torch.rand(3, 2, 77, dtype=torch.float64)
    token_bias = torch.zeros(3, 77, dtype=torch.float64)
    token_bias[0, 10:] = float("-inf")  # Ren et al.: mask tokens after EOS
    token_bias[2, :] = float("-inf")  # every token masked -> zeros
    spike_rows = torch.tensor([True, True, False])
    out, stats = cross_attention(
        q,
        k,
        v,
        spike_rows=spike_rows,
        token_scale=token_scale,
        token_bias=token_bias,
        return_stats=True,
        backend="torch",
    )
    ref = reference_attention(q, k, v, spike_rows=spike_rows, token_scale=token_scale, token_bias=token_bias)
    assert torch.isfinite(out).all()
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    torch.testing.assert_close(out, ref.out, rtol=0, atol=1e-12)
    torch.testing.assert_close(stats.mass, ref.mass, rtol=0, atol=1e-12)
    assert stats.mass[0, :, 10:].abs().max() == 0
    assert torch.equal(stats.spikes, ref.spikes)


@pytest.mark.parametrize("with_bias", [False, True])
def test_torch_path_non_finite_rules_do_not_depend_on_token_bias(with_bias):
    """A NaN query gives NaN, a query whose keys are all -inf gives zeros, with or without token_bias."""
    q, k, v = spiky_inputs(3, 40, 9, 2, 8, torch.float64, seed=12)
    q[0, 3, 1, 0] = math.nan  # query 3 of (row 0, head 1)
    q[1, :, 0, 0] = q[1, :, 0, 0].abs() + 0.1
    k[1, :, 0, 0] = -math.inf  # every logit of (row 1, head 0) is -inf: fully masked without any bias
    v[2, 4, 1, 6] = math.nan  # channel 6 of (row 2, head 1)
    token_bias = torch.zeros(3, 9, dtype=torch.float64) if with_bias else None
    rows = torch.tensor([True, True, True])
    kwargs = dict(spike_rows=rows, token_bias=token_bias, return_stats=True, backend="torch")
    out, stats = cross_attention(q, k, v, **kwargs)
    ref = reference_attention(q, k, v, spike_rows=rows, token_bias=token_bias)
    for got, want in zip((out, *stats), ref):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, equal_nan=True)
    args = (8**-0.5, rows, 0.1, 0.3, None, None if token_bias is None else token_bias[:, None].expand(3, 2, 9), True)
    chunked, chunked_stats = torch_cross_attention(q, k, v, *args, chunk_elements=2 * 3 * 9 * 7)
    for got, want in zip((chunked, *chunked_stats), (out, *stats)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, equal_nan=True)

    assert torch.isnan(out[0, 3, 1]).all() and torch.isfinite(out[0, :3, 1]).all()
    assert torch.isnan(stats.max_logit[0, 1]).all() and not stats.spikes[0, 1].any() and stats.spikes[0, 0].any()
    assert torch.isnan(stats.mass[0, 1]).all() and torch.isfinite(stats.mass[0, 0]).all()
    assert torch.equal(out[1, :, 0], torch.zeros_like(out[1, :, 0])) and not stats.mass[1, 0].any()
    assert torch.isnan(out[2, :, 1, 6]).all() and torch.isfinite(out[2, :, 1, :6]).all()


def test_strided_views_of_projection_outputs():
    batch, n, heads, dim, nk = 2, 40, 3, 40, 77
    qkv = torch.randn(batch, n, 3 * heads * dim, dtype=torch.float64)
    q = qkv[..., : heads * dim].view(batch, n, heads, dim)
    kv = torch.randn(batch, nk, 2 * heads * dim, dtype=torch.float64)
    k = kv[..., : heads * dim].view(batch, nk, heads, dim)
    v = kv[..., heads * dim :].view(batch, nk, heads, dim)
    assert not q.is_contiguous()
    out = cross_attention(q, k, v, spike_rows=torch.tensor([True, False]))
    torch.testing.assert_close(out, reference_attention(q, k, v, spike_rows=torch.tensor([True, False])).out)


def test_small_chunks_give_the_same_result():
    q, k, v = spiky_inputs(2, 130, 77, 2, 40, torch.float64, seed=9)
    rows = torch.tensor([True, False])
    args = (1 / math.sqrt(40), rows, 0.1, 0.3, None, None, True)
    full, full_stats = torch_cross_attention(q, k, v, *args)
    chunked, chunked_stats = torch_cross_attention(q, k, v, *args, chunk_elements=77 * 4 * 7)
    torch.testing.assert_close(full, chunked, rtol=0, atol=1e-12)
    for a, b in zip(full_stats, chunked_stats):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_return_stats_off_gives_the_same_output_and_alpha_one_is_plain_attention():
    q, k, v = spiky_inputs(2, 30, 77, 2, 64, torch.float64, seed=4)
    rows = torch.tensor([True, True])
    with_stats, stats = cross_attention(q, k, v, spike_rows=rows, return_stats=True)
    assert isinstance(stats, AttentionStats)
    assert torch.equal(with_stats, cross_attention(q, k, v, spike_rows=rows))
    plain = cross_attention(q, k, v, spike_rows=rows, spike_scale=1.0)
    torch.testing.assert_close(plain, reference_attention(q, k, v).out, rtol=0, atol=1e-12)


def _qkv(batch=2, nq=8, nk=5, heads=2, dim=16, dtype=torch.float32):
    return (
        torch.randn(batch, nq, heads, dim, dtype=dtype),
        torch.randn(batch, nk, heads, dim, dtype=dtype),
        torch.randn(batch, nk, heads, dim, dtype=dtype),
    )


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, r"q must have shape \(B, Nq, H, D\)"),
        (lambda q, k, v: (q, k[:1], v[:1]), ValueError, "does not match q shape"),
        (lambda q, k, v: (q, k[:, :, :1], v[:, :, :1]), ValueError, "does not match q shape"),
        (lambda q, k, v: (q, k, v[:, :4]), ValueError, "k and v must have the same shape"),
        (lambda q, k, v: (q, k[..., :8], v[..., :8]), ValueError, "does not match"),
        (lambda q, k, v: (q.half(), k, v), TypeError, "share one dtype"),
        (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, "supported: float16"),
        (lambda q, k, v: (q.transpose(2, 3), k, v), ValueError, "unit stride"),
        (lambda q, k, v: ("q", k, v), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_bad_tensors_raise_clear_errors(mutate, error, match):
    q, k, v = mutate(*_qkv())
    with pytest.raises(error, match=match):
        cross_attention(q, k, v)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"spike_rows": torch.ones(3, dtype=torch.bool)}, ValueError, r"spike_rows must have shape \(B,\)=\(2,\)"),
        ({"spike_rows": torch.ones(2)}, TypeError, "spike_rows must be a bool tensor"),
        ({"spike_rows": [True, False]}, TypeError, "spike_rows must be None or a bool tensor"),
        ({"token_scale": torch.ones(2, 4)}, ValueError, r"token_scale must have shape \(B, Nk\)"),
        ({"token_bias": torch.ones(2, 3, 5)}, ValueError, r"token_bias must have shape"),
        ({"token_bias": torch.ones(2, 5, dtype=torch.long)}, TypeError, "floating-point"),
        ({"backend": "cuda"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        cross_attention(*_qkv(), **kwargs)


SCALARS_ACCEPTED = [
    ("scale", np.float32(0.2)),
    ("scale", np.int64(1)),
    ("scale", torch.tensor(0.125)),
    ("spike_threshold", np.float32(0.3)),
    ("spike_threshold", np.int64(0)),
    ("spike_threshold", torch.tensor(0.3)),
    ("spike_threshold", -0.1),  # a z-score: below the mean is meaningful
    ("spike_scale", np.float32(0.3)),
    ("spike_scale", np.int64(1)),
    ("spike_scale", torch.tensor(0.3)),
    ("spike_scale", 0),  # removes spike tokens entirely
]


@pytest.mark.parametrize("name,value", SCALARS_ACCEPTED, ids=[f"{n}={v!r}" for n, v in SCALARS_ACCEPTED])
def test_numpy_and_torch_scalars_act_as_their_float(name, value):
    q, k, v = spiky_inputs(2, 20, 9, 2, 16, torch.float64, seed=5)
    rows = torch.tensor([True, False])
    out, stats = cross_attention(q, k, v, spike_rows=rows, return_stats=True, **{name: value})
    want, want_stats = cross_attention(q, k, v, spike_rows=rows, return_stats=True, **{name: float(value)})
    assert torch.equal(out, want) and all(map(torch.equal, stats, want_stats))


SCALARS_REFUSED = [
    (name, value, error, f"^{name} must be {message}")
    for name in ("scale", "spike_threshold", "spike_scale")
    for value, error, message in [
        (True, TypeError, "a real number, got True$"),
        ("0.3", TypeError, "a real number, got '0.3'$"),
        (torch.tensor([0.3]), TypeError, "a real number, got a torch.float32 tensor of shape"),
        (math.nan, ValueError, "finite, got nan$"),
        (math.inf, ValueError, "finite, got inf$"),
        (np.float32("-inf"), ValueError, "finite, got -inf$"),
    ]
] + [
    ("spike_scale", -0.1, ValueError, r"^spike_scale must be >= 0, got -0.1$"),  # as guard.GuardConfig
    ("scale", -0.1, ValueError, r"^scale must be > 0, got -0.1$"),
    ("scale", 0, ValueError, r"^scale must be > 0, got 0$"),
]


@pytest.mark.parametrize(
    "name,value,error,match", SCALARS_REFUSED, ids=[f"{n}={v!r}" for n, v, _, _ in SCALARS_REFUSED]
)
def test_bad_scalars_raise_one_line_errors(name, value, error, match):
    with pytest.raises(error, match=match):
        cross_attention(*_qkv(), **{name: value})


@pytest.mark.parametrize("value", [1, 0, None, "yes", np.bool_(True), torch.tensor(True)], ids=repr)
def test_return_stats_must_be_a_bool(value):
    with pytest.raises(TypeError, match=r"^return_stats must be a bool, got "):
        cross_attention(*_qkv(), return_stats=value)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        cross_attention(*_qkv(), backend="triton")


def test_float64_is_rejected_by_triton_but_auto_falls_back():
    q, k, v = _qkv(dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='triton' supports"):
        cross_attention(q, k, v, backend="triton")
    assert cross_attention(q, k, v).dtype == torch.float64


def test_tile_limits_are_one_rule():
    assert limits.tile_limit_error(limits.MAX_HEAD_DIM, limits.MAX_KEYS) is None
    assert "D=257" in limits.tile_limit_error(limits.MAX_HEAD_DIM + 1, 77)
    assert "Nk=257" in limits.tile_limit_error(64, limits.MAX_KEYS + 1)


@pytest.mark.parametrize("head_dim,num_keys,expected", [(64, 77, "triton"), (257, 77, "torch"), (64, 257, "torch")])
def test_auto_backend_falls_back_beyond_the_tile_and_triton_refuses(monkeypatch, head_dim, num_keys, expected):
    """On a CUDA half-precision input, auto picks Triton exactly when the tile rule allows it."""
    monkeypatch.setattr(api, "triton_available", lambda: True)
    cuda_q = types.SimpleNamespace(is_cuda=True, dtype=torch.float16, shape=(1, 8, 1, head_dim))
    assert api._resolve_backend("auto", cuda_q, num_keys) == expected
    if expected == "torch":
        with pytest.raises(ValueError, match="use backend='torch'"):
            api._resolve_backend("triton", cuda_q, num_keys)
    else:
        assert api._resolve_backend("triton", cuda_q, num_keys) == "triton"


def test_public_names():
    assert guard_kernels.cross_attention is cross_attention
    assert AttentionStats._fields == ("max_logit", "mass", "spikes")
