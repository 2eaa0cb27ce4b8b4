"""How well first-step scores tell memorized prompts from plain ones on the testbed, variants included,
and the memorization gate chosen on them.

    python -m guard.testbed.detection_study --out DIR [--seeds 4] [--steps 20] [--score-steps 1,2,5]
                                            [--gate-sweep [--write-default] | --surgical | --holdout]

For every memorized item's variants (:mod:`guard.testbed.variants`) and every plain caption (as
is, and credited to the training data's made-up artists), it samples under CFG to see which
prompts really copy, computes each detector's scores (:mod:`guard.detection`) from the first
``k`` steps, and writes ``DIR/testbed_detection.md`` (and ``.json``): per score and ``k``, AUC and
TPR at 1% FPR with 95% bootstrap intervals (resampling prompts), for each kind of variant against
the plain prompts and for the samples that copy against those that do not.

``--gate-sweep`` then chooses the testbed's GUARD setting with the gate the paper's way, on the
variants as well as the exact captions: the lowest mean SSIM to the related memorized image
among settings whose alignment to the asked caption stays within 15% of CFG's, whose plain
prompts stay aligned (at least 95% of the plain samples CFG draws right, same prompt and seed, and
within 15% of CFG's alignment) and whose copies are at most half CFG's, measured on sweep seeds;
the best three are re-measured on other seeds, where the choice is made; ``--write-default``
records it with the shipped weights. ``--surgical`` measures what GUARD draws for a trigger attached
to another caption, ``--holdout`` the recorded setting against CFG on seeds no stage chooses on.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import LINEAR_DETECTORS, GuardConfig
from ..detection import DETECTORS, MEMORIZED_IF_HIGH, detect, gate_rule
from .variants import KINDS, Variant, memorized_variants, plain_variants

#: False-positive rate at which the true-positive rate is read (the detection literature's 1%).
FPR = 0.01
#: The GUARD setting the detection scores come from and the surgical stage varies, whatever the testbed
#: records, so that the study reproduces after the recorded setting changes (the testbed's before this study).
STUDY_BASE = dict(spike_threshold=4.0, spike_scale=0.45, repulsion_scale=1.0, spike_tokens="per-check")


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


def bootstrap(statistic, positives: list[np.ndarray], negatives: list[np.ndarray] | None = None, rounds: int = 1000,
              seed: int = 0) -> tuple[float, float, float]:  # fmt: skip
    """The statistic on all samples and its 95% percentile interval, resampling prompts (each
    prompt's samples stay together: images of one prompt are not independent). Without
    ``negatives`` the statistic takes the positives alone."""
    rng = np.random.default_rng(seed)

    def on(pos, neg):
        return statistic(np.concatenate(pos)) if neg is None else statistic(np.concatenate(pos), np.concatenate(neg))

    value = on(positives, negatives)
    draws = []
    for _ in range(rounds):
        pos = [positives[i] for i in rng.integers(len(positives), size=len(positives))]
        neg = None if negatives is None else [negatives[i] for i in rng.integers(len(negatives), size=len(negatives))]
        draws.append(on(pos, neg))
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
        found = detect(pipe, prompts, steps=k, guard_config=config,
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
    """Scores oriented so that higher means memorized (the cosine is negated); its own inverse."""
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


# ---------------------------------------------------------------------------------------------
# The gate, chosen on the variants

ALIGNMENT_TOLERANCE = 0.15  # the paper's rule: alignment no worse than 15% below CFG's
#: And plain prompts stay aligned: of the plain samples CFG draws right, at least this share stays right
#: (same prompt and seed). Paired with CFG because CFG itself misdraws some plain samples (93% aligned on
#: the confirmation seeds), which no gate can be asked to fix.
PLAIN_ALIGNED = 0.95
#: A gate that clears nearly everything meets the alignment rule by being CFG; the issue's bar is that
#: copies fall as they do for exact captions, so a chosen setting must at least halve CFG's copies.
PROTECTED_COPIES = 0.5
#: GUARD settings (alpha, r) at tau = 4 the gates are tried on (r = 0: attenuation without repulsion).
BASES = ((0.45, 1.0), (0.3, 1.0), (0.45, 0.5), (0.45, 0.0))
#: Of those, the ones also tried with first-step spike tokens.
FIRST_STEP_BASES = ((0.45, 1.0), (0.45, 0.5), (0.45, 0.0))
#: The confirmation's first seed (seeds 3000-3002 confirmed an earlier study's candidates).
CONFIRM_SEED = 6000
#: Seeds of the held-out check of the recorded setting (``--holdout``): used by no choice and no other stage.
HOLDOUT_SEED = 7000


@dataclass
class GateResult:
    """One setting's outcome on the sweep's prompts and seeds."""

    name: str
    config: GuardConfig
    own_ssim: float  # mean SSIM of memorized variants' samples to their item's training image
    copies: float  # share of memorized variants' samples that copy some memorized image
    copies_by_kind: dict[str, float]
    aligned: float  # memorized variants with an asked caption: share aligned to it
    aligned_by_kind: dict[str, float]
    plain_aligned: float
    cleared_memorized: float  # share of memorized variants' samples the gate cleared
    cleared_plain: float
    plain_kept: float = float("nan")  # of the plain samples CFG draws aligned (same seed), the share still aligned


@dataclass
class Outcomes:
    """Per variant and seed, (prompts, seeds) arrays: what one run's samples show."""

    copies: np.ndarray  # bool: copies some memorized training image
    aligned: np.ndarray  # float: shows the asked caption (NaN where nothing is asked)
    own: np.ndarray  # SSIM to the variant's item's training image (NaN for plain prompts)

    def where(self, flagged: np.ndarray, other: "Outcomes") -> "Outcomes":
        """These outcomes where ``flagged``, ``other``'s elsewhere."""
        pairs = ((self.copies, other.copies), (self.aligned, other.aligned), (self.own, other.own))
        return Outcomes(*(np.where(flagged, mine, theirs) for mine, theirs in pairs))


def sample_outcomes(images: np.ndarray, variants: list[Variant], items, threshold: float) -> Outcomes:
    """Score (prompts, seeds, H, W, 3) samples: copies, alignment to the asked caption, own SSIM."""
    from .metrics import alignment, nearest_training, ssim

    training = np.stack([item.image for item in items])
    shape = images.shape[:2]
    copies, aligned, own = np.zeros(shape, dtype=bool), np.full(shape, np.nan), np.full(shape, np.nan)
    for p, variant in enumerate(variants):
        copies[p] = nearest_training(images[p], training)[1] > threshold
        if variant.asked is not None:
            aligned[p] = [alignment(image, variant.asked_caption)["all_ok"] for image in images[p]]
        if variant.item is not None:
            own[p] = np.atleast_1d(ssim(images[p], items[variant.item].image))
    return Outcomes(copies, aligned, own)


def summarize(name: str, config: GuardConfig, variants: list[Variant], outcomes: Outcomes,
              cleared: np.ndarray, cfg: Outcomes | None = None) -> GateResult:  # fmt: skip
    """A setting's GateResult from its per-sample outcomes and the gate's (prompts, seeds) decisions;
    with ``cfg``, CFG's outcomes on the same prompts and seeds, also the plain samples it keeps aligned."""
    memorized = np.array([v.item is not None for v in variants])
    kinds = np.array([v.kind for v in variants])
    asked = memorized[:, None] & ~np.isnan(outcomes.aligned)

    def by_kind(values, where):
        return {kind: _mean(values[(kinds == kind)[:, None] & where]) for kind in KINDS if (kinds == kind).any()}

    everywhere = np.ones(outcomes.copies.shape, dtype=bool)
    return GateResult(
        name, config, _mean(outcomes.own[memorized]), _mean(outcomes.copies[memorized]),
        by_kind(outcomes.copies, everywhere), _mean(outcomes.aligned[asked]),
        {k: v for k, v in by_kind(outcomes.aligned, asked).items() if not np.isnan(v)},
        _mean(outcomes.aligned[~memorized[:, None] & ~np.isnan(outcomes.aligned)]),
        _mean(cleared[memorized]), _mean(cleared[~memorized]),
        float("nan") if cfg is None else _mean(outcomes.aligned[~memorized[:, None] & (cfg.aligned == 1)]),
    )  # fmt: skip


def measure_setting(pipe, name, config, variants, items, threshold, seeds, steps) -> GateResult:
    """Sample every variant under ``config`` and score copies and alignment to the asked caption."""
    from .efficacy import sample_images

    images, report = sample_images(pipe, [v.prompt for v in variants], config, seeds, steps)
    cleared = np.zeros((len(variants), len(seeds)))
    if report.cleared is not None:
        cleared = report.cleared.numpy().astype(float)
    return summarize(name, config, variants, sample_outcomes(images, variants, items, threshold), cleared)


def _mean(values) -> float:
    """The mean, NaN for no values (a setting measured without plain prompts, say)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()) if values.size else float("nan")


def eligible(result: GateResult, cfg: GateResult) -> bool:
    """The paper's alignment rule, protection (copies at most half CFG's) and plain prompts kept aligned."""
    limit = 1.0 - ALIGNMENT_TOLERANCE
    return (result.aligned >= limit * cfg.aligned and result.plain_aligned >= limit * cfg.plain_aligned
            and result.plain_kept >= PLAIN_ALIGNED and result.copies <= PROTECTED_COPIES * cfg.copies)  # fmt: skip


def linear_weights(study: Sampled, k: int) -> tuple[tuple[float, float, float], dict]:
    """Weights of the "linear" gate from the plain prompts' scores: each of the cosine and the entropy
    standardised by the plain prompts' spread, oriented by the testbed's memorized direction (both lower
    when memorized here), summed; Wen's norm, which does not separate on the testbed, left out."""
    plain = [p for p, v in enumerate(study.variants) if v.item is None]
    raw = {name: _memorized_up(name, study.scores[k][name]) for name in ("cosine", "entropy")}  # back to raw values
    spread = {name: float(values[plain].std()) for name, values in raw.items()}
    weights = (0.0, -1.0 / spread["cosine"], -1.0 / spread["entropy"])
    return weights, spread


