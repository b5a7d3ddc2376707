"""How long a study takes on this machine: each network's rates measured once, a unit's predicted
seconds from the work the training code says it does, the study's estimate, its size for a
``--budget``, and how many units one worker trains at once."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch

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


def net_of(cfg: Config) -> tuple:
    """What a network's speed here depends on: the key its rates are measured under."""
    return (cfg.stage, cfg.width, cfg.batch_size, cfg.batchnorm, cfg.residual, cfg.augment,
            cfg.precision, cfg.device)


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
        self._glance: Meter | None = None

    def glance(self) -> "Meter":
        """A meter of the same data that looks at each network for a tenth of a second (made
        once: the choice of K and the estimate both read it)."""
        if self._glance is None:
            out = Meter.__new__(Meter)
            out.n_training, out.n_test, out.measure_s = self.n_training, self.n_test, 0.1
            out.rates, out._fixed_s, out._glance = {}, self._fixed_s, None
            self._glance = out
        return self._glance

    @property
    def fixed_s(self) -> float:
        """A run's seconds outside its passes: its figures, drawn here once to time them, and
        its MLflow run, split and checkpoints (measured at 0.1 to 0.2 s on a 2-core CPU)."""
        if self._fixed_s is None:
            self._fixed_s = figures_seconds(self.n_test, 3) + 0.15
        return self._fixed_s

    def rates_of(self, cfg: Config) -> Rates | None:
        net = net_of(cfg)
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
        return sum(self.parts(cfg))

    def parts(self, cfg: Config) -> tuple[float, float]:
        """A unit's predicted seconds training, and the rest (its scoring, figures, run)."""
        r = self.rates_of(cfg)
        if r is None:
            return math.nan, math.nan
        w = predicted_work(cfg, self.n_training, self.n_test)
        return (w.trained / r.train,
                w.validated / r.score + w.final / r.score_fp32 + self.fixed_s)


def meter_for(s: StudyPlan, data: fer.FerData, meter: Meter | None = None) -> Meter:
    """The meter a study's estimate reads: ``meter`` where it has measured already (to size
    the study), else a glance at each network (a tenth of a second) where that predicts a short
    study, else a measurement of about a second each."""
    if meter is not None and meter.rates:
        return meter
    glance = (meter or Meter(data)).glance()
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
                   given: dict[str, Any], where: lifecycle.StudyOptions,
                   slots: Slots | None = None) -> StudyPlan:
    """``--budget``: the plan resized to fit ``minutes`` on this machine (said in a line), or as
    it is where the budget does not apply. ``given``: the budget keys of the command line;
    ``where``: the study's storage and name, where an earlier size of it is looked for;
    ``slots``: the units trained at once, whose speed-up the size counts on."""
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
        slots = slots or Slots()

        def seconds(df: float, ep: int) -> float:
            sized = s.resize(df, ep)
            return study_seconds(sized, meter) / slots.speedup(sized, meter)

        chosen = sizing.choose(seconds, s.bounds, own, minutes, here)
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


@dataclass(frozen=True)
class Slots:
    """How many units a worker trains at once, and how much faster each of the study's networks
    trains for it: its total training img/s at ``k`` over one unit at a time, measured here
    (``by_net``; a network not measured takes ``default``)."""

    k: int = 1
    by_net: dict[tuple, float] = field(default_factory=dict)
    default: float = 1.0

    def speedup(self, s: StudyPlan, meter: Meter) -> float:
        """The whole study's: its predicted time one unit at a time over its time at ``k``,
        each network counted by its share of the predicted work. The speed-up is measured on
        training; a unit's scoring, figures and MLflow run are counted at none (on a 2-core CPU
        counting them at the training's made a study's estimate 18% short)."""
        if self.k == 1:
            return 1.0
        alone = at_k = 0.0
        for c in s.cells:
            cfg = s.config(c, 0)
            train, rest = meter.parts(cfg)
            if math.isfinite(train):
                alone += train + rest
                at_k += train / self.by_net.get(net_of(cfg), self.default) + rest
        return alone / at_k if at_k > 0 else self.default


# Networks are measured at K in the order of their share of the study's predicted work, until
# this share is covered; the rest (small nets, a few per cent of the time) take the measured
# networks' mean.
COVER = 0.9


