"""GuardConfig.spike_tokens="first-step": each image's spike tokens fixed after the first step(s),
against an independent eager loop, with the gate, and without host synchronisation."""

import pytest
import torch
from sampler_utils import PROMPTS, eager_guard_latents, initial_latents, relative_error, tiny_components

import guard.attention as guard_attention
import guard.sampling as guard_sampling
from guard.config import GuardConfig
from guard.pipeline import StableDiffusionGuardPipeline

STEPS = 4
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tiny():
    components = tiny_components()
    pipe = StableDiffusionGuardPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe, components


def run(pipe, config, images=1, **kwargs):
    return pipe(
        list(PROMPTS),
        latents=initial_latents(len(PROMPTS) * images),
        num_images_per_prompt=images,
        num_inference_steps=STEPS,
        output_type="latent",
        guard_config=config,
        **kwargs,
    )


@pytest.mark.parametrize("method", ["guard", "attenuation"])
def test_first_step_tokens_match_the_eager_loop(tiny, method):
    pipe, components = tiny
    # tau 1: the tiny model's rule flags a few tokens in some heads, so fixing them changes the run.
    config = GuardConfig(method=method, spike_threshold=1.0, spike_tokens="first-step")
    out = run(pipe, config)
    eager = eager_guard_latents(components, PROMPTS, initial_latents(2), STEPS, method=method, tau=1.0, fixed_after=1)
    assert relative_error(out.images, eager.latents) <= TOLERANCE
    for index, name in enumerate(out.report.layer_names):  # the report counts what acted, token by token
        assert torch.equal(out.report.flag_counts[:, index], eager.flags[name])
    per_check = run(pipe, config.replace(spike_tokens="per-check"))
    assert relative_error(out.images, per_check.images) > 1e-3  # fixing the tokens changed the run
    # After the first step every head of an attenuated layer attenuates the same tokens.
    heads = sum(out.report.layer_heads)
    first = run(pipe, config, callback_on_step_end=_stop_after_the_first_step).report
    later = out.report.flag_counts.sum(dim=1) - first.flag_counts.sum(dim=1)
    assert torch.all(later % ((STEPS - 1) * heads) == 0) and later.sum() > 0


def test_the_triton_backend_gives_the_same_first_step_run(tiny):
    """Every row through the fused kernel (the Triton interpreter here), the fixed tokens as its
    per-token factors: the PyTorch path's run (which sends the other rows through SDPA)."""
    pytest.importorskip("triton")
    pipe, _ = tiny
    config = GuardConfig(spike_threshold=1.0, spike_tokens="first-step")
    prompt = [PROMPTS[0]]
    kwargs = dict(latents=initial_latents(1), num_inference_steps=3, output_type="latent", guard_config=config)
    torch_run = pipe(prompt, attention_backend="torch", **kwargs)
    triton_run = pipe(prompt, attention_backend="triton", **kwargs)
    assert relative_error(triton_run.images, torch_run.images) <= TOLERANCE
    assert torch.equal(triton_run.report.flag_counts, torch_run.report.flag_counts)
    assert torch_run.report.flag_counts.sum() > 0


def test_with_the_gate_cleared_images_are_cfg_and_flagged_ones_first_step_guard(tiny):
    pipe, _ = tiny
    config = GuardConfig(spike_threshold=1.0, spike_tokens="first-step")
    ungated = run(pipe, config, images=2)
    cfg = run(pipe, "cfg", images=2)
    first = ungated.report.detection.cosine.flatten()
    gated = run(pipe, config.replace(gate_threshold=float(first.median())), images=2)
    cleared = gated.report.cleared.flatten()
    assert cleared.any() and not cleared.all()
    assert relative_error(gated.images[cleared], cfg.images[cleared]) <= 1e-5
    assert relative_error(gated.images[~cleared], ungated.images[~cleared]) <= 1e-5


def test_fixing_the_tokens_reads_nothing_back_to_the_host(tiny, monkeypatch):
    pipe, _ = tiny
    forbidden = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")
    calls = []

    def guarded(method):
        def wrapper(*args, **kwargs):
            with pytest.MonkeyPatch.context() as patch:
                for name in forbidden:
                    patch.setattr(torch.Tensor, name, _forbidden(name))
                result = method(*args, **kwargs)
            calls.append(method.__name__)
            return result

        return wrapper

    processor = guard_attention.GuardCrossAttnProcessor
    monkeypatch.setattr(processor, "_fixed", guarded(processor._fixed))
    monkeypatch.setattr(
        guard_sampling.GuardDenoiser, "_fix_spike_tokens", guarded(guard_sampling.GuardDenoiser._fix_spike_tokens)
    )
    run(pipe, GuardConfig(spike_threshold=1.0, spike_tokens="first-step"))
    assert calls.count("_fix_spike_tokens") == 1 and calls.count("_fixed") == 4 * (STEPS - 1)


def _stop_after_the_first_step(pipeline, step, timestep, tensors):
    pipeline._interrupt = True
    return {}


def _forbidden(name):
    def method(*args, **kwargs):
        raise AssertionError(f"host synchronisation through Tensor.{name}")

    return method


def test_spike_tokens_are_validated():
    with pytest.raises(ValueError, match="spike_tokens must be one of"):
        GuardConfig(spike_tokens="fixed")
    with pytest.raises(ValueError, match="needs a method with attenuated rows"):
        GuardConfig(method="cfg", spike_tokens="first-step")


def test_fixed_spikes_are_checked(tiny):
    pipe, _ = tiny
    unet = pipe.unet
    latents, text = torch.randn(3, 4, 8, 8), torch.randn(3, 77, 32)
    config = GuardConfig()
    with torch.no_grad(), guard_attention.attenuate_cross_attention(unet, slice(1, 2), config) as session:
        with pytest.raises(TypeError, match="fixed_spikes must be None or a 2-D bool tensor"):
            session.fixed_spikes = torch.zeros(1, 77)
        session.fixed_spikes = torch.zeros(2, 77, dtype=torch.bool)  # two rows for a one-row slice
        with pytest.raises(ValueError, match=r"fixed_spikes has shape \(2, 77\), expected \(spike rows, num_tokens\)"):
            unet(latents, 500, encoder_hidden_states=text)
        session.spike_rows = torch.tensor([False, True, False])
        with pytest.raises(ValueError, match="fixed spike tokens need spike_rows as a slice"):
            unet(latents, 500, encoder_hidden_states=text)
