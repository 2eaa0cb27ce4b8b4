"""Confidence intervals for a mean over prompts, the form in which the paper reports SSCD.

Two interval kinds are offered and every summary names the one it used:

* ``"t"`` (default): Student's t interval ``mean +- t_{(1+c)/2, n-1} * sd / sqrt(n)``, with
  ``sd`` the unbiased standard deviation. Deterministic and exact for normal data; with the
  paper's ~70-500 prompts per setting it is also a good approximation for bounded scores.
* ``"bootstrap"``: percentile bootstrap of the mean (seeded, so reruns agree), for users who
  prefer no normality assumption.

The t quantile is computed here (regularised incomplete beta + bisection) so that the core
install needs no SciPy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

INTERVAL_METHODS = ("t", "bootstrap")


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided confidence interval over ``n`` values.

    ``low``/``high`` are NaN when ``n == 1``: one value says nothing about spread, and a
    zero-width interval would claim a certainty the data do not support.
    """

    mean: float
    low: float
    high: float
    n: int
    confidence: float
    method: str

    @property
    def half_width(self) -> float:
        """Half the interval's width (the "+-" of a "mean +- h" report)."""
        return (self.high - self.low) / 2.0


def _check_confidence(confidence: float) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)):
        raise TypeError(f"confidence must be a number in (0, 1), got {confidence!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95, got {confidence}")
    return float(confidence)


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Lentz's continued fraction for the incomplete beta function (converges for x < (a+1)/(a+b+2))."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge for a={a}, b={b}, x={x}")


def _regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t distribution with ``df`` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df}")
    tail = 0.5 * _regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        low, high = high, high * 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if student_t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low <= 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


def _as_values(values: Iterable[float]) -> np.ndarray:
    array = np.asarray(list(values), dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"values must be a flat sequence of numbers, got shape {array.shape}")
    if array.size == 0:
        raise ValueError("values is empty: an interval needs at least one value")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"values must be finite, got {array[~np.isfinite(array)][:5].tolist()}")
    return array


def mean_interval(
    values: Iterable[float],
    *,
    confidence: float = 0.95,
    method: str = "t",
    n_resamples: int = 10_000,
    seed: int = 0,
) -> Interval:
    """Mean of ``values`` with a two-sided ``confidence`` interval (``method`` "t" or "bootstrap").

    ``n_resamples`` and ``seed`` apply to the bootstrap only.
    """
    confidence = _check_confidence(confidence)
    if method not in INTERVAL_METHODS:
        raise ValueError(f"method must be one of {INTERVAL_METHODS}, got {method!r}")
    array = _as_values(values)
    n = int(array.size)
    mean = float(array.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1, confidence, method)
    if method == "t":
        standard_error = float(array.std(ddof=1)) / math.sqrt(n)
        half = student_t_quantile(0.5 + confidence / 2.0, n - 1) * standard_error
        return Interval(mean, mean - half, mean + half, n, confidence, method)
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 100:
        raise ValueError(f"n_resamples must be an int >= 100, got {n_resamples!r}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples, dtype=np.float64)
    chunk = max(1, 2_000_000 // n)  # bound the index matrix at ~16 MB
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        means[start:stop] = array[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(mean, float(low), float(high), n, confidence, method)
