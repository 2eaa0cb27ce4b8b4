"""Cross-attention benchmarks: the fused GUARD kernel against SDPA and the materialising path.

Shapes are the cross-attention layers of SD 1.5, SD 2 and SDXL (text length 77) at batch 2 and 3.
Providers:
  fused_off    guard_kernels.cross_attention, Triton, no statistics, no spike rule
  fused_guard  the same with return_stats=True and the spike rule on 1/3 of the rows (GUARD's batch)
  sdpa         torch.nn.functional.scaled_dot_product_attention (flash/efficient kernels, no stats)
  naive        the eager path other implementations run: logits materialised, per-token peaks,
               z-score, attenuation, softmax, mass, P V, all in torch at the inputs' dtype
               (guard_kernels.testing.reference_attention, the tests' reference)
  torch_guard  guard_kernels.cross_attention's PyTorch path (chunked, the CPU fallback) with
               statistics and the spike rule, as fused_guard

Run:
  pytest bench/bench_kernels.py                          # GPU: every shape, fp16
  pytest bench/bench_kernels.py                          # CPU: SD 1.5 batch 3, fp32, torch providers
  GUARD_BENCH_ALL=1 pytest bench/bench_kernels.py        # every shape on the CPU too
  pytest bench/bench_kernels.py --benchmark-disable      # smoke run (each provider once)
  pytest bench/bench_kernels.py --benchmark-json=out.json && python bench/bench_kernels.py out.json
                                                         # markdown table with GB/s and speedups
The Triton providers skip without CUDA. Each result's extra_info records the minimal bytes moved
(Q + K + V + O + statistics), the achieved GB/s against them and the peak extra device memory
(CUDA only; None on the CPU).
"""

import json
import os
import sys
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guard_kernels import cross_attention  # noqa: E402
from guard_kernels.testing import reference_attention  # noqa: E402

TEXT_TOKENS = 77
SPIKE_THRESHOLD, SPIKE_SCALE = 0.1, 0.3
CUDA = torch.cuda.is_available()


class LayerShape(NamedTuple):
    """One cross-attention layer: queries are latent pixels, keys the text tokens."""

    model: str
    layer: str
    num_queries: int
    heads: int
    head_dim: int
    num_keys: int = TEXT_TOKENS

    @property
    def name(self) -> str:
        return f"{self.model}-{self.layer}"


PRESET_SHAPES = [
    LayerShape("sd15", "64x64", 4096, 8, 40),
    LayerShape("sd15", "32x32", 1024, 8, 80),
    LayerShape("sd15", "16x16", 256, 8, 160),
    LayerShape("sd15", "8x8", 64, 8, 160),
    LayerShape("sd2", "64x64", 4096, 5, 64),
    LayerShape("sd2", "32x32", 1024, 10, 64),
    LayerShape("sd2", "16x16", 256, 20, 64),
    LayerShape("sd2", "8x8", 64, 20, 64),
    LayerShape("sdxl", "64x64", 4096, 10, 64),
    LayerShape("sdxl", "32x32", 1024, 20, 64),
]
SHAPES_BY_NAME = {shape.name: shape for shape in PRESET_SHAPES}

#: The 16 cross-attention layers of the SD 1.5 UNet, in execution order (down, mid, up).
SD15_UNET_LAYERS = (
    ["sd15-64x64"] * 2 + ["sd15-32x32"] * 2 + ["sd15-16x16"] * 2 + ["sd15-8x8"]
    + ["sd15-16x16"] * 3 + ["sd15-32x32"] * 3 + ["sd15-64x64"] * 3
)  # fmt: skip
#: GUARD's default attenuated layers (down_blocks.0-2 and mid_block): the first seven above.
SD15_GUARD_LAYERS = 7

PROVIDERS = ("fused_off", "fused_guard", "sdpa", "naive", "torch_guard")
TRITON_PROVIDERS = ("fused_off", "fused_guard")
STATS_PROVIDERS = ("fused_guard", "naive", "torch_guard")


