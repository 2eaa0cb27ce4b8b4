"""SSCD copy-detection similarity, the paper's memorization metric (lower is better).

The model is Meta's ``sscd_disc_large`` TorchScript file (``sscd_disc_large.torchscript.pt`` from
the facebookresearch/sscd-copy-detection release), supplied by the user as a path; nothing is
downloaded. Preprocessing follows the paper: resize the shorter side to 256 (bilinear), centre-crop
224, scale to [0, 1], normalise with mean 0.5 and std 0.5 per channel. It is written with PIL and
torch so that torchvision is not needed; for PIL inputs it matches torchvision's
``Resize(256), CenterCrop(224), ToTensor(), Normalize(0.5, 0.5)`` (same size rounding, same crop
offsets, PIL's own bilinear filter).

Per prompt: embeddings are L2-normalised, the cosine matrix ground truth x generated is formed, its
maximum over ground truths is taken for each generated image, and those maxima are averaged over the
generations. Over prompts, :func:`guard.evaluation.stats.mean_interval` gives the mean and its 95%
interval.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .embeddings import PromptScore, l2_normalize

ImageInput = Union[Image.Image, str, os.PathLike]

SSCD_RESIZE = 256
SSCD_CROP = 224
SSCD_MEAN = (0.5, 0.5, 0.5)
SSCD_STD = (0.5, 0.5, 0.5)


def _as_rgb(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    raise TypeError(f"images must be PIL images or file paths, got {type(image).__name__}")


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Bilinear resize so the shorter side is ``size``; the longer is ``int(size * long / short)``."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    if new_size == image.size:
        return image
    return image.resize(new_size, Image.BILINEAR)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The central ``size`` x ``size`` square (offsets rounded as torchvision's CenterCrop does)."""
    width, height = image.size
    if width < size or height < size:
        raise ValueError(f"image of size {image.size} is smaller than the {size}x{size} crop")
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def preprocess(
    images: Sequence[ImageInput],
    *,
    resize: int = SSCD_RESIZE,
    crop: int = SSCD_CROP,
    mean: Sequence[float] = SSCD_MEAN,
    std: Sequence[float] = SSCD_STD,
) -> torch.Tensor:
    """SSCD input batch (N, 3, crop, crop) float32 from PIL images or image paths."""
    if crop > resize:
        raise ValueError(f"crop ({crop}) must not exceed resize ({resize})")
    if len(images) == 0:
        raise ValueError("images is empty")
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    batch = []
    for image in images:
        cropped = center_crop(resize_shorter_side(_as_rgb(image), resize), crop)
        pixels = torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 255.0).permute(2, 0, 1)
        batch.append((pixels - mean_t) / std_t)
    return torch.stack(batch)


def prompt_sscd(ground_truth: torch.Tensor, generated: torch.Tensor) -> PromptScore:
    """Paper's per-prompt SSCD from embeddings (R, D) and (G, D) (normalised here).

    cosine matrix (R, G) -> max over the R ground truths -> mean over the G generations.
    """
    ground_truth = l2_normalize(ground_truth, "ground-truth embeddings")
    generated = l2_normalize(generated, "generated-image embeddings")
    if ground_truth.shape[1] != generated.shape[1]:
        raise ValueError(
            f"embedding sizes differ: ground truth {ground_truth.shape[1]}, generated {generated.shape[1]}"
        )
    if ground_truth.shape[0] == 0 or generated.shape[0] == 0:
        raise ValueError("need at least one ground-truth and one generated embedding")
    best = (ground_truth @ generated.T).max(dim=0).values
    return PromptScore(score=float(best.mean()), per_image=tuple(float(value) for value in best))


class SSCDScorer:
    """Embeds images with an SSCD model and scores prompts; the model is any (N,3,H,W)->(N,D) module.

    Use :meth:`from_torchscript` for the real ``sscd_disc_large`` file; tests pass small modules.
    """

    def __init__(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        resize: int = SSCD_RESIZE,
        crop: int = SSCD_CROP,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model = model
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.resize = resize
        self.crop = crop

    @classmethod
    def from_torchscript(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu", **kwargs) -> "SSCDScorer":
        """Load a TorchScript SSCD model (e.g. ``sscd_disc_large.torchscript.pt``) from ``path``."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"SSCD model file {path} not found; get sscd_disc_large.torchscript.pt from the "
                "facebookresearch/sscd-copy-detection release and pass its path (it is never downloaded)"
            )
        model = torch.jit.load(str(path), map_location=torch.device(device))
        model.eval()
        return cls(model, device=device, **kwargs)

    @torch.no_grad()
    def embed(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """L2-normalised float32 embeddings (N, D) on the CPU."""
        outputs = []
        for start in range(0, len(images), self.batch_size):
            batch = preprocess(images[start : start + self.batch_size], resize=self.resize, crop=self.crop)
            output = self.model(batch.to(self.device))
            if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[0] != batch.shape[0]:
                shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise ValueError(f"SSCD model must return a ({batch.shape[0]}, D) tensor, got {shape}")
            outputs.append(output.float().cpu())
        if not outputs:
            raise ValueError("images is empty")
        return l2_normalize(torch.cat(outputs), "SSCD embeddings")

    def score(self, ground_truth: Sequence[ImageInput], generated: Sequence[ImageInput]) -> PromptScore:
        """Per-prompt SSCD of ``generated`` against the prompt's ``ground_truth`` images."""
        return prompt_sscd(self.embed(ground_truth), self.embed(generated))
