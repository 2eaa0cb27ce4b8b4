"""Efficacy of GUARD on the testbed: replication and alignment per method, with intervals.

    python -m guard.testbed.evaluate --out DIR [--seeds 8] [--steps 20] [--sweep [--confirm-seeds 6]]
                                     [--path TESTBED_FOLDER] [--write-default] [--runs RUNS_DIR]

Writes DIR/testbed_efficacy.md, .json and a PNG grid. It always measures the testbed's recorded
default beside the published settings; ``--sweep`` re-runs the paper's selection on a grid, and
only ``--write-default`` records the chosen setting in the testbed folder (the shipped weights
when ``--path`` is not given). Every setting is sampled and scored by guard.evaluation's runner
(the testbed's pixel metrics as its scorers); ``--runs`` keeps those run directories, so that a
killed study resumes. The pieces are in :mod:`guard.testbed.efficacy`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..config import GuardConfig
from .assets import MemorizedItem, memorized_items, plain_prompts
from .efficacy import (
    ALIGNMENT_TOLERANCE,
    MethodResult,
    choose_copy_threshold,
    evaluate_method,
    is_eligible,
    run_folder_name,
    select_best,
)


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
        if config.spike_tokens == "first-step":
            text += " first-step tokens"
        if config.gate_threshold is not None:  # the cosine gate as the sweep names it, any other by its detector
            detector = "" if config.gate_detector == "cosine" else f"{config.gate_detector}@"
            text += f" gate={detector}{config.gate_threshold:.4g}"
    return text


def results_table(results: list[MethodResult]) -> str:
    """Markdown table: replication and alignment per method (mean ± 95% t-interval half-width)."""
    lines = [
        "| method | setting | own SSIM ↓ | nearest SSIM ↓ | copies ↓ | nearest = own ↓ | memorized aligned ↑ "
        "| plain aligned ↑ | plain bg / colour / shape | cleared by the gate: memorized / plain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r.summary()
        cleared = (
            "–"
            if r.config.gate_threshold is None
            else f"{100 * r.memorized_cleared.mean():.0f} / {100 * r.plain_cleared.mean():.0f}%"
        )
        lines.append(
            f"| {r.name} | {_describe(r.config)} | {_fmt(s['own_ssim'])} | {_fmt(s['nearest_ssim'])} "
            f"| {_fmt(s['copied'], True)} | {_fmt(s['nearest_is_own'], True)} | {_fmt(s['memorized_alignment'], True)} "
            f"| {_fmt(s['plain_alignment'], True)} | {100 * s['plain_background'][0]:.0f} / "
            f"{100 * s['plain_colour'][0]:.0f} / {100 * s['plain_shape'][0]:.0f}% | {cleared} |"
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
        help="with --sweep: record the chosen setting and the copy threshold in the testbed folder (--path, "
        "else the installed package's shipped weights); nothing is written there without it",
    )
    parser.add_argument("--out", required=True, help="folder to write testbed_efficacy.md, .json and the PNG grid to")
    parser.add_argument(
        "--runs",
        help="keep each setting's images and rows in a run directory under this folder (guard.evaluation's "
        "layout); rerunning the same study there resumes it instead of sampling again",
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    for name in ("seeds", "sweep_seeds", "steps", "plain", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.confirm_seeds < 0:
        parser.error("--confirm-seeds must be >= 0")
    if args.write_default and not args.sweep:
        parser.error("--write-default records the sweep's choice: add --sweep")
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
    from .defaults import default_guard_config, write_testbed_defaults
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
        out_dir = None if args.runs is None else Path(args.runs) / run_folder_name(name)
        result = evaluate_method(
            pipe, name, config, items, plain, seed_list, args.steps, copy_threshold=threshold, out_dir=out_dir
        )
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
    try:  # the setting recorded with the testbed, measured on these seeds whether or not a sweep runs
        recorded = run("GUARD (testbed default)", default_guard_config(args.path))
        main_results.append(recorded)
    except FileNotFoundError:
        recorded = None
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
            chosen = run("GUARD (sweep choice)", best.config)
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
    shown = [cfg, published] + [r for r in (recorded, chosen) if r is not None]
    grid = efficacy_grid(shown, items, plain, out / "testbed_efficacy_grid.png")
    trig, other = trigger_flag_shares(published, items)
    report = [
        "# GUARD on the shipped testbed",
        "",
        f"Written by `python -m guard.testbed.evaluate` ({args.steps} DDIM steps, {len(seeds)} seeds per prompt, "
        f"{len(items)} memorized and {len(plain)} plain prompts, guidance s={s:g}; "
        f"{time.perf_counter() - started:.0f} s on {torch.get_num_threads()} CPU thread(s)). Intervals: "
        "mean ± 95% t-interval half-width over prompt×seed samples.",
        "",
        "Replication: SSIM of a sample to its prompt's training image (own) and to the nearest of the memorized "
        f"training images; a copy is own SSIM > {threshold:.2f}. {threshold_reason[0].upper() + threshold_reason[1:]}",
        "Alignment: background colour, shape colour and shape read from the pixels "
        "(`guard.testbed.metrics.alignment`); 'aligned' = all three right. For memorized prompts it is judged "
        "against the shape caption inside them.",
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
    for result in (r for r in (recorded, chosen) if r is not None):
        trig, other = trigger_flag_shares(result, items)
        report += [
            f"## Which tokens the {result.name} flags (tau = {result.config.spike_threshold:g})",
            "",
            f"Over the memorized prompts the trigger words are attenuated in {100 * trig:.0f}% of their spike checks, "
            f"the other caption words in {100 * other:.0f}%.",
            "",
            flags_table(result, items, plain),
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