def choose_slots(s: StudyPlan, requested: int | None, meter: Meter,
                 threads: int | None = None) -> Slots:
    """How many units this worker trains at once, and what each network gains by it (said in
    one line). ``None`` (auto): on a GPU the K that a short measurement of the reference network
    finds fastest; on a CPU 2, 4 or 8 units with the cores split between them where the study's
    own networks, weighted by their share of its predicted work, go at least 10% faster than
    one unit with every core. ``threads``: the threads per unit the command was given (None:
    the cores split over the units), set here for the K chosen."""
    ref = s.config(next(c for c in s.cells if c.name == label(s.reference)), 0)
    if Runtime(ref).device.type == "cuda":
        return _gpu_slots(ref, requested)
    if requested == 1:
        return Slots()
    if requested is None and study_seconds(s, meter.glance()) < GLANCE_ENOUGH_S:
        return Slots()  # measuring K would cost more of a short study than K could save
    base = torch.get_num_threads()
    nets: dict[tuple, Config] = {}
    work: dict[tuple, float] = {}
    for c in s.cells:  # one unit at a time, rates at this worker's threads (the meter's)
        cfg = s.config(c, 0)
        t = meter.seconds(cfg)
        if math.isfinite(t):
            nets[net_of(cfg)] = cfg
            work[net_of(cfg)] = work.get(net_of(cfg), 0.0) + t
    if not nets:
        return Slots()
    cores = len(os.sched_getaffinity(0))
    candidates = [requested] if requested else [k for k in (2, 4, 8) if k <= cores]
    chosen, chosen_sp, chosen_each, tried = Slots(), 1.0, base, {}
    for k in candidates:
        each = threads or (base if requested else max(1, base // k))
        at_k = _measure_mix(nets, work, k, base if requested else (threads or base), each)
        tried[k] = sp = at_k.speedup(s, meter)
        if requested or sp > 1.1 * chosen_sp:
            chosen, chosen_sp, chosen_each = at_k, sp, each
    torch.set_num_threads(chosen_each)
    if not tried:  # a single core: nothing to share
        return Slots()
    if chosen.k == 1:
        said = ", ".join(f"{k} units at once: the study {sp:.2f}x as fast"
                         for k, sp in tried.items())
        print(f"concurrent auto: 1 unit at a time ({said}; several at once must make it 10% "
              f"faster)", flush=True)
        return chosen
    said = ", ".join(f"{cfg.stage}{'' if cfg.width == 1 else f' x{cfg.width:g}'} "
                     f"{chosen.by_net[n]:.2f}x" for n, cfg in nets.items() if n in chosen.by_net)
    print(f"concurrent {'auto: ' if requested is None else ''}{chosen.k} units at once, "
          f"{chosen_each} thread(s) each: the study {chosen_sp:.2f}x as fast as one unit at a "
          f"time (its networks' training img/s: {said}; their scoring counted at 1x)",
          flush=True)
    return chosen


def _measure_mix(nets: dict[tuple, Config], work: dict[tuple, float], k: int,
                 alone_threads: int, each: int) -> Slots:
    """Each network's speed-up at ``k`` units of ``each`` threads over one of
    ``alone_threads``, the largest first until :data:`COVER` of the work is measured."""
    total, covered, by_net = sum(work.values()), 0.0, {}
    for net in sorted(work, key=work.get, reverse=True):
        if covered >= COVER * total:
            break
        cfg = nets[net]
        n = cfg.batch_size * 8
        torch.set_num_threads(alone_threads)
        one = measure_concurrent(cfg, 1, seconds=0.3, n_images=n)["img_per_s"]
        torch.set_num_threads(each)
        by_net[net] = measure_concurrent(cfg, k, seconds=0.3, n_images=n)["img_per_s"] / one
        covered += work[net]
    torch.set_num_threads(alone_threads)
    mean = sum(by_net[n] * work[n] for n in by_net) / sum(work[n] for n in by_net)
    return Slots(k, by_net, mean)


def _gpu_slots(ref: Config, requested: int | None) -> Slots:
    if requested is None:
        k, rates = best_k(ref)
        said = ", ".join(f"K={n}: {r:,.0f}" for n, r in rates.items())
        print(f"concurrent auto: {k} units at once (training img/s of the reference network, "
              f"{said})", flush=True)
        return Slots(k, default=rates[k] / rates[1])
    if requested == 1:
        return Slots()
    n = ref.batch_size * 32
    one = measure_concurrent(ref, 1, seconds=0.5, n_images=n)["img_per_s"]
    at_k = measure_concurrent(ref, requested, seconds=0.5, n_images=n)["img_per_s"]
    print(f"concurrent {requested}: {at_k / one:.2f}x the training img/s of one unit at a time "
          f"on the reference network ({at_k:,.0f} against {one:,.0f})", flush=True)
    return Slots(requested, default=at_k / one)
