"""guard_kernels.cross_attention under torch.compile: one custom op, no graph break, no recompilation.

The computation is the custom op ``guard_kernels::cross_attention`` (``..._stats`` with statistics,
in guard_kernels.api); the argument checks before it are traced by dynamo. Inputs are tiny: the
Triton cases run in the interpreter (a few programs per launch) on the CPU.
"""

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from guard_kernels import api, cross_attention, triton_fused

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OP_NAMES = ("cross_attention", "cross_attention_stats")

pytestmark = pytest.mark.skipif(not api.HAS_CUSTOM_OPS, reason="torch.library.custom_op needs torch >= 2.4")


def inputs(seed=0, batch=2, nq=20, heads=2, nk=7, dim=16, dtype=torch.float32):
    """q as a strided view (a slice of a wider projection), clear spikes on key 2, token tensors (B, Nk)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, nq, 2 * heads, dim, generator=gen)[:, :, :heads]
    k = torch.randn(batch, nk, heads, dim, generator=gen)
    k[:, 2] *= 3.0
    v = torch.randn(batch, nk, heads, dim, generator=gen)
    token_scale = 0.5 + torch.rand(batch, nk, generator=gen)
    token_bias = 0.1 * torch.randn(batch, heads, nk, generator=gen)
    token_bias[0, :, -1] = -math.inf  # a masked token
    q, k, v = (t.to(DEVICE, dtype) for t in (q, k, v))
    spike_rows = torch.tensor([True, False][:batch] + [True] * (batch - 2), device=DEVICE)
    return dict(
        q=q, k=k, v=v, spike_rows=spike_rows, token_scale=token_scale.to(DEVICE), token_bias=token_bias.to(DEVICE)
    )


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch: the functions below share one code object, hence one cache."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


OPTIONS = {
    "plain": dict(),
    "spike_rows": dict(spike_rows=True),
    "stats": dict(return_stats=True),
    "spike_rows-stats": dict(spike_rows=True, return_stats=True),
    "token_scale-token_bias": dict(token_scale=True, token_bias=True),
    "everything": dict(spike_rows=True, token_scale=True, token_bias=True, return_stats=True),
}


def make_fn(options, backend="auto", **settings):
    """A function of tensors only, calling cross_attention with the named options; returns a flat tuple."""

    def fn(q, k, v, spike_rows, token_scale, token_bias):
        result = cross_attention(
            q,
            k,
            v,
            spike_rows=spike_rows if options.get("spike_rows") else None,
            token_scale=token_scale if options.get("token_scale") else None,
            token_bias=token_bias if options.get("token_bias") else None,
            return_stats=options.get("return_stats", False),
            backend=backend,
            **settings,
        )
        return (result[0], *result[1]) if options.get("return_stats") else (result,)

    return fn


def assert_identical(got, want):
    """Bit-identical outputs (the op runs the same eager code whoever calls it), NaN/inf included."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def op(name):
    return getattr(torch.ops.guard_kernels, name).default


