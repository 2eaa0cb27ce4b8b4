"""guard.testbed.detection_study: the AUC, TPR at a false-positive rate, the bootstrap over prompts, the stages."""

import json

import numpy as np
import pytest

from guard.testbed import defaults, memorized_items, plain_prompts
from guard.testbed.detection_study import bootstrap, main, roc_auc, tpr_at_fpr


def test_auc_is_the_mann_whitney_probability_with_ties_counted_half():
    rng = np.random.default_rng(0)
    positives, negatives = rng.normal(1, 1, 40), rng.normal(0, 1, 60)
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in positives for n in negatives])
    assert roc_auc(positives, negatives) == pytest.approx(brute)
    assert roc_auc(np.array([1.0, 2.0, 2.0]), np.array([2.0, 0.0])) == pytest.approx(4 / 6)
    assert roc_auc(np.array([5.0]), np.array([1.0, 2.0])) == 1.0


def test_tpr_at_fpr_reads_the_threshold_off_the_negatives():
    negatives = np.arange(100, dtype=float)  # 1% above 98
    positives = np.array([98.5, 99.5, 50.0, 100.0])
    assert tpr_at_fpr(positives, negatives, 0.01) == pytest.approx(0.5)


def test_bootstrap_resamples_whole_prompts_and_brackets_the_value():
    rng = np.random.default_rng(1)
    positives = [rng.normal(1, 1, 4) for _ in range(20)]
    negatives = [rng.normal(0, 1, 4) for _ in range(30)]
    value, low, high = bootstrap(roc_auc, positives, negatives, rounds=200)
    assert low < value < high and 0.5 < value < 1.0
    assert bootstrap(roc_auc, positives, negatives, rounds=200) == (value, low, high)  # seeded


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--score-steps", "0"], "--score-steps must lie in"),
        (["--score-steps", "x"], "comma-separated integers"),
        (["--write-default"], "add --gate-sweep"),
        (["--gate-sweep", "--gate-steps", "3"], "--gate-steps must be one of --score-steps"),
        (["--gate-sweep", "--holdout"], "separate stages: choose one"),
        (["--surgical", "--holdout"], "separate stages: choose one"),
    ],
)
def test_bad_arguments_are_refused_before_any_sampling(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--out", str(tmp_path)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_surgical_stage_measures_every_setting_on_the_attached_trigger(monkeypatch, tmp_path):
    """--surgical on the shipped testbed, cut to one item's exact caption and attached trigger and
    two steps: one table row per setting (CFG, alpha x blocks, the repulsion scales), percentages."""
    import guard.testbed.detection_study as study

    full = study.memorized_variants
    monkeypatch.setattr(study, "memorized_variants", lambda items: [v for v in full(items) if v.item == 0])
    assert (
        main(["--out", str(tmp_path), "--surgical", "--steps", "2", "--score-steps", "1", "--confirm-seeds", "1"]) == 0
    )
    rows = [line for line in (tmp_path / "testbed_surgical.md").read_text().splitlines() if line.startswith("| ")]
    names = [row.split(" | ")[0][2:] for row in rows[1:]]
    assert names[0] == "CFG" and "alpha=0.05, every layer" in names and "alpha=0.45, default blocks, r=0" in names
    assert "alpha=0.45, default blocks, r=1, first-step tokens" in names
    table = rows[1 : names.index("prompts") + 1]
    assert len(table) == 12
    paired = [row.strip("| ").split(" | ") for row in rows[len(table) + 2 :]]
    attached, asked = "trigger on another caption", "aligned to the asked caption"
    expected = [(attached, asked), (attached, "copies"), ("exact", asked), ("exact", "copies")]
    assert [(p[0], p[1]) for p in paired] == expected
    assert all(p[-1] == "10" for p in paired)  # one prompt of each kind x the ten paired seeds
    for row in table:
        cells = row.strip("| ").split(" | ")[1:]
        assert len(cells) == 4 and all(cell.endswith("%") and 0 <= float(cell[:-1]) <= 100 for cell in cells)


def test_the_gate_sweep_composes_gated_runs_from_cfg_and_ungated_guard(monkeypatch, tmp_path):
    """--gate-sweep on the shipped testbed, cut to one item's variants, two plain prompts and two steps:
    the composite of CFG and ungated GUARD reproduces the shipped setting's real gated run, and every
    candidate (cosine, spike share, linear on each base) gets a row."""
    import guard.testbed.detection_study as study

    memorized, plain = study.memorized_variants, study.plain_variants
    monkeypatch.setattr(study, "memorized_variants", lambda items: [v for v in memorized(items) if v.item == 0])
    monkeypatch.setattr(study, "plain_variants", lambda prompts: plain(prompts)[:4])
    argv = ["--out", str(tmp_path), "--gate-sweep", "--steps", "2", "--score-steps", "1", "--seeds", "1"]
    assert main(argv + ["--sweep-seeds", "1", "--confirm-seeds", "1", "--threads", "1"]) == 0
    text = (tmp_path / "testbed_detection.md").read_text()
    assert "agrees with its composite on 100.0% of the samples' copy and alignment verdicts" in text
    sweep = text.split("### Sweep")[1].split("### Confirmation")[0]
    names = [line.split(" | ")[0][2:] for line in sweep.splitlines() if line.startswith("| ") and "---" not in line]
    assert names[:3] == ["setting", "CFG", "shipped default (before)"]
    bases = ["alpha=0.45, r=1", "alpha=0.3, r=1", "alpha=0.45, r=0.5", "alpha=0.45, r=0"]
    bases += [f"alpha=0.45, r={r}, first-step tokens" for r in ("1", "0.5", "0")]
    for base in bases:
        assert f"GUARD without the gate, {base}" in names and f"shipped gate on {base}" in names
        for gate in ("cosine", "spike share", "linear"):
            assert all(f"{gate} {rate} on {base}" in names for rate in ("2%", "5%", "10%"))
    assert len(names) == 3 + len(bases) * (1 + 9 + 1)
    # The shipped gate on the shipped setting's base is the shipped setting: its composite row equals the real run.
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in sweep.splitlines() if line.startswith("| ")}
    shipped = defaults.testbed_guard_config(None)
    label = f"alpha={shipped.spike_scale:g}, r={shipped.repulsion_scale:g}"
    label += ", first-step tokens" if shipped.spike_tokens == "first-step" else ""
    assert rows[f"shipped gate on {label}"] == rows["shipped default (before)"]
    assert "seeds [6000], disjoint from the sweep's and the detection study's" in text
    # Every row says how many of the plain samples CFG draws right it keeps: CFG all of them (none here
    # after two steps, where CFG draws no plain prompt right: NaN, which the rule refuses).
    kept = {name: cells[5] for name, cells in rows.items() if name not in ("setting", "---")}
    assert kept["CFG"] in ("100.0%", "nan%") and all(
        cell == "nan%" or 0 <= float(cell[:-1]) <= 100 for cell in kept.values()
    )
    flagged = text.split("Plain prompts the confirmed gates flag")[1].split("Chosen:")[0]
    for row in (line.strip("| ").split(" | ") for line in flagged.splitlines() if line.startswith("| ")):
        if row[0] in ("setting", "---"):
            continue
        flagged_samples = int(row[2].split(" of ")[0])
        assert row[1] in {v.prompt for v in plain(plain_prompts())[:4]}
        assert 0 <= int(row[3]) <= flagged_samples and 0 <= int(row[4]) <= flagged_samples
    record = json.loads((tmp_path / "testbed_detection.json").read_text())
    assert {row["score"] for row in record["detection"]} == {"cosine", "wen", "entropy", "spike_share"}


