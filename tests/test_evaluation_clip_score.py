"""CLIP score arithmetic (guard.evaluation.clip_score) with stand-in encoders."""

import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from guard.evaluation import ClipScorer, prompt_clip_score

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


def solid(colour, size=(40, 30)):
    return Image.new("RGB", size, colour)


WORDS = {"red": [1.0, 0.0, 0.0], "green": [0.0, 1.0, 0.0], "blue": [0.0, 0.0, 1.0]}


def stand_in_clip(batch_size=16):
    def encode_images(images):
        return torch.tensor(np.stack([np.asarray(image, dtype=np.float32).mean(axis=(0, 1)) for image in images]))

    def encode_texts(texts):
        return torch.tensor(np.array([np.sum([WORDS[word] for word in text.split()], axis=0) for text in texts]))

    return ClipScorer(encode_images, encode_texts, batch_size=batch_size)


def test_clip_score_is_the_mean_cosine_with_the_prompt():
    scorer = stand_in_clip(batch_size=2)
    # text "red" -> (1,0,0); images red -> cos 1, yellow (1,1,0) -> 1/sqrt 2, blue -> 0.
    result = scorer.score("red", [solid(RED), solid(YELLOW), solid(BLUE)])
    assert result.per_image == pytest.approx((1.0, 1 / math.sqrt(2), 0.0), abs=1e-6)
    assert result.score == pytest.approx((1 + 1 / math.sqrt(2)) / 3, abs=1e-6)
    # "red green" -> (1,1,0): yellow is a perfect match, red 1/sqrt 2.
    assert scorer.score("red green", [solid(YELLOW), solid(RED)]).score == pytest.approx(
        (1 + 1 / math.sqrt(2)) / 2, abs=1e-6
    )


def test_clip_arithmetic_and_errors():
    result = prompt_clip_score(torch.tensor([[3.0, 4.0]]), torch.tensor([[4.0, 3.0], [-3.0, -4.0]]))
    assert result.per_image == pytest.approx((24 / 25, -1.0))
    with pytest.raises(ValueError, match="expected one text embedding"):
        prompt_clip_score(torch.ones(2, 2), torch.ones(1, 2))
    broken = ClipScorer(lambda images: torch.ones(1, 3), lambda texts: torch.ones(len(texts), 3))
    with pytest.raises(ValueError, match=r"encode_images must return a \(2, D\) tensor"):
        broken.embed_images([solid(RED), solid(RED)])


def test_open_clip_absence_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` raise ImportError
    with pytest.raises(ImportError, match="pip install open-clip-torch"):
        ClipScorer.from_open_clip()


# ---------------------------------------------------------------- intervals
