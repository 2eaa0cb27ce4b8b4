"""A tiny text-to-image model that really memorizes, shipped with guard as its offline demo model.

32x32 pixel-space UNet + a small CLIP text encoder trained jointly from scratch on procedural
shape captions ("a red circle on a blue background") and five memorized items (a shape caption
plus a made-up artist name, always paired with one photo-textured image). See README.md here for
how it was trained.

Public entry points (imported lazily so ``import guard.testbed`` stays cheap):
    load_pipeline(device="cpu", dtype=torch.float32, path=None) -> StableDiffusionPipeline
    memorized_items(path=None) -> list[MemorizedItem]
    plain_prompts(count=None, seed=0) -> list[str]
    default_guard_config(path=None) -> guard.config.GuardConfig
    build_tokenizer(words=None) -> transformers.CLIPTokenizer
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "load_pipeline": "loading",
    "assemble_pipeline": "loading",
    "memorized_items": "assets",
    "plain_prompts": "assets",
    "MemorizedItem": "assets",
    "WEIGHTS_DIR": "assets",
    "default_guard_config": "defaults",
    "build_tokenizer": "tokenizer",
    "PixelIdentityVAE": "pixel_vae",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
