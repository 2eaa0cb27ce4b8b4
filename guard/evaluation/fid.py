"""FID of each method's images against a folder of reference images, with a feature network the user names.

The distance is torchmetrics' ``FrechetInceptionDistance`` (``pip install 'guard[fid]'``). Its
built-in Inception needs torch-fidelity and downloads weights, so here the feature network is always
a TorchScript file the user gives, passed as ``feature=`` (an ``nn.Module``, which torchmetrics
accepts without torch-fidelity): e.g. ``inception-2015-12-05.pt``, the TorchScript port of the
TensorFlow FID Inception that StyleGAN2-ADA and clean-fid use; nothing is downloaded. Images are
converted to RGB, resized to 299 x 299 with PIL's bicubic filter (clean-fid's "clean" resize) and
passed as uint8 (N, 3, 299, 299) in [0, 255]; a network whose ``forward`` takes ``return_features``
(NVIDIA's file does) is called with ``return_features=True`` (its 2048-d pool features).

Without torchmetrics, :func:`frechet_distance` (NumPy and ``scipy.linalg.sqrtm``, as pytorch-fid
computes it) gives the same number from the same features; the tests check that the two agree.

FID describes a set of images, not a prompt: it is computed once a run is complete, per method over
all of its prompts' images (no SSCD filter), from the saved PNGs, and written to ``fid.json``.
"""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .ground_truth import IMAGE_SUFFIXES
from .results import FID_FILE, read_rows, write_json_atomic

FID_SIZE = 299
BACKENDS = ("auto", "torchmetrics", "scipy")

ImageInput = Union[Image.Image, str, os.PathLike]


def _takes_return_features(model: Any) -> bool:
    forward = getattr(model, "forward", model)
    schema = getattr(forward, "schema", None)  # TorchScript methods describe their arguments here
    if schema is not None:
        return any(argument.name == "return_features" for argument in schema.arguments)
    try:
        return "return_features" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


