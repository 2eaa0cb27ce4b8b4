"""A tiny text-to-image model that really memorizes, shipped with guard as its offline demo model.

32x32 pixel-space UNet + a small CLIP text encoder trained jointly from scratch on procedural
shape captions ("a red circle on a blue background") and five memorized items (a shape caption
plus a made-up artist name, always paired with one photo-textured image). See README.md here for
how it was trained.

Public entry points (imported lazily so ``import guard.testbed`` stays cheap):
    load_pipeline(device="cpu", dtype=torch.float32, path=None) -> StableDiffusionPipeline
    memorized_items(path=None) -> list[MemorizedItem]
    plain_prompts(count=None, seed=0) -> list[str]
    default_guard_config(path=None) -> guard.config.GuardConfig   (the recorded setting)
    testbed_guard_config(path=None) -> guard.config.GuardConfig   (that, else the published one)
    build_tokenizer(words=None) -> transformers.CLIPTokenizer

Modules: ``metrics`` (pixel SSIM and alignment), ``efficacy`` (sampling, scoring, selection),
``evaluate`` (the efficacy study script), ``demo`` (``guard demo``), ``train`` (the training
script), and the model's own pieces (``model``, ``pixel_vae``, ``tokenizer``, ``captions``,
``data``, ``assets``, ``loading``, ``defaults``).
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "load_pipeline": "loading",
    "assemble_pipeline": "loading",
    "is_testbed_folder": "loading",
    "memorized_items": "assets",
    "plain_prompts": "assets",
    "MemorizedItem": "assets",
    "WEIGHTS_DIR": "assets",
    "default_guard_config": "defaults",
    "testbed_guard_config": "defaults",
    "build_tokenizer": "tokenizer",
    "PixelIdentityVAE": "pixel_vae",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
