"""StableDiffusionGuardPipeline end to end on a tiny SD-shaped pipeline, against an eager GUARD."""

import copy
import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from sampler_utils import (
    PROMPTS,
    eager_guard_latents,
    eager_related_latents,
    initial_latents,
    relative_error,
    run_together,
    stock_pipeline,
    tiny_components,
)

from guard.attention import GuardCrossAttnProcessor
from guard.config import GuardConfig
from guard.pipeline import GuardPipelineOutput, StableDiffusionGuardPipeline
from guard.report import PAD_LABEL, GuardReport

STEPS = 3
TOLERANCE = 1e-4  # relative error of float32 final latents


def guard_pipeline(sd2=False, scheduler=None):
    components = tiny_components(sd2)
    if scheduler is not None:
        components["scheduler"] = scheduler
    pipe = StableDiffusionGuardPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe, components


@pytest.fixture(scope="module")
def tiny():
    return guard_pipeline()


def run(pipe, config, prompts=PROMPTS, latents=None, **kwargs):
    latents = initial_latents(len(prompts)) if latents is None else latents
    return pipe(
        list(prompts),
        latents=latents,
        num_inference_steps=kwargs.pop("num_inference_steps", STEPS),
        output_type=kwargs.pop("output_type", "latent"),
        guard_config=config,
        **kwargs,
    )


@pytest.mark.parametrize("orthogonalize", [False, True], ids=["paper", "released"])
def test_guard_matches_eager_reference(tiny, orthogonalize):
    pipe, components = tiny
    out = run(pipe, GuardConfig(orthogonalize=orthogonalize))
    eager = eager_guard_latents(components, PROMPTS, initial_latents(2), STEPS, orthogonalize=orthogonalize)
    assert relative_error(out.images, eager.latents) <= TOLERANCE
    # The report's flag counts are the eager run's, token by token and layer by layer.
    report = out.report
    assert set(report.layer_names) == set(eager.flags)
    for index, name in enumerate(report.layer_names):
        assert torch.equal(report.flag_counts[:, index], eager.flags[name])
    attraction = torch.tensor([step[0] for step in eager.norms])
    repulsion = torch.tensor([step[1] for step in eager.norms])
    torch.testing.assert_close(report.attraction_norms[:, :, 0], attraction, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(report.repulsion_norms[:, :, 0], repulsion, rtol=1e-3, atol=1e-5)


def test_orthogonalisation_and_attenuation_change_the_result(tiny):
    pipe, _ = tiny
    paper = run(pipe, GuardConfig()).images
    released = run(pipe, GuardConfig(orthogonalize=True)).images
    cfg = run(pipe, "cfg").images
    assert relative_error(released, paper) > 1e-2
    assert relative_error(paper, cfg) > 1e-2


def test_attenuation_variant_matches_eager_reference(tiny):
    pipe, components = tiny
    config = GuardConfig.preset("attenuation")
    out = run(pipe, config)
    eager = eager_guard_latents(components, PROMPTS, initial_latents(2), STEPS, method="attenuation", tau=0.01)
    assert relative_error(out.images, eager.latents) <= TOLERANCE
    assert relative_error(out.images, run(pipe, "cfg").images) > 1e-2


def test_cfg_reproduces_stock_pipeline(tiny):
    pipe, components = tiny
    stock = StableDiffusionPipeline(**components)
    stock.set_progress_bar_config(disable=True)
    for output_type in ("latent", "np"):
        expected = stock(
            list(PROMPTS), num_inference_steps=STEPS, generator=torch.Generator().manual_seed(7),
            output_type=output_type, guidance_scale=7.5,
        ).images  # fmt: skip
        got = pipe(
            list(PROMPTS), num_inference_steps=STEPS, generator=torch.Generator().manual_seed(7),
            output_type=output_type, guard_config="cfg",
        ).images  # fmt: skip
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6, atol=1e-6)


def test_guard_without_repulsion_or_attenuation_is_cfg(tiny):
    pipe, _ = tiny
    neutral = GuardConfig(repulsion_scale=0.0, spike_scale=1.0, orthogonalize=False)
    assert relative_error(run(pipe, neutral).images, run(pipe, "cfg").images) <= 1e-5


