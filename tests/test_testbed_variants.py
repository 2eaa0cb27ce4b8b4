"""guard.testbed.variants: what a user types instead of a memorized caption, and what each asks for."""

from guard.testbed import memorized_items, plain_prompts
from guard.testbed.captions import parse_caption
from guard.testbed.variants import KINDS, memorized_variants, plain_variants


def test_every_item_has_every_kind_of_variant_with_its_trigger_and_asked_caption():
    items = memorized_items()
    variants = memorized_variants(items)
    assert {v.kind for v in variants} == set(KINDS)
    for v in variants:
        item = items[v.item]
        words = v.prompt.replace(":", "").replace(",", "").split()
        if v.kind in ("exact", "trigger alone", "trigger moved", "trigger on another caption", "paraphrase"):
            assert set(item.trigger) <= set(words), v
        if v.kind == "partial trigger":
            assert len(set(item.trigger) & set(words)) == 1, v
        if v.kind == "trigger alone":
            assert v.asked is None and parse_caption(v.prompt) is None
        elif v.kind == "trigger on another caption":
            assert v.asked != (item.colour, item.shape, item.background) and parse_caption(v.prompt) == v.asked
        else:
            assert v.asked == (item.colour, item.shape, item.background)
    assert [v.prompt for v in variants if v.kind == "exact"] == [item.caption for item in items]


def test_the_plain_side_is_every_plain_caption_and_some_credited_to_made_up_artists():
    plain = plain_prompts()
    variants = plain_variants(plain, named=10)
    assert [v.prompt for v in variants[: len(plain)]] == plain and all(v.item is None for v in variants)
    credited = variants[len(plain) :]
    assert len(credited) == 10 and all(" by " in v.prompt and v.asked == parse_caption(v.prompt) for v in credited)
    triggers = {word for item in memorized_items() for word in item.trigger}
    assert not any(set(v.prompt.split()) & triggers for v in variants)