def sweep_prompts(variants: list[Variant]) -> list[Variant]:
    """The gate sweep's prompts: every memorized variant and every other plain prompt (affordable)."""
    return [v for v in variants if v.item is not None] + [v for v in variants if v.item is None][::2]


def gate_candidates(
    study: Sampled, base: GuardConfig, k: int, flag_rates=(0.02, 0.05, 0.1)
) -> list[tuple[str, GuardConfig]]:
    """Gates that flag (at most) the given shares of the plain prompts' samples in the detection
    study, per detector, on ``base``'s GUARD setting: the cosine, the spike share and the linear gate."""
    plain = [p for p, v in enumerate(study.variants) if v.item is None]
    weights, _ = linear_weights(study, k)
    raw = {name: _memorized_up(name, study.scores[k][name]) for name in DETECTORS}  # the orientation undone
    linear = sum(w * raw[name] for w, name in zip(weights, LINEAR_DETECTORS) if w)
    candidates = []
    for rate in flag_rates:
        cosine = float(np.quantile(raw["cosine"][plain], rate))  # cleared above: flag the lowest `rate`
        candidates.append(
            (f"cosine {rate:.0%}", base.replace(gate_threshold=cosine, gate_detector="cosine", gate_steps=k))
        )
        # Cleared below: flag the highest `rate`. Spike shares are fractions of a few checks and tie,
        # so the threshold sits just above the quantile (flagging at most `rate`).
        share = float(np.nextafter(np.quantile(raw["spike_share"][plain], 1.0 - rate, method="higher"), np.inf))
        gate = base.replace(gate_threshold=min(share, 1.0), gate_detector="spike_share", gate_steps=k)
        candidates.append((f"spike share {rate:.0%}", gate))
        line = float(np.quantile(linear[plain], 1.0 - rate))
        candidates.append((f"linear {rate:.0%}", base.replace(gate_threshold=line, gate_detector="linear",
                                                               gate_weights=weights, gate_steps=k)))  # fmt: skip
    return candidates


