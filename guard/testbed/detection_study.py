"""How well first-step scores tell memorized prompts from plain ones on the testbed, variants included.

    python -m guard.testbed.detection_study --out DIR [--seeds 4] [--steps 20] [--score-steps 1,2,5]

For every memorized item's variants (:mod:`guard.testbed.variants`) and every plain caption (as
is, and credited to the training data's made-up artists), it samples under CFG to see which
prompts really copy, computes each detector's scores (:mod:`guard.detection`) from the first
``k`` steps, and writes ``DIR/testbed_detection.md`` (and ``.json``): per score and ``k``, AUC and
TPR at 1% FPR with 95% bootstrap intervals (resampling prompts), for each kind of variant against
the plain prompts and for the samples that copy against those that do not.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import GuardConfig
from ..detection import DETECTORS, MEMORIZED_IF_HIGH, detect
from .variants import KINDS, Variant, memorized_variants, plain_variants

#: False-positive rate at which the true-positive rate is read (the detection literature's 1%).
FPR = 0.01


def roc_auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (the Mann-Whitney AUC)."""
    both = np.concatenate([positives, negatives])
    ranks = _average_ranks(both)
    n_pos, n_neg = len(positives), len(negatives)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        stop = start
        while stop + 1 < len(values) and sorted_values[stop + 1] == sorted_values[start]:
            stop += 1
        ranks[order[start : stop + 1]] = (start + stop) / 2 + 1
        start = stop + 1
    return ranks


def tpr_at_fpr(positives: np.ndarray, negatives: np.ndarray, fpr: float = FPR) -> float:
    """Share of positives above the threshold that at most ``fpr`` of the negatives exceed."""
    threshold = np.quantile(negatives, 1.0 - fpr, method="higher")
    return float(np.mean(positives > threshold))


def bootstrap(statistic, positives: list[np.ndarray], negatives: list[np.ndarray], rounds: int = 1000,
              seed: int = 0) -> tuple[float, float, float]:  # fmt: skip
    """The statistic on all samples and its 95% percentile interval, resampling prompts (each
    prompt's samples stay together: images of one prompt are not independent)."""
    rng = np.random.default_rng(seed)
    value = statistic(np.concatenate(positives), np.concatenate(negatives))
    draws = []
    for _ in range(rounds):
        pos = [positives[i] for i in rng.integers(len(positives), size=len(positives))]
        neg = [negatives[i] for i in rng.integers(len(negatives), size=len(negatives))]
        draws.append(statistic(np.concatenate(pos), np.concatenate(neg)))
    low, high = np.quantile(draws, [0.025, 0.975])
    return value, float(low), float(high)


@dataclass
class Sampled:
    """Per prompt and seed: the scores of the first ``k`` steps, and what CFG drew."""

    variants: list[Variant]
    scores: dict[int, dict[str, np.ndarray]]  # k -> detector -> (prompts, seeds), higher = memorized
    copies: np.ndarray  # (prompts, seeds) bool: CFG's sample copies a memorized training image
    aligned: np.ndarray  # (prompts, seeds) float: CFG's sample shows what was asked (NaN: nothing asked)


def _generators(prompts: int, seeds: list[int]):
    return [torch.Generator().manual_seed(seed) for _ in range(prompts) for seed in seeds]


def sample_study(pipe, variants: list[Variant], items, threshold: float, seeds: list[int], steps: int,
                 score_steps: list[int], config: GuardConfig) -> Sampled:  # fmt: skip
    """Scores for every k and CFG's samples for every variant and seed."""
    from .efficacy import sample_images
    from .metrics import alignment, nearest_training

    prompts = [v.prompt for v in variants]
    scores = {}
    for k in score_steps:
        found = detect(pipe, prompts, steps=k, guard_config=config.replace(gate_threshold=None),
                       num_images_per_prompt=len(seeds), generator=_generators(len(prompts), seeds),
                       num_inference_steps=steps)  # fmt: skip
        scores[k] = {name: _memorized_up(name, found.get(name).numpy()) for name in DETECTORS}
    images, _ = sample_images(pipe, prompts, GuardConfig(method="cfg", guidance_scale=config.guidance_scale), seeds,
                              steps)  # fmt: skip
    training = np.stack([item.image for item in items])
    copies = np.zeros((len(prompts), len(seeds)), dtype=bool)
    aligned = np.full((len(prompts), len(seeds)), np.nan)
    for p, variant in enumerate(variants):
        copies[p] = nearest_training(images[p], training)[1] > threshold
        if variant.asked is not None:
            aligned[p] = [alignment(image, variant.asked_caption)["all_ok"] for image in images[p]]
    return Sampled(variants, scores, copies, aligned)


def _memorized_up(name: str, values: np.ndarray) -> np.ndarray:
    """Scores oriented so that higher means memorized (the cosine is negated)."""
    return values if MEMORIZED_IF_HIGH[name] else -values


