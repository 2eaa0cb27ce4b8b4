"""guard.testbed.detection_study: the AUC, TPR at a false-positive rate, the bootstrap over prompts, the stages."""

import json

import numpy as np
import pytest

from guard.testbed.defaults import testbed_guard_config
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
    bases += ["alpha=0.45, r=1, first-step tokens", "alpha=0.45, r=0, first-step tokens"]
    for base in bases:
        assert f"GUARD without the gate, {base}" in names and f"shipped gate on {base}" in names
        for gate in ("cosine", "spike share", "linear"):
            assert all(f"{gate} {rate} on {base}" in names for rate in ("2%", "5%", "10%"))
    assert len(names) == 3 + len(bases) * (1 + 9 + 1)
    # The shipped gate on the shipped setting's base is the shipped setting: its composite row equals the real run.
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in sweep.splitlines() if line.startswith("| ")}
    shipped = testbed_guard_config(None)
    label = f"alpha={shipped.spike_scale:g}, r={shipped.repulsion_scale:g}"
    label += ", first-step tokens" if shipped.spike_tokens == "first-step" else ""
    assert rows[f"shipped gate on {label}"] == rows["shipped default (before)"]
    assert "seeds [6000], which no earlier choice or study used" in text
    record = json.loads((tmp_path / "testbed_detection.json").read_text())
    assert {row["score"] for row in record["detection"]} == {"cosine", "wen", "entropy", "spike_share"}


def test_the_rule_needs_alignment_protection_and_where_asked_the_plain_floor():
    from guard.config import GuardConfig
    from guard.testbed.detection_study import GateResult, eligible

    def result(aligned, plain, copies):
        return GateResult("x", GuardConfig(), 0.2, copies, {}, aligned, {}, plain, 0.0, 0.0)

    cfg = result(aligned=0.62, plain=0.93, copies=0.72)
    ungated_r0 = result(aligned=0.59, plain=0.80, copies=0.17)  # the confirmation's third setting
    assert eligible(ungated_r0, cfg, floor=False) and not eligible(ungated_r0, cfg)
    assert not eligible(result(aligned=0.51, plain=0.91, copies=0.21), cfg, floor=False)  # 53% asked needed
    assert not eligible(result(aligned=0.62, plain=0.93, copies=0.40), cfg, floor=False)  # copies not halved
    assert not eligible(result(aligned=0.62, plain=0.78, copies=0.17), cfg, floor=False)  # plain > 15% below CFG
    assert eligible(result(aligned=0.62, plain=0.95, copies=0.17), cfg)
