"""The shipped testbed: loads offline, generates, memorizes under CFG, and copies less under GUARD."""

import json

import numpy as np
import pytest
import torch

from guard.config import GuardConfig
from guard.pipeline import StableDiffusionGuardPipeline
from guard.testbed import default_guard_config, load_pipeline, memorized_items, plain_prompts
from guard.testbed.assets import WEIGHTS_DIR
from guard.testbed.defaults import copy_threshold
from guard.testbed.metrics import alignment, ssim
from guard.testbed.pixel_vae import PixelIdentityVAE

STEPS = 12  # few DDIM steps: the test budget; the copies survive it (checked against 20-25 steps)
SEEDS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(pipeline_class=StableDiffusionGuardPipeline)


def _samples(pipe, prompt, config):
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    return pipe(
        prompt,
        num_inference_steps=STEPS,
        num_images_per_prompt=len(SEEDS),
        generator=generators,
        guard_config=config,
        output_type="np",
    ).images


def test_shipped_files_are_complete_and_load_offline(pipe):
    index = json.loads((WEIGHTS_DIR / "model_index.json").read_text())
    assert index["vae"] == ["guard.testbed.pixel_vae", "PixelIdentityVAE"]
    assert isinstance(pipe.vae, PixelIdentityVAE) and pipe.vae_scale_factor == 1
    assert pipe.scheduler.config.clip_sample or pipe.scheduler.config.thresholding
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    names = [n for n, _ in pipe.unet.named_modules() if n.endswith("attn2")]
    assert sorted({n.split(".attentions")[0] for n in names}) == [
        "down_blocks.0",
        "down_blocks.1",
        "down_blocks.2",
        "mid_block",
        "up_blocks.0",
        "up_blocks.1",
    ]
    assert pipe.text_encoder.config.num_hidden_layers == 0  # each text position carries its own word only
    assert len(memorized_items()) == 5 and len(plain_prompts()) == 90
    assert isinstance(default_guard_config(), GuardConfig) and 0 < copy_threshold() < 1


def test_plain_pipeline_generates_in_range():
    plain = load_pipeline()
    image = plain(
        "a red circle on a blue background",
        num_inference_steps=4,
        output_type="np",
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    assert image.min() >= 0.0 and image.max() <= 1.0


def _own_ssim(pipe, items, config):
    return np.concatenate([ssim(_samples(pipe, item.caption, config), item.image) for item in items])


def test_memorized_captions_copy_under_cfg(pipe):
    default = default_guard_config()
    own = _own_ssim(pipe, memorized_items()[:2], GuardConfig(method="cfg", guidance_scale=default.guidance_scale))
    assert (own > copy_threshold()).mean() >= 0.75, own  # lands on its own training image for most seeds


def test_guard_at_the_shipped_default_copies_markedly_less_and_keeps_the_caption(pipe):
    default = default_guard_config()
    items = memorized_items()
    cfg = GuardConfig(method="cfg", guidance_scale=default.guidance_scale)
    cfg_own, guard_own = _own_ssim(pipe, items, cfg), _own_ssim(pipe, items, default)
    threshold = copy_threshold()
    assert (guard_own > threshold).mean() <= (cfg_own > threshold).mean() - 0.4, (cfg_own, guard_own)
    assert guard_own.mean() < cfg_own.mean() - 0.3, (cfg_own, guard_own)
    # The captions' content stays (shape caption right in 65% here; CFG: 77-80% in docs/testbed_efficacy.md).
    aligned = [
        alignment(image, item.caption)["all_ok"] for item in items for image in _samples(pipe, item.caption, default)
    ]
    assert np.mean(aligned) >= 0.55, aligned


def test_published_guard_breaks_the_copies(pipe):
    """GUARD's published setting (tau = 0.1, r = 2) pushes samples off the training image too, at a
    cost in alignment this small model cannot afford (see docs/testbed_efficacy.md)."""
    default = default_guard_config()
    items = memorized_items()[:2]
    cfg_own = _own_ssim(pipe, items, GuardConfig(method="cfg", guidance_scale=default.guidance_scale))
    guard_own = _own_ssim(pipe, items, GuardConfig(guidance_scale=default.guidance_scale, repulsion_scale=2.0))
    threshold = copy_threshold()
    assert (guard_own > threshold).mean() <= (cfg_own > threshold).mean() - 0.5, (cfg_own, guard_own)
    assert guard_own.mean() < cfg_own.mean() - 0.3, (cfg_own, guard_own)


def test_shipped_default_is_the_sweep_choice_and_leaves_plain_prompts_alone(pipe):
    default = default_guard_config()
    assert default.method == "guard" and default.repulsion_scale < default.guidance_scale
    record = json.loads((WEIGHTS_DIR / "guard_default.json").read_text())
    assert "alignment" in record["reason"] and record["copy_threshold"] == copy_threshold()
    prompts = plain_prompts(6)
    aligned = {}
    for config in (GuardConfig(method="cfg", guidance_scale=default.guidance_scale), default):
        checks = [alignment(image, prompt) for prompt in prompts for image in _samples(pipe, prompt, config)]
        assert np.mean([c["background_ok"] for c in checks]) >= 0.85, (config.method, checks)
        aligned[config.method] = np.mean([c["all_ok"] for c in checks])
    assert aligned["cfg"] >= 0.9 and aligned["guard"] >= aligned["cfg"] - 0.15, aligned


def test_the_memorization_gate_sends_plain_prompts_to_cfg_and_memorized_ones_to_guard(pipe):
    default = default_guard_config()
    if default.gate_threshold is None:
        pytest.fail("the shipped default has no memorization gate; this test describes the gated default")
    memorized = [item.caption for item in memorized_items()[:2]]
    plain = plain_prompts(2)
    gates = {}
    for kind, prompts in (("memorized", memorized), ("plain", plain)):
        generators = [torch.Generator().manual_seed(s) for _ in prompts for s in SEEDS]
        report = pipe(
            prompts,
            num_inference_steps=1,
            num_images_per_prompt=len(SEEDS),
            generator=generators,
            guard_config=default,
            output_type="latent",
        ).report
        gates[kind] = report.cleared.float().mean().item()
    assert gates["plain"] >= 0.75 and gates["memorized"] <= 0.4, gates
