"""guard.evaluation.scorers: the one scorer interface (SSCD, CLIP and the testbed's pixel metrics alike)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from guard.evaluation import ClipScorer, PromptRecord, SSCDScorer, evaluate_prompts
from guard.evaluation.scorers import (
    Scorer,
    as_float_array,
    as_pil,
    check_scorers,
    clip_scorer,
    json_ready,
    metric_scorers,
    sscd_scorer,
)

RED, BLUE = (255, 0, 0), (0, 0, 255)


class CountingMeanColour(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.images = 0

    def forward(self, x):
        self.images += x.shape[0]
        return x.mean(dim=(2, 3))


def test_sscd_scorer_embeds_each_ground_truth_once_and_leaves_unknown_prompts_unscored():
    model = CountingMeanColour()
    scorer = sscd_scorer(SSCDScorer(model), {"1": [Image.new("RGB", (20, 20), RED)]})
    images = [Image.new("RGB", (16, 16), RED), np.zeros((16, 16, 3), np.float32) + np.array([0, 0, 1], np.float32)]
    first = scorer(PromptRecord("a", index=1), images)
    assert first["sscd_per_image"] == pytest.approx([1.0, -1 / 3], abs=1e-6)
    assert first["sscd"] == pytest.approx((1 - 1 / 3) / 2, abs=1e-6)
    scorer(PromptRecord("a", index=1), images)
    assert model.images == 1 + 2 + 2  # the ground truth once, the generations each time
    assert scorer(PromptRecord("b", index=2), images) == {"sscd": None, "sscd_per_image": None}


def test_clip_scorer_scores_against_the_original_caption():
    seen = []
    clip = ClipScorer(
        lambda images: torch.tensor([[1.0, 0.0]] * len(images)),
        lambda texts: seen.extend(texts) or torch.tensor([[1.0, 1.0]] * len(texts)),
    )
    result = clip_scorer(clip)(PromptRecord("the original caption"), [Image.new("RGB", (4, 4))] * 2)
    assert seen == ["the original caption"] and result["clip"] == pytest.approx(1 / math.sqrt(2))


def test_a_scorer_may_not_overwrite_the_runners_fields_or_share_a_name(tmp_path):
    bad = Scorer("bad", lambda record, images: {"key": "x"})
    with pytest.raises(ValueError, match=r"scorer 'bad' returned the runner's own row field\(s\) \['key'\]"):
        bad(PromptRecord("a"), [])
    with pytest.raises(TypeError, match="must return a mapping"):
        Scorer("list", lambda record, images: [1])(PromptRecord("a"), [])
    with pytest.raises(ValueError, match=r"two scorers are called \['same'\]"):
        check_scorers([Scorer("same", dict), Scorer("same", dict)])
    with pytest.raises(ValueError, match="ground_truth was given without an sscd"):
        metric_scorers(None, {"1": []}, None)


def test_custom_scorers_fill_rows_through_the_runner(tmp_path):
    def brightness(record, images):
        values = [float(as_float_array(image).mean()) for image in images]
        return {"brightness": np.asarray(values), "bright": np.bool_(values[0] > 0.5), "nan": float("nan")}

    def generate(prompt, method, seed, num_images):
        return [np.full((8, 8, 3), 0.25 * (seed + 1), np.float32) for _ in range(num_images)]

    (row,) = evaluate_prompts(
        generate, ["a"], ["m"], out_dir=tmp_path, num_images=2, seeds=[0, 2], scorers=[Scorer("b", brightness)],
        progress=False,
    )  # fmt: skip
    assert row["brightness"] == pytest.approx([0.25, 0.25, 0.75, 0.75]) and row["bright"] is False
    assert row["nan"] is None  # JSON has no NaN
    assert np.asarray(Image.open(tmp_path / row["images"][2]))[0, 0, 0] == round(0.75 * 255)


def test_image_conversions_round_like_diffusers():
    array = np.array([[[0.5, 0.0, 1.0]]], np.float32)
    assert np.asarray(as_pil(array)).tolist() == [[[128, 0, 255]]]
    assert as_float_array(as_pil(array)) == pytest.approx(np.array([[[128 / 255, 0.0, 1.0]]]), abs=1e-7)
    assert as_float_array(np.array([[[255, 0, 0]]], np.uint8)).tolist() == [[[1.0, 0.0, 0.0]]]
    assert json_ready({"a": (np.int64(3), np.float32(0.5), torch.tensor([True]))}) == {"a": [3, 0.5, [True]]}
