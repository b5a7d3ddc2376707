"""How long a study takes on this machine: each network's rates measured once, a unit's predicted
seconds from the work the training code says it does, the study's estimate, its size for a
``--budget``, and how many units one worker trains at once."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna

from . import data as fer
from . import sizing
from . import study as lifecycle
from .config import Config
from .engine import Runtime
from .errors import UsageError
from .plan import StudyPlan, fingerprint, label
from .rates import Rates, measure_rates
from .scoring import figures_seconds, predicted_work
from .slots import best_k, measure_concurrent


# A study predicted to take less than this, from a glance at each network, is not measured
# more closely: a closer measurement would cost more of it than its estimate could gain.
GLANCE_ENOUGH_S = 120.0


class Meter:
    """Each of a study's networks measured once on this machine (``seconds`` each, about a
    second by default), and a unit's predicted seconds from them: the images
    ``scoring.predicted_work`` says it trains and scores, over the rates they go at here, plus
    the run's own fixed costs."""

    def __init__(self, data: fer.FerData, seconds: float = 1.0,
                 fixed_s: float | None = None):
        self.n_training = int((data.usage == "Training").sum())
        self.n_test = int((data.usage == "PublicTest").sum())
        self.measure_s = seconds
        self.rates: dict[tuple, Rates | None] = {}
        self._fixed_s = fixed_s

    @property
    def fixed_s(self) -> float:
        """A run's seconds outside its passes: its figures, drawn here once to time them, and
        its MLflow run, split and checkpoints (measured at 0.1 to 0.2 s on a 2-core CPU)."""
        if self._fixed_s is None:
            self._fixed_s = figures_seconds(self.n_test, 3) + 0.15
        return self._fixed_s

    def rates_of(self, cfg: Config) -> Rates | None:
        net = (cfg.stage, cfg.width, cfg.batch_size, cfg.batchnorm, cfg.residual, cfg.augment,
               cfg.precision, cfg.device)
        if net not in self.rates:
            try:
                self.rates[net] = measure_rates(cfg, seconds=self.measure_s)
            except Exception as e:
                # A cell that cannot train (its settings, its memory) meets that again as its
                # unit, which records it. Anything else is raised here, before any unit: on a
                # GPU a broken capture can leave the allocator unusable for the whole process.
                if not lifecycle.units_own(e):
                    raise
                self.rates[net] = None
        return self.rates[net]

    def seconds(self, cfg: Config) -> float:
        r = self.rates_of(cfg)
        if r is None:
            return math.nan
        w = predicted_work(cfg, self.n_training, self.n_test)
        return (w.trained / r.train + w.validated / r.score + w.final / r.score_fp32
                + self.fixed_s)


def meter_for(s: StudyPlan, data: fer.FerData, meter: Meter | None = None) -> Meter:
    """The meter a study's estimate reads: ``meter`` where it has measured already (to size
    the study), else a glance at each network (a tenth of a second) where that predicts a short
    study, else a measurement of about a second each."""
    if meter is not None and meter.rates:
        return meter
    glance = Meter(data, seconds=0.1)
    if study_seconds(s, glance) < GLANCE_ENOUGH_S:
        return glance
    return meter or Meter(data, fixed_s=glance.fixed_s)


def estimate(s: StudyPlan, meter: Meter, keys: list[tuple[str, int]],
             slots: int = 1, speedup: float = 1.0) -> lifecycle.Eta:
    """Each unit's predicted time on this machine (``Meter.seconds``). With ``slots`` units at
    once, the whole goes ``speedup`` times faster."""
    by_name = {c.name: c for c in s.cells}
    predicted = {(cell, seed): meter.seconds(s.config(by_name[cell], seed)) for cell, seed in keys}
    known = [v for v in predicted.values() if math.isfinite(v)]
    typical = sum(known) / len(known) if known else 0.0
    return lifecycle.Eta({k: v if math.isfinite(v) else typical for k, v in predicted.items()},
                         slots=slots, speedup=speedup)


def study_seconds(s: StudyPlan, meter: Meter) -> float:
    """The whole study's predicted seconds on this machine, one unit at a time (a seed costs
    what seed 0 does), as the estimate printed at its start will say."""
    seed0 = [(c.name, 0) for c in s.cells]
    return s.seeds * estimate(s, meter, seed0).left(seed0)


def _earlier_sizing(storage: str, minutes: float, base: str,
                    name: str | None) -> list[tuple[str, sizing.Sizing]]:
    """The sizings stored by studies of this plan (before sizing) and budget in ``storage``:
    the named study's, else every one whose name this plan would give. Reads nothing where the
    storage does not exist yet (a sqlite file not there)."""
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///"):]).exists():
        return []
    found = []
    for fs in optuna.storages.RDBStorage(storage).get_all_studies():
        attrs = fs.user_attrs
        if (fs.study_name == name if name else attrs.get("sizing_base") == base) and \
                attrs.get("sizing") and attrs["sizing"]["minutes"] == minutes:
            found.append((fs.study_name, sizing.Sizing.of_attrs(attrs["sizing"])))
    return found


