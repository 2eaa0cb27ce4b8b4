"""StableDiffusionXLGuardPipeline on a tiny SDXL-shaped pipeline: the parent's contract under the
``cfg`` preset, GUARD against an independent eager loop with SDXL's added conditioning, the
paper's blocks on SDXL's layout, and the SDXL-specific inputs."""

import copy
import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline
from diffusers.callbacks import SDXLCFGCutoffCallback
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from sampler_utils import (
    PROMPTS,
    EagerSpikeAttention,
    initial_latents,
    relative_error,
    run_together,
    tiny_ip_adapter,
    tiny_sdxl_components,
)

import guard
import guard.detection
from guard.config import PRESETS, GuardConfig
from guard.pipeline_sdxl import GuardXLPipelineOutput, StableDiffusionXLGuardPipeline

STEPS = 3
TOLERANCE = 1e-5  # relative error of float32 final latents
SIZE = 16  # pixels: the tiny UNet's 8x8 latents times the VAE's factor 2
#: SDXL's default blocks on the tiny layout: every transformer layer of down_blocks.1, .2 and mid_block.
EXPECTED_LAYERS = tuple(
    f"{block}.attentions.0.transformer_blocks.{layer}.attn2"
    for block in ("down_blocks.1", "down_blocks.2", "mid_block")
    for layer in (0, 1)
)


@pytest.fixture(scope="module")
def pipes():
    components = tiny_sdxl_components()
    stock = StableDiffusionXLPipeline(**components)
    guarded = StableDiffusionXLGuardPipeline(**components)
    for pipe in (stock, guarded):
        pipe.set_progress_bar_config(disable=True)
    return stock, guarded, components


def call(pipe, **kwargs):
    kwargs.setdefault("prompt", list(PROMPTS))
    if "latents" not in kwargs:
        prompts = 1 if isinstance(kwargs["prompt"], str) else len(kwargs["prompt"])
        kwargs["latents"] = initial_latents(prompts * kwargs.get("num_images_per_prompt", 1))
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "latent")
    if isinstance(pipe, StableDiffusionXLGuardPipeline):
        kwargs.setdefault("guard_config", "cfg")
    else:
        kwargs.setdefault("guidance_scale", 7.5)  # GuardConfig's scale (the parent's default is 5.0)
    return pipe(**kwargs)


# ----------------------------------------------------------------------------------------------
# An independent eager GUARD on SDXL: both text encoders' penultimate layers concatenated, the
# second's pooled projection and the size ids as added conditioning, per branch.


def _encode_sdxl(components, texts):
    ids = components["tokenizer"](texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    first = components["text_encoder"](ids.input_ids, output_hidden_states=True)
    second = components["text_encoder_2"](ids.input_ids, output_hidden_states=True)
    return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second.text_embeds


@torch.no_grad()
def eager_sdxl_guard_latents(components, prompts, latents, num_steps, *, negative_prompts=None, size=SIZE,
                             negative_size=None, s=7.5, r=2.0, tau=0.1, alpha=0.3,
                             blocks=("down_blocks.1", "down_blocks.2", "mid_block")):  # fmt: skip
    """GUARD's three branches on SDXL, one image per prompt: unconditional (negative text, pooled
    and size ids; zeros for an absent negative prompt, as SDXL base's force_zeros_for_empty_prompt),
    attenuated prompt, plain prompt."""
    unet = components["unet"]
    scheduler = type(components["scheduler"]).from_config(components["scheduler"].config)
    n = len(prompts)
    cond, pooled = _encode_sdxl(components, list(prompts))
    if negative_prompts is None:
        uncond, uncond_pooled = torch.zeros_like(cond), torch.zeros_like(pooled)
    else:
        uncond, uncond_pooled = _encode_sdxl(components, list(negative_prompts))
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * n, dtype=torch.float32)
    ns = negative_size or size
    negative_time_ids = torch.tensor([[ns, ns, 0, 0, ns, ns]] * n, dtype=torch.float32)
    states = torch.cat([uncond, cond, cond])
    added = {
        "text_embeds": torch.cat([uncond_pooled, pooled, pooled]),
        "time_ids": torch.cat([negative_time_ids, time_ids, time_ids]),
    }
    rows = torch.tensor([False] * n + [True] * n + [False] * n)
    originals = dict(unet.attn_processors)
    processors = {}
    for key, processor in originals.items():
        name = key[: -len(".processor")]
        chosen = name.endswith("attn2") and any(name == p or name.startswith(p + ".") for p in blocks)
        processors[key] = EagerSpikeAttention(rows, tau, alpha) if chosen else processor
    eager = {k[: -len(".processor")]: p for k, p in processors.items() if isinstance(p, EagerSpikeAttention)}
    unet.set_attn_processor(dict(processors))
    try:
        scheduler.set_timesteps(num_steps)
        x = latents * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps):
            model_input = scheduler.scale_model_input(torch.cat([x] * 3), t)
            eps = unet(model_input, t, encoder_hidden_states=states, added_cond_kwargs=added).sample
            eps_u, eps_pos, eps_neg = eps[:n], eps[n : 2 * n], eps[2 * n :]
            w_neg = r * math.cos(math.pi / 2 * i / num_steps)
            x = scheduler.step(eps_u + s * (eps_pos - eps_u) - w_neg * (eps_neg - eps_u), t, x).prev_sample
    finally:
        unet.set_attn_processor(originals)
    return x, {name: processor.flags[n : 2 * n] for name, processor in eager.items()}


