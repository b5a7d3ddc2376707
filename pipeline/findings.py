"""The ablation's findings, computed from per-run figures alone (no MLflow) and rendered as
Markdown: each component's effect on test accuracy paired by seed, with its interval, p, Holm's
adjustment over the report's family and the smallest effect its seeds can detect; arms that did
not train; the per-seed values behind every effect; and the stage ladder.

A run is a mapping of its final metrics (``test_acc``, ``val_acc_tta``, ``train_acc``, ...)
with ``tta``: whether it validates and serves with test-time augmentation.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from . import stats
from .config import served_val_metric

Run = Mapping[str, Any]
ByCell = Mapping[tuple[str, int], Run]

# An arm whose clean train accuracy is within this of the majority-class rate learnt nothing
# beyond the class prior: its test accuracy says it failed, not what its toggle is worth.
DID_NOT_TRAIN_MARGIN = 0.02


@dataclass(frozen=True)
class Pair:
    """One effect to measure: ``on`` minus ``off``, each a cell and the metric read from it."""

    label: str
    on: str
    off: str
    on_metric: str = "test_acc"
    off_metric: str = "test_acc"


@dataclass(frozen=True)
class Arm:
    cell: str
    train_acc: float  # mean clean train accuracy over its seeds (NaN: not logged)
    majority: float  # mean majority-class rate of its train splits

    @property
    def did_not_train(self) -> bool:
        return math.isfinite(self.train_acc) and math.isfinite(self.majority) and \
            self.train_acc <= self.majority + DID_NOT_TRAIN_MARGIN


@dataclass
class Effect:
    pair: Pair
    on_acc: dict[int, float]  # seed -> test accuracy of the arm with the component
    off_acc: dict[int, float]
    mean: float
    lo: float
    hi: float
    p: float
    detectable: float
    untrained: list[Arm] = field(default_factory=list)
    p_holm: float = math.nan

    @property
    def seeds(self) -> list[int]:
        return sorted(s for s in set(self.on_acc) & set(self.off_acc)
                      if math.isfinite(self.on_acc[s]) and math.isfinite(self.off_acc[s]))

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def is_size(self) -> bool:
        """Whether the row is an effect size at all (both arms trained)."""
        return not self.untrained


def arm(cell: str, by_cell: ByCell) -> Arm:
    runs = [r for (c, _), r in by_cell.items() if c == cell]

    def mean(key: str) -> float:
        v = [float(r[key]) for r in runs if key in r and math.isfinite(float(r[key]))]
        return float(np.mean(v)) if v else math.nan

    return Arm(cell, mean("train_acc"), mean("majority_rate"))


def effects(pairs: list[Pair], by_cell: ByCell) -> list[Effect]:
    """Each pair's effect on test, paired by seed; Holm's adjustment over the rows that are
    effect sizes and have a p."""
    out = []
    for pr in pairs:
        on = {sd: float(r.get(pr.on_metric, math.nan)) for (c, sd), r in by_cell.items()
              if c == pr.on}
        off = {sd: float(r.get(pr.off_metric, math.nan)) for (c, sd), r in by_cell.items()
               if c == pr.off}
        e = stats.paired_effect(on, off)
        untrained = [a for a in (arm(pr.on, by_cell), arm(pr.off, by_cell)) if a.did_not_train]
        untrained = list({a.cell: a for a in untrained}.values())  # tta: one cell, both arms
        out.append(Effect(pr, on, off, e.mean, e.lo, e.hi, e.p, e.detectable, untrained))
    family = [e for e in out if e.is_size]
    for e, adj in zip(family, stats.holm([e.p for e in family])):
        e.p_holm = adj
    return out


def served_val(run: Run) -> float:
    """The val accuracy that selected the run's epoch: the TTA one for a TTA run."""
    return float(run.get(served_val_metric(bool(run.get("tta"))), math.nan))


LADDER_KEYS = ("val_selected", "test_acc", "test_acc_tta", "train_acc", "epochs_run",
               "train_seconds")


@dataclass
class Rung:
    stage: str
    reported: float
    tta: bool
    n: int
    figures: dict[str, tuple[float, float, float]]  # key -> mean, lo, hi


