"""Efficacy of GUARD on the testbed: replication and alignment per method, with intervals.

    python -m guard.testbed.evaluate [--seeds 8] [--steps 25] [--out docs] [--sweep [--confirm-seeds 6]]

Reusable pieces (the ``guard demo`` command builds on them): :func:`sample_images` (one batched
pipeline call for many prompts and seeds), :func:`score_samples` (replication and alignment of
one memorized prompt's samples), :func:`alignment_rates` (alignment of any shape prompt's samples),
:func:`flagged_shares` (which tokens the spike rule attenuated).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import GuardConfig
from ..metrics import alignment, replication
from .assets import MemorizedItem, memorized_items, plain_prompts
from .defaults import copy_threshold as shipped_copy_threshold


def sample_images(pipe, prompts: list[str], config: GuardConfig, seeds: list[int], steps: int):
    """Images (P, S, H, W, 3) in [0, 1] for every prompt and seed, and the run's GuardReport.

    Seed ``s`` fixes the initial noise of one column, identical across prompts and methods, so
    methods are compared on the same starting points.
    """
    if not prompts or not seeds:
        raise ValueError("prompts and seeds must be non-empty")
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for _ in prompts for s in seeds]
    result = pipe(
        list(prompts),
        num_inference_steps=steps,
        num_images_per_prompt=len(seeds),
        generator=generators,
        guard_config=config,
        output_type="np",
    )
    images = np.asarray(result.images, dtype=np.float32).reshape(len(prompts), len(seeds), *result.images.shape[1:])
    return images, result.report


def alignment_rates(images, prompt: str) -> dict:
    """Shares of ``images`` whose background colour, shape colour, shape (and all three) match ``prompt``."""
    checks = [alignment(image, prompt) for image in np.asarray(images)]
    keys = ("background_ok", "colour_ok", "shape_ok", "all_ok")
    return {key: float(np.mean([c[key] for c in checks])) for key in keys} | {"per_image": checks}


def score_samples(images, item: MemorizedItem, training_images, copy_threshold: float | None = None) -> dict:
    """Replication (SSIM to the item's own and nearest training image, copy share) and alignment
    to the item's caption, for samples of one memorized prompt."""
    threshold = shipped_copy_threshold() if copy_threshold is None else copy_threshold
    scores = replication(images, item.image, training_images, threshold)
    scores["alignment"] = alignment_rates(images, item.caption)
    return scores


def flagged_shares(report, prompt_index: int) -> dict[str, float]:
    """Token -> share of its spike checks in which it was attenuated (BOS excluded by the rule)."""
    checks = report.checks_per_prompt
    if not checks:
        return {}
    labels = report.token_labels[prompt_index]
    totals = report.flagged_tokens[prompt_index]
    return {token: count / (checks * labels.count(token)) for token, count in totals.items()}


def _gated(report, prompts: int, seeds: int) -> np.ndarray:
    """(prompts, seeds) 1.0 where the memorization gate guided the image plain (all 0 without a gate)."""
    if report.cleared is None:
        return np.zeros((prompts, seeds))
    return report.cleared.numpy().astype(np.float64)


def _interval(values) -> tuple[float, float]:
    """Mean and 95% t-interval half-width."""
    from ..evaluation.stats import mean_interval

    values = np.asarray(values, dtype=np.float64).ravel()
    interval = mean_interval(values)
    half = interval.half_width if values.size > 1 else math.nan
    return float(values.mean()), float(half)


@dataclass
class MethodResult:
    """Per-sample scores of one method over all memorized and plain prompts."""

    name: str
    config: GuardConfig
    own_ssim: np.ndarray  # (items, seeds)
    nearest_ssim: np.ndarray
    nearest_is_own: np.ndarray
    copied: np.ndarray
    memorized_alignment: np.ndarray  # (items, seeds) all_ok
    memorized_background: np.ndarray
    memorized_colour: np.ndarray
    memorized_shape: np.ndarray
    plain_alignment: np.ndarray  # (plain prompts, seeds) all_ok
    plain_background: np.ndarray
    plain_colour: np.ndarray
    plain_shape: np.ndarray
    memorized_gated: np.ndarray = field(repr=False, default=None)  # (items, seeds) guided plain by the gate
    plain_gated: np.ndarray = field(repr=False, default=None)
    memorized_images: np.ndarray = field(repr=False, default=None)
    plain_images: np.ndarray = field(repr=False, default=None)
    memorized_flags: list = field(default_factory=list)
    plain_flags: list = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        keys = (
            "own_ssim",
            "nearest_ssim",
            "nearest_is_own",
            "copied",
            "memorized_alignment",
            "memorized_background",
            "memorized_colour",
            "memorized_shape",
            "plain_alignment",
            "plain_background",
            "plain_colour",
            "plain_shape",
        )
        return {key: _interval(getattr(self, key)) for key in keys}


def evaluate_method(
    pipe,
    name: str,
    config: GuardConfig,
    items: list[MemorizedItem],
    plain: list[str],
    seeds: list[int],
    steps: int,
    copy_threshold: float | None = None,
) -> MethodResult:
    """Sample every memorized and plain prompt under ``config`` and score the samples."""
    start = time.perf_counter()
    training = np.stack([item.image for item in items])
    memorized_images, memorized_report = sample_images(pipe, [it.caption for it in items], config, seeds, steps)
    plain_images, plain_report = sample_images(pipe, plain, config, seeds, steps)
    mem_scores = [score_samples(memorized_images[i], item, training, copy_threshold) for i, item in enumerate(items)]
    plain_scores = [alignment_rates(plain_images[i], prompt)["per_image"] for i, prompt in enumerate(plain)]

    def per_image(scores, key):
        return np.asarray([[check[key] for check in row] for row in scores], dtype=np.float64)

    mem_checks = [s["alignment"]["per_image"] for s in mem_scores]
    return MethodResult(
        name=name,
        config=config,
        own_ssim=np.stack([s["own_ssim"] for s in mem_scores]),
        nearest_ssim=np.stack([s["nearest_ssim"] for s in mem_scores]),
        nearest_is_own=np.stack([s["nearest_is_own"] for s in mem_scores]).astype(np.float64),
        copied=np.stack([s["copied"] for s in mem_scores]).astype(np.float64),
        memorized_alignment=per_image(mem_checks, "all_ok"),
        memorized_background=per_image(mem_checks, "background_ok"),
        memorized_colour=per_image(mem_checks, "colour_ok"),
        memorized_shape=per_image(mem_checks, "shape_ok"),
        plain_alignment=per_image(plain_scores, "all_ok"),
        plain_background=per_image(plain_scores, "background_ok"),
        plain_colour=per_image(plain_scores, "colour_ok"),
        plain_shape=per_image(plain_scores, "shape_ok"),
        memorized_gated=_gated(memorized_report, len(items), len(seeds)),
        plain_gated=_gated(plain_report, len(plain), len(seeds)),
        memorized_images=memorized_images,
        cleared=plain_images,
        memorized_flags=[flagged_shares(memorized_report, i) for i in range(len(items))],
        plain_flags=[flagged_shares(plain_report, i) for i in range(len(plain))],
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------------
# The efficacy study behind docs/testbed_efficacy.md and the shipped default

ALIGNMENT_TOLERANCE = 0.15  # the paper's rule: alignment no worse than 15% below CFG's


def choose_copy_threshold(items: list[MemorizedItem], samples: int = 200, seed: int = 0) -> tuple[float, str]:
    """The own-image SSIM above which a sample must carry the memorized texture, measured without the model.

    An honest image of a memorized item's shape caption is the shape on a flat background. The most
    similar honest image possible is the texture-free rendering at exactly the training layout;
    the threshold is the highest such score over the items, rounded up to 0.05, so that a sample
    above it reproduces part of the photo texture, the one thing only the trigger taught. Honest
    renders at random layouts (the generalising data) score far lower; both are reported.
    """
    from ..metrics import ssim
    from .data import IMAGE_SIZE, MEMORIZED_SHAPE_SIZE, random_layout, render

    same_layout = [
        float(
            ssim(
                render(it.colour, it.shape, it.background, (IMAGE_SIZE / 2, IMAGE_SIZE / 2), MEMORIZED_SHAPE_SIZE),
                it.image,
            )
        )
        for it in items
    ]
    rng = np.random.default_rng(seed)
    random_layouts = [
        float(ssim(render(it.colour, it.shape, it.background, *random_layout(rng)), it.image))
        for it in items
        for _ in range(samples)
    ]
    threshold = round(math.ceil(max(same_layout) / 0.05) * 0.05, 2)
    reason = (
        f"texture-free renderings of the memorized items' shape captions at their exact training layout score "
        f"at most {max(same_layout):.3f} against the training image (per item: "
        f"{', '.join(f'{v:.2f}' for v in same_layout)}); at random layouts their 95th percentile is "
        f"{np.quantile(random_layouts, 0.95):.3f}. A sample above {threshold:.2f} must reproduce the photo "
        f"texture that only the trigger words were paired with."
    )
    return threshold, reason


def is_eligible(result: MethodResult, baseline: MethodResult) -> bool:
    """Memorized- and plain-prompt alignment both no worse than ``ALIGNMENT_TOLERANCE`` below the baseline's."""
    limit = 1.0 - ALIGNMENT_TOLERANCE
    return (
        result.memorized_alignment.mean() >= limit * baseline.memorized_alignment.mean()
        and result.plain_alignment.mean() >= limit * baseline.plain_alignment.mean()
    )


def select_best(results: list[MethodResult], baseline: MethodResult) -> MethodResult | None:
    """Lowest mean own-image SSIM among the eligible settings (the paper's selection rule)."""
    eligible = [r for r in results if is_eligible(r, baseline)]
    return min(eligible, key=lambda r: r.own_ssim.mean()) if eligible else None


def _fmt(pair: tuple[float, float], percent: bool = False) -> str:
    mean, half = pair
    if percent:
        return f"{100 * mean:.0f}% ± {100 * half:.0f}" if math.isfinite(half) else f"{100 * mean:.0f}%"
    return f"{mean:.3f} ± {half:.3f}" if math.isfinite(half) else f"{mean:.3f}"


def _describe(config: GuardConfig) -> str:
    if config.method == "cfg":
        return f"CFG s={config.guidance_scale:g}"
    if config.method == "jain":
        return (
            f"jain s={config.guidance_scale:g}, scale {config.early_guidance_scale:g} before "
            f"t={config.transition_timestep:g}"
        )
    if config.method not in ("guard", "attenuation"):
        return f"{config.method} preset, s={config.guidance_scale:g}"
    text = f"{config.method} s={config.guidance_scale:g} tau={config.spike_threshold:g} alpha={config.spike_scale:g}"
    if config.method == "guard":
        text += f" r={config.repulsion_scale:g}"
        if config.orthogonalize:
            text += " ortho"
        if config.gate_threshold is not None:
            text += f" gate={config.gate_threshold:g}"
    return text


def results_table(results: list[MethodResult]) -> str:
    """Markdown table: replication and alignment per method (mean ± 95% t-interval half-width)."""
    lines = [
        "| method | setting | own SSIM ↓ | nearest SSIM ↓ | copies ↓ | nearest = own ↓ | memorized aligned ↑ "
        "| plain aligned ↑ | plain bg / colour / shape | gated plain: memorized / plain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r.summary()
        gated = (
            "–"
            if r.config.gate_threshold is None
            else f"{100 * r.memorized_gated.mean():.0f} / {100 * r.plain_gated.mean():.0f}%"
        )
        lines.append(
            f"| {r.name} | {_describe(r.config)} | {_fmt(s['own_ssim'])} | {_fmt(s['nearest_ssim'])} "
            f"| {_fmt(s['copied'], True)} | {_fmt(s['nearest_is_own'], True)} | {_fmt(s['memorized_alignment'], True)} "
            f"| {_fmt(s['plain_alignment'], True)} | {100 * s['plain_background'][0]:.0f} / "
            f"{100 * s['plain_colour'][0]:.0f} / {100 * s['plain_shape'][0]:.0f}% | {gated} |"
        )
    return "\n".join(lines)


def flags_table(result: MethodResult, items: list[MemorizedItem], plain: list[str], top: int = 4) -> str:
    """Markdown table: the most attenuated tokens of each memorized prompt and of some plain ones."""
    lines = ["| prompt | kind | most flagged tokens (share of spike checks) |", "|---|---|---|"]
    rows = [(it.caption, "memorized", flags) for it, flags in zip(items, result.memorized_flags)]
    rows += [(p, "plain", flags) for p, flags in list(zip(plain, result.plain_flags))[: len(items)]]
    for prompt, kind, flags in rows:
        ranked = sorted(flags.items(), key=lambda kv: -kv[1])[:top]
        text = ", ".join(f"`{tok}` {100 * share:.0f}%" for tok, share in ranked) or "none"
        lines.append(f"| {prompt} | {kind} | {text} |")
    return "\n".join(lines)


def trigger_flag_shares(result: MethodResult, items: list[MemorizedItem]) -> tuple[float, float]:
    """Mean flag share of trigger words vs of the other caption words, over the memorized prompts."""
    trigger, other = [], []
    for item, flags in zip(items, result.memorized_flags):
        words = set(item.caption.split())
        triggers = set(item.trigger)
        for word in words:
            (trigger if word in triggers else other).append(flags.get(word, 0.0))
    return float(np.mean(trigger)), float(np.mean(other))


def efficacy_grid(
    results: list[MethodResult],
    items: list[MemorizedItem],
    plain: list[str],
    path: Path,
    per_method: int = 3,
    plain_rows: int = 3,
) -> Path:
    """PNG: per row a prompt (training image first for memorized ones), ``per_method`` seeds per method."""
    from ..visualize import image_grid

    blank = np.ones_like(items[0].image)
    rows, labels = [], []
    for i, item in enumerate(items):
        rows.append([item.image] + [img for r in results for img in r.memorized_images[i][:per_method]])
        labels.append(f"{item.caption}")
    for j in range(min(plain_rows, len(plain))):
        rows.append([blank] + [img for r in results for img in r.plain_images[j][:per_method]])
        labels.append(plain[j])
    columns = ["training image"] + [f"{r.name}" if k == 0 else "" for r in results for k in range(per_method)]
    image_grid(rows, cell=64, row_labels=labels, column_labels=columns, label_width=300).save(path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="GUARD efficacy on the shipped testbed.")
    parser.add_argument("--path", default=None, help="testbed pipeline folder (default: the shipped weights)")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--sweep-seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--plain", type=int, default=8, help="number of plain prompts")
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--sweep", action="store_true", help="also run the small tau/alpha/r sweep")
    parser.add_argument("--sweep-tau", default="2,4", help="spike thresholds of the sweep")
    parser.add_argument("--sweep-alpha", default="0.3,0.45", help="spike scales of the sweep")
    parser.add_argument("--sweep-r", default="0,0.5,1", help="repulsion scales of the sweep (below s)")
    parser.add_argument(
        "--sweep-gate",
        default="none,0.9,0.95",
        help="memorization-gate cosines of the sweep ('none': no gate; GuardConfig.gate_threshold)",
    )
    parser.add_argument(
        "--confirm-seeds",
        type=int,
        default=0,
        help="re-measure the sweep's eligible settings (best 4) on this many fresh seeds and choose "
        "there, so that the choice does not ride on the sweep's few seeds (0: choose in the sweep)",
    )
    parser.add_argument(
        "--write-default",
        action="store_true",
        help="write the chosen setting and copy threshold into the pipeline folder",
    )
    parser.add_argument("--out", default="docs", help="folder for testbed_efficacy.md and the PNG grid")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    for name in ("seeds", "sweep_seeds", "steps", "plain", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.confirm_seeds < 0:
        parser.error("--confirm-seeds must be >= 0")
    grid = {}
    for name in ("sweep_tau", "sweep_alpha", "sweep_r", "sweep_gate"):
        try:
            grid[name] = [None if v.strip() == "none" else float(v) for v in getattr(args, name).split(",")]
            if name != "sweep_gate" and None in grid[name]:
                raise ValueError
        except ValueError:
            parser.error(f"--{name.replace('_', '-')} must be comma-separated numbers, got {getattr(args, name)!r}")
    torch.set_num_threads(args.threads)

    from ..pipeline import StableDiffusionGuardPipeline
    from .defaults import write_testbed_defaults
    from .loading import load_pipeline

    started = time.perf_counter()
    pipe = load_pipeline(path=args.path, pipeline_class=StableDiffusionGuardPipeline)
    items = memorized_items(args.path)
    plain = plain_prompts(args.plain)
    s = args.guidance_scale
    seeds, sweep_seeds = list(range(args.seeds)), list(range(100, 100 + args.sweep_seeds))
    log = lambda text: print(text, flush=True)  # noqa: E731

    # 1. the copy threshold (model-free), then CFG as the baseline
    threshold, threshold_reason = choose_copy_threshold(items)
    log(f"copy threshold {threshold:.2f}: {threshold_reason}")

    def run(name, config, seed_list=seeds):
        result = evaluate_method(pipe, name, config, items, plain, seed_list, args.steps, copy_threshold=threshold)
        log(
            f"{name:28s} {_describe(config):50s} own {result.own_ssim.mean():.3f} copies {result.copied.mean():.2f} "
            f"mem-aligned {result.memorized_alignment.mean():.2f} plain-aligned {result.plain_alignment.mean():.2f} "
            f"({result.seconds:.0f}s)"
        )
        return result

    # 2. the published settings at the testbed's guidance scale, and r below s
    cfg = run("CFG", GuardConfig(method="cfg", guidance_scale=s))
    threshold_reason += (
        f" CFG samples of the memorized captions (s={s:g}) score median "
        f"{np.median(cfg.own_ssim):.3f}; {100 * cfg.copied.mean():.0f}% are above it."
    )
    main_results = [
        cfg,
        run("GUARD (published)", GuardConfig(guidance_scale=s)),
        run("GUARD (released code)", GuardConfig.preset("guard-released", guidance_scale=s)),
        run("attenuation only", GuardConfig.preset("attenuation", guidance_scale=s)),
        run("GUARD r=1", GuardConfig(guidance_scale=s, repulsion_scale=1.0)),
    ]
    related = [
        run(f"{name} (preset)", GuardConfig.preset(name, guidance_scale=s))
        for name in ("ren", "jain", "jain-opposite", "somepalli")
    ]
    # 3. the paper's guidance scale
    high = [
        run("CFG s=7.5", GuardConfig(method="cfg", guidance_scale=7.5)),
        run("GUARD (published) s=7.5", GuardConfig(guidance_scale=7.5)),
    ]

    # 4. the sweep, chosen the paper's way, then re-measured on the main seeds
    sweep_results, confirm_results, chosen = [], [], None
    if args.sweep:
        sweep_cfg = run("CFG (sweep seeds)", GuardConfig(method="cfg", guidance_scale=s), sweep_seeds)
        for tau in grid["sweep_tau"]:
            for alpha in grid["sweep_alpha"]:
                for r in grid["sweep_r"]:
                    for gate in grid["sweep_gate"]:
                        config = GuardConfig(
                            guidance_scale=s,
                            spike_threshold=tau,
                            spike_scale=alpha,
                            repulsion_scale=r,
                            gate_threshold=gate,
                        )
                        name = f"sweep tau={tau:g} a={alpha:g} r={r:g}" + ("" if gate is None else f" gate={gate:g}")
                        sweep_results.append(run(name, config, sweep_seeds))
        best = select_best(sweep_results, sweep_cfg)
        if best is not None and args.confirm_seeds:
            eligible = [r for r in sweep_results if is_eligible(r, sweep_cfg)]
            eligible = sorted(eligible, key=lambda r: r.own_ssim.mean())[:4]
            fresh = list(range(200, 200 + args.confirm_seeds))
            confirm_cfg = run("CFG (confirmation seeds)", GuardConfig(method="cfg", guidance_scale=s), fresh)
            confirm_results = [run(f"confirm {r.name[len('sweep ') :]}", r.config, fresh) for r in eligible]
            best = select_best(confirm_results, confirm_cfg)
            confirm_results.insert(0, confirm_cfg)
        if best is not None:
            chosen = run("GUARD (testbed default)", best.config)
            main_results.append(chosen)
        sweep_results.insert(0, sweep_cfg)

    published = main_results[1]
    default_result = chosen if chosen is not None else published
    if args.write_default:
        if chosen is not None:
            where = (
                f"the sweep's eligible settings re-measured on {args.confirm_seeds} fresh seeds"
                if confirm_results
                else f"the sweep (tau x alpha x r at s={s:g}, {len(sweep_seeds)} seeds)"
            )
            reason = (
                f"lowest own-image SSIM in {where} among "
                f"settings whose memorized and plain alignment stay within {100 * ALIGNMENT_TOLERANCE:.0f}% of "
                f"CFG's; measured on {len(seeds)} other seeds: own SSIM {chosen.own_ssim.mean():.3f} vs CFG "
                f"{cfg.own_ssim.mean():.3f}, plain alignment {chosen.plain_alignment.mean():.2f} vs "
                f"{cfg.plain_alignment.mean():.2f}"
            )
        else:
            reason = "published GUARD setting (no sweep run or no sweep setting met the alignment rule)"
        write_testbed_defaults(
            default_result.config,
            reason,
            threshold,
            threshold_reason,
            guidance_scale_reason=f"s={s:g}: the testbed's CFG renders plain prompts right "
            f"there; see docs/testbed_efficacy.md",
            folder=args.path,
        )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = efficacy_grid(
        [cfg, published] + ([chosen] if chosen is not None else []), items, plain, out / "testbed_efficacy_grid.png"
    )
    trig, other = trigger_flag_shares(published, items)
    report = [
        "# GUARD on the shipped testbed",
        "",
        f"Written by `python -m guard.testbed.evaluate` ({args.steps} DDIM steps, {len(seeds)} seeds per prompt, "
        f"{len(items)} memorized and {len(plain)} plain prompts, guidance s={s:g}; {time.perf_counter() - started:.0f} s "
        f"on {torch.get_num_threads()} CPU thread(s)). Intervals: mean ± 95% t-interval half-width over "
        f"prompt×seed samples.",
        "",
        "Replication: SSIM of a sample to its prompt's training image (own) and to the nearest of the memorized "
        f"training images; a copy is own SSIM > {threshold:.2f}. {threshold_reason[0].upper() + threshold_reason[1:]}",
        "Alignment: background colour, shape colour and shape read from the pixels (`guard.metrics.alignment`); "
        "'aligned' = all three right. For memorized prompts it is judged against the shape caption inside them.",
        "",
        "## Published settings and the testbed default",
        "",
        results_table(main_results),
        "",
        "## Related inference-time methods (their presets, same s)",
        "",
        results_table(related),
        "",
        "## At the paper's guidance scale (s = 7.5)",
        "",
        results_table(high),
        "",
    ]
    if sweep_results:
        report += [
            "## Sweep (chosen the paper's way: lowest own SSIM with alignment no worse than 15% below CFG)",
            "",
            f"{len(sweep_seeds)} other seeds per prompt.",
            "",
            results_table(sweep_results),
            "",
        ]
    if confirm_results:
        report += [
            "## Confirmation (the sweep's best eligible settings on fresh seeds; the default is chosen here)",
            "",
            f"{args.confirm_seeds} seeds per prompt, disjoint from the sweep's and the main table's.",
            "",
            results_table(confirm_results),
            "",
        ]
    report += [
        "## Which tokens the spike rule flags (GUARD, published tau = 0.1)",
        "",
        f"Over the memorized prompts the trigger words are attenuated in {100 * trig:.0f}% of their spike checks, "
        f"the other caption words in {100 * other:.0f}%.",
        "",
        flags_table(published, items, plain),
        "",
    ]
    if chosen is not None:
        trig, other = trigger_flag_shares(chosen, items)
        report += [
            f"## Which tokens the testbed default flags (tau = {chosen.config.spike_threshold:g})",
            "",
            f"Over the memorized prompts the trigger words are attenuated in {100 * trig:.0f}% of their spike checks, "
            f"the other caption words in {100 * other:.0f}%.",
            "",
            flags_table(chosen, items, plain),
            "",
        ]
    report += [
        f"![samples]({grid.name})",
        "",
    ]
    (out / "testbed_efficacy.md").write_text("\n".join(report))
    (out / "testbed_efficacy.json").write_text(
        json.dumps(
            {
                r.name: {"config": _describe(r.config), **{k: list(v) for k, v in r.summary().items()}}
                for r in main_results + related + high + sweep_results + confirm_results
            },
            indent=2,
        )
        + "\n"
    )
    log(f"wrote {out / 'testbed_efficacy.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
