"""The guidance arithmetic (arXiv 2603.00133, sec. 3-4): GUARD, CFG, the transition rule and the gate."""

import math

import pytest
import torch

from guard.config import GuardConfig
from guard.guidance import (
    cfg_guidance,
    combine_predictions,
    guard_guidance,
    memorization_gate,
    repulsion_weight,
    transition_guidance,
)


@pytest.mark.parametrize(
    "schedule, formula",
    [
        ("cosine", lambda p: math.cos(math.pi / 2 * p)),
        ("linear", lambda p: 1.0 - p),
        ("sine", lambda p: math.sin(math.pi / 2 * p)),
        ("constant", lambda p: 1.0),
    ],
)
def test_repulsion_schedules(schedule, formula):
    config = GuardConfig(repulsion_scale=1.7, repulsion_schedule=schedule)
    for step in range(10):
        assert repulsion_weight(step, 10, config) == pytest.approx(1.7 * formula(step / 10), abs=1e-12)


@pytest.mark.parametrize(
    "step, steps, error",
    [(5, 5, ValueError), (-1, 5, ValueError), (0, 0, ValueError), (1.0, 5, TypeError), (True, 5, TypeError)],
)
def test_repulsion_weight_rejects_bad_steps(step, steps, error):
    with pytest.raises(error, match="step_index|num_steps"):
        repulsion_weight(step, steps, GuardConfig())


def _predictions(batch=3, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 4, 5, 5, generator=generator).to(dtype) for _ in range(3)]


def test_guard_guidance_is_the_spec_formula():
    eps_u, eps_pos, eps_neg = _predictions()
    config = GuardConfig(guidance_scale=6.0, repulsion_scale=1.5)
    for step in (0, 3, 7):
        w_neg = 1.5 * math.cos(math.pi / 2 * step / 8)
        expected = eps_u + 6.0 * (eps_pos - eps_u) - w_neg * (eps_neg - eps_u)
        torch.testing.assert_close(guard_guidance(eps_u, eps_pos, eps_neg, step, 8, config), expected)


def test_guard_without_repulsion_is_bitwise_cfg():
    eps_u, eps_pos, eps_neg = _predictions()
    config = GuardConfig(repulsion_scale=0.0)
    assert torch.equal(guard_guidance(eps_u, eps_pos, eps_neg, 0, 4, config), eps_u + 7.5 * (eps_pos - eps_u))
    assert torch.equal(cfg_guidance(eps_u, eps_pos, 7.5), eps_u + 7.5 * (eps_pos - eps_u))


def test_orthogonalisation_is_per_image_and_clipped():
    generator = torch.Generator().manual_seed(3)
    eps_u = torch.randn(3, 2, 4, 4, generator=generator)
    v_neg = torch.randn(3, 2, 4, 4, generator=generator)
    noise = torch.randn(3, 2, 4, 4, generator=generator)
    v_pos = torch.stack(
        [
            0.5 * v_neg[0] + 0.01 * noise[0],  # aligned: cos > 0.9, coefficient ~0.5 removed
            3.0 * v_neg[1] + 0.01 * noise[1],  # aligned, coefficient ~3 clipped to 2
            noise[2],  # unrelated: untouched
        ]
    )
    config = GuardConfig(orthogonalize=True, guidance_scale=7.5, repulsion_scale=2.0)
    got, norms = guard_guidance(eps_u, eps_u + v_pos, eps_u + v_neg, 2, 4, config, return_norms=True)

    w_neg = 2.0 * math.cos(math.pi / 2 * 0.5)
    expected = []
    for b in range(3):
        a, c = v_pos[b].flatten().double(), v_neg[b].flatten().double()
        coef = float(a @ c / (c @ c + 1e-8))
        cos = float(a @ c / (math.sqrt(a @ a + 1e-8) * math.sqrt(c @ c + 1e-8)))
        adjusted = v_pos[b] - max(-2.0, min(2.0, coef)) * v_neg[b] if cos > 0.9 else v_pos[b]
        expected.append(eps_u[b] + 7.5 * adjusted - w_neg * v_neg[b])
        assert float(norms.cosine[b]) == pytest.approx(cos, abs=1e-5)
        assert float(norms.attraction[b]) == pytest.approx(7.5 * float(adjusted.norm()), rel=1e-4)
        assert float(norms.repulsion[b]) == pytest.approx(w_neg * float(v_neg[b].norm()), rel=1e-5)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-5)
    # The clipped image kept one v_neg of its attraction; the aligned one lost almost all of it.
    assert float(norms.attraction[0]) < 0.05 * 7.5 * float(v_pos[0].norm())
    assert float(norms.attraction[1]) == pytest.approx(7.5 * float(v_neg[1].norm()), rel=0.05)
    plain = guard_guidance(eps_u, eps_u + v_pos, eps_u + v_neg, 2, 4, config.replace(orthogonalize=False))
    torch.testing.assert_close(got[2], plain[2], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[:2], plain[:2], atol=1e-2)