def detection_rows(study: Sampled) -> list[dict]:
    """AUC and TPR@1%FPR per (k, score, positives), negatives the plain prompts (or non-copying samples)."""
    kinds = [v.kind for v in study.variants]
    negative_prompts = [p for p, v in enumerate(study.variants) if v.item is None]
    groups = {kind: [p for p, k in enumerate(kinds) if k == kind] for kind in KINDS}
    groups["all variants"] = [p for p, v in enumerate(study.variants) if v.item is not None]
    rows = []
    for k, by_score in study.scores.items():
        for name, values in by_score.items():
            negatives = [values[p] for p in negative_prompts]
            for group, members in groups.items():
                positives = [values[p] for p in members]
                rows.append(_row(k, name, group, positives, negatives))
            # by outcome: samples that copy under CFG against plain samples that do not
            copied = [values[p][study.copies[p]] for p in groups["all variants"] if study.copies[p].any()]
            clean = [values[p][~study.copies[p]] for p in negative_prompts if (~study.copies[p]).any()]
            if copied and clean:
                rows.append(_row(k, name, "samples that copy (CFG)", copied, clean))
    return rows


def _row(k, name, group, positives, negatives) -> dict:
    auc = bootstrap(roc_auc, positives, negatives)
    tpr = bootstrap(tpr_at_fpr, positives, negatives)
    return dict(steps=k, score=name, positives=group, n_pos=int(sum(len(p) for p in positives)),
                n_neg=int(sum(len(n) for n in negatives)), auc=auc, tpr=tpr)  # fmt: skip


def variant_table(study: Sampled) -> list[str]:
    lines = ["| prompts | prompts x seeds | CFG copies | CFG aligned to the asked caption |", "|---|---:|---:|---:|"]
    kinds = list(KINDS) + ["plain", "plain, credited"]
    for kind in kinds:
        members = [p for p, v in enumerate(study.variants) if v.kind == kind]
        if not members:
            continue
        copies = study.copies[members]
        aligned = study.aligned[members]
        shown = "–" if np.isnan(aligned).all() else f"{100 * np.nanmean(aligned):.0f}%"
        lines.append(f"| {kind} | {copies.size} | {100 * copies.mean():.0f}% | {shown} |")
    return lines


def _fmt(triple) -> str:
    value, low, high = triple
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write testbed_detection.md and .json to")
    parser.add_argument("--path", default=None, help="testbed pipeline folder (default: the shipped weights)")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps of a run (the schedule the scores see)")
    parser.add_argument("--score-steps", default="1,2,5", help="first-step counts the scores average over")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.steps < 1:
        parser.error("--seeds and --steps must be >= 1")
    try:
        score_steps = sorted({int(k) for k in args.score_steps.split(",")})
    except ValueError:
        parser.error(f"--score-steps must be comma-separated integers, got {args.score_steps!r}")
    if score_steps[0] < 1 or score_steps[-1] > args.steps:
        parser.error(f"--score-steps must lie in 1..{args.steps}")
    torch.set_num_threads(args.threads)

    from ..pipeline import StableDiffusionGuardPipeline
    from .assets import memorized_items, plain_prompts
    from .defaults import copy_threshold, testbed_guard_config
    from .loading import load_pipeline

    started = time.perf_counter()
    pipe = load_pipeline(path=args.path, pipeline_class=StableDiffusionGuardPipeline)
    items = memorized_items(args.path)
    config = testbed_guard_config(args.path)
    variants = memorized_variants(items) + plain_variants(plain_prompts())
    seeds = list(range(1000, 1000 + args.seeds))  # seeds no testbed setting was chosen on
    study = sample_study(pipe, variants, items, copy_threshold(args.path), seeds, args.steps, score_steps, config)
    rows = detection_rows(study)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Memorization detection on the testbed",
        "",
        f"Written by `python -m guard.testbed.detection_study` ({len(variants)} prompts x {len(seeds)} seeds "
        f"(seeds {seeds[0]}-{seeds[-1]}, used by no choice of setting), {args.steps} DDIM steps, scores from the "
        f"setting tau = {config.spike_threshold:g}, alpha = {config.spike_scale:g} at s = {config.guidance_scale:g};"
        f" {time.perf_counter() - started:.0f} s on {torch.get_num_threads()} CPU thread(s)).",
        "",
        "## What the prompts do under CFG",
        "",
        "A copy: the sample's SSIM to some memorized training image exceeds the copy threshold.",
        "",
        *variant_table(study),
        "",
        "## Detection: AUC and TPR at 1% FPR (95% bootstrap intervals over prompts)",
        "",
        "Negatives: the plain prompts (as they are and credited to the training data's made-up artists), "
        "except in the last row of each block, which compares the samples that copy under CFG with the "
        "plain samples that do not. Scores are oriented so that higher means memorized (the cosine is negated).",
        "",
        "| first steps | score | positives | n pos / neg | AUC | TPR @ 1% FPR |",
        "|---:|---|---|---:|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['steps']} | {row['score']} | {row['positives']} | {row['n_pos']} / {row['n_neg']} | "
                     f"{_fmt(row['auc'])} | {_fmt(row['tpr'])} |")  # fmt: skip
    (out / "testbed_detection.md").write_text("\n".join(lines) + "\n")
    (out / "testbed_detection.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {out / 'testbed_detection.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
