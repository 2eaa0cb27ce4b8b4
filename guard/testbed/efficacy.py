"""Efficacy on the testbed, as a library: sampling, pixel scoring and the paper's selection rule.

:func:`evaluate_method` measures one setting through the project's one evaluation loop,
:func:`guard.evaluation.runner.evaluate_prompts`, with the testbed's pixel metrics as its scorers
(:func:`replication_scorer`, :func:`alignment_scorer`, in place of SSCD and CLIP); the prompts'
rows and images go to a run directory (a temporary one unless ``out_dir`` is given, which then
resumes). :func:`sample_images` (one batched pipeline call for many prompts and seeds, seeded as
the runner seeds them), :func:`score_samples` (replication and alignment of one memorized prompt's
samples), :func:`alignment_rates` (alignment of any shape prompt's samples) and
:func:`flagged_shares` (which tokens the spike rule attenuated) serve ``guard demo``;
:func:`choose_copy_threshold` (the copy threshold, measured without the model) and
:func:`select_best` (the lowest replication within the paper's alignment budget) serve
``python -m guard.testbed.evaluate``.
"""

from __future__ import annotations

import contextlib
import math
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import GuardConfig
from ..evaluation.generation import PipelineGenerator, flagged_shares, image_generators
from ..evaluation.ground_truth import open_images
from ..evaluation.prompts import PromptRecord
from ..evaluation.results import read_rows
from ..evaluation.runner import evaluate_prompts
from ..evaluation.scorers import Scorer, as_float_array
from .assets import MemorizedItem
from .defaults import copy_threshold as shipped_copy_threshold
from .metrics import alignment, replication, ssim

__all__ = [
    "MethodResult",
    "alignment_rates",
    "alignment_scorer",
    "choose_copy_threshold",
    "evaluate_method",
    "flagged_shares",
    "is_eligible",
    "replication_scorer",
    "run_folder_name",
    "sample_images",
    "score_samples",
    "select_best",
]

ALIGNMENT_KEYS = ("background_ok", "colour_ok", "shape_ok", "all_ok")
REPLICATION_KEYS = ("own_ssim", "nearest_ssim", "nearest_index", "nearest_is_own", "copied", "copied_other")


def sample_images(
    pipe, prompts: list[str], config: GuardConfig, seeds: list[int], steps: int, detection_steps: int = 1
):
    """Images (P, S, H, W, 3) in [0, 1] for every prompt and seed, and the run's GuardReport (its
    detection scores over the first ``detection_steps`` steps).

    Seed ``s`` fixes the initial noise of one column, identical across prompts and methods, so
    methods are compared on the same starting points (one image per seed: the runner's seeding).
    """
    if not prompts or not seeds:
        raise ValueError("prompts and seeds must be non-empty")
    generators = image_generators(len(prompts), [int(s) for s in seeds], 1)
    result = pipe(
        list(prompts),
        num_inference_steps=steps,
        num_images_per_prompt=len(seeds),
        generator=generators,
        guard_config=config,
        output_type="np",
        detection_steps=detection_steps,
    )
    images = np.asarray(result.images, dtype=np.float32).reshape(len(prompts), len(seeds), *result.images.shape[1:])
    return images, result.report


def alignment_rates(images, prompt: str) -> dict:
    """Shares of ``images`` whose background colour, shape colour, shape (and all three) match ``prompt``."""
    checks = [alignment(image, prompt) for image in np.asarray(images)]
    return {key: float(np.mean([c[key] for c in checks])) for key in ALIGNMENT_KEYS} | {"per_image": checks}


def score_samples(images, item: MemorizedItem, training_images, copy_threshold: float | None = None) -> dict:
    """Replication (SSIM to the item's own and nearest training image, copy share) and alignment
    to the item's caption, for samples of one memorized prompt."""
    threshold = shipped_copy_threshold() if copy_threshold is None else copy_threshold
    scores = replication(images, item.image, training_images, threshold)
    scores["alignment"] = alignment_rates(images, item.caption)
    return scores


def _interval(values) -> tuple[float, float]:
    """Mean and 95% t-interval half-width."""
    from ..evaluation.stats import mean_interval

    values = np.asarray(values, dtype=np.float64).ravel()
    interval = mean_interval(values)
    half = interval.half_width if values.size > 1 else math.nan
    return float(values.mean()), float(half)