@pytest.mark.parametrize("method", ["guard", "attenuation", "cfg"])
def test_one_unet_call_per_step_on_all_branches(tiny, method):
    pipe, _ = tiny
    batches = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        run(pipe, GuardConfig.preset(method), latents=initial_latents(4), num_images_per_prompt=2)
    finally:
        hook.remove()
    branches = 3 if method == "guard" else 2
    assert batches == [branches * 2 * 2] * STEPS
    assert not any(isinstance(p, GuardCrossAttnProcessor) for p in pipe.unet.attn_processors.values())


def test_batched_prompts_equal_prompts_one_by_one(tiny):
    pipe, _ = tiny
    latents = initial_latents(4, seed=3)
    batched = run(pipe, GuardConfig(), latents=latents, num_images_per_prompt=2)
    for p, prompt in enumerate(PROMPTS):
        single = run(pipe, GuardConfig(), prompts=[prompt], latents=latents[2 * p : 2 * p + 2], num_images_per_prompt=2)
        assert relative_error(batched.images[2 * p : 2 * p + 2], single.images) <= 1e-5
        assert torch.equal(batched.report.flag_counts[p], single.report.flag_counts[0])
        assert batched.report.flagged_tokens[p] == single.report.flagged_tokens[0]


@pytest.mark.parametrize(
    "scheduler_cls, options",
    [
        (DDIMScheduler, {}),
        (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        (EulerDiscreteScheduler, {}),
    ],
    ids=["ddim", "dpmsolver++", "euler"],
)
def test_schedulers(scheduler_cls, options):
    base = tiny_components()["scheduler"]
    pipe, components = guard_pipeline(scheduler=scheduler_cls.from_config(base.config, **options))
    out = run(pipe, GuardConfig(), num_inference_steps=4)
    eager = eager_guard_latents(components, PROMPTS, initial_latents(2), 4)
    assert relative_error(out.images, eager.latents) <= TOLERANCE


def test_sd2_layout_with_v_prediction():
    pipe, components = guard_pipeline(sd2=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    heads = {name.split(".")[0] + name.split(".")[1]: m.heads for name, m in pipe.unet.named_modules()
             if name.endswith("attn2") and name.startswith("down_blocks")}  # fmt: skip
    assert heads == {"down_blocks0": 2, "down_blocks1": 4, "down_blocks2": 4}
    for orthogonalize in (False, True):
        out = run(pipe, GuardConfig(orthogonalize=orthogonalize))
        eager = eager_guard_latents(components, PROMPTS, initial_latents(2), STEPS, orthogonalize=orthogonalize)
        assert relative_error(out.images, eager.latents) <= TOLERANCE


def test_report_contents(tiny):
    pipe, _ = tiny
    out = run(pipe, GuardConfig(), latents=initial_latents(4), num_images_per_prompt=2)
    report = out.report
    assert isinstance(out, GuardPipelineOutput) and isinstance(report, GuardReport)
    assert report.prompts == list(PROMPTS) and report.num_steps == STEPS and report.images_per_prompt == 2
    assert len(report.layer_names) == 4 and report.layer_heads == (2, 2, 2, 2)
    assert report.flag_counts.shape == (2, 4, 77) and report.flag_counts.dtype == torch.int64
    assert int(report.flag_counts.max()) <= STEPS * 2 * 2
    assert report.flag_counts[:, :, 0].sum() == 0  # BOS is never a spike
    tokenizer = pipe.tokenizer
    for p, prompt in enumerate(PROMPTS):
        flagged = report.flagged_tokens[p]
        assert flagged and all(isinstance(k, str) and isinstance(v, int) and v > 0 for k, v in flagged.items())
        words = {tokenizer.decode([i]).strip() for i in tokenizer(prompt).input_ids}
        assert set(flagged) <= words | {PAD_LABEL}
        assert sum(flagged.values()) == int(report.flag_counts[p].sum())
        for token, layers in report.flagged_layers[p].items():
            assert set(layers) <= set(report.layer_names) and sum(layers.values()) == flagged[token]
    for name in ("attraction", "repulsion", "cosine"):
        assert report.guidance_norms[name].shape == (STEPS, 2, 2)
    assert report.repulsion_weights == pytest.approx([2.0, 2.0 * np.cos(np.pi / 6), 2.0 * np.cos(np.pi / 3)])
    text = str(report)
    assert text == report.summary() and "prompt 0: 'a red circle on a blue background'" in text
    first_token = next(iter(report.flagged_tokens[0]))
    assert repr(first_token) in text
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["flagged_tokens"] == report.flagged_tokens and len(as_dict["guidance_norms"]["attraction"]) == STEPS


def test_cfg_report_has_no_attenuation(tiny):
    pipe, _ = tiny
    report = run(pipe, "cfg").report
    assert report.layer_names == () and report.flagged_tokens == [{}, {}]
    assert "no spike attenuation" in report.summary()
    assert torch.all(report.repulsion_norms == 0)


def test_prompt_embeds_and_negative_prompt(tiny):
    pipe, _ = tiny
    by_text = run(pipe, GuardConfig())
    embeds, negative = pipe.encode_prompt(list(PROMPTS), "cpu", 1, True)
    by_embeds = pipe(
        prompt_embeds=embeds, negative_prompt_embeds=negative, latents=initial_latents(2),
        num_inference_steps=STEPS, output_type="latent",
    )  # fmt: skip
    assert relative_error(by_embeds.images, by_text.images) <= 1e-6
    assert by_embeds.report.token_labels[0][3] == "<position 3>"
    assert run(pipe, GuardConfig(), negative_prompt=["", ""]).images.equal(by_text.images)
    assert relative_error(run(pipe, GuardConfig(), negative_prompt=["black", "black"]).images, by_text.images) > 1e-3


def test_callback_and_interrupt(tiny):
    pipe, _ = tiny
    seen = []

    def callback(pipeline, step, timestep, tensors):
        seen.append((step, tuple(tensors["latents"].shape), tensors["prompt_embeds"].shape[0]))
        if step == 1:
            pipeline._interrupt = True
        return {}

    out = run(pipe, GuardConfig(), callback_on_step_end=callback,
              callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])  # fmt: skip
    # prompt_embeds as the parent pipeline lays it out under CFG: cat([negative, positive]).
    assert seen == [(0, (2, 4, 8, 8), 4), (1, (2, 4, 8, 8), 4)]
    assert out.report.num_steps == 2

    def unprompted(pipeline, step, timestep, tensors):  # from step 1 on, the prompt is the negative one
        negative = tensors["prompt_embeds"].chunk(2)[0]
        return {"prompt_embeds": torch.cat([negative, negative])}

    changed = run(
        pipe, GuardConfig(), callback_on_step_end=unprompted, callback_on_step_end_tensor_inputs=["prompt_embeds"]
    )
    assert relative_error(changed.images, run(pipe, GuardConfig()).images) > 1e-3

    def wrong_shape(pipeline, step, timestep, tensors):
        return {"prompt_embeds": tensors["prompt_embeds"][-1:]}

    with pytest.raises(ValueError, match=r"GUARD takes cat\(\[negative, positive\]\)"):
        run(pipe, GuardConfig(), callback_on_step_end=wrong_shape, callback_on_step_end_tensor_inputs=["prompt_embeds"])

    def zero_latents(pipeline, step, timestep, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])} if step == STEPS - 1 else {}

    assert torch.all(run(pipe, GuardConfig(), callback_on_step_end=zero_latents).images == 0)


