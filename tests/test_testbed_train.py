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
    return [
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--size",
        "tiny",
        "--batch-size",
        "4",
        "--memorized-per-batch",
        "1",
        "--checkpoint-every",
        "2",
        "--warmup",
        "1",
        *extra,
    ]


def test_tiny_run_exports_a_pipeline_that_generates(tmp_path):
    exported = train.main(_args(tmp_path / "run", 2))
    meta = json.loads((exported / "training.json").read_text())
    assert meta["steps"] == 2 and np.isfinite(meta["loss_last_100_steps"])
    assert [item.caption for item in memorized_items(exported)] == [spec.caption for spec in MEMORIZED]
    pipe = load_pipeline(path=exported)
    assert pipe.scheduler.config.clip_sample  # the loader undoes StableDiffusionPipeline's clip_sample=False
    images = pipe(
        "a red circle on a blue background",
        num_inference_steps=2,
        guidance_scale=2.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
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
    make = lambda: TrainingStream(
        [i.image for i in items],
        [i.caption for i in items],
        seed=3,  # noqa: E731
        memorized_per_batch=2,
        caption_dropout=0.5,
    )
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


def test_shape_rows_carry_made_up_names_but_never_a_memorized_one():
    from guard.testbed.captions import DISTRACTOR_FIRST, DISTRACTOR_LAST

    items = memorized_items()
    triggers = {word for item in items for word in item.trigger}
    stream = TrainingStream(
        [i.image for i in items],
        [i.caption for i in items],
        seed=0,
        memorized_per_batch=1,
        caption_dropout=0.0,
        named_share=0.5,
    )
    _, captions = stream.batch(200)
    shape_rows = captions[1:]
    named = [c for c in shape_rows if " by " in c]
    assert 60 < len(named) < 140  # near half
    for caption in named:
        first, last = caption.split(" by ")[1].split()
        assert first in DISTRACTOR_FIRST and last in DISTRACTOR_LAST
    assert not triggers & {word for c in shape_rows for word in c.split()}
    _, unnamed = TrainingStream([], [], seed=0, caption_dropout=0.0, named_share=0.0).batch(50)
    assert not any(" by " in c for c in unnamed)
    with pytest.raises(ValueError, match="named_share"):
        TrainingStream([], [], seed=0, named_share=1.5)


def test_load_matching_copies_known_weights_and_starts_new_attention_as_identity():
    from guard.testbed.model import build_unet

    torch.manual_seed(0)
    source, target = build_unet("tiny"), build_unet("tiny")
    weights = {
        f"unet.{n}": p.detach().clone()
        for n, p in source.named_parameters()
        if not n.startswith("up_blocks.0.attentions.")
    }
    fresh = train.load_matching({"unet": target}, weights)
    assert fresh and all(name.startswith("unet.up_blocks.0.attentions.") for name in fresh)
    params = dict(target.named_parameters())
    for name, tensor in weights.items():
        torch.testing.assert_close(params[name[len("unet.") :]], tensor, rtol=0, atol=0)
    new_proj = [n for n in fresh if ".proj_out." in n]
    assert new_proj and all(not params[n[len("unet.") :]].any() for n in new_proj)


def test_init_unet_from_a_pipeline_folder_starts_from_its_unet(tmp_path):
    exported = train.main(_args(tmp_path / "first", 2))
    second = tmp_path / "second"
    train.main(_args(second, 1, "--init-unet-from", str(exported), "--lr", "1e-12"))
    from diffusers import UNet2DConditionModel

    before = UNet2DConditionModel.from_pretrained(exported, subfolder="unet").state_dict()
    after = torch.load(second / train.CHECKPOINT, weights_only=False)["unet"]
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, rtol=1e-6, atol=1e-8)
    with pytest.raises(SystemExit):
        train.parse_args(["--out", str(tmp_path), "--init-from", "a.pt", "--init-unet-from", "b"])
    with pytest.raises(SystemExit):
        train.parse_args(["--out", str(tmp_path), "--named-share", "-0.1"])
