"""``python -m guard.evaluation run``: generate, score and summarise a whole evaluation from the command line.

    python -m guard.evaluation run --model ID_OR_FOLDER --prompts NAME_OR_FILE --methods cfg,guard,attenuation \\
        --images 4 --seeds 0,1 --steps 50 --out RUN_DIR [--batch-prompts 4] [--sscd FILE --ground-truth DIR] \\
        [--clip] [--fid REFERENCE_DIR --fid-model INCEPTION_FILE]
    accelerate launch -m guard.evaluation run ...        # the same, sharded over the launch's processes

Methods are :data:`guard.config.PRESETS` names, read when the command runs. The model is a hub id, a
local diffusers folder, a testbed folder or ``testbed`` (the shipped one), loaded as
:class:`guard.pipeline.StableDiffusionGuardPipeline`. Rerunning the same command resumes; the
table (:func:`guard.evaluation.summary.summarise`, filtered on the ``cfg`` run's SSCD > 0.7 when
SSCD is scored) is printed and written to ``RUN_DIR/summary.md``. ``rescore`` adds SSCD or CLIP to
a finished run from its saved images.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Any

PROG = "python -m guard.evaluation"
DEBUG_ENV = "GUARD_DEBUG"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = ("auto", "float32", "float16", "bfloat16")


class CommandError(Exception):
    """A user error: printed as one line, exit status 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers, got {text!r}") from None
    if any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct non-negative integers, got {text!r}")
    return seeds


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``run`` command's options."""
    what = parser.add_argument_group("what to generate")
    what.add_argument("--model", required=True, help="hub id, local diffusers folder, testbed folder, or 'testbed'")
    what.add_argument(
        "--prompts",
        required=True,
        help="a prompt set (see guard.evaluation.prompts.PROMPT_SETS: sd1-memorized, sd1-verbatim, sd1-template, "
        "sd2-template, ...) or a file: NeMo ';' .csv, Webster .jsonl, or text with one prompt a line",
    )
    what.add_argument("--data-dir", help="folder of the public prompt lists (default: $GUARD_DATA_DIR, then shipped)")
    what.add_argument("--limit", type=_positive_int, help="only the first N prompts of the list")
    what.add_argument(
        "--methods", default="cfg,guard", help="comma-separated guard.config.PRESETS names (default: cfg,guard)"
    )
    what.add_argument("--images", type=_positive_int, default=4, help="images per prompt and seed (default 4)")
    what.add_argument("--seeds", type=_seeds, default=[0], help="comma-separated seeds (default 0)")
    what.add_argument("--steps", type=_positive_int, default=50, help="denoising steps (default 50)")
    what.add_argument("--guidance-scale", type=float, help="override every method's guidance scale s")
    what.add_argument(
        "--scheduler",
        choices=("ddim", "model"),
        default="ddim",
        help="ddim (the paper's sampler, default) or the model's own; a testbed keeps its own",
    )
    what.add_argument(
        "--safety-checker",
        action="store_true",
        help="keep the model's safety checker (off by default: a blacked-out image would score as no copy)",
    )
    how = parser.add_argument_group("where and how")
    how.add_argument("--out", required=True, help="run directory (created; rerun the same command to resume)")
    how.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the launch's device, else cuda if available)")
    how.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: float16 on CUDA, else float32")
    how.add_argument(
        "--batch-prompts", type=_positive_int, default=1, help="prompts per pipeline call (images equal one-by-one)"
    )
    how.add_argument("--no-progress", action="store_true", help="no progress bars")
    scores = parser.add_argument_group("scores")
    scores.add_argument("--sscd", metavar="FILE", help="SSCD TorchScript model (sscd_disc_large.torchscript.pt)")
    scores.add_argument("--ground-truth", metavar="DIR", help="training images by LAION index (folder or mapping)")
    scores.add_argument("--clip", action="store_true", help="CLIP score against the prompt (needs open-clip-torch)")
    scores.add_argument("--clip-model", default=None, help="open_clip model name (default: the paper's ViT-g-14)")
    scores.add_argument("--clip-pretrained", default=None, help="open_clip tag or local checkpoint file")
    scores.add_argument("--fid", metavar="REFERENCE_DIR", help="folder of reference images for FID")
    scores.add_argument("--fid-model", metavar="FILE", help="TorchScript Inception for FID (inception-2015-12-05.pt)")
    scores.add_argument(
        "--baseline", help="filter the table on this method's SSCD > --threshold (default: cfg when scored; 'none')"
    )
    scores.add_argument("--threshold", type=float, default=0.7, help="SSCD threshold of the filter (default 0.7)")