def test_guard_matches_the_eager_reference_with_sdxl_conditioning(pipes):
    _, pipe, components = pipes
    negatives = ["black", "a white square"]
    out = call(pipe, guard_config=GuardConfig(), negative_prompt=negatives,
               negative_original_size=(8, 8), negative_target_size=(8, 8))  # fmt: skip
    expected, flags = eager_sdxl_guard_latents(
        components, PROMPTS, initial_latents(2), STEPS, negative_prompts=negatives, negative_size=8
    )
    assert relative_error(out.images, expected) <= 1e-4
    assert out.report.layer_names == EXPECTED_LAYERS and set(flags) == set(EXPECTED_LAYERS)
    for index, name in enumerate(out.report.layer_names):
        assert torch.equal(out.report.flag_counts[:, index], flags[name])
    # Without the negative inputs: zeros for the unconditional text and pooled embedding.
    plain = call(pipe, guard_config=GuardConfig())
    expected, _ = eager_sdxl_guard_latents(components, PROMPTS, initial_latents(2), STEPS)
    assert relative_error(plain.images, expected) <= 1e-4
    assert relative_error(plain.images, out.images) > 1e-3
    assert relative_error(plain.images, call(pipe).images) > 1e-3  # GUARD is not CFG here


def test_the_spike_rule_reaches_every_layer_of_the_papers_blocks_and_no_other(pipes):
    _, pipe, _ = pipes
    attn2 = [name for name, _ in pipe.unet.named_modules() if name.endswith("attn2")]
    assert any(name.startswith("up_blocks.") for name in attn2) and not any("down_blocks.0" in n for n in attn2)
    out = call(pipe, guard_config=GuardConfig())
    assert out.report.layer_names == EXPECTED_LAYERS  # 2 transformer layers in each block, all attenuated
    assert all(out.report.flag_counts[:, i].sum() > 0 for i in range(len(EXPECTED_LAYERS)))
    one = "down_blocks.2.attentions.0.transformer_blocks.1"  # a single transformer layer by prefix
    assert call(pipe, guard_config=GuardConfig(blocks=(one,))).report.layer_names == (one + ".attn2",)


def test_blocks_that_match_nothing_give_a_clear_error(pipes):
    _, pipe, _ = pipes
    with pytest.raises(ValueError, match=r"'down_blocks\.0' matches no cross-attention \(attn2\) module"):
        call(pipe, guard_config=GuardConfig(blocks=("down_blocks.0",)))


