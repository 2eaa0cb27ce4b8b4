"""One run on a GPU: correctness of the fused kernel, its benchmark, and the SD 1.5 UNet total.

    python bench/gpu_check.py [--out DIR]      # H100/H200: about 2-4 minutes
    python bench/gpu_check.py --dry-run        # CPU: tiny shapes through the Triton interpreter

Stages (each writes DIR/results.json and DIR/results.md as it finishes, so a run cut short still
leaves what it measured; DIR defaults to $OUT if set, else ./gpu_results):
1. correctness: every preset layer shape at batch 3, fp16 and bf16, with and without GUARD spike
   rows, statistics on, against guard_kernels.testing's float64 materialising reference (its error
   budget: max error <= 2x the same computation in torch at that dtype + 1e-5; fp16 relative error
   <= 2e-3; statistics relative error <= 1e-4; spike masks equal except where the reference
   z-score is within 1e-3 of the threshold), plus token_scale/token_bias, 231-key and fp32
   cases; repeated calls must be bit-identical.
2. benchmark: fused (stats off), fused (GUARD: stats + spike rule on 1/3 of the rows), torch
   SDPA, the naive materialising path and the PyTorch fallback, every preset at batch 2 and 3
   (fp16), timed with triton.testing.do_bench (median).
3. launch configurations: a few block sizes on two layers, to check the heuristic table.
4. unet16: the 16 SD 1.5 cross-attention layers at batch 3 (fp16) back to back, plain and with
   GUARD on the 7 attenuated layers, against the HBM floor (minimal bytes / bandwidth).
"""

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR))

#: Nominal HBM bandwidth (bytes/s) of the cards this runs on; the measured copy rate is reported too.
NOMINAL_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}
#: GPU targets of the fused kernel on SD 1.5's 64x64 layer, batch 3, fp16.
TARGETS = dict(guard_over_sdpa=1.35, off_over_sdpa=1.15, naive_over_guard=5.0, unet16_over_floor=2.0)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="results folder (default: $OUT, else ./gpu_results)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes; runs on the CPU through the interpreter")
    parser.add_argument("--budget-s", type=float, default=300.0, help="skip stages that would start after this")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.dry_run:
            raise SystemExit("no CUDA device: run with --dry-run to exercise the script on the CPU")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before guard_kernels.triton_fused is imported
    import bench_kernels as bk
    import triton

    out_dir = Path(args.out or os.environ.get("OUT") or "gpu_results")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if cuda else "cpu"
    started = time.perf_counter()
    results = dict(
        meta=dict(
            device=torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)",
            torch=torch.__version__,
            triton=triton.__version__,
            cuda=torch.version.cuda,
            python=sys.version.split()[0],
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            dry_run=args.dry_run,
        ),
        correctness=[],
        benchmark=[],
        configs=[],
        unet16={},
        errors=[],
    )
    if args.dry_run:
        shapes = [bk.LayerShape("tiny", "a", 48, 1, 80, 20)]  # two D chunks, two query blocks
        unet_layers = ["tiny-a", "tiny-a"]
        guard_layers, batches, reps = 1, (3,), 1
    else:
        shapes, unet_layers = bk.PRESET_SHAPES, bk.SD15_UNET_LAYERS
        guard_layers, batches, reps = bk.SD15_GUARD_LAYERS, (2, 3), None
    by_name = {shape.name: shape for shape in shapes}
    timer = Timer(cuda, reps)

    stages = [
        ("correctness", lambda: stage_correctness(bk, shapes, device, results["correctness"], args.dry_run)),
        ("benchmark", lambda: stage_benchmark(bk, shapes, batches, device, timer, results["benchmark"])),
        ("configs", lambda: stage_configs(bk, shapes, device, timer, results["configs"], args.dry_run)),
        (
            "unet16",
            lambda: results["unet16"].update(stage_unet16(bk, by_name, unet_layers, guard_layers, device, timer)),
        ),
    ]
    for name, stage in stages:
        elapsed = time.perf_counter() - started
        if elapsed > args.budget_s:
            results["errors"].append(f"{name}: skipped, {elapsed:.0f} s spent of the {args.budget_s:.0f} s budget")
            continue
        print(f"== {name} (t={elapsed:.0f} s)", flush=True)
        try:
            stage()
        except Exception:  # keep the other stages' results
            results["errors"].append(f"{name}: {traceback.format_exc()}")
            print(results["errors"][-1], flush=True)
        results["meta"]["elapsed_s"] = round(time.perf_counter() - started, 1)
        write_results(results, out_dir)
    print(render_markdown(results), flush=True)
    print(f"results written to {out_dir.resolve()}", flush=True)
    return results


