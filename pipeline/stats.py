"""Pure statistics for the ablation: a component's effect, paired by seed, with its t interval, the
paired t-test that goes with it, Holm's adjustment over a family of effects and the smallest effect
a number of seeds can detect; and the one macro-F1 every entry point reports.

The unit of evidence is the seed. Test images are not independent draws once a model is fixed:
pooling every seed's per-image predictions (McNemar on the concatenation, say) treats the same
image under several seeds as new evidence and ignores how much training noise moves accuracy
from seed to seed, so it rejects a component with no effect far more often than its level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    """Two-sided paired t-test of mean difference 0: (t, p). NaN with fewer than 2 pairs, and
    when the differences have no spread: the test's variance estimate is then 0, and a p from it
    (0, or 1 for a zero mean) would be a claim the data cannot make."""
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    if n < 2:
        return math.nan, math.nan
    m, sd = float(d.mean()), float(d.std(ddof=1))
    if not sd > 0:
        return math.nan, math.nan
    t = m / (sd / math.sqrt(n))
    return t, float(2 * stats.t.sf(abs(t), n - 1))


@dataclass(frozen=True)
class PairedEffect:
    """A component's effect (on - off) over ``n`` seeds: its mean, 95% t-interval (``lo``,
    ``hi``), the paired t-test's ``t`` and ``p`` (the test the interval comes from), the spread
    ``sd`` of the differences and the smallest effect ``n`` seeds detect with 80% power."""

    n: int
    mean: float
    lo: float
    hi: float
    t: float
    p: float
    sd: float
    detectable: float


def paired_effect(on: dict[int, float], off: dict[int, float]) -> PairedEffect:
    """The effect of a component, paired by seed over the seeds both sides have."""
    seeds = sorted(s for s in set(on) & set(off)
                   if math.isfinite(on[s]) and math.isfinite(off[s]))
    diffs = [on[s] - off[s] for s in seeds]
    m, lo, hi = mean_ci(diffs)
    t, p = paired_t(diffs)
    sd = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else math.nan
    return PairedEffect(len(seeds), m, lo, hi, t, p, sd, detectable_effect(sd, len(seeds)))


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values over one family, in the order given; a NaN p (no test)
    is not a member of the family and stays NaN. Rejecting where adjusted p < alpha keeps the
    chance of any false rejection in the family at most alpha."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if math.isfinite(p))
    m = len(tested)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference that a two-sided paired t-test over ``n`` seeds, with
    differences of spread ``sd``, detects with probability ``power`` at level ``alpha``
    (the usual approximation (t_{1-alpha/2} + t_{power}) * sd / sqrt(n), df n-1). NaN when it
    cannot be stated (fewer than 2 seeds, no spread)."""
    if n < 2 or not (math.isfinite(sd) and sd > 0):
        return math.nan
    df = n - 1
    return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * sd / math.sqrt(n))


@dataclass(frozen=True)
class ClassScores:
    """Each class's precision, recall, F1 and support on the scored rows, and their macro-F1,
    as ``train`` logs them and ``evaluate`` reports them. One rule for a class the labels lack:
    it has no recall and no F1 (NaN, never logged), and the macro-F1 averages the classes
    present; counting it as 0 would penalise a model for what the file does not hold. A class
    never predicted has no precision (NaN)."""

    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray

    @property
    def macro_f1(self) -> float:
        present = np.isfinite(self.f1)
        return float(self.f1[present].mean()) if present.any() else math.nan


def class_scores(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> ClassScores:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    support = np.array([(y_true == c).sum() for c in range(n_classes)])
    predicted = np.array([(y_pred == c).sum() for c in range(n_classes)])
    tp = np.array([((y_true == c) & (y_pred == c)).sum() for c in range(n_classes)])
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), math.nan)
        recall = np.where(support > 0, tp / np.maximum(support, 1), math.nan)
        # = 2PR / (P + R), and 0 when a present class has no true positive
        f1 = np.where(support > 0, 2 * tp / np.maximum(support + predicted, 1), math.nan)
    return ClassScores(precision, recall, f1, support)
