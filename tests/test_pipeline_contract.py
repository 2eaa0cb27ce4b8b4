"""StableDiffusionGuardPipeline keeps StableDiffusionPipeline's contract (the checks of diffusers'
PipelineTesterMixin that apply), with the ``cfg`` preset equal to the parent where it is meant to be.

What differs by design under GUARD is listed in docs/diffusers_contract.md; each point has a test here.
"""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.callbacks import SDCFGCutoffCallback
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from sampler_utils import PROMPTS, initial_latents, relative_error, tiny_components, tiny_ip_adapter

from guard.config import GuardConfig
from guard.pipeline import StableDiffusionGuardPipeline

STEPS = 4
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def pipes():
    components = tiny_components()
    stock = StableDiffusionPipeline(**components)
    guard = StableDiffusionGuardPipeline(**components)
    for pipe in (stock, guard):
        pipe.set_progress_bar_config(disable=True)
    return stock, guard


def call(pipe, **kwargs):
    kwargs.setdefault("prompt", list(PROMPTS))
    kwargs.setdefault("latents", initial_latents(2 * kwargs.get("num_images_per_prompt", 1)))
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "latent")
    if isinstance(pipe, StableDiffusionGuardPipeline):
        kwargs.setdefault("guard_config", "cfg")
    return pipe(**kwargs)


def test_outputs_and_return_dict_false_have_the_parents_shapes(pipes):
    stock, guard = pipes
    out = call(guard)
    assert isinstance(out, StableDiffusionPipelineOutput) and out.report is not None
    images, nsfw = call(guard, return_dict=False)
    assert torch.equal(images, out.images) and nsfw is None
    assert guard.guard_report.prompts == list(PROMPTS)
    parent_images, parent_nsfw = call(stock, return_dict=False)
    assert relative_error(images, parent_images) <= TOLERANCE and parent_nsfw is None


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_cfg_equals_the_parent_with_guidance_rescale(pipes, rescale):
    stock, guard = pipes
    expected = call(stock, guidance_rescale=rescale).images
    assert relative_error(call(guard, guidance_rescale=rescale).images, expected) <= TOLERANCE
    if rescale:
        assert relative_error(expected, call(stock).images) > 1e-3  # the rescale does something
    with pytest.raises(ValueError, match="guidance_rescale must be <= 1"):
        call(guard, guidance_rescale=1.5)


def test_guard_with_guidance_rescale_rescales_against_the_plain_prompt(pipes):
    _, guard = pipes
    plain = call(guard, guard_config=GuardConfig()).images
    rescaled = call(guard, guard_config=GuardConfig(), guidance_rescale=0.7).images
    assert relative_error(rescaled, plain) > 1e-3 and torch.isfinite(rescaled).all()


def test_callbacks_that_change_guidance_work_as_in_the_parent(pipes):
    stock, guard = pipes

    def stronger(pipeline, step, timestep, tensors):  # diffusers' test_callback_cfg: the scale grows each step
        pipeline._guidance_scale += 1.0
        return tensors

    expected = call(stock, callback_on_step_end=stronger).images
    assert relative_error(call(guard, callback_on_step_end=stronger).images, expected) <= TOLERANCE
    assert guard.guidance_scale == stock.guidance_scale == 7.5 + STEPS

    # diffusers' SDCFGCutoffCallback switches guidance off half way (one image: the parent's assumption).
    cutoff = dict(prompt=PROMPTS[0], latents=initial_latents(1))
    expected = call(stock, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5), **cutoff).images
    for config in ("cfg", GuardConfig()):
        got = call(
            guard, guard_config=config, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5), **cutoff
        )
        # The callback runs after step STEPS // 2: the steps after it are unguided, as in the parent.
        unguided = STEPS - STEPS // 2 - 1
        assert got.report.num_steps == STEPS and got.report.repulsion_weights[STEPS - unguided :] == [0.0] * unguided
        if config == "cfg":
            assert relative_error(got.images, expected) <= TOLERANCE


def test_the_deprecated_callback_is_called_as_in_the_parent(pipes):
    stock, guard = pipes
    seen = {"stock": [], "guard": []}
    for name, pipe in (("stock", stock), ("guard", guard)):
        with pytest.warns(FutureWarning):
            call(pipe, callback=lambda step, t, latents, seen=seen[name]: seen.append((step, int(t))), callback_steps=2)
    assert seen["guard"] == seen["stock"] and len(seen["guard"]) == STEPS // 2
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        call(guard, denoising_strength=0.5)


def test_ip_adapter_embeddings_work_and_cfg_equals_the_parent():
    components = tiny_components()
    components["unet"]._load_ip_adapter_weights([tiny_ip_adapter(components["unet"])], low_cpu_mem_usage=False)
    stock, guard = StableDiffusionPipeline(**components), StableDiffusionGuardPipeline(**components)
    embeds, others = ([torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(seed))] for seed in (4, 5))
    expected = call(stock, ip_adapter_image_embeds=embeds).images  # each cat([negative, positive]) per adapter
    assert relative_error(expected, call(stock, ip_adapter_image_embeds=others).images) > 1e-3  # the images matter
    assert relative_error(call(guard, ip_adapter_image_embeds=embeds).images, expected) <= TOLERANCE
    # GUARD without repulsion and with spike factor 1 is CFG computed through GUARD's processor,
    # image tokens included: it must equal the parent with the adapter.
    as_cfg = GuardConfig(repulsion_scale=0.0, spike_scale=1.0)
    assert relative_error(call(guard, guard_config=as_cfg, ip_adapter_image_embeds=embeds).images, expected) <= 1e-4
    with_guard = call(guard, guard_config=GuardConfig(), ip_adapter_image_embeds=embeds)
    assert with_guard.report.layer_names and torch.isfinite(with_guard.images).all()
    other_images = call(guard, guard_config=GuardConfig(), ip_adapter_image_embeds=others).images
    assert relative_error(with_guard.images, other_images) > 1e-3  # GUARD keeps the adapter's part

    def unprompted(pipeline, step, timestep, tensors):  # replaces the text only; the image embeddings stay
        return {"prompt_embeds": torch.zeros_like(tensors["prompt_embeds"])}

    kwargs = dict(callback_on_step_end=unprompted, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    expected = call(stock, ip_adapter_image_embeds=embeds, **kwargs).images
    assert relative_error(call(guard, ip_adapter_image_embeds=embeds, **kwargs).images, expected) <= TOLERANCE


def test_attention_slicing_and_components(pipes):
    stock, guard = pipes
    plain = call(guard, guard_config=GuardConfig()).images
    guard.enable_attention_slicing(1)  # SlicedAttnProcessor: GUARD replaces it like SDPA
    try:
        sliced = call(guard, guard_config=GuardConfig()).images
    finally:
        guard.disable_attention_slicing()
    assert relative_error(sliced, plain) <= 1e-4
    assert set(guard.components) == set(stock.components)
    assert isinstance(StableDiffusionGuardPipeline.from_pipe(stock), StableDiffusionGuardPipeline)


def test_batched_prompts_and_images_equal_single_ones(pipes):
    _, guard = pipes
    batched = call(guard, guard_config=GuardConfig(), num_images_per_prompt=2)
    for p, prompt in enumerate(PROMPTS):
        single = call(guard, guard_config=GuardConfig(), prompt=prompt, latents=initial_latents(4)[2 * p : 2 * p + 2],
                      num_images_per_prompt=2)  # fmt: skip
        assert relative_error(single.images, batched.images[2 * p : 2 * p + 2]) <= 1e-4
