"""The ablation's statistics: paired effects over seeds, against scipy and literal values, and a
null simulation in which the test must hold its level."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from pipeline.stats import (class_scores, detectable_effect, holm, mean_ci, paired_effect,
                            paired_t)


# Pure logic: no MLflow store is made for these tests.
pytestmark = pytest.mark.no_store
ON = {0: 0.671, 1: 0.684, 2: 0.662, 3: 0.690}
OFF = {0: 0.659, 1: 0.653, 2: 0.666, 3: 0.668}


def test_paired_effect_literal_values():
    e = paired_effect(ON, OFF)
    assert e.n == 4
    assert e.mean == pytest.approx(0.01525, abs=1e-12)
    assert e.lo == pytest.approx(-0.0086139268159739, abs=1e-12)
    assert e.hi == pytest.approx(0.03911392681597387, abs=1e-12)
    assert e.t == pytest.approx(2.0337099811708375, rel=1e-12)
    assert e.p == pytest.approx(0.13486095946194682, rel=1e-10)


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_paired_t_matches_scipy_ttest_rel(n):
    rng = np.random.default_rng(n)
    a, b = rng.normal(0.6, 0.02, n), rng.normal(0.59, 0.02, n)
    t, p = paired_t(a - b)
    ref = sps.ttest_rel(a, b)
    assert t == pytest.approx(float(ref.statistic), rel=1e-10)
    assert p == pytest.approx(float(ref.pvalue), rel=1e-10)


def test_interval_and_test_agree():
    """p < .05 exactly when the 95% interval excludes zero: one test, not two."""
    rng = np.random.default_rng(1)
    for _ in range(200):
        d = rng.normal(0.01, 0.01, 3)
        m, lo, hi = mean_ci(d)
        _, p = paired_t(d)
        assert (p < 0.05) == (lo > 0 or hi < 0)


def test_pairs_only_seeds_both_sides_have():
    e = paired_effect({0: 0.70, 1: 0.72, 2: 0.69}, {1: 0.70, 2: 0.68, 3: 0.50})
    assert e.n == 2 and e.mean == pytest.approx(0.015)


def test_too_few_seeds_give_no_interval_or_p():
    e = paired_effect({0: 0.7}, {0: 0.6})
    assert e.n == 1 and e.mean == pytest.approx(0.1)
    assert math.isnan(e.lo) and math.isnan(e.p)


def test_no_p_from_differences_without_spread():
    """Identical differences have no variance to test against: p is not 0 (nor 1), it is
    absent, and so is the interval."""
    for d in ([0.01, 0.01], [0.0, 0.0], [0.02, 0.02, 0.02]):
        t, p = paired_t(d)
        assert math.isnan(t) and math.isnan(p)
    e = paired_effect({0: 0.7, 1: 0.71}, {0: 0.69, 1: 0.70})
    assert e.mean == pytest.approx(0.01) and math.isnan(e.p)
    assert math.isnan(e.detectable)


def test_missing_metrics_are_left_out_not_propagated():
    e = paired_effect({0: 0.7, 1: math.nan, 2: 0.71}, {0: 0.6, 1: 0.6, 2: 0.62})
    assert e.n == 2 and e.mean == pytest.approx(0.095)


@pytest.mark.parametrize("seeds", [2, 3, 5])
@pytest.mark.slow
def test_null_effect_is_rejected_at_about_its_level(seeds):
    """A component with no effect: each seed's accuracy with and without it differs only by
    training noise (sd 1.5 points per model). The test over seeds must reject in about 5% of
    studies; pooling per-image predictions over seeds rejected in 20-41% of them."""
    rng = np.random.default_rng(seeds)
    studies = 4000
    rejections = 0
    for _ in range(studies):
        on = dict(enumerate(rng.normal(0.68, 0.015, seeds)))
        off = dict(enumerate(rng.normal(0.68, 0.015, seeds)))
        rejections += paired_effect(on, off).p < 0.05
    rate = rejections / studies
    # 4000 Bernoulli(.05) draws: sd of the rate is 0.0034; this band is about 4 sd wide.
    assert 0.036 < rate < 0.064, rate


def test_holm_literal_values():
    # m = 4: sorted p .01 .02 .03 .04 -> 4*.01=.04, 3*.02=.06, 2*.03=.06, 1*.04=.04 -> running
    # max .04 .06 .06 .06; returned in the input order, NaN kept out of the family.
    adj = holm([0.03, math.nan, 0.01, 0.04, 0.02])
    assert adj[0] == pytest.approx(0.06) and math.isnan(adj[1])
    assert adj[2] == pytest.approx(0.04)
    assert adj[3] == pytest.approx(0.06) and adj[4] == pytest.approx(0.06)
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    assert holm([]) == []


def test_holm_controls_the_familywise_error_under_the_null():
    """Ten true null effects, 5 seeds each: raw p rejects at least one in about 40% of studies,
    Holm in at most 5%."""
    rng = np.random.default_rng(7)
    studies, any_raw, any_holm = 2000, 0, 0
    for _ in range(studies):
        ps = [paired_t(rng.normal(0, 0.015, 5))[1] for _ in range(10)]
        any_raw += min(ps) < 0.05
        any_holm += min(holm(ps)) < 0.05
    assert any_raw / studies > 0.3
    assert any_holm / studies < 0.065


def test_detectable_effect_literal_and_by_simulation():
    # (t_.975,4 + t_.80,4) * sd / sqrt(5) with sd = 1 point: (2.7764451 + 0.9409646) / 2.2360680
    assert detectable_effect(0.01, 5) == pytest.approx(0.016624, abs=1e-6)
    assert math.isnan(detectable_effect(0.01, 1)) and math.isnan(detectable_effect(0.0, 5))
    # A true effect of that size is found in roughly 80% of studies (the formula approximates
    # the noncentral t, so a little under).
    rng = np.random.default_rng(3)
    hits = sum(paired_t(rng.normal(0.016624, 0.01, 5))[1] < 0.05 for _ in range(4000))
    assert 0.70 < hits / 4000 < 0.85


def test_macro_f1_averages_the_classes_the_labels_hold():
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 3])  # class 3 predicted but absent; 4..6 absent
    s = class_scores(y, pred, 7)
    # F1: class 0 = 2*1/(2+1) = .6667, class 1 = 2*2/(2+3) = .8, class 2 = 2*1/(2+1) = .6667
    assert s.f1[:3] == pytest.approx([2 / 3, 0.8, 2 / 3])
    assert np.isnan(s.f1[3:]).all()
    assert s.macro_f1 == pytest.approx((2 / 3 + 0.8 + 2 / 3) / 3)
    # Precision: 1/1, 2/3, 1/1, and 0/1 for class 3 (predicted once, never right); none for
    # the classes never predicted. Recall: 1/2, 2/2, 1/2; none for the absent classes.
    assert s.precision[:4] == pytest.approx([1, 2 / 3, 1, 0])
    assert np.isnan(s.precision[4:]).all()
    assert s.recall[:3] == pytest.approx([0.5, 1, 0.5]) and np.isnan(s.recall[3:]).all()
    assert list(s.support) == [2, 2, 2, 0, 0, 0, 0]