def add_rescore_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``rescore`` command's options."""
    parser.add_argument("out_dir", help="a run directory")
    parser.add_argument("--sscd", metavar="FILE", help="SSCD TorchScript model")
    parser.add_argument("--ground-truth", metavar="DIR", help="training images by LAION index (folder or mapping)")
    parser.add_argument("--clip", action="store_true", help="CLIP score against the prompt (needs open-clip-torch)")
    parser.add_argument("--clip-model", default=None)
    parser.add_argument("--clip-pretrained", default=None)
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument(
        "--baseline", default="cfg", help="filter the table on this method's SSCD > --threshold (default cfg; 'none')"
    )
    parser.add_argument("--threshold", type=float, default=0.7, help="SSCD threshold of the filter (default 0.7)")
    parser.add_argument("--no-progress", action="store_true")


# ------------------------------------------------------------------------------------------ pieces


def resolve_methods(text: str, guidance_scale: float | None) -> dict[str, Any]:
    """``{preset name: GuardConfig}`` for a comma-separated list of :data:`guard.config.PRESETS` names."""
    from ..config import PRESETS, GuardConfig

    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise CommandError("--methods is empty; give preset names such as cfg,guard")
    unknown = [name for name in names if name not in PRESETS]
    if unknown:
        raise CommandError(f"--methods: unknown preset(s) {', '.join(unknown)}; available: {', '.join(PRESETS)}")
    if len(set(names)) != len(names):
        raise CommandError(f"--methods lists a preset twice: {text}")
    overrides = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    return {name: GuardConfig.preset(name, **overrides) for name in names}


def resolve_device(text: str | None, launch_device: Any = None):
    """The torch device: ``text``, else the launch's, else CUDA when present; refused when absent."""
    import torch

    if text is None:
        if launch_device is not None:
            return torch.device(launch_device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise CommandError(f"--device {text}: not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {text}: CUDA is not available here; use --device cpu")
    if launch_device is not None and torch.device(launch_device).type != device.type:
        raise CommandError(f"--device {text}: this launch gives each process a {torch.device(launch_device)} device")
    return torch.device(launch_device) if launch_device is not None else device


def resolve_dtype(text: str, device):
    import torch

    if text == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, text)


