"""``python -m guard.evaluation``: the results table of a run, and its user errors as one line with exit status 2."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from guard.evaluation.__main__ import main

PROG = "python -m guard.evaluation"


def _run_dir(out: Path) -> Path:
    rows = [
        {"key": "1", "caption": "a", "kind": "verbatim", "method": "none", "sscd": 0.9, "clip": 0.3},
        {"key": "2", "caption": "b", "kind": "template", "method": "none", "sscd": 0.5, "clip": 0.3},
        {"key": "1", "caption": "a", "kind": "verbatim", "method": "guard", "sscd": 0.2, "clip": 0.31},
        {"key": "2", "caption": "b", "kind": "template", "method": "guard", "sscd": 0.1, "clip": 0.29},
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return out


def test_summarise_prints_and_writes_the_table(tmp_path, capsys):
    run = _run_dir(tmp_path / "run")
    assert main(["summarise", str(run), "--baseline", "none", "--no-kinds"]) == 0
    captured = capsys.readouterr()
    assert "| guard | all | 1 | 1 | 0.200 |" in captured.out and "| none | all | 1 | 1 | 0.900 |" in captured.out
    assert captured.err == ""
    assert (run / "summary.md").read_text(encoding="utf-8") == captured.out


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        (lambda tmp: tmp / "absent", [], "absent has no finished results: the folder does not exist"),
        (lambda tmp: tmp, [], r"has no finished results \(results.jsonl missing or empty\)"),
        (lambda tmp: _run_dir(tmp / "run"), ["--baseline", "cfg"], "baseline method 'cfg' has no rows in "),
    ],
    ids=["missing-folder", "no-results", "unknown-baseline"],
)
def test_user_errors_are_one_line_with_status_2(tmp_path, capsys, make, extra, message):
    assert main(["summarise", str(make(tmp_path)), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{PROG}: error: ")
    assert re.search(message, lines[0])


def test_module_exits_with_status_2_and_no_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "guard.evaluation", "summarise", str(tmp_path / "absent")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"{PROG}: error: ") and "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1
