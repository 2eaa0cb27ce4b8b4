"""guard.detection: memorization scores from GUARD's first step, the gate on them, and the packed batch.

Scores are checked against independent computations on the tiny pipeline (the UNet called by hand,
the attention computed eagerly); the gate against CFG and GUARD runs of the same latents.
"""

import math

import pytest
import torch
from sampler_utils import PROMPTS, eager_guard_latents, initial_latents, relative_error, tiny_components

from guard.attention import cross_attention_layers
from guard.config import DEFAULT_BLOCKS, GuardConfig
from guard.detection import (
    DetectionScores,
    attention_entropy,
    detect,
    gate_rule,
    is_cleared,
    linear_score,
    spike_share,
    wen_score,
)
from guard.pipeline import StableDiffusionGuardPipeline

STEPS = 3


@pytest.fixture(scope="module")
def pipe():
    pipe = StableDiffusionGuardPipeline(**tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, config, latents=None, images=2, **kwargs):
    latents = initial_latents(len(PROMPTS) * images) if latents is None else latents
    return pipe(
        list(PROMPTS),
        latents=latents,
        num_images_per_prompt=images,
        num_inference_steps=kwargs.pop("num_inference_steps", STEPS),
        output_type="latent",
        guard_config=config,
        **kwargs,
    )


class QueryMeanAttention:
    """Eager cross-attention that records, per call, the head- and query-averaged attention of every row."""

    def __init__(self):
        self.records = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch, heads = hidden_states.shape[0], attn.heads
        q, k, v = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        dim = q.shape[-1] // heads
        q, k, v = (x.view(batch, -1, heads, dim).transpose(1, 2) for x in (q, k, v))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim), dim=-1)  # (B, H, Nq, Nk)
        self.records.append(probs.mean(dim=(1, 2)))
        out = (probs @ v).transpose(1, 2).reshape(batch, -1, heads * dim)
        return attn.to_out[1](attn.to_out[0](out))


@torch.no_grad()
def test_first_step_scores_equal_independent_computations(pipe):
    """wen = ||eps_c - eps_u||, cosine of the guidance directions, entropy of the plain rows' attention."""
    config = GuardConfig()
    report = run(pipe, config).report
    scores = report.detection
    assert isinstance(scores, DetectionScores) and scores.steps == 1

    # The first UNet call by hand: unconditional, attenuated and plain rows of the same latents.
    reference = run(pipe, "cfg").report  # wen is the same for CFG: its conditional rows are the plain prompt's
    torch.testing.assert_close(reference.detection.wen, scores.wen, rtol=1e-5, atol=1e-6)
    assert reference.detection.cosine is None and reference.detection.entropy is None

    negative, positive = pipe.encode_prompt(list(PROMPTS), "cpu", 2, True)[::-1]
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    t = scheduler.timesteps[0]
    x = initial_latents(4) * scheduler.init_noise_sigma
    eps_u = pipe.unet(x, t, encoder_hidden_states=negative).sample
    eps_c = pipe.unet(x, t, encoder_hidden_states=positive).sample
    wen = (eps_c - eps_u).flatten(1).norm(dim=1).view(2, 2)
    torch.testing.assert_close(scores.wen, wen, rtol=1e-4, atol=1e-5)

    # Entropy: the plain rows' query-mean attention in GUARD's attenuated layers, recorded eagerly.
    layers = cross_attention_layers(pipe.unet)
    chosen = [name for name in layers if name.startswith(DEFAULT_BLOCKS)]
    recorders = {name: QueryMeanAttention() for name in chosen}
    originals = {name: layers[name].processor for name in chosen}
    for name in chosen:
        layers[name].set_processor(recorders[name])
    try:
        pipe.unet(x, t, encoder_hidden_states=positive)
    finally:
        for name in chosen:
            layers[name].set_processor(originals[name])
    per_layer = [-(r.records[0] * r.records[0].clamp_min(1e-30).log()).sum(dim=-1) for r in recorders.values()]
    entropy = torch.stack(per_layer).mean(dim=0).view(2, 2)
    torch.testing.assert_close(scores.entropy, entropy, rtol=1e-4, atol=1e-5)
    assert torch.all(scores.cosine <= 1.0) and torch.all(scores.cosine > -1.0)
    assert report.to_dict()["detection"]["wen"] == scores.wen.tolist()