def test_output_types(tiny):
    pipe, _ = tiny
    images = run(pipe, GuardConfig(), output_type="pil").images
    assert len(images) == 2 and isinstance(images[0], PIL.Image.Image) and images[0].size == (16, 16)
    array = run(pipe, GuardConfig(), output_type="np").images
    assert array.shape == (2, 16, 16, 3)
    out = run(pipe, GuardConfig(), output_type="pt")
    assert isinstance(out, StableDiffusionPipelineOutput) and isinstance(out.report, GuardReport)
    images, nsfw = run(pipe, GuardConfig(), output_type="pt", return_dict=False)  # the parent's tuple
    assert images.shape == (2, 3, 16, 16) and nsfw is None and isinstance(pipe.guard_report, GuardReport)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"guard_config": {"method": "guard"}}, TypeError, "guard_config must be a GuardConfig"),
        ({"guard_config": "strong"}, ValueError, "unknown GuardConfig preset"),
        ({"guard_config": GuardConfig(blocks=("down_blocks.3",))}, ValueError, "'down_blocks.3' matches no"),
        ({"guidance_scale": -2.0}, ValueError, "guidance_scale must be >= 0"),
        ({"num_images_per_prompt": 0}, ValueError, "num_images_per_prompt must be a positive integer"),
        ({"num_inference_steps": 0}, ValueError, "num_inference_steps must be a positive integer"),
        ({"output_type": "jpeg"}, ValueError, "output_type must be one of"),
        ({"negative_prompt": ["a", "b", "c"]}, ValueError, "negative_prompt"),
        ({"attention_backend": "cuda"}, ValueError, "backend must be one of"),
        ({"callback_on_step_end_tensor_inputs": ["noise_pred"]}, ValueError, "callback_on_step_end_tensor_inputs"),
    ],
)
def test_bad_arguments_raise_clear_errors(tiny, kwargs, error, message):
    pipe, _ = tiny
    with pytest.raises(error, match=message):
        run(pipe, kwargs.pop("guard_config", None), **kwargs)
    assert not any(isinstance(p, GuardCrossAttnProcessor) for p in pipe.unet.attn_processors.values())