# ----------------------------------------------------------------------------------------------
# cfg is the parent


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"guidance_rescale": 0.7},
        {"denoising_end": 0.6},
        {  # negative_prompt_2 counts only with a negative_prompt: without one SDXL base zeroes the negative
            "prompt_2": ["a blue square", "a yellow circle"],
            "negative_prompt": ["red", "green"],
            "negative_prompt_2": ["black", "white"],
        },
        {"clip_skip": 1},
        {"original_size": (32, 24), "crops_coords_top_left": (2, 4), "target_size": (16, 8)},
        # one image: the parent repeats cat([negative, positive]) time ids per image, right for one only
        {
            "prompt": PROMPTS[0],
            "negative_original_size": (8, 8),
            "negative_crops_coords_top_left": (1, 1),
            "negative_target_size": (12, 12),
        },
        {"num_images_per_prompt": 2},
    ],
    ids=["plain", "rescale", "denoising_end", "prompt_2", "clip_skip", "sizes", "negative_sizes", "images"],
)
def test_cfg_equals_the_parent(pipes, kwargs):
    stock, pipe, _ = pipes
    expected = call(stock, **kwargs).images
    assert relative_error(call(pipe, **kwargs).images, expected) <= TOLERANCE
    baseline = {key: value for key, value in kwargs.items() if key in ("prompt", "num_images_per_prompt")}
    if baseline != kwargs:  # the input does something
        assert relative_error(expected, call(stock, **baseline).images) > 1e-4


def test_cfg_equals_the_parent_from_a_seed_decoded(pipes):
    stock, pipe, _ = pipes
    for output_type in ("np", "pt"):
        expected = call(stock, latents=None, generator=torch.Generator().manual_seed(7), output_type=output_type)
        got = call(pipe, latents=None, generator=torch.Generator().manual_seed(7), output_type=output_type)
        np.testing.assert_allclose(np.asarray(got.images), np.asarray(expected.images), rtol=1e-6, atol=1e-6)
    assert got.images.shape == (2, 3, SIZE, SIZE)