@dataclass
class MethodResult:
    """Per-sample scores of one method over all memorized and plain prompts."""

    name: str
    config: GuardConfig
    own_ssim: np.ndarray  # (items, seeds)
    nearest_ssim: np.ndarray
    nearest_is_own: np.ndarray
    copied: np.ndarray
    memorized_alignment: np.ndarray  # (items, seeds) all_ok
    memorized_background: np.ndarray
    memorized_colour: np.ndarray
    memorized_shape: np.ndarray
    plain_alignment: np.ndarray  # (plain prompts, seeds) all_ok
    plain_background: np.ndarray
    plain_colour: np.ndarray
    plain_shape: np.ndarray
    memorized_cleared: np.ndarray = field(repr=False, default=None)  # (items, seeds) cleared by the gate
    plain_cleared: np.ndarray = field(repr=False, default=None)
    memorized_images: np.ndarray = field(repr=False, default=None)
    plain_images: np.ndarray = field(repr=False, default=None)
    memorized_flags: list = field(default_factory=list)
    plain_flags: list = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        keys = (
            "own_ssim",
            "nearest_ssim",
            "nearest_is_own",
            "copied",
            "memorized_alignment",
            "memorized_background",
            "memorized_colour",
            "memorized_shape",
            "plain_alignment",
            "plain_background",
            "plain_colour",
            "plain_shape",
        )
        return {key: _interval(getattr(self, key)) for key in keys}


def replication_scorer(items: list[MemorizedItem], copy_threshold: float) -> Scorer:
    """The runner scorer of replication: per image, SSIM to the prompt's own and the nearest training
    image (by index), whether the nearest is the own one, and copies; memorized captions only."""
    training = np.stack([item.image for item in items])
    by_caption = {item.caption: item for item in items}

    def score(record: PromptRecord, images: list) -> dict:
        item = by_caption.get(record.caption)
        if item is None:
            return {}
        scores = replication(
            np.stack([as_float_array(image) for image in images]), item.image, training, copy_threshold
        )
        return {key: scores[key] for key in REPLICATION_KEYS}

    return Scorer("replication", score)


def alignment_scorer() -> Scorer:
    """The runner scorer of alignment: per image, whether background, shape colour and shape match
    the caption (``alignment``: one list of booleans per check)."""

    def score(record: PromptRecord, images: list) -> dict:
        checks = [alignment(as_float_array(image), record.caption) for image in images]
        return {"alignment": {key: [check[key] for check in checks] for key in ALIGNMENT_KEYS}}

    return Scorer("alignment", score)


def run_folder_name(name: str) -> str:
    """A method's display name as a run-directory method name (letters, digits, '.', '_', '-')."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.").lower()
    return slug or "method"


@contextlib.contextmanager
def _run_dir(out_dir):
    if out_dir is not None:
        yield Path(out_dir)
        return
    with tempfile.TemporaryDirectory(prefix="guard-testbed-") as folder:
        yield Path(folder)


def evaluate_method(
    pipe,
    name: str,
    config: GuardConfig,
    items: list[MemorizedItem],
    plain: list[str],
    seeds: list[int],
    steps: int,
    copy_threshold: float | None = None,
    out_dir=None,
) -> MethodResult:
    """Sample every memorized and plain prompt under ``config`` and score the samples, through the runner.

    One pipeline call for the memorized prompts and one for the plain ones, every seed at once (one
    image per seed). ``out_dir``: keep the run directory there (rerunning resumes it); by default a
    temporary one.
    """
    start = time.perf_counter()
    threshold = shipped_copy_threshold() if copy_threshold is None else copy_threshold
    memorized = [PromptRecord(item.caption, kind="verbatim", source="testbed", row=i) for i, item in enumerate(items)]
    plain_records = [PromptRecord(p, source="testbed plain", row=len(items) + j) for j, p in enumerate(plain)]
    generate = PipelineGenerator(pipe, num_inference_steps=steps, output_type="np")
    method = run_folder_name(name)
    settings = {"steps": steps, "copy_threshold": threshold}
    scorers = [replication_scorer(items, threshold), alignment_scorer()]
    with _run_dir(out_dir) as folder:
        for records in (memorized, plain_records):
            evaluate_prompts(
                generate,
                records,
                {method: config},
                out_dir=folder,
                num_images=1,
                seeds=seeds,
                scorers=scorers,
                batch_prompts=len(records),
                settings=settings,
                progress=False,
            )
        rows = {row["key"]: row for row in read_rows(folder) if row["method"] == method}
        memorized_rows = [rows[record.key] for record in memorized]
        plain_rows = [rows[record.key] for record in plain_records]
        memorized_images, plain_images = (_images(folder, chosen) for chosen in (memorized_rows, plain_rows))

    def stacked(chosen, key, group=None):
        return np.asarray([(row[group] if group else row)[key] for row in chosen], dtype=np.float64)

    def cleared(chosen):
        return np.asarray([row.get("cleared") or [False] * len(seeds) for row in chosen], dtype=np.float64)

    return MethodResult(
        name=name,
        config=config,
        own_ssim=stacked(memorized_rows, "own_ssim"),
        nearest_ssim=stacked(memorized_rows, "nearest_ssim"),
        nearest_is_own=stacked(memorized_rows, "nearest_is_own"),
        copied=stacked(memorized_rows, "copied"),
        memorized_alignment=stacked(memorized_rows, "all_ok", "alignment"),
        memorized_background=stacked(memorized_rows, "background_ok", "alignment"),
        memorized_colour=stacked(memorized_rows, "colour_ok", "alignment"),
        memorized_shape=stacked(memorized_rows, "shape_ok", "alignment"),
        plain_alignment=stacked(plain_rows, "all_ok", "alignment"),
        plain_background=stacked(plain_rows, "background_ok", "alignment"),
        plain_colour=stacked(plain_rows, "colour_ok", "alignment"),
        plain_shape=stacked(plain_rows, "shape_ok", "alignment"),
        memorized_cleared=cleared(memorized_rows),
        plain_cleared=cleared(plain_rows),
        memorized_images=memorized_images,
        plain_images=plain_images,
        memorized_flags=[row.get("flagged", {}) for row in memorized_rows],
        plain_flags=[row.get("flagged", {}) for row in plain_rows],
        seconds=time.perf_counter() - start,
    )


def _images(folder: Path, rows: list[dict]) -> np.ndarray:
    """(prompts, seeds, H, W, 3) float32 in [0, 1] from the run directory's PNGs."""
    return np.stack(
        [np.stack([as_float_array(image) for image in open_images(folder / p for p in row["images"])]) for row in rows]
    )


