"""guard_kernels.testing: the upcast reference against an independent one, and the error-budget rule.

Every kernel test trusts ``reference_attention``, so it is checked here against a reference written
the other way round: plain Python floats, one (row, head) and one query at a time, explicit sums.
"""

import math
import zlib

import pytest
import torch

from guard_kernels.testing import (
    ERROR_FACTOR,
    ERROR_FLOOR,
    Reference,
    abs_err,
    error_budget,
    reference_attention,
    rel_err,
)


def loop_reference(q, k, v, scale, spike_rows, threshold, alpha, token_scale, token_bias):
    """GUARD cross-attention in Python floats, per (row, head) and per query; returns nested lists."""
    batch, nq, heads, dim = q.shape
    nk = k.shape[1]
    q, k, v = q.tolist(), k.tolist(), v.tolist()

    def per_token(token, b, h, default):
        if token is None:
            return [default] * nk
        return token[b].tolist() if token.dim() == 2 else token[b, h].tolist()

    out = [[[[0.0] * dim for _ in range(heads)] for _ in range(nq)] for _ in range(batch)]
    peaks, mass, spikes, zs = ({} for _ in range(4))
    for b in range(batch):
        for h in range(heads):
            logits = [
                [scale * sum(q[b][i][h][d] * k[b][j][h][d] for d in range(dim)) for j in range(nk)] for i in range(nq)
            ]
            peak = [max(logits[i][j] for i in range(nq)) for j in range(nk)]
            z = [math.nan] * nk
            if nk >= 3:
                body = peak[1:]
                mean = sum(body) / len(body)
                std = math.sqrt(sum((x - mean) ** 2 for x in body) / (len(body) - 1))
                z[1:] = [(x - mean) / (std + 1e-6) for x in body]
            spiked = [bool(spike_rows is not None and spike_rows[b] and j >= 1 and z[j] > threshold) for j in range(nk)]
            scales, biases = per_token(token_scale, b, h, 1.0), per_token(token_bias, b, h, 0.0)
            token_mass = [0.0] * nk
            for i in range(nq):
                final = [logits[i][j] * scales[j] * (alpha if spiked[j] else 1.0) + biases[j] for j in range(nk)]
                live = [x for x in final if x != -math.inf]
                if not live:  # every key masked: the query outputs zeros
                    continue
                top = max(live)
                weights = [0.0 if x == -math.inf else math.exp(x - top) for x in final]
                total = sum(weights)
                probs = [w / total for w in weights]
                for j in range(nk):
                    token_mass[j] += probs[j]
                for d in range(dim):
                    out[b][i][h][d] = sum(probs[j] * v[b][j][h][d] for j in range(nk))
            peaks[b, h], mass[b, h], spikes[b, h], zs[b, h] = peak, token_mass, spiked, z
    stack = lambda table: [[table[b, h] for h in range(heads)] for b in range(batch)]  # noqa: E731
    return out, stack(peaks), stack(mass), stack(spikes), stack(zs)


CASES = {
    # name: (B, Nq, H, Nk, D, token_scale shape, token_bias shape, spike_rows, threshold)
    "spikes-scaleBHN-biasBN": (3, 20, 2, 12, 16, "BHN", "BN", (True, False, True), 0.1),
    "spikes-scaleBN-biasBHN": (2, 17, 2, 9, 8, "BN", "BHN", (True, True), 0.5),
    "two-keys-negative-threshold": (2, 6, 1, 2, 4, None, None, (True, True), -1.0),
    "no-spike-rule": (2, 9, 2, 7, 8, None, "BN", None, 0.1),
}


