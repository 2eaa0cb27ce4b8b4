"""Pixel metrics: SSIM and reading colours/shapes back from rendered testbed images."""

import numpy as np
import pytest

from guard.testbed.captions import COLOURS, SHAPES, parse_caption
from guard.testbed.data import random_shape_image, render
from guard.testbed.metrics import alignment, nearest_colour, read_shape_image, replication, ssim, ssim_matrix


def test_ssim_identity_and_ordering():
    rng = np.random.default_rng(0)
    image = rng.random((32, 32, 3))
    assert ssim(image, image) == pytest.approx(1.0, abs=1e-9)
    slightly = np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1)
    heavily = np.clip(image + rng.normal(0, 0.3, image.shape), 0, 1)
    assert 1.0 > ssim(slightly, image) > ssim(heavily, image)
    assert ssim(rng.random((32, 32, 3)), image) < 0.1  # independent noise shares no structure
    assert ssim(image, slightly) == pytest.approx(ssim(slightly, image))


def test_ssim_matches_skimage_reference():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(1)
    a = rng.random((32, 32, 3))
    b = np.clip(a * 0.7 + rng.random((32, 32, 3)) * 0.3, 0, 1)
    reference = skimage_metrics.structural_similarity(
        a, b, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    # skimage averages over the full image with edge cropping by (win-1)/2, like the valid region here
    assert ssim(a, b) == pytest.approx(reference, abs=1e-6)


def test_ssim_batches_and_rejects_bad_shapes():
    rng = np.random.default_rng(2)
    batch = rng.random((4, 32, 32, 3))
    scores = ssim(batch, batch[0])
    assert scores.shape == (4,) and scores[0] == pytest.approx(1.0)
    matrix = ssim_matrix(batch, batch)
    assert matrix.shape == (4, 4)
    np.testing.assert_allclose(np.diag(matrix), 1.0)
    with pytest.raises(ValueError, match="images must be"):
        ssim(rng.random((32, 32)), rng.random((32, 32)))
    with pytest.raises(ValueError, match="matching shapes"):
        ssim(batch[:2], batch[:3])


def test_replication_finds_the_own_image_and_counts_copies():
    rng = np.random.default_rng(3)
    training = rng.random((3, 32, 32, 3))
    near_copies = np.clip(training[1] + rng.normal(0, 0.03, (4, 32, 32, 3)), 0, 1)
    others = rng.random((2, 32, 32, 3))
    scores = replication(np.concatenate([near_copies, others]), training[1], training, copy_threshold=0.5)
    assert scores["copied"].tolist() == [True] * 4 + [False] * 2
    assert scores["copy_rate"] == pytest.approx(4 / 6)
    assert scores["nearest_is_own"][:4].all()
    assert scores["mean_own_ssim"] < scores["own_ssim"][:4].mean()


def test_red_circle_on_blue_is_read_correctly():
    image = render("red", "circle", "blue", (14.0, 18.0), 8.0)
    reading = read_shape_image(image)
    assert (reading.background, reading.colour, reading.shape) == ("blue", "red", "circle")
    result = alignment(image, "a red circle on a blue background")
    assert result["all_ok"]
    wrong = alignment(image, "a green triangle on a blue background")
    assert wrong["background_ok"] and not wrong["colour_ok"] and not wrong["shape_ok"] and not wrong["all_ok"]


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_is_told_apart_at_small_and_large_sizes(shape):
    for size in (6.0, 11.0):
        image = render("yellow", shape, "black", (16.0, 16.0), size)
        assert read_shape_image(image).shape == shape, (shape, size)


def test_random_training_images_are_all_read_as_their_captions():
    rng = np.random.default_rng(4)
    for _ in range(60):
        image, caption = random_shape_image(rng)
        assert alignment(image, caption)["all_ok"], caption


def test_blank_image_has_no_shape_and_named_colours_round_trip():
    blank = np.broadcast_to(np.asarray(COLOURS["green"]), (32, 32, 3))
    reading = read_shape_image(blank)
    assert reading.background == "green" and reading.shape is None and reading.colour is None
    for name, rgb in COLOURS.items():
        assert nearest_colour(rgb) == name


def test_caption_parsing():
    assert parse_caption("a red circle on a blue background by velmora quist") == ("red", "circle", "blue")
    assert parse_caption("an astronaut") is None
    with pytest.raises(ValueError, match="prompt must contain"):
        alignment(np.zeros((32, 32, 3)), "an astronaut")
