"""The on-disk format of an evaluation run, written so that no finished work is ever lost.

Layout of ``out_dir``::

    run.json                         settings every row depends on (num_images, seeds, methods, generation)
    results.jsonl                    rows written by single-process runs
    parts/rank-<K>.jsonl             rows written by process K of a multi-process launch (one file each)
    images/<method>/<key>/s<seed>_<i>.png
    summary.md, per_prompt.csv       written at the end (guard.evaluation.summary)
    fid.json                         FID per method, when computed (guard.evaluation.fid)

A row is one finished (prompt, method): all of its images are on disk before it is appended to its
process's file and fsynced, so a run killed at any point resumes from the first unfinished
(prompt, method); a final line cut short by a crash is ignored when read and cut before the next
append. The run's rows are the union of every rows file: each process appends only to its own, and
only work that no file held when the launch started (:mod:`guard.evaluation.runner`), so each
(prompt, method) is in exactly one file whatever the number of processes of each launch.
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
PARTS = "parts"
IMAGES = "images"
SUMMARY = "summary.md"
PER_PROMPT = "per_prompt.csv"
FID_FILE = "fid.json"
FORMAT_VERSION = 2  # 2: rows may also live in parts/rank-<K>.jsonl; format 1 runs read and resume unchanged

_METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_PART_NAME = re.compile(r"^rank-(\d+)\.jsonl$")


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
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write text through a fsynced temporary file and a rename, so a crash leaves the old file intact."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def reconcile_manifest(
    out_dir: Path,
    num_images: int,
    seeds: list[int],
    methods: Mapping[str, Any],
    settings: Mapping[str, Any] | None = None,
    *,
    write: bool = True,
) -> None:
    """Create ``run.json``, or check that a resumed run keeps the settings its rows were made with.

    settings: what else every image depends on (model, steps, dtype, seeding, ...), JSON values;
    a resumed run must give the same, except where the run directory recorded none. ``write=False``
    only checks (processes other than the first of a launch, which has written it already).
    """
    path = out_dir / MANIFEST
    described = {name: describe_method(value) for name, value in methods.items()}
    settings = json.loads(json.dumps(dict(settings or {})))
    if not path.exists():
        if not write:
            raise FileNotFoundError(f"{path} is missing: the launch's first process should have written it")
        payload = {"format": FORMAT_VERSION, "num_images": num_images, "seeds": seeds, "methods": described}
        if settings:
            payload["generation"] = settings
        write_json_atomic(path, payload)
        return
    with path.open(encoding="utf-8") as handle:
        manifest = json.load(handle)
    if manifest.get("num_images") != num_images or manifest.get("seeds") != seeds:
        raise ValueError(
            f"{out_dir} holds a run made with num_images={manifest.get('num_images')}, seeds={manifest.get('seeds')}; "
            f"this call asks for num_images={num_images}, seeds={seeds}. Use the same values or a new out_dir"
        )
    recorded_settings = manifest.get("generation") or {}
    changed = {
        name: (recorded_settings[name], value)
        for name, value in settings.items()
        if name in recorded_settings and recorded_settings[name] != value
    }
    if changed:
        what = ", ".join(f"{name} {before!r} -> {now!r}" for name, (before, now) in changed.items())
        raise ValueError(f"{out_dir} holds a run made with other generation settings ({what}); use a new out_dir")
    recorded = manifest.setdefault("methods", {})
    for name, description in described.items():
        before = recorded.get(name)
        if name in recorded and before is not None and description is not None and before != description:
            raise ValueError(
                f"method {name!r} in {out_dir} was run with settings {before}, now {description}; "
                "give the new settings a new method name"
            )
    new_settings = {name: value for name, value in settings.items() if name not in recorded_settings}
    if write and (any(name not in recorded for name in described) or new_settings):
        recorded.update({name: description for name, description in described.items() if name not in recorded})
        if new_settings:
            manifest["generation"] = {**recorded_settings, **new_settings}
        write_json_atomic(path, manifest)


#: What every row of a rows file names: the prompt and the method it was generated with.
ROW_FIELDS = ("key", "method")


def rows_file(out_dir: str | os.PathLike, process_index: int = 0, num_processes: int = 1) -> Path:
    """The file a process appends its rows to: ``results.jsonl`` alone, ``parts/rank-<K>.jsonl`` in a launch."""
    if num_processes == 1:
        return Path(out_dir) / RESULTS
    return Path(out_dir) / PARTS / f"rank-{process_index}.jsonl"


def row_files(out_dir: str | os.PathLike) -> list[Path]:
    """Every rows file of a run, in reading order: ``results.jsonl``, then the parts by process number."""
    out_dir = Path(out_dir)
    files = [out_dir / RESULTS] if (out_dir / RESULTS).is_file() else []
    parts = out_dir / PARTS
    if parts.is_dir():
        numbered = [(int(match.group(1)), path) for path in parts.iterdir() if (match := _PART_NAME.match(path.name))]
        files += [path for _, path in sorted(numbered)]
    return files


def read_file_rows(path: Path) -> list[dict]:
    """The finished rows of one rows file; a final line cut short by a crash is ignored (with a warning)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] != "":
        warnings.warn(
            f"{path}: ignoring an unfinished last line (an interrupted write); it will be redone", stacklevel=3
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


def read_rows(out_dir: str | os.PathLike) -> list[dict]:
    """All finished rows of a run, from every rows file (see :func:`row_files`)."""
    return [row for path in row_files(out_dir) for row in read_file_rows(path)]


def drop_unfinished_tail(path: Path) -> None:
    """Cut a final line that has no newline (a write interrupted by a crash) before appending."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)
            handle.flush()
            os.fsync(handle.fileno())


def append_row(path: Path, row: Mapping[str, Any]) -> None:
    """Append one finished row to a rows file and force it to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def rewrite_rows(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Replace one rows file with ``rows`` atomically (used by rescoring)."""
    write_text_atomic(path, "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows))
