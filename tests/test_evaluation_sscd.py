"""SSCD preprocessing and scoring (guard.evaluation.sscd), against hand computations."""

import numpy as np
import pytest
import torch
from PIL import Image

from guard.evaluation import SSCDScorer, prompt_sscd
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
