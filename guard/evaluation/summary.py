"""The paper-style results table of a run: SSCD (mean, 95% interval), CLIP score, prompts scored.

The paper scores only prompts whose unmitigated SSCD exceeds 0.7: pass ``baseline=`` (the method
name of the no-mitigation run) and every method is then summarised over that same prompt subset;
the note under the table says how many prompts of each kind the filter kept. Scores a run has
not computed are named in the note; FID (``fid.json``, :mod:`guard.evaluation.fid`) is a second
table, over all prompts. ``summarise`` also writes every row's scalar scores to ``per_prompt.csv``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .results import FID_FILE, PER_PROMPT, SUMMARY, read_rows, write_text_atomic
from .stats import Interval, mean_interval

METRICS = ("sscd", "clip")
_INTERVAL_NAMES = {"t": "Student t", "bootstrap": "percentile bootstrap"}


@dataclass(frozen=True)
class SummaryRow:
    """One table line: a method on one prompt kind ("all" when kinds are not split)."""

    method: str
    kind: str
    prompts: int
    sscd: Interval | None
    clip: Interval | None


def _rows(out_dir: str | os.PathLike) -> list[dict]:
    if not Path(out_dir).is_dir():
        raise FileNotFoundError(f"{out_dir} has no finished results: the folder does not exist")
    rows = read_rows(out_dir)
    if not rows:
        raise FileNotFoundError(f"{out_dir} has no finished results (results.jsonl missing or empty)")
    seen = set()
    for row in rows:
        pair = (row["key"], row["method"])
        if pair in seen:
            raise ValueError(f"{out_dir} has two rows for prompt {pair[0]}, method {pair[1]!r}; remove one")
        seen.add(pair)
    return rows


def prompt_scores(out_dir: str | os.PathLike, method: str, metric: str = "sscd") -> dict[str, float]:
    """Per-prompt score of one method (keys without that score are absent); feeds ``select_above``."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    rows = [row for row in _rows(out_dir) if row["method"] == method]
    if not rows:
        raise ValueError(f"{out_dir} has no rows for method {method!r}")
    return {row["key"]: row[metric] for row in rows if row.get(metric) is not None}


def summary_rows(
    out_dir: str | os.PathLike,
    *,
    methods: Sequence[str] | None = None,
    by_kind: bool = True,
    prompt_keys: Iterable[str] | None = None,
    baseline: str | None = None,
    threshold: float = 0.7,
    confidence: float = 0.95,
    interval: str = "t",
) -> list[SummaryRow]:
    """Table lines, methods in ``methods`` order (default: order of first appearance).

    prompt_keys: restrict to these prompts. baseline: further restrict to prompts whose
    ``baseline`` method's SSCD exceeds ``threshold`` (the paper's filter).
    """
    if interval not in _INTERVAL_NAMES:
        raise ValueError(f"interval must be one of {sorted(_INTERVAL_NAMES)}, got {interval!r}")
    rows = _rows(out_dir)
    present = list(dict.fromkeys(row["method"] for row in rows))
    methods = present if methods is None else list(methods)
    unknown = [name for name in methods if name not in present]
    if unknown:
        raise ValueError(f"method(s) {unknown} have no rows in {out_dir}; present: {present}")
    if prompt_keys is not None:
        keep = set(prompt_keys)
        rows = [row for row in rows if row["key"] in keep]
    if baseline is not None:
        if baseline not in present:
            raise ValueError(f"baseline method {baseline!r} has no rows in {out_dir}; present: {present}")
        memorized = {
            row["key"]
            for row in rows
            if row["method"] == baseline and row.get("sscd") is not None and row["sscd"] > threshold
        }
        rows = [row for row in rows if row["key"] in memorized]
    table = []
    for method in methods:
        method_rows = [row for row in rows if row["method"] == method]
        groups: dict[str, list[dict]] = {}
        for row in method_rows:
            kind = (row.get("kind") or "unlabelled") if by_kind else "all"
            groups.setdefault(kind, []).append(row)
        if not groups:
            groups = {"all": []}
        for kind in sorted(groups, key=lambda name: ("verbatim", "template", "unlabelled", "all").index(name)):
            group = groups[kind]

            def interval_of(metric: str, group=group) -> Interval | None:
                values = [row[metric] for row in group if row.get(metric) is not None]
                if not values:
                    return None
                return mean_interval(values, confidence=confidence, method=interval)

            table.append(SummaryRow(method, kind, len(group), interval_of("sscd"), interval_of("clip")))
    return table