@pytest.mark.parametrize("scheduler_cls", [EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_other_schedulers(scheduler_cls):
    components = tiny_sdxl_components()
    components["scheduler"] = scheduler_cls.from_config(components["scheduler"].config)
    stock, pipe = StableDiffusionXLPipeline(**components), StableDiffusionXLGuardPipeline(**components)
    assert relative_error(call(pipe).images, call(stock).images) <= TOLERANCE
    assert torch.isfinite(call(pipe, guard_config=GuardConfig()).images).all()


def test_denoising_end_runs_the_first_steps_of_the_full_run(pipes):
    _, pipe, _ = pipes
    seen = {}

    def record(pipeline, step, timestep, tensors):
        seen[step] = tensors["latents"].clone()
        return {}

    call(pipe, guard_config=GuardConfig(), num_inference_steps=4, callback_on_step_end=record)
    cut = call(pipe, guard_config=GuardConfig(), num_inference_steps=4, denoising_end=0.5)
    assert cut.report.num_steps == 2 and relative_error(cut.images, seen[1]) <= 1e-6
    with pytest.raises(ValueError, match="denoising_end must be <= 1"):
        call(pipe, denoising_end=1.5)


# ----------------------------------------------------------------------------------------------
# Outputs, batching, presets, callbacks, loading


def test_outputs_and_return_dict_false_have_the_parents_shapes(pipes):
    stock, pipe, _ = pipes
    out = call(pipe, guard_config=GuardConfig())
    assert isinstance(out, GuardXLPipelineOutput) and isinstance(out, StableDiffusionXLPipelineOutput)
    assert out.report is not None and out.report.prompts == list(PROMPTS)
    result = call(pipe, guard_config=GuardConfig(), return_dict=False)
    parent = call(stock, return_dict=False)
    assert isinstance(result, tuple) and len(result) == len(parent) == 1
    assert torch.equal(result[0], out.images) and pipe.guard_report.num_steps == STEPS
    pil = call(pipe, output_type="pil").images
    assert len(pil) == 2 and pil[0].size == (SIZE, SIZE)
    assert guard.StableDiffusionXLGuardPipeline is StableDiffusionXLGuardPipeline
    assert guard.GuardXLPipelineOutput is GuardXLPipelineOutput


def test_batched_prompts_and_images_equal_single_ones(pipes):
    _, pipe, _ = pipes
    latents = initial_latents(4, seed=3)
    batched = call(pipe, guard_config=GuardConfig(), latents=latents, num_images_per_prompt=2)
    for p, prompt in enumerate(PROMPTS):
        single = call(pipe, guard_config=GuardConfig(), prompt=[prompt], latents=latents[2 * p : 2 * p + 2],
                      num_images_per_prompt=2)  # fmt: skip
        assert relative_error(single.images, batched.images[2 * p : 2 * p + 2]) <= 1e-5
        assert torch.equal(batched.report.flag_counts[p], single.report.flag_counts[0])


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs(pipes, preset):
    _, pipe, _ = pipes
    out = call(pipe, guard_config=preset, num_inference_steps=2)
    assert out.images.shape == (2, 4, 8, 8) and torch.isfinite(out.images).all()
    assert out.report.num_steps == 2 and out.report.config == GuardConfig.preset(preset)
    if GuardConfig.preset(preset).attenuates:
        assert out.report.layer_names == EXPECTED_LAYERS


def test_wen_optimises_each_prompt_as_on_its_own(pipes):
    _, pipe, _ = pipes
    config = GuardConfig.preset("wen", wen_target_loss=0.0, wen_iterations=2)
    batched = call(pipe, guard_config=config, num_inference_steps=2)
    assert batched.report.embedding_optimization.updates == [2, 2]
    for p, prompt in enumerate(PROMPTS):
        single = call(pipe, guard_config=config, prompt=[prompt], latents=initial_latents(2)[p : p + 1],
                      num_inference_steps=2)  # fmt: skip
        assert relative_error(single.images, batched.images[p : p + 1]) <= 1e-4


def test_ip_adapter_embeddings_work_and_cfg_equals_the_parent():
    components = tiny_sdxl_components()
    components["unet"]._load_ip_adapter_weights([tiny_ip_adapter(components["unet"])], low_cpu_mem_usage=False)
    stock, pipe = StableDiffusionXLPipeline(**components), StableDiffusionXLGuardPipeline(**components)
    embeds, others = ([torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(seed))] for seed in (4, 5))
    expected = call(stock, ip_adapter_image_embeds=embeds).images  # each cat([negative, positive]) per adapter
    assert relative_error(expected, call(stock, ip_adapter_image_embeds=others).images) > 1e-3
    assert relative_error(call(pipe, ip_adapter_image_embeds=embeds).images, expected) <= TOLERANCE
    as_cfg = GuardConfig(repulsion_scale=0.0, spike_scale=1.0)  # GUARD's processor, image tokens included
    assert relative_error(call(pipe, guard_config=as_cfg, ip_adapter_image_embeds=embeds).images, expected) <= 1e-4
    with_guard = call(pipe, guard_config=GuardConfig(), ip_adapter_image_embeds=embeds)
    assert with_guard.report.layer_names == EXPECTED_LAYERS and torch.isfinite(with_guard.images).all()

    def unprompted(pipeline, step, timestep, tensors):  # replaces the text only; the image embeddings stay
        return {"prompt_embeds": torch.zeros_like(tensors["prompt_embeds"])}

    kwargs = dict(callback_on_step_end=unprompted, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    assert relative_error(call(pipe, ip_adapter_image_embeds=embeds, **kwargs).images,
                          call(stock, ip_adapter_image_embeds=embeds, **kwargs).images) <= TOLERANCE  # fmt: skip


def test_the_gate_packs_cleared_images_to_two_rows(pipes):
    _, pipe, _ = pipes
    for threshold, later_rows in ((-1.0, 2), (1.0, 3)):  # cosine above -1: every image cleared; above 1: none
        batches = []
        hook = pipe.unet.register_forward_pre_hook(lambda module, args, seen=batches: seen.append(args[0].shape[0]))
        try:
            out = call(pipe, guard_config=GuardConfig(gate_threshold=threshold))
        finally:
            hook.remove()
        assert batches == [3 * 2] + [later_rows * 2] * (STEPS - 1)
        assert out.report.cleared.all() if later_rows == 2 else not out.report.cleared.any()


def test_callbacks_see_the_parents_tensors_and_change_guidance(pipes):
    stock, pipe, _ = pipes
    seen = {}

    def look(pipeline, step, timestep, tensors):
        seen.update({name: tuple(value.shape) for name, value in tensors.items()})
        return {}

    names = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]
    call(pipe, guard_config=GuardConfig(), callback_on_step_end=look, callback_on_step_end_tensor_inputs=names)
    assert seen == {"latents": (2, 4, 8, 8), "prompt_embeds": (4, 77, 32), "add_text_embeds": (4, 16),
                    "add_time_ids": (4, 6)}  # fmt: skip

    def stronger(pipeline, step, timestep, tensors):  # diffusers' test_callback_cfg
        pipeline._guidance_scale += 1.0
        return tensors

    assert relative_error(call(pipe, callback_on_step_end=stronger).images,
                          call(stock, callback_on_step_end=stronger).images) <= TOLERANCE  # fmt: skip
    assert pipe.guidance_scale == stock.guidance_scale == 7.5 + STEPS

    def bigger(pipeline, step, timestep, tensors):  # the size ids, changed from the next step on
        return {"add_time_ids": tensors["add_time_ids"] * 2, "add_text_embeds": tensors["add_text_embeds"] + 1}

    kwargs = dict(callback_on_step_end=bigger, callback_on_step_end_tensor_inputs=["add_time_ids", "add_text_embeds"])
    expected = call(stock, **kwargs).images
    assert relative_error(call(pipe, **kwargs).images, expected) <= TOLERANCE
    assert relative_error(expected, call(stock).images) > 1e-4

    def wrong(pipeline, step, timestep, tensors):
        return {"add_time_ids": tensors["add_time_ids"][:1]}

    with pytest.raises(ValueError, match=r"add_time_ids of shape \(1, 6\); GUARD takes cat\(\[negative, positive\]\)"):
        call(pipe, callback_on_step_end=wrong, callback_on_step_end_tensor_inputs=["add_time_ids"])


def test_diffusers_sdxl_cfg_cutoff_callback(pipes):
    stock, pipe, _ = pipes
    one = dict(prompt=PROMPTS[0], num_inference_steps=4)  # the callback keeps the last row: one image
    expected = call(stock, callback_on_step_end=SDXLCFGCutoffCallback(cutoff_step_ratio=0.5), **one).images
    for config in ("cfg", GuardConfig()):
        out = call(pipe, guard_config=config, callback_on_step_end=SDXLCFGCutoffCallback(cutoff_step_ratio=0.5), **one)
        assert out.report.num_steps == 4 and out.report.repulsion_weights[3:] == [0.0]  # step 3 unguided
        if config == "cfg":
            assert relative_error(out.images, expected) <= TOLERANCE


def test_the_deprecated_callback_is_called_as_in_the_parent(pipes):
    stock, pipe, _ = pipes
    seen = {"stock": [], "guard": []}
    for name, each in (("stock", stock), ("guard", pipe)):
        with pytest.warns(FutureWarning):
            call(each, callback=lambda step, t, latents, seen=seen[name]: seen.append((step, int(t))), callback_steps=2)
    assert seen["guard"] == seen["stock"] and len(seen["guard"]) == 2


def test_prompt_embeds_give_the_prompts_run(pipes):
    _, pipe, _ = pipes
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(list(PROMPTS), device="cpu")
    by_embeds = call(pipe, prompt=None, guard_config=GuardConfig(), prompt_embeds=embeds,
                     negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                     negative_pooled_prompt_embeds=negative_pooled, latents=initial_latents(2))  # fmt: skip
    assert relative_error(by_embeds.images, call(pipe, guard_config=GuardConfig()).images) <= 1e-6
    assert by_embeds.report.token_labels[0][3] == "<position 3>"


def test_from_pipe_and_save_and_load(pipes, tmp_path):
    stock, _, _ = pipes
    converted = StableDiffusionXLGuardPipeline.from_pipe(stock)
    converted.set_progress_bar_config(disable=True)
    assert isinstance(converted, StableDiffusionXLGuardPipeline) and set(converted.components) == set(stock.components)
    assert relative_error(call(converted).images, call(stock).images) <= TOLERANCE
    converted.save_pretrained(tmp_path)
    loaded = StableDiffusionXLGuardPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert relative_error(call(loaded, guard_config=GuardConfig()).images,
                          call(converted, guard_config=GuardConfig()).images) <= 1e-6  # fmt: skip


def test_vae_upcast_and_watermark_as_in_the_parent():
    components = tiny_sdxl_components()
    components["vae"] = components["vae"].to(torch.float16)  # force_upcast is set in the VAE's config
    pipe = StableDiffusionXLGuardPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    marked = []

    class Watermark:
        def apply_watermark(self, images):
            marked.append(images.dtype)
            return images

    pipe.watermark = Watermark()
    images = call(pipe, output_type="np").images
    assert np.isfinite(images).all() and marked == [torch.float32] and pipe.vae.dtype == torch.float16


def test_sdxl_inputs_and_models_it_cannot_take_give_clear_errors(pipes):
    _, pipe, _ = pipes
    cases = [
        (dict(original_size=[16]), "original_size must be a pair of integers"),
        (dict(negative_original_size=(8, 8)), "pass negative_original_size and negative_target_size together"),
        (dict(prompt_2=["only one"]), "prompt_2 has 1 entries, but there are 2 prompts"),
        (dict(negative_prompt_2=["a", "b", "c"]), "negative_prompt_2 has 3 entries"),
        (dict(guard_config=3), "guard_config must be a GuardConfig"),
        (dict(aesthetic_score=6.0), "unexpected keyword argument"),
        (dict(prompt=[]), "prompt is an empty list"),
        (dict(latents=initial_latents(1)), r"latents must have shape \(2, 4, 8, 8\)"),
    ]
    for kwargs, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            call(pipe, **kwargs)
    components = tiny_sdxl_components()
    refiner = StableDiffusionXLGuardPipeline(**{**components, "text_encoder": None, "tokenizer": None})
    with pytest.raises(ValueError, match="refiner layout"):
        call(refiner)
    components["unet"].register_to_config(time_cond_proj_dim=8)
    with pytest.raises(ValueError, match="guidance-distilled"):
        call(StableDiffusionXLGuardPipeline(**components))


def test_detect_screens_prompts_on_sdxl(pipes):
    _, pipe, _ = pipes
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    try:
        scores = guard.detection.detect(pipe, list(PROMPTS), steps=1, num_inference_steps=STEPS)
    finally:
        hook.remove()
    assert seen == [6] and scores.steps == 1  # one UNet call, GUARD's three rows per prompt
    assert all(scores.get(name).shape == (2, 1) for name in ("wen", "cosine", "entropy"))


def test_concurrent_sdxl_requests_on_shared_weights_equal_sequential_ones(pipes):
    """diffusers' serving pattern on SDXL: a pipeline per request on the shared modules (its own
    scheduler), GUARD beside GUARD with other settings and beside CFG, in threads; the shared UNet's
    processors are left as they were."""
    _, pipe, components = pipes
    originals = dict(pipe.unet.attn_processors)

    def request_pipeline():
        shared = dict(components)
        shared["scheduler"] = type(components["scheduler"]).from_config(components["scheduler"].config)
        for name in ("tokenizer", "tokenizer_2"):  # a tokenizer sets padding per call: not thread-safe
            shared[name] = copy.deepcopy(components[name])
        request = StableDiffusionXLGuardPipeline(**shared)
        request.set_progress_bar_config(disable=True)
        return request

    requests = [
        (request_pipeline(), GuardConfig()),
        (request_pipeline(), GuardConfig(spike_threshold=-0.5, repulsion_scale=1.0, gate_threshold=0.99)),
        (request_pipeline(), GuardConfig.preset("cfg")),
        (request_pipeline(), GuardConfig.preset("attenuation")),
    ]
    alone = [call(request, guard_config=config).images for request, config in requests]
    results = run_together(
        [
            lambda callback, request=request, config=config: (
                call(request, guard_config=config, callback_on_step_end=callback).images
            )
            for request, config in requests
        ]
    )
    assert relative_error(alone[0], alone[2]) > 1e-3  # the settings differ, so a mix-up would show
    for images, expected in zip(results, alone):
        torch.testing.assert_close(images, expected, rtol=1e-6, atol=1e-6)
    assert all(pipe.unet.attn_processors[k] is originals[k] for k in originals)