class FeatureNetwork(torch.nn.Module):
    """A feature network as torchmetrics' ``feature=``: uint8 (N, 3, 299, 299) -> float (N, D).

    ``num_features`` is measured once on a blank image, so torchmetrics needs no probe of its own.
    """

    def __init__(self, model: torch.nn.Module, *, device: str | torch.device = "cpu"):
        super().__init__()
        self.model = model
        self.return_features = _takes_return_features(model)
        self.device = torch.device(device)
        with torch.no_grad():
            probe = self(torch.zeros(2, 3, FID_SIZE, FID_SIZE, dtype=torch.uint8, device=self.device))
        self.num_features = int(probe.shape[1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model(images, return_features=True) if self.return_features else self.model(images)
        if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[0] != images.shape[0]:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"the FID feature network must return ({images.shape[0]}, D) features, got {shape}")
        return features.float()


def load_feature_network(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> FeatureNetwork:
    """The TorchScript feature network at ``path`` (never downloaded), on ``device``, in eval mode."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"FID feature network {path} not found; pass a TorchScript Inception file such as "
            "inception-2015-12-05.pt (the FID Inception used by StyleGAN2-ADA and clean-fid); it is never downloaded"
        )
    try:
        model = torch.jit.load(str(path), map_location=torch.device(device))
    except RuntimeError as error:
        raise ValueError(f"{path} is not a TorchScript file torch.jit.load can read ({error})") from None
    return FeatureNetwork(model.eval(), device=device)


def fid_batch(images: Sequence[ImageInput]) -> torch.Tensor:
    """uint8 (N, 3, 299, 299): RGB, bicubic-resized with PIL (clean-fid's "clean" resize)."""
    arrays = []
    for image in images:
        if isinstance(image, Image.Image):
            rgb = image.convert("RGB")
        else:
            with Image.open(image) as opened:
                rgb = opened.convert("RGB")
        if rgb.size != (FID_SIZE, FID_SIZE):
            rgb = rgb.resize((FID_SIZE, FID_SIZE), Image.BICUBIC)
        arrays.append(np.asarray(rgb, dtype=np.uint8))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def reference_images(folder: str | os.PathLike) -> list[Path]:
    """Every image file under ``folder`` (recursively, sorted); at least two, since FID needs a covariance."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"FID reference folder {folder} does not exist")
    paths = sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
    if len(paths) < 2:
        raise ValueError(f"FID reference folder {folder} holds {len(paths)} image(s); FID needs at least 2")
    return paths


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)), with pytorch-fid's safeguards."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: {mu1.shape}, {sigma1.shape} vs {mu2.shape}, {sigma2.shape}")
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():  # a singular product: offset the diagonals, as pytorch-fid does
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = np.real(covmean)
    difference = mu1 - mu2
    return float(difference.dot(difference) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


class _Moments:
    """Running sums of features and their outer products (float64), as torchmetrics keeps them."""

    def __init__(self, dimension: int):
        self.total = np.zeros(dimension)
        self.outer = np.zeros((dimension, dimension))
        self.count = 0

    def update(self, features: torch.Tensor) -> None:
        values = features.detach().double().cpu().numpy()
        self.total += values.sum(axis=0)
        self.outer += values.T @ values
        self.count += values.shape[0]

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        mean = self.total / self.count
        covariance = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return mean, covariance


class FIDScorer:
    """FID of image sets against fixed reference images; reference features are computed once.

    network: a :class:`FeatureNetwork` (or any module with ``num_features`` mapping uint8
    (N, 3, 299, 299) to (N, D)). backend: "torchmetrics" (``FrechetInceptionDistance(feature=network)``),
    "scipy" (:func:`frechet_distance`) or "auto" (torchmetrics when installed).
    """

    name = "fid"

    def __init__(
        self,
        network: torch.nn.Module,
        references: Sequence[ImageInput],
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 50,
        backend: str = "auto",
        progress: bool = True,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        references = list(references)
        if len(references) < 2:
            raise ValueError(f"FID needs at least 2 reference images, got {len(references)}")
        if backend == "auto":
            try:
                import torchmetrics.image.fid  # noqa: F401

                backend = "torchmetrics"
            except ImportError:
                backend = "scipy"
        self.network, self.references, self.backend = network, references, backend
        self.device, self.batch_size, self.progress = torch.device(device), batch_size, progress
        self._metric: Any = None
        self._reference_moments: _Moments | None = None

    def _batches(self, images: Sequence[ImageInput], what: str) -> Iterable[torch.Tensor]:
        steps = range(0, len(images), self.batch_size)
        for start in tqdm(steps, desc=f"FID {what}", unit="batch", disable=not self.progress, leave=False):
            yield fid_batch(images[start : start + self.batch_size]).to(self.device)

    @torch.no_grad()
    def _prepare(self) -> None:
        if self.backend == "torchmetrics":
            if self._metric is None:
                from torchmetrics.image.fid import FrechetInceptionDistance

                metric = FrechetInceptionDistance(feature=self.network, reset_real_features=False, normalize=False)
                metric = metric.to(self.device)
                for batch in self._batches(self.references, "reference images"):
                    metric.update(batch, real=True)
                self._metric = metric
        elif self._reference_moments is None:
            moments = _Moments(int(self.network.num_features))
            for batch in self._batches(self.references, "reference images"):
                moments.update(self.network(batch))
            self._reference_moments = moments

    @torch.no_grad()
    def score(self, images: Sequence[ImageInput], what: str = "images") -> float:
        """FID of ``images`` (PIL images or files; at least two) against the references."""
        images = list(images)
        if len(images) < 2:
            raise ValueError(f"FID needs at least 2 images, got {len(images)}")
        self._prepare()
        if self.backend == "torchmetrics":
            self._metric.reset()  # keeps the reference features (reset_real_features=False)
            for batch in self._batches(images, what):
                self._metric.update(batch, real=False)
            return float(self._metric.compute())
        moments = _Moments(int(self.network.num_features))
        for batch in self._batches(images, what):
            moments.update(self.network(batch))
        return frechet_distance(*moments.statistics(), *self._reference_moments.statistics())


def fid_by_method(
    out_dir: str | os.PathLike,
    scorer: FIDScorer,
    *,
    methods: Sequence[str] | None = None,
    description: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """FID of every method's saved images (all prompts), written with ``description`` to ``fid.json``."""
    out_dir = Path(out_dir)
    rows = read_rows(out_dir)
    present = list(dict.fromkeys(row["method"] for row in rows))
    methods = present if methods is None else list(methods)
    results = {}
    for name in methods:
        paths = [out_dir / relative for row in rows if row["method"] == name for relative in row["images"]]
        if len(paths) < 2:
            raise ValueError(f"method {name!r} has {len(paths)} image(s) in {out_dir}; FID needs at least 2")
        value = scorer.score(paths, what=name)
        results[name] = {"fid": value if math.isfinite(value) else None, "images": len(paths)}
    payload = {
        **dict(description or {}),
        "backend": scorer.backend,
        "reference_images": len(scorer.references),
        "methods": results,
    }
    write_json_atomic(out_dir / FID_FILE, payload)
    return results
