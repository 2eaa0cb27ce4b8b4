"""One run on a GPU: correctness of the fused kernel, its benchmarks, and GUARD's whole-model cost.

    python bench/gpu_check.py [--out DIR]      # H100/H200: about 5-6 minutes (Triton and inductor compiles included)
    python bench/gpu_check.py --dry-run        # CPU: tiny shapes and models, Triton through its interpreter

Every stage runs. Each gets a time budget: its share (STAGE_SHARES) of what is left of the total
(``--budget-s``, default DEFAULT_BUDGET_S) for the stages not yet run, so a stage that overruns
takes from the later ones and one that finishes early leaves them more. A stage past its budget
cuts repetitions (quicker timings, fewer timed runs), never cases; results["stages"] records each
budget, the time spent and what was cut. Failures (a stage's exception, a CUDA graph that could
not be captured, a gate that did not clear what it should) are entries of results["errors"], and
the script exits 1 when there is any, or a correctness case failed.

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
5. gated: whole denoising runs on an SD 1.5-shaped UNet (SD 1.5's UNet config, random weights,
   fp16, 4 images of one prompt at 512x512, 30 DDIM steps) through guard.sampling.GuardDenoiser,
   as the pipeline drives it: CFG, GUARD ungated, GUARD with the cosine gate clearing no image
   (threshold 1: the gate's cost alone) and clearing every image (threshold -1: after the first
   step only the unconditional and plain-prompt rows run, so the run approaches CFG's cost).
6. sdxl: one denoising step (UNet, guidance, DDIM update) of GUARD and CFG on SDXL base's UNet
   config (random weights, fp16, 2 images at 1024x1024: 128x128 latents, each row with its
   pooled text embedding and time ids).
7. compile: torch.compile (inductor, static shapes) of the SD 1.5-shaped UNet with GUARD's
   processors installed (guard.attention.attenuate_cross_attention, the session passed as
   cross_attention_kwargs, as the pipeline does): compile time, graphs and the compiled step of
   GUARD and CFG (stock processors), each against its eager step.

``--dry-run`` runs every stage on the CPU: tiny kernel shapes through the Triton interpreter,
tiny UNets (SD- and SDXL-shaped) for stages 5-7 with a few steps, and dynamo with its "eager"
backend instead of inductor (the tracing path, without the C++ compile).
"""

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import statistics
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
#: The total time budget (s) of a run: about 6 minutes on an H100/H200, compiles included.
DEFAULT_BUDGET_S = 360.0
#: Each stage's share of the total budget (of what is left of it for the stages not yet run).
STAGE_SHARES = dict(correctness=0.17, benchmark=0.15, configs=0.05, unet16=0.05, gated=0.15, sdxl=0.13, compile=0.30)
#: The least budget a stage gets, however late it starts (it then runs with the fewest repetitions).
MIN_STAGE_S = 5.0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="results folder (default: $OUT, else ./gpu_results)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes; runs on the CPU through the interpreter")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="total time budget (s), shared out among the stages; a stage past its share cuts repetitions",
    )
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
        gated={},
        sdxl={},
        compile={},
        stages={},
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
    models = ModelSpecs.for_run(args.dry_run, device)
    errors = results["errors"]

    stages = [
        ("correctness", lambda budget: stage_correctness(bk, shapes, device, results["correctness"], args.dry_run)),
        ("benchmark", lambda budget: stage_benchmark(bk, shapes, batches, device, timer, results["benchmark"])),
        ("configs", lambda budget: stage_configs(bk, shapes, device, timer, results["configs"], args.dry_run)),
        (
            "unet16",
            lambda budget: results["unet16"].update(
                stage_unet16(bk, by_name, unet_layers, guard_layers, device, timer, errors)
            ),
        ),
        ("gated", lambda budget: results["gated"].update(stage_gated(models, budget, errors))),
        ("sdxl", lambda budget: results["sdxl"].update(stage_sdxl(models, budget))),
        ("compile", lambda budget: results["compile"].update(stage_compile(models, budget, errors))),
    ]
    remaining = [name for name, _ in stages]
    for name, stage in stages:
        elapsed = time.perf_counter() - started
        shares_left = sum(STAGE_SHARES[other] for other in remaining)
        remaining.remove(name)
        budget = Budget(max(MIN_STAGE_S, (args.budget_s - elapsed) * STAGE_SHARES[name] / shares_left))
        timer.budget = budget
        print(f"== {name} (t={elapsed:.0f} s, budget {budget.seconds:.0f} s)", flush=True)
        try:
            stage(budget)
        except Exception:  # keep the other stages' results
            errors.append(f"{name}: {traceback.format_exc()}")
            print(errors[-1], flush=True)
        finally:
            timer.budget = None
            models.release(name)
        results["stages"][name] = dict(
            budget_s=round(budget.seconds, 1), spent_s=round(budget.spent(), 1), cut=budget.cuts
        )
        results["meta"]["elapsed_s"] = round(time.perf_counter() - started, 1)
        write_results(results, out_dir)
    print(render_markdown(results), flush=True)
    print(f"results written to {out_dir.resolve()}", flush=True)
    return results


