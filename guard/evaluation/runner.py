"""Generate and score images for every (prompt, method), resumable after any interruption.

The image generator is injected: any ``generate(prompt, method, seed, num_images) -> list of PIL
images``. With this package's Stable Diffusion pipeline (``guard.pipeline``)::

    import torch
    from guard.config import GuardConfig
    from guard.pipeline import StableDiffusionGuardPipeline
    from guard.evaluation import (SSCDScorer, ClipScorer, evaluate_prompts, find_ground_truth,
                                  load_sdv1_memorized, pipeline_generate_fn, select_kind, summarise)

    pipe = StableDiffusionGuardPipeline.from_pretrained(
        "CompVis/stable-diffusion-v1-4", dtype=torch.bfloat16).to("cuda")
    prompts = select_kind(load_sdv1_memorized("path/to/lists"), "verbatim")
    evaluate_prompts(
        pipeline_generate_fn(pipe, num_inference_steps=50),
        prompts,
        {"none": GuardConfig.preset("cfg"), "attenuation": GuardConfig.preset("attenuation"),
         "guard": GuardConfig.preset("guard")},
        num_images=4, seeds=[0], out_dir="runs/sd14-verbatim",
        sscd=SSCDScorer.from_torchscript("sscd_disc_large.torchscript.pt", device="cuda"),
        ground_truth=find_ground_truth(prompts, "path/to/laion_images"),
        clip=ClipScorer.from_open_clip(device="cuda"),  # optional, needs open-clip-torch
    )
    print(summarise("runs/sd14-verbatim", baseline="none"))  # paper: only prompts with SSCD > 0.7

The pipeline also takes preset names, so ``methods=["cfg", "attenuation", "guard"]`` works as well.

Each finished (prompt, method) is one row in ``results.jsonl`` (see :mod:`guard.evaluation.results`);
rerunning the same call generates only what is missing. FID is not computed here (it needs a
reference set of LAION images and an Inception network; out of scope).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import torch
from PIL import Image
from tqdm.auto import tqdm

from .clip_score import ClipScorer
from .ground_truth import GroundTruth, open_images
from .prompts import PromptRecord, records_from_captions
from .results import (
    append_row,
    check_method_name,
    drop_unfinished_tail,
    image_path,
    read_rows,
    reconcile_manifest,
    rewrite_rows,
)
from .sscd import SSCDScorer, prompt_sscd

GenerateFn = Callable[[str, Any, int, int], Sequence[Image.Image]]
GroundTruthInput = Union[GroundTruth, Mapping[str, Sequence[Union[str, os.PathLike, Image.Image]]]]


def pipeline_generate_fn(pipe: Any, **call_kwargs: Any) -> GenerateFn:
    """A ``generate`` function over a GUARD pipeline: the method value is its ``GuardConfig``.

    Each call seeds a ``torch.Generator`` on the pipeline's device and runs
    ``pipe(prompt, guard_config=method, generator=..., num_images_per_prompt=n, **call_kwargs).images``.
    """

    def generate(prompt: str, method: Any, seed: int, num_images: int) -> list[Image.Image]:
        device = getattr(pipe, "device", torch.device("cpu"))
        generator = torch.Generator(device=device).manual_seed(seed)
        output = pipe(prompt, guard_config=method, generator=generator, num_images_per_prompt=num_images, **call_kwargs)
        return list(output.images)

    return generate


def _as_records(prompts: Iterable[PromptRecord | str]) -> list[PromptRecord]:
    prompts = list(prompts)
    if all(isinstance(prompt, str) for prompt in prompts):
        records = records_from_captions(prompts)
    elif all(isinstance(prompt, PromptRecord) for prompt in prompts):
        records = prompts
    else:
        raise TypeError("prompts must be all PromptRecord or all str")
    if not records:
        raise ValueError("prompts is empty")
    keys = [record.key for record in records]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(
            f"prompts have duplicate keys (LAION index / row) {duplicates[:10]}; each prompt needs its own"
        )
    return records


def _as_methods(methods: Mapping[str, Any] | Sequence[str]) -> dict[str, Any]:
    if isinstance(methods, Mapping):
        resolved = dict(methods)
    elif isinstance(methods, (list, tuple)):
        if len(set(methods)) != len(methods):
            raise ValueError(f"methods has duplicates: {list(methods)}")
        resolved = {name: name for name in methods}
    else:
        raise TypeError(f"methods must be a mapping name -> setting or a list of names, got {type(methods).__name__}")
    if not resolved:
        raise ValueError("methods is empty")
    for name in resolved:
        check_method_name(name)
    return resolved


def _as_seeds(seeds: int | Sequence[int]) -> list[int]:
    seeds = [seeds] if isinstance(seeds, int) and not isinstance(seeds, bool) else list(seeds)
    if not seeds or any(isinstance(seed, bool) or not isinstance(seed, int) for seed in seeds):
        raise ValueError(f"seeds must be an int or a non-empty sequence of ints, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds has duplicates: {seeds}")
    return seeds


def _generated(images: Any, num_images: int, where: str) -> list[Image.Image]:
    images = list(images) if isinstance(images, (list, tuple)) else images
    if not isinstance(images, list) or len(images) != num_images or not all(isinstance(i, Image.Image) for i in images):
        got = f"{len(images)} item(s)" if isinstance(images, list) else type(images).__name__
        raise ValueError(f"generate returned {got} for {where}; expected a list of {num_images} PIL images")
    return images


def _save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    image.save(temporary, format="PNG")
    os.replace(temporary, path)


class _Scorers:
    """SSCD and CLIP scoring with each prompt's ground-truth embeddings computed once."""

    def __init__(self, sscd: SSCDScorer | None, ground_truth: GroundTruthInput | None, clip: ClipScorer | None):
        if sscd is not None and ground_truth is None:
            raise ValueError("sscd needs ground_truth= (see guard.evaluation.find_ground_truth)")
        if ground_truth is not None and sscd is None:
            raise ValueError("ground_truth was given without an sscd= scorer to compare against it")
        self.sscd, self.ground_truth, self.clip = sscd, ground_truth, clip
        self._ground_truth_embeddings: dict[str, torch.Tensor] = {}

    def _reference(self, key: str) -> torch.Tensor:
        if key not in self._ground_truth_embeddings:
            items = list(self.ground_truth[key])
            images = [item if isinstance(item, Image.Image) else open_images([item])[0] for item in items]
            self._ground_truth_embeddings[key] = self.sscd.embed(images)
        return self._ground_truth_embeddings[key]

    def scores(self, key: str, caption: str, images: list[Image.Image]) -> dict[str, Any]:
        row: dict[str, Any] = {}
        if self.sscd is not None:
            if key in self.ground_truth:
                result = prompt_sscd(self._reference(key), self.sscd.embed(images))
                row.update(sscd=result.score, sscd_per_image=list(result.per_image))
            else:
                row.update(sscd=None, sscd_per_image=None)
        if self.clip is not None:
            result = self.clip.score(caption, images)
            row.update(clip=result.score, clip_per_image=list(result.per_image))
        return row