def op_targets(graphs):
    return [node.target for graph in graphs for node in graph.graph.nodes if node.op == "call_function"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_dynamo_traces_every_option_without_a_graph_break(name, backend):
    options = OPTIONS[name]
    explained = torch._dynamo.explain(make_fn(options, backend, spike_threshold=0.2, spike_scale=0.5))(**inputs())
    assert explained.graph_break_count == 0, [reason.reason for reason in explained.break_reasons]
    assert explained.graph_count == 1
    expected = op(OP_NAMES[1] if options.get("return_stats") else OP_NAMES[0])
    assert op_targets(explained.graphs).count(expected) == 1


@pytest.mark.parametrize(
    "compiler,name,dtype",
    [
        ("eager", "everything", "float32"),
        ("eager", "plain", "float64"),
        ("aot_eager", "everything", "float64"),
        ("aot_eager", "token_scale-token_bias", "float32"),
        ("inductor", "everything", "float32"),
        ("inductor", "spike_rows", "float64"),
    ],
)
def test_compiled_calls_match_eager_ones(compiler, name, dtype):
    """fullgraph=True: a graph break would be an error. Statistics compared too, dtypes included."""
    fn = make_fn(OPTIONS[name])
    dtype = getattr(torch, dtype)
    args = inputs(seed=1, dtype=dtype)
    got = torch.compile(fn, backend=compiler, fullgraph=True)(**args)
    want = fn(**args)
    assert_identical(got, want)
    if OPTIONS[name].get("return_stats"):
        assert got[1].dtype == got[2].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert got[3].dtype == torch.bool and got[3].shape == (2, 2, 7) and got[3][0].any()


def op_args(backend, dtype=torch.float32):
    """The ops' arguments as cross_attention normalises them: token tensors as expanded (B, H, Nk) views."""
    args = inputs(seed=2, dtype=dtype)
    batch, heads, nk = 2, 2, 7
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    token_scale = args["token_scale"].to(acc)[:, None].expand(batch, heads, nk)
    assert token_scale.stride(1) == 0
    token_bias = args["token_bias"].to(acc)
    return (args["q"], args["k"], args["v"], 0.25, args["spike_rows"], 0.1, 0.3, token_scale, token_bias, backend)


@pytest.mark.parametrize("name", OP_NAMES)
@pytest.mark.parametrize("backend,dtype", [("torch", "float32"), ("torch", "float64"), ("triton", "float32")])
def test_opcheck_schema_fake_tensor_and_autograd_registration(name, backend, dtype):
    """torch.library.opcheck: the schema, the fake implementation against the real one, AOT dispatch."""
    args = op_args(backend, getattr(torch, dtype))
    torch.library.opcheck(op(name), args)
    no_options = args[:4] + (None, 0.1, 0.3, None, None, backend)
    torch.library.opcheck(op(name), no_options)


def test_fake_shapes_dtypes_and_strides_equal_the_real_ones():
    """Each output of the fake implementations against the real op's, strides and device included."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for backend, dtype in (("torch", torch.float64), ("triton", torch.float32)):
        args = op_args(backend, dtype)
        real = api.cross_attention_stats_op(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
            fake = api.cross_attention_stats_op(*fake_args)
            fake_plain = api.cross_attention_op(*fake_args)
        for f, r in zip((*fake, fake_plain), (*real, real[0])):
            assert (f.shape, f.dtype, f.stride(), f.device) == (r.shape, r.dtype, r.stride(), r.device)


def test_op_schemas():
    """The schema is the ops' contract with compiled graphs: Optional tensors, floats and a str."""
    arguments = (
        "(Tensor q, Tensor k, Tensor v, float scale, Tensor? spike_rows, float spike_threshold, float spike_scale,"
        " Tensor? token_scale, Tensor? token_bias, str backend)"
    )
    assert str(op(OP_NAMES[0])._schema) == f"guard_kernels::cross_attention{arguments} -> Tensor"
    assert (
        str(op(OP_NAMES[1])._schema)
        == f"guard_kernels::cross_attention_stats{arguments} -> (Tensor, Tensor, Tensor, Tensor)"
    )


def test_the_ops_refuse_a_backend_the_api_did_not_resolve():
    args = op_args("auto")
    with pytest.raises(ValueError, match="backend must be 'torch' or 'triton'"):
        op(OP_NAMES[0])(*args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_recompilation_when_only_values_change(backend):
    """New q/k/v, spike rows, token tensors and their values: one compiled frame serves them all."""
    counter = CompileCounter()
    fn = make_fn(OPTIONS["everything"], backend)
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    for seed in range(3):
        args = inputs(seed=10 + seed)
        if seed == 2:
            args["spike_rows"] = ~args["spike_rows"]
        assert_identical(compiled(**args), fn(**args))
    assert counter.frame_count == 1


def test_changing_the_query_count_compiles_one_dynamic_graph():
    """After one recompile (dynamo marks Nq dynamic), every further Nq reuses it: the fake impl is symbolic."""
    counter = CompileCounter()
    fn = make_fn(OPTIONS["everything"])
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    for nq in (20, 33, 47, 64):
        args = inputs(seed=nq, nq=nq)
        assert_identical(compiled(**args), fn(**args))
    assert counter.frame_count == 2


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_grad_and_inference_mode(mode):
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    fn = make_fn(OPTIONS["everything"])
    args = inputs(seed=3)
    with context():
        got = torch.compile(fn, backend="aot_eager", fullgraph=True)(**args)
        want = fn(**args)
    assert_identical(got, want)
    assert not any(t.requires_grad for t in got)
    if mode == "inference_mode":
        assert all(t.is_inference() for t in got)


def test_the_ops_have_no_backward():
    """Forward works with inputs that require grad; backward raises (an inference kernel)."""
    args = inputs(seed=4)
    q = args.pop("q").detach().requires_grad_()
    out = cross_attention(q, args["k"], args["v"], spike_rows=args["spike_rows"])
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.sum().backward()


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_triton_path_inside_torch_compile(compiler, monkeypatch):
    """The launcher runs inside the op at run time (the interpreter on the CPU); the plain call allocates
    only its output, as the launcher does outside torch.compile."""
    allocated = []
    real_empty = torch.empty

    def counting_empty(*shape, **kwargs):
        allocated.append(real_empty(*shape, **kwargs))
        return allocated[-1]

    monkeypatch.setattr(triton_fused, "_empty", counting_empty)
    args = inputs(seed=5)
    for name in ("everything", "plain"):
        fn = make_fn(OPTIONS[name], "triton")
        compiled = torch.compile(fn, backend=compiler, fullgraph=True)
        compiled(**args)  # compiles (inductor traces the op's fake implementation only)
        allocated.clear()
        got = compiled(**args)
        if name == "plain":
            assert len(allocated) == 1 and allocated[0] is got[0]
        assert_identical(got, fn(**args))
        reference = make_fn(OPTIONS[name], "torch")(**args)
        for a, b in zip(got, reference):
            torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-5)