def draw(name, batch, nq, heads, nk, dim, scale_shape, bias_shape):
    """Fresh random inputs with clear spikes, token modulation and, with a bias, one fully masked row."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q = torch.randn(batch, nq, heads, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, nk, heads, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, nk, heads, dim, generator=gen, dtype=torch.float64)
    if nk >= 4:
        k[:, 2] += 2.0 * q.mean(dim=1)  # a key most queries agree with: a spike
    shapes = {"BN": (batch, nk), "BHN": (batch, heads, nk)}
    token_scale = None if scale_shape is None else 0.5 + torch.rand(shapes[scale_shape], generator=gen).double()
    token_bias = None
    if bias_shape is not None:
        token_bias = 0.5 * torch.randn(shapes[bias_shape], generator=gen, dtype=torch.float64)
        token_bias[0, ..., 3::3] = -math.inf  # some masked tokens
        token_bias[-1] = -math.inf  # a fully masked row
    return q, k, v, token_scale, token_bias


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_an_independent_loop_reference(name):
    batch, nq, heads, nk, dim, scale_shape, bias_shape, rows, threshold = CASES[name]
    q, k, v, token_scale, token_bias = draw(name, batch, nq, heads, nk, dim, scale_shape, bias_shape)
    spike_rows = None if rows is None else torch.tensor(rows)
    scale = 0.7 / math.sqrt(dim)
    ref = reference_attention(
        q, k, v, scale=scale, spike_rows=spike_rows, spike_threshold=threshold, spike_scale=0.3,
        token_scale=token_scale, token_bias=token_bias,
    )  # fmt: skip
    assert isinstance(ref, Reference) and all(t.dtype == torch.float64 for t in (ref.out, ref.mass, ref.z))
    out, peaks, mass, spikes, z = loop_reference(q, k, v, scale, rows, threshold, 0.3, token_scale, token_bias)
    expected = torch.tensor(z, dtype=torch.float64)
    assert torch.equal(torch.isnan(ref.z), torch.isnan(expected))
    torch.testing.assert_close(ref.z, expected, rtol=0, atol=1e-9, equal_nan=True)
    assert torch.equal(ref.spikes, torch.tensor(spikes))
    if rows is not None and nk >= 4:
        assert ref.spikes.any(), "the case was meant to contain spikes"
    for got, want in ((ref.out, out), (ref.max_logit, peaks), (ref.mass, mass)):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    if bias_shape is not None:
        assert torch.equal(ref.out[-1], torch.zeros_like(ref.out[-1])) and not ref.mass[-1].any()


def test_low_precision_yardstick_runs_in_its_dtype_and_takes_given_spikes():
    q, k, v, token_scale, token_bias = draw("yardstick", 2, 16, 2, 10, 16, "BN", "BN")
    q, k, v = (t.half() for t in (q, k, v))
    rows = torch.tensor([True, False])
    ref = reference_attention(q, k, v, spike_rows=rows, token_scale=token_scale, token_bias=token_bias)
    flipped = ref.spikes.clone()
    flipped[0, 0, 5] = ~flipped[0, 0, 5]  # as a borderline z-score rounding the other way would
    low = reference_attention(
        q, k, v, spike_rows=rows, token_scale=token_scale, token_bias=token_bias, dtype=torch.float16, spikes=flipped
    )
    assert low.out.dtype == low.mass.dtype == low.max_logit.dtype == torch.float16
    assert torch.equal(low.spikes, flipped)
    same = reference_attention(
        q, k, v, spike_rows=rows, token_scale=token_scale, token_bias=token_bias, spikes=flipped
    )  # the float64 reference with the same decisions
    assert rel_err(low.out, same.out) <= 5e-3 < rel_err(low.out, ref.out)


def test_error_budget_is_twice_the_yardstick_error_plus_the_floor():
    reference = torch.zeros(4, 5, dtype=torch.float64)
    yardstick = reference.clone()
    yardstick[1, 2] = -1e-3
    assert (ERROR_FACTOR, ERROR_FLOOR) == (2.0, 1e-5)
    within = reference.clone()
    within[3, 4] = 2e-3 + 0.9e-5
    over = reference.clone()
    over[0, 0] = -(2e-3 + 1.1e-5)
    assert error_budget(within.half(), reference, yardstick).ok
    budget = error_budget(over, reference, yardstick)
    assert not budget.ok and budget.limit == pytest.approx(2e-3 + 1e-5) and budget.error == pytest.approx(2.011e-3)
    assert "OVER" in str(budget)
    # An exact yardstick leaves the floor; a NaN in the output is never within budget.
    assert error_budget(reference + 0.9e-5, reference, reference).ok
    assert not error_budget(reference + 1.1e-5, reference, reference).ok
    nan = reference.clone()
    nan[2, 2] = math.nan
    assert error_budget(nan, reference, yardstick).error == math.inf
    with pytest.raises(ValueError, match="yardstick"):
        error_budget(reference, reference, nan)


def test_error_helpers():
    expected = torch.tensor([1.0, -4.0, 2.0])
    actual = torch.tensor([1.5, -4.0, 1.0])
    assert abs_err(actual, expected) == 1.0
    assert rel_err(actual, expected) == 0.25
    assert rel_err(torch.tensor([math.inf, 0, 0]), expected) == math.inf
    assert rel_err(torch.zeros(3), torch.zeros(3)) == 0.0
