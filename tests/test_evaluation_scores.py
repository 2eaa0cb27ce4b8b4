"""SSCD preprocessing and arithmetic, CLIP score arithmetic and the confidence intervals, against hand computations."""

import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from guard.evaluation import ClipScorer, SSCDScorer, mean_interval, prompt_clip_score, prompt_sscd, student_t_quantile
from guard.evaluation.sscd import center_crop, preprocess, resize_shorter_side

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


class MeanColour(torch.nn.Module):
    """SSCD stand-in: the embedding of an image is its mean normalised colour (3 numbers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def solid(colour, size=(40, 30)):
    return Image.new("RGB", size, colour)


@pytest.fixture
def scripted_sscd(tmp_path):
    path = tmp_path / "sscd_stand_in.torchscript.pt"
    torch.jit.script(MeanColour()).save(str(path))
    return path


# ---------------------------------------------------------------- preprocessing


def test_resize_keeps_aspect_with_torchvision_rounding():
    assert resize_shorter_side(solid(RED, (300, 200)), 256).size == (384, 256)
    assert resize_shorter_side(solid(RED, (200, 301)), 256).size == (256, 385)  # int(256 * 301 / 200)
    assert resize_shorter_side(solid(RED, (10, 10)), 256).size == (256, 256)


def test_preprocess_crops_the_centre_and_normalises_to_minus_one_one():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(400, 256, 3), dtype=np.uint8)  # height 400, width 256: no resize
    batch = preprocess([Image.fromarray(pixels)])
    top, left = round((400 - 224) / 2), round((256 - 224) / 2)  # 88, 16
    expected = (pixels[top : top + 224, left : left + 224].astype(np.float32) / 255.0 - 0.5) / 0.5
    assert batch.shape == (1, 3, 224, 224) and batch.dtype == torch.float32
    np.testing.assert_allclose(batch[0].permute(1, 2, 0).numpy(), expected, rtol=0, atol=1e-6)


def test_preprocess_of_a_solid_image_is_its_normalised_colour(tmp_path):
    path = tmp_path / "c.png"
    solid((10, 128, 250), (300, 200)).save(path)
    batch = preprocess([path, solid((0, 0, 0), (64, 500))])
    expected = torch.tensor([10, 128, 250]) / 255.0 * 2 - 1
    torch.testing.assert_close(batch[0].mean(dim=(1, 2)), expected, atol=1e-6, rtol=0)
    assert batch[0].std(dim=(1, 2)).max() < 1e-6 and torch.all(batch[1] == -1)


def test_center_crop_rejects_small_images_and_preprocess_rejects_bad_input():
    with pytest.raises(ValueError, match="smaller than the 224x224 crop"):
        center_crop(solid(RED, (100, 300)), 224)
    with pytest.raises(TypeError, match="PIL images or file paths"):
        preprocess([np.zeros((8, 8, 3))])


# ---------------------------------------------------------------- SSCD


def test_prompt_sscd_matches_a_hand_computation(scripted_sscd):
    scorer = SSCDScorer.from_torchscript(scripted_sscd, batch_size=2)
    # Normalised colours: red (1,-1,-1), green (-1,1,-1), yellow (1,1,-1), blue (-1,-1,1); |v| = sqrt(3).
    # Cosines against the ground truths (red, green): red (1, -1/3), yellow (1/3, 1/3), blue (-1/3, -1/3).
    result = scorer.score([solid(RED), solid(GREEN, (64, 64))], [solid(RED), solid(YELLOW), solid(BLUE, (30, 90))])
    assert result.per_image == pytest.approx((1.0, 1 / 3, -1 / 3), abs=1e-6)
    assert result.score == pytest.approx(1 / 3, abs=1e-6)


def test_prompt_sscd_is_max_over_ground_truths_then_mean_over_generations():
    generator = torch.Generator().manual_seed(0)
    ground_truth, generated = torch.randn(3, 16, generator=generator), torch.randn(5, 16, generator=generator) * 4
    maxima = []
    for g in generated.tolist():
        cosines = [np.dot(r, g) / (np.linalg.norm(r) * np.linalg.norm(g)) for r in ground_truth.tolist()]
        maxima.append(max(cosines))
    result = prompt_sscd(ground_truth, generated)
    assert result.per_image == pytest.approx(maxima, abs=1e-6)
    assert result.score == pytest.approx(sum(maxima) / 5, abs=1e-6)


def test_sscd_scorer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="sscd_disc_large"):
        SSCDScorer.from_torchscript(tmp_path / "missing.pt")
    flat = SSCDScorer(lambda x: x.flatten())
    with pytest.raises(ValueError, match=r"must return a \(1, D\) tensor"):
        flat.embed([solid(RED)])
    with pytest.raises(ValueError, match="all-zero vector"):
        prompt_sscd(torch.zeros(1, 3), torch.ones(1, 3))
    with pytest.raises(ValueError, match="embedding sizes differ"):
        prompt_sscd(torch.ones(1, 3), torch.ones(1, 4))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        SSCDScorer(MeanColour(), batch_size=0)


# ---------------------------------------------------------------- CLIP score


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


@pytest.mark.parametrize("df, table", [(1, 12.706), (2, 4.303), (5, 2.571), (10, 2.228), (30, 2.042), (1000, 1.962)])
def test_student_t_quantiles_match_the_printed_table(df, table):
    assert student_t_quantile(0.975, df) == pytest.approx(table, abs=6e-4)
    assert student_t_quantile(0.025, df) == pytest.approx(-table, abs=6e-4)


def test_t_interval_by_hand():
    interval = mean_interval([1, 2, 3, 4, 5])
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)  # t_{0.975,4} * sd / sqrt(n)
    assert (interval.mean, interval.n, interval.method) == (3.0, 5, "t")
    assert interval.low == pytest.approx(3 - half, abs=1e-5) and interval.high == pytest.approx(3 + half, abs=1e-5)
    single = mean_interval([0.4])
    assert single.mean == 0.4 and math.isnan(single.low) and math.isnan(single.high)


def test_intervals_cover_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    samples = rng.uniform(0.0, 1.0, size=(300, 25))  # true mean 0.5
    for method, kwargs in (("t", {}), ("bootstrap", {"n_resamples": 500})):
        intervals = [mean_interval(sample, method=method, seed=i, **kwargs) for i, sample in enumerate(samples)]
        coverage = np.mean([interval.low < 0.5 < interval.high for interval in intervals])
        assert 0.90 <= coverage <= 0.99, (method, coverage)


def test_bootstrap_is_seeded_and_close_to_t_for_many_values():
    values = np.random.default_rng(2).normal(0.3, 0.1, size=400)
    first, again = mean_interval(values, method="bootstrap"), mean_interval(values, method="bootstrap")
    assert first == again
    t = mean_interval(values)
    assert first.half_width == pytest.approx(t.half_width, rel=0.1)
    assert first.low < first.mean < first.high


def test_interval_argument_errors():
    with pytest.raises(ValueError, match="values is empty"):
        mean_interval([])
    with pytest.raises(ValueError, match="confidence must be in"):
        mean_interval([1, 2], confidence=95)
    with pytest.raises(ValueError, match="method must be one of"):
        mean_interval([1, 2], method="normal")
    with pytest.raises(ValueError, match="finite"):
        mean_interval([1, float("nan")])
