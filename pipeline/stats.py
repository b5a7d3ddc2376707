"""Pure statistics for the ablation: paired effects with t intervals, and McNemar's test."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def mean_ci(x: np.ndarray | list[float], conf: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided t confidence interval; the interval is NaN with fewer than 2 values."""
    x = np.asarray(x, dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    m = float(x.mean())
    if len(x) < 2:
        return m, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + conf / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - half, m + half


def paired_effect(on: dict[int, float], off: dict[int, float]) -> dict[str, float]:
    """Effect of a component (on - off) paired by seed, over the seeds both sides have."""
    seeds = sorted(set(on) & set(off))
    diffs = [on[s] - off[s] for s in seeds]
    m, lo, hi = mean_ci(diffs)
    return {"n": len(seeds), "mean": m, "lo": lo, "hi": hi}


def mcnemar(y: np.ndarray, pred_on: np.ndarray, pred_off: np.ndarray) -> dict[str, float]:
    """Exact McNemar test on paired predictions of the same images.

    b: images only the "on" model gets right; c: only the "off" model. Under no difference
    b ~ Binomial(b + c, 1/2)."""
    right_on, right_off = pred_on == y, pred_off == y
    b = int((right_on & ~right_off).sum())
    c = int((~right_on & right_off).sum())
    p = 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5).pvalue)
    return {"b": b, "c": c, "p": p}