@pytest.mark.parametrize(
    "call, error, message",
    [
        (dict(prompt=[]), ValueError, "prompt is an empty list"),
        (dict(prompt=None), ValueError, "pass prompt"),
        (dict(prompt=["a", 3]), TypeError, "prompt must be a string or a list of strings"),
        (dict(prompt="a", latents=torch.zeros(2, 4, 8, 8)), ValueError, r"latents must have shape \(1, 4, 8, 8\)"),
        (dict(prompt="a", latents=torch.zeros(1, 4, 16, 16)), ValueError, r"got \(1, 4, 16, 16\)"),
        (dict(prompt="a", num_images_per_prompt=2, latents=torch.zeros(1, 4, 8, 8)), ValueError, r"\(2, 4, 8, 8\)"),
        (dict(prompt="a", latents=[[0.0]]), TypeError, "latents must be a torch.Tensor"),
    ],
)
def test_bad_prompts_and_latents_fail_before_any_work(tiny, monkeypatch, call, error, message):
    pipe, _ = tiny

    def no_work(*args, **kwargs):
        raise AssertionError("the text encoder ran before the arguments were checked")

    monkeypatch.setattr(pipe, "encode_prompt", no_work)
    with pytest.raises(error, match=message):
        pipe(**call, num_inference_steps=STEPS, output_type="latent")


def test_save_and_load(tmp_path):
    stock = stock_pipeline()
    stock.save_pretrained(tmp_path / "stock")
    loaded = StableDiffusionGuardPipeline.from_pretrained(tmp_path / "stock")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, StableDiffusionGuardPipeline)
    in_memory = StableDiffusionGuardPipeline.from_pipe(stock)
    in_memory.set_progress_bar_config(disable=True)
    expected = run(in_memory, GuardConfig()).images
    assert relative_error(run(loaded, GuardConfig()).images, expected) <= 1e-6
    # from_pipe shares the modules; the stock pipeline's processors are untouched afterwards.
    assert in_memory.unet is stock.unet
    assert not any(isinstance(p, GuardCrossAttnProcessor) for p in stock.unet.attn_processors.values())
    loaded.save_pretrained(tmp_path / "guard")
    reloaded = StableDiffusionGuardPipeline.from_pretrained(tmp_path / "guard")
    reloaded.set_progress_bar_config(disable=True)
    assert relative_error(run(reloaded, GuardConfig()).images, expected) <= 1e-6


# ----------------------------------------------------------------------------------------------
# Related methods (the ones the paper compares with) against straightforward implementations


@pytest.mark.parametrize(
    "preset, kwargs",
    [
        ("ren", {}),
        ("jain", {"early_scale": 1.0}),
        ("jain-opposite", {"early_scale": -2.0}),
        ("somepalli", {"seed": 11}),
    ],
)
def test_related_methods_match_eager_references(tiny, preset, kwargs):
    pipe, components = tiny
    config = GuardConfig.preset(preset)
    generator = torch.Generator().manual_seed(kwargs.get("seed", 0))
    out = run(pipe, config, num_inference_steps=4, generator=generator)
    eager = eager_related_latents(components, PROMPTS, initial_latents(2), 4, config.method, **kwargs)
    assert relative_error(out.images, eager) <= TOLERANCE
    assert relative_error(out.images, run(pipe, "cfg", num_inference_steps=4).images) > 1e-3
    assert out.report.layer_names == () and out.report.flagged_tokens == [{}, {}]


