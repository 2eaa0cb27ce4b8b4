"""``python -m guard.testbed.evaluate``: its arguments, where it writes, and what it always measures."""

import hashlib

import pytest

from guard.testbed.assets import WEIGHTS_DIR
from guard.testbed.evaluate import main


@pytest.mark.parametrize("argv", [["--sweep-gate", "none,x"], ["--sweep-r", "none"], ["--sweep-tau", "4,"]])
def test_bad_sweep_grids_are_refused_before_any_sampling(argv, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "must be comma-separated numbers" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [([], "--out"), (["--write-default"], "--write-default records the sweep's choice: add --sweep")],
)
def test_it_needs_a_folder_and_writes_the_default_only_from_a_sweep(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(argv + (["--out", str(tmp_path)] if argv else []))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def _package_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in WEIGHTS_DIR.rglob("*") if p.is_file()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def test_a_small_run_writes_only_into_its_folder_and_measures_the_shipped_default(tmp_path, capsys):
    before = _package_digest()
    out, runs = tmp_path / "study", tmp_path / "runs"
    assert main(["--out", str(out), "--seeds", "1", "--steps", "1", "--plain", "1", "--runs", str(runs)]) == 0
    assert _package_digest() == before  # the installed weights and their recorded default are untouched
    assert {p.name for p in out.iterdir()} == {
        "testbed_efficacy.md",
        "testbed_efficacy.json",
        "testbed_efficacy_grid.png",
    }
    report = (out / "testbed_efficacy.md").read_text()
    assert "| GUARD (testbed default) |" in report and "gate=" in report  # the recorded setting, with its gate
    assert "GUARD (testbed default)" in capsys.readouterr().out
    kept = {path.name for path in runs.iterdir()}  # each setting's run directory, in guard.evaluation's layout
    assert {"cfg", "guard-published", "guard-testbed-default", "somepalli-preset"} <= kept
    assert (runs / "cfg" / "results.jsonl").read_text().count("\n") == 5 + 1  # memorized items + plain prompt
