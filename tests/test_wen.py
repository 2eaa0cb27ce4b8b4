"""guard.wen: Wen et al.'s embedding optimisation against its released rule, and the "wen" method end to end."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from sampler_utils import PROMPTS, initial_latents, relative_error, tiny_components

from guard.config import GuardConfig
from guard.pipeline import StableDiffusionGuardPipeline

STEPS = 3
IMAGES = 2


@pytest.fixture(scope="module")
def pipes():
    components = tiny_components()
    stock, guard = StableDiffusionPipeline(**components), StableDiffusionGuardPipeline(**components)
    for pipe in (stock, guard):
        pipe.set_progress_bar_config(disable=True)
    return stock, guard


def released_rule(pipe, prompt, latents, lr, iterations, target):
    """The released ``aug_prompt`` for one prompt, written out: AdamW on the conditional embedding at the
    first step, the check against the target before each update, BOS's gradient zeroed."""
    negative, positive = pipe.encode_prompt(prompt, "cpu", IMAGES, True)[::-1]
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    t = scheduler.timesteps[0]
    x = scheduler.scale_model_input(torch.cat([latents * scheduler.init_noise_sigma] * 2), t)
    single = positive[[0]].clone().detach().requires_grad_(True)
    optimizer = torch.optim.AdamW([single], lr=lr)
    losses = []
    for _ in range(iterations):
        with torch.enable_grad():
            states = torch.cat([negative[[0]].repeat(IMAGES, 1, 1), single.repeat(IMAGES, 1, 1)])
            eps_u, eps_c = pipe.unet(x, t, encoder_hidden_states=states).sample.chunk(2)
            loss = torch.norm(eps_c - eps_u, p=2)
            losses.append(loss.item())
            if loss.item() <= target:
                break
            (single.grad,) = torch.autograd.grad(loss, [single])
        single.grad[:, [0]] = 0
        optimizer.step()
        optimizer.zero_grad()
    return single.detach().repeat(IMAGES, 1, 1), negative, losses


@torch.no_grad()
def test_the_wen_method_follows_the_released_rule_prompt_by_prompt_in_one_batch(pipes):
    stock, guard = pipes
    latents = initial_latents(len(PROMPTS) * IMAGES)
    # A target between the prompts' first losses: one stops before any update, the other does not.
    first = [released_rule(stock, p, latents[i * IMAGES : (i + 1) * IMAGES], 0.05, 1, 0.0)[2][0] for i, p in
             enumerate(PROMPTS)]  # fmt: skip
    target = sum(first) / 2
    config = GuardConfig.preset("wen", wen_iterations=4, wen_target_loss=target)
    out = guard(list(PROMPTS), latents=latents, num_images_per_prompt=IMAGES, num_inference_steps=STEPS,
                output_type="latent", guard_config=config)  # fmt: skip
    record = out.report.embedding_optimization
    for i, prompt in enumerate(PROMPTS):
        rows = slice(i * IMAGES, (i + 1) * IMAGES)
        embeds, negative, losses = released_rule(stock, prompt, latents[rows], 0.05, 4, target)
        assert record.losses[i] == pytest.approx(losses, rel=1e-4)
        expected = stock(prompt_embeds=embeds, negative_prompt_embeds=negative, latents=latents[rows],
                         num_inference_steps=STEPS, output_type="latent").images  # fmt: skip
        assert relative_error(out.images[rows], expected) <= 1e-4
    assert min(record.updates) == 0 and max(record.updates) > 0
    plain = stock(list(PROMPTS), latents=latents, num_images_per_prompt=IMAGES, num_inference_steps=STEPS,
                  output_type="latent").images  # fmt: skip
    assert relative_error(out.images, plain) > 1e-3  # the optimisation changed what was drawn
    assert "Wen et al.'s embedding optimisation" in out.report.summary()


def test_wen_settings_are_validated():
    with pytest.raises(ValueError, match="wen_iterations must be a non-negative integer"):
        GuardConfig.preset("wen", wen_iterations=-1)
    with pytest.raises(ValueError, match="wen_learning_rate must be >= 0"):
        GuardConfig.preset("wen", wen_learning_rate=-0.1)