def ladder(stages: list[str], reported: Mapping[str, float], by_cell: ByCell) -> list[Rung]:
    rungs = []
    for st in stages:
        runs = [r for (c, _), r in sorted(by_cell.items()) if c == st]
        figs = {k: stats.mean_ci([served_val(r) if k == "val_selected"
                                  else float(r.get(k, math.nan)) for r in runs])
                for k in LADDER_KEYS}
        rungs.append(Rung(st, reported.get(st, math.nan), any(bool(r.get("tta")) for r in runs),
                          len(runs), figs))
    return rungs


# --------------------------------------------------------------------------- rendering


def points(m: float, lo: float = math.nan, hi: float = math.nan) -> str:
    if not math.isfinite(m):
        return "n/a"
    if not math.isfinite(lo):
        return f"{m * 100:+.2f}"
    return f"{m * 100:+.2f} [{lo * 100:+.2f}, {hi * 100:+.2f}]"


def p_text(p: float) -> str:
    """A p-value as the report prints it; "n/a" where no test was possible."""
    return "n/a" if not math.isfinite(p) else f"{p:.3f}" if p >= 0.001 else "<0.001"


def reading(e: Effect) -> str:
    """What a row allows one to say, and no more."""
    if not e.is_size:
        who = "; ".join(f"`{a.cell}` clean train acc {a.train_acc:.3f}, majority-class rate "
                        f"{a.majority:.3f}" for a in e.untrained)
        return f"did not train at these settings ({who})"
    if not math.isfinite(e.lo):
        return "no interval (fewer than 2 seeds, or no spread between them)"
    if e.lo <= 0 <= e.hi:
        return (f"not resolved: effects between {e.lo * 100:+.2f} and {e.hi * 100:+.2f} points "
                f"are not excluded")
    if not e.p_holm < 0.05:
        return ("resolved by its own interval, not after Holm's adjustment for the family's "
                "other effects")
    return f"resolved: it {'raises' if e.mean > 0 else 'lowers'} test accuracy"


def effects_table(rows: list[Effect]) -> list[str]:
    out = ["| component | seeds | effect on test (points) [95% CI] | p | Holm p | detectable "
           "(points) | reading |", "|---|---|---|---|---|---|---|"]
    for e in rows:
        size = points(e.mean, e.lo, e.hi) if e.is_size else "—"
        det = f"{e.detectable * 100:.2f}" if e.is_size and math.isfinite(e.detectable) else "n/a"
        out.append(f"| {e.pair.label} | {e.n} | {size} | {p_text(e.p) if e.is_size else 'n/a'} "
                   f"| {p_text(e.p_holm)} | {det} | {reading(e)} |")
    return out


def answer_table(rows: list[Effect]) -> list[str]:
    """The effects as a reader first wants them: size, Holm p and what it allows one to say."""
    out = ["| component | effect on test (points) [95% CI] | Holm p | reading |",
           "|---|---|---|---|"]
    for e in rows:
        size = points(e.mean, e.lo, e.hi) if e.is_size else "—"
        out.append(f"| {e.pair.label} | {size} | {p_text(e.p_holm)} | {reading(e)} |")
    return out


def answer_line(rows: list[Effect]) -> str:
    """The study's answer in one line: the effects that hold after Holm's adjustment."""
    held = [e for e in rows if e.is_size and math.isfinite(e.p_holm) and e.p_holm < 0.05]
    rest = len(rows) - len(held)
    if not held:
        return (f"No effect is resolved after Holm's adjustment ({len(rows)} measured; each "
                f"interval is in the report).")
    said = "; ".join(f"{e.pair.label} {points(e.mean, e.lo, e.hi)} points (Holm p "
                     f"{p_text(e.p_holm)})" for e in held)
    return f"Resolved after Holm's adjustment: {said}" + (
        f"; {rest} other effect(s) not resolved." if rest else ".")


