"""Replication and alignment scores measured from pixels.

Replication: SSIM (Wang et al. 2004; 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, computed
per colour channel on the valid region and averaged) between a sample and training images.
Alignment: what a shape image shows, read back from its pixels (background colour, shape colour,
shape type) and compared with what its caption asks for. Images are (H, W, 3) floats in [0, 1]
(or batches of them); the named colours and shapes are the testbed's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .captions import COLOURS, SHAPES, parse_caption

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
_K1, _K2 = 0.01, 0.03


def _as_nchw(images) -> torch.Tensor:
    array = torch.as_tensor(np.asarray(images), dtype=torch.float64)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (H, W, C) or (N, H, W, C) with C in (1, 3), got shape {tuple(array.shape)}")
    if array.shape[1] < SSIM_WINDOW or array.shape[2] < SSIM_WINDOW:
        raise ValueError(f"images must be at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {tuple(array.shape[1:3])}")
    return array.permute(0, 3, 1, 2)


def _gaussian_window(channels: int) -> torch.Tensor:
    coords = torch.arange(SSIM_WINDOW, dtype=torch.float64) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW).contiguous()


def ssim(images, reference, data_range: float = 1.0) -> np.ndarray:
    """SSIM of each image against ``reference`` (one image, or a batch of the same length).

    Returns an array of shape (N,) (a 0-d array for a single image pair). 1 means identical.
    """
    x, y = _as_nchw(images), _as_nchw(reference)
    if y.shape[0] == 1 and x.shape[0] > 1:
        y = y.expand_as(x)
    if x.shape != y.shape:
        raise ValueError(f"images {tuple(x.shape)} and reference {tuple(y.shape)} must have matching shapes")
    window = _gaussian_window(x.shape[1])
    blur = lambda t: F.conv2d(t, window, groups=x.shape[1])  # noqa: E731
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    scores = ssim_map.mean(dim=(1, 2, 3)).numpy()
    return scores[0] if np.asarray(images).ndim == 3 else scores


def ssim_matrix(images, training_images) -> np.ndarray:
    """(N, M) SSIM of every image against every training image."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    return np.stack([ssim(images, t) for t in np.asarray(training_images)], axis=1)


def nearest_training(images, training_images) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the index of the most similar training image and that SSIM, both (N,)."""
    matrix = ssim_matrix(images, training_images)
    return matrix.argmax(axis=1), matrix.max(axis=1)


def replication(images, own_image, training_images, copy_threshold: float) -> dict:
    """Replication scores of samples of one prompt whose own training image is ``own_image``.

    ``training_images`` must include ``own_image``. Returns per-sample arrays and their means:
    own SSIM, nearest-training SSIM and index, whether the nearest training image is the own one,
    whether the sample copies its own image (own SSIM above ``copy_threshold``; the share of them
    is the copy rate) and whether it copies another training image instead (a sample that
    reproduces a different memorized image is a copy too, whatever its own SSIM).
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    own = ssim(images, own_image)
    nearest_index, nearest = nearest_training(images, training_images)
    own_index = int(nearest_training(own_image, training_images)[0][0])
    nearest_is_own = nearest_index == own_index
    copies = own > copy_threshold
    return dict(
        own_ssim=own,
        nearest_ssim=nearest,
        nearest_index=nearest_index,
        nearest_is_own=nearest_is_own,
        copied=copies,
        copied_other=(nearest > copy_threshold) & ~nearest_is_own,
        mean_own_ssim=float(own.mean()),
        mean_nearest_ssim=float(nearest.mean()),
        copy_rate=float(copies.mean()),
        nearest_is_own_rate=float(nearest_is_own.mean()),
    )


# ---------------------------------------------------------------------------------------------
# Alignment

_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.asarray([COLOURS[n] for n in _PALETTE_NAMES], dtype=np.float32)
BORDER = 2  # pixels of the frame read as background


def nearest_colour(rgb) -> str:
    """Name of the testbed colour closest (Euclidean in RGB) to one RGB triple in [0, 1]."""
    rgb = np.asarray(rgb, dtype=np.float32).reshape(3)
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