def size_to_budget(s: StudyPlan, meter: Meter, minutes: float | str | None,
                   given: dict[str, Any], where: lifecycle.StudyOptions) -> StudyPlan:
    """``--budget``: the plan resized to fit ``minutes`` on this machine (said in a line), or as
    it is where the budget does not apply. ``given``: the budget keys of the command line;
    ``where``: the study's storage and name, where an earlier size of it is looked for."""
    device = Runtime(s.config(s.cells[0], 0)).device
    if minutes == "auto":
        minutes = s.bounds.minutes if s.bounds and device.type == "cpu" else None
        if minutes is not None and {"epochs", "data_fraction"} & set(given):
            print("budget: none; --epochs/--data-fraction size this study", flush=True)
            return s
    if minutes is None:
        return s
    if s.bounds is None:
        raise UsageError(f"--budget {minutes:g}: profile {s.profile} of {s.path} is not resized "
                         f"(it declares no sizing); pass --budget off.")
    if {"epochs", "data_fraction"} & set(given):
        raise UsageError(f"--budget {minutes:g} sizes the study's data fraction and epochs "
                         f"itself; pass --budget off to set --epochs or --data-fraction.")
    here = sizing.machine()
    base = fingerprint(s)
    earlier = _earlier_sizing(where.storage, minutes, base, where.study_name)
    mine = [(n, z) for n, z in earlier if z.machine == here or where.study_name]
    if mine:
        name, chosen = mine[0]
        print(f"budget {minutes:g} min: continuing study {name}, sized before: {chosen.said()}",
              flush=True)
    else:
        own = int(s.budget.get("epochs", s.bounds.epochs[0]))
        chosen = sizing.choose(lambda df, ep: study_seconds(s.resize(df, ep), meter), s.bounds,
                               own, minutes, here)
        for name, z in earlier:
            print(f"budget {minutes:g} min: study {name} in this storage was sized on "
                  f"{z.machine}; this machine sizes its own, which is another study", flush=True)
        _say_sizing(s, chosen)
    out = s.resize(chosen.data_fraction, chosen.epochs)
    out.sized, out.sizing_base = chosen, base
    return out


def _say_sizing(s: StudyPlan, z: sizing.Sizing) -> None:
    floor = sizing.path(s.bounds, int(s.budget.get("epochs", s.bounds.epochs[0])))[0]
    at_floor = f"{floor[0]:g} of each train split for {floor[1]} epoch(s)"
    if z.fits:
        print(f"budget {z.minutes:g} min: {z.said()} (sized on this machine; its floor, "
              f"{at_floor}, takes about {z.floor_s / 60:.1f} min)", flush=True)
        return
    print(f"budget {z.minutes:g} min: even the {s.profile} profile's floor ({at_floor}; below "
          f"it its cells do not train) takes about {z.floor_s / 60:.1f} min on {z.machine}, "
          f"over the budget. It runs at the floor: Ctrl-C stops it (the same command "
          f"continues it), --budget {math.ceil(z.floor_s / 60 * 1.15)} gives it room, "
          f"--budget off runs the profile's own size.", flush=True)


def choose_slots(s: StudyPlan, requested: int | None) -> tuple[int, float]:
    """How many units this worker trains at once, and how much faster the study goes for it
    (total training images/s at K over that at 1, measured on the reference network). ``None``
    (auto): 1 on a CPU, where the cores are already shared by one run's threads; on a GPU the K
    that a short measurement finds fastest, said in one line."""
    cfg = s.config(next(c for c in s.cells if c.name == label(s.reference)), 0)
    device = Runtime(cfg).device
    if requested is None and device.type != "cuda":
        return 1, 1.0
    if requested is None:
        k, rates = best_k(cfg)
        said = ", ".join(f"K={n}: {r:,.0f}" for n, r in rates.items())
        print(f"concurrent auto: {k} units at once (training img/s of the reference network, "
              f"{said})", flush=True)
        return k, rates[k] / rates[1]
    if requested == 1:
        return 1, 1.0
    # A CPU trains the study's own widths slowly: a shorter pass keeps the measurement brief.
    n = cfg.batch_size * (32 if device.type == "cuda" else 8)
    one = measure_concurrent(cfg, 1, seconds=0.5, n_images=n)["img_per_s"]
    at_k = measure_concurrent(cfg, requested, seconds=0.5, n_images=n)["img_per_s"]
    print(f"concurrent {requested}: {at_k / one:.2f}x the training img/s of one unit at a time "
          f"on the reference network ({at_k:,.0f} against {one:,.0f})", flush=True)
    return requested, at_k / one