# ----------------------------------------------------------------------------- timing


class Timer:
    """Median seconds per call: triton.testing.do_bench on a GPU, wall clock when interpreting."""

    def __init__(self, cuda: bool, reps=None):
        self.cuda, self.reps = cuda, reps

    def __call__(self, fn) -> float:
        if self.cuda:
            from triton.testing import do_bench

            return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
        times = []
        for _ in range(self.reps or 3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]


def measured_copy_bandwidth(device) -> float:
    """Bytes/s (read + write) of a large device-to-device copy: the achievable HBM rate."""
    if device != "cuda":
        return float("nan")
    from triton.testing import do_bench

    src = torch.empty(1 << 28, dtype=torch.uint8, device=device)  # 256 MiB, far beyond L2
    dst = torch.empty_like(src)
    seconds = do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median") * 1e-3
    return 2 * src.numel() / seconds


# ----------------------------------------------------------------------------- stage 1: correctness


def check_case(bk, shape, batch, dtype, device, guard, seed, token_mods=False):
    from guard_kernels import cross_attention
    from guard_kernels.testing import error_budget, reference_attention, rel_err

    inputs = bk.make_inputs(shape, batch, dtype, device, seed=seed)
    q, k, v, rows = inputs
    rows = rows if guard else None
    token_scale = token_bias = None
    if token_mods:  # Ren et al.-style: mask the tail tokens, rescale the rest
        gen = torch.Generator().manual_seed(seed)
        token_scale = (0.5 + torch.rand(batch, shape.num_keys, generator=gen)).to(device)
        token_bias = torch.zeros(batch, shape.num_keys)
        token_bias[:, shape.num_keys // 2 :] = float("-inf")
        token_bias = token_bias.to(device)
    mods = dict(spike_rows=rows, spike_threshold=bk.SPIKE_THRESHOLD, spike_scale=bk.SPIKE_SCALE)
    mods.update(token_scale=token_scale, token_bias=token_bias)
    out, stats = cross_attention(q, k, v, return_stats=True, backend="triton", **mods)
    out_again, stats_again = cross_attention(q, k, v, return_stats=True, backend="triton", **mods)
    out_plain = cross_attention(q, k, v, return_stats=False, backend="triton", **mods)

    ref = reference_attention(q, k, v, **mods)
    yardstick = reference_attention(q, k, v, **mods, dtype=dtype, spikes=ref.spikes)
    budget = error_budget(out, ref.out, yardstick.out)
    on_rows = torch.zeros(batch, dtype=torch.bool, device=device) if rows is None else rows
    near_threshold = ((ref.z - bk.SPIKE_THRESHOLD).abs() < 1e-3) & on_rows.view(batch, 1, 1)
    spike_mismatch = int(((stats.spikes != ref.spikes) & ~near_threshold).sum())
    row = dict(
        case=f"{shape.name}-b{batch}-{str(dtype).replace('torch.', '')}{'-guard' if guard else ''}"
        f"{'-tokenmods' if token_mods else ''}",
        out_err=budget.error,
        torch_err=budget.yardstick_error,
        out_rel=rel_err(out, ref.out),
        max_logit_rel=rel_err(stats.max_logit, ref.max_logit),
        mass_rel=rel_err(stats.mass, ref.mass),
        spikes=int(ref.spikes.sum()),
        spike_mismatch=spike_mismatch,
        spikes_near_threshold=int(near_threshold.sum()),
        deterministic=torch.equal(out, out_again) and all(map(torch.equal, stats, stats_again)),
        stats_off_identical=torch.equal(out, out_plain),
        stats_off_max_diff=(out.double() - out_plain.double()).abs().max().item(),
    )
    row["ok"] = bool(
        budget.ok
        and (dtype != torch.float16 or row["out_rel"] <= 2e-3)
        and row["max_logit_rel"] <= 1e-4
        and row["mass_rel"] <= 1e-4
        and spike_mismatch == 0
        and row["deterministic"]
    )
    return row


def stage_correctness(bk, shapes, device, rows, dry_run):
    seed = 0
    for shape in shapes:
        for dtype in (torch.float16, torch.bfloat16):
            for guard in (False, True):
                seed += 1
                rows.append(check_case(bk, shape, 3, dtype, device, guard, seed))
                print_row(rows[-1])
    extra = [(shapes[0], torch.float16, True), (shapes[-1], torch.float32, True)]
    num_keys = 20 if dry_run else 231  # three 77-token prompt chunks
    first = shapes[0]
    long_text = bk.LayerShape(first.model, f"{first.layer}-{num_keys}keys", first.num_queries, first.heads,
                              first.head_dim, num_keys)  # fmt: skip
    for shape, dtype, mods in extra + [(long_text, torch.float16, False)]:
        seed += 1
        rows.append(check_case(bk, shape, 3, dtype, device, True, seed, token_mods=mods))
        print_row(rows[-1])


def print_row(row):
    keys = ("out_err", "torch_err", "out_rel", "max_logit_rel", "mass_rel")
    print(f"  {'ok ' if row['ok'] else 'BAD'} {row['case']:40s} " + " ".join(f"{key}={row[key]:.2e}" for key in keys)
          + f" spikes={row['spikes']} mismatch={row['spike_mismatch']} det={row['deterministic']}"
          f" off==on={row['stats_off_identical']}", flush=True)  # fmt: skip


# ----------------------------------------------------------------------------- stage 2: benchmark


def time_providers(bk, shape, batch, dtype, device, timer, providers=None):
    inputs = bk.make_inputs(shape, batch, dtype, device)
    row = dict(case=f"{shape.name}-b{batch}-{str(dtype).replace('torch.', '')}")
    for provider in providers or bk.PROVIDERS:
        fn = bk.provider_fn(provider, inputs)
        fn()  # compile outside the timing
        seconds = timer(fn)
        nbytes = bk.minimal_bytes(shape, batch, dtype, provider in bk.STATS_PROVIDERS)
        row[provider] = dict(
            us=seconds * 1e6, gb_per_s=nbytes / seconds / 1e9, peak_extra_bytes=bk.peak_extra_memory(fn)
        )
    if "sdpa" in row:
        for provider in bk.PROVIDERS:
            if provider in row:
                row[provider]["over_sdpa"] = row[provider]["us"] / row["sdpa"]["us"]
    return row


def stage_benchmark(bk, shapes, batches, device, timer, rows):
    dtypes = [torch.float16]
    for shape in shapes:
        for batch in batches:
            for dtype in dtypes + ([torch.bfloat16] if shape is shapes[0] and batch == batches[-1] else []):
                rows.append(time_providers(bk, shape, batch, dtype, device, timer))
                row = rows[-1]
                print(f"  {row['case']:28s} " + " ".join(f"{p}={row[p]['us']:.1f}us" for p in bk.PROVIDERS), flush=True)


# ----------------------------------------------------------------------------- stage 3: launch configs


def stage_configs(bk, shapes, device, timer, rows, dry_run):
    from guard_kernels import triton_fused

    KC, Plan = triton_fused.KernelConfig, triton_fused.LaunchPlan
    attention = [KC(64, 4)] if dry_run else [KC(64, 4), KC(128, 8), KC(128, 4), KC(32, 4)]
    peaks = [KC(64, 4)] if dry_run else [KC(128, 8), KC(64, 4)]
    for shape in dict.fromkeys((shapes[0], shapes[min(2, len(shapes) - 1)])):  # SD 1.5 64x64 and 16x16
        q, k, v, rows_mask = bk.make_inputs(shape, 3, torch.float16, device)
        scale = shape.head_dim**-0.5
        for attn_cfg in attention:
            for peak_cfg in peaks:
                plan = Plan(attn_cfg, peak_cfg)

                def guard(plan=plan, q=q, k=k, v=v, scale=scale, rows_mask=rows_mask):
                    return triton_fused.triton_cross_attention(
                        q, k, v, scale, rows_mask, bk.SPIKE_THRESHOLD, bk.SPIKE_SCALE, None, None, True, plan=plan
                    )

                def plain(plan=plan, q=q, k=k, v=v, scale=scale):
                    return triton_fused.triton_cross_attention(
                        q, k, v, scale, None, 0.0, 1.0, None, None, False, plan=plan
                    )

                guard(), plain()
                rows.append(dict(case=f"{shape.name}-b3-float16", attention=list(attn_cfg), peaks=list(peak_cfg),
                                 guard_us=timer(guard) * 1e6, off_us=timer(plain) * 1e6))  # fmt: skip
                print(f"  {rows[-1]}", flush=True)
    default = triton_fused.choose_plan
    for row in rows:
        shape = bk.SHAPES_BY_NAME.get(row["case"].rsplit("-b3", 1)[0])
        if shape is not None:
            chosen = default(shape.head_dim, shape.num_keys)
            row["default"] = row["attention"] == list(chosen.attention) and row["peaks"] == list(chosen.peaks)


# ----------------------------------------------------------------------------- stage 4: UNet total


def stage_unet16(bk, by_name, layer_names, guard_layers, device, timer):
    dtype = torch.float16
    layers = [by_name[name] for name in layer_names]
    inputs = [bk.make_inputs(shape, 3, dtype, device, seed=i) for i, shape in enumerate(layers)]
    plain = [bk.provider_fn("fused_off", x) for x in inputs]
    guard = [bk.provider_fn("fused_guard", x) if i < guard_layers else plain[i] for i, x in enumerate(inputs)]
    sdpa = [bk.provider_fn("sdpa", x) for x in inputs]
    sequences = dict(fused_off=plain, fused_guard=guard, sdpa=sdpa)
    floor_bytes = sum(bk.minimal_bytes(shape, 3, dtype, False) for shape in layers)
    guard_bytes = floor_bytes + sum(
        bk.minimal_bytes(s, 3, dtype, True) - bk.minimal_bytes(s, 3, dtype, False) for s in layers[:guard_layers]
    )
    device_name = torch.cuda.get_device_name() if device == "cuda" else ""
    nominal = next((bw for key, bw in NOMINAL_BANDWIDTH.items() if key in device_name), float("nan"))
    copy_bw = measured_copy_bandwidth(device)
    result = dict(layers=len(layers), guard_layers=guard_layers, minimal_bytes=floor_bytes,
                  guard_minimal_bytes=guard_bytes, nominal_bandwidth=nominal, copy_bandwidth=copy_bw)  # fmt: skip
    for name, calls in sequences.items():
        for call in calls:
            call()

        def run_all(calls=calls):
            for call in calls:
                call()

        seconds = timer(run_all)
        graph_seconds = cuda_graph_seconds(run_all, timer) if device == "cuda" else None
        nbytes = guard_bytes if name == "fused_guard" else floor_bytes
        result[name] = dict(
            us=seconds * 1e6,
            graph_us=None if graph_seconds is None else graph_seconds * 1e6,
            over_nominal_floor=seconds / (nbytes / nominal),
            over_copy_floor=seconds / (nbytes / copy_bw),
            graph_over_nominal_floor=None if graph_seconds is None else graph_seconds / (nbytes / nominal),
        )
        print(f"  {name}: {result[name]}", flush=True)
    return result


def cuda_graph_seconds(run_all, timer):
    """The same sequence replayed from a CUDA graph: GPU time without host launch overhead."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run_all()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run_all()
        return timer(graph.replay)
    except Exception as error:  # report, do not fail the stage
        print(f"  CUDA graph capture failed: {error!r}", flush=True)
        return None


# ----------------------------------------------------------------------------- output


def markdown_table(header, rows):
    """A markdown table; columns whose header ends in ':' are right-aligned (numbers)."""
    names = [name.rstrip(":") for name in header]
    rules = ["---:" if name.endswith(":") else "---" for name in header]
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join(rules) + "|"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows] + [""]


def _fmt(value, spec=".2f"):
    return "" if value is None else format(value, spec)


def render_markdown(results) -> str:
    meta = results["meta"]
    lines = [
        f"# GPU check: {meta['device']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, Python {meta['python']},"
        f" {meta['date']}, {meta.get('elapsed_s', '?')} s",
        "",
    ]
    checks = results["correctness"]
    if checks:
        bad = [row["case"] for row in checks if not row["ok"]]
        lines += [
            f"## Correctness: {len(checks) - len(bad)}/{len(checks)} ok" + (f" (failed: {bad})" if bad else ""),
            "",
        ]
        header = ["case", "ok", "out err:", "torch-at-dtype err:", "out rel:", "max_logit rel:", "mass rel:",
                  "spikes:", "mismatches:", "deterministic", "stats off == on"]  # fmt: skip
        keys = ("out_err", "torch_err", "out_rel", "max_logit_rel", "mass_rel")
        rows = [
            [row["case"], row["ok"], *(f"{row[key]:.2e}" for key in keys), row["spikes"], row["spike_mismatch"],
             row["deterministic"], row["stats_off_identical"]]
            for row in checks
        ]  # fmt: skip
        lines += markdown_table(header, rows)
    if results["benchmark"]:
        lines += ["## Benchmark (median us; ratios are time / SDPA time; GB/s against the minimal bytes)", ""]
        header = ["case", "fused off:", "fused GUARD:", "SDPA:", "naive:", "torch path:", "off/SDPA:", "GUARD/SDPA:",
                  "naive/GUARD:", "GB/s off:", "GB/s GUARD:", "naive extra MB:", "GUARD extra MB:"]  # fmt: skip

        def megabytes(entry):
            return "" if entry["peak_extra_bytes"] is None else f"{entry['peak_extra_bytes'] / 2**20:.1f}"

        rows = []
        for row in results["benchmark"]:
            off, guard, naive = row["fused_off"], row["fused_guard"], row["naive"]
            rows.append([
                row["case"],
                *(f"{row[p]['us']:.1f}" for p in ("fused_off", "fused_guard", "sdpa", "naive", "torch_guard")),
                f"{off['over_sdpa']:.2f}", f"{guard['over_sdpa']:.2f}", f"{naive['us'] / guard['us']:.1f}",
                f"{off['gb_per_s']:.0f}", f"{guard['gb_per_s']:.0f}", megabytes(naive), megabytes(guard),
            ])  # fmt: skip
        lines += markdown_table(header, rows)
    if results["configs"]:
        lines += ["## Launch configurations (BLOCK_M, num_warps)", ""]
        rows = [
            [row["case"], row["attention"][:2], row["peaks"][:2], f"{row['guard_us']:.1f}", f"{row['off_us']:.1f}",
             row.get("default", "")]
            for row in results["configs"]
        ]  # fmt: skip
        lines += markdown_table(["case", "attention", "peaks", "GUARD us:", "off us:", "default plan"], rows)
    unet = results["unet16"]
    if unet:
        lines += [
            f"## SD 1.5 cross-attention layers, batch 3, fp16 ({unet['layers']} layers,"
            f" GUARD on {unet['guard_layers']})",
            "",
            f"Minimal bytes {unet['minimal_bytes'] / 1e6:.1f} MB (with GUARD statistics"
            f" {unet['guard_minimal_bytes'] / 1e6:.1f} MB);"
            f" nominal bandwidth {unet['nominal_bandwidth'] / 1e12:.2f} TB/s,"
            f" measured copy {unet['copy_bandwidth'] / 1e12:.2f} TB/s.",
            "",
        ]
        rows = [
            [name, f"{unet[name]['us']:.1f}", _fmt(unet[name]["graph_us"], ".1f"),
             _fmt(unet[name]["over_nominal_floor"]), _fmt(unet[name]["over_copy_floor"]),
             _fmt(unet[name]["graph_over_nominal_floor"])]
            for name in ("fused_off", "fused_guard", "sdpa") if name in unet
        ]  # fmt: skip
        header = ["sequence", "us:", "CUDA graph us:", "x nominal floor:", "x copy floor:", "graph x nominal floor:"]
        lines += markdown_table(header, rows)
    lines += targets_summary(results)
    if results["errors"]:
        lines += ["## Errors", ""] + [f"```\n{error}\n```" for error in results["errors"]]
    return "\n".join(lines)


def targets_summary(results):
    head = next((row for row in results["benchmark"] if row["case"] == "sd15-64x64-b3-float16"), None)
    if head is None:
        return []
    checks = [
        ("GUARD (stats + spike rule) / SDPA", head["fused_guard"]["over_sdpa"], "<=", TARGETS["guard_over_sdpa"]),
        ("stats off / SDPA", head["fused_off"]["over_sdpa"], "<=", TARGETS["off_over_sdpa"]),
        ("naive / GUARD", head["naive"]["us"] / head["fused_guard"]["us"], ">=", TARGETS["naive_over_guard"]),
    ]
    for name in ("fused_off", "fused_guard"):
        if name in results["unet16"]:
            value = results["unet16"][name]["over_nominal_floor"]
            checks.append((f"16 layers ({name}) / nominal HBM floor", value, "<=", TARGETS["unet16_over_floor"]))
    lines = ["## Targets (SD 1.5 64x64, batch 3, fp16)", ""]
    for name, value, op, bound in checks:
        met = value <= bound if op == "<=" else value >= bound
        lines.append(f"- {name}: {value:.2f} (target {op} {bound}): {'met' if met else 'NOT met'}")
    return lines + [""]


def write_results(results, out_dir: Path):
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out_dir / "results.md").write_text(render_markdown(results) + "\n")


if __name__ == "__main__":
    outcome = main()
    failed = [row["case"] for row in outcome["correctness"] if not row["ok"]]
    sys.exit(1 if failed or outcome["errors"] else 0)