@torch.no_grad()
def test_spike_share_equals_the_eager_spike_rule(pipe):
    """The largest share of the first call's (layer, head) checks that flagged one token, BOS excluded."""
    components = {"unet": pipe.unet, "tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder,
                  "scheduler": pipe.scheduler}  # fmt: skip
    eager = eager_guard_latents(components, PROMPTS, initial_latents(2), 1)
    heads = {name: layer.heads for name, layer in cross_attention_layers(pipe.unet).items()}
    counts = torch.stack(list(eager.flags.values())).sum(dim=0)  # (prompts, tokens)
    expected = counts[:, 1:].amax(dim=1).float() / sum(heads[name] for name in eager.flags)
    assert expected.min() > 0  # the tiny model's spike rule flags something, so the check can fail
    scores = run(pipe, GuardConfig(), latents=initial_latents(2), images=1, num_inference_steps=1).report.detection
    torch.testing.assert_close(scores.spike_share.flatten(), expected)
    # Over two calls, the mean of each call's own share (not of the running total).
    two = run(pipe, GuardConfig(), images=1, num_inference_steps=4, detection_steps=2).report.detection
    one = run(pipe, GuardConfig(), images=1, num_inference_steps=4, detection_steps=1).report.detection
    assert torch.all(two.spike_share <= 1.0) and not torch.equal(two.spike_share, one.spike_share)
    torch.testing.assert_close(spike_share(torch.tensor([[9, 1, 3, 0], [0, 0, 0, 0]]), 4), torch.tensor([0.75, 0.0]))


def test_linear_gate_weights_are_wen_cosine_entropy(pipe):
    """gate_weights are (wen, cosine, entropy), in that order, as documented."""
    scores = run(pipe, GuardConfig()).report.detection
    means = {name: scores.get(name).flatten() for name in ("wen", "cosine", "entropy")}
    for i, name in enumerate(("wen", "cosine", "entropy")):
        weights = [0.0, 0.0, 0.0]
        weights[i] = 2.0
        torch.testing.assert_close(linear_score(means, weights), 2.0 * means[name])
    config = GuardConfig(gate_threshold=0.5, gate_detector="linear", gate_weights=(0.0, -1.0, 2.0), gate_steps=2)
    assert gate_rule(config) == "first 2 steps' -1 cosine + 2 entropy < 0.5"
    assert gate_rule(GuardConfig(gate_threshold=0.95)) == "first-step cosine > 0.95"
    assert gate_rule(GuardConfig(gate_threshold=0.5, gate_detector="spike_share")) == "first-step spike_share < 0.5"


def test_score_helpers():
    eps_u, eps_c = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    torch.testing.assert_close(wen_score(eps_u, eps_c), torch.full((2,), math.sqrt(12)))
    uniform = torch.full((1, 4), 0.25)
    one_hot = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(attention_entropy(torch.cat([uniform, one_hot])), torch.tensor([math.log(4), 0.0]))
    score = torch.tensor([0.5, 2.0])
    assert is_cleared("wen", score, 1.0).tolist() == [True, False]  # high norm: memorized
    assert is_cleared("cosine", score, 1.0).tolist() == [False, True]  # high cosine: not memorized
    with pytest.raises(ValueError, match="detector must be one of"):
        is_cleared("norm", score, 1.0)


@pytest.mark.parametrize("detector", ["wen", "cosine", "entropy", "spike_share"])
def test_cleared_images_equal_cfg_and_flagged_ones_guard_in_one_batch(pipe, detector):
    latents = initial_latents(4)
    guard = run(pipe, GuardConfig(), latents=latents)
    cfg = run(pipe, "cfg", latents=latents)
    first = guard.report.detection.get(detector).flatten()
    distinct = first.unique()  # sorted; spike shares are fractions and may tie
    assert len(distinct) >= 2
    middle = len(distinct) // 2
    threshold = float(distinct[middle - 1] + distinct[middle]) / 2  # between the images' scores: splits them
    mixed = run(pipe, GuardConfig(gate_threshold=threshold, gate_detector=detector), latents=latents)
    cleared = mixed.report.cleared.flatten()
    assert cleared.any() and not cleared.all()
    assert torch.equal(cleared, is_cleared(detector, first, threshold))
    assert relative_error(mixed.images[cleared], cfg.images[cleared]) <= 1e-5
    assert relative_error(mixed.images[~cleared], guard.images[~cleared]) <= 1e-5


