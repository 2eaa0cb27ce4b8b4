"""The cross-attention processor and the attenuate_cross_attention context manager on a tiny UNet."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor, AttnProcessor2_0
from sampler_utils import EagerSpikeAttention, tiny_unet

import guard.attention as guard_attention
from guard.attention import (
    GuardCrossAttnProcessor,
    attenuate_cross_attention,
    cross_attention_layers,
    default_blocks,
    select_attenuated_layers,
)
from guard.config import GuardConfig
from guard.guidance import combine_predictions

CHOSEN = ("down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block")


@pytest.fixture(scope="module")
def unet():
    return tiny_unet().eval()


def _inputs(batch=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=generator)
    text = torch.randn(batch, 77, 32, generator=generator)
    return latents, torch.tensor(500), text


def test_the_default_blocks_are_the_paper_rule_on_each_layout(unet):
    """Down blocks with cross-attention and the mid block: SD 1.x's published set, SDXL's first two
    cross-attention down blocks (its down_blocks.0 has none)."""
    layer = "{}.attentions.{}.transformer_blocks.{}.attn2"
    sd = [layer.format(*where) for where in (("down_blocks.0", 0, 0), ("down_blocks.2", 1, 0), ("down_blocks.1", 0, 0),
                                             ("mid_block", 0, 0), ("up_blocks.1", 0, 0))]  # fmt: skip
    assert default_blocks(sd) == ("down_blocks.0", "down_blocks.2", "down_blocks.1", "mid_block")
    sdxl = [layer.format(f"down_blocks.{b}", a, t) for b, n in ((1, 2), (2, 10)) for a in range(2) for t in range(n)]
    sdxl += [layer.format("mid_block", 0, t) for t in range(10)]
    assert default_blocks(sdxl) == ("down_blocks.1", "down_blocks.2", "mid_block")
    assert len(select_attenuated_layers(sdxl, None)) == len(sdxl) == 2 * 2 + 2 * 10 + 10
    with pytest.raises(ValueError, match="no cross-attention in its down or mid blocks"):
        default_blocks(["up_blocks.0.attentions.0.transformer_blocks.0.attn2"])
    assert set(select_attenuated_layers(cross_attention_layers(unet), None)) == set(
        select_attenuated_layers(cross_attention_layers(unet), CHOSEN)
    )


def test_layer_selection(unet):
    layers = cross_attention_layers(unet)
    assert len(layers) == 8 and all(name.endswith(".attn2") for name in layers)
    chosen = select_attenuated_layers(layers, CHOSEN)
    assert len(chosen) == 4 and not any(name.startswith("up_blocks") for name in chosen)
    # Prefixes match whole dotted components only.
    names = ["down_blocks.1.attentions.0.transformer_blocks.0.attn2", "down_blocks.10.attentions.0.attn2"]
    assert select_attenuated_layers(names, ("down_blocks.1",)) == (names[0],)
    assert select_attenuated_layers(names, ("down_blocks.1.attentions.0",)) == (names[0],)
    with pytest.raises(ValueError, match="'down_blocks.3' matches no cross-attention"):
        select_attenuated_layers(layers, ("down_blocks.0", "down_blocks.3"))


@torch.no_grad()
def test_plain_rows_equal_the_stock_processor(unet):
    latents, t, text = _inputs()
    expected = unet(latents, t, encoder_hidden_states=text).sample
    originals = dict(unet.attn_processors)
    with attenuate_cross_attention(unet, None, GuardConfig()) as session:
        installed = unet.attn_processors
        got = unet(latents, t, encoder_hidden_states=text).sample
    assert sum(isinstance(p, GuardCrossAttnProcessor) for p in installed.values()) == 8
    # Self-attention keeps its processor behind a wrapper that takes the session argument and
    # ignores it; every processor comes back afterwards.
    assert all(installed[k].original is originals[k] for k in originals if ".attn1." in k)
    assert all(unet.attn_processors[k] is originals[k] for k in originals)
    assert session.spike_counts() == {}
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_spike_rows_match_eager_attenuation_only_in_chosen_blocks(unet):
    latents, t, text = _inputs()
    rows = torch.tensor([False, True, False])
    config = GuardConfig(blocks=("down_blocks.1", "mid_block"))
    originals = dict(unet.attn_processors)
    eager = {
        key: EagerSpikeAttention(rows, config.spike_threshold, config.spike_scale)
        if key.startswith(("down_blocks.1.", "mid_block.")) and ".attn2." in key
        else processor
        for key, processor in originals.items()
    }
    unet.set_attn_processor(dict(eager))
    try:
        expected = unet(latents, t, encoder_hidden_states=text).sample
    finally:
        unet.set_attn_processor(dict(originals))
    plain = unet(latents, t, encoder_hidden_states=text).sample
    with attenuate_cross_attention(unet, rows, config) as session:
        got = unet(latents, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Rows outside spike_rows are plain attention, bit for bit the same maths as without GUARD.
    torch.testing.assert_close(got[[0, 2]], plain[[0, 2]], rtol=1e-5, atol=1e-5)
    assert (got[1] - plain[1]).abs().max() > 1e-3
    counts = session.spike_counts()
    assert set(counts) == set(session.attenuated_layers) and len(counts) == 2
    for key, processor in eager.items():
        if isinstance(processor, EagerSpikeAttention):
            name = key[: -len(".processor")]
            assert torch.equal(counts[name].long(), processor.flags)
            assert counts[name][[0, 2]].sum() == 0 and counts[name][1].sum() > 0


def test_attenuation_reaches_only_positive_rows_and_chosen_layers(unet, monkeypatch):
    """Record, per kernel call, which layer called it and with which spike_rows."""
    calls = []
    current = {}
    real = guard_attention.cross_attention

    def recording(q, k, v, **kwargs):
        calls.append((current["layer"], kwargs["spike_rows"]))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(guard_attention, "cross_attention", recording)
    layers = cross_attention_layers(unet)
    hooks = [
        module.register_forward_pre_hook(lambda module, args, name=name: current.__setitem__("layer", name))
        for name, module in layers.items()
    ]
    rows = torch.tensor([False, False, True, True, False, False])
    try:
        latents, t, text = _inputs(batch=6)
        with torch.no_grad(), attenuate_cross_attention(unet, rows, GuardConfig()):
            unet(latents, t, encoder_hidden_states=text)
    finally:
        for hook in hooks:
            hook.remove()
    # On the CPU, layers outside the chosen blocks keep the replaced processor (plain SDPA): only
    # the chosen layers reach the kernel, each with exactly the positive rows.
    chosen = sorted(name for name in layers if name.startswith(CHOSEN))
    assert chosen and len(chosen) < len(layers)
    assert sorted(name for name, _ in calls) == chosen
    for name, spike_rows in calls:
        assert spike_rows is not None and torch.equal(spike_rows, rows), name


@torch.no_grad()
def test_encoder_mask_becomes_token_bias(unet):
    latents, t, text = _inputs()
    mask = torch.ones(3, 77)
    mask[:, 9:] = 0  # padding masked out
    expected = unet(latents, t, encoder_hidden_states=text, encoder_attention_mask=mask).sample
    unmasked = unet(latents, t, encoder_hidden_states=text).sample
    with attenuate_cross_attention(unet, None, GuardConfig()):
        got = unet(latents, t, encoder_hidden_states=text, encoder_attention_mask=mask).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - unmasked).abs().max() > 1e-3

    rows = torch.tensor([True, False, True])
    originals = dict(unet.attn_processors)
    eager = {
        key: EagerSpikeAttention(rows, 0.1, 0.3) if key.startswith(CHOSEN) and ".attn2." in key else processor
        for key, processor in originals.items()
    }
    unet.set_attn_processor(dict(eager))
    try:
        expected = unet(latents, t, encoder_hidden_states=text, encoder_attention_mask=mask).sample
    finally:
        unet.set_attn_processor(dict(originals))
    with attenuate_cross_attention(unet, rows, GuardConfig()):
        got = unet(latents, t, encoder_hidden_states=text, encoder_attention_mask=mask).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_processor_handles_4d_inputs_group_norm_norm_cross_residual_and_rescale():
    torch.manual_seed(0)
    attn = Attention(
        query_dim=16,
        cross_attention_dim=16,
        heads=2,
        dim_head=8,
        norm_num_groups=4,
        cross_attention_norm="layer_norm",
        residual_connection=True,
        rescale_output_factor=2.0,
        processor=AttnProcessor2_0(),
    )
    holder = torch.nn.Module()
    holder.block = torch.nn.Module()
    holder.block.attn2 = attn
    hidden = torch.randn(2, 16, 3, 5)
    text = torch.randn(2, 7, 16)
    bool_mask = torch.ones(2, 1, 7, dtype=torch.bool)
    bool_mask[0, 0, 4:] = False
    expected = attn(hidden, encoder_hidden_states=text)
    expected_masked = attn(hidden, encoder_hidden_states=text, attention_mask=bool_mask)
    with attenuate_cross_attention(holder, None, GuardConfig(blocks=("block",))):
        got = attn(hidden, encoder_hidden_states=text)
        got_masked = attn(hidden, encoder_hidden_states=text, attention_mask=bool_mask)
        # Called without encoder states an attn2 layer is self-attention: the original handles it.
        torch.testing.assert_close(attn(hidden), AttnProcessor2_0()(attn, hidden))
    assert got.shape == (2, 16, 3, 5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_masked, expected_masked, rtol=1e-5, atol=1e-5)
    assert (got_masked - got).abs().max() > 1e-4


def test_processors_are_restored_after_an_exception(unet):
    originals = dict(unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with attenuate_cross_attention(unet, None, GuardConfig()):
            raise RuntimeError("boom")
    assert all(unet.attn_processors[k] is originals[k] for k in originals)


def test_nested_sessions_restore_the_outer_one(unet):
    with attenuate_cross_attention(unet, None, GuardConfig()):
        outer = dict(unet.attn_processors)
        with attenuate_cross_attention(unet, None, GuardConfig(blocks=("mid_block",))):
            pass
        assert all(unet.attn_processors[k] is outer[k] for k in outer)


def test_bad_arguments_raise_clear_errors(unet):
    latents, t, text = _inputs()
    with pytest.raises(ValueError, match="'down_blocks.3' matches no cross-attention"):
        with attenuate_cross_attention(unet, torch.ones(2, dtype=torch.bool), GuardConfig(blocks=("down_blocks.3",))):
            pass
    with attenuate_cross_attention(unet, None, GuardConfig(blocks=("down_blocks.3",))) as session:
        assert session.attenuated_layers == ()  # no spike rows: nothing attenuated, blocks not checked
    with pytest.raises(TypeError, match="config must be a GuardConfig"):
        with attenuate_cross_attention(unet, None, {"blocks": CHOSEN}):
            pass
    with pytest.raises(ValueError, match="backend must be one of"):
        with attenuate_cross_attention(unet, None, GuardConfig(), backend="cuda"):
            pass
    with pytest.raises(TypeError, match="spike_rows must be None, a 1-D bool tensor"):
        with attenuate_cross_attention(unet, torch.tensor([0, 1, 0]), GuardConfig()):
            pass
    with pytest.raises(TypeError, match="token_bias must be None or a float tensor"):
        with attenuate_cross_attention(unet, None, GuardConfig(), token_bias=torch.zeros(3, 77, dtype=torch.long)):
            pass
    with torch.no_grad(), pytest.raises(ValueError, match="token_scale covers 2 rows but the UNet batch has 3"):
        with attenuate_cross_attention(unet, None, GuardConfig(), token_scale=torch.ones(2, 77)):
            unet(latents, t, encoder_hidden_states=text)
    with pytest.raises(ValueError, match="has no cross-attention"):
        with attenuate_cross_attention(torch.nn.Linear(2, 2), None, GuardConfig()):
            pass
    with torch.no_grad(), pytest.raises(ValueError, match="spike_rows covers 2 rows but the UNet batch has 3"):
        with attenuate_cross_attention(unet, torch.tensor([True, False]), GuardConfig()):
            unet(latents, t, encoder_hidden_states=text)
    assert not any(isinstance(p, GuardCrossAttnProcessor) for p in unet.attn_processors.values())


def test_refuses_processors_with_extra_weights_or_inputs(unet):
    layer = next(iter(cross_attention_layers(unet).values()))
    original = layer.processor
    layer.set_processor(AttnAddedKVProcessor())
    try:
        before = dict(unet.attn_processors)
        with pytest.raises(ValueError, match="uses AttnAddedKVProcessor, which GUARD cannot replace"):
            with attenuate_cross_attention(unet, None, GuardConfig()):
                pass
        assert all(unet.attn_processors[k] is before[k] for k in before)
    finally:
        layer.set_processor(original)


def test_no_host_sync_in_a_guarded_step(unet, monkeypatch):
    """UNet call, spike statistics and guidance must not read device values back to the host."""
    latents, t, text = _inputs(batch=6)
    rows = torch.tensor([False, False, True, True, False, False])
    config = GuardConfig(orthogonalize=True)
    with torch.no_grad(), attenuate_cross_attention(unet, rows, config) as session:
        for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"):
            monkeypatch.setattr(torch.Tensor, name, _forbidden(name))
        out = unet(torch.cat([latents[:2]] * 3), t, encoder_hidden_states=text).sample
        guided, norms = combine_predictions(out, 0, 4, config, return_norms=True)
        counts = session.spike_counts()
        monkeypatch.undo()
    assert guided.shape == (2, 4, 8, 8) and norms.attraction.shape == (2,)
    assert len(counts) == 4 and all(c.device == out.device for c in counts.values())


def _forbidden(name):
    def method(*args, **kwargs):
        raise AssertionError(f"host synchronisation through Tensor.{name}")

    return method


# ----------------------------------------------------------------------------- torch.compile


@torch.no_grad()
def test_a_guard_unet_call_compiles_without_a_graph_break_and_matches_eager(unet):
    """The session reaches the processors as a call argument, so dynamo traces the whole UNet."""
    import torch._dynamo

    latents, t, text = _inputs(batch=6)
    config = GuardConfig()
    torch._dynamo.reset()
    with attenuate_cross_attention(unet, slice(2, 4), config) as session:
        session.prepare_counts(6, 77, "cpu")

        def call(x, timestep, states):
            return unet(x, timestep, encoder_hidden_states=states, cross_attention_kwargs=session.unet_kwargs).sample

        explanation = torch._dynamo.explain(call)(latents, t, text)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        session.reset_statistics()
        session.prepare_counts(6, 77, "cpu")
        eager = call(latents, t, text)
        eager_counts = {name: counts.clone() for name, counts in session.spike_counts().items()}
        session.reset_statistics()
        session.prepare_counts(6, 77, "cpu")
        compiled = torch.compile(call, backend="aot_eager")
        got = compiled(latents, t, text)
        again = compiled(latents, t, text)  # statistics keep accumulating in the compiled graph
    torch._dynamo.reset()
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, eager, rtol=1e-5, atol=1e-5)
    assert eager_counts and any(c.sum() > 0 for c in eager_counts.values())
    for name, counts in session.spike_counts().items():
        assert torch.equal(counts, 2 * eager_counts[name]), name


# ----------------------------------------------------------------------------- concurrent sessions


def test_concurrent_sessions_on_one_unet_see_only_their_own_rows(unet):
    """Two threads, two settings, one UNet: each call equals the same call made alone."""
    import threading

    latents, t, text = _inputs(batch=6)
    settings = [(slice(2, 4), GuardConfig()), (torch.tensor([True, False] * 3), GuardConfig(spike_threshold=-0.5))]
    originals = dict(unet.attn_processors)

    def alone(rows, config):
        with torch.no_grad(), attenuate_cross_attention(unet, rows, config) as session:
            out = unet(latents, t, encoder_hidden_states=text).sample
        return out, {name: c.clone() for name, c in session.spike_counts().items()}

    expected = [alone(*setting) for setting in settings]
    barrier = threading.Barrier(2)
    results = [None, None]

    def worker(index):
        rows, config = settings[index]
        with torch.no_grad(), attenuate_cross_attention(unet, rows, config) as session:
            barrier.wait()  # both sessions open on the UNet at once
            outs = [unet(latents, t, encoder_hidden_states=text).sample for _ in range(3)]
            barrier.wait()
        results[index] = outs, session.spike_counts()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for (outs, counts), (want, want_counts) in zip(results, expected):
        for out in outs:
            torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
        for name, c in counts.items():
            assert torch.equal(c, 3 * want_counts[name]), name
    assert all(unet.attn_processors[k] is originals[k] for k in originals)  # the UNet's own processors are back
