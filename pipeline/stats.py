"""Pure statistics for the ablation: a component's effect, paired by seed, with its t interval and
the paired t-test that goes with it.

The unit of evidence is the seed. Test images are not independent draws once a model is fixed:
pooling every seed's per-image predictions (McNemar on the concatenation, say) treats the same
image under several seeds as new evidence and ignores how much training noise moves accuracy
from seed to seed, so it rejects a component with no effect far more often than its level.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def mean_ci(x: np.ndarray | list[float], conf: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided t confidence interval; the interval is NaN with fewer than 2 values.

    NaN values (a metric a run did not log) are left out."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    m = float(x.mean())
    if len(x) < 2:
        return m, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + conf / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - half, m + half


def paired_t(diffs: np.ndarray | list[float]) -> tuple[float, float]:
    """Two-sided paired t-test of mean difference 0: (t, p). NaN with fewer than 2 pairs; with
    no spread at all, p is 0 for a non-zero mean and 1 for a zero one."""
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    if n < 2:
        return math.nan, math.nan
    m, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0:
        return (math.copysign(math.inf, m), 0.0) if m != 0 else (0.0, 1.0)
    t = m / (sd / math.sqrt(n))
    return t, float(2 * stats.t.sf(abs(t), n - 1))


def paired_effect(on: dict[int, float], off: dict[int, float]) -> dict[str, float]:
    """Effect of a component (on - off), paired by seed over the seeds both sides have: mean,
    95% t-interval, and the paired t-test's p (the test the interval comes from)."""
    seeds = sorted(s for s in set(on) & set(off)
                   if math.isfinite(on[s]) and math.isfinite(off[s]))
    diffs = [on[s] - off[s] for s in seeds]
    m, lo, hi = mean_ci(diffs)
    t, p = paired_t(diffs)
    return {"n": len(seeds), "mean": m, "lo": lo, "hi": hi, "t": t, "p": p}
