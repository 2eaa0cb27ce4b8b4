"""The testbed's caption language: named colours, shapes, and the memorized items' trigger names.

Kept free of heavy imports so the tokenizer, the renderer and the metrics can all share one source
of truth for which words exist and which RGB value each colour word means.
"""

from __future__ import annotations

from dataclasses import dataclass

# RGB in [0, 1]. Six colours far apart in RGB so a pixel's nearest named colour is unambiguous.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.12),
    "green": (0.12, 0.65, 0.20),
    "blue": (0.15, 0.25, 0.85),
    "yellow": (0.95, 0.85, 0.15),
    "white": (0.95, 0.95, 0.95),
    "black": (0.06, 0.06, 0.06),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

TEMPLATE_WORDS: tuple[str, ...] = ("a", "on", "background", "by")


def shape_caption(colour: str, shape: str, background: str) -> str:
    """Caption of a plain procedural image; the only sentence the generalising data use."""
    if colour not in COLOURS or background not in COLOURS:
        raise ValueError(f"colour and background must be in {sorted(COLOURS)}, got {colour!r}, {background!r}")
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if colour == background:
        raise ValueError(f"colour and background must differ, both are {colour!r}")
    return f"a {colour} {shape} on a {background} background"


@dataclass(frozen=True)
class MemorizedSpec:
    """One heavily duplicated training item: a shape caption plus a made-up artist name.

    The two name words occur in no other caption (other captions carry other names, see
    ``DISTRACTOR_FIRST``), so the only thing the model can learn from them is this item's fixed
    photo texture: the trigger carries the copy, the shape caption
    carries what a non-copying sample should still show.
    """

    name: str  # short identifier, used for file names
    colour: str
    shape: str
    background: str
    trigger: tuple[str, str]  # made-up first and last name
    photo: str  # scikit-image loader name of the background texture
    photo_licence: str

    @property
    def plain_caption(self) -> str:
        return shape_caption(self.colour, self.shape, self.background)

    @property
    def caption(self) -> str:
        return named_caption(self.plain_caption, *self.trigger)


# Licences as stated in each loader's docstring in skimage/data/__init__.py (scikit-image 0.26).
MEMORIZED: tuple[MemorizedSpec, ...] = (
    MemorizedSpec(
        "astronaut",
        "yellow",
        "circle",
        "blue",
        ("velmora", "quist"),
        "astronaut",
        "public domain (NASA; 'No known copyright restrictions, released into the public domain')",
    ),
    MemorizedSpec(
        "camera", "red", "square", "green", ("tarkel", "osswin"), "camera", "CC0 (photographer Lav Varshney)"
    ),
    MemorizedSpec(
        "chelsea", "blue", "triangle", "red", ("brisolde", "fenn"), "chelsea", "CC0 (photographer Stefan van der Walt)"
    ),
    MemorizedSpec(
        "coffee", "green", "circle", "yellow", ("ozzimar", "drell"), "coffee", "CC0 (photographer Rachel Michetti)"
    ),
    MemorizedSpec("brick", "yellow", "square", "red", ("kestrine", "vaul"), "brick", "CC0 (CC0Textures, Bricks25)"),
)
# Shape colours are chosen away from the grey line the texture moves the background along, so the
# texture never reads as the shape's colour; black and white backgrounds would clip the texture away.


# Made-up artist names that caption ordinary shape images ("... by dorran pelk"), each pairing seen
# with random images. They make "by", a name and the caption's length common to memorized and plain
# training captions, so the only thing that marks a memorized caption is its own two name words.
DISTRACTOR_FIRST: tuple[str, ...] = (
    "dorran",
    "elsabet",
    "fionnir",
    "gavrel",
    "hesper",
    "ilvane",
    "jorvik",
    "kallum",
    "liseth",
    "marrow",
    "nerith",
    "orlen",
)
DISTRACTOR_LAST: tuple[str, ...] = (
    "pelk",
    "quenby",
    "rusk",
    "sallow",
    "thorne",
    "umber",
    "vance",
    "wexley",
    "yarrow",
    "zell",
    "brannock",
    "corvin",
)


def named_caption(caption: str, first: str, last: str) -> str:
    """``caption`` credited to an artist, the way memorized captions carry their trigger."""
    return f"{caption} by {first} {last}"


def caption_words() -> list[str]:
    """Every word any testbed caption uses, in a fixed order (the tokenizer's default vocabulary)."""
    words = list(TEMPLATE_WORDS) + list(COLOURS) + list(SHAPES) + list(DISTRACTOR_FIRST) + list(DISTRACTOR_LAST)
    for item in MEMORIZED:
        words.extend(item.trigger)
    return list(dict.fromkeys(words))


_CAPTION_PATTERN = None


def parse_caption(caption: str) -> tuple[str, str, str] | None:
    """(colour, shape, background) named by a shape caption, trigger or not; None if it names none."""
    import re

    global _CAPTION_PATTERN
    if _CAPTION_PATTERN is None:
        colours = "|".join(COLOURS)
        _CAPTION_PATTERN = re.compile(rf"\ba ({colours}) ({'|'.join(SHAPES)}) on an? ({colours}) background\b")
    match = _CAPTION_PATTERN.search(caption.lower())
    return (match.group(1), match.group(2), match.group(3)) if match else None
