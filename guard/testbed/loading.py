"""Assemble, save and load the testbed as a diffusers StableDiffusionPipeline."""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging

from .assets import WEIGHTS_DIR
from .model import PREDICTION_TYPE, sampling_scheduler
from .pixel_vae import PixelIdentityVAE

SAMPLING_FILE = "testbed_sampling.json"


def is_testbed_folder(path: str | Path) -> bool:
    """A folder written by ``guard.testbed.train`` (pixel-space VAE, its own sampling settings)."""
    return (Path(path) / "memorized.json").is_file()


def assemble_pipeline(
    unet, text_encoder, tokenizer, vae=None, *, thresholding: bool = False, prediction_type: str = PREDICTION_TYPE
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline around testbed components, with the pixel-space-safe DDIM scheduler."""
    with _quiet_clip_sample_rewrite():
        pipe = StableDiffusionPipeline(
            vae=vae if vae is not None else PixelIdentityVAE(),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=sampling_scheduler(thresholding, prediction_type),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return _restore_scheduler(pipe, thresholding)


@contextlib.contextmanager
def _quiet_clip_sample_rewrite():
    """Hide the FutureWarning StableDiffusionPipeline emits while forcing clip_sample=False: the
    loader replaces that scheduler straight after, so the warning describes nothing a user sees."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")
        yield


def _restore_scheduler(pipe: StableDiffusionPipeline, thresholding: bool) -> StableDiffusionPipeline:
    # StableDiffusionPipeline.__init__ rewrites clip_sample to False; put the safe scheduler back after it
    # (keeping the prediction type the model was trained with, which the saved scheduler records).
    pipe.scheduler = sampling_scheduler(thresholding, pipe.scheduler.config.prediction_type)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def _no_loading_bars():
    """The testbed loads in milliseconds: diffusers' and transformers' loading bars would be noise."""
    from transformers.utils import logging as transformers_logging

    bars = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars[0]:
            diffusers_logging.enable_progress_bar()
        if bars[1]:
            transformers_logging.enable_progress_bar()


def load_pipeline(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    path: str | Path | None = None,
    *,
    thresholding: bool | None = None,
    pipeline_class: type[StableDiffusionPipeline] = StableDiffusionPipeline,
) -> StableDiffusionPipeline:
    """The trained testbed (shipped weights, or a folder written by ``guard.testbed.train``), ready to sample.

    ``thresholding=None`` uses the folder's recorded sampling choice (clipping unless it says otherwise).
    ``pipeline_class``: a StableDiffusionPipeline subclass to load as (e.g. GUARD's pipeline).
    Load as the subclass rather than converting with ``from_pipe``: diffusers' ``from_pipe``
    refuses a VAE whose type is not ``AutoencoderKL`` unless it is passed again (``vae=pipe.vae``).
    """
    if not (isinstance(pipeline_class, type) and issubclass(pipeline_class, StableDiffusionPipeline)):
        raise TypeError(f"pipeline_class must be a StableDiffusionPipeline subclass, got {pipeline_class!r}")
    folder = Path(path) if path is not None else WEIGHTS_DIR
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not a testbed pipeline folder (no model_index.json)")
    previous_verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # silences "Expected types for vae: AutoencoderKL" on every load
    try:
        with _quiet_clip_sample_rewrite(), _no_loading_bars():
            pipe = pipeline_class.from_pretrained(
                folder,
                dtype=dtype,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                local_files_only=True,
            )
    finally:
        diffusers_logging.set_verbosity(previous_verbosity)
    if thresholding is None:
        settings_file = folder / SAMPLING_FILE
        settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        thresholding = bool(settings.get("thresholding", False))
    pipe = _restore_scheduler(pipe, thresholding)
    return pipe.to(device)
