"""The ablation's findings from per-run figures: effects on test only, Holm over the family, an arm
that did not train reported as such, per-seed values, honest wording, the ladder."""

from __future__ import annotations

import math

import pytest

from pipeline import findings, plots
from pipeline.findings import Pair

# Pure logic: no MLflow store is made for these tests.
pytestmark = pytest.mark.no_store

MAJORITY = 0.251  # FER2013's happy share


def run(test_acc, val_acc=0.5, train_acc=0.6, tta=False, **more):
    return {"test_acc": test_acc, "test_acc_tta": more.pop("test_acc_tta", test_acc),
            "val_acc": val_acc, "val_acc_tta": more.pop("val_acc_tta", val_acc),
            "train_acc": train_acc, "majority_rate": MAJORITY, "tta": tta,
            "epochs_run": 3, "train_seconds": 60.0, **more}


# The reference trains; without BatchNorm at its lr the net predicts the majority class on
# every seed (train acc at the majority rate), and the val figures favour the opposite sign.
BY_CELL = {
    **{("improved", s): run(a, val_acc=0.60, val_acc_tta=v, tta=True, test_acc_tta=t)
       for s, (a, v, t) in enumerate([(0.668, 0.70, 0.687), (0.659, 0.69, 0.681),
                                      (0.677, 0.71, 0.693)])},
    **{("improved -batchnorm", s): run(0.249, train_acc=MAJORITY + 0.004) for s in range(3)},
    **{("improved -augment", s): run(a, val_acc=0.9) for s, a in
       enumerate([0.646, 0.641, 0.653])},
    **{("improved -grad_clip", s): run(a) for s, a in enumerate([0.671, 0.655, 0.679])},
}
PAIRS = [Pair("batchnorm (leave-one-out)", "improved", "improved -batchnorm"),
         Pair("augment (leave-one-out)", "improved", "improved -augment"),
         Pair("grad_clip (leave-one-out)", "improved", "improved -grad_clip"),
         Pair("tta (on improved)", "improved", "improved", "test_acc_tta", "test_acc")]


def rows():
    return {e.pair.label: e for e in findings.effects(PAIRS, BY_CELL)}


def test_effects_are_read_on_test_paired_by_seed():
    aug = rows()["augment (leave-one-out)"]
    # test: .668-.646, .659-.641, .677-.653 -> .022 .018 .024 (val would say -.30)
    assert aug.seeds == [0, 1, 2]
    assert aug.mean == pytest.approx((0.022 + 0.018 + 0.024) / 3)
    assert aug.on_acc == {0: 0.668, 1: 0.659, 2: 0.677}
    tta = rows()["tta (on improved)"]
    assert tta.mean == pytest.approx((0.019 + 0.022 + 0.016) / 3)


def test_an_arm_at_the_majority_rate_is_not_an_effect_size():
    e = rows()["batchnorm (leave-one-out)"]
    assert not e.is_size and [a.cell for a in e.untrained] == ["improved -batchnorm"]
    assert math.isnan(e.p_holm)
    text = "\n".join(findings.effects_table(list(rows().values())))
    line = next(l for l in text.splitlines() if l.startswith("| batchnorm (leave-one-out)"))
    assert "did not train at these settings" in line and "improved -batchnorm" in line
    assert "+41" not in line and "[" not in line  # no size, no interval
    # Two points above the majority rate still counts as trained.
    trained = {**BY_CELL, **{("improved -batchnorm", s): run(0.3, train_acc=MAJORITY + 0.021)
                             for s in range(3)}}
    assert findings.effects(PAIRS[:1], trained)[0].is_size
    fig = plots.forest(list(rows().values()))
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels == ["did not train at these settings"]


def test_holm_runs_over_the_rows_that_are_effect_sizes():
    r = rows()
    # Paired t-tests by hand (scipy.stats.ttest_rel on the figures above): augment p .0067666,
    # tta .0082081, grad_clip .89279. Holm over these three, the family of effect sizes (the
    # BatchNorm row is not one): 3 x .0067666 = .0203; 2 x .0082081 = .0164 is raised to the
    # .0203 before it (step-down, monotone); .89279 x 1.
    assert r["augment (leave-one-out)"].p == pytest.approx(0.006766631609278637, rel=1e-9)
    assert r["augment (leave-one-out)"].p_holm == pytest.approx(0.0202998948278359, rel=1e-9)
    assert r["tta (on improved)"].p_holm == pytest.approx(0.0202998948278359, rel=1e-9)
    assert r["grad_clip (leave-one-out)"].p_holm == pytest.approx(0.8927887465162205, rel=1e-9)


def test_wording_never_calls_an_unresolved_interval_no_effect():
    clip = rows()["grad_clip (leave-one-out)"]
    assert clip.lo < 0 < clip.hi
    words = findings.reading(clip)
    assert words.startswith("not resolved: effects between ")
    assert f"{clip.lo * 100:+.2f} and {clip.hi * 100:+.2f}" in words
    assert "no effect" not in words
    assert findings.reading(rows()["augment (leave-one-out)"]).startswith("resolved: it raises")
    # An interval that excludes 0 on its own, in a family where Holm does not reject it.
    e = rows()["augment (leave-one-out)"]
    e.p_holm = 0.07
    assert findings.reading(e).startswith("resolved by its own interval, not after Holm")


def test_per_seed_values_let_anyone_recompute_the_effects():
    table = findings.per_seed_table(list(rows().values()))
    i = next(i for i, l in enumerate(table) if l.startswith("| augment (leave-one-out)"))
    assert table[i] == "| augment (leave-one-out) | with: `improved` | 0.6680 | 0.6590 | 0.6770 |"
    assert table[i + 1] == "| | without: `improved -augment` | 0.6460 | 0.6410 | 0.6530 |"
    assert table[i + 2] == "| | difference (points) | +2.20 | +1.80 | +2.40 |"


def test_p_is_na_for_one_seed_and_the_detectable_effect_is_stated():
    one = {k: v for k, v in BY_CELL.items() if k[1] == 0}
    e = findings.effects(PAIRS[1:2], one)[0]
    assert e.n == 1 and math.isnan(e.p) and findings.p_text(e.p) == "n/a"
    assert math.isnan(e.detectable)
    summary = findings.detectable_summary(list(rows().values()), 3)
    dets = [e.detectable * 100 for e in rows().values() if e.is_size]
    assert f"from about {min(dets):.2f} to {max(dets):.2f} points" in summary


def test_ladder_shows_the_val_that_selected_each_run():
    rungs = {r.stage: r for r in findings.ladder(["improved", "improved -augment"],
                                                {"improved": 0.70}, BY_CELL)}
    imp = rungs["improved"]
    assert imp.tta and imp.figures["val_selected"][0] == pytest.approx(0.70)  # TTA val
    assert rungs["improved -augment"].figures["val_selected"][0] == pytest.approx(0.9)
    line = findings.ladder_table(list(rungs.values()))[2]
    assert line.startswith("| improved | 0.70 | 0.700 [") and "(TTA)" in line