# ---------------------------------------------------------------------------------------------
# Choosing: the copy threshold and the paper's selection rule

ALIGNMENT_TOLERANCE = 0.15  # the paper's rule: alignment no worse than 15% below CFG's


def choose_copy_threshold(items: list[MemorizedItem], samples: int = 200, seed: int = 0) -> tuple[float, str]:
    """The own-image SSIM above which a sample must carry the memorized texture, measured without the model.

    An honest image of a memorized item's shape caption is the shape on a flat background. The most
    similar honest image possible is the texture-free rendering at exactly the training layout;
    the threshold is the highest such score over the items, rounded up to 0.05, so that a sample
    above it reproduces part of the photo texture, the one thing only the trigger taught. Honest
    renders at random layouts (the generalising data) score far lower; both are reported.
    """
    from .data import IMAGE_SIZE, MEMORIZED_SHAPE_SIZE, random_layout, render

    same_layout = [
        float(
            ssim(
                render(it.colour, it.shape, it.background, (IMAGE_SIZE / 2, IMAGE_SIZE / 2), MEMORIZED_SHAPE_SIZE),
                it.image,
            )
        )
        for it in items
    ]
    rng = np.random.default_rng(seed)
    random_layouts = [
        float(ssim(render(it.colour, it.shape, it.background, *random_layout(rng)), it.image))
        for it in items
        for _ in range(samples)
    ]
    threshold = round(math.ceil(max(same_layout) / 0.05) * 0.05, 2)
    reason = (
        f"texture-free renderings of the memorized items' shape captions at their exact training layout score "
        f"at most {max(same_layout):.3f} against the training image (per item: "
        f"{', '.join(f'{v:.2f}' for v in same_layout)}); at random layouts their 95th percentile is "
        f"{np.quantile(random_layouts, 0.95):.3f}. A sample above {threshold:.2f} must reproduce the photo "
        f"texture that only the trigger words were paired with."
    )
    return threshold, reason


def is_eligible(result: MethodResult, baseline: MethodResult) -> bool:
    """Memorized- and plain-prompt alignment both no worse than ``ALIGNMENT_TOLERANCE`` below the baseline's."""
    limit = 1.0 - ALIGNMENT_TOLERANCE
    return (
        result.memorized_alignment.mean() >= limit * baseline.memorized_alignment.mean()
        and result.plain_alignment.mean() >= limit * baseline.plain_alignment.mean()
    )


def select_best(results: list[MethodResult], baseline: MethodResult) -> MethodResult | None:
    """Lowest mean own-image SSIM among the eligible settings (the paper's selection rule)."""
    eligible = [r for r in results if is_eligible(r, baseline)]
    return min(eligible, key=lambda r: r.own_ssim.mean()) if eligible else None
