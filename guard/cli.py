"""The ``guard`` command: generate with GUARD, or run the offline memorization demo.

Every user error, whether argparse catches it or it surfaces after parsing (a bad setting, a
device this torch build lacks, a model folder whose UNet blocks differ from the chosen ones), is
one line on stderr and exit status 2; set ``GUARD_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

#: "org/name" with no path separators beyond the one slash: what a Hugging Face hub id looks like.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DEBUG_ENV = "GUARD_DEBUG"


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _int_at_least(minimum: int, kind: str):
    """An argparse type: an integer >= ``minimum`` (``kind`` names it in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "positive")
_non_negative_int = _int_at_least(0, "non-negative")


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _gate_value(text: str):
    """A gate threshold (its range is the detector's, checked by GuardConfig), or "off"."""
    if text.strip().lower() in ("off", "none"):
        return "off"
    return _finite_float(text)


def _gate_weights(text: str) -> tuple[float, float, float]:
    """Three comma-separated numbers: the linear gate's weights of (wen, cosine, entropy)."""
    parts = text.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected 3 comma-separated numbers (wen,cosine,entropy), got {text!r}")
    return tuple(_finite_float(part) for part in parts)


def _blocks(text: str) -> tuple[str, ...]:
    """Comma-separated module-name prefixes, e.g. ``down_blocks.0,mid_block`` (checked by GuardConfig)."""
    blocks = tuple(part.strip() for part in text.split(","))
    if not all(blocks):
        raise argparse.ArgumentTypeError(f"expected comma-separated module prefixes like 'mid_block', got {text!r}")
    return blocks