def _number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def format_markdown(table: Sequence[SummaryRow], *, confidence: float = 0.95, note: str = "") -> str:
    """A markdown table of :func:`summary_rows` output, with a note on how the numbers were formed."""
    lines = [
        f"| method | kind | prompts | SSCD scored | SSCD ↓ | SSCD {confidence:.0%} CI | CLIP scored | CLIP ↑ |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for row in table:
        sscd = row.sscd
        clip = row.clip
        lines.append(
            "| {} | {} | {} | {} | {} | {} | {} | {} |".format(
                row.method,
                row.kind,
                row.prompts,
                sscd.n if sscd else 0,
                _number(sscd.mean) if sscd else "n/a",
                f"[{_number(sscd.low)}, {_number(sscd.high)}]" if sscd else "n/a",
                clip.n if clip else 0,
                _number(clip.mean) if clip else "n/a",
            )
        )
    return "\n".join(lines) + ("\n\n" + note if note else "") + "\n"


def _kinds_text(counts: dict[str, list[int]]) -> str:
    return ", ".join(f"{kind} {kept} of {total}" for kind, (kept, total) in counts.items())


def baseline_note(
    rows: Sequence[dict], baseline: str, threshold: float, prompt_keys: Iterable[str] | None = None
) -> str:
    """What the baseline filter kept, per kind: the paper's subset made explicit."""
    if prompt_keys is not None:
        keep = set(prompt_keys)
        rows = [row for row in rows if row["key"] in keep]
    base = [row for row in rows if row["method"] == baseline]
    scored = [row for row in base if row.get("sscd") is not None]
    counts: dict[str, list[int]] = {}
    for row in base:
        kind = row.get("kind") or "unlabelled"
        entry = counts.setdefault(kind, [0, 0])
        entry[1] += 1
        entry[0] += int(row.get("sscd") is not None and row["sscd"] > threshold)
    kept = sum(kept for kept, _ in counts.values())
    text = f"Prompts: those whose `{baseline}` SSCD exceeds {threshold}: {kept} of {len(base)} prompts"
    text += f" ({_kinds_text(counts)})." if counts else "."
    if len(scored) < len(base):
        text += f" {len(base) - len(scored)} prompt(s) have no `{baseline}` SSCD and are left out."
    return text


def missing_scores_note(rows: Sequence[dict]) -> str:
    """Which of the table's scores the run has not computed, and how to add them."""
    notes = []
    if not any("sscd" in row for row in rows):
        notes.append(
            "SSCD: not scored in this run (no SSCD model and ground-truth images were given; add them with "
            "`python -m guard.evaluation rescore RUN_DIR --sscd FILE --ground-truth DIR`)."
        )
    else:
        unscored = len({row["key"] for row in rows if "sscd" in row and row["sscd"] is None})
        if unscored:
            notes.append(f"SSCD: {unscored} prompt(s) have no ground-truth image and no SSCD.")
    if not any("clip" in row for row in rows):
        notes.append("CLIP: not scored in this run (rescore with `--clip`).")
    return " ".join(notes)


def fid_table(out_dir: str | os.PathLike, rows: Sequence[dict] | None = None) -> str:
    """The FID table from ``fid.json`` ("" when FID was not computed), flagging a stale entry."""
    path = Path(out_dir) / FID_FILE
    if not path.is_file():
        return ""
    record = json.loads(path.read_text(encoding="utf-8"))
    rows = _rows(out_dir) if rows is None else rows
    lines = ["| method | FID ↓ | images | reference images |", "|---|---:|---:|---:|"]
    stale = []
    for name, entry in record.get("methods", {}).items():
        value = entry.get("fid")
        lines.append(
            f"| {name} | {'n/a' if value is None else f'{value:.2f}'} | {entry.get('images')} "
            f"| {record.get('reference_images')} |"
        )
        now = sum(len(row.get("images", ())) for row in rows if row["method"] == name)
        if now != entry.get("images"):
            stale.append(f"`{name}` (computed on {entry.get('images')} images, the run now has {now})")
    where = f" against `{record['reference']}`" if record.get("reference") else ""
    network = f" with `{record['feature_network']}`" if record.get("feature_network") else ""
    note = f"FID over all of a method's images (no SSCD filter){where}{network} ({record.get('backend')})."
    if stale:
        note += " Stale, recompute it: " + ", ".join(stale) + "."
    return "\n".join(lines) + "\n\n" + note + "\n"


#: Scalar columns of per_prompt.csv, in order; the per-image lists stay in the rows files.
PER_PROMPT_COLUMNS = ("method", "key", "index", "kind", "sscd", "clip", "seconds", "caption")


def write_per_prompt(out_dir: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """Every row's scalar fields as CSV (one line per prompt and method), replaced atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PER_PROMPT_COLUMNS)
    for row in sorted(rows, key=lambda row: (str(row["method"]), str(row["key"]))):
        writer.writerow(["" if row.get(column) is None else row.get(column) for column in PER_PROMPT_COLUMNS])
    path = Path(out_dir) / PER_PROMPT
    write_text_atomic(path, buffer.getvalue())
    return path


def summarise(
    out_dir: str | os.PathLike,
    *,
    methods: Sequence[str] | None = None,
    by_kind: bool = True,
    prompt_keys: Iterable[str] | None = None,
    baseline: str | None = None,
    threshold: float = 0.7,
    confidence: float = 0.95,
    interval: str = "t",
    write: bool = True,
) -> str:
    """The run's results table as markdown, written to ``summary.md`` (rows to ``per_prompt.csv``) when ``write``."""
    table = summary_rows(
        out_dir,
        methods=methods,
        by_kind=by_kind,
        prompt_keys=prompt_keys,
        baseline=baseline,
        threshold=threshold,
        confidence=confidence,
        interval=interval,
    )
    rows = _rows(out_dir)
    notes = [
        "SSCD: per prompt, max cosine over ground truths averaged over the generations; "
        f"mean over prompts with a {confidence:.0%} {_INTERVAL_NAMES[interval]} interval. "
        "CLIP: mean cosine of image and prompt embeddings.",
    ]
    if baseline is not None:
        notes.append(baseline_note(rows, baseline, threshold, prompt_keys))
    else:
        notes.append("Prompts: all (no baseline filter).")
    missing = missing_scores_note(rows)
    if missing:
        notes.append(missing)
    markdown = format_markdown(table, confidence=confidence, note=" ".join(notes))
    fid = fid_table(out_dir, rows)
    if fid:
        markdown += "\n" + fid
    if write:
        write_text_atomic(Path(out_dir) / SUMMARY, markdown)
        write_per_prompt(out_dir, rows)
    return markdown
