"""A real CLIP byte-level BPE tokenizer over a small vocabulary, built offline in memory.

The testbed cannot download CLIP's 49k-token vocabulary, but GUARD's spike rule works per text
token, so the testbed needs the genuine CLIP tokenization scheme (byte alphabet, ``</w>`` word
ends, BOS/EOS, padding to 77) with merges that make each caption word a single token. Words outside
the vocabulary still tokenize, falling back to shorter pieces and, at worst, single bytes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from functools import lru_cache

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
_END_OF_WORD = "</w>"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _word_symbols(word: str) -> tuple[str, ...]:
    encoder = bytes_to_unicode()
    chars = [encoder[b] for b in word.encode("utf-8")]
    chars[-1] = chars[-1] + _END_OF_WORD
    return tuple(chars)


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Greedy BPE on the word list until every word is one symbol (ties broken alphabetically).

    Learning the merges the way BPE training does, rather than chaining each word's letters,
    guarantees that applying them in rank order reproduces each word as one token even when
    words share pairs ("re" in "red" and "green").
    """
    segmented = [_word_symbols(w) for w in dict.fromkeys(words) if w]
    merges: list[tuple[str, str]] = []
    while True:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for symbols in segmented:
            pair_counts.update(zip(symbols, symbols[1:]))
        if not pair_counts:
            return merges
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        merged = best[0] + best[1]
        new_segmented = []
        for symbols in segmented:
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new_segmented.append(tuple(out))
        segmented = new_segmented


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout: bytes, bytes + ``</w>``, one entry per merge, then BOS and EOS."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + _END_OF_WORD for c in alphabet] + [a + b for a, b in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}


def build_tokenizer(words: Iterable[str] | None = None) -> CLIPTokenizer:
    """CLIP tokenizer whose merges make each of ``words`` (default: the testbed's captions) one token.

    Words are lower-cased and split the way CLIP's pre-tokenizer splits text (letters, single
    digits, punctuation runs), so ``words`` may be given as whole captions.
    """
    from .captions import caption_words

    raw = caption_words() if words is None else list(words)
    pieces: list[str] = []
    for text in raw:
        if not isinstance(text, str):
            raise TypeError(f"words must be strings, got {type(text).__name__}")
        pieces.extend(_pre_tokenize(text))
    merges = learn_merges(pieces)
    return CLIPTokenizer(
        vocab=build_vocab(merges),
        merges=list(merges),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
    )


def _pre_tokenize(text: str) -> list[str]:
    import regex

    pattern = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    return regex.findall(pattern, text.lower())