def resolve_device(text: str):
    """A torch.device that this machine and torch build can use, or a CLIError saying why not."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise CLIError(f"unknown device {text!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise CLIError(
                f"--device {text}: no CUDA device is usable (torch {torch.__version__} is {build}); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {text}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise CLIError(f"--device {text}: guard runs on cpu, cuda or mps, not {device.type}")
    return device


def guard_pipeline_class(class_name: Optional[str], where: str):
    """The GUARD pipeline class for a diffusers pipeline class name (a model_index.json's
    ``_class_name``): SD 1.x/2.x or SDXL text-to-image, or a CLIError naming the class."""
    from .pipeline import SUPPORTED_PIPELINES
    from .pipeline import guard_pipeline_class as pipeline_class

    found = pipeline_class(class_name)
    if found is None:
        named = "names no pipeline class" if not class_name else f"is a {class_name}"
        raise CLIError(f"{where} {named}; guard generate runs {SUPPORTED_PIPELINES}")
    return found


def _class_name(model_index, where: str) -> Optional[str]:
    if not isinstance(model_index, dict):
        raise CLIError(f"{where}: model_index.json is not a JSON object")
    name = model_index.get("_class_name")
    return name if isinstance(name, str) else None


def folder_pipeline_class(path: Path):
    """The GUARD pipeline class for a local diffusers folder, from its model_index.json."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise CLIError(f"{path} is not a diffusers pipeline folder (no model_index.json in it)")
    try:
        model_index = json.loads(index_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CLIError(f"{index_file} is not readable JSON: {error}") from error
    return guard_pipeline_class(_class_name(model_index, str(path)), str(path))


def hub_pipeline_class(model: str):
    """The GUARD pipeline class for a hub id, from its model_index.json (downloaded or cached)."""
    from diffusers import DiffusionPipeline

    try:
        model_index = DiffusionPipeline.load_config(model)
    except (OSError, ValueError) as error:
        raise CLIError(f"could not load {model!r} from the hub or its cache: {error}") from error
    return guard_pipeline_class(_class_name(model_index, repr(model)), repr(model))


def load_guard_pipeline(model: Optional[str], device="cpu", dtype=None):
    """The shipped testbed (``model=None``), a local diffusers folder, or a hub id, as a GUARD pipeline.

    A folder or hub id loads as the GUARD pipeline of the model family its ``model_index.json``
    names: SD 1.x/2.x (``StableDiffusionPipeline``) or SDXL (``StableDiffusionXLPipeline``).
    """
    import torch

    from .pipeline import StableDiffusionGuardPipeline
    from .testbed.loading import is_testbed_folder, load_pipeline

    dtype = dtype or torch.float32
    path = None if model is None else Path(model).expanduser()
    if path is None or (path.is_dir() and is_testbed_folder(path)):
        return load_pipeline(device=device, dtype=dtype, path=path, pipeline_class=StableDiffusionGuardPipeline)
    if path.exists():
        pipeline_class = folder_pipeline_class(path)
        return pipeline_class.from_pretrained(path, dtype=dtype).to(device)
    if not _HUB_ID.match(model):
        raise CLIError(f"no model folder at {path} (and {model!r} is not a hub id like 'org/name')")
    pipeline_class = hub_pipeline_class(model)
    try:
        return pipeline_class.from_pretrained(model, dtype=dtype).to(device)
    except (OSError, ValueError) as error:
        raise CLIError(f"could not load {model!r} from the hub or its cache: {error}") from error


def _is_testbed(model: Optional[str]) -> bool:
    from .testbed.loading import is_testbed_folder

    return model is None or is_testbed_folder(Path(model).expanduser())


def _guard_config(args, is_testbed: bool):
    from .config import GuardConfig
    from .testbed.defaults import testbed_guard_config

    method = getattr(args, "method", "guard")  # `guard demo` has no --method: it always shows GUARD
    if is_testbed:
        # Every method at the testbed's guidance scale: the published 7.5 saturates a 32x32 model.
        shipped = testbed_guard_config(args.model)
        config = shipped if method == "guard" else GuardConfig.preset(method, guidance_scale=shipped.guidance_scale)
    else:
        config = GuardConfig.preset(method)
    overrides = {
        "guidance_scale": args.guidance_scale,
        "repulsion_scale": args.repulsion_scale,
        "spike_threshold": args.spike_threshold,
        "spike_scale": args.spike_scale,
        "spike_tokens": args.spike_tokens,
        "blocks": args.blocks,
    }
    overrides = {key: value for key, value in overrides.items() if value is not None}
    overrides.update(_gate_overrides(args, config))
    try:
        return config.replace(**overrides)
    except (TypeError, ValueError) as error:
        raise CLIError(str(error)) from error


def _gate_overrides(args, config) -> dict:
    """The gate options as GuardConfig fields. "off" switches the whole gate off; another detector
    needs its own threshold (each score has its own scale) and, for "linear", weights."""
    if args.gate_threshold == "off":
        if args.gate_detector is not None or args.gate_weights is not None or args.gate_steps is not None:
            raise CLIError("--gate-threshold off switches the gate off: drop the other --gate-* options")
        return {"gate_threshold": None, "gate_detector": "cosine", "gate_steps": 1, "gate_weights": None}
    fields = {
        "gate_threshold": args.gate_threshold,
        "gate_detector": args.gate_detector,
        "gate_weights": args.gate_weights,
        "gate_steps": args.gate_steps,
    }
    fields = {key: value for key, value in fields.items() if value is not None}
    detector = fields.get("gate_detector", config.gate_detector)
    if fields and "gate_threshold" not in fields:
        if config.gate_threshold is None:
            raise CLIError("this setting has no gate: give --gate-threshold to switch one on")
        if detector != config.gate_detector:
            raise CLIError(f"--gate-detector {detector}: give its --gate-threshold (each score has its own scale)")
    if detector != "linear":
        fields.setdefault("gate_weights", None)
    return fields


def cmd_generate(args) -> int:
    import torch

    from .visualize import image_grid

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CLIError(f"--out must name a .png file, got {out}")
    is_testbed = _is_testbed(args.model)
    config = _guard_config(args, is_testbed=is_testbed)  # bad numbers fail before any loading
    device = resolve_device(args.device)
    pipe = load_guard_pipeline(args.model, device=device)
    pipe.set_progress_bar_config(desc=f"{config.method} ({args.steps} steps)")
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    result = pipe(
        args.prompt,
        num_inference_steps=args.steps,
        num_images_per_prompt=args.images,
        generator=generator,
        guard_config=config,
        output_type="pil",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    cell = 256 if is_testbed else max(result.images[0].size)  # the testbed's 32 px enlarged, others as made
    image_grid([result.images], cell=cell).save(out)
    print(result.report.summary())
    print(f"wrote {out}")
    return 0


def cmd_demo(args) -> int:
    from .testbed.demo import run_demo

    if not _is_testbed(args.model):
        raise CLIError(f"--model must be a testbed folder written by guard.testbed.train, got {args.model}")
    config = _guard_config(args, is_testbed=True)  # the folder's recorded setting with any overrides
    device = resolve_device(args.device)
    run_demo(out=Path(args.out), seeds=args.seeds, steps=args.steps, device=device, model=args.model, config=config)
    return 0


def _add_setting_options(parser: argparse.ArgumentParser) -> None:
    """Overrides of single GuardConfig fields (default: the method's preset or the testbed's setting)."""
    from .config import GATE_DETECTORS, SPIKE_TOKENS

    parser.add_argument("--guidance-scale", type=_finite_float, default=None)
    parser.add_argument("--repulsion-scale", type=_finite_float, default=None)
    parser.add_argument("--spike-threshold", type=_finite_float, default=None)
    parser.add_argument("--spike-scale", type=_finite_float, default=None)
    parser.add_argument(
        "--spike-tokens",
        choices=SPIKE_TOKENS,
        default=None,
        help="per-check (the paper) or first-step: each image's spike tokens fixed after the first step",
    )
    parser.add_argument(
        "--gate-threshold",
        type=_gate_value,
        default=None,
        help="the memorization gate's threshold on its detector's score, or 'off' (GuardConfig.gate_threshold)",
    )
    parser.add_argument(
        "--gate-detector",
        choices=GATE_DETECTORS,
        default=None,
        help="the score the gate decides on (GuardConfig.gate_detector; see guard.detection)",
    )
    parser.add_argument(
        "--gate-weights",
        type=_gate_weights,
        default=None,
        help="the linear gate's weights of (wen, cosine, entropy), e.g. 0,-8.2,-7.7",
    )
    parser.add_argument(
        "--gate-steps",
        type=_positive_int,
        default=None,
        help="UNet calls the gate decides after (GuardConfig.gate_steps)",
    )
    parser.add_argument(
        "--blocks",
        type=_blocks,
        default=None,
        help="comma-separated UNet module prefixes whose cross-attention is attenuated "
        "(default: every down block with cross-attention and the mid block: on SD 1.x/2.x "
        "down_blocks.0,down_blocks.1,down_blocks.2,mid_block, on SDXL down_blocks.1,down_blocks.2,mid_block)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS

    parser = argparse.ArgumentParser(prog="guard", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate images for a prompt and report the attenuated tokens")
    gen.add_argument("prompt")
    gen.add_argument("--method", default="guard", choices=sorted(PRESETS), help="guidance method / preset")
    gen.add_argument(
        "--model",
        default=None,
        help="hub id or local diffusers folder, SD 1.x/2.x or SDXL (default: the shipped testbed)",
    )
    gen.add_argument("--steps", type=_positive_int, default=30)
    gen.add_argument("--seed", type=_non_negative_int, default=0)
    gen.add_argument("--images", type=_positive_int, default=4)
    gen.add_argument("--out", default="guard.png", help="PNG file to write")
    _add_setting_options(gen)
    gen.set_defaults(run=cmd_generate)

    demo = commands.add_parser("demo", help="memorized and plain prompts under CFG and GUARD, side by side")
    demo.add_argument("--out", default="guard_demo.png", help="PNG grid to write")
    demo.add_argument("--seeds", type=_positive_int, default=3)
    demo.add_argument("--steps", type=_positive_int, default=20)
    demo.add_argument("--model", default=None, help="a testbed folder (default: the shipped testbed)")
    _add_setting_options(demo)
    demo.set_defaults(run=cmd_demo)
    return parser


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if "GuardConfig.blocks" in text:
        text += " (choose them with --blocks)"
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ._quiet import quiet_optional_imports

    quiet_optional_imports()
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (CLIError, ValueError, TypeError, OSError, RuntimeError) as error:
        if os.environ.get(DEBUG_ENV, "0") not in ("", "0"):
            raise
        print(f"guard: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("guard: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
