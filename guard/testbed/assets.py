"""The files shipped with the testbed: where they live, and the memorized items' training images.

The memorized items' images are stored as PNGs (with captions and licences in ``memorized.json``)
so that scoring a sample against its training image needs neither scikit-image nor a rebuild.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .captions import COLOURS, MEMORIZED, SHAPES, shape_caption

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MEMORIZED_DIR_NAME = "memorized"
MEMORIZED_INDEX = "memorized.json"


@dataclass(frozen=True)
class MemorizedItem:
    """A memorized caption with the exact image the model was trained on (H, W, 3 float32 in [0, 1])."""

    name: str
    caption: str
    plain_caption: str
    trigger: tuple[str, ...]
    colour: str
    shape: str
    background: str
    image: np.ndarray
    photo: str
    photo_licence: str


def write_memorized_assets(folder: str | Path) -> Path:
    """Render the memorized items from scikit-image's bundled photos into ``folder`` (PNGs + JSON)."""
    from PIL import Image

    from .data import build_memorized_images

    folder = Path(folder)
    images_dir = folder / MEMORIZED_DIR_NAME
    images_dir.mkdir(parents=True, exist_ok=True)
    records = []
    rendered = build_memorized_images()
    for item in MEMORIZED:
        pixels = np.round(rendered[item.name] * 255.0).astype(np.uint8)
        file_name = f"{item.name}.png"
        Image.fromarray(pixels).save(images_dir / file_name)
        records.append(
            dict(
                name=item.name,
                caption=item.caption,
                plain_caption=item.plain_caption,
                trigger=list(item.trigger),
                colour=item.colour,
                shape=item.shape,
                background=item.background,
                image=f"{MEMORIZED_DIR_NAME}/{file_name}",
                photo=f"skimage.data.{item.photo}()",
                photo_licence=item.photo_licence,
            )
        )
    index = folder / MEMORIZED_INDEX
    index.write_text(json.dumps(records, indent=2) + "\n")
    return index


def memorized_items(path: str | Path | None = None) -> list[MemorizedItem]:
    """The memorized items of the shipped testbed (or of the pipeline folder ``path``)."""
    from PIL import Image

    folder = Path(path) if path is not None else WEIGHTS_DIR
    index = folder / MEMORIZED_INDEX
    if not index.is_file():
        raise FileNotFoundError(f"no {MEMORIZED_INDEX} in {folder}: not a testbed pipeline folder")
    items = []
    for record in json.loads(index.read_text()):
        pixels = np.asarray(Image.open(folder / record["image"]).convert("RGB"), dtype=np.float32) / 255.0
        items.append(
            MemorizedItem(
                name=record["name"],
                caption=record["caption"],
                plain_caption=record["plain_caption"],
                trigger=tuple(record["trigger"]),
                colour=record["colour"],
                shape=record["shape"],
                background=record["background"],
                image=pixels,
                photo=record["photo"],
                photo_licence=record["photo_licence"],
            )
        )
    return items


def plain_prompts(count: int | None = None, seed: int = 0) -> list[str]:
    """Trigger-free shape captions (every colour/shape/background combination, shuffled by ``seed``).

    These are what a user would normally type: GUARD should leave them as CFG renders them.
    """
    prompts = [shape_caption(c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if c != b]
    order = np.random.default_rng(seed).permutation(len(prompts))
    prompts = [prompts[i] for i in order]
    if count is None:
        return prompts
    if not 0 < count <= len(prompts):
        raise ValueError(f"count must be in 1..{len(prompts)}, got {count}")
    return prompts[:count]