def load_model(model: str, device, dtype, *, scheduler: str = "ddim", safety_checker: bool = False):
    """A GUARD pipeline from the shipped testbed, a testbed folder, a diffusers folder or a hub id
    (SD 1.x/2.x or SDXL, as its ``model_index.json`` names it)."""
    from ..pipeline import SUPPORTED_PIPELINES, StableDiffusionGuardPipeline, guard_pipeline_class
    from ..testbed.loading import is_testbed_folder, load_pipeline

    path = Path(model).expanduser()
    if model == "testbed" or (path.is_dir() and is_testbed_folder(path)):
        folder = None if model == "testbed" else path
        pipe = load_pipeline(device=device, dtype=dtype, path=folder, pipeline_class=StableDiffusionGuardPipeline)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise CommandError(f"--model {model}: not a diffusers pipeline folder (no model_index.json in it)")
        source, local = str(path), True
    elif _HUB_ID.match(model):
        source, local = model, False
    else:
        raise CommandError(f"--model {model}: no such folder, and not a hub id like 'org/name'")
    try:
        from diffusers import DiffusionPipeline

        class_name = DiffusionPipeline.load_config(source, local_files_only=local).get("_class_name")
        pipeline_class = guard_pipeline_class(class_name)
        if pipeline_class is None:
            raise CommandError(f"--model {model}: a {class_name}; the evaluation runs {SUPPORTED_PIPELINES}")
        safety = {}  # SDXL has no safety checker; SD's is off unless asked for
        if pipeline_class is StableDiffusionGuardPipeline and not safety_checker:
            safety = {"safety_checker": None, "requires_safety_checker": False}
        pipe = pipeline_class.from_pretrained(source, dtype=dtype, local_files_only=local, **safety)
    except (OSError, ValueError) as error:
        raise CommandError(f"--model {model}: could not load it ({str(error).splitlines()[0]})") from None
    if scheduler == "ddim":
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@contextlib.contextmanager
def _loading_bars(shown: bool):
    """diffusers' and transformers' loading bars off while loading, when progress bars are off."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    before = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    if not shown:
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if before[0]:
            diffusers_logging.enable_progress_bar()
        if before[1]:
            transformers_logging.enable_progress_bar()


def _ground_truth(records, where: str, note):
    from .ground_truth import find_ground_truth

    path = Path(where).expanduser()
    if path.is_file():
        truth = find_ground_truth(records, mapping_file=path, allow_missing=True)
    else:
        truth = find_ground_truth(records, path, allow_missing=True)
    if truth.missing:
        note(f"{len(truth.missing)} of {len(records)} prompt(s) have no ground-truth image: their SSCD stays empty")
    return truth


def _scorers(args, records, device, note):
    """The SSCD (model + ground truths) and CLIP scorers the options ask for, or None."""
    from .clip_score import PAPER_CLIP_MODEL, PAPER_CLIP_PRETRAINED, ClipScorer
    from .sscd import SSCDScorer

    if (args.sscd is None) != (args.ground_truth is None):
        raise CommandError("--sscd and --ground-truth go together: SSCD compares images with their training images")
    sscd = truth = clip = None
    if args.sscd is not None:
        truth = _ground_truth(records, args.ground_truth, note)
        sscd = SSCDScorer.from_torchscript(args.sscd, device=device)
    if args.clip:
        try:
            clip = ClipScorer.from_open_clip(
                args.clip_model or PAPER_CLIP_MODEL, args.clip_pretrained or PAPER_CLIP_PRETRAINED, device=device
            )
        except ImportError as error:
            raise CommandError(f"--clip: {error}") from None
    return sscd, truth, clip


def _fid_inputs(args, device, load: bool = True):
    """The FID network and reference images, checked before any generation (FID is computed after it).

    ``load=False`` (processes other than the first, which alone computes FID) checks the files only.
    """
    if args.fid is None and args.fid_model is None:
        return None
    if args.fid is None or args.fid_model is None:
        raise CommandError("--fid REFERENCE_DIR and --fid-model FILE go together (Inception is never downloaded)")
    from .fid import load_feature_network, reference_images

    references = reference_images(args.fid)
    if not load:
        if not Path(args.fid_model).expanduser().is_file():
            raise CommandError(f"FID feature network {args.fid_model} not found")
        return None, references
    return load_feature_network(args.fid_model, device=device), references


def _baseline(args, methods) -> str | None:
    if args.baseline is None:
        return "cfg" if "cfg" in methods else None
    if args.baseline == "none":
        return None
    if args.baseline not in methods:
        raise CommandError(f"--baseline {args.baseline}: not among --methods ({', '.join(methods)})")
    return args.baseline


# ------------------------------------------------------------------------------------------ commands


def run(args: argparse.Namespace) -> int:
    """Generate and score every (prompt, method), then (first process only) FID and the table."""
    from .generation import SEEDING, PipelineGenerator
    from .prompts import load_prompts
    from .runner import evaluate_prompts
    from .sharding import current_shard
    from .summary import summarise

    methods = resolve_methods(args.methods, args.guidance_scale)
    baseline = _baseline(args, methods)
    shard = current_shard()

    def note(text: str) -> None:
        if shard.is_main:
            print(f"{PROG} run: {text}", file=sys.stderr, flush=True)

    records = load_prompts(args.prompts, args.data_dir)
    if args.limit is not None:
        records = records[: args.limit]
    if not records:
        raise CommandError(f"--prompts {args.prompts}: the list is empty")
    device = resolve_device(args.device, shard.device)
    dtype = resolve_dtype(args.dtype, device)
    sscd, truth, clip = _scorers(args, records, device, note)
    fid = _fid_inputs(args, device, load=shard.is_main)
    missing = [
        text
        for text, given in (
            ("SSCD (add --sscd FILE --ground-truth DIR, or rescore later)", sscd is not None),
            ("CLIP (add --clip)", clip is not None),
            ("FID (add --fid REFERENCE_DIR --fid-model FILE)", fid is not None),
        )
        if not given
    ]
    if missing:
        note("not scored in this run: " + "; ".join(missing))
    with _loading_bars(not args.no_progress):
        pipe = load_model(args.model, device, dtype, scheduler=args.scheduler, safety_checker=args.safety_checker)
    is_local = Path(args.model).expanduser().exists()
    settings = {
        "model": str(Path(args.model).expanduser().resolve()) if is_local else args.model,
        "steps": args.steps,
        "dtype": str(dtype).replace("torch.", ""),
        "scheduler": type(pipe.scheduler).__name__,
        "safety_checker": bool(args.safety_checker),
        "seeding": SEEDING,
    }
    images = len(records) * len(methods) * len(args.seeds) * args.images
    note(
        f"{len(records)} prompt(s) x {len(methods)} method(s) x {len(args.seeds)} seed(s) x {args.images} image(s) "
        f"= {images} images into {args.out}" + (f" over {shard.count} processes" if shard.count > 1 else "")
    )
    evaluate_prompts(
        PipelineGenerator(pipe, num_inference_steps=args.steps),
        records,
        methods,
        out_dir=args.out,
        num_images=args.images,
        seeds=args.seeds,
        sscd=sscd,
        ground_truth=truth,
        clip=clip,
        batch_prompts=args.batch_prompts,
        settings=settings,
        shard=shard,
        progress=not args.no_progress,
    )
    shard.barrier()  # every process's rows are on disk before the first process reads them all
    if not shard.is_main:
        return 0
    if fid is not None:
        from .fid import FIDScorer, fid_by_method

        network, references = fid
        scorer = FIDScorer(network, references, device=device, progress=not args.no_progress)
        description = {"reference": str(Path(args.fid).expanduser()), "feature_network": Path(args.fid_model).name}
        fid_by_method(args.out, scorer, methods=list(methods), description=description)
    if baseline is not None and not any(
        row["method"] == baseline and row.get("sscd") is not None for row in _run_rows(args.out)
    ):
        note(f"the SSCD > {args.threshold} filter on `{baseline}` needs SSCD scores: the table covers all prompts")
        baseline = None
    order = _ordered_methods(args.out, methods)
    sys.stdout.write(summarise(args.out, methods=order, baseline=baseline, threshold=args.threshold))
    return 0


def _run_rows(out_dir) -> list[dict]:
    from .results import read_rows

    return read_rows(out_dir)


def _ordered_methods(out_dir, methods) -> list[str]:
    """This command's methods first, then any others earlier runs left in the directory."""
    present = list(dict.fromkeys(row["method"] for row in _run_rows(out_dir)))
    return [name for name in methods if name in present] + [name for name in present if name not in methods]