# ----------------------------------------------------------------------------- timing


class Budget:
    """A stage's time budget; past it, the stage cuts repetitions (``cuts``: how often each cut was made)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.perf_counter()
        self.cuts: dict[str, int] = {}

    def spent(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.spent()

    @property
    def over(self) -> bool:
        return self.left() <= 0

    def reps(self, seconds_each: float, most: int, least: int = 1, what: str = "runs") -> int:
        """How many repetitions of ``seconds_each`` fit what is left, between ``least`` and ``most``."""
        fit = most if seconds_each <= 0 else int(max(0.0, self.left()) / seconds_each)
        count = max(least, min(most, fit))
        if count < most:
            self.cut(f"{what}: {count} of {most}")
        return count

    def cut(self, note: str) -> None:
        self.cuts[note] = self.cuts.get(note, 0) + 1


class Timer:
    """Median seconds per call: triton.testing.do_bench on a GPU, wall clock when interpreting.

    With a ``budget`` that is spent, a timing is quick (a few milliseconds of repetitions on a
    GPU, one call when interpreting) and the budget records the cut.
    """

    def __init__(self, cuda: bool, reps=None):
        self.cuda, self.reps = cuda, reps
        self.budget = None

    def __call__(self, fn) -> float:
        quick = self.budget is not None and self.budget.over
        if quick:
            self.budget.cut("quick timing")
        if self.cuda:
            from triton.testing import do_bench

            warmup, rep = (2, 10) if quick else (25, 100)
            return do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e-3
        times = []
        for _ in range(1 if quick else self.reps or 3):
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


def stage_unet16(bk, by_name, layer_names, guard_layers, device, timer, errors):
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
        graph_seconds = cuda_graph_seconds(run_all, timer, errors, f"unet16 {name}") if device == "cuda" else None
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


def cuda_graph_seconds(run_all, timer, errors, label):
    """The same sequence replayed from a CUDA graph: GPU time without host launch overhead; None,
    with an entry in ``errors``, when the capture fails."""
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
    except Exception as error:  # an error entry, and the stage goes on without the graph timing
        errors.append(f"{label}: CUDA graph capture failed: {error!r}")
        return None


# ----------------------------------------------------------------------------- stages 5-7: whole models

#: An SDXL-shaped UNet at test size for --dry-run (SDXL's block layout and added conditioning).
TINY_SDXL_UNET = {
    "sample_size": 8, "block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"), "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2), "attention_head_dim": (2, 4), "use_linear_projection": True,
    "cross_attention_dim": 64, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
}  # fmt: skip


@dataclasses.dataclass
class ModelSpecs:
    """The UNets and run sizes of stages 5-7 (full-sized on a GPU, tiny for --dry-run), and the
    SD 1.5-shaped UNet that stages 5 and 7 share, built once."""

    device: str
    dtype: torch.dtype
    sd_unet: dict  # UNet2DConditionModel config of stages 5 and 7
    sdxl_unet: dict  # of stage 6
    images: int  # stages 5 and 7
    steps: int  # DDIM steps of a stage 5 run
    sdxl_images: int
    compile_backend: str
    most_rounds: int  # timed runs per variant in stage 5
    most_steps: int  # timed steps per variant in stages 6 and 7
    sd_name: str = "SD 1.5 UNet config"
    sdxl_name: str = "SDXL base UNet config"
    cache: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def for_run(cls, dry_run: bool, device: str) -> "ModelSpecs":
        import bench_sampler as bs

        if dry_run:
            return cls(device, torch.float32, bs.MODELS["tiny"]["unet"], TINY_SDXL_UNET, images=2, steps=3,
                       sdxl_images=2, compile_backend="eager", most_rounds=2, most_steps=2,
                       sd_name="tiny SD-shaped UNet", sdxl_name="tiny SDXL-shaped UNet")  # fmt: skip
        return cls(device, torch.float16, bs.MODELS["sd15"]["unet"], bs.SDXL_UNET, images=4, steps=30,
                   sdxl_images=2, compile_backend="inductor", most_rounds=3, most_steps=10)  # fmt: skip

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def sd(self):
        """The SD 1.5-shaped UNet (random weights), built on first use."""
        if "sd" not in self.cache:
            import bench_sampler as bs

            self.cache["sd"] = bs.build_unet(self.sd_unet, self.device, self.dtype)
        return self.cache["sd"]

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def release(self, stage: str) -> None:
        """Free what a stage leaves behind (the shared UNet after the last stage that uses it)."""
        if stage == "compile":
            self.cache.clear()
        if self.device == "cuda":
            torch.cuda.empty_cache()


def timed(fn, sync) -> tuple[float, object]:
    """Seconds of one call of ``fn`` (synchronised), and its result."""
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - start, result


def denoise(unet, setup, config, steps: int, backend: str = "auto"):
    """A whole DDIM run of ``steps`` steps from ``setup``'s latents, as GUARD's pipelines drive it
    (guard.sampling.GuardDenoiser, the session as cross_attention_kwargs); (latents, denoiser)."""
    from diffusers import DDIMScheduler

    from guard.sampling import GuardDenoiser, _attenuated_branch

    scheduler = DDIMScheduler.from_config(setup.scheduler.config)
    scheduler.set_timesteps(steps, device=setup.device)
    images, num_keys = setup.latents.shape[0], setup.cond.shape[1]
    with contextlib.ExitStack() as stack:
        session = None
        if config.attenuates:
            branch = _attenuated_branch(unet, config, images, num_keys, setup.device, backend)
            session = stack.enter_context(branch)
        denoiser = GuardDenoiser(config, steps, scheduler.order, images=images, session=session)
        denoiser.set_conditioning(*setup.branches())
        kwargs = None if session is None else session.unet_kwargs
        latents = setup.latents * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps):
            latents = denoiser(unet, scheduler, latents, t, i, kwargs)
    return latents, denoiser


#: Stage 5's variants: (method, cosine gate threshold, spike tokens). The gate clears an image whose guidance
#: cosine is above the threshold: above 1 never (no image cleared), above -1 always (every one).
GATED_VARIANTS = {
    "cfg": ("cfg", None, "per-check"),
    "guard": ("guard", None, "per-check"),
    "guard_gate_none": ("guard", 1.0, "per-check"),
    "guard_gate_all": ("guard", -1.0, "per-check"),
    "guard_first_step": ("guard", None, "first-step"),  # spike tokens fixed after the first step
}


def gated_config(variant: str):
    from guard.config import GuardConfig

    method, threshold, tokens = GATED_VARIANTS[variant]
    if method != "guard":
        return GuardConfig.preset(method)
    return GuardConfig(gate_threshold=threshold, spike_tokens=tokens)


def stage_gated(models: ModelSpecs, budget: Budget, errors: list) -> dict:
    import bench_sampler as bs

    unet = models.sd()
    setup = bs.build_setup_for(models.sd_unet, models.images, models.device, models.dtype, unet=unet)
    n = models.images
    result = dict(model=models.sd_name, dtype=models.dtype_name, images=n, steps=models.steps, variants={})
    finals = {}
    with torch.inference_mode():
        for variant in GATED_VARIANTS:  # warm-up runs (Triton compiles), with the UNet's batch per call
            config = gated_config(variant)
            rows = []
            hook = unet.register_forward_pre_hook(lambda module, args, rows=rows: rows.append(int(args[0].shape[0])))
            try:
                run = lambda config=config: denoise(unet, setup, config, models.steps)
                seconds, (latents, denoiser) = timed(run, models.sync)
            finally:
                hook.remove()
            cleared = None if denoiser.cleared is None else int(denoiser.cleared.sum())
            finals[variant] = latents
            result["variants"][variant] = dict(
                warmup_s=seconds, runs_s=[], rows_first=rows[0], rows_last=rows[-1], unet_rows=sum(rows),
                cleared=cleared, finite=bool(torch.isfinite(latents).all()),
            )  # fmt: skip
            print(f"  {variant}: warm-up {seconds:.2f} s, UNet rows {rows[0]} then {rows[-1]}, cleared {cleared}",
                  flush=True)  # fmt: skip
        rounds, round_index = models.most_rounds, 0
        while round_index < rounds:  # rounds interleave the variants, so drifting clocks hit them alike
            round_start = time.perf_counter()
            for variant, entry in result["variants"].items():
                config = gated_config(variant)
                run = lambda config=config: denoise(unet, setup, config, models.steps)
                entry["runs_s"].append(timed(run, models.sync)[0])
            round_index += 1
            if round_index == 1:  # the first round's time says how many more fit the budget
                more = models.most_rounds - 1
                rounds = 1 + budget.reps(time.perf_counter() - round_start, more, least=0, what="more timed rounds")
    variants = result["variants"]
    for variant, entry in variants.items():
        entry["s"] = statistics.median(entry["runs_s"])
        entry["over_cfg"] = entry["s"] / statistics.median(variants["cfg"]["runs_s"])
        if not entry["finite"]:
            errors.append(f"gated {variant}: non-finite final latents")
    # The gate's decisions must be the intended ones, and clearing nothing must change nothing.
    if variants["guard_gate_all"]["cleared"] != n or variants["guard_gate_all"]["rows_last"] != 2 * n:
        errors.append(f"gated guard_gate_all: expected {n} images cleared and {2 * n} UNet rows after the gate,"
                      f" got {variants['guard_gate_all']}")  # fmt: skip
    if variants["guard_gate_none"]["cleared"] != 0 or variants["guard_gate_none"]["rows_last"] != 3 * n:
        errors.append(f"gated guard_gate_none: expected no image cleared, got {variants['guard_gate_none']}")
    result["gate_none_max_diff"] = (finals["guard_gate_none"] - finals["guard"]).abs().max().item()
    for variant, entry in variants.items():
        print(f"  {variant}: {entry['s']:.3f} s per run ({entry['over_cfg']:.2f}x CFG)", flush=True)
    return result


def stage_sdxl(models: ModelSpecs, budget: Budget) -> dict:
    import bench_sampler as bs

    setup = bs.build_setup_for(models.sdxl_unet, models.sdxl_images, models.device, models.dtype)
    size = models.sdxl_unet["sample_size"]
    result = dict(model=models.sdxl_name, dtype=models.dtype_name, images=models.sdxl_images,
                  latents=f"{size}x{size}", variants={})  # fmt: skip
    variants = ("cfg", "guard")
    with torch.inference_mode():
        for variant in variants:  # warm-up (Triton compiles for SDXL's layers), peak memory
            with contextlib.ExitStack() as stack:
                step = bs.make_step(setup, variant, stack)
                seconds, out = timed(step, models.sync)
                warm_s = timed(step, models.sync)[0]
                peak = bs.peak_memory_bytes(step, setup.device) if models.device == "cuda" else None
            result["variants"][variant] = dict(warmup_s=seconds, warm_s=warm_s, steps_s=[], peak_bytes=peak,
                                               finite=bool(torch.isfinite(out).all()))  # fmt: skip
        estimate = sum(v["warm_s"] for v in result["variants"].values())
        steps = budget.reps(estimate, models.most_steps, least=2, what="timed steps")
        for variant in variants:
            with contextlib.ExitStack() as stack:
                step = bs.make_step(setup, variant, stack)
                step()
                for _ in range(steps):
                    result["variants"][variant]["steps_s"].append(timed(step, models.sync)[0])
    for entry in result["variants"].values():
        entry["ms"] = 1e3 * statistics.median(entry["steps_s"])
        entry["min_ms"] = 1e3 * min(entry["steps_s"])
    for variant, entry in result["variants"].items():
        entry["over_cfg"] = entry["ms"] / result["variants"]["cfg"]["ms"]
        print(f"  {variant}: {entry['ms']:.1f} ms per step ({entry['over_cfg']:.2f}x CFG)", flush=True)
    del setup
    return result


def compile_step(call_unet, setup, groups: int, config, session=None):
    """One denoising step through ``call_unet`` (a UNet or its compiled module): CFG (2 row
    groups) or GUARD (3, with ``session`` passed as cross_attention_kwargs)."""
    from guard.guidance import cfg_guidance, combine_predictions

    conditioning = setup.unet_kwargs(groups)
    if session is not None:
        conditioning["cross_attention_kwargs"] = session.unet_kwargs
    latents, t, scheduler = setup.latents, setup.timestep, setup.scheduler

    def step():
        eps = call_unet(torch.cat([latents] * groups), t, **conditioning).sample
        if groups == 2:
            guided = cfg_guidance(*eps.chunk(2), config.guidance_scale)
        else:
            guided = combine_predictions(eps, 0, 50, config)
        return scheduler.step(guided, t, latents).prev_sample

    return step


def stage_compile(models: ModelSpecs, budget: Budget, errors: list) -> dict:
    import bench_sampler as bs
    import torch._dynamo
    from torch._dynamo.utils import counters

    from guard.config import GuardConfig
    from guard.sampling import _attenuated_branch
    from guard_kernels.testing import rel_err

    unet = models.sd()
    setup = bs.build_setup_for(models.sd_unet, models.images, models.device, models.dtype, unet=unet)
    n, config = models.images, GuardConfig()
    result = dict(model=models.sd_name, dtype=models.dtype_name, images=n, backend=models.compile_backend,
                  variants={})  # fmt: skip
    tolerance = 5e-2 if models.dtype == torch.float16 else 1e-4
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(unet, backend=models.compile_backend, dynamic=False)
    variants = ("cfg", "guard")
    try:
        with torch.no_grad():
            for index, variant in enumerate(variants):
                with contextlib.ExitStack() as stack:
                    session = None
                    if variant == "guard":  # GUARD's processors on every attn2 layer, as the pipeline installs them
                        branch = _attenuated_branch(unet, config, n, setup.cond.shape[1], setup.device, "auto")
                        session = stack.enter_context(branch)
                    groups = 3 if variant == "guard" else 2
                    eager = compile_step(unet, setup, groups, config, session)
                    fast = compile_step(compiled, setup, groups, config, session)
                    eager_s, eager_out = timed(eager, models.sync)  # warm (Triton compiles)
                    compile_s, out = timed(fast, models.sync)  # dynamo + the backend's compile
                    second_s, _ = timed(fast, models.sync)
                    estimate = (eager_s + second_s) * (len(variants) - index)
                    steps = budget.reps(estimate, models.most_steps, least=2, what=f"{variant} timed steps")
                    eager_steps = [timed(eager, models.sync)[0] for _ in range(steps)]
                    compiled_steps = [timed(fast, models.sync)[0] for _ in range(steps)]
                    again = fast()
                entry = dict(
                    compile_s=compile_s, second_call_s=second_s,
                    eager_ms=1e3 * statistics.median(eager_steps), compiled_ms=1e3 * statistics.median(compiled_steps),
                    steps=steps, graphs=int(counters["stats"]["unique_graphs"]),
                    rel_diff_vs_eager=rel_err(out, eager_out),
                    deterministic=bool(torch.equal(out, again)),
                )  # fmt: skip
                entry["speedup"] = entry["eager_ms"] / entry["compiled_ms"]
                result["variants"][variant] = entry
                if not entry["rel_diff_vs_eager"] <= tolerance:
                    errors.append(f"compile {variant}: compiled step differs from the eager one by"
                                  f" {entry['rel_diff_vs_eager']:.3g} (relative, > {tolerance})")  # fmt: skip
                print(f"  {variant}: compile {compile_s:.1f} s, eager {entry['eager_ms']:.1f} ms, compiled"
                      f" {entry['compiled_ms']:.1f} ms, graphs {entry['graphs']}", flush=True)  # fmt: skip
    finally:
        torch._dynamo.reset()
    cfg, guard = result["variants"].get("cfg"), result["variants"].get("guard")
    if cfg and guard:
        result["guard_over_cfg_compiled"] = guard["compiled_ms"] / cfg["compiled_ms"]
        result["guard_over_cfg_eager"] = guard["eager_ms"] / cfg["eager_ms"]
    return result


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
    lines += render_models(results)
    stages = results.get("stages", {})
    if stages:
        lines += ["## Stage budgets", ""]
        rows = [[name, f"{entry['budget_s']:.0f}", f"{entry['spent_s']:.0f}", _cuts(entry["cut"])]
                for name, entry in stages.items()]  # fmt: skip
        lines += markdown_table(["stage", "budget s:", "spent s:", "cut (past the budget)"], rows)
    lines += targets_summary(results)
    if results["errors"]:
        lines += ["## Errors", ""] + [f"```\n{error}\n```" for error in results["errors"]]
    return "\n".join(lines)


def _cuts(cuts: dict) -> str:
    """A stage's cuts, with how often each was made."""
    return "; ".join(note if count == 1 else f"{note} (x{count})" for note, count in cuts.items())


