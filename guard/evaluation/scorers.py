"""The one scorer interface of the runner: a name and ``score(prompt record, images) -> row fields``.

SSCD and CLIP (:func:`sscd_scorer`, :func:`clip_scorer`) and the testbed's pixel metrics
(``guard.testbed.efficacy``) are all scorers, so the runner has one loop whatever is measured.
A scorer sees one (prompt, method)'s images, seed-major, as the generator returned them (PIL images
or (H, W, 3) arrays in [0, 1]; :func:`as_pil` and :func:`as_float_array` convert), and returns
JSON-serialisable fields for that prompt's row. Scores over a whole method's images (FID) are
computed from the saved images once a run is complete (:mod:`guard.evaluation.fid`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .clip_score import ClipScorer
from .ground_truth import GroundTruth, open_images
from .prompts import PromptRecord
from .sscd import SSCDScorer, prompt_sscd

GroundTruthInput = Union[GroundTruth, Mapping[str, Sequence[Union[str, os.PathLike, Image.Image]]]]

#: Fields the runner writes itself; a scorer may not return them.
ROW_KEYS = frozenset({"key", "caption", "index", "kind", "method", "seeds", "num_images", "images", "seconds"})


@dataclass(frozen=True)
class Scorer:
    """``score(record, images)`` returns a dict of row fields; ``name`` says which scores they are."""

    name: str
    score: Callable[[PromptRecord, list], Mapping[str, Any]]

    def __call__(self, record: PromptRecord, images: list) -> dict[str, Any]:
        fields = self.score(record, images)
        if not isinstance(fields, Mapping) or not all(isinstance(name, str) for name in fields):
            raise TypeError(f"scorer {self.name!r} must return a mapping of field names to values, got {fields!r}")
        clashing = sorted(ROW_KEYS.intersection(fields))
        if clashing:
            raise ValueError(f"scorer {self.name!r} returned the runner's own row field(s) {clashing}")
        return dict(fields)


def check_scorers(scorers: Sequence[Scorer]) -> list[Scorer]:
    """Scorers with distinct names."""
    scorers = list(scorers)
    if not all(isinstance(scorer, Scorer) for scorer in scorers):
        raise TypeError("scorers must be guard.evaluation.scorers.Scorer objects")
    names = [scorer.name for scorer in scorers]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"two scorers are called {duplicates}; give each its own name")
    return scorers


def as_pil(image: Any) -> Image.Image:
    """A PIL image from a PIL image or an (H, W, 3) array (floats in [0, 1] or uint8)."""
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8:  # in the array's own precision, as diffusers' numpy_to_pil converts
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return Image.fromarray(array)


def as_float_array(image: Any) -> np.ndarray:
    """An (H, W, 3) float32 array in [0, 1] from a PIL image, a uint8 array or a float array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    array = np.asarray(image)
    return array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)


def sscd_scorer(sscd: SSCDScorer, ground_truth: GroundTruthInput) -> Scorer:
    """SSCD against each prompt's ground truths (embedded once per prompt): ``sscd``, ``sscd_per_image``.

    Prompts without a ground truth get ``sscd: null`` (not scored), never a made-up number.
    """
    references: dict[str, torch.Tensor] = {}

    def reference(key: str) -> torch.Tensor:
        if key not in references:
            items = list(ground_truth[key])
            images = [item if isinstance(item, Image.Image) else open_images([item])[0] for item in items]
            references[key] = sscd.embed(images)
        return references[key]

    def score(record: PromptRecord, images: list) -> dict[str, Any]:
        if record.key not in ground_truth:
            return {"sscd": None, "sscd_per_image": None}
        result = prompt_sscd(reference(record.key), sscd.embed([as_pil(image) for image in images]))
        return {"sscd": result.score, "sscd_per_image": list(result.per_image)}

    return Scorer("sscd", score)


def clip_scorer(clip: ClipScorer) -> Scorer:
    """CLIP score of the images against the prompt's original caption: ``clip``, ``clip_per_image``."""

    def score(record: PromptRecord, images: list) -> dict[str, Any]:
        result = clip.score(record.caption, [as_pil(image) for image in images])
        return {"clip": result.score, "clip_per_image": list(result.per_image)}

    return Scorer("clip", score)


def metric_scorers(
    sscd: SSCDScorer | None, ground_truth: GroundTruthInput | None, clip: ClipScorer | None
) -> list[Scorer]:
    """The paper's per-prompt metrics from the runner's keyword arguments, checked for a missing half."""
    if sscd is not None and ground_truth is None:
        raise ValueError("sscd needs ground_truth= (see guard.evaluation.find_ground_truth)")
    if ground_truth is not None and sscd is None:
        raise ValueError("ground_truth was given without an sscd= scorer to compare against it")
    scorers = [sscd_scorer(sscd, ground_truth)] if sscd is not None else []
    return scorers + ([clip_scorer(clip)] if clip is not None else [])


def json_ready(value: Any) -> Any:
    """Numpy and torch values as plain Python (lists, floats, ints, bools); NaN and inf as None."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return [json_ready(item) for item in value.tolist()]
    if isinstance(value, Mapping):
        return {str(name): json_ready(item) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    return value
