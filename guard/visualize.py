"""Pictures for people: labelled image grids, with small images enlarged without blurring."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LABEL_HEIGHT = 16
LEGEND_LINE = 13
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)


def to_pil(image) -> Image.Image:
    """A PIL RGB image from a PIL image or an (H, W, 3) array in [0, 1] (float) or [0, 255] (uint8)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image array, got shape {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return Image.fromarray(array, mode="RGB")


def enlarge(image, size: int) -> Image.Image:
    """Scale to ``size`` pixels on the long side; nearest-neighbour so 32x32 pixels stay visible."""
    image = to_pil(image)
    factor = size / max(image.size)
    resample = Image.NEAREST if factor >= 1 else Image.LANCZOS
    return image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))), resample)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and draw.textlength(candidate, font=font) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    return lines + [current] if current else lines


def image_grid(
    rows: Sequence[Sequence],
    cell: int = 128,
    row_labels: Optional[Sequence[str]] = None,
    column_labels: Optional[Sequence[str]] = None,
    captions: Optional[Sequence[Sequence[str]]] = None,
    label_width: int = 0,
    legend: Sequence[str] = (),
) -> Image.Image:
    """Lay ``rows`` of images out as a grid of ``cell``-pixel squares.

    ``column_labels`` go above the columns, ``row_labels`` in a left margin of ``label_width``
    pixels (word-wrapped), ``captions[r][c]`` under each image (e.g. a score), and ``legend``
    lines (what the captions' marks mean) below the grid, word-wrapped to its width.
    """
    if not rows or not all(rows):
        raise ValueError("image_grid needs at least one non-empty row")
    columns = max(len(row) for row in rows)
    caption_height = LABEL_HEIGHT if captions is not None else 0
    header = LABEL_HEIGHT if column_labels is not None else 0
    if row_labels is not None and label_width == 0:
        label_width = 2 * cell
    width = label_width + columns * cell
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend_lines = [line for text in legend for line in _wrap(measure, text, width - 6, font)]
    grid_height = header + len(rows) * (cell + caption_height)
    height = grid_height + (LEGEND_LINE * len(legend_lines) + 6 if legend_lines else 0)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if column_labels is not None:
        for c, label in enumerate(column_labels):
            draw.text((label_width + c * cell + 3, 2), _fit_text(draw, label, cell - 6, font), fill=TEXT, font=font)
    for r, row in enumerate(rows):
        top = header + r * (cell + caption_height)
        if row_labels is not None:
            for i, line in enumerate(_wrap(draw, row_labels[r], label_width - 6, font)):
                draw.text((3, top + 3 + i * 12), _fit_text(draw, line, label_width - 6, font), fill=TEXT, font=font)
        for c, image in enumerate(row):
            canvas.paste(enlarge(image, cell), (label_width + c * cell, top))
            if captions is not None and captions[r][c]:
                text = _fit_text(draw, captions[r][c], cell - 6, font)
                draw.text((label_width + c * cell + 3, top + cell + 2), text, fill=TEXT, font=font)
    for i, line in enumerate(legend_lines):
        draw.text((3, grid_height + 4 + i * LEGEND_LINE), line, fill=TEXT, font=font)
    return canvas