class Inputs(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    spike_rows: torch.Tensor


def make_inputs(shape: LayerShape, batch: int, dtype: torch.dtype, device, seed: int = 0) -> Inputs:
    """q, k, v as free (B, N, H, D) views of (B, N, H*D) projection outputs, like diffusers' to_q/k/v."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    width = shape.heads * shape.head_dim

    def projection(tokens: int) -> torch.Tensor:
        x = torch.randn(batch, tokens, width, generator=gen).to(device=device, dtype=dtype)
        return x.view(batch, tokens, shape.heads, shape.head_dim)

    q, k, v = projection(shape.num_queries), projection(shape.num_keys), projection(shape.num_keys)
    spike_rows = (torch.arange(batch) % 3 == 1).to(device)  # GUARD batch: [uncond, attenuated, plain]
    return Inputs(q, k, v, spike_rows)


def provider_fn(provider: str, inputs: Inputs) -> Callable[[], object]:
    q, k, v, spike_rows = inputs
    if provider == "fused_off":
        return lambda: cross_attention(q, k, v, backend="triton")
    if provider == "fused_guard":
        return lambda: cross_attention(
            q, k, v, spike_rows=spike_rows, spike_threshold=SPIKE_THRESHOLD, spike_scale=SPIKE_SCALE,
            return_stats=True, backend="triton",
        )  # fmt: skip
    if provider == "sdpa":
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
    if provider == "naive":
        return lambda: reference_attention(
            q, k, v, spike_rows=spike_rows, spike_threshold=SPIKE_THRESHOLD, spike_scale=SPIKE_SCALE, dtype=q.dtype
        )
    if provider == "torch_guard":
        return lambda: cross_attention(
            q, k, v, spike_rows=spike_rows, spike_threshold=SPIKE_THRESHOLD, spike_scale=SPIKE_SCALE,
            return_stats=True, backend="torch",
        )  # fmt: skip
    raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")


def minimal_bytes(shape: LayerShape, batch: int, dtype: torch.dtype, with_stats: bool) -> int:
    """Bytes any implementation must move: read Q, K, V, write O (and the (B, H, Nk) statistics)."""
    item = torch.empty((), dtype=dtype).element_size()
    width = shape.heads * shape.head_dim
    qo = 2 * batch * shape.num_queries * width * item
    kv = 2 * batch * shape.num_keys * width * item
    stats = batch * shape.heads * shape.num_keys * (4 + 4 + 1) if with_stats else 0
    return qo + kv + stats


def peak_extra_memory(fn: Callable[[], object]) -> Optional[int]:
    """Device memory a call allocates beyond what is already held (CUDA); None on the CPU."""
    if not CUDA:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    del result
    return torch.cuda.max_memory_allocated() - before


def bench_cases():
    """(shape, batch) pairs: every preset on a GPU; on the CPU SD 1.5 at batch 3 unless GUARD_BENCH_ALL=1."""
    everything = CUDA or os.environ.get("GUARD_BENCH_ALL", "0") not in ("", "0")
    for shape in PRESET_SHAPES:
        for batch in (2, 3):
            if everything or (shape.model == "sd15" and batch == 3):
                yield shape, batch


def summarize(json_path: str) -> str:
    """Markdown table (median, GB/s, speedups) from a pytest-benchmark JSON file."""
    data = json.loads(Path(json_path).read_text())
    table: Dict[str, Dict[str, dict]] = {}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        table.setdefault(info["case"], {})[info["provider"]] = dict(median=bench["stats"]["median"], **info)
    lines = [
        "| case | provider | median (us) | GB/s (minimal bytes) | speedup over sdpa | speedup over naive"
        " | peak extra MB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for case, rows in table.items():
        for provider in PROVIDERS:
            if provider not in rows:
                continue
            row = rows[provider]
            ratio = lambda other, rows=rows, row=row, provider=provider: (
                f"{rows[other]['median'] / row['median']:.2f}x" if other in rows and other != provider else ""
            )
            memory = row.get("peak_extra_bytes")
            lines.append(
                f"| {case} | {provider} | {row['median'] * 1e6:.1f} | {row['bytes'] / row['median'] / 1e9:.1f} |"
                f" {ratio('sdpa')} | {ratio('naive')} | {'' if memory is None else f'{memory / 2**20:.1f}'} |"
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- pytest-benchmark

try:
    import pytest
except ImportError:  # summarising needs no pytest
    pytest = None

if pytest is not None:
    DTYPE = torch.float16 if CUDA else torch.float32
    DEVICE = "cuda" if CUDA else "cpu"
    CASES = list(bench_cases())

    @pytest.mark.parametrize("provider", PROVIDERS)
    @pytest.mark.parametrize("shape,batch", CASES, ids=[f"{s.name}-b{b}" for s, b in CASES])
    def test_cross_attention(benchmark, shape, batch, provider):
        if provider in TRITON_PROVIDERS and not CUDA:
            pytest.skip("the Triton providers need a CUDA device (the interpreter is no benchmark)")
        inputs = make_inputs(shape, batch, DTYPE, DEVICE)
        fn = provider_fn(provider, inputs)
        if CUDA:
            run = fn

            def fn():
                result = run()
                torch.cuda.synchronize()
                return result

        fn()  # compile / warm up outside the timing
        case = f"{shape.name}-b{batch}-{str(DTYPE).replace('torch.', '')}"
        benchmark.group = case
        with_stats = provider in STATS_PROVIDERS
        benchmark.extra_info.update(
            case=case,
            provider=provider,
            device=torch.cuda.get_device_name() if CUDA else "cpu",
            bytes=minimal_bytes(shape, batch, DTYPE, with_stats),
            peak_extra_bytes=peak_extra_memory(fn),
        )
        benchmark(fn)
        median = benchmark.stats.stats.median if benchmark.stats else None  # None under --benchmark-disable
        benchmark.extra_info["gb_per_s"] = None if not median else benchmark.extra_info["bytes"] / median / 1e9


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(
            "usage: python bench/bench_kernels.py RESULTS.json  (a pytest-benchmark --benchmark-json file)"
        )
    print(summarize(sys.argv[1]))
