"""``python -m pipeline.ablate``: the ablation study, as one parent MLflow run with a child per cell
and seed, handed out to any number of workers through an Optuna storage used as a work queue.

Each (cell, seed) is one enqueued Optuna trial. A worker claims a waiting trial atomically (the
storage's row lock), trains it, and marks it complete or failed with its reason. Workers record a
heartbeat; when one dies, any other worker turns its stale trial back into a waiting one, so no
cell is lost and none is trained twice. The report is built from MLflow by whichever worker finds
the queue empty.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import mlflow
import optuna
import torch
from optuna.trial import TrialState

from . import data as fer
from . import findings, plots, sizing, tracking
from . import study as lifecycle
from .cli import Number, parser, run_main
from .config import RANGES, STAGES, TOGGLES, Config, build, config_path
from .errors import ConfigError, UsageError
from .engine import Rates, Runtime, Slot, measure_rates
from .models import supports_residual
from . import numbers
from .numbers import WHOLE_1, Range
from .slots import Pool, best_k, measure_concurrent
from .stores import first_use_lock
from .study import StudyOptions, find_run, storage_of, trial_id
from .train import RunResult, figures_seconds, predicted_work, train

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STORAGE = "sqlite:///ablate.db"
CellKind = Literal["stage", "leave-one-out", "add-one-in"]
LogModels = Literal["all", "none", "reference"]


# --------------------------------------------------------------------------- the study file


@dataclass(frozen=True)
class Cell:
    name: str  # e.g. "advanced", "improved -batchnorm", "basic +augment"
    kind: CellKind
    stage: str
    overrides: dict[str, Any]
    toggle: str | None = None
    extra: bool = False  # declared in the profile's extra_cells (its own overrides)


@dataclass
class StudyPlan:
    """The study file, read and checked: its cells, seeds and budget. (The Optuna study of the
    same name is its work queue.)"""

    path: Path
    reference: str  # a stage name or a config YAML (e.g. the tuner's best_config.yaml)
    base: str
    ladder: list[str]
    seeds: int
    reported: dict[str, float]
    toggles: dict[str, dict]
    profile: str
    budget: dict[str, Any]
    log_models: LogModels  # reference: the reference stage's seed-0 model only
    # The profile's stage_set: a stage's own budget on top of `budget` (command-line budget
    # keys win over both).
    stage_budget: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: list[dict[str, Any]] = field(default_factory=list)  # the profile's extra_cells
    cells: list[Cell] = field(default_factory=list)
    # Cells left out because the toggle has nothing to act on in that stage, with the reason.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    bounds: sizing.Bounds | None = None  # the profile's sizing: how far --budget may resize it
    sized: sizing.Sizing | None = None  # the size --budget chose on this machine
    sizing_base: str | None = None  # the fingerprint of the study before it was sized

    def resize(self, data_fraction: float, epochs: int) -> StudyPlan:
        """The same study at another size: every cell's share of its train split and epochs."""
        keys = {"data_fraction": data_fraction, "epochs": epochs}
        return replace(self, budget={**self.budget, **keys}, cells=list(self.cells),
                       stage_budget={st: {k: v for k, v in kv.items() if k not in keys}
                                     for st, kv in self.stage_budget.items()})

    def config(self, cell: Cell, seed: int) -> Config:
        return build(config_path(cell.stage), {**cell.overrides, **self.budget,
                                               **self.stage_budget.get(cell.stage, {}),
                                               "seed": seed})

    def reduced(self) -> str:
        said = ", ".join(f"{k}={v}" for k, v in self.budget.items())
        for stage, kv in self.stage_budget.items():
            if kv:
                said += f"; stage {stage}: " + ", ".join(f"{k}={v}" for k, v in kv.items())
        return said or "none (the study's own settings)"


ACCURACY = Range(low=0, high=1)
STUDY_KEYS = ("reference", "base", "ladder", "seeds", "reported", "toggles", "profiles")


def _need(d: dict, key: str, kind: type, where: str) -> Any:
    if key not in d:
        raise UsageError(f"{where}: missing key {key!r}.")
    if not isinstance(d[key], kind):
        raise UsageError(f"{where}: {key} must be a {kind.__name__}, got {d[key]!r}.")
    return d[key]


def _check_toggles(toggles: dict, where: str) -> None:
    unknown = sorted(set(toggles) - set(TOGGLES))
    if unknown:
        raise UsageError(f"{where}: unknown toggle(s) {unknown}; valid toggles: "
                         f"{', '.join(TOGGLES)}.")
    for t, spec in toggles.items():
        if not (isinstance(spec, dict) and (spec.get("eval_only") or
                                            {"with", "without"} <= set(spec))):
            raise UsageError(f"{where}: toggle {t!r} needs 'with' and 'without' config keys "
                             f"(or eval_only: true).")
        for side in ("with", "without"):
            if side in spec and not isinstance(spec[side], dict):
                raise UsageError(f"{where}: toggle {t!r}: {side} must be a mapping of config "
                                 f"keys, got {spec[side]!r}.")
            if side in spec:
                spec[side] = lifecycle.check_budget(spec[side] or {}, f"{where} toggle {t} {side}")