def test_orthogonalisation_runs_in_float32_for_half_inputs():
    eps_u, eps_pos, eps_neg = _predictions(dtype=torch.float16)
    eps_pos = eps_u + 0.5 * (eps_neg - eps_u)  # aligned, so the orthogonalisation acts
    config = GuardConfig(orthogonalize=True)
    got = guard_guidance(eps_u, eps_pos, eps_neg, 1, 4, config)
    assert got.dtype == torch.float16
    expected = guard_guidance(eps_u.float(), eps_pos.float(), eps_neg.float(), 1, 4, config)
    torch.testing.assert_close(got, expected.half())


def test_guidance_argument_errors():
    eps_u, eps_pos, eps_neg = _predictions()
    config = GuardConfig()
    with pytest.raises(ValueError, match="eps_neg has shape"):
        guard_guidance(eps_u, eps_pos, eps_neg[:2], 0, 4, config)
    with pytest.raises(ValueError, match="eps_pos is torch.float16"):
        guard_guidance(eps_u, eps_pos.half(), eps_neg, 0, 4, config)
    with pytest.raises(TypeError, match="eps_u must be a torch.Tensor"):
        guard_guidance(eps_u.numpy(), eps_pos, eps_neg, 0, 4, config)
    with pytest.raises(ValueError, match="method='guard'"):
        guard_guidance(eps_u, eps_pos, eps_neg, 0, 4, GuardConfig(method="attenuation"))
    with pytest.raises(TypeError, match="config must be a GuardConfig"):
        guard_guidance(eps_u, eps_pos, eps_neg, 0, 4, {"method": "guard"})
    with pytest.raises(ValueError, match="step_index must be in"):
        guard_guidance(eps_u, eps_pos, eps_neg, 4, 4, config)
    with pytest.raises(ValueError, match="guidance_scale must be finite"):
        cfg_guidance(eps_u, eps_pos, float("nan"))
    with pytest.raises(ValueError, match="not a multiple of the 3 branches"):
        combine_predictions(torch.cat([eps_u, eps_pos[:1]]), 0, 4, config)


def test_combine_predictions_splits_row_groups_by_method():
    eps_u, eps_pos, eps_neg = _predictions()
    config = GuardConfig()
    torch.testing.assert_close(
        combine_predictions(torch.cat([eps_u, eps_pos, eps_neg]), 1, 5, config),
        guard_guidance(eps_u, eps_pos, eps_neg, 1, 5, config),
    )
    for method in ("attenuation", "cfg"):
        got, norms = combine_predictions(
            torch.cat([eps_u, eps_pos]), 1, 5, GuardConfig(method=method), return_norms=True
        )
        torch.testing.assert_close(got, eps_u + 7.5 * (eps_pos - eps_u))
        assert torch.all(norms.repulsion == 0) and torch.all(torch.isnan(norms.cosine))
        torch.testing.assert_close(norms.attraction, 7.5 * (eps_pos - eps_u).flatten(1).norm(dim=1))


