"""The on-disk format of an evaluation run, written so that no finished work is ever lost.

Layout of ``out_dir``::

    run.json                         settings every row depends on (num_images, seeds, methods)
    results.jsonl                    one JSON row per finished (prompt, method), appended and fsynced
    images/<method>/<key>/s<seed>_<i>.png
    summary.md                       written by guard.evaluation.summary.summarise

A row is appended only after all of its images are on disk, so a run killed at any point resumes
from the first unfinished (prompt, method); a final line cut short by a crash is dropped on resume.
One run directory is written by one process at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

MANIFEST = "run.json"
RESULTS = "results.jsonl"
IMAGES = "images"
SUMMARY = "summary.md"
FORMAT_VERSION = 1

_METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_method_name(name: object) -> str:
    """Method names become folder names: letters, digits, '.', '_', '-' only."""
    if not isinstance(name, str) or not _METHOD_NAME.match(name):
        raise ValueError(
            f"method names must be non-empty strings of letters, digits, '.', '_' or '-' "
            f"(they name image folders), got {name!r}"
        )
    return name


def describe_method(value: Any) -> Any:
    """A JSON description of a method's settings, compared on resume; None when not comparable.

    Dataclasses (e.g. ``GuardConfig``) are described field by field; JSON values as themselves;
    other objects are not compared (their repr may hold memory addresses).
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__name__, **json.loads(json.dumps(dataclasses.asdict(value), default=repr))}
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return None


def image_path(method: str, key: str, seed: int, position: int) -> str:
    """Path of one generated image, relative to the run directory."""
    return f"{IMAGES}/{method}/{key}/s{seed}_{position}.png"


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON through a temporary file and a rename, so a crash leaves the old file intact."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def reconcile_manifest(out_dir: Path, num_images: int, seeds: list[int], methods: Mapping[str, Any]) -> None:
    """Create ``run.json``, or check that a resumed run keeps the settings its rows were made with."""
    path = out_dir / MANIFEST
    described = {name: describe_method(value) for name, value in methods.items()}
    if not path.exists():
        write_json_atomic(
            path, {"format": FORMAT_VERSION, "num_images": num_images, "seeds": seeds, "methods": described}
        )
        return
    with path.open(encoding="utf-8") as handle:
        manifest = json.load(handle)
    if manifest.get("num_images") != num_images or manifest.get("seeds") != seeds:
        raise ValueError(
            f"{out_dir} holds a run made with num_images={manifest.get('num_images')}, seeds={manifest.get('seeds')}; "
            f"this call asks for num_images={num_images}, seeds={seeds}. Use the same values or a new out_dir"
        )
    recorded = manifest.setdefault("methods", {})
    for name, description in described.items():
        before = recorded.get(name)
        if name in recorded and before is not None and description is not None and before != description:
            raise ValueError(
                f"method {name!r} in {out_dir} was run with settings {before}, now {description}; "
                "give the new settings a new method name"
            )
    if any(name not in recorded for name in described):
        recorded.update({name: description for name, description in described.items() if name not in recorded})
        write_json_atomic(path, manifest)


#: What every row of ``results.jsonl`` names: the prompt and the method it was generated with.
ROW_FIELDS = ("key", "method")


def read_rows(out_dir: str | os.PathLike) -> list[dict]:
    """All finished rows of a run; a final line cut short by a crash is ignored (with a warning)."""
    path = Path(out_dir) / RESULTS
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] != "":
        warnings.warn(
            f"{path}: ignoring an unfinished last line (an interrupted write); it will be redone", stacklevel=2
        )
    rows = []
    for line_number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {line_number} is not valid JSON ({error.msg}); fix or remove it") from None
        missing = [field for field in ROW_FIELDS if not isinstance(row, dict) or field not in row]
        if missing:
            raise ValueError(
                f"{path} line {line_number} is not a result row (no {', '.join(missing)}); fix or remove it"
            )
        rows.append(row)
    return rows


def drop_unfinished_tail(out_dir: Path) -> None:
    """Cut a final line that has no newline (a write interrupted by a crash) before appending."""
    path = out_dir / RESULTS
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def append_row(out_dir: Path, row: Mapping[str, Any]) -> None:
    """Append one finished row and force it to disk."""
    with (out_dir / RESULTS).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def rewrite_rows(out_dir: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Replace ``results.jsonl`` with ``rows`` atomically (used by rescoring)."""
    path = out_dir / RESULTS
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
