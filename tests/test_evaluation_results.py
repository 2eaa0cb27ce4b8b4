"""guard.evaluation.results: a run's rows files (one per process of a launch), merged; run.json's settings."""

import json

import pytest

from guard.evaluation.results import (
    MANIFEST,
    append_row,
    drop_unfinished_tail,
    read_rows,
    reconcile_manifest,
    row_files,
    rows_file,
)


def test_each_process_of_a_launch_has_its_own_file_and_a_run_reads_them_all_in_order(tmp_path):
    assert rows_file(tmp_path) == tmp_path / "results.jsonl"
    assert rows_file(tmp_path, 3, 4) == tmp_path / "parts" / "rank-3.jsonl"
    for index, count in ((10, 11), (2, 3), (0, 1)):
        append_row(rows_file(tmp_path, index, count), {"key": str(index), "method": "m"})
    (tmp_path / "parts" / "notes.txt").write_text("not rows")
    assert [p.relative_to(tmp_path).as_posix() for p in row_files(tmp_path)] == [
        "results.jsonl",
        "parts/rank-2.jsonl",
        "parts/rank-10.jsonl",
    ]
    assert [row["key"] for row in read_rows(tmp_path)] == ["0", "2", "10"]
    assert read_rows(tmp_path / "absent") == []


def test_an_unfinished_last_line_is_ignored_then_cut_in_its_own_file(tmp_path):
    part = rows_file(tmp_path, 1, 2)
    append_row(part, {"key": "a", "method": "m"})
    with part.open("a") as handle:
        handle.write('{"key": "b", "me')
    with pytest.warns(UserWarning, match=r"rank-1.jsonl: ignoring an unfinished last line"):
        assert [row["key"] for row in read_rows(tmp_path)] == ["a"]
    drop_unfinished_tail(part)
    assert part.read_text() == '{"key": "a", "method": "m"}\n'
    (tmp_path / "parts" / "rank-0.jsonl").write_text('{"method": "m"}\n')
    with pytest.raises(ValueError, match=r"rank-0.jsonl line 1 is not a result row \(no key\)"):
        read_rows(tmp_path)


def test_run_json_keeps_the_generation_settings_and_refuses_changed_ones(tmp_path):
    settings = {"model": "org/model", "steps": 50, "seeding": "per image"}
    with pytest.raises(FileNotFoundError, match="first process should have written it"):
        reconcile_manifest(tmp_path, 4, [0], {"cfg": {"s": 1}}, settings, write=False)
    reconcile_manifest(tmp_path, 4, [0], {"cfg": {"s": 1}}, settings)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["format"] == 2 and manifest["generation"] == settings
    reconcile_manifest(tmp_path, 4, [0], {"cfg": {"s": 1}}, settings, write=False)  # a check, unchanged
    with pytest.raises(ValueError, match=r"other generation settings \(steps 50 -> 20\); use a new out_dir"):
        reconcile_manifest(tmp_path, 4, [0], {"cfg": {"s": 1}}, {**settings, "steps": 20})
    reconcile_manifest(tmp_path, 4, [0], {"guard": {"s": 2}}, {**settings, "dtype": "float16"})  # additions
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert set(manifest["methods"]) == {"cfg", "guard"} and manifest["generation"]["dtype"] == "float16"


def test_a_format_1_run_without_settings_resumes(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"format": 1, "num_images": 2, "seeds": [0], "methods": {"a": None}}))
    reconcile_manifest(tmp_path, 2, [0], {"a": "x"}, {"steps": 50})
    assert json.loads((tmp_path / MANIFEST).read_text())["generation"] == {"steps": 50}