def load_study(path: str | Path, profile: str, seeds: int | None = None,
               budget: dict[str, Any] | None = None) -> StudyPlan:
    """Read and check the study file; every cell's config is built here, before any training."""
    p = Path(path)
    d, prof = lifecycle.read_study_file(p, "study", STUDY_KEYS, profile)
    toggles = _need(d, "toggles", dict, str(p))
    _check_toggles(toggles, str(p))
    budget = lifecycle.check_budget(budget or {}, "the command line")
    s = StudyPlan(path=p, reference=_need(d, "reference", str, str(p)),
                  base=_need(d, "base", str, str(p)),
                  ladder=_ladder(d, p),
                  seeds=seeds if seeds is not None else _file_seeds(d, prof, p, profile),
                  reported=_reported(d, p), toggles=toggles,
                  profile=profile, budget={**(prof.get("set") or {}), **(budget or {})},
                  log_models="all" if prof.get("log_models", False) else "none",
                  extra=list(prof.get("extra_cells") or []),
                  stage_budget=_stage_budget(prof, budget or {}, f"{p} profile {profile}"),
                  bounds=sizing.read_bounds(prof["sizing"], f"{p} profile {profile}",
                                            prof.get("set") or {})
                  if prof.get("sizing") is not None else None)
    numbers.check(s.seeds, WHOLE_1, "seeds", UsageError)  # a study of no seeds has no answer
    try:
        s.cells = _cells(s)
        for c in s.cells:
            s.config(c, 0)
    except ConfigError as e:
        raise UsageError(str(e) if str(e).startswith(str(p)) else f"{p}: {e}") from None
    return s


def _ladder(d: dict, p: Path) -> list[str]:
    ladder = _need(d, "ladder", list, str(p))
    bad = [v for v in ladder if not isinstance(v, str) or not v.strip()]
    if bad or not ladder:
        raise UsageError(f"{p}: ladder: expected a list of stage names or config YAML paths, got "
                         f"{numbers.shown(bad[0] if bad else ladder)}.")
    return list(ladder)


def _file_seeds(d: dict, prof: dict, p: Path, profile: str) -> int:
    """The profile's seeds, else the file's (3 when neither says), each checked where it is
    written: a whole number 1 or more, never a value cut or a fallback taken silently."""
    found = None
    for where, mapping in ((f"{p} profile {profile}", prof), (str(p), d)):
        v = numbers.check(mapping.get("seeds"), WHOLE_1, f"{where}: seeds", UsageError)
        found = v if found is None else found
    return 3 if found is None else found


def _reported(d: dict, p: Path) -> dict[str, float]:
    reported = d.get("reported") or {}
    if not isinstance(reported, dict):
        raise UsageError(f"{p}: reported: expected a mapping of stage names to accuracies, got "
                         f"{numbers.shown(reported)}.")
    out = {}
    for stage, v in reported.items():
        got = numbers.check(v, ACCURACY, f"{p}: reported: {stage}", UsageError)
        if got is not None:
            out[str(stage)] = got
    return out