def test_transition_guidance_switches_on_the_timestep():
    eps_u, eps_c, _ = _predictions()
    config = GuardConfig(method="jain", guidance_scale=7.5, transition_timestep=500, early_guidance_scale=-2.0)
    for t, scale in ((999, -2.0), (501, -2.0), (500, 7.5), (1, 7.5)):
        expected = eps_u + scale * (eps_c - eps_u)
        torch.testing.assert_close(transition_guidance(eps_u, eps_c, torch.tensor(t), config), expected)
        torch.testing.assert_close(
            combine_predictions(torch.cat([eps_u, eps_c]), 0, 4, config, timestep=torch.tensor(t)), expected
        )
    with pytest.raises(ValueError, match="method 'jain' needs the scheduler's timestep"):
        combine_predictions(torch.cat([eps_u, eps_c]), 0, 4, config)
    with pytest.raises(ValueError, match="timestep must be a scalar"):
        transition_guidance(eps_u, eps_c, torch.tensor([1, 2]), config)


def test_memorization_gate_marks_images_whose_attenuation_barely_moves_the_prediction():
    eps_u, eps_pos, eps_neg = _predictions(batch=3)
    eps_pos = eps_pos.clone()
    eps_pos[0] = eps_neg[0]  # attenuation changed nothing: cosine 1
    eps_pos[1] = 2 * eps_u[1] - eps_neg[1]  # it reversed the guidance: cosine -1
    eps_pos[2] = eps_neg[2] + 0.7 * (eps_pos[2] - eps_u[2])  # in between
    v_pos, v_neg = (eps_pos[2] - eps_u[2]).flatten(), (eps_neg[2] - eps_u[2]).flatten()
    cosine = float(v_pos @ v_neg / (v_pos.norm() * v_neg.norm()))
    for threshold, third in ((cosine - 1e-3, True), (cosine + 1e-3, False)):
        gate = memorization_gate(eps_u, eps_pos, eps_neg, GuardConfig(gate_threshold=threshold))
        assert gate.dtype == torch.bool and gate.tolist() == [True, False, third]
    with pytest.raises(ValueError, match="gate_threshold set"):
        memorization_gate(eps_u, eps_pos, eps_neg, GuardConfig())


def test_gated_images_get_plain_cfg_and_the_others_guard():
    eps_u, eps_pos, eps_neg = _predictions(batch=3)
    config = GuardConfig(guidance_scale=3.0, repulsion_scale=1.0, gate_threshold=0.5)
    plain = torch.tensor([True, False, True])
    out, norms = guard_guidance(eps_u, eps_pos, eps_neg, 0, 4, config, cleared=plain, return_norms=True)
    guard_only = guard_guidance(eps_u, eps_pos, eps_neg, 0, 4, config)
    cfg = cfg_guidance(eps_u, eps_neg, 3.0)
    assert torch.equal(out[plain], cfg[plain]) and torch.equal(out[~plain], guard_only[~plain])
    assert norms.repulsion[plain].eq(0).all() and norms.repulsion[~plain].gt(0).all()
    torch.testing.assert_close(norms.attraction[plain], 3.0 * (eps_neg - eps_u)[plain].flatten(1).norm(dim=1))
    via_groups = combine_predictions(torch.cat([eps_u, eps_pos, eps_neg]), 0, 4, config, cleared=plain)
    assert torch.equal(via_groups, out)
    with pytest.raises(TypeError, match="bool tensor"):
        guard_guidance(eps_u, eps_pos, eps_neg, 0, 4, config, cleared=torch.ones(3))
    with pytest.raises(ValueError, match="one entry per image"):
        guard_guidance(eps_u, eps_pos, eps_neg, 0, 4, config, cleared=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs method 'guard'"):
        combine_predictions(torch.cat([eps_u, eps_pos]), 0, 4, GuardConfig(method="cfg"), cleared=plain)