def render_models(results) -> list:
    """The markdown of stages 5-7."""
    lines = []
    gated = results.get("gated")
    if gated and gated.get("variants"):
        lines += [
            f"## Gated runs: {gated['model']}, {gated['dtype']}, {gated['images']} images, {gated['steps']} DDIM"
            " steps, whole runs (median s)",
            "",
        ]
        rows = [
            [name, f"{v['s']:.3f}", f"{v['over_cfg']:.2f}", len(v["runs_s"]), f"{v['rows_first']} / {v['rows_last']}",
             v["unet_rows"], "" if v["cleared"] is None else v["cleared"], v["finite"]]
            for name, v in gated["variants"].items() if "s" in v
        ]  # fmt: skip
        header = ["variant", "s per run:", "x CFG:", "timed runs:", "UNet rows first / last step", "UNet rows total:",
                  "images cleared:", "finite"]  # fmt: skip
        lines += markdown_table(header, rows)
        if "gate_none_max_diff" in gated:
            difference = gated["gate_none_max_diff"]
            lines += [f"Gate clearing none vs ungated GUARD, max |latent difference|: {difference:.3g}", ""]
    sdxl = results.get("sdxl")
    if sdxl and sdxl.get("variants"):
        lines += [
            f"## SDXL step: {sdxl['model']}, {sdxl['dtype']}, {sdxl['images']} images, {sdxl['latents']} latents"
            " (UNet + guidance + DDIM update)",
            "",
        ]
        rows = [
            [name, f"{v['ms']:.1f}", f"{v['min_ms']:.1f}", f"{v['over_cfg']:.2f}", len(v["steps_s"]),
             "" if v["peak_bytes"] is None else f"{v['peak_bytes'] / 2**20:.0f}", v["finite"]]
            for name, v in sdxl["variants"].items() if "ms" in v
        ]  # fmt: skip
        header = ["variant", "median ms:", "min ms:", "x CFG:", "timed steps:", "peak MiB:", "finite"]
        lines += markdown_table(header, rows)
    compiled = results.get("compile")
    if compiled and compiled.get("variants"):
        lines += [
            f"## torch.compile ({compiled['backend']}, static shapes): {compiled['model']}, {compiled['dtype']},"
            f" {compiled['images']} images, one step",
            "",
        ]
        rows = [
            [name, f"{v['compile_s']:.1f}", f"{v['eager_ms']:.1f}", f"{v['compiled_ms']:.1f}", f"{v['speedup']:.2f}",
             v["steps"], v["graphs"], f"{v['rel_diff_vs_eager']:.2e}", v["deterministic"]]
            for name, v in compiled["variants"].items()
        ]  # fmt: skip
        header = ["variant", "compile s:", "eager ms:", "compiled ms:", "speedup:", "timed steps:", "graphs so far:",
                  "rel diff vs eager:", "deterministic"]  # fmt: skip
        lines += markdown_table(header, rows)
        if "guard_over_cfg_compiled" in compiled:
            lines += [f"GUARD / CFG: compiled {compiled['guard_over_cfg_compiled']:.2f}x, eager"
                      f" {compiled['guard_over_cfg_eager']:.2f}x", ""]  # fmt: skip
    return lines


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
