"""The paper-style results table of a run: SSCD (mean, 95% interval), CLIP score, prompts scored.

The paper scores only prompts whose unmitigated SSCD exceeds 0.7: pass ``baseline=`` (the method
name of the no-mitigation run) and every method is then summarised over that same prompt subset.
FID is not reported (out of scope: it needs a LAION reference set and an Inception network).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .results import SUMMARY, read_rows
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
    """The run's results table as markdown, also written to ``out_dir/summary.md`` when ``write``."""
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
    notes = [
        "SSCD: per prompt, max cosine over ground truths averaged over the generations; "
        f"mean over prompts with a {confidence:.0%} {_INTERVAL_NAMES[interval]} interval. "
        "CLIP: mean cosine of image and prompt embeddings.",
    ]
    if baseline is not None:
        notes.append(f"Prompts: those whose `{baseline}` SSCD exceeds {threshold}.")
    markdown = format_markdown(table, confidence=confidence, note=" ".join(notes))
    if write:
        (Path(out_dir) / SUMMARY).write_text(markdown, encoding="utf-8")
    return markdown