def gate_table(results: list[GateResult]) -> list[str]:
    kinds = list(KINDS)
    lines = ["| setting | own SSIM | copies | copies per kind (" + " / ".join(kinds) + ") | aligned to the asked"
             " caption | plain aligned | plain kept aligned | cleared: variants / plain |",
             "|---|---:|---:|---|---:|---:|---:|---|"]  # fmt: skip
    for r in results:
        per_kind = " / ".join(f"{100 * r.copies_by_kind.get(k, float('nan')):.0f}" for k in kinds)
        cleared = f"{100 * r.cleared_memorized:.0f}% / {100 * r.cleared_plain:.0f}%"
        lines.append(f"| {r.name} | {r.own_ssim:.3f} | {100 * r.copies:.0f}% | {per_kind} | {100 * r.aligned:.0f}% |"
                     f" {100 * r.plain_aligned:.0f}% | {100 * r.plain_kept:.1f}% | {cleared} |")  # fmt: skip
    return lines


def flagged_plain(name: str, variants: list[Variant], outcomes: Outcomes, cleared: np.ndarray,
                  cfg: Outcomes) -> list[str]:  # fmt: skip
    """Table rows: each plain prompt with a sample the gate flagged, and how many of those samples CFG
    and the setting draw aligned."""
    rows = []
    for p, variant in enumerate(variants):
        flagged = ~cleared[p].astype(bool)
        if variant.item is None and flagged.any():
            by_cfg, by_setting = (int(np.nansum(o.aligned[p][flagged])) for o in (cfg, outcomes))
            rows.append(f"| {name} | {variant.prompt} | {flagged.sum()} of {flagged.size} | {by_cfg} | {by_setting} |")
    return rows


def _describe(config: GuardConfig) -> str:
    if config.method != "guard":
        return f"{config.method} s={config.guidance_scale:g}"
    text = f"tau={config.spike_threshold:g} alpha={config.spike_scale:g} r={config.repulsion_scale:g}"
    if config.spike_tokens == "first-step":
        text += " first-step tokens"
    if config.gate_threshold is not None:
        text += f" gate={config.gate_detector}@{config.gate_threshold:.4g}"
        if config.gate_weights is not None:
            text += " w=(" + ", ".join(f"{w:.3g}" for w in config.gate_weights) + ")"
        text += f" k={config.gate_steps}"
    return text


