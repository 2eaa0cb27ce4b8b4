"""The paper-style results table (guard.evaluation.summary): the baseline filter, kinds, intervals, errors."""

import json
import math

import numpy as np
import pytest

from guard.evaluation import PromptRecord, prompt_scores, select_above, summarise, summary_rows


def _write_rows(out, rows):
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


KEYS = [f"row{i}" for i in range(5)]
KINDS = ["verbatim", "verbatim", "verbatim", "template", "template"]
NONE_SSCD = [0.9, 0.8, 0.6, 0.95, 0.75]
GUARD_SSCD = [0.1, 0.2, 0.3, 0.15, 0.05]
GUARD_CLIP = [0.30, 0.28, 0.20, 0.26, 0.24]


@pytest.fixture
def table_run(tmp_path):
    rows = [
        {"key": k, "caption": k, "kind": kind, "method": "none", "sscd": s, "clip": 0.35}
        for k, kind, s in zip(KEYS, KINDS, NONE_SSCD)
    ] + [
        {"key": k, "caption": k, "kind": kind, "method": "guard", "sscd": s, "clip": c}
        for k, kind, s, c in zip(KEYS, KINDS, GUARD_SSCD, GUARD_CLIP)
    ]
    _write_rows(tmp_path, rows)
    return tmp_path


def test_summary_filters_on_the_baseline_and_splits_kinds(table_run):
    markdown = summarise(table_run, baseline="none")
    # Baseline SSCD > 0.7 keeps rows 0, 1 (verbatim) and 3, 4 (template). guard verbatim: 0.1, 0.2.
    half = 12.7062 * (math.sqrt(0.005) / math.sqrt(2))  # t_{0.975,1} * sd / sqrt(n)
    assert f"| guard | verbatim | 2 | 2 | 0.150 | [{0.15 - half:.3f}, {0.15 + half:.3f}] | 2 | 0.290 |" in markdown
    assert "| guard | template | 2 | 2 | 0.100 |" in markdown
    assert "| none | verbatim | 2 | 2 | 0.850 |" in markdown
    assert "Student t" in markdown and "`none` SSCD exceeds 0.7" in markdown
    assert (table_run / "summary.md").read_text(encoding="utf-8") == markdown


def test_summary_without_filter_or_kinds(table_run):
    rows = summary_rows(table_run, by_kind=False, methods=["guard"])
    assert len(rows) == 1 and (rows[0].method, rows[0].kind, rows[0].prompts) == ("guard", "all", 5)
    assert rows[0].sscd.mean == pytest.approx(np.mean(GUARD_SSCD)) and rows[0].clip.mean == pytest.approx(
        np.mean(GUARD_CLIP)
    )
    assert rows[0].sscd.high - rows[0].sscd.mean == pytest.approx(
        2.776445 * np.std(GUARD_SSCD, ddof=1) / math.sqrt(5), abs=1e-5
    )
    only_c = summary_rows(table_run, prompt_keys=["row2"], methods=["guard"])
    assert only_c[0].sscd.n == 1 and math.isnan(only_c[0].sscd.low)
    assert "| guard | verbatim | 1 | 1 | 0.300 | [n/a, n/a] |" in summarise(
        table_run, prompt_keys=["row2"], write=False
    )


def test_baseline_scores_feed_the_prompt_filter(table_run):
    scores = prompt_scores(table_run, "none")
    assert scores == dict(zip(KEYS, NONE_SSCD))
    records = [PromptRecord(f"prompt {i}", row=i) for i in range(6)]  # keys row0..row5; row5 was never run
    with pytest.raises(KeyError, match=r"1 record\(s\) have no unmitigated score \(keys \['row5'\]\)"):
        select_above(records, scores)
    kept = select_above(records, scores, missing="exclude")
    assert [record.key for record in kept] == ["row0", "row1", "row3", "row4"]


def test_summary_errors(table_run, tmp_path):
    with pytest.raises(ValueError, match="baseline method 'cfg' has no rows"):
        summarise(table_run, baseline="cfg")
    with pytest.raises(ValueError, match="interval must be one of"):
        summarise(table_run, interval="z")
    with pytest.raises(FileNotFoundError, match="no finished results"):
        summarise(tmp_path / "empty")
    _write_rows(tmp_path / "dup", [{"key": "a", "method": "m", "caption": "a"}] * 2)
    with pytest.raises(ValueError, match="two rows for prompt a"):
        summarise(tmp_path / "dup")


def test_a_row_without_its_prompt_key_is_a_clear_error(tmp_path):
    _write_rows(tmp_path, [{"method": "guard", "caption": "a", "sscd": 0.1}])
    with pytest.raises(ValueError, match=r"line 1 is not a result row \(no key\)"):
        summarise(tmp_path)