def test_jain_switches_at_the_transition_timestep(tiny):
    pipe, _ = tiny
    # Every DDIM timestep of 4 steps (1..751) is below 1000: a transition at 1000 is plain CFG.
    late = run(pipe, GuardConfig(method="jain", transition_timestep=1000.0), num_inference_steps=4).images
    assert relative_error(late, run(pipe, "cfg", num_inference_steps=4).images) <= 1e-6


@torch.no_grad()
def test_jain_dynamic_transition_switches_each_image_after_its_first_local_minimum():
    """Against the released rule written out, on the shipped testbed (whose noise norm has a late
    local minimum): d_j = ||eps_c - eps_u||; switch at the first j >= 2 with d_{j-2} > d_{j-1} < d_j;
    guidance 1 before, the CFG scale from then on, per image."""
    from guard.testbed import load_pipeline, memorized_items, plain_prompts

    pipe = load_pipeline(pipeline_class=StableDiffusionGuardPipeline)
    prompts, steps, s = [memorized_items()[0].caption, plain_prompts(1)[0]], 20, 2.0
    latents = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    config = GuardConfig.preset("jain-dynamic", guidance_scale=s)
    out = pipe(prompts, latents=latents, num_inference_steps=steps, output_type="latent", guard_config=config).images
    negative, positive = pipe.encode_prompt(prompts, "cpu", 1, True)[::-1]
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    x = latents * scheduler.init_noise_sigma
    norms, switch_steps = [], [None, None]
    for j, t in enumerate(scheduler.timesteps):
        states = torch.cat([negative, positive])
        eps_u, eps_c = pipe.unet(
            scheduler.scale_model_input(torch.cat([x] * 2), t), t, encoder_hidden_states=states
        ).sample.chunk(2)
        norms.append([float((eps_c[b] - eps_u[b]).norm()) for b in range(2)])
        for b in range(2):
            if switch_steps[b] is None and j >= 2 and norms[j - 2][b] > norms[j - 1][b] < norms[j][b]:
                switch_steps[b] = j
        scale = torch.tensor([s if k is not None else 1.0 for k in switch_steps]).view(2, 1, 1, 1)
        x = scheduler.step(eps_u + scale * (eps_c - eps_u), t, x).prev_sample
    assert all(step is not None and step < steps - 1 for step in switch_steps), switch_steps
    assert relative_error(out, x) <= 1e-4


def test_the_dynamic_transition_rule_on_given_norms():
    from guard.guidance import DynamicTransition

    rule = DynamicTransition(GuardConfig.preset("jain-dynamic", guidance_scale=3.0))
    eps_u = torch.zeros(2, 1)
    scales = []
    for d in ([3.0, 3.0], [2.0, 2.0], [4.0, 1.0], [1.0, 0.5], [2.0, 1.0]):  # image 0 turns at j=2, image 1 at j=4
        eps_c = torch.tensor(d).view(2, 1)
        scales.append((rule(eps_u, eps_c) / eps_c).flatten().tolist())
    assert scales == [[1, 1], [1, 1], [3, 1], [3, 1], [3, 3]]
    with pytest.raises(ValueError, match="transition 'dynamic'"):
        DynamicTransition(GuardConfig.preset("jain"))


def test_ren_needs_prompt_text(tiny):
    pipe, _ = tiny
    embeds, negative = pipe.encode_prompt(list(PROMPTS), "cpu", 1, True)
    with pytest.raises(ValueError, match="method 'ren' needs the prompt text"):
        pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2, guard_config="ren")