def _stage_budget(prof: dict, cli: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """The profile's ``stage_set``, checked; the command line's budget keys take precedence."""
    by_stage = prof.get("stage_set") or {}
    if not isinstance(by_stage, dict):
        raise UsageError(f"{where}: stage_set must map stage names to config keys, got "
                         f"{by_stage!r}.")
    out = {}
    for stage, kv in by_stage.items():
        if stage not in STAGES or not isinstance(kv, dict):
            raise UsageError(f"{where}: stage_set entry {stage!r}: {kv!r}; expected one of "
                             f"{', '.join(STAGES)} mapped to config keys.")
        kv = lifecycle.check_budget(kv, f"{where} stage_set {stage}")
        out[stage] = {k: v for k, v in kv.items() if k not in cli}
    return out


def _is_on(cfg: Config, spec: dict) -> bool:
    return all(getattr(cfg, k) == v for k, v in spec["with"].items())


def label(stage_or_yaml: str) -> str:
    """A cell's name for a stage (``improved``) or a config YAML (``best_config``)."""
    return Path(stage_or_yaml).stem if stage_or_yaml.endswith((".yaml", ".yml")) else stage_or_yaml


def _cells(s: StudyPlan) -> list[Cell]:
    # The reference and base need their own cells when they are not on the ladder (a tuned
    # config YAML as the reference, say).
    names = list(dict.fromkeys([*s.ladder, s.reference, s.base]))
    cells = [Cell(label(st), "stage", st, {}) for st in names]
    ref = build(config_path(s.reference))
    base = build(config_path(s.base))
    for t, spec in s.toggles.items():
        if spec.get("eval_only"):
            continue
        on = _is_on(ref, spec)
        # Leave-one-out: flip the toggle in the reference (for one it lacks, "flip" means add).
        loo = Cell(f"{label(s.reference)} {'-' if on else '+'}{t}", "leave-one-out",
                   s.reference, dict(spec["without" if on else "with"]), t)
        aoi = None if _is_on(base, spec) else Cell(f"{label(s.base)} +{t}", "add-one-in",
                                                   s.base, dict(spec["with"]), t)
        for cell, cfg in ((loo, ref), (aoi, base)):
            if cell is None or cell.name in {c.name for c in cells}:
                continue  # the base is the reference: adding T to it is the same cell
            if t == "residual" and not supports_residual(cfg.stage):
                s.skipped.append((cell.name, f"stage {cfg.stage} has no pair of convs at a "
                                             f"constant channel count to put a skip around"))
                continue
            cells.append(cell)
    return cells + [_extra_cell(s, spec, i, {c.name for c in cells})
                    for i, spec in enumerate(s.extra)]


def _token(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"{'+' if value else '-'}{key}"
    return f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"


def _extra_cell(s: StudyPlan, spec: Any, i: int, taken: set[str]) -> Cell:
    """One of the profile's ``extra_cells``: a toggle's arm at settings of its own (the improved
    net without BatchNorm at an lr at which it trains, say), paired against the reference (a
    leave-one-out) or the base (an add-one-in), and named after its overrides."""
    where = f"{s.path} profile {s.profile} extra_cells[{i}]"
    if not isinstance(spec, dict) or not isinstance(spec.get("set"), dict) or \
            set(spec) - {"stage", "set", "toggle"}:
        raise UsageError(f"{where}: expected a mapping with 'toggle', 'set' (config keys) and "
                         f"optionally 'stage' (default the reference), got {spec!r}.")
    stage, toggle = spec.get("stage", s.reference), spec.get("toggle")
    if toggle not in s.toggles or s.toggles[toggle].get("eval_only"):
        trained = [t for t, v in s.toggles.items() if not v.get("eval_only")]
        raise UsageError(f"{where}: toggle {toggle!r} is not a trained toggle of this study; "
                         f"choose one of {', '.join(trained)}.")
    if stage not in (s.reference, s.base):
        raise UsageError(f"{where}: stage {stage!r} must be the reference ({s.reference}) or the "
                         f"base ({s.base}), the cells an extra arm is paired against.")
    overrides = lifecycle.check_budget(spec["set"], where)
    against = build(config_path(stage))
    arm = build(config_path(stage), overrides)
    if _is_on(arm, s.toggles[toggle]) == _is_on(against, s.toggles[toggle]):
        raise UsageError(f"{where}: its settings leave {toggle} as {label(stage)} has it; an "
                         f"extra arm must flip the toggle (e.g. set: {s.toggles[toggle]['without']}).")
    name = " ".join([label(stage), *(_token(k, v) for k, v in overrides.items())])
    if name in taken:
        raise UsageError(f"{where}: it is the cell {name!r}, which the study already trains.")
    kind = "leave-one-out" if stage == s.reference else "add-one-in"
    return Cell(name, kind, stage, overrides, toggle, extra=True)


# --------------------------------------------------------------------------- the work queue


# Bumped when what a cell's run means changes (2: element-wise block dropout, TTA-val
# selection, a split per seed, common random numbers), so that a study begun under another
# protocol is never continued with runs of this one.
PROTOCOL = 2


def fingerprint(s: StudyPlan) -> str:
    spec = [(c.name, c.stage, sorted(c.overrides.items())) for c in s.cells]
    parts = [spec, s.seeds, sorted(s.budget.items()), PROTOCOL]
    if any(s.stage_budget.values()):
        parts.append(sorted((k, sorted(v.items())) for k, v in s.stage_budget.items() if v))
    if s.sized:  # a size chosen for a budget is that machine's: another machine's is another study
        parts.append(["sized", s.sized.minutes, s.sized.machine])
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def set_up_queue(opened: lifecycle.Opened, s: StudyPlan, digest: str) -> None:
    """The creating worker: the parent run, then one waiting trial per (cell, seed)."""
    st = opened.study
    parent = lifecycle.create_parent(
        opened.experiment, opened.name, f"ablation {s.profile}", "study",
        # Prefixed: under `mlflow run` the parent already holds the entry point's own params.
        params={"study_profile": s.profile, "study_seeds": s.seeds,
                "study_budget": s.reduced()[:500], "study_cells": len(s.cells),
                "data_digest": digest, **(s.sized.params() if s.sized else {})},
        files={"study.yaml": s.path.read_text()}, adopt=opened.entry_run)
    for c in s.cells:
        for seed in range(s.seeds):
            st.enqueue_trial({}, user_attrs={"cell": c.name, "seed": seed})
    st.set_user_attr("fingerprint", fingerprint(s))
    st.set_user_attr("data_digest", digest)
    if s.sized:  # a rerun on this machine takes this size again instead of measuring anew
        st.set_user_attr("sizing", s.sized.as_attrs())
        st.set_user_attr("sizing_base", s.sizing_base)
    st.set_user_attr("parent_run_id", parent)


def check_same_study(st: optuna.Study, s: StudyPlan, digest: str) -> None:
    attrs = st.user_attrs
    if attrs["fingerprint"] != fingerprint(s) or attrs["data_digest"] != digest:
        raise UsageError(f"study {st.study_name!r} already exists with other cells, seeds, "
                         f"budget or data; use another --study-name for a different study.")


def run_cell(s: StudyPlan, study_name: str, cell: Cell, seed: int, data: fer.FerData,
             parent: str) -> RunResult:
    done = find_run(study_name, "FINISHED", cell=cell.name, seed=seed)
    if done is not None:  # a worker that died after MLflow finished, before the queue heard
        return RunResult.of_run(done)
    earlier = find_run(study_name, cell=cell.name, seed=seed)
    cfg = s.config(cell, seed)
    return train(cfg, data, run_name=f"{cell.name} s{seed}", parent_run_id=parent,
                 resume_run_id=earlier.info.run_id if earlier else None,
                 tags={"study": study_name, "cell": cell.name, "cell_kind": cell.kind,
                       "toggle": cell.toggle or ""},
                 log_model=s.log_models == "all" or (s.log_models == "reference" and seed == 0
                                                     and cell.name == label(s.reference)))


class Meter:
    """Each of a study's networks measured once on this machine (about a second
    each), and a unit's predicted seconds from them: the images ``train.predicted_work`` says it
    trains and scores, over the rates they go at here, plus the run's own fixed costs."""

    def __init__(self, data: fer.FerData):
        self.n_training = int((data.usage == "Training").sum())
        self.n_test = int((data.usage == "PublicTest").sum())
        self.rates: dict[tuple, Rates | None] = {}
        self._fixed_s: float | None = None

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
                self.rates[net] = measure_rates(cfg, seconds=1.0)
            except Exception:  # noqa: BLE001 (a cell that cannot train meets it again as its
                self.rates[net] = None  # unit, which records it or reports the bug)
        return self.rates[net]

    def seconds(self, cfg: Config) -> float:
        r = self.rates_of(cfg)
        if r is None:
            return math.nan
        w = predicted_work(cfg, self.n_training, self.n_test)
        return (w.trained / r.train + w.validated / r.score + w.final / r.score_fp32
                + self.fixed_s)


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
    per_seed = [meter.seconds(s.config(c, 0)) for c in s.cells]
    known = [v for v in per_seed if math.isfinite(v)]
    typical = sum(known) / len(known) if known else 0.0
    return lifecycle.Eta.PRIOR * s.seeds * sum(v if math.isfinite(v) else typical
                                               for v in per_seed)


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


def size_to_budget(o: AblateOptions, s: StudyPlan, meter: Meter) -> StudyPlan:
    """``--budget``: the plan resized to fit the minutes given on this machine (said in a line),
    or as it is where the budget does not apply."""
    minutes = o.minutes
    device = Runtime(s.config(s.cells[0], 0)).device
    if minutes == "auto":
        minutes = s.bounds.minutes if s.bounds and device.type == "cpu" else None
        if minutes is not None and {"epochs", "data_fraction"} & set(o.budget):
            print("budget: none; --epochs/--data-fraction size this study", flush=True)
            return s
    if minutes is None:
        return s
    if s.bounds is None:
        raise UsageError(f"--budget {minutes:g}: profile {s.profile} of {s.path} is not resized "
                         f"(it declares no sizing); pass --budget off.")
    if {"epochs", "data_fraction"} & set(o.budget):
        raise UsageError(f"--budget {minutes:g} sizes the study's data fraction and epochs "
                         f"itself; pass --budget off to set --epochs or --data-fraction.")
    here = sizing.machine()
    base = fingerprint(s)
    earlier = _earlier_sizing(o.study.storage, minutes, base, o.study.study_name)
    mine = [(n, z) for n, z in earlier if z.machine == here or o.study.study_name]
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


def work(st: optuna.Study, s: StudyPlan, data: fer.FerData, heartbeat: int,
         poll: float = 5.0, concurrent: int | None = 1,
         meter: Meter | None = None) -> dict[str, int]:
    """Train waiting cells, ``concurrent`` at once (None: as many as suit this device), until
    none is left, and none is running anywhere, saying how long the rest will take as it goes.
    Each slot takes the next waiting cell the moment its own ends."""
    by_name = {c.name: c for c in s.cells}
    parent = st.user_attrs["parent_run_id"]
    counts = {"trained": 0, "failed": 0, "waited": 0}
    total = len(s.cells) * s.seeds
    lock = threading.Lock()  # the counts, the estimate and the bar, shared by the slots
    bugs = lifecycle.BugCount(st.study_name)

    def left() -> list[tuple[str, int]]:
        return [(t.user_attrs["cell"], int(t.user_attrs["seed"])) for t in st.get_trials(
            deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))]

    def progress() -> tuple[int, str]:
        """Runs finished by any worker and the time left; the bar shows both."""
        done = len(st.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        still = lifecycle.duration(eta.left(left()))
        bar.n = done
        bar.set_postfix_str(f"about {still} left")
        return done, still

    def take(slot: Slot):
        lifecycle.fail_stale(st)  # dead workers' cells go back to the queue
        t = lifecycle.claim(st)
        if t is None:
            return None
        cell, seed = by_name[t.user_attrs["cell"]], int(t.user_attrs["seed"])
        with lock:
            finished, still = progress()
        # Its place in the study: after the finished units and those training now, this one
        # among them.
        k = finished + len(st.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        where = f" in slot {slot.index + 1}" if slot.concurrent else ""
        print(f"[{k}/{total}] {cell.name} seed {seed}{where} (about {still} left)", flush=True)
        return lambda: run_unit(slot, trial_id(t), cell, seed)

    def run_unit(slot: Slot, tid: int, cell: Cell, seed: int) -> None:
        slot.label = f"{cell.name} s{seed}"
        t0 = time.time()
        def run_of() -> str | None:
            run = find_run(st.study_name, cell=cell.name, seed=seed)
            return run.info.run_id if run is not None else None

        with lifecycle.unit(st, tid, heartbeat, f"cell {cell.name} seed {seed}", bugs=bugs,
                            run_of=run_of) as out:
            res = run_cell(s, st.study_name, cell, seed, data, parent)
            storage_of(st).set_trial_user_attr(tid, "run_id", res.run_id)
            out.value = res.metrics.get("val_acc", res.val_acc or 0.0)
        with lock:
            if out.state == "complete":
                eta.finished((cell.name, seed), time.time() - t0)
            counts["trained" if out.state == "complete" else "failed"] += 1

    eta, bar, pool, began = None, None, None, time.time()
    with contextlib.ExitStack() as stack:
        while True:
            lifecycle.fail_stale(st)
            if st.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                if pool is None:
                    k, speedup = choose_slots(s, concurrent)
                    pool = Pool(k, Runtime(s.config(s.cells[0], 0)).device)
                    eta = estimate(s, meter or Meter(data), [(c.name, sd) for c in s.cells
                                             for sd in range(s.seeds)], k, speedup)
                    if "estimate_s" not in st.user_attrs:  # the study's start, for its end line
                        st.set_user_attr("estimate_s", round(eta.left(left()), 1))
                    at_once = f", {k} at a time" if k > 1 else ""
                    print(f"{len(left())} of {total} runs to train{at_once}: about "
                          f"{lifecycle.duration(eta.left(left()))} on this machine (from a "
                          f"short measurement of each network here)", flush=True)
                    bar = stack.enter_context(lifecycle.study_bar(total, 0))
                pool.run(take)
                continue
            running = st.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not running:
                if counts["trained"] + counts["failed"]:
                    with lock:
                        progress()  # the bar ends on the finished count
                    stack.close()
                    print(f"this worker trained {counts['trained']} run(s) in "
                          f"{lifecycle.duration(time.time() - began)}", flush=True)
                return counts
            print(f"waiting for {len(running)} running cell(s) on other workers", flush=True)
            counts["waited"] = 1
            time.sleep(poll)


# --------------------------------------------------------------------------- the report


@dataclass
class Collected:
    """What the study's store and queue hold: the finished runs' figures by (cell, seed), the
    failed units with their reasons, the device, and the wall time (first run's start to last
    run's end, whichever workers and sessions trained them)."""

    by_cell: dict[tuple[str, int], dict[str, Any]]
    failed: list[dict[str, Any]]
    device: str = "?"
    wall_s: float | None = None


def collect(st: optuna.Study) -> Collected:
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.study = '{st.study_name}' and "
                                            f"attributes.status = 'FINISHED'")
    cells = [r for r in runs if "cell" in r.data.tags]
    out = Collected({}, [], wall_s=(max(r.info.end_time for r in cells) -
                                    min(r.info.start_time for r in cells)) / 1000
                    if cells else None)
    for r in cells:
        out.by_cell[(r.data.tags["cell"], int(r.data.tags["seed"]))] = {
            **r.data.metrics, "tta": r.data.params.get("tta") == "True"}
        out.device = r.data.tags.get("device", out.device)
    out.failed = [{"cell": t.user_attrs.get("cell"), "seed": t.user_attrs.get("seed"),
                   "error": t.user_attrs.get("error", "worker lost")}
                  for t in lifecycle.settled(st) if t.state == TrialState.FAIL and
                  (t.user_attrs.get("cell"), t.user_attrs.get("seed")) not in out.by_cell]
    return out


def pairs(s: StudyPlan) -> list[findings.Pair]:
    """The effects the study's cells measure, each as the cell with the component minus the cell
    without it."""
    ref_cell, base_cell = label(s.reference), label(s.base)
    out = []
    for c in s.cells:
        if c.kind == "stage":
            continue
        against = ref_cell if c.kind == "leave-one-out" else base_cell
        has_it = _is_on(s.config(c, 0), s.toggles[c.toggle])
        on, off = (c.name, against) if has_it else (against, c.name)
        if c.extra:
            own = " ".join(_token(k, v) for k, v in c.overrides.items()
                           if k not in s.toggles[c.toggle]["with"])
            kind = (f"added to {base_cell}" if c.kind == "add-one-in" else
                     "leave-one-out" if off == c.name else "added to reference")
            text = f"{c.toggle} ({kind}; arm {'with' if has_it else 'without'}: {own})"
        elif c.kind == "leave-one-out":
            text = (f"{c.toggle} (leave-one-out)" if off == c.name
                    else f"{c.toggle} (added to reference)")
        else:
            text = f"{c.toggle} (added to {base_cell})"
        out.append(findings.Pair(text, on, off))
    if "tta" in s.toggles:
        out.append(findings.Pair(f"tta (on {s.reference})", ref_cell, ref_cell, "test_acc_tta",
                                 "test_acc"))
    return out


QUICK_WARNING = ("> **A pipeline demonstration; effects at this budget do not transfer.** "
                 "The `{profile}` profile trains every cell for a fraction of the study's own "
                 "budget, so its models end near chance and some effects here have the opposite "
                 "sign of their full-budget value. ")


@dataclass
class StudyReport:
    """The report's numbers, computed from the collected runs alone (no MLflow)."""

    name: str
    rows: list[findings.Effect]
    rungs: list[findings.Rung]
    missing: list[tuple[str, int, str]]
    device: str
    wall_s: float | None


def compute(name: str, s: StudyPlan, got: Collected) -> StudyReport:
    reasons = {(f["cell"], f["seed"]): f["error"] for f in got.failed}
    missing = [(c.name, sd, reasons.get((c.name, sd), "not finished yet")) for c in s.cells
               for sd in range(s.seeds) if (c.name, sd) not in got.by_cell]
    return StudyReport(name, findings.effects(pairs(s), got.by_cell),
                       findings.ladder(s.ladder, s.reported, got.by_cell), missing, got.device,
                       got.wall_s)


def render(s: StudyPlan, r: StudyReport) -> str:
    """The report as Markdown, from the computed figures alone."""
    lines = [f"# Ablation report: `{r.name}`", ""]
    if s.profile != "full":
        lines += [QUICK_WARNING.format(profile=s.profile) + ANSWER_IS, ""]
    lines += [f"Profile **{s.profile}**, {s.seeds} seed(s) per cell, device {r.device}"
              + (f", wall time {r.wall_s / 60:.1f} min (first run's start to last run's end)"
                 if r.wall_s else "") + ".",
              f"Budget applied to every cell: {s.reduced()}.", "", findings.HOW_TO_READ, "",
              "## Effects on test", "", *findings.effects_table(r.rows), "",
              *([why] if (why := _tta_at_this_size(s, r)) else []),
              findings.detectable_summary(r.rows, s.seeds), "",
              f"Cells (reference: {s.reference}, base: {s.base}): {CELL_GUIDE} Each child run "
              f"is named `<cell> s<seed>`.", ""]
    lines += [f"- `{cell}` is left out: {why}." for cell, why in s.skipped]
    lines += ["", "## Stage ladder", "", findings.LADDER_NOTE, "",
              *findings.ladder_table(r.rungs), "", "## Per-seed values", "",
              "Test accuracy of each arm per seed (the figures every effect above is computed "
              "from).", "", *findings.per_seed_table(r.rows)]
    if r.missing:
        lines += ["", "## Missing cells", ""]
        lines += [f"- `{c}` seed {sd}: {why}" for c, sd, why in r.missing]
    return "\n".join(lines) + "\n"


def _tta_at_this_size(s: StudyPlan, r: StudyReport) -> str:
    """A reduced study whose TTA row is not resolved says why, from its own figures: what its
    seeds detect and how far its models are from chance."""
    tta = next((e for e in r.rows if e.pair.on_metric == "test_acc_tta"), None)
    if s.profile == "full" or tta is None or not tta.is_size or \
            (math.isfinite(tta.lo) and (tta.lo > 0 or tta.hi < 0)):
        return ""
    tests = [g.figures["test_acc"][0] for g in r.rungs
             if math.isfinite(g.figures["test_acc"][0])]
    near = (f", and its stages reach only {min(tests):.2f} to {max(tests):.2f} test accuracy"
            if tests else "")
    det = (f"{tta.detectable * 100:.2f} points" if math.isfinite(tta.detectable) else
           "no size (no spread between seeds)")
    return (f"**TTA is not resolved at this size:** with {tta.n} seed(s) the smallest effect "
            f"found with 80% power here is {det}{near}; at the study's own settings it is "
            f"measured on models that train (the README's answer).\n")


def figures(s: StudyPlan, r: StudyReport) -> dict[str, Any]:
    return {"forest.png": plots.forest(r.rows) if r.rows else None,
            "ladder.png": plots.ladder(s.ladder, {g.stage: g.figures["val_selected"]
                                                  for g in r.rungs}, s.reported)}


def effect_key(e: findings.Effect) -> str:
    return "effect_" + re.sub(r"[^a-z0-9]+", "_", e.pair.label.lower()).strip("_")


def publish(parent: str, out_dir: Path, r: StudyReport, text: str, figs: dict[str, Any]) -> None:
    """The report and figures in ``out_dir`` and on the parent run (the report on its overview
    page), and each effect's size, interval and p-values as its metrics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(text)
    client = mlflow.MlflowClient()
    for fname, fig in figs.items():
        if fig is not None:
            fig.savefig(out_dir / fname, dpi=110)
            plots.close(fig)
            client.log_artifact(parent, str(out_dir / fname), "report")
    client.log_artifact(parent, str(out_dir / "report.md"), "report")
    client.set_tag(parent, "mlflow.note.content", overview(parent, r, text,
                                                            figs.get("forest.png") is not None))
    for e in r.rows:
        if e.is_size:
            lifecycle.log_interval(parent, f"{effect_key(e)}/test_points", e.mean, e.lo, e.hi)
            for stat, v in (("p", e.p), ("p_holm", e.p_holm)):
                if v == v:  # not NaN: no spread, no p
                    client.log_metric(parent, f"{effect_key(e)}/{stat}", float(f"{v:.3g}"))
    experiment = client.get_run(parent).info.experiment_id
    note = client.get_experiment(experiment).tags.get("mlflow.note.content", "")
    client.set_experiment_tag(experiment, "mlflow.note.content",
                              answer_note(parent, experiment, r) + note.split(ANSWER_END, 1)[-1])


# Where the answer at the top of the experiment's description ends and the rest begins, so a
# rebuilt report replaces its line instead of stacking another above it.
ANSWER_END = "\n\n---\n\n"


def forest_address(parent: str) -> str:
    """The forest plot as the MLflow UI serves an artifact, relative to the UI's own address,
    so a description shows it inline on whichever server opens the store."""
    return f"get-artifact?path=report/forest.png&run_uuid={parent}"


def overview(parent: str, r: StudyReport, text: str, has_forest: bool) -> str:
    """The parent run's description: the answer in a line (what MLflow 3.17 shows before its
    "Show more": 100 pixels of a run's description), then the effects and the forest plot, then
    the whole report."""
    head = [f"**The answer:** {findings.answer_line(r.rows)}", "",
            f"## Effects on test, `{r.name}`", "", *findings.answer_table(r.rows), ""]
    if has_forest:
        head += [f"![forest plot of the effects]({forest_address(parent)})", ""]
    return "\n".join(head) + "\n" + text


def answer_note(parent: str, experiment: str, r: StudyReport) -> str:
    return (f"**The answer** ({len(r.rows)} effect(s); {len(r.missing)} run(s) missing): "
            f"{findings.answer_line(r.rows)} The effects table and forest plot are on the parent "
            f"run [{r.name}](#/experiments/{experiment}/runs/{parent}).{ANSWER_END}")


def report(st: optuna.Study, s: StudyPlan, out_dir: Path) -> str:
    """Compute the findings from the study's finished runs, render them, and publish them."""
    r = compute(st.study_name, s, collect(st))
    text = render(s, r)
    publish(st.user_attrs["parent_run_id"], out_dir, r, text, figures(s, r))
    return text


def report_once(st: optuna.Study, s: StudyPlan, out_dir: Path, storage: str,
                took_part: bool) -> str:
    """The report. Workers that took part in the study's last stretch (trained or waited) find
    the queue empty at about the same time: the first builds the report and notes the units it
    covers on the parent; the others, finding that note, leave it be (two builds gave each effect
    metric two history points) and return its text. A rerun of a finished study, which took no
    part, rebuilds it from the store, as asked."""
    parent = st.user_attrs["parent_run_id"]
    with first_use_lock(storage):
        units = str(sum(t.state.is_finished() for t in lifecycle.settled(st)))
        client = mlflow.MlflowClient()
        if took_part and client.get_run(parent).data.tags.get("report_units") == units:
            print(f"the report of these {units} units was built by another worker; it is on "
                  f"the parent run {parent}", flush=True)
            return mlflow.artifacts.load_text(f"runs:/{parent}/report/report.md")
        text = report(st, s, out_dir)
        client.set_tag(parent, "report_units", units)
    return text


def timing_line(st: optuna.Study, command_s: float) -> str:
    """The study's end line: its budget, the estimate printed at its start and the time it took,
    so every run of the demonstration checks its own estimate."""
    span = collect(st).wall_s
    said = [f"this command took {command_s / 60:.1f} min"]
    if span:
        said.insert(0, f"its runs took {span / 60:.1f} min (first start to last end)")
        estimate_s = st.user_attrs.get("estimate_s")
        if estimate_s:
            off = span / estimate_s - 1
            said.insert(0, f"estimated at its start {estimate_s / 60:.1f} min")
            said[1] += f", {abs(off):.0%} {'over' if off > 0 else 'under'} the estimate"
    sized = st.user_attrs.get("sizing")
    if sized:
        said.insert(0, f"budget {sized['minutes']:g} min")
    return f"study {st.study_name}: " + "; ".join(said)


CELL_GUIDE = ("A cell named after a stage (`advanced`) trains that stage as the study describes "
              "it; `<reference> -T` is the reference with toggle T taken out (leave one out), "
              "`<reference> +T` with T put in where the reference lacks it; `<base> +T` is the "
              "base with T added (add one in).")


def cells_view(st: optuna.Study, name: str, s: StudyPlan) -> str:
    """A view of the study in the MLflow UI with no clicks: its runs grouped by cell, one row a
    cell (the groups collapsed), each showing the mean of its seeds' test accuracy, with and
    without TTA, and val accuracy. Returns the URL's path and query."""
    metrics = [f"metrics.`{m}`" for m in ("test_acc", "test_acc_tta", "val_acc")]
    return tracking.share_view(
        mlflow.get_run(st.user_attrs["parent_run_id"]).info.experiment_id, name,
        # Finished runs only: a stopped run's seed would count in its group without a figure.
        # `tags.cell != ''` leaves out the parent run, which has no cell: the UI would show it
        # as an empty group of its own ("Additional runs").
        {"searchFilter": f"tags.study = '{name}' and tags.cell != '' and "
                         f"attributes.status = 'FINISHED'",
         # By run name (cells in name order, each one's seeds together). Ordered by start
         # time, MLflow 3.17's UI fetches the parents of the runs it shows and would list the
         # parent as a group of its own ("Additional runs"); a key its sort menu does not name
         # (`attributes.created`) shows as "Sort: undefined".
         "orderByKey": "tags.`mlflow.runName`",
         "orderByAsc": True, "selectedColumns": [*metrics, "tags.`seed`"],
         "groupBy": {"aggregateFunction": "average",
                     "groupByKeys": [{"mode": "tag", "groupByData": "cell"}]},
         "groupsExpanded": {f"tag.cell.{c.name}": False for c in s.cells},
         "runsHiddenMode": "SHOW_ALL"})


def study_description(name: str, s: StudyPlan) -> str:
    return (f"Ablation study `{name}` ({s.profile} profile, {s.seeds} seed(s) per cell, "
            f"{len(s.cells)} cells). The parent run `ablation {s.profile}` holds the report on "
            f"its overview page; each child run is one cell and seed, named `<cell> s<seed>`. "
            f"{CELL_GUIDE} To compare cells, open the view the study stored: this "
            f"experiment's address ending in `/runs?workflowType=machine_learning&"
            f"viewStateShareKey={name}` (the address the study prints at its end) shows one "
            f"row per cell, the mean of its seeds' `test_acc`, `test_acc_tta` and `val_acc`."
            + ("" if s.profile == "full" else f" {FULL_ANSWER}"))


ANSWER_IS = ("The study's answer at its own settings is the README's \"The answer so far\" "
             "and docs/ablation-full/report.md in the project; its runs open with `mlflow ui "
             "--backend-store-uri sqlite:///docs/ablation-full/store/mlflow.db` there.")
FULL_ANSWER = f"This profile is a reduced demonstration whose effects do not transfer. {ANSWER_IS}"


# --------------------------------------------------------------------------- entry point


@dataclass(frozen=True)
class AblateOptions:
    """One ablation command: the shared study options, the study file and its budget."""

    study: StudyOptions
    study_file: str = str(ROOT / "ablations" / "study.yaml")
    profile: str = "quick"
    seeds: int | None = None  # None: the profile's
    budget: dict[str, Any] = field(default_factory=dict)  # --epochs, --data-fraction, --width
    report_dir: str = "ablation_report"
    jobs: int = 1
    log_models: LogModels | None = None  # None: the profile's
    write_report: bool = True
    concurrent: int | None = 1  # units at once in this worker; None: auto
    minutes: float | str | None = None  # --budget: "auto" (the profile's on a CPU), None: off


def study_name(o: AblateOptions, s: StudyPlan, data: fer.FerData) -> str:
    # The default name changes with the cells, seeds, budget and data, so an edited study file
    # starts a new study instead of clashing with the old one; an unchanged one resumes.
    return o.study.study_name or (f"ablate-{Path(o.study_file).stem}-{o.profile}-"
                                  f"{data.digest[-6:]}-{fingerprint(s)[:6]}")


def run_ablate(o: AblateOptions, exp: tracking.Experiment | None = None) -> dict[str, Any]:
    began = time.time()
    s = load_study(o.study_file, o.profile, o.seeds, o.budget)  # errors before anything else
    if o.log_models is not None:
        s.log_models = o.log_models
    data = fer.load_training(o.study.data)
    meter = Meter(data)
    s = size_to_budget(o, s, meter)
    exp = exp or tracking.setup(None)
    name = study_name(o, s, data)
    opened = lifecycle.open_study(o.study, exp, name, study_description(name, s))
    if opened.created:
        with opened.setting_up():
            set_up_queue(opened, s, data.digest)
    opened.ready()
    check_same_study(opened.study, s, data.digest)
    print(f"study {name}: {len(s.cells)} cells x {s.seeds} seeds "
          f"({'created' if opened.created else 'joined'}), parent run {opened.parent}",
          flush=True)
    view = cells_view(opened.study, name, s)
    # Extra local workers join the study only now that it exists, so they never race to
    # create the stores.
    helpers = [_start_worker(o, s, name, opened.experiment) for _ in range(o.jobs - 1)]
    try:
        counts = work(opened.study, s, data, o.study.heartbeat, concurrent=o.concurrent,
                      meter=meter)
        waited = counts.pop("waited")
    finally:
        for h in helpers:
            if h.wait() != 0:
                print(f"a local worker (pid {h.pid}) exited with {h.returncode}; its cells go "
                      f"back to the queue", flush=True)
    out = {"study": name, "profile": s.profile, "parent_run_id": opened.parent, "report": "",
           "view": view,
           **counts,
           "helpers_exit": [h.returncode for h in helpers]}
    if not o.write_report:
        return out
    if any(h.returncode != 0 for h in helpers):
        for k, v in work(opened.study, s, data, o.study.heartbeat,
                         concurrent=o.concurrent, meter=meter).items():
            if k in out:
                out[k] += v
    out["report"] = report_once(opened.study, s, Path(o.report_dir), o.study.storage,
                                took_part=bool(out["trained"] or out["failed"] or waited))
    out["timing"] = timing_line(opened.study, time.time() - began)
    lifecycle.finish_parent(opened.parent, opened.entry_run)
    if o.study.register:
        out["registered"] = lifecycle.register(f"tags.study = '{name}'", o.study.register,
                                            o.study.alias)
    return out


def worker_threads(jobs: int, concurrent: int = 1) -> int:
    """Threads per run when ``jobs`` workers of ``concurrent`` runs each share this machine:
    one pool each oversubscribes the cores, and two trainings on 2 cores then each ran 25x
    slower than one alone."""
    return max(1, (os.cpu_count() or 1) // max(jobs * concurrent, 1))


# --seeds: a study of no seeds has no answer. An empty value (how `mlflow run` passes the
# parameter left at its default) is not given: the study's own number.
seed_count = Number(WHOLE_1)
# --concurrent: auto (None) or a whole number of units at once.
concurrency = Number(WHOLE_1, words={"auto": None})


def _start_worker(o: AblateOptions, s: StudyPlan, name: str,
                  exp: tracking.Experiment) -> subprocess.Popen:
    args = [sys.executable, "-m", "pipeline.ablate", "--data", o.study.data,
            "--study", o.study_file, "--profile", s.profile, "--seeds", str(s.seeds),
            "--storage", o.study.storage, "--study-name", name,
            "--heartbeat", str(o.study.heartbeat), "--log-models", s.log_models,
            "--threads", str(worker_threads(o.jobs, o.concurrent or 1)), "--no-report",
            "--concurrent", str(o.concurrent or "auto"), "--budget", "off"]
    # The size this worker chose (or was given): a helper never sizes the study again.
    chosen = {**o.budget, **({k: s.budget[k] for k in ("epochs", "data_fraction")}
                             if s.sized else {})}
    for key, flag in (("epochs", "--epochs"), ("data_fraction", "--data-fraction"),
                      ("width", "--width")):
        if chosen.get(key):
            args += [flag, str(chosen[key])]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
           "MLFLOW_EXPERIMENT_ID": exp.id()}
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.Popen(args, env=env)


def main(argv: list[str] | None = None) -> int:
    p = parser("Run the ablation study (resumable; start it on several machines to share it).")
    lifecycle.add_study_args(p, DEFAULT_STORAGE, default_profile="auto")
    p.add_argument("--study", default=str(ROOT / "ablations" / "study.yaml"))
    p.add_argument("--seeds", type=seed_count, default=None,
                   help="seeds per cell, 1 or more (default, or an empty value: the study's)")
    p.add_argument("--epochs", type=Number(RANGES["epochs"]), default=None,
                   help="epochs of every cell (default, or an empty value: the profile's)")
    p.add_argument("--data-fraction", type=Number(RANGES["data_fraction"]), default=None,
                   help="share of each train split used (default: the profile's)")
    p.add_argument("--width", type=Number(RANGES["width"]), default=None,
                   help="channel multiplier of every net (default: the profile's)")
    p.add_argument("--budget", type=Number(sizing.MINUTES, words={"auto": "auto", "off": None}),
                   default="auto", metavar="auto|off|MINUTES",
                   help="size a reduced profile (quick) to about this many minutes on this "
                        "machine, its train share first, then its epochs (default auto: the "
                        "profile's own budget on a CPU, none on a GPU; off: the profile's own "
                        "size; full is never resized)")
    p.add_argument("--report-dir", default="ablation_report")
    p.add_argument("--jobs", type=Number(WHOLE_1), default=1,
                   help="workers on this machine (one process each, the CPU threads split "
                        "between them; on a GPU they share it)")
    p.add_argument("--log-models", choices=("all", "none", "reference", ""), default=None,
                   help="which runs log an MLflow model (default: the profile's; reference: "
                        "only the reference stage's seed-0 run)")
    p.add_argument("--threads", type=Number(WHOLE_1, words={"auto": None}), default=None,
                   metavar="auto|N",
                   help="torch CPU threads of each unit this worker trains (default auto: the "
                        "cores split over --jobs and --concurrent)")
    p.add_argument("--concurrent", type=concurrency, default=None, metavar="auto|K",
                   help="units this worker trains at once, each on its own thread (and CUDA "
                        "stream), each exactly as it trains alone; auto: 1 on a CPU, on a GPU "
                        "the K a short measurement finds fastest")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="build the report when the queue is empty (extra workers leave it to "
                        "the one that started them)")
    a = p.parse_args(argv)
    # auto is 1 on a CPU, where the threads matter; on a GPU they hardly do.
    torch.set_num_threads(a.threads or worker_threads(a.jobs, a.concurrent or 1))
    budget = {k: v for k, v in (("epochs", a.epochs), ("data_fraction", a.data_fraction),
                                ("width", a.width)) if v is not None}
    profile = lifecycle.resolve_profile(a.profile)
    load_study(a.study, profile, a.seeds, budget)  # a bad file: before any store
    fer.check_source(a.data)
    exp = tracking.setup(a.experiment)
    tracking.sweep_dead_runs()
    under_mlflow_run = bool(os.environ.get("MLFLOW_RUN_ID"))
    try:
        out = run_ablate(AblateOptions(lifecycle.options(a), a.study, profile, a.seeds,
                                       budget, a.report_dir, a.jobs, a.log_models or None,
                                       a.report, a.concurrent, a.budget), exp)
    except KeyboardInterrupt:
        lifecycle.say_stopped("pipeline.ablate", argv, under_mlflow_run)
        raise
    print(out["report"])
    if out.get("timing"):  # a helper started with --no-report leaves the end to its starter
        print(out["timing"])
    print(f"Open it: mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}, then "
          f"http://127.0.0.1:5000/{out['view']} (the study's cells, each the mean of its seeds; "
          f"the report is on the parent run `ablation {out['profile']}`)."
          + ("" if out.get("profile") == "full" else f"\n{FULL_ANSWER}"))
    return 0


if __name__ == "__main__":
    run_main(main)