def test_after_the_decision_a_cleared_image_runs_two_rows(pipe):
    """Count the UNet batch of every call: 3 rows per image until the gate decides, then 2 per cleared image."""
    latents = initial_latents(4)
    first = run(pipe, GuardConfig(), latents=latents).report.detection.cosine.flatten()
    for threshold, flagged in ((float(first.median()), 2), (-1.0, 0), (1.0, 4)):
        batches = []
        hook = pipe.unet.register_forward_pre_hook(lambda module, args, seen=batches: seen.append(args[0].shape[0]))
        try:
            out = run(pipe, GuardConfig(gate_threshold=threshold), latents=latents, num_inference_steps=4)
        finally:
            hook.remove()
        assert int((~out.report.cleared).sum()) == flagged
        assert batches == [12] + [8 + flagged] * 3, (threshold, batches)


def test_a_later_decision_averages_the_scores_over_its_steps(pipe):
    latents = initial_latents(4)
    scores = run(pipe, GuardConfig(), latents=latents, detection_steps=2).report.detection
    assert scores.steps == 2
    threshold = float(scores.wen.flatten().median())
    batches = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        gated = run(pipe, GuardConfig(gate_threshold=threshold, gate_detector="wen", gate_steps=2), latents=latents)
    finally:
        hook.remove()
    cleared = gated.report.cleared
    assert torch.equal(cleared, scores.wen < threshold) and cleared.any()
    assert batches == [12, 12, 12 - int(cleared.sum())]  # 3 rows per image for both decision steps, then 2 per cleared


def test_detect_runs_only_the_first_steps_and_matches_the_report(pipe):
    latents = initial_latents(4)
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        screened = detect(
            pipe, list(PROMPTS), steps=2, latents=latents, num_images_per_prompt=2, num_inference_steps=10
        )
    finally:
        hook.remove()
    assert len(calls) == 2 and screened.steps == 2
    full = run(pipe, GuardConfig(), latents=latents, num_inference_steps=10, detection_steps=2).report.detection
    for name in ("wen", "cosine", "entropy", "spike_share"):
        torch.testing.assert_close(screened.get(name), full.get(name))
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        detect(pipe, "a cat", steps=0)
    with pytest.raises(TypeError, match="detect sets output_type itself"):
        detect(pipe, "a cat", output_type="pil")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"gate_detector": "norm", "gate_threshold": 1.0}, "gate_detector must be one of"),
        ({"gate_detector": "wen"}, "set gate_threshold"),
        ({"gate_steps": 2}, "set gate_threshold"),
        ({"gate_threshold": 1.0, "gate_steps": 0}, "gate_steps must be a positive integer"),
        ({"gate_threshold": -1.0, "gate_detector": "wen"}, "gate_threshold must be >= 0"),
        ({"gate_threshold": 2.0}, r"gate_threshold must be in \[-1, 1\]"),
        ({"gate_threshold": 1.5, "gate_detector": "spike_share"}, r"spike_share gate must be in \[0, 1\]"),
        ({"gate_threshold": 1.0, "gate_detector": "linear", "gate_weights": (1.0, 2.0, 3.0, 4.0)}, "3 numbers"),
    ],
)
def test_gate_settings_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GuardConfig(**kwargs)
    assert GuardConfig(gate_threshold=40.0, gate_detector="wen", gate_steps=3).gate_steps == 3


def test_scoring_past_the_gates_decision_is_refused(pipe):
    """The gate decides on its first gate_steps calls; more detection steps used to move the decision."""
    with pytest.raises(ValueError, match="exceeds the gate's gate_steps=1"):
        run(pipe, GuardConfig(gate_threshold=0.9), images=1, num_inference_steps=3, detection_steps=2)
    two = GuardConfig(gate_threshold=0.9, gate_steps=2)
    assert run(pipe, two, images=1, num_inference_steps=3, detection_steps=2).report.cleared is not None
