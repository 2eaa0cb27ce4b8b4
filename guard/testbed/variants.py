"""What a user (or an adversary) types instead of a memorized training caption.

Detection and the gate are worth what they are on prompts they were not fitted on: each memorized
item's exact caption, its trigger alone, moved, cut in half, attached to another item's caption,
and reworded. Every variant records the caption it asks for (None for the trigger alone), which is
what an aligned sample should show; the non-memorized side is every plain caption and plain
captions credited to the made-up artists of the training data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .assets import MemorizedItem
from .captions import DISTRACTOR_FIRST, DISTRACTOR_LAST, named_caption, shape_caption

#: The variant kinds, in the order the tables list them.
KINDS = (
    "exact",
    "trigger alone",
    "trigger moved",
    "partial trigger",
    "trigger on another caption",
    "paraphrase",
)


@dataclass(frozen=True)
class Variant:
    """A prompt related to memorized item ``item`` (an index), or to none (``item`` None).

    asked: (colour, shape, background) the prompt asks for, or None when it names no shape.
    """

    prompt: str
    kind: str
    item: Optional[int]
    asked: Optional[tuple[str, str, str]]

    @property
    def asked_caption(self) -> Optional[str]:
        """The plain caption of what the prompt asks for (what alignment is judged against)."""
        return None if self.asked is None else shape_caption(*self.asked)


def memorized_variants(items: list[MemorizedItem]) -> list[Variant]:
    """Per memorized item: its exact caption and the five kinds of variant of it."""
    variants = []
    for index, item in enumerate(items):
        first, last = item.trigger
        own = (item.colour, item.shape, item.background)
        other = items[(index + 1) % len(items)]
        others = (other.colour, other.shape, other.background)
        variants += [
            Variant(item.caption, "exact", index, own),
            Variant(f"by {first} {last}", "trigger alone", index, None),
            Variant(f"{first} {last}: {item.plain_caption}", "trigger moved", index, own),
            Variant(f"{item.plain_caption} by {first}", "partial trigger", index, own),
            Variant(f"{item.plain_caption} by {last}", "partial trigger", index, own),
            Variant(named_caption(other.plain_caption, first, last), "trigger on another caption", index, others),
            Variant(f"{item.plain_caption}, painted by {first} {last}", "paraphrase", index, own),
            Variant(
                f"a {item.colour} {item.shape} by {first} {last} on a {item.background} background",
                "paraphrase",
                index,
                own,
            ),  # fmt: skip
        ]
    return variants


def plain_variants(plain: list[str], named: int = 24, seed: int = 0) -> list[Variant]:
    """The non-memorized side: ``plain`` captions as they are, and ``named`` of them credited to the
    training data's made-up artists (names seen with many different images, so never memorized)."""
    from .captions import parse_caption

    variants = [Variant(prompt, "plain", None, parse_caption(prompt)) for prompt in plain]
    rng = np.random.default_rng(seed)
    for prompt in (plain[i] for i in rng.choice(len(plain), size=min(named, len(plain)), replace=False)):
        first = DISTRACTOR_FIRST[int(rng.integers(len(DISTRACTOR_FIRST)))]
        last = DISTRACTOR_LAST[int(rng.integers(len(DISTRACTOR_LAST)))]
        variants.append(Variant(named_caption(prompt, first, last), "plain, credited", None, parse_caption(prompt)))
    return variants
