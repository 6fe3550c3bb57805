"""The benchmarks' shared statistics: 95% intervals of a mean over paired seeds, and the verdict a reading rule
gives from one."""

import numpy as np


def bootstrap_mean(values, n=10_000, seed=0):
    """(mean, 2.5th, 97.5th percentile) of the mean over `n` bootstrap resamples."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n, len(values)))].mean(1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def t_interval(values):
    """(mean, low, high) of the 95% t-interval of the mean (NaN bounds for a single value)."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    return mean, mean - half, mean + half


def verdict(mean, lo, hi, minimum):
    """"reproduced" if the interval excludes 0 and the mean gain is at least `minimum`; "contradicted" if the
    interval lies entirely below 0; else inconclusive."""
    if lo > 0 and mean >= minimum:
        return "reproduced"
    if hi < 0:
        return "contradicted"
    return "not reproduced (inconclusive at this scale)"