def rescore_command(args: argparse.Namespace) -> int:
    """Add or recompute SSCD / CLIP for every row of a run from its saved images, then print the table."""
    from .runner import record_of_row, rescore
    from .summary import summarise

    out_dir = Path(args.out_dir)
    rows = _run_rows(out_dir) if out_dir.is_dir() else []
    if not rows:
        raise CommandError(f"{out_dir} has no finished rows to rescore")
    records = list({row["key"]: record_of_row(row) for row in rows}.values())
    device = resolve_device(args.device)
    sscd, truth, clip = _scorers(args, records, device, lambda text: print(f"{PROG} rescore: {text}", file=sys.stderr))
    if sscd is None and clip is None:
        raise CommandError("rescore needs --sscd FILE --ground-truth DIR and/or --clip")
    rows = rescore(out_dir, sscd=sscd, ground_truth=truth, clip=clip, progress=not args.no_progress)
    scored = any(row["method"] == args.baseline and row.get("sscd") is not None for row in rows)
    baseline = args.baseline if args.baseline != "none" and scored else None
    sys.stdout.write(summarise(out_dir, baseline=baseline, threshold=args.threshold))
    return 0


def report_error(error: BaseException, process: int | None = None) -> int:
    """Print a user error as one line on stderr; the exit status 2."""
    where = f"[process {process}] " if process else ""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"{PROG}: error: {where}{message}", file=sys.stderr)
    return 2


def debugging() -> bool:
    return bool(os.environ.get(DEBUG_ENV))