def gate_sweep(pipe, study: Sampled, items, config: GuardConfig, args, record: dict) -> list[str]:
    """The gated setting chosen the paper's way on the variants, re-measured on fresh seeds.

    The sweep is exact without a gated run per candidate: a gated run gives each cleared image CFG's
    sample of the same seed and each flagged one the ungated GUARD's (to float tolerance, tested in
    tests/test_detection.py), and its decision reads the first steps' scores, which the ungated run
    reports. So each base setting is sampled once without the gate, and every gate on it is the
    composite of that run and CFG's. The confirmation really runs the gated pipeline.
    """
    from ..detection import gate_score, is_cleared
    from .defaults import copy_threshold, record_testbed_setting
    from .efficacy import sample_images

    threshold = copy_threshold(args.path)
    s = config.guidance_scale
    sweep_variants = sweep_prompts(study.variants)
    prompts = [v.prompt for v in sweep_variants]
    sweep_seeds = list(range(2000, 2000 + args.sweep_seeds))
    confirm_seeds = list(range(CONFIRM_SEED, CONFIRM_SEED + args.confirm_seeds))
    shipped_base = config.replace(gate_threshold=None, gate_detector="cosine", gate_steps=1, gate_weights=None)
    bases = [(f"alpha={alpha:g}, r={r:g}", shipped_base.replace(spike_threshold=4.0, spike_scale=alpha,
                                                                 repulsion_scale=r, spike_tokens="per-check"))
             for alpha, r in BASES]  # fmt: skip
    bases += [(f"{label}, first-step tokens", base.replace(spike_tokens="first-step"))
              for label, base in bases if (base.spike_scale, base.repulsion_scale) in FIRST_STEP_BASES]  # fmt: skip
    shipped_gate = {}
    if config.gate_threshold is not None and config.gate_steps == args.gate_steps:  # its composite reads these scores
        shipped_gate = {name: getattr(config, name) for name in ("gate_threshold", "gate_detector", "gate_weights")}
    cfg_config = GuardConfig(method="cfg", guidance_scale=s)

    def show(result):
        print(f"{result.name:40s} {_describe(result.config):60s} own {result.own_ssim:.3f} "
              f"copies {result.copies:.2f} aligned {result.aligned:.2f} plain {result.plain_aligned:.2f}",
              flush=True)  # fmt: skip
        return result

    def sample(setting, seeds):
        # A gated setting scores the steps its gate decides on (more would move the decision).
        steps = args.gate_steps if setting.gate_threshold is None else setting.gate_steps
        images, report = sample_images(pipe, prompts, setting, seeds, args.steps, detection_steps=steps)
        return sample_outcomes(images, sweep_variants, items, threshold), report

    def measure(name, setting, seeds, cfg_outcomes=None):
        """A setting's result against CFG's outcomes on the same seeds (None: this is CFG), its outcomes
        and its gate's decisions."""
        outcomes, report = sample(setting, seeds)
        cleared = np.zeros(outcomes.copies.shape) if report.cleared is None else report.cleared.numpy()
        reference = outcomes if cfg_outcomes is None else cfg_outcomes
        return show(summarize(name, setting, sweep_variants, outcomes, cleared, reference)), outcomes, cleared

    cfg, cfg_outcomes, _ = measure("CFG", cfg_config, sweep_seeds)
    shipped, shipped_outcomes, _ = measure("shipped default (before)", config, sweep_seeds, cfg_outcomes)

    def composite(gate, ungated, scores):
        cleared = is_cleared(gate.gate_detector, gate_score(gate, scores), gate.gate_threshold).numpy()
        return ungated.where(~cleared, cfg_outcomes), cleared

    sweep, runs = [], {}
    for label, base in bases:
        ungated, report = sample(base, sweep_seeds)
        runs[base] = ungated, {name: report.detection.get(name) for name in DETECTORS}
        none = np.zeros(ungated.copies.shape)
        sweep.append(
            show(summarize(f"GUARD without the gate, {label}", base, sweep_variants, ungated, none, cfg_outcomes))
        )
        candidates = gate_candidates(study, base, args.gate_steps)
        if shipped_gate:
            candidates.append(("shipped gate", base.replace(gate_steps=args.gate_steps, **shipped_gate)))
        for name, gate in candidates:
            outcomes, cleared = composite(gate, *runs[base])
            sweep.append(show(summarize(f"{name} on {label}", gate, sweep_variants, outcomes, cleared, cfg_outcomes)))
    # The shortcut checked once per study: the shipped setting's real gated run against its composite.
    agreement = None
    if shipped_base in runs and config.gate_threshold is not None and config.gate_steps == args.gate_steps:
        shipped_composite = composite(config, *runs[shipped_base])[0]
        same_alignment = (shipped_composite.aligned == shipped_outcomes.aligned) | np.isnan(shipped_outcomes.aligned)
        agreement = float(np.mean((shipped_composite.copies == shipped_outcomes.copies) & same_alignment))
    ranked = sorted((r for r in sweep if eligible(r, cfg)), key=lambda r: r.own_ssim)[:3]
    confirm_cfg, confirm_cfg_outcomes, _ = measure("CFG (confirmation seeds)", cfg_config, confirm_seeds)
    confirmed, flagged = [], []
    for r in ranked:
        result, outcomes, cleared = measure(f"confirm {r.name}", r.config, confirm_seeds, confirm_cfg_outcomes)
        confirmed.append(result)
        if r.config.gate_threshold is not None:
            flagged += flagged_plain(r.name, sweep_variants, outcomes, cleared, confirm_cfg_outcomes)
    shipped_confirm, outcomes, cleared = measure("shipped default (before), confirmation seeds", config,
                                                 confirm_seeds, confirm_cfg_outcomes)  # fmt: skip
    if config.gate_threshold is not None:
        flagged += flagged_plain("shipped default (before)", sweep_variants, outcomes, cleared, confirm_cfg_outcomes)
    chosen = min((r for r in confirmed if eligible(r, confirm_cfg)), key=lambda r: r.own_ssim, default=None)
    weights, spread = linear_weights(study, args.gate_steps)
    base_list = ", ".join(f"({alpha:g}, {r:g})" for alpha, r in BASES)
    first_step_list = " and ".join(f"({alpha:g}, {r:g})" for alpha, r in FIRST_STEP_BASES)
    lines = [
        "",
        "## The gate, chosen on the variants",
        "",
        f"Candidates: GUARD at tau = 4 and s = {s:g} with (alpha, r) in {{{base_list}}}"
        f" and with {first_step_list} and first-step spike tokens, each "
        f"with a cosine, a spike-share or a linear gate deciding after {args.gate_steps} step(s), thresholds set to "
        f"flag 2%, 5% or 10% of the plain prompts' samples in the detection study above"
        + (f", and with the shipped gate ({gate_rule(config)})" if shipped_gate else "")
        + ". The sweep's gated rows are "
        "composites: each cleared sample is CFG's of the same seed, each flagged one the ungated GUARD's (what a "
        "gated run draws, to float tolerance; "
        + (
            ""
            if agreement is None
            else f"the shipped setting's real gated run agrees with its composite on "
            f"{100 * agreement:.1f}% of the samples' copy and alignment verdicts; "
        )
        + "the confirmation runs the gated pipeline). The linear gate sums the cosine and the entropy, each divided "
        f"by its spread over the plain prompts (std {spread['cosine']:.4g} and {spread['entropy']:.4g}) and negated "
        f"(both are lower for memorized prompts on this model): weights (wen, cosine, entropy) = "
        f"({', '.join(f'{w:.4g}' for w in weights)}). Rule: the lowest mean SSIM of the memorized variants' samples to "
        f"their item's training image among settings whose alignment to the asked caption is within "
        f"{100 * ALIGNMENT_TOLERANCE:.0f}% of CFG's, whose plain prompts stay aligned (plain kept aligned: of the "
        f"plain samples CFG draws right, the share the setting still draws right on the same prompt and seed, at "
        f"least {100 * PLAIN_ALIGNED:.0f}%; and plain alignment within {100 * ALIGNMENT_TOLERANCE:.0f}% of CFG's) and "
        f"whose copies are at most {100 * PROTECTED_COPIES:.0f}% of CFG's (a gate that clears nearly everything passes "
        f"the alignment rule by being CFG). The floor is paired with CFG because CFG itself misdraws some plain "
        f"samples (its plain prompts are {100 * cfg.plain_aligned:.1f}% aligned on the sweep seeds and "
        f"{100 * confirm_cfg.plain_aligned:.1f}% on the confirmation seeds), and a gate can only keep or lose what "
        f"CFG draws. The sweep ranks the settings that meet the rule; the best three are re-measured on other seeds, "
        f"where the choice is made. Sweep: {len(sweep_variants)} prompts x seeds {sweep_seeds}; confirmation: seeds "
        f"{confirm_seeds}, disjoint from the sweep's and the detection study's (`--holdout` re-measures the recorded "
        f"setting on seeds from {HOLDOUT_SEED}, which no stage chooses on).",
        "",
        "### Sweep",
        "",
        *gate_table([cfg, shipped] + sweep),
        "",
        "### Confirmation",
        "",
        *gate_table([confirm_cfg, shipped_confirm] + confirmed),
        "",
        "Plain prompts the confirmed gates flag (on the confirmation seeds), and how many of the flagged samples CFG "
        "and the setting draw aligned: the plain alignment a gate loses is lost here.",
        "",
        *(
            [
                "| setting | plain prompt | flagged samples | aligned under CFG | aligned under the setting |",
                "|---|---|---:|---:|---:|",
                *flagged,
            ]
            if flagged
            else ["None flagged."]
        ),
        "",
        f"Chosen: {'none met the rule' if chosen is None else chosen.name + ' (' + _describe(chosen.config) + ')'}.",
    ]
    record["gate"] = {"sweep": [r.__dict__ for r in [cfg, shipped] + sweep],
                      "confirmation": [r.__dict__ for r in [confirm_cfg, shipped_confirm] + confirmed],
                      "chosen": None if chosen is None else chosen.__dict__}  # fmt: skip
    if args.write_default and chosen is not None:
        reason = (f"lowest mean SSIM to the related memorized image over the memorized captions and their variants "
                  f"(python -m guard.testbed.detection_study --gate-sweep) among settings within "
                  f"{100 * ALIGNMENT_TOLERANCE:.0f}% of CFG's alignment to the asked caption with plain prompts >= "
                  f"{100 * PLAIN_ALIGNED:.0f}% of CFG's aligned samples kept and copies at most "
                  f"{100 * PROTECTED_COPIES:.0f}% of CFG's, "
                  f"on seeds {confirm_seeds}: own SSIM {chosen.own_ssim:.3f} vs "
                  f"CFG {confirm_cfg.own_ssim:.3f}, copies {100 * chosen.copies:.0f}% vs "
                  f"{100 * confirm_cfg.copies:.0f}%, "
                  f"plain aligned {100 * chosen.plain_aligned:.0f}% vs {100 * confirm_cfg.plain_aligned:.0f}% "
                  f"({100 * chosen.plain_kept:.0f}% of CFG's kept), aligned to the asked caption "
                  f"{100 * chosen.aligned:.0f}% vs {100 * confirm_cfg.aligned:.0f}%")  # fmt: skip
        record_testbed_setting(chosen.config, reason, args.path)
        lines.append(f"Recorded as the testbed's default ({reason}).")
    return lines