def test_the_rule_needs_alignment_protection_and_the_plain_samples_cfg_draws_right_kept():
    from guard.config import GuardConfig
    from guard.testbed.detection_study import GateResult, eligible

    def result(aligned, plain, copies, kept):
        return GateResult("x", GuardConfig(), 0.2, copies, {}, aligned, {}, plain, 0.0, 0.0, kept)

    cfg = result(aligned=0.62, plain=0.93, copies=0.72, kept=1.0)
    assert eligible(result(aligned=0.62, plain=0.91, copies=0.17, kept=0.97), cfg)  # below 95% only because CFG is
    assert not eligible(result(aligned=0.59, plain=0.80, copies=0.17, kept=0.85), cfg)  # loses 15% of CFG's right ones
    assert not eligible(result(aligned=0.62, plain=0.93, copies=0.17, kept=0.94), cfg)
    assert not eligible(result(aligned=0.51, plain=0.91, copies=0.21, kept=0.97), cfg)  # 53% asked needed
    assert not eligible(result(aligned=0.62, plain=0.93, copies=0.40, kept=1.0), cfg)  # copies not halved
    assert not eligible(result(aligned=0.62, plain=0.78, copies=0.17, kept=0.95), cfg)  # plain > 15% below CFG
    assert not eligible(result(aligned=0.62, plain=0.93, copies=0.17, kept=float("nan")), cfg)  # unmeasured


