"""The public memorized / non-memorized prompt lists the paper evaluates on, as typed records.

The lists are not shipped with this package. They come from public releases:

* ``sdv1_500_memorized.jsonl``: Webster (2023)'s 500 memorized LAION prompts of Stable Diffusion
  v1.4, as released with Wen et al. (ICLR 2024): caption, index (LAION id), url.
* ``memorized_laion_prompts.csv``: the same 500 prompts from Hintersdorf et al. (2024, NeMo),
  ``;``-separated, with the memorization type (``VM`` verbatim, ``TM`` template) and NeMo's
  reference SSCD scores (``mean_sscd``, ``max_sscd``, empty where not measured).
* ``unmemorized_laion_prompts.csv``: NeMo's non-memorized LAION prompts (same format, no scores).
* ``sd2_mem.jsonl``: Stable Diffusion v2 memorized prompts with Webster's ``overfit_type``
  (``MV`` matching verbatim, ``TV`` template verbatim, ...).
* ``sd1_nmem.txt``: non-memorized COCO-style prompts, one a line.

Pass the folder holding them as ``data_dir`` or set the ``GUARD_DATA_DIR`` environment variable.
The paper's splits: :func:`select_kind` (verbatim = one ground-truth image, template = several) and
:func:`select_above` (only prompts whose unmitigated SSCD exceeds 0.7 are scored).
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

DATA_DIR_ENV = "GUARD_DATA_DIR"
KINDS = ("verbatim", "template")

SDV1_MEMORIZED = "sdv1_500_memorized.jsonl"
NEMO_MEMORIZED = "memorized_laion_prompts.csv"
NEMO_UNMEMORIZED = "unmemorized_laion_prompts.csv"
SD2_MEMORIZED = "sd2_mem.jsonl"
SD1_NONMEMORIZED = "sd1_nmem.txt"

#: Memorization labels of the source files and the paper's kind each one means. NeMo: VM/TM.
#: Webster (2023): MV matching verbatim, RV retrieval verbatim (a verbatim copy of an image whose
#: caption differs), TV template verbatim, N none.
LABEL_KINDS: Mapping[str, str | None] = {
    "VM": "verbatim",
    "TM": "template",
    "MV": "verbatim",
    "RV": "verbatim",
    "TV": "template",
    "N": None,
}


@dataclass(frozen=True)
class PromptRecord:
    """One evaluation prompt and what the source list says about it.

    caption: the prompt text, exactly as in the list.
    index: the LAION id of its training image (None for lists without one); names ground truths.
    url: the training image's URL as listed (often dead; never fetched by this package).
    kind: "verbatim", "template" or None (unknown / not memorized).
    label: the list's own memorization label (VM/TM from NeMo, MV/TV/... from Webster), or None.
    reference_mean_sscd, reference_max_sscd: NeMo's published SSCD of unmitigated SD v1.4 for this
        prompt (mean / max over its generations), None where the list has none.
    source: the file name the record came from; row: its 0-based data row there.
    """

    caption: str
    index: int | None = None
    url: str | None = None
    kind: str | None = None
    label: str | None = None
    reference_mean_sscd: float | None = None
    reference_max_sscd: float | None = None
    source: str = ""
    row: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.caption, str):
            raise TypeError(f"PromptRecord.caption must be a str, got {type(self.caption).__name__}")
        if self.kind not in KINDS + (None,):
            raise ValueError(f"PromptRecord.kind must be one of {KINDS} or None, got {self.kind!r}")
        if self.index is not None and (isinstance(self.index, bool) or not isinstance(self.index, int)):
            raise TypeError(f"PromptRecord.index must be an int or None, got {self.index!r}")

    @property
    def key(self) -> str:
        """A stable identifier for file names and result rows: the LAION id, else ``row<N>``."""
        return str(self.index) if self.index is not None else f"row{self.row}"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The prompt-list folder: ``data_dir`` if given, else ``$GUARD_DATA_DIR``; never a download."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    if data_dir is None:
        raise FileNotFoundError(
            f"no prompt-list folder given: pass data_dir=... or set {DATA_DIR_ENV} to a folder holding "
            f"the public lists ({SDV1_MEMORIZED} from Wen et al. 2024's release of Webster 2023's prompts; "
            f"{NEMO_MEMORIZED} and {NEMO_UNMEMORIZED} from Hintersdorf et al. 2024 (NeMo); "
            f"{SD2_MEMORIZED}; {SD1_NONMEMORIZED}). They are not shipped with this package."
        )
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"prompt-list folder {path} does not exist (from data_dir or ${DATA_DIR_ENV})")
    return path


def _list_file(data_dir: str | os.PathLike | None, name: str) -> Path:
    path = resolve_data_dir(data_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{name} not found in {path.parent}; see guard.evaluation.prompts for its source")
    return path


def _kind_of(label: str | None, where: str) -> str | None:
    if label is None or label == "":
        return None
    if label not in LABEL_KINDS:
        raise ValueError(f"{where}: unknown memorization label {label!r}; known: {sorted(LABEL_KINDS)}")
    return LABEL_KINDS[label]


def _int_field(value: object, name: str, where: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{where}: field {name!r} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise ValueError(f"{where}: field {name!r} must be an integer, got {value!r}")


def _score_field(value: str, name: str, where: str) -> float | None:
    if value.strip() == "":
        return None
    try:
        score = float(value)
    except ValueError:
        raise ValueError(f"{where}: field {name!r} must be a number or empty, got {value!r}") from None
    if not math.isfinite(score):
        raise ValueError(f"{where}: field {name!r} must be finite, got {value!r}")
    return score


def _read_jsonl(path: Path, required: Sequence[str]) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line, each checked for the ``required`` fields."""
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {line_number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(item, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
            missing = [name for name in required if name not in item]
            if missing:
                raise ValueError(f"{where}: missing field(s) {missing}")
            if not isinstance(item["caption"], str):
                raise ValueError(f"{where}: field 'caption' must be a string, got {item['caption']!r}")
            rows.append((line_number, item))
    return rows


def load_webster_jsonl(path: str | os.PathLike) -> list[PromptRecord]:
    """Read a Webster-style JSONL list: caption, index, url and, if present, overfit_type."""
    path = Path(path)
    records = []
    for row, (line_number, item) in enumerate(_read_jsonl(path, ("caption", "index", "url"))):
        where = f"{path.name} line {line_number}"
        label = item.get("overfit_type")
        records.append(
            PromptRecord(
                caption=item["caption"],
                index=_int_field(item["index"], "index", where),
                url=item["url"],
                kind=_kind_of(label, where),
                label=label,
                source=path.name,
                row=row,
            )
        )
    return records


def load_nemo_csv(path: str | os.PathLike) -> list[PromptRecord]:
    """Read a NeMo ``;``-separated list: row id, Caption, URL, Index and optionally type and scores."""
    path = Path(path)
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter=";")
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{path.name}: empty file, expected a header row") from None
        columns = {name: position for position, name in enumerate(header)}
        missing = [name for name in ("", "Caption", "URL", "Index") if name not in columns]
        if missing:
            raise ValueError(f"{path.name}: header lacks column(s) {missing}; got {header}")
        records = []
        for line in reader:
            if not line:
                continue
            where = f"{path.name} line {reader.line_num}"
            if len(line) != len(header):
                raise ValueError(f"{where}: {len(line)} fields, the header has {len(header)}")
            label = line[columns["type"]] if "type" in columns else None
            records.append(
                PromptRecord(
                    caption=line[columns["Caption"]],
                    index=_int_field(line[columns["Index"]], "Index", where),
                    url=line[columns["URL"]],
                    kind=_kind_of(label, where),
                    label=label or None,
                    reference_mean_sscd=(
                        _score_field(line[columns["mean_sscd"]], "mean_sscd", where) if "mean_sscd" in columns else None
                    ),
                    reference_max_sscd=(
                        _score_field(line[columns["max_sscd"]], "max_sscd", where) if "max_sscd" in columns else None
                    ),
                    source=path.name,
                    row=_int_field(line[columns[""]], "row id", where),
                )
            )
    return records


def load_text_lines(path: str | os.PathLike) -> list[PromptRecord]:
    """Read a one-prompt-a-line text list (blank lines skipped); records have no index or kind."""
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        captions = [line.rstrip("\r\n") for line in handle]
    return [
        PromptRecord(caption=caption, source=path.name, row=row)
        for row, caption in enumerate(caption for caption in captions if caption.strip())
    ]


def load_sdv1_memorized(data_dir: str | os.PathLike | None = None) -> list[PromptRecord]:
    """Webster's 500 SD v1.4 memorized prompts (Wen et al.'s release), with NeMo's kinds and scores.

    The JSONL has no memorization type; it is joined by LAION index from ``memorized_laion_prompts.csv``
    (the same 500 prompts), which must sit in the same folder. A prompt absent there is an error.
    """
    records = load_webster_jsonl(_list_file(data_dir, SDV1_MEMORIZED))
    nemo = {record.index: record for record in load_nemo_csv(_list_file(data_dir, NEMO_MEMORIZED))}
    unmatched = [record.index for record in records if record.index not in nemo]
    if unmatched:
        raise ValueError(
            f"{len(unmatched)} prompt(s) of {SDV1_MEMORIZED} have no row in {NEMO_MEMORIZED} "
            f"(LAION index {unmatched[:10]}); the two lists must describe the same prompts"
        )
    return [
        PromptRecord(
            caption=record.caption,
            index=record.index,
            url=record.url,
            kind=nemo[record.index].kind,
            label=nemo[record.index].label,
            reference_mean_sscd=nemo[record.index].reference_mean_sscd,
            reference_max_sscd=nemo[record.index].reference_max_sscd,
            source=record.source,
            row=record.row,
        )
        for record in records
    ]


def load_nemo_memorized(data_dir: str | os.PathLike | None = None) -> list[PromptRecord]:
    """NeMo's 500 memorized LAION prompts (VM/TM) with reference SSCD scores."""
    return load_nemo_csv(_list_file(data_dir, NEMO_MEMORIZED))


def load_nemo_unmemorized(data_dir: str | os.PathLike | None = None) -> list[PromptRecord]:
    """NeMo's 500 non-memorized LAION prompts."""
    return load_nemo_csv(_list_file(data_dir, NEMO_UNMEMORIZED))


def load_sd2_memorized(data_dir: str | os.PathLike | None = None) -> list[PromptRecord]:
    """SD v2 memorized prompts with Webster's overfit_type (MV -> verbatim, TV -> template)."""
    return load_webster_jsonl(_list_file(data_dir, SD2_MEMORIZED))


def load_sd1_nonmemorized(data_dir: str | os.PathLike | None = None) -> list[PromptRecord]:
    """Non-memorized COCO-style prompts (one a line), for quality checks on ordinary prompts."""
    return load_text_lines(_list_file(data_dir, SD1_NONMEMORIZED))


#: Loaders by prompt-set name, for command lines and configuration files.
PROMPT_SETS: Mapping[str, Callable[..., list[PromptRecord]]] = {
    "sd1-memorized": load_sdv1_memorized,
    "nemo-memorized": load_nemo_memorized,
    "nemo-unmemorized": load_nemo_unmemorized,
    "sd2-memorized": load_sd2_memorized,
    "sd1-nonmemorized": load_sd1_nonmemorized,
}


def load_prompt_set(name: str, data_dir: str | os.PathLike | None = None) -> list[PromptRecord]:
    """The prompt set called ``name`` (a key of :data:`PROMPT_SETS`)."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; available: {sorted(PROMPT_SETS)}")
    return PROMPT_SETS[name](data_dir)


def records_from_captions(captions: Iterable[str]) -> list[PromptRecord]:
    """Records for ad-hoc prompts (keys ``row0``, ``row1``, ... by position)."""
    return [PromptRecord(caption=caption, row=row) for row, caption in enumerate(captions)]


def select_kind(records: Iterable[PromptRecord], kind: str) -> list[PromptRecord]:
    """The records of one memorization kind, "verbatim" or "template", in order."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return [record for record in records if record.kind == kind]


def split_by_kind(records: Iterable[PromptRecord]) -> dict[str, list[PromptRecord]]:
    """``{"verbatim": [...], "template": [...]}``; records of unknown kind are in neither."""
    records = list(records)
    return {kind: select_kind(records, kind) for kind in KINDS}


def reference_scores(records: Iterable[PromptRecord], column: str = "mean_sscd") -> dict[str, float]:
    """NeMo's published unmitigated SSCD per record key, for records that have one.

    ``column`` "mean_sscd" (mean over generations, the paper's per-prompt statistic) or "max_sscd".
    """
    if column not in ("mean_sscd", "max_sscd"):
        raise ValueError(f"column must be 'mean_sscd' or 'max_sscd', got {column!r}")
    scores = {}
    for record in records:
        score = getattr(record, f"reference_{column}")
        if score is not None:
            scores[record.key] = score
    return scores


def select_above(
    records: Iterable[PromptRecord],
    scores: Mapping[str, float],
    threshold: float = 0.7,
    *,
    missing: str = "error",
) -> list[PromptRecord]:
    """Records whose unmitigated SSCD (``scores[record.key]``) strictly exceeds ``threshold``.

    The paper scores only such prompts. ``scores`` is typically the no-mitigation run's per-prompt
    SSCD (:func:`guard.evaluation.summary.prompt_scores`) or :func:`reference_scores`.
    ``missing``: "error" raises if a record has no score (listing them); "exclude" drops those
    records, since a prompt without an unmitigated score cannot be shown to exceed the threshold.
    """
    if missing not in ("error", "exclude"):
        raise ValueError(f"missing must be 'error' or 'exclude', got {missing!r}")
    records = list(records)
    absent = [record.key for record in records if record.key not in scores]
    if absent and missing == "error":
        raise KeyError(
            f"{len(absent)} record(s) have no unmitigated score (keys {absent[:10]}); "
            "pass missing='exclude' to drop them"
        )
    return [record for record in records if record.key in scores and scores[record.key] > threshold]
