"""The statistics ``kdray final`` reports: Welch's t-test and a bootstrap interval (champion vs labels only),
paired t-tests with Holm's step-down correction (every type vs labels only on common seeds)."""
from __future__ import annotations

import math

import numpy as np


def welch(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances); 1.0 for two identical constant samples, NaN
    (undefined) for two different constant samples: without any variance the test cannot say how sure it is."""
    from scipy import stats

    # Constant samples are judged by their values (max == min), not by np.std == 0: the mean of [0.9] * 3 is
    # 0.9000000000000001, so its std is a rounding error and scipy then returns 6e-31 or NaN.
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return float("nan") if a[0] != b[0] else 1.0

    def moments(x: list[float]) -> tuple[float, float]:
        # A constant sample has mean x[0] and no variance exactly (scipy's own moments warn of cancellation).
        return (float(x[0]), 0.0) if np.ptp(x) == 0 else (float(np.mean(x)), float(np.std(x, ddof=1)))

    (ma, sa), (mb, sb) = moments(a), moments(b)
    return float(stats.ttest_ind_from_stats(ma, sa, len(a), mb, sb, len(b), equal_var=False).pvalue)


MIN_BOOTSTRAP_SEEDS = 3  # two values resample to three distinct means: no interval worth reporting


def bootstrap_ci(a: list[float], b: list[float], n: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of mean(a) - mean(b), resampling each group with replacement (scipy's
    bootstrap of two independent samples); (NaN, NaN) with fewer than 3 values in a group."""
    from scipy import stats

    if min(len(a), len(b)) < MIN_BOOTSTRAP_SEEDS:
        return float("nan"), float("nan")
    res = stats.bootstrap((np.asarray(a), np.asarray(b)), lambda x, y, axis: x.mean(axis) - y.mean(axis),
                          n_resamples=n, confidence_level=0.95, method="percentile", vectorized=True,
                          rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def describe_interval(ci: tuple[float, float], digits: int | None = None) -> str:
    """The interval of an accuracy gain in points (``digits`` None: the fractions times 100), or of values already in
    their unit (``digits`` decimals)."""
    if not all(map(math.isfinite, ci)):
        return f"bootstrap interval needs at least {MIN_BOOTSTRAP_SEEDS} seeds per configuration"
    if digits is None:
        return f"bootstrap 95% interval [{ci[0] * 100:+.2f}, {ci[1] * 100:+.2f}]"
    return f"bootstrap 95% interval [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def describe_p(p: float) -> str:
    if not math.isfinite(p):
        return "Welch's t-test undefined (no variance in either sample)"
    return f"Welch's t-test p = {p:.3g}" + ("  (significant at 5%)" if p < 0.05 else "  (not significant at 5%)")


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment (Holm 1979), in the input's order: the i-th smallest of m p-values is multiplied
    by (m - i + 1), made non-decreasing along that order, and capped at 1. It controls the family-wise error rate
    for any dependence between the tests."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    out = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out


def paired(a: list[float], b: list[float]) -> tuple[float, tuple[float, float], float]:
    """Mean of the differences a - b (paired by seed), its 95 % t-interval and the paired t-test's two-sided p.

    Differences that are all equal (up to rounding: 0.9 - 0.8 != 0.8 - 0.7 in floats; accuracies move in steps
    of 1/N, so a few seeds can tie) have no variance for a t-test. They get the exact sign-flip permutation
    test's p instead: only the two all-same-sign assignments reach the observed |mean|, so p = 2 / 2**n (1 when
    every difference is zero), and the interval is the single value observed."""
    from scipy import stats

    d = np.asarray(a) - np.asarray(b)
    mean = float(d.mean())
    if np.ptp(d) < 1e-12:
        return mean, (mean, mean), (min(1.0, 2.0 / 2 ** len(d)) if abs(mean) > 1e-12 else 1.0)
    res = stats.ttest_rel(a, b)
    ci = res.confidence_interval(0.95)
    return mean, (float(ci.low), float(ci.high)), float(res.pvalue)