def surgical_study(pipe, items, config: GuardConfig, args) -> list[str]:
    """When the trigger is attached to another caption, does GUARD draw the caption asked for?

    Without the gate (so that attenuation is what is measured), for the spike scale alpha, the
    attenuated layers (the default blocks, or every cross-attention layer), the repulsion scale r
    and the spike tokens (per check, or fixed after the first step), on the variants that attach a
    trigger to another item's caption and on the exact captions.
    """
    from .defaults import copy_threshold

    variants = [v for v in memorized_variants(items) if v.kind in ("trigger on another caption", "exact")]
    seeds = list(range(4000, 4000 + args.confirm_seeds + 1))
    threshold = copy_threshold(args.path)
    settings = [("CFG", GuardConfig(method="cfg", guidance_scale=config.guidance_scale))]
    ungated = config.replace(gate_threshold=None, gate_detector="cosine", gate_steps=1, gate_weights=None,
                             **STUDY_BASE)  # fmt: skip
    for blocks, where in ((None, "default blocks"), (("down_blocks", "mid_block", "up_blocks"), "every layer")):
        for alpha in (0.45, 0.2, 0.05):
            settings.append((f"alpha={alpha:g}, {where}", ungated.replace(spike_scale=alpha, blocks=blocks)))
    # The repulsion pushes away from the plain prompt, which holds the asked caption as well as the trigger.
    for r in (0.0, 0.5, 2.0):
        settings.append((f"alpha={ungated.spike_scale:g}, default blocks, r={r:g}", ungated.replace(repulsion_scale=r)))
    # Which tokens: the rule also flags a caption's own words in a few checks; fixed first-step tokens do not.
    for r in (ungated.repulsion_scale, 0.5):
        settings.append((f"alpha={ungated.spike_scale:g}, default blocks, r={r:g}, first-step tokens",
                         ungated.replace(repulsion_scale=r, spike_tokens="first-step")))  # fmt: skip
    lines = ["", "## Surgical: the trigger attached to another caption", "",
             f"GUARD without the gate at tau = {ungated.spike_threshold:g}, r = {ungated.repulsion_scale:g} (unless a "
             f"row names r), s = {config.guidance_scale:g}; {len(variants)} prompts x seeds {seeds}. 'Asked' is the "
             "caption the prompt names (another item's for the attached trigger).", "",
             "| setting | attached: aligned to the asked caption | attached: copies | exact: copies | exact: aligned |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for name, setting in settings:
        result = measure_setting(pipe, name, setting, variants, items, threshold, seeds, args.steps)
        attached, exact = "trigger on another caption", "exact"
        lines.append(f"| {name} | {100 * result.aligned_by_kind[attached]:.0f}% | "
                     f"{100 * result.copies_by_kind[attached]:.0f}% | {100 * result.copies_by_kind[exact]:.0f}% | "
                     f"{100 * result.aligned_by_kind[exact]:.0f}% |")  # fmt: skip
        print(lines[-1], flush=True)
    return lines + paired_token_comparison(pipe, items, ungated, variants, threshold, args)


def prompt_interval(values: np.ndarray, where: np.ndarray, rounds: int = 2000) -> tuple[float, float, float]:
    """The mean of ``values[where]`` over (prompts, seeds) and its 95% bootstrap interval, resampling
    prompts (rows) with all their seeds: a prompt's samples are not independent of each other."""
    per_prompt = [values[p][where[p]].astype(np.float64) for p in np.flatnonzero(where.any(axis=1))]
    if not per_prompt:
        return float("nan"), float("nan"), float("nan")
    value, low, high = bootstrap(np.mean, per_prompt, rounds=rounds)
    return float(value), low, high


def holdout_study(pipe, items, config: GuardConfig, args) -> list[str]:
    """The recorded setting against CFG on seeds no choice saw, on the gate sweep's prompts, with
    intervals over prompts: what the choice's numbers are worth once the selection is out of them."""
    from .assets import plain_prompts
    from .defaults import copy_threshold
    from .efficacy import sample_images

    variants = sweep_prompts(memorized_variants(items) + plain_variants(plain_prompts()))
    seeds = list(range(HOLDOUT_SEED, HOLDOUT_SEED + args.confirm_seeds))
    threshold = copy_threshold(args.path)
    settings = {"CFG": GuardConfig(method="cfg", guidance_scale=config.guidance_scale), "recorded setting": config}
    runs = {}
    for name, setting in settings.items():
        images, report = sample_images(pipe, [v.prompt for v in variants], setting, seeds, args.steps,
                                       detection_steps=config.gate_steps)  # fmt: skip
        cleared = np.zeros((len(variants), len(seeds))) if report.cleared is None else report.cleared.numpy()
        runs[name] = sample_outcomes(images, variants, items, threshold), cleared
    cfg_outcomes = runs["CFG"][0]
    memorized = np.array([v.item is not None for v in variants])[:, None] & np.ones((1, len(seeds)), dtype=bool)
    kinds = np.array([v.kind for v in variants])[:, None]
    measures = [("copies, all variants", "copies", memorized)]
    measures += [(f"copies, {kind}", "copies", memorized & (kinds == kind)) for kind in KINDS]
    measures += [
        ("aligned to the asked caption", "aligned", memorized & ~np.isnan(cfg_outcomes.aligned)),
        ("plain aligned", "aligned", ~memorized),
        ("plain kept aligned (of CFG's aligned)", "aligned", ~memorized & (cfg_outcomes.aligned == 1)),
    ]
    lines = ["", "## Held out: the recorded setting on fresh seeds", "",
             f"The testbed's recorded setting ({_describe(config)}; its gate: {gate_rule(config)}) against CFG on "
             f"the gate sweep's {len(variants)} prompts x seeds {seeds}, which no choice or other stage used; 95% "
             "bootstrap intervals resampling prompts.", "",
             "| measure | CFG | recorded setting | samples |", "|---|---|---|---:|"]  # fmt: skip
    for label, field, where in measures:
        cells = [_percent(prompt_interval(getattr(runs[name][0], field), where)) for name in runs]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {int(where.sum())} |")
    cfg, default = (summarize(name, settings[name], variants, *runs[name], cfg_outcomes) for name in settings)
    verdict = "meets" if eligible(default, cfg) else "does not meet"
    lines += ["", f"The recorded setting {verdict} the choice's rule on these seeds; its gate cleared "
              f"{100 * default.cleared_memorized:.0f}% of the variants' samples and {100 * default.cleared_plain:.0f}% "
              "of the plain ones."]  # fmt: skip
    print("\n".join(lines), flush=True)
    return lines


def _percent(triple) -> str:
    value, low, high = triple
    return f"{100 * value:.0f}% [{100 * low:.0f}, {100 * high:.0f}]"


#: Seeds of the surgical stage's paired check, used by no choice of setting.
PAIRED_SEEDS = tuple(range(5000, 5010))


def paired_token_comparison(pipe, items, config: GuardConfig, variants, threshold, args) -> list[str]:
    """First-step against per-check spike tokens on the same prompts and seeds (fresh ones: the
    first-step rule was found on the stage's own seeds), with the difference's 95% bootstrap interval
    over prompts and seeds."""
    from .efficacy import sample_images

    seeds = list(PAIRED_SEEDS)
    prompts = [v.prompt for v in variants]
    outcomes = {}
    for tokens in ("per-check", "first-step"):
        images, _ = sample_images(pipe, prompts, config.replace(spike_tokens=tokens), seeds, args.steps)
        outcomes[tokens] = sample_outcomes(images, variants, items, threshold)
    kinds = np.array([v.kind for v in variants])
    lines = ["", f"Paired, on fresh seeds {seeds[0]}-{seeds[-1]} (the setting above, r = {config.repulsion_scale:g}): "
             "first-step against per-check spike tokens, with the difference's 95% bootstrap interval (prompts and "
             "seeds resampled).", "",
             "| prompts | measure | per-check | first-step | difference [95% interval] | samples |",
             "|---|---|---:|---:|---|---:|"]  # fmt: skip
    rng = np.random.default_rng(0)
    for kind, measure in (("trigger on another caption", "aligned"), ("trigger on another caption", "copies"),
                          ("exact", "aligned"), ("exact", "copies")):  # fmt: skip
        before, after = (getattr(outcomes[t], measure)[kinds == kind].astype(float) for t in outcomes)
        difference = after - before
        draws = []
        for _ in range(2000):
            rows = rng.integers(difference.shape[0], size=difference.shape[0])
            columns = rng.integers(difference.shape[1], size=difference.shape[1])
            draws.append(difference[rows][:, columns].mean())
        low, high = np.quantile(draws, [0.025, 0.975])
        what = "aligned to the asked caption" if measure == "aligned" else "copies"
        interval = f"{100 * difference.mean():+.0f} [{100 * low:+.0f}, {100 * high:+.0f}]"
        lines.append(f"| {kind} | {what} | {100 * before.mean():.0f}% | {100 * after.mean():.0f}% | {interval} | "
                     f"{difference.size} |")  # fmt: skip
        print(lines[-1], flush=True)
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
    parser.add_argument("--gate-sweep", action="store_true", help="choose the gated GUARD setting on the variants")
    parser.add_argument("--gate-steps", type=int, default=1, help="first steps the gate decides on")
    parser.add_argument(
        "--surgical",
        action="store_true",
        help="instead: only what GUARD draws for a trigger attached to another caption (DIR/testbed_surgical.md)",
    )
    parser.add_argument(
        "--holdout",
        action="store_true",
        help="instead: only the recorded setting against CFG on held-out seeds (DIR/testbed_holdout.md)",
    )
    parser.add_argument("--sweep-seeds", type=int, default=2)
    parser.add_argument("--confirm-seeds", type=int, default=3)
    parser.add_argument(
        "--write-default",
        action="store_true",
        help="with --gate-sweep: record the chosen setting with the testbed (--path, else the shipped weights)",
    )
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.steps < 1 or args.sweep_seeds < 1 or args.confirm_seeds < 1:
        parser.error("--seeds, --steps, --sweep-seeds and --confirm-seeds must be >= 1")
    if args.write_default and not args.gate_sweep:
        parser.error("--write-default records the gate sweep's choice: add --gate-sweep")
    if sum((args.gate_sweep, args.surgical, args.holdout)) > 1:
        parser.error("--gate-sweep, --surgical and --holdout are separate stages: choose one")
    try:
        score_steps = sorted({int(k) for k in args.score_steps.split(",")})
    except ValueError:
        parser.error(f"--score-steps must be comma-separated integers, got {args.score_steps!r}")
    if score_steps[0] < 1 or score_steps[-1] > args.steps:
        parser.error(f"--score-steps must lie in 1..{args.steps}")
    if args.gate_sweep and args.gate_steps not in score_steps:
        parser.error("--gate-steps must be one of --score-steps (the gate's thresholds come from those scores)")
    torch.set_num_threads(args.threads)

    from ..pipeline import StableDiffusionGuardPipeline
    from .assets import memorized_items, plain_prompts
    from .defaults import copy_threshold, testbed_guard_config
    from .loading import load_pipeline

    started = time.perf_counter()
    pipe = load_pipeline(path=args.path, pipeline_class=StableDiffusionGuardPipeline)
    items = memorized_items(args.path)
    config = testbed_guard_config(args.path)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.surgical:
        lines = ["# GUARD on an attached trigger (testbed)", *surgical_study(pipe, items, config, args)]
        (out / "testbed_surgical.md").write_text("\n".join(lines) + "\n")
        print(f"wrote {out / 'testbed_surgical.md'}")
        return 0
    if args.holdout:
        lines = ["# The recorded GUARD setting on held-out seeds (testbed)", *holdout_study(pipe, items, config, args)]
        (out / "testbed_holdout.md").write_text("\n".join(lines) + "\n")
        print(f"wrote {out / 'testbed_holdout.md'}")
        return 0
    variants = memorized_variants(items) + plain_variants(plain_prompts())
    seeds = list(range(1000, 1000 + args.seeds))  # seeds no testbed setting was chosen on
    scoring = config.replace(gate_threshold=None, gate_detector="cosine", gate_steps=1, gate_weights=None, **STUDY_BASE)
    study = sample_study(pipe, variants, items, copy_threshold(args.path), seeds, args.steps, score_steps, scoring)
    rows = detection_rows(study)
    lines = [
        "# Memorization detection on the testbed",
        "",
        f"Written by `python -m guard.testbed.detection_study` ({len(variants)} prompts x {len(seeds)} seeds "
        f"(seeds {seeds[0]}-{seeds[-1]}, used by no choice of setting), {args.steps} DDIM steps, scores from the "
        f"setting tau = {scoring.spike_threshold:g}, alpha = {scoring.spike_scale:g}, r = {scoring.repulsion_scale:g} "
        f"at s = {scoring.guidance_scale:g};"
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
    record = {"detection": rows}
    if args.gate_sweep:
        lines += gate_sweep(pipe, study, items, config, args, record)
    (out / "testbed_detection.md").write_text("\n".join(lines) + "\n")
    (out / "testbed_detection.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"wrote {out / 'testbed_detection.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
