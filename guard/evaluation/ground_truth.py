"""Finding the user's ground-truth training images for each prompt (never downloaded).

Many of the lists' URLs are dead, so the images come from wherever the user obtained them. Two
ways to point at them:

* a folder named by LAION index: ``<index>.<ext>`` (one image), ``<index>_<anything>.<ext>`` and/or
  a sub-folder ``<index>/`` holding several (template prompts have several ground truths);
* a mapping file: JSON ``{"<index>": "path" | ["path", ...]}`` or CSV with header ``index,path``
  (one row per image, an index may repeat); relative paths are taken from the mapping file's folder.

Missing images are an error that names every prompt lacking one, unless the caller explicitly
allows them (then :attr:`GroundTruth.missing` says which).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from PIL import Image

from .prompts import PromptRecord

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


class MissingGroundTruthError(FileNotFoundError):
    """Some prompts have no ground-truth image; ``missing`` lists their keys."""

    def __init__(self, missing: list[str], where: str):
        self.missing = missing
        shown = ", ".join(missing[:20]) + (f", ... ({len(missing) - 20} more)" if len(missing) > 20 else "")
        super().__init__(
            f"{len(missing)} prompt(s) have no ground-truth image in {where}: {shown}. "
            "Add them, or pass allow_missing=True to score only the others"
        )


@dataclass(frozen=True)
class GroundTruth:
    """Ground-truth image paths per prompt key, and the keys that have none."""

    paths: Mapping[str, tuple[Path, ...]]
    missing: tuple[str, ...] = field(default=())

    def __contains__(self, key: object) -> bool:
        return key in self.paths

    def __getitem__(self, key: str) -> tuple[Path, ...]:
        return self.paths[key]

    def __len__(self) -> int:
        return len(self.paths)

    def images(self, key: str) -> list[Image.Image]:
        """The ground truths of prompt ``key``, opened as RGB."""
        return open_images(self.paths[key])


def open_images(paths: Iterable[str | os.PathLike]) -> list[Image.Image]:
    """Open image files as RGB (fully loaded, file handles closed)."""
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _scan_folder(folder: Path) -> dict[str, list[Path]]:
    """Images in ``folder`` grouped by the key their name starts with (see the module docstring)."""
    found: dict[str, list[Path]] = {}
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            images = [path for path in sorted(entry.iterdir()) if _is_image(path)]
            if images:
                found.setdefault(entry.name, []).extend(images)
        elif _is_image(entry):
            found.setdefault(entry.stem.split("_", 1)[0], []).append(entry)
    return found


def _read_mapping(mapping_file: Path) -> dict[str, list[Path]]:
    base = mapping_file.parent
    found: dict[str, list[Path]] = {}
    if mapping_file.suffix.lower() == ".json":
        with mapping_file.open(encoding="utf-8") as handle:
            mapping = json.load(handle)
        if not isinstance(mapping, dict):
            raise ValueError(f"{mapping_file}: expected a JSON object {{index: path or [paths]}}")
        for key, value in mapping.items():
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list) or not all(isinstance(item, str) for item in values):
                raise ValueError(f"{mapping_file}: entry {key!r} must be a path or a list of paths, got {value!r}")
            found.setdefault(str(key), []).extend(base / item for item in values)
    else:
        with mapping_file.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"index", "path"} <= set(reader.fieldnames):
                raise ValueError(f"{mapping_file}: expected a CSV header with columns 'index' and 'path'")
            for row in reader:
                found.setdefault(row["index"].strip(), []).append(base / row["path"].strip())
    absent = [str(path) for paths in found.values() for path in paths if not path.is_file()]
    if absent:
        raise FileNotFoundError(f"{mapping_file} names {len(absent)} file(s) that do not exist: {absent[:10]}")
    return found


def find_ground_truth(
    records: Iterable[PromptRecord],
    folder: str | os.PathLike | None = None,
    *,
    mapping_file: str | os.PathLike | None = None,
    allow_missing: bool = False,
) -> GroundTruth:
    """Ground-truth image paths for each record, from ``folder`` or ``mapping_file`` (exactly one).

    Records are matched by :attr:`PromptRecord.key` (the LAION index). Raises
    :class:`MissingGroundTruthError` naming every record without an image unless ``allow_missing``.
    """
    if (folder is None) == (mapping_file is None):
        raise ValueError("pass exactly one of folder= (images named by LAION index) or mapping_file=")
    if folder is not None:
        source = Path(folder).expanduser()
        if not source.is_dir():
            raise FileNotFoundError(f"ground-truth folder {source} does not exist")
        found = _scan_folder(source)
    else:
        source = Path(mapping_file).expanduser()
        if not source.is_file():
            raise FileNotFoundError(f"ground-truth mapping file {source} does not exist")
        found = _read_mapping(source)
    paths: dict[str, tuple[Path, ...]] = {}
    missing: list[str] = []
    for record in records:
        if record.index is None:
            raise ValueError(
                f"prompt {record.caption!r} ({record.source} row {record.row}) has no LAION index, "
                "so it has no ground-truth image; score only memorized-prompt lists"
            )
        if record.key in found:
            paths[record.key] = tuple(found[record.key])
        else:
            missing.append(record.key)
    if missing and not allow_missing:
        raise MissingGroundTruthError(missing, str(source))
    return GroundTruth(paths=paths, missing=tuple(missing))