def test_triton_backend_gives_the_same_run(tiny):
    """The fused Triton kernel (the CPU interpreter here, conftest sets TRITON_INTERPRET) in the pipeline."""
    pytest.importorskip("triton")
    pipe, _ = tiny
    prompt = [PROMPTS[0]]
    torch_run = run(pipe, GuardConfig(), prompts=prompt, num_inference_steps=2, attention_backend="torch")
    triton_run = run(pipe, GuardConfig(), prompts=prompt, num_inference_steps=2, attention_backend="triton")
    assert relative_error(triton_run.images, torch_run.images) <= TOLERANCE
    assert torch.equal(triton_run.report.flag_counts, torch_run.report.flag_counts)


def test_ren_ignores_blocks_it_does_not_use(tiny):
    """Ren et al.'s modulation acts on every cross-attention layer, so GUARD's block list is not checked."""
    pipe, _ = tiny
    default = run(pipe, GuardConfig.preset("ren"), num_inference_steps=2).images
    elsewhere = run(pipe, GuardConfig.preset("ren", blocks=("down_blocks.9",)), num_inference_steps=2).images
    torch.testing.assert_close(elsewhere, default, rtol=0, atol=0)
    with pytest.raises(ValueError, match="'down_blocks.9' matches no cross-attention"):
        run(pipe, GuardConfig(blocks=("down_blocks.9",)), num_inference_steps=2)


def test_memorization_gate_decides_per_image_on_the_first_step(tiny):
    pipe, _ = tiny
    latents = initial_latents(4)
    guard = run(pipe, GuardConfig(), latents=latents, num_images_per_prompt=2)
    cfg = run(pipe, "cfg", latents=latents, num_images_per_prompt=2)
    everyone = run(pipe, GuardConfig(gate_threshold=-1.0), latents=latents, num_images_per_prompt=2)
    nobody = run(pipe, GuardConfig(gate_threshold=1.0), latents=latents, num_images_per_prompt=2)
    assert everyone.report.cleared.all() and not nobody.report.cleared.any()
    assert relative_error(everyone.images, cfg.images) <= 1e-5
    assert torch.equal(nobody.images, guard.images)
    # A threshold between the images' first-step cosines splits them, and each image follows its branch.
    first = guard.report.cosines[0]
    threshold = float(first.median())
    mixed = run(pipe, GuardConfig(gate_threshold=threshold), latents=latents, num_images_per_prompt=2)
    cleared = mixed.report.cleared
    assert torch.equal(cleared, first > threshold) and cleared.any() and not cleared.all()
    flat = cleared.flatten()
    assert relative_error(mixed.images[flat], cfg.images[flat]) <= 1e-5
    assert relative_error(mixed.images[~flat], guard.images[~flat]) <= 1e-5
    assert f"first-step cosine > {threshold:g}" in mixed.report.summary()
    assert mixed.report.to_dict()["cleared"] == cleared.tolist()


def test_report_counts_only_what_acted_on_the_images_guard_guided(tiny):
    """A cleared image's attenuated rows still run, but its flags, repulsion and cosines did not act."""
    pipe, _ = tiny
    latents = initial_latents(4)
    plain_run = run(pipe, GuardConfig(), latents=latents, num_images_per_prompt=2)
    threshold = float(plain_run.report.cosines[0].median())
    report = run(pipe, GuardConfig(gate_threshold=threshold), latents=latents, num_images_per_prompt=2).report
    cleared = report.cleared
    assert report.guided_images == (~cleared).sum(dim=1).tolist()
    # Flags: a guided image's rows flag what they flag without the gate (rows do not interact); a
    # cleared image's are not counted. One image per prompt makes each prompt's count one image's.
    one = initial_latents(2)
    ungated = run(pipe, GuardConfig(), latents=one).report
    split = float(ungated.cosines[0].mean())
    single = run(pipe, GuardConfig(gate_threshold=split), latents=one).report
    assert single.cleared.flatten().tolist() in ([True, False], [False, True])
    for p in range(2):
        expected = torch.zeros_like(ungated.flag_counts[p]) if single.cleared[p, 0] else ungated.flag_counts[p]
        assert torch.equal(single.flag_counts[p], expected)
    assert ungated.flag_counts.sum() > 0
    assert report.checks_per_prompt == [STEPS * sum(report.layer_heads) * n for n in report.guided_images]
    everyone = run(pipe, GuardConfig(gate_threshold=-1.0), latents=latents, num_images_per_prompt=2).report
    assert everyone.flag_counts.sum() == 0 and everyone.flagged_tokens == [{}, {}]
    assert "every image was cleared" in everyone.summary() and "step  w_neg" not in everyone.summary()
    # Norms: a cleared image has no repulsion and no GUARD cosine; the table averages the guided ones.
    assert torch.all(report.repulsion_norms.permute(1, 2, 0)[cleared] == 0)
    assert torch.isnan(report.cosines.permute(1, 2, 0)[cleared]).all()
    guided_repulsion = report.repulsion_norms.permute(1, 2, 0)[~cleared].mean(dim=0)
    table = report.summary().split("means over the images GUARD guided)")[1].strip().splitlines()
    assert [float(line.split()[3]) for line in table] == pytest.approx(guided_repulsion.tolist(), rel=1e-3)
    for p in range(2):
        names = ", ".join(str(i) for i in range(2) if cleared[p, i])
        if names:
            assert f"cleared (image {names})" in report.summary()


