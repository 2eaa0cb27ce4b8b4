"""Generate and score images for every (prompt, method), resumable after any interruption, on any number of processes.

The image generator is injected: a :class:`~guard.evaluation.generation.PipelineGenerator` (one
pipeline call for several prompts, ``batch_prompts=``), or any ``generate(prompt, method, seed,
num_images) -> list of images`` (PIL images or (H, W, 3) arrays in [0, 1]). With this package's
Stable Diffusion pipeline (``python -m guard.evaluation run`` does all of this from the command line)::

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
        num_images=4, seeds=[0], out_dir="runs/sd14-verbatim", batch_prompts=4,
        sscd=SSCDScorer.from_torchscript("sscd_disc_large.torchscript.pt", device="cuda"),
        ground_truth=find_ground_truth(prompts, "path/to/laion_images"),
        clip=ClipScorer.from_open_clip(device="cuda"),  # optional, needs open-clip-torch
    )
    print(summarise("runs/sd14-verbatim", baseline="none"))  # paper: only prompts with SSCD > 0.7

The pipeline also takes preset names, so ``methods=["cfg", "attenuation", "guard"]`` works as well.

Each finished (prompt, method) is one row (see :mod:`guard.evaluation.results`); rerunning the same
call generates only what is missing. In a multi-process launch (``shard=``, see
:mod:`guard.evaluation.sharding`) every process reads all rows files, the processes wait for each
other, and each then takes every ``count``-th batch of the missing work and appends to its own
file: the work missing at the start is split exactly once, whatever the number of processes.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .clip_score import ClipScorer
from .generation import Generation, pipeline_generate_fn
from .ground_truth import open_images
from .prompts import PromptRecord, records_from_captions
from .results import (
    PARTS,
    append_row,
    check_method_name,
    drop_unfinished_tail,
    image_path,
    read_file_rows,
    read_rows,
    reconcile_manifest,
    rewrite_rows,
    row_files,
    rows_file,
)
from .scorers import ROW_KEYS, GroundTruthInput, Scorer, as_pil, check_scorers, json_ready, metric_scorers
from .sharding import Shard, assign
from .sscd import SSCDScorer

__all__ = ["evaluate_prompts", "pipeline_generate_fn", "plan_batches", "record_of_row", "rescore"]

GenerateFn = Callable[[str, Any, int, int], Sequence[Any]]

#: Test hook for crash recovery: "K:N" makes process K SIGKILL itself instead of appending its (N+1)-th row.
KILL_ENV = "GUARD_EVALUATION_KILL_BEFORE_ROW"


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


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _is_image(item: Any) -> bool:
    if isinstance(item, Image.Image):
        return True
    return isinstance(item, np.ndarray) and item.ndim == 3 and item.shape[-1] == 3


def _generated(images: Any, num_images: int, where: str) -> list:
    images = list(images) if isinstance(images, (list, tuple, np.ndarray)) else images
    if not isinstance(images, list) or len(images) != num_images or not all(_is_image(i) for i in images):
        got = f"{len(images)} item(s)" if isinstance(images, list) else type(images).__name__
        raise ValueError(
            f"generate returned {got} for {where}; expected a list of {num_images} images "
            "(PIL images or (H, W, 3) arrays)"
        )
    return images


def _save_png(image: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    as_pil(image).save(temporary, format="PNG")
    os.replace(temporary, path)


def _batched(generate: Any) -> Callable[[list[PromptRecord], str, Any, list[int], int], list[Generation]]:
    """``generate`` as a batch function: its own ``batch`` method, or one call per prompt and seed."""
    if hasattr(generate, "batch"):
        return lambda batch, name, setting, seeds, num_images: generate.batch(
            [record.caption for record in batch], setting, seeds, num_images
        )

    def one_by_one(batch: list[PromptRecord], name: str, setting: Any, seeds: list[int], num_images: int):
        generations = []
        for record in batch:
            images = []
            for seed in seeds:
                where = f"prompt {record.key} ({record.caption[:40]!r}), method {name!r}, seed {seed}"
                images.extend(_generated(generate(record.caption, setting, seed, num_images), num_images, where))
            generations.append(Generation(images))
        return generations

    return one_by_one


def plan_batches(
    records: Sequence[PromptRecord], methods: Sequence[str], finished: Iterable[tuple[str, str]], batch_prompts: int
) -> list[tuple[str, list[PromptRecord]]]:
    """The missing work as (method, up to ``batch_prompts`` records) batches, in one fixed order.

    Records go in blocks of ``batch_prompts``; within a block each method in turn, so a run
    interrupted anywhere has every method of the prompts before it (one prompt per block by default).
    """
    done = set(finished)
    batches = []
    for start in range(0, len(records), batch_prompts):
        block = records[start : start + batch_prompts]
        for name in methods:
            missing = [record for record in block if (record.key, name) not in done]
            if missing:
                batches.append((name, missing))
    return batches


def _kill_hook(shard: Shard) -> Callable[[int], None]:
    """The :data:`KILL_ENV` test hook for this process (a no-op unless it names this process)."""
    spec = os.environ.get(KILL_ENV, "")
    if not spec:
        return lambda appended: None
    process, _, rows = spec.partition(":")
    if int(process) != shard.index:
        return lambda appended: None
    limit = int(rows)

    def hook(appended: int) -> None:
        if appended >= limit:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _check_captions(out_dir: Path, records: Sequence[PromptRecord], finished: Mapping[tuple[str, str], dict]) -> None:
    captions = {}
    for (key, _), row in finished.items():
        captions.setdefault(key, row["caption"])
    for record in records:
        if record.key in captions and captions[record.key] != record.caption:
            raise ValueError(
                f"{out_dir} has prompt key {record.key} with caption {captions[record.key]!r}, now "
                f"{record.caption!r}; the prompt list changed: use a new out_dir"
            )


def evaluate_prompts(
    generate: Any,
    prompts: Iterable[PromptRecord | str],
    methods: Mapping[str, Any] | Sequence[str],
    *,
    out_dir: str | os.PathLike,
    num_images: int = 4,
    seeds: int | Sequence[int] = 0,
    sscd: SSCDScorer | None = None,
    ground_truth: GroundTruthInput | None = None,
    clip: ClipScorer | None = None,
    scorers: Sequence[Scorer] = (),
    batch_prompts: int = 1,
    settings: Mapping[str, Any] | None = None,
    shard: Shard | None = None,
    progress: bool = True,
) -> list[dict]:
    """Generate, save and score ``num_images`` images per seed for every (prompt, method).

    generate: a :class:`~guard.evaluation.generation.PipelineGenerator` (or anything with its
        ``batch`` method), or ``generate(caption, method_setting, seed, num_images) -> images``.
    prompts: PromptRecords (keyed by LAION index) or plain strings (keyed by position).
    methods: ``{name: setting}`` (the setting is passed to ``generate``, e.g. a GuardConfig) or a list
        of names (the name is passed). Names become folder names.
    seeds: one seed or several; every method uses the same seeds, so methods are compared on the
        same initial noise.
    sscd + ground_truth: score SSCD for prompts that have ground truths (else the row's sscd is null).
    clip: score CLIP against the caption. scorers: further :class:`~guard.evaluation.scorers.Scorer`\\ s.
    batch_prompts: prompts per ``generate.batch`` call (one method at a time); a plain function is
        called once per prompt and seed whatever this is.
    settings: the generation settings every image depends on (model, steps, ...), kept in run.json
        and required unchanged on resume.
    shard: this process's place in a multi-process launch (default: the only process).

    Returns all rows of the run directory, earlier runs' and other processes' included.
    """
    num_images = _positive("num_images", num_images)
    batch_prompts = _positive("batch_prompts", batch_prompts)
    records = _as_records(prompts)
    methods = _as_methods(methods)
    seeds = _as_seeds(seeds)
    scorers = check_scorers(metric_scorers(sscd, ground_truth, clip) + list(scorers))
    shard = shard if shard is not None else Shard()
    out_dir = Path(out_dir)

    # The first process writes run.json; the others check against it. Then every process reads the
    # finished rows, and waits until all have, so that each plans from the same snapshot.
    if shard.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        reconcile_manifest(out_dir, num_images, seeds, methods, settings)
    shard.barrier()
    if not shard.is_main:
        reconcile_manifest(out_dir, num_images, seeds, methods, settings, write=False)
    finished = {(row["key"], row["method"]): row for row in read_rows(out_dir)}
    _check_captions(out_dir, records, finished)
    mine = assign(plan_batches(records, list(methods), finished, batch_prompts), shard)
    shard.barrier()

    own = rows_file(out_dir, shard.index, shard.count)
    drop_unfinished_tail(own)
    if shard.is_main:  # files of processes this launch does not have: nobody appends to them now
        for path in row_files(out_dir):
            if path.parent.name == PARTS and path != own and int(path.stem.split("-")[1]) >= shard.count:
                drop_unfinished_tail(path)
    generate_batch = _batched(generate)
    kill_hook = _kill_hook(shard)
    appended = 0
    description = "evaluating" if shard.count == 1 else f"evaluating [process {shard.index + 1}/{shard.count}]"
    total = sum(len(batch) for _, batch in mine)
    with tqdm(
        total=total,
        disable=not progress,
        desc=description,
        unit="prompt",
        position=shard.index if shard.count > 1 else None,
    ) as bar:
        for name, batch in mine:
            bar.set_postfix_str(f"{name} {batch[0].key}" + (f"+{len(batch) - 1}" if len(batch) > 1 else ""))
            started = time.perf_counter()
            generations = generate_batch(batch, name, methods[name], seeds, num_images)
            if not isinstance(generations, list) or len(generations) != len(batch):
                raise ValueError(f"generate.batch returned {type(generations).__name__} for {len(batch)} prompts")
            share = (time.perf_counter() - started) / len(batch)
            for record, generation in zip(batch, generations):
                where = f"prompt {record.key} ({record.caption[:40]!r}), method {name!r}"
                images = _generated(generation.images, len(seeds) * num_images, where)
                scoring = time.perf_counter()
                paths = [image_path(name, record.key, seed, j) for seed in seeds for j in range(num_images)]
                for image, relative in zip(images, paths):
                    _save_png(image, out_dir / relative)
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
                info = {field: value for field, value in generation.info.items() if field not in ROW_KEYS}
                row.update(json_ready(info))
                for scorer in scorers:
                    row.update(json_ready(scorer(record, images)))
                row["seconds"] = round(share + time.perf_counter() - scoring, 3)
                kill_hook(appended)
                append_row(own, row)
                appended += 1
                bar.update(1)
    return read_rows(out_dir)


def record_of_row(row: Mapping[str, Any]) -> PromptRecord:
    """A prompt record rebuilt from a row (the caption, index, kind and key the scorers need)."""
    key = str(row["key"])
    position = int(key[3:]) if key.startswith("row") and key[3:].isdigit() else 0
    return PromptRecord(caption=row["caption"], index=row.get("index"), kind=row.get("kind"), row=position)


def rescore(
    out_dir: str | os.PathLike,
    *,
    sscd: SSCDScorer | None = None,
    ground_truth: GroundTruthInput | None = None,
    clip: ClipScorer | None = None,
    scorers: Sequence[Scorer] = (),
    progress: bool = True,
) -> list[dict]:
    """Recompute scores for every finished row from its saved PNGs (e.g. once ground truths arrive).

    Scores of a scorer not given are kept. Each rows file is replaced (atomically) only when all of its
    rows are done; run it when no launch is writing to the run.
    """
    scorers = check_scorers(metric_scorers(sscd, ground_truth, clip) + list(scorers))
    if not scorers:
        raise ValueError("rescore needs sscd= (with ground_truth=), clip= and/or scorers=")
    out_dir = Path(out_dir)
    files = row_files(out_dir)
    if not any(read_file_rows(path) for path in files):
        raise FileNotFoundError(f"{out_dir} has no finished rows to rescore")
    total = sum(len(read_file_rows(path)) for path in files)
    with tqdm(total=total, disable=not progress, desc="rescoring", unit="prompt") as bar:
        for path in files:
            updated = []
            for row in read_file_rows(path):
                images = open_images(out_dir / relative for relative in row["images"])
                record = record_of_row(row)
                for scorer in scorers:
                    row = {**row, **json_ready(scorer(record, images))}
                updated.append(row)
                bar.update(1)
            rewrite_rows(path, updated)
    return read_rows(out_dir)