def test_plain_kept_counts_only_the_plain_samples_cfg_draws_aligned():
    from guard.config import GuardConfig
    from guard.testbed.detection_study import Outcomes, flagged_plain, summarize
    from guard.testbed.variants import Variant

    variants = [Variant("exact caption", "exact", 0, ("red", "circle", "blue")),
                Variant("plain a", "plain", None, ("red", "circle", "blue")),
                Variant("plain b", "plain", None, ("blue", "square", "red"))]  # fmt: skip
    none = np.full((3, 2), np.nan)
    cfg = Outcomes(np.zeros((3, 2), bool), np.array([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]]), none)
    setting = Outcomes(np.zeros((3, 2), bool), np.array([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), none)
    result = summarize("x", GuardConfig(), variants, setting, np.zeros((3, 2)), cfg)
    # CFG draws 3 plain samples right (a/0, b/0, b/1); the setting keeps 2 of them; a/1 does not count.
    assert result.plain_kept == pytest.approx(2 / 3) and result.plain_aligned == pytest.approx(3 / 4)
    assert np.isnan(summarize("x", GuardConfig(), variants, setting, np.zeros((3, 2))).plain_kept)
    # The flagged plain prompts' table: a/1 and b/0 flagged; CFG draws both right except a/1, the setting b/0 wrong.
    cleared = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert flagged_plain("x", variants, setting, cleared, cfg) == ["| x | plain a | 1 of 2 | 0 | 1 |",
                                                                 "| x | plain b | 1 of 2 | 1 | 0 |"]  # fmt: skip


def test_prompt_interval_resamples_whole_prompts_and_brackets_the_mean():
    from guard.testbed.detection_study import prompt_interval

    rng = np.random.default_rng(2)
    values = rng.random((30, 3)) < 0.4
    where = np.ones((30, 3), dtype=bool)
    where[::3, 1] = False  # a sample left out counts nowhere
    value, low, high = prompt_interval(values, where, rounds=300)
    assert value == pytest.approx(values[where].mean()) and low < value < high
    constant = np.ones((5, 2))  # every prompt the same: resampling prompts cannot move the mean
    assert prompt_interval(constant, np.ones((5, 2), dtype=bool), rounds=50) == (1.0, 1.0, 1.0)
    assert all(np.isnan(prompt_interval(values, np.zeros((30, 3), dtype=bool))))


def test_the_holdout_stage_measures_the_recorded_setting_against_cfg(monkeypatch, tmp_path):
    """--holdout on the shipped testbed, cut to one item's variants, two plain prompts and two steps:
    a row per measure with an interval for CFG and the recorded setting, the sample counts, a verdict."""
    import guard.testbed.detection_study as study
    from guard.testbed.variants import KINDS

    memorized, plain = study.memorized_variants, study.plain_variants
    monkeypatch.setattr(study, "memorized_variants", lambda items: [v for v in memorized(items) if v.item == 0])
    monkeypatch.setattr(study, "plain_variants", lambda prompts: plain(prompts)[:4])
    argv = ["--out", str(tmp_path), "--holdout", "--steps", "2", "--score-steps", "1", "--confirm-seeds", "1"]
    assert main(argv) == 0
    text = (tmp_path / "testbed_holdout.md").read_text()
    assert "seeds [7000], which no choice or other stage used" in text
    rows = [line.strip("| ").split(" | ") for line in text.splitlines() if line.startswith("| ")][1:]
    assert [row[0] for row in rows] == ["copies, all variants", *(f"copies, {kind}" for kind in KINDS),
                                        "aligned to the asked caption", "plain aligned",
                                        "plain kept aligned (of CFG's aligned)"]  # fmt: skip
    counts = {row[0]: int(row[3]) for row in rows}
    kinds = [v.kind for v in memorized(memorized_items()[:1])]
    assert counts["copies, all variants"] == len(kinds) and counts["plain aligned"] == 2  # plain[::2] of 4, one seed
    assert counts["copies, partial trigger"] == kinds.count("partial trigger")
    for row in rows:
        for cell in row[1:3]:
            value, interval = cell.split(" [")
            low, high = (float(x.rstrip("%]")) for x in interval.split(", "))
            assert value == "nan%" or low <= float(value[:-1]) <= high
    assert "the choice's rule on these seeds; its gate cleared" in text
    recorded = defaults.testbed_guard_config(None)
    assert f"alpha={recorded.spike_scale:g} r={recorded.repulsion_scale:g}" in text
    assert ("first-step tokens" in text) == (recorded.spike_tokens == "first-step")