def evaluate_prompts(
    generate: GenerateFn,
    prompts: Iterable[PromptRecord | str],
    methods: Mapping[str, Any] | Sequence[str],
    *,
    out_dir: str | os.PathLike,
    num_images: int = 4,
    seeds: int | Sequence[int] = 0,
    sscd: SSCDScorer | None = None,
    ground_truth: GroundTruthInput | None = None,
    clip: ClipScorer | None = None,
    progress: bool = True,
) -> list[dict]:
    """Generate, save and score ``num_images`` images per seed for every (prompt, method).

    generate: ``generate(caption, method_setting, seed, num_images) -> list of PIL images``.
    prompts: PromptRecords (keyed by LAION index) or plain strings (keyed by position).
    methods: ``{name: setting}`` (the setting is passed to ``generate``, e.g. a GuardConfig) or a list
        of names (the name is passed). Names become folder names.
    seeds: one seed or several; each seed is one ``generate`` call, and every method uses the same
        seeds, so methods are compared on the same initial noise.
    sscd + ground_truth: score SSCD for prompts that have ground truths (else the row's sscd is null).
    clip: score CLIP against the caption.

    Prompts are the outer loop, so an interrupted run has every method of the finished prompts.
    Returns all rows of the run directory, earlier runs' included.
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive int, got {num_images!r}")
    records = _as_records(prompts)
    methods = _as_methods(methods)
    seeds = _as_seeds(seeds)
    scorers = _Scorers(sscd, ground_truth, clip)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reconcile_manifest(out_dir, num_images, seeds, methods)
    drop_unfinished_tail(out_dir)

    finished = {}
    for row in read_rows(out_dir):
        finished[(row["key"], row["method"])] = row
    for record in records:
        for row in (finished.get((record.key, name)) for name in methods):
            if row is not None and row["caption"] != record.caption:
                raise ValueError(
                    f"{out_dir} has prompt key {record.key} with caption {row['caption']!r}, now {record.caption!r}; "
                    "the prompt list changed: use a new out_dir"
                )
    todo = [(record, name) for record in records for name in methods if (record.key, name) not in finished]
    total = len(records) * len(methods)
    with tqdm(total=total, initial=total - len(todo), disable=not progress, desc="evaluating", unit="run") as bar:
        for record, name in todo:
            bar.set_postfix_str(f"{name} {record.key}", refresh=False)
            started = time.perf_counter()
            images, paths = [], []
            for seed in seeds:
                where = f"prompt {record.key} ({record.caption[:40]!r}), method {name!r}, seed {seed}"
                batch = _generated(generate(record.caption, methods[name], seed, num_images), num_images, where)
                for position, image in enumerate(batch):
                    relative = image_path(name, record.key, seed, position)
                    _save_png(image, out_dir / relative)
                    paths.append(relative)
                images.extend(batch)
            row = {
                "key": record.key,
                "caption": record.caption,
                "index": record.index,
                "kind": record.kind,
                "method": name,
                "seeds": seeds,
                "num_images": num_images,
                "images": paths,
            }
            row.update(scorers.scores(record.key, record.caption, images))
            row["seconds"] = round(time.perf_counter() - started, 3)
            append_row(out_dir, row)
            bar.update(1)
    return read_rows(out_dir)


def rescore(
    out_dir: str | os.PathLike,
    *,
    sscd: SSCDScorer | None = None,
    ground_truth: GroundTruthInput | None = None,
    clip: ClipScorer | None = None,
    progress: bool = True,
) -> list[dict]:
    """Recompute SSCD and/or CLIP for every finished row from its saved PNGs (e.g. once ground truths arrive).

    Scores of a scorer not given are kept. ``results.jsonl`` is replaced only when all rows are done.
    """
    if sscd is None and clip is None:
        raise ValueError("rescore needs sscd= (with ground_truth=) and/or clip=")
    scorers = _Scorers(sscd, ground_truth, clip)
    out_dir = Path(out_dir)
    rows = read_rows(out_dir)
    if not rows:
        raise FileNotFoundError(f"{out_dir} has no finished rows to rescore")
    updated = []
    for row in tqdm(rows, disable=not progress, desc="rescoring", unit="run"):
        images = open_images(out_dir / relative for relative in row["images"])
        updated.append({**row, **scorers.scores(row["key"], row["caption"], images)})
    rewrite_rows(out_dir, updated)
    return updated
