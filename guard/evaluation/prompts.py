"""The public memorized / non-memorized prompt lists the paper evaluates on, as typed records.

* ``memorized_laion_prompts.csv``: Hintersdorf et al. (NeurIPS 2024, NeMo)'s 500 memorized LAION
  prompts of Stable Diffusion v1.4, ``;``-separated, with the memorization type (``VM`` verbatim,
  ``TM`` template) and NeMo's reference SSCD scores (``mean_sscd``, ``max_sscd``, empty where not
  measured). Shipped with this package (MIT).
* ``unmemorized_laion_prompts.csv``: NeMo's non-memorized LAION prompts (same format, no type or
  scores). Shipped with this package (MIT).
* ``sdv1_500_memorized.jsonl``: the same 500 prompts (Webster 2023) as released by Wen et al.
  (ICLR 2024): caption, index (LAION id), url. Not shipped (no licence); without it
  :func:`load_sdv1_memorized` builds the same records from the NeMo CSV.
* ``sd2_mem.jsonl``: Stable Diffusion v2 memorized prompts with Webster's ``overfit_type``
  (``MV`` matching verbatim, ``TV`` template verbatim, ...), as released by Jeon et al. (ICML 2025).
  Not shipped (no licence).
* ``sd1_nmem.txt``: non-memorized prompts, one a line, from the same release. Not shipped.

Where a list is read from (:func:`list_path`): an explicit ``data_dir``, which must hold it; else
``$GUARD_DATA_DIR`` if set and holding it; else the copy in ``guard/evaluation/data`` (see its
README.md for sources, commits and licences); else a FileNotFoundError naming where to get it.
The paper's splits: :func:`select_kind` (verbatim = one ground-truth image, template = several) and
:func:`select_above` (only prompts whose unmitigated SSCD exceeds 0.7 are scored). :data:`PROMPT_SETS`
names the lists and their splits for command lines (``sd1-verbatim``, ``sd2-template``, ...);
:func:`load_prompts` takes such a name or a file in any of the formats above.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

DATA_DIR_ENV = "GUARD_DATA_DIR"
KINDS = ("verbatim", "template")

SDV1_MEMORIZED = "sdv1_500_memorized.jsonl"
NEMO_MEMORIZED = "memorized_laion_prompts.csv"
NEMO_UNMEMORIZED = "unmemorized_laion_prompts.csv"
SD2_MEMORIZED = "sd2_mem.jsonl"
SD1_NONMEMORIZED = "sd1_nmem.txt"

#: The lists shipped in this folder: those whose release carries a licence allowing it (README.md there).
SHIPPED_DIR = Path(__file__).resolve().parent / "data"
SHIPPED_LISTS = (NEMO_MEMORIZED, NEMO_UNMEMORIZED)

_WEN = "https://github.com/YuxinWenRick/diffusion_memorization"
_NEMO = "https://github.com/ml-research/localizing_memorization_in_diffusion_models"
_JEON = "https://github.com/Dongjae0324/sharpness_memorization_diffusion"

#: Where each list is published (repository and path), for error messages and users.
LIST_SOURCES: Mapping[str, str] = {
    SDV1_MEMORIZED: f"{_WEN} (examples/{SDV1_MEMORIZED}; Wen et al., ICLR 2024)",
    NEMO_MEMORIZED: f"{_NEMO} (prompts/{NEMO_MEMORIZED}; Hintersdorf et al., NeurIPS 2024)",
    NEMO_UNMEMORIZED: f"{_NEMO} (prompts/{NEMO_UNMEMORIZED}; Hintersdorf et al., NeurIPS 2024)",
    SD2_MEMORIZED: f"{_JEON} (prompts/{SD2_MEMORIZED}; Jeon et al., ICML 2025)",
    SD1_NONMEMORIZED: f"{_JEON} (prompts/{SD1_NONMEMORIZED}; Jeon et al., ICML 2025)",
}

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
    source: the list's file name (``sdv1_500_memorized.jsonl`` even when built from the NeMo CSV);
        row: its 0-based data row there.
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
    """The user's prompt-list folder: ``data_dir`` if given, else ``$GUARD_DATA_DIR``; never a download.

    Loaders need no folder for the shipped lists; see :func:`list_path` for the full order.
    """
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    if data_dir is None:
        raise FileNotFoundError(
            f"no prompt-list folder given: pass data_dir=... or set {DATA_DIR_ENV} to a folder holding "
            f"the public lists ({SDV1_MEMORIZED} from Wen et al. 2024's release of Webster 2023's prompts; "
            f"{SD2_MEMORIZED} and {SD1_NONMEMORIZED} from Jeon et al. 2025). NeMo's {NEMO_MEMORIZED} and "
            f"{NEMO_UNMEMORIZED} ship with this package and need no folder."
        )
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"prompt-list folder {path} does not exist (from data_dir or ${DATA_DIR_ENV})")
    return path


def _locate(name: str, data_dir: str | os.PathLike | None) -> Path | None:
    """The file :func:`list_path` means, or None where neither the environment nor the package has it."""
    if name not in LIST_SOURCES:
        raise ValueError(f"unknown prompt list {name!r}; known: {sorted(LIST_SOURCES)}")
    if data_dir is not None:
        folder = resolve_data_dir(data_dir)
        if not (folder / name).is_file():
            shipped = "; or give no data_dir to use the copy shipped with guard" if name in SHIPPED_LISTS else ""
            raise FileNotFoundError(
                f"{name} not found in {folder} (the data_dir given); get it from {LIST_SOURCES[name]}{shipped}"
            )
        return folder / name
    environment = os.environ.get(DATA_DIR_ENV)
    if environment and (Path(environment).expanduser() / name).is_file():
        return Path(environment).expanduser() / name
    if name in SHIPPED_LISTS:
        return SHIPPED_DIR / name
    return None


def list_path(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Where the loaders read the list ``name`` from, so that a run can record which copy it used.

    An explicit ``data_dir`` must hold the file; else ``$GUARD_DATA_DIR`` is used if set and holding it;
    else the copy shipped in :data:`SHIPPED_DIR` (NeMo's two lists only); else FileNotFoundError.
    """
    path = _locate(name, data_dir)
    if path is None:
        environment = os.environ.get(DATA_DIR_ENV)
        looked = f"${DATA_DIR_ENV}={environment} does not hold it; " if environment else ""
        raise FileNotFoundError(
            f"{name} is not shipped with guard (its release has no licence); {looked}get it from "
            f"{LIST_SOURCES[name]} and pass data_dir=FOLDER or set {DATA_DIR_ENV}=FOLDER"
        )
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

    Where ``sdv1_500_memorized.jsonl`` is found (``data_dir``, which must hold it, else
    ``$GUARD_DATA_DIR``), it is joined by LAION index with ``memorized_laion_prompts.csv`` from the
    same folder, or the shipped copy if that folder has none; a prompt absent there is an error.
    Otherwise (the JSONL has no licence and is not shipped) the records are built from the NeMo CSV
    alone: it holds the same 500 prompts in the same order with the same captions, URLs and LAION
    indices, so the records are equal either way (``source`` names the JSONL in both).
    """
    jsonl = _locate(SDV1_MEMORIZED, data_dir)
    if jsonl is None:
        nemo = load_nemo_csv(list_path(NEMO_MEMORIZED))
        return [replace(record, source=SDV1_MEMORIZED, row=row) for row, record in enumerate(nemo)]
    table = jsonl.with_name(NEMO_MEMORIZED)
    if not table.is_file():
        table = SHIPPED_DIR / NEMO_MEMORIZED
    records = load_webster_jsonl(jsonl)
    nemo = {record.index: record for record in load_nemo_csv(table)}
    unmatched = [record.index for record in records if record.index not in nemo]
    if unmatched:
        raise ValueError(
            f"{len(unmatched)} prompt(s) of {SDV1_MEMORIZED} in {jsonl.parent} have no row in {table} "
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
    """NeMo's 500 memorized LAION prompts (VM/TM) with reference SSCD scores; shipped, so no folder is needed."""
    return load_nemo_csv(list_path(NEMO_MEMORIZED, data_dir))


