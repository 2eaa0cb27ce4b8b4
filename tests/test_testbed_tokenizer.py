"""The testbed tokenizer is a genuine CLIP BPE tokenizer over the testbed's words."""

from transformers import CLIPTokenizer

from guard.testbed.captions import DISTRACTOR_FIRST, DISTRACTOR_LAST, MEMORIZED, caption_words
from guard.testbed.tokenizer import build_tokenizer, bytes_to_unicode


def test_caption_tokenizes_to_bos_words_eos_and_padding():
    tokenizer = build_tokenizer()
    ids = tokenizer("a red circle", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == 77 == tokenizer.model_max_length
    tokens = tokenizer.convert_ids_to_tokens(ids[:5])
    assert tokens == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]
    assert ids[0] == tokenizer.bos_token_id
    assert set(ids[4:]) == {tokenizer.eos_token_id} == {tokenizer.pad_token_id}


def test_every_caption_word_is_one_token():
    tokenizer = build_tokenizer()
    for word in caption_words():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    for item in MEMORIZED:
        # shape caption (7 words) + "by" + two trigger words, between BOS and EOS
        assert len(tokenizer(item.caption).input_ids) == 2 + 10
    distractors = set(DISTRACTOR_FIRST) | set(DISTRACTOR_LAST)
    assert not distractors & {word for item in MEMORIZED for word in item.trigger}


def test_unknown_words_fall_back_to_bytes():
    tokenizer = build_tokenizer()
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("zebra!", add_special_tokens=False).input_ids)
    assert "".join(tokens).replace("</w>", "") == "zebra!"
    assert len(tokens) > 2
    assert all(token.replace("</w>", "") in bytes_to_unicode().values() or len(token) <= 6 for token in tokens)


def test_custom_words_and_round_trip(tmp_path):
    tokenizer = build_tokenizer(["an orange hexagon"])
    assert len(tokenizer("orange hexagon", add_special_tokens=False).input_ids) == 2
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    text = "an orange hexagon by nobody"
    assert reloaded(text).input_ids == tokenizer(text).input_ids
    assert reloaded.model_max_length == 77
    assert len(reloaded) == len(tokenizer)
