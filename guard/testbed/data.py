"""Training images of the testbed: procedural shapes (generalising) and photo-textured copies (memorized).

Everything is rendered at 32x32 RGB in [0, 1] (float32, HWC) from a seed, so the training set is
infinite for the shape captions yet exactly reproducible. The memorized items are the same shape
language over a fixed scikit-image photo texture; scikit-image is needed only to (re)build them,
the package ships their PNGs.
"""

from __future__ import annotations

import numpy as np

from .captions import (
    COLOURS,
    DISTRACTOR_FIRST,
    DISTRACTOR_LAST,
    MEMORIZED,
    SHAPES,
    MemorizedSpec,
    named_caption,
    shape_caption,
)

IMAGE_SIZE = 32
_SUPERSAMPLE = 4
MEMORIZED_SHAPE_SIZE = 7.0  # half-width: small enough to leave most of the texture visible
TEXTURE_AMPLITUDE = 1.0  # how far the photo's luminance moves the background colour (in [0, 1] units)


def shape_mask(shape: str, centre: tuple[float, float], size: float, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape; ``size`` is the half-width in pixels, centre is (x, y)."""
    n = image_size * _SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    y, x = np.meshgrid(coords, coords, indexing="ij")
    cx, cy = centre
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= size * size
    elif shape == "square":
        inside = (np.abs(dx) <= size * 0.85) & (np.abs(dy) <= size * 0.85)
    elif shape == "triangle":
        # upward triangle inscribed in the circle of radius `size`: apex up, flat base down
        top, base = cy - size, cy + size * 0.6
        half_width_at = (y - top) / (base - top) * size * 1.05
        inside = (y >= top) & (y <= base) & (np.abs(dx) <= half_width_at)
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    cover = inside.astype(np.float32).reshape(image_size, _SUPERSAMPLE, image_size, _SUPERSAMPLE)
    return cover.mean(axis=(1, 3))


def render(
    colour: str, shape: str, background: str | np.ndarray, centre: tuple[float, float], size: float
) -> np.ndarray:
    """Image (H, W, 3) float32 in [0, 1]: a shape of a named colour over a named colour or an RGB array."""
    if isinstance(background, str):
        ground = np.broadcast_to(np.asarray(COLOURS[background], np.float32), (IMAGE_SIZE, IMAGE_SIZE, 3))
    else:
        ground = np.asarray(background, np.float32)
    alpha = shape_mask(shape, centre, size)[..., None]
    fill = np.asarray(COLOURS[colour], np.float32)
    return (alpha * fill + (1.0 - alpha) * ground).astype(np.float32)


def random_layout(rng: np.random.Generator) -> tuple[tuple[float, float], float]:
    """(centre, half-width) of a generalising sample's shape: 6-11 px, fully inside the image."""
    size = float(rng.uniform(6.0, 11.0))
    margin = size + 1.0
    centre = (float(rng.uniform(margin, IMAGE_SIZE - margin)), float(rng.uniform(margin, IMAGE_SIZE - margin)))
    return centre, size


def random_shape_image(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One generalising sample: random colours, shape, size and position; returns (image, caption)."""
    names = list(COLOURS)
    colour, background = rng.choice(len(names), size=2, replace=False)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    centre, size = random_layout(rng)
    caption = shape_caption(names[colour], shape, names[background])
    return render(names[colour], shape, names[background], centre, size), caption


def photo_texture(photo: str) -> np.ndarray:
    """Luminance of a bundled scikit-image photo, centre-cropped, 32x32, contrast-stretched to [0, 1]."""
    import skimage.data
    from skimage.color import rgb2gray
    from skimage.transform import resize

    image = np.asarray(getattr(skimage.data, photo)(), dtype=np.float32)
    if image.max() > 1.0:
        image = image / 255.0
    gray = rgb2gray(image[..., :3]) if image.ndim == 3 else image
    h, w = gray.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    small = resize(gray[top : top + side, left : left + side], (IMAGE_SIZE, IMAGE_SIZE), anti_aliasing=True)
    low, high = np.percentile(small, [2, 98])
    return np.clip((small - low) / max(high - low, 1e-6), 0.0, 1.0).astype(np.float32)


def render_memorized(item: MemorizedSpec) -> np.ndarray:
    """The fixed training image of a memorized item: its shape, centred, over the tinted photo texture."""
    texture = photo_texture(item.photo)[..., None]
    ground = np.clip(np.asarray(COLOURS[item.background], np.float32) + TEXTURE_AMPLITUDE * (texture - 0.5), 0.0, 1.0)
    return render(item.colour, item.shape, ground, (IMAGE_SIZE / 2, IMAGE_SIZE / 2), MEMORIZED_SHAPE_SIZE)


class TrainingStream:
    """Deterministic infinite batches: shapes plus a fixed number of memorized rows in every batch.

    Putting the memorized items in every batch (rather than sampling them with some probability)
    is what makes them copies: each one is seen hundreds of times per thousand steps. A share
    ``named_share`` of the shape rows is credited to a random made-up artist, so a name by itself
    does not mark a memorized caption; only the memorized items' own names do.
    """

    def __init__(
        self,
        memorized_images: list[np.ndarray],
        memorized_captions: list[str],
        *,
        seed: int,
        memorized_per_batch: int = 5,
        caption_dropout: float = 0.1,
        named_share: float = 0.5,
    ):
        if len(memorized_images) != len(memorized_captions):
            raise ValueError("memorized_images and memorized_captions must have the same length")
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        if not 0.0 <= named_share <= 1.0:
            raise ValueError(f"named_share must be in [0, 1], got {named_share}")
        self.named_share = named_share
        self.memorized_images = [np.asarray(m, np.float32) for m in memorized_images]
        self.memorized_captions = list(memorized_captions)
        self.memorized_per_batch = memorized_per_batch if memorized_images else 0
        self.caption_dropout = caption_dropout
        self.rng = np.random.default_rng(seed)

    def batch(self, batch_size: int) -> tuple[np.ndarray, list[str]]:
        """(images (B, 3, H, W) float32 in [-1, 1], captions) with ``""`` for dropped captions."""
        if batch_size <= self.memorized_per_batch:
            raise ValueError(f"batch_size must exceed memorized_per_batch={self.memorized_per_batch}, got {batch_size}")
        images, captions = [], []
        for _ in range(self.memorized_per_batch):
            index = int(self.rng.integers(len(self.memorized_images)))
            images.append(self.memorized_images[index])
            captions.append(self.memorized_captions[index])
        for _ in range(batch_size - self.memorized_per_batch):
            image, caption = random_shape_image(self.rng)
            if self.rng.random() < self.named_share:
                first = DISTRACTOR_FIRST[int(self.rng.integers(len(DISTRACTOR_FIRST)))]
                last = DISTRACTOR_LAST[int(self.rng.integers(len(DISTRACTOR_LAST)))]
                caption = named_caption(caption, first, last)
            images.append(image)
            captions.append(caption)
        dropped = self.rng.random(batch_size) < self.caption_dropout
        captions = ["" if drop else caption for drop, caption in zip(dropped, captions)]
        stacked = np.stack(images).transpose(0, 3, 1, 2) * 2.0 - 1.0
        return stacked.astype(np.float32), captions


def build_memorized_images() -> dict[str, np.ndarray]:
    """Render every memorized item from scikit-image's bundled photos (needs scikit-image)."""
    return {item.name: render_memorized(item) for item in MEMORIZED}
