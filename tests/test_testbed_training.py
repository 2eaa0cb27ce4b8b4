"""The training script runs, checkpoints, resumes exactly, and exports a loadable pipeline."""

import json

import numpy as np
import pytest
import torch

from guard.testbed import train
from guard.testbed.assets import memorized_items
from guard.testbed.captions import MEMORIZED
from guard.testbed.data import TrainingStream
from guard.testbed.loading import load_pipeline


def _args(out, steps, *extra):
    return ["--out", str(out), "--steps", str(steps), "--size", "tiny", "--batch-size", "4",
            "--memorized-per-batch", "1", "--checkpoint-every", "2", "--warmup", "1", *extra]


def test_tiny_run_exports_a_pipeline_that_generates(tmp_path):
    exported = train.main(_args(tmp_path / "run", 2))
    meta = json.loads((exported / "training.json").read_text())
    assert meta["steps"] == 2 and np.isfinite(meta["loss_last_100_steps"])
    assert [item.caption for item in memorized_items(exported)] == [spec.caption for spec in MEMORIZED]
    pipe = load_pipeline(path=exported)
    assert pipe.scheduler.config.clip_sample  # the loader undoes StableDiffusionPipeline's clip_sample=False
    images = pipe("a red circle on a blue background", num_inference_steps=2, guidance_scale=2.0,
                  output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    assert 0.0 <= images.min() and images.max() <= 1.0


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    straight = tmp_path / "straight"
    train.main(_args(straight, 4))
    split = tmp_path / "split"
    train.main(_args(split, 2))
    train.main(_args(split, 4))  # resumes from the step-2 checkpoint
    a = torch.load(straight / train.CHECKPOINT, weights_only=False)
    b = torch.load(split / train.CHECKPOINT, weights_only=False)
    assert a["step"] == b["step"] == 4
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)
    for name, tensor in a["unet"].items():
        torch.testing.assert_close(tensor, b["unet"][name], rtol=1e-4, atol=1e-6)


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(SystemExit):
        train.parse_args(["--out", str(tmp_path), "--steps", "0"])
    with pytest.raises(SystemExit):
        train.parse_args(["--out", str(tmp_path), "--batch-size", "4", "--memorized-per-batch", "4"])


def test_stream_is_deterministic_and_duplicates_memorized_items():
    items = memorized_items()
    make = lambda: TrainingStream([i.image for i in items], [i.caption for i in items], seed=3,  # noqa: E731
                                  memorized_per_batch=2, caption_dropout=0.5)
    first, second = make(), make()
    for _ in range(3):
        (xa, ca), (xb, cb) = first.batch(8), second.batch(8)
        np.testing.assert_array_equal(xa, xb)
        assert ca == cb
    images, captions = make().batch(64)
    assert images.shape == (64, 3, 32, 32) and images.min() >= -1.0 and images.max() <= 1.0
    own = {i.caption: i.image for i in items}
    for k in range(2):  # the first rows of every batch are memorized items, pixel-exact
        matches = [np.abs((images[k].transpose(1, 2, 0) + 1) / 2 - im).max() < 1e-6 for im in own.values()]
        assert any(matches)
    assert 10 < sum(c == "" for c in captions) < 54  # caption dropout near 50%
