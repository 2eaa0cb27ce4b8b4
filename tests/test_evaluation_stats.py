"""Confidence intervals (guard.evaluation.stats) against printed tables and hand computations."""

import math

import numpy as np
import pytest

from guard.evaluation import mean_interval, student_t_quantile


@pytest.mark.parametrize("df, table", [(1, 12.706), (2, 4.303), (5, 2.571), (10, 2.228), (30, 2.042), (1000, 1.962)])
def test_student_t_quantiles_match_the_printed_table(df, table):
    assert student_t_quantile(0.975, df) == pytest.approx(table, abs=6e-4)
    assert student_t_quantile(0.025, df) == pytest.approx(-table, abs=6e-4)


def test_t_interval_by_hand():
    interval = mean_interval([1, 2, 3, 4, 5])
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)  # t_{0.975,4} * sd / sqrt(n)
    assert (interval.mean, interval.n, interval.method) == (3.0, 5, "t")
    assert interval.low == pytest.approx(3 - half, abs=1e-5) and interval.high == pytest.approx(3 + half, abs=1e-5)
    single = mean_interval([0.4])
    assert single.mean == 0.4 and math.isnan(single.low) and math.isnan(single.high)


def test_intervals_cover_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    samples = rng.uniform(0.0, 1.0, size=(300, 25))  # true mean 0.5
    for method, kwargs in (("t", {}), ("bootstrap", {"n_resamples": 500})):
        intervals = [mean_interval(sample, method=method, seed=i, **kwargs) for i, sample in enumerate(samples)]
        coverage = np.mean([interval.low < 0.5 < interval.high for interval in intervals])
        assert 0.90 <= coverage <= 0.99, (method, coverage)


def test_bootstrap_is_seeded_and_close_to_t_for_many_values():
    values = np.random.default_rng(2).normal(0.3, 0.1, size=400)
    first, again = mean_interval(values, method="bootstrap"), mean_interval(values, method="bootstrap")
    assert first == again
    t = mean_interval(values)
    assert first.half_width == pytest.approx(t.half_width, rel=0.1)
    assert first.low < first.mean < first.high


def test_interval_argument_errors():
    with pytest.raises(ValueError, match="values is empty"):
        mean_interval([])
    with pytest.raises(ValueError, match="confidence must be in"):
        mean_interval([1, 2], confidence=95)
    with pytest.raises(ValueError, match="method must be one of"):
        mean_interval([1, 2], method="normal")
    with pytest.raises(ValueError, match="finite"):
        mean_interval([1, float("nan")])