COLOUR_TOLERANCE = 0.3  # RGB distance within which a pixel counts as a named colour


def _colour_labels(image: np.ndarray) -> np.ndarray:
    """Index of each pixel's named colour, or -1 if it is near none (textures, blends, edges)."""
    distances = ((image[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(axis=-1)
    labels = distances.argmin(axis=-1)
    labels[distances.min(axis=-1) > COLOUR_TOLERANCE**2] = -1
    return labels


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a boolean mask (flood fill; images are tiny)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best_label, best_size, current = 0, 0, 0
    for sy, sx in zip(*np.nonzero(mask)):
        if labels[sy, sx]:
            continue
        current += 1
        stack, size = [(sy, sx)], 0
        labels[sy, sx] = current
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best_label, best_size = current, size
    return labels == best_label if best_size else np.zeros_like(mask)


def _template(shape: str, top: int, bottom: int, left: int, right: int, size: tuple[int, int]) -> np.ndarray:
    """The shape drawn to fill a bounding box (inclusive pixel bounds)."""
    y, x = np.mgrid[0 : size[0], 0 : size[1]].astype(np.float32) + 0.5
    y0, y1, x0, x1 = top, bottom + 1, left, right + 1
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    ry, rx = max((y1 - y0) / 2, 0.5), max((x1 - x0) / 2, 0.5)
    if shape == "circle":
        return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0
    if shape == "square":
        return (y >= y0) & (y <= y1) & (x >= x0) & (x <= x1)
    if shape == "triangle":
        return (y >= y0) & (y <= y1) & (np.abs(x - cx) <= (y - y0) / (y1 - y0) * rx)
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


@dataclass(frozen=True)
class ShapeReading:
    """What an image shows; ``shape``/``colour`` are None when no shape-sized region was found."""

    background: str
    colour: str | None
    shape: str | None
    shape_pixels: int


MIN_SHAPE_PIXELS = 24  # smaller than any training shape (half-width 6 px => >= 100 px)


def read_shape_image(image) -> ShapeReading:
    """Background colour (median of the border), shape colour (largest region of another named
    colour) and shape type (the template with the best IoU over that region's bounding box)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
    h, w, _ = image.shape
    border = np.ones((h, w), dtype=bool)
    border[BORDER : h - BORDER, BORDER : w - BORDER] = False
    background = nearest_colour(np.median(image[border], axis=0))
    labels = _colour_labels(image)
    best_mask, best_colour = None, None
    for index, name in enumerate(_PALETTE_NAMES):
        if name == background:
            continue
        component = _largest_component(labels == index)
        if best_mask is None or component.sum() > best_mask.sum():
            best_mask, best_colour = component, name
    pixels = int(best_mask.sum())
    if pixels < MIN_SHAPE_PIXELS:
        return ShapeReading(background, None, None, pixels)
    ys, xs = np.nonzero(best_mask)
    ious = {}
    for shape in SHAPES:
        template = _template(shape, ys.min(), ys.max(), xs.min(), xs.max(), (h, w))
        ious[shape] = (template & best_mask).sum() / max((template | best_mask).sum(), 1)
    return ShapeReading(background, best_colour, max(ious, key=ious.get), pixels)


def alignment(image, prompt: str) -> dict:
    """Whether an image shows what a shape caption (with or without a trigger) asks for.

    Returns the expected and read values and booleans ``background_ok``, ``colour_ok``,
    ``shape_ok`` and ``all_ok``. Raises ValueError for a prompt that names no shape caption.
    """
    expected = parse_caption(prompt)
    if expected is None:
        raise ValueError(f"prompt must contain 'a <colour> <shape> on a <colour> background', got {prompt!r}")
    colour, shape, background = expected
    reading = read_shape_image(image)
    result = dict(
        expected_colour=colour,
        expected_shape=shape,
        expected_background=background,
        colour=reading.colour,
        shape=reading.shape,
        background=reading.background,
        background_ok=reading.background == background,
        colour_ok=reading.colour == colour,
        shape_ok=reading.shape == shape,
    )
    result["all_ok"] = result["background_ok"] and result["colour_ok"] and result["shape_ok"]
    return result