def load_nemo_unmemorized(data_dir: str | os.PathLike | None = None) -> list[PromptRecord]:
    """NeMo's 500 non-memorized LAION prompts; shipped, so no folder is needed."""
    return load_nemo_csv(list_path(NEMO_UNMEMORIZED, data_dir))


def load_sd2_memorized(data_dir: str | os.PathLike | None = None) -> list[PromptRecord]:
    """SD v2 memorized prompts with Webster's overfit_type (MV -> verbatim, TV -> template); not shipped."""
    return load_webster_jsonl(list_path(SD2_MEMORIZED, data_dir))


def load_sd1_nonmemorized(data_dir: str | os.PathLike | None = None) -> list[PromptRecord]:
    """Non-memorized COCO-style prompts (one a line), for quality checks on ordinary prompts; not shipped."""
    return load_text_lines(list_path(SD1_NONMEMORIZED, data_dir))


def _of_kind(loader: Callable[..., list[PromptRecord]], kind: str) -> Callable[..., list[PromptRecord]]:
    def load(data_dir: str | os.PathLike | None = None) -> list[PromptRecord]:
        return select_kind(loader(data_dir), kind)

    load.__doc__ = f"The {kind} prompts of :func:`{loader.__name__}` (the paper's split)."
    return load


#: Loaders by prompt-set name, for command lines and configuration files. The ``-verbatim`` and
#: ``-template`` sets are the paper's splits of a memorized list (one ground truth vs several).
PROMPT_SETS: Mapping[str, Callable[..., list[PromptRecord]]] = {
    "sd1-memorized": load_sdv1_memorized,
    "sd1-verbatim": _of_kind(load_sdv1_memorized, "verbatim"),
    "sd1-template": _of_kind(load_sdv1_memorized, "template"),
    "nemo-memorized": load_nemo_memorized,
    "nemo-unmemorized": load_nemo_unmemorized,
    "sd2-memorized": load_sd2_memorized,
    "sd2-verbatim": _of_kind(load_sd2_memorized, "verbatim"),
    "sd2-template": _of_kind(load_sd2_memorized, "template"),
    "sd1-nonmemorized": load_sd1_nonmemorized,
}


def load_prompt_set(name: str, data_dir: str | os.PathLike | None = None) -> list[PromptRecord]:
    """The prompt set called ``name`` (a key of :data:`PROMPT_SETS`)."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; available: {sorted(PROMPT_SETS)}")
    return PROMPT_SETS[name](data_dir)


def load_prompt_file(path: str | os.PathLike) -> list[PromptRecord]:
    """A prompt list file by suffix: ``.csv`` NeMo's ``;`` CSV, ``.jsonl`` Webster's JSONL, else one prompt a line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return load_nemo_csv(path)
    if suffix == ".jsonl":
        return load_webster_jsonl(path)
    return load_text_lines(path)


def load_prompts(name_or_file: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> list[PromptRecord]:
    """A prompt set by name (:data:`PROMPT_SETS`, lists read as :func:`list_path` says) or a prompt file."""
    if isinstance(name_or_file, str) and name_or_file in PROMPT_SETS:
        return load_prompt_set(name_or_file, data_dir)
    path = Path(name_or_file).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{name_or_file} is neither a prompt set ({', '.join(PROMPT_SETS)}) nor a file "
            "(a NeMo ';' .csv, a Webster .jsonl or a text file with one prompt a line)"
        )
    return load_prompt_file(path)


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
