"""GuardConfig: the published defaults, presets, and validation (bad values refused the kernel's way)."""

import dataclasses

import numpy as np
import pytest
import torch

from guard.config import DEFAULT_BLOCKS, PRESETS, GuardConfig
from guard_kernels import cross_attention


def test_defaults_are_the_published_guard_run():
    config = GuardConfig()
    assert config.method == "guard"
    assert (config.guidance_scale, config.repulsion_scale, config.repulsion_schedule) == (7.5, 2.0, "cosine")
    assert (config.spike_threshold, config.spike_scale) == (0.1, 0.3)
    assert config.blocks is None  # the paper's rule, resolved on the UNet (tests/test_attention.py)
    assert DEFAULT_BLOCKS == ("down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block")
    assert config.orthogonalize is False
    assert (config.ortho_cos_threshold, config.ortho_coef_clip) == (0.9, 2.0)
    assert config.branches == 3


def test_presets():
    assert set(PRESETS) == {
        "guard",
        "attenuation",
        "guard-released",
        "cfg",
        "ren",
        "jain",
        "jain-opposite",
        "jain-dynamic",
        "somepalli",
        "wen",
    }
    assert GuardConfig.preset("guard") == GuardConfig()
    attenuation = GuardConfig.preset("attenuation")
    assert (attenuation.method, attenuation.spike_threshold, attenuation.spike_scale) == ("attenuation", 0.01, 0.3)
    assert attenuation.branches == 2
    released = GuardConfig.preset("guard-released")
    assert released.orthogonalize and released.method == "guard"
    assert GuardConfig.preset("cfg").method == "cfg" and not GuardConfig.preset("cfg").attenuates
    assert GuardConfig.preset("attenuation", guidance_scale=5.0).guidance_scale == 5.0
    assert GuardConfig.preset("ren").bos_scale == 1.25
    jain = GuardConfig.preset("jain")
    assert (jain.transition_timestep, jain.early_guidance_scale) == (500.0, 1.0)
    assert GuardConfig.preset("jain-opposite").early_guidance_scale == -2.0
    assert GuardConfig.preset("somepalli").embedding_noise_scale == 0.1
    assert GuardConfig.preset("jain-dynamic").transition == "dynamic"
    wen = GuardConfig.preset("wen")
    assert (wen.method, wen.wen_learning_rate, wen.wen_iterations, wen.wen_target_loss) == ("wen", 0.05, 10, 3.0)
    assert not any(GuardConfig.preset(name).attenuates for name in ("cfg", "ren", "jain", "somepalli", "wen"))
    with pytest.raises(ValueError, match="unknown GuardConfig preset 'nope'"):
        GuardConfig.preset("nope")
    with pytest.raises(TypeError, match="unknown GuardConfig field"):
        GuardConfig.preset("guard", tau=0.2)
    with pytest.raises(TypeError):
        PRESETS["guard"]["method"] = "cfg"  # presets are read-only


def test_config_is_frozen_and_replace_validates():
    config = GuardConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.method = "cfg"
    assert config.replace(repulsion_scale=0).repulsion_scale == 0.0
    with pytest.raises(ValueError, match="repulsion_scale must be >= 0"):
        config.replace(repulsion_scale=-1)
    assert GuardConfig(blocks=["mid_block"]).blocks == ("mid_block",)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"method": "pag"}, ValueError, "method must be one of"),
        ({"repulsion_schedule": "exp"}, ValueError, "repulsion_schedule must be one of"),
        ({"guidance_scale": -1.0}, ValueError, "guidance_scale must be >= 0"),
        ({"repulsion_scale": -0.5}, ValueError, "repulsion_scale must be >= 0"),
        ({"spike_scale": -0.1}, ValueError, "spike_scale must be >= 0"),
        ({"ortho_coef_clip": -2.0}, ValueError, "ortho_coef_clip must be >= 0"),
        ({"guidance_scale": float("nan")}, ValueError, "guidance_scale must be finite"),
        ({"spike_threshold": float("inf")}, ValueError, "spike_threshold must be finite"),
        ({"spike_scale": "0.3"}, TypeError, "spike_scale must be a real number"),
        ({"repulsion_scale": True}, TypeError, "repulsion_scale must be a real number"),
        ({"ortho_cos_threshold": 1.5}, ValueError, r"ortho_cos_threshold must be in \[-1, 1\]"),
        ({"orthogonalize": 1}, TypeError, "orthogonalize must be a bool"),
        ({"blocks": ()}, ValueError, "blocks must name at least one"),
        ({"blocks": "mid_block"}, TypeError, "got the string 'mid_block'"),
        ({"blocks": ("down_blocks..0",)}, ValueError, "dotted module-name prefixes"),
        ({"blocks": (" mid_block",)}, ValueError, "dotted module-name prefixes"),
        ({"blocks": ("mid_block.",)}, ValueError, "dotted module-name prefixes"),
        ({"blocks": ("mid_block", 3)}, ValueError, "dotted module-name prefixes"),
        ({"blocks": ("mid_block", "mid_block")}, ValueError, "duplicates"),
        ({"blocks": 5}, TypeError, "sequence of module-name prefixes"),
        ({"bos_scale": -1.0}, ValueError, "bos_scale must be >= 0"),
        ({"transition_timestep": float("nan")}, ValueError, "transition_timestep must be finite"),
        ({"early_guidance_scale": float("-inf")}, ValueError, "early_guidance_scale must be finite"),
        ({"embedding_noise_scale": -0.1}, ValueError, "embedding_noise_scale must be >= 0"),
        ({"gate_threshold": 1.01}, ValueError, r"gate_threshold must be in \[-1, 1\]"),
        ({"gate_threshold": -1.5}, ValueError, "gate_threshold must be >= -1"),
        ({"gate_threshold": "0.9"}, TypeError, "gate_threshold must be a real number"),
        ({"gate_threshold": 0.9, "method": "attenuation"}, ValueError, "gate_threshold needs method 'guard'"),
    ],
)
def test_bad_configs_raise_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        GuardConfig(**kwargs)


def test_negative_threshold_is_a_valid_z_score():
    assert GuardConfig(spike_threshold=-0.5).spike_threshold == -0.5


SCALARS = [
    (0.3, True),
    (np.float32(0.3), True),
    (np.int64(2), True),
    (np.array(0.25), True),
    (torch.tensor(0.3), True),
    (torch.tensor(2), True),
    (True, False),
    (np.bool_(True), False),
    ("0.3", False),
    (None, False),
    (torch.tensor([0.3]), False),
    (float("nan"), False),
    (float("inf"), False),
    (-0.1, False),  # a negative scale
]


@pytest.mark.parametrize("value, accepted", SCALARS, ids=repr)
def test_config_and_kernel_accept_and_refuse_the_same_spike_scales(value, accepted):
    """One owner per check: GuardConfig and guard_kernels.cross_attention agree value by value."""
    q = torch.randn(1, 4, 1, 8)
    k = torch.randn(1, 5, 1, 8)
    outcomes = []
    for attempt in (
        lambda: GuardConfig(spike_scale=value),
        lambda: cross_attention(q, k, k, spike_rows=torch.tensor([True]), spike_scale=value),
    ):
        try:
            attempt()
            outcomes.append(None)
        except (TypeError, ValueError) as error:
            outcomes.append(type(error))
    assert outcomes[0] == outcomes[1]
    assert (outcomes[0] is None) == accepted
    if accepted:
        assert GuardConfig(spike_scale=value).spike_scale == float(value)