def detectable_summary(rows: list[Effect], seeds: int) -> str:
    det = [e.detectable * 100 for e in rows if e.is_size and math.isfinite(e.detectable)]
    if not det:
        return ("The smallest detectable effect cannot be stated: no effect has two seeds with "
                "a spread between them.")
    return (f"**Smallest detectable effect.** With {seeds} seed(s) per cell and the spread the "
            f"paired differences showed, an effect is found with 80% power (two-sided paired "
            f"t-test, alpha 0.05) from about {min(det):.2f} to {max(det):.2f} points depending "
            f"on the component (median {statistics.median(det):.2f}); a smaller true effect "
            f"can sit inside an unresolved interval. Holm's adjustment applies to the {len(det)} "
            f"effect(s) that have a p.")


def per_seed_table(rows: list[Effect]) -> list[str]:
    seeds = sorted({sd for e in rows for sd in (*e.on_acc, *e.off_acc)})
    out = ["| component | arm | " + " | ".join(f"s{sd}" for sd in seeds) + " |",
           "|---|---|" + "---|" * len(seeds)]

    def cells(values: dict[int, float], fmt) -> str:
        return " | ".join(fmt(values[sd]) if sd in values and math.isfinite(values[sd]) else "—"
                          for sd in seeds)

    for e in rows:
        pr = e.pair
        on_name = f"with: `{pr.on}`" + (" (TTA)" if pr.on_metric.endswith("_tta") else "")
        off_name = f"without: `{pr.off}`" + (" (TTA)" if pr.off_metric.endswith("_tta") else "")
        diff = {sd: e.on_acc[sd] - e.off_acc[sd] for sd in e.seeds}
        out += [f"| {pr.label} | {on_name} | {cells(e.on_acc, lambda v: f'{v:.4f}')} |",
                f"| | {off_name} | {cells(e.off_acc, lambda v: f'{v:.4f}')} |",
                f"| | difference (points) | {cells(diff, lambda v: f'{v * 100:+.2f}')} |"]
    return out


def ladder_table(rungs: list[Rung]) -> list[str]:
    def acc(m: float, lo: float, hi: float) -> str:
        if not math.isfinite(m):
            return "n/a"
        return f"{m:.3f}" if not math.isfinite(lo) else f"{m:.3f} [{lo:.3f}, {hi:.3f}]"

    out = ["| stage | reported val | val acc, selected on | test acc | test acc (TTA) | train "
           "acc (clean) | epochs run | train min | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rungs:
        f = r.figures
        ep, secs = f["epochs_run"][0], f["train_seconds"][0]
        out.append(f"| {r.stage} | {r.reported:.2f} | {acc(*f['val_selected'])}"
                   f"{' (TTA)' if r.tta else ''} | {acc(*f['test_acc'])} | "
                   f"{acc(*f['test_acc_tta'])} | {acc(*f['train_acc'])} | "
                   f"{'n/a' if not math.isfinite(ep) else f'{ep:.0f}'} | "
                   f"{'n/a' if not math.isfinite(secs) else f'{secs / 60:.1f}'} | {r.n} |")
    return out


HOW_TO_READ = (
    "Effects are **test** (PublicTest) accuracy points, with minus without, paired by seed: the "
    "mean and 95% t-interval over seeds, the paired t-test's two-sided p (p < 0.05 exactly when "
    "the interval excludes 0) and Holm's adjustment of it over this report's family of effects. "
    "A seed is one trained model per arm, the unit of evidence; each seed also draws its own "
    "train/val split and both arms of a pair share it and its batches. Validation accuracy "
    "chose each run's epoch, so a val difference is a difference of two maxima and biased: no "
    "effect is read on val. An interval that contains 0 is not resolved; it does not show "
    "that the component does nothing. An arm whose clean train accuracy stays within "
    f"{DID_NOT_TRAIN_MARGIN * 100:.0f} points of the majority-class rate did not train, and its "
    "row is not an effect size.")

LADDER_NOTE = (
    "Val acc is the accuracy that selected each run's epoch (with TTA for a stage that "
    "validates with TTA, marked (TTA), as the study did), so it is optimistic and it is what "
    "the study reported; test is not selected on. Train acc is the selected model's clean "
    "accuracy on its train split (no augmentation, no dropout).")