def test_cfg_report_prints_no_step_table(tiny):
    pipe, _ = tiny
    summary = run(pipe, "cfg").report.summary()
    assert "step  w_neg" not in summary and "no spike attenuation (method 'cfg')" in summary


# ----------------------------------------------------------------------------- serving


def _request_pipeline(components):
    """diffusers' serving pattern: a pipeline per request on the shared modules, with its own scheduler
    and tokenizer (a Hugging Face tokenizer sets its padding and truncation per call: not thread-safe)."""
    shared = dict(components)
    shared["scheduler"] = type(components["scheduler"]).from_config(components["scheduler"].config)
    shared["tokenizer"] = copy.deepcopy(components["tokenizer"])
    pipe = StableDiffusionGuardPipeline(**shared)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_concurrent_requests_on_shared_weights_equal_sequential_ones(tiny):
    """GUARD beside GUARD with other settings, and beside CFG, in threads, on one set of weights."""
    pipe, components = tiny
    originals = dict(pipe.unet.attn_processors)
    requests = [
        (_request_pipeline(components), GuardConfig()),
        (_request_pipeline(components), GuardConfig(spike_threshold=-0.5, repulsion_scale=1.0, gate_threshold=0.99)),
        (_request_pipeline(components), GuardConfig.preset("cfg")),
        (_request_pipeline(components), GuardConfig.preset("attenuation")),
    ]
    alone = [run(request, config, latents=initial_latents(2)).images for request, config in requests]
    results = run_together(
        [
            lambda callback, request=request, config=config: run(
                request, config, latents=initial_latents(2), callback_on_step_end=callback
            )
            for request, config in requests
        ]
    )
    for out, expected in zip(results, alone):
        torch.testing.assert_close(out.images, expected, rtol=1e-6, atol=1e-6)
    assert all(pipe.unet.attn_processors[k] is originals[k] for k in originals)


def test_a_compiled_unet_gives_the_eager_run_and_recompiles_at_most_for_the_gate(tiny):
    import torch._dynamo
    from torch._dynamo.utils import counters

    pipe, components = tiny
    split = float(
        run(pipe, GuardConfig(), latents=initial_latents(2), num_inference_steps=4).report.detection.cosine.mean()
    )
    config = GuardConfig(gate_threshold=split)  # clears one image of two
    eager = run(pipe, config, latents=initial_latents(2), num_inference_steps=4)
    compiled_pipe = _request_pipeline(components)
    torch._dynamo.reset()
    counters.clear()
    compiled_pipe.unet = torch.compile(components["unet"], backend="aot_eager")
    try:
        first = run(compiled_pipe, config, latents=initial_latents(2), num_inference_steps=4)
        graphs_after_one_run = counters["stats"]["unique_graphs"]
        second = run(compiled_pipe, config, latents=initial_latents(2), num_inference_steps=4)
        graphs_after_two_runs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert first.report.cleared.any() and not first.report.cleared.all()  # the gate packed the batch
    torch.testing.assert_close(first.images, eager.images, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second.images, eager.images, rtol=1e-5, atol=1e-5)
    assert torch.equal(first.report.flag_counts, eager.report.flag_counts)
    # One graph for the detection call, one for the full layout's other calls, one after the gate packs it.
    assert graphs_after_one_run <= 3 and graphs_after_two_runs == graphs_after_one_run
