"""``python -m pipeline.ablate``: the ablation study, as one parent MLflow run with a child per cell
and seed, handed out to any number of workers through an Optuna storage used as a work queue.

Each (cell, seed) is one enqueued Optuna trial. A worker claims a waiting trial atomically (the
storage's row lock), trains it, and marks it complete or failed with its reason. Workers record a
heartbeat; when one dies, any other worker turns its stale trial back into a waiting one, so no
cell is lost and none is trained twice. The report is built from MLflow by whichever worker finds
the queue empty.

This module holds the workers and the command line; the study file is :mod:`pipeline.plan`, the
time it takes :mod:`pipeline.estimate`, the report :mod:`pipeline.report`, and what the
ablation shares with the search (the queue, the parent run, the start of a command, its name)
:mod:`pipeline.study`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import mlflow
import optuna
from optuna.trial import TrialState

from . import data as fer
from . import redact, sizing, tracking
from . import study as lifecycle
from .cli import Number, parser, run_main
from .config import ABLATIONS, RANGES
from .engine import Runtime, Slot
from .errors import UsageError
from .estimate import Meter, Slots, choose_slots, estimate, meter_for, size_to_budget
from .numbers import WHOLE_1, NumberError
from .plan import Cell, LogModels, StudyPlan, fingerprint, label, load_study
from .report import FULL_ANSWER, cells_view, report_once, study_description, timing_line
from .slots import Pool
from .study import STORAGE_ENV, StudyOptions, storage_of, trial_id
from .train import RunResult, train

DEFAULT_STORAGE = "sqlite:///ablate.db"


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
    done, earlier = lifecycle.unit_runs(study_name, parent, cell=cell.name, seed=seed)
    if done is not None:
        return RunResult.of_run(done)
    cfg = s.config(cell, seed)
    return train(cfg, data, run_name=f"{cell.name} s{seed}", parent_run_id=parent,
                 resume_run_id=earlier.info.run_id if earlier else None,
                 tags={"study": study_name, "cell": cell.name, "cell_kind": cell.kind,
                       "toggle": cell.toggle or ""},
                 log_model=s.log_models == "all" or (s.log_models == "reference" and seed == 0
                                                     and cell.name == label(s.reference)))


@dataclass
class Counts:
    """What one worker did: units trained and failed, whether it waited on other workers'
    units (it took part in the study's end, so it may find the report built by another), and
    the units it left unstarted because none would finish before its deadline."""

    trained: int = 0
    failed: int = 0
    waited: bool = False
    unstarted: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.trained + other.trained, self.failed + other.failed,
                      self.waited or other.waited, other.unstarted)

    @property
    def took_part(self) -> bool:
        return bool(self.trained or self.failed or self.waited)


@dataclass(frozen=True)
class AblateOutcome:
    """One ablation command's outcome: the study, its parent run and view, what this worker
    trained, the exit codes of the local workers it started, and (where it built or found it)
    the report, the end line and the registered model."""

    study: str
    profile: str
    parent_run_id: str
    view: str
    trained: int
    failed: int
    helpers_exit: list[int | None]
    report: str = ""
    timing: str = ""
    registered: dict[str, Any] | None = None


class CellWorker:
    """Trains waiting cells, ``concurrent`` at once (None: as many as suit this device), until
    none is left and none is running anywhere, saying how long the rest will take as it goes.
    Each slot takes the next waiting cell the moment its own ends. With a ``deadline``, a slot
    takes only a cell its estimate says will finish before it (less :data:`MARGIN_S`), and the
    worker ends once no waiting cell would."""

    def __init__(self, st: optuna.Study, s: StudyPlan, data: fer.FerData, heartbeat: int,
                 concurrent: int | None = 1, meter: Meter | None = None,
                 deadline: lifecycle.Deadline | None = None, slots: Slots | None = None):
        self.st, self.s, self.data, self.heartbeat = st, s, data, heartbeat
        self.concurrent, self.meter, self.deadline, self.slots = concurrent, meter, deadline, slots
        self.out_of_time = False
        self.by_name = {c.name: c for c in s.cells}
        self.parent = st.user_attrs["parent_run_id"]
        self.counts = Counts()
        self.total = len(s.cells) * s.seeds
        self.lock = threading.Lock()  # the counts, the estimate and the bar, shared by the slots
        self.bugs = lifecycle.BugCount(st.study_name)
        self.eta: lifecycle.Eta | None = None
        self.bar = None
        self.pool: Pool | None = None

    def _in(self, *states: TrialState) -> list:
        return self.st.get_trials(deepcopy=False, states=states)

    def left(self) -> list[tuple[str, int]]:
        return [(t.user_attrs["cell"], int(t.user_attrs["seed"]))
                for t in self._in(TrialState.WAITING, TrialState.RUNNING)]

    def progress(self) -> tuple[int, str]:
        """Runs finished by any worker and the time left; the bar shows both."""
        done = len(self._in(TrialState.COMPLETE))
        still = lifecycle.duration(self.eta.left(self.left()))
        self.bar.n = done
        self.bar.set_postfix_str(f"about {still} left")
        return done, still

    def run(self, poll: float = 5.0) -> Counts:
        began = time.time()
        with contextlib.ExitStack() as stack:
            while True:
                lifecycle.fail_stale(self.st)
                if self._in(TrialState.WAITING) and not self.out_of_time:
                    if self.pool is None:
                        self._begin(stack)
                    self.pool.run(self.take)
                    continue
                running = self._in(TrialState.RUNNING)
                if not running or self.out_of_time:
                    if self.out_of_time:
                        self.counts.unstarted = len(self._in(TrialState.WAITING))
                    if self.counts.trained + self.counts.failed:
                        with self.lock:
                            self.progress()  # the bar ends on the finished count
                        stack.close()
                        print(f"this worker trained {self.counts.trained} run(s) in "
                              f"{lifecycle.duration(time.time() - began)}", flush=True)
                    return self.counts
                self.counts.waited = True
                lifecycle.wait_for_others(len(running), "cell", poll)

    def _begin(self, stack: contextlib.ExitStack) -> None:
        """The slots, the estimate of the units left (said in a line) and the study's bar."""
        s = self.s
        meter = meter_for(s, self.data, self.meter)
        slots = self.slots or choose_slots(s, self.concurrent, meter)
        k = slots.k
        self.pool = Pool(k, Runtime(s.config(s.cells[0], 0)).device)
        self.eta = estimate(s, meter, [(c.name, sd) for c in s.cells for sd in range(s.seeds)],
                            k, slots.speedup(s, meter))
        left_s = self.eta.left(self.left())
        if "estimate_s" not in self.st.user_attrs:  # the study's start, for its end line
            self.st.set_user_attr("estimate_s", round(left_s, 1))
        at_once = f", {k} at a time" if k > 1 else ""
        print(f"{len(self.left())} of {self.total} runs to train{at_once}: about "
              f"{lifecycle.duration(left_s)} on this machine (from a short measurement of each "
              f"network here)", flush=True)
        if self.deadline is not None:
            room = self.deadline.left() - MARGIN_S
            print(f"time limit ({self.deadline.said()}): {lifecycle.duration(max(room, 0))} to "
                  f"train in; a run starts only where its estimate ends within it"
                  + ("" if left_s <= room else ", so not every run will start in this command"),
                  flush=True)
        self.bar = stack.enter_context(lifecycle.study_bar(self.total, 0))

    def fits(self, t) -> bool:
        """Whether the unit of waiting trial ``t``, started now, ends before the deadline."""
        key = (t.user_attrs["cell"], int(t.user_attrs["seed"]))
        return self.eta.unit(key) + MARGIN_S <= self.deadline.left()

    def take(self, slot: Slot):
        lifecycle.fail_stale(self.st)  # dead workers' cells go back to the queue
        t = lifecycle.claim(self.st, self.fits if self.deadline is not None else None)
        if t is None:
            if self.deadline is not None and self._in(TrialState.WAITING):
                self.out_of_time = True
            return None
        # Nothing between the claim and the unit: a stop in that gap would leave the unit
        # RUNNING until its heartbeat went stale (a minute), not back in the queue at once.
        cell, seed = self.by_name[t.user_attrs["cell"]], int(t.user_attrs["seed"])
        return lambda: self.run_unit(slot, trial_id(t), cell, seed)

    def say_start(self, slot: Slot, cell: Cell, seed: int) -> None:
        with self.lock:
            finished, still = self.progress()
        # Its place in the study: after the finished units and those training now, this one
        # among them.
        k = finished + len(self._in(TrialState.RUNNING))
        where = f" in slot {slot.index + 1}" if slot.concurrent else ""
        print(f"[{k}/{self.total}] {cell.name} seed {seed}{where} (about {still} left)",
              flush=True)

    def run_unit(self, slot: Slot, tid: int, cell: Cell, seed: int) -> None:
        with lifecycle.unit(self.st, tid, self.heartbeat, f"cell {cell.name} seed {seed}",
                            bugs=self.bugs, run_of=partial(lifecycle.run_id_of, self.st.study_name,
                                                           self.parent, cell=cell.name,
                                                           seed=seed)) as out:
            slot.label, t0 = f"{cell.name} s{seed}", time.time()
            self.say_start(slot, cell, seed)
            res = run_cell(self.s, self.st.study_name, cell, seed, self.data, self.parent)
            storage_of(self.st).set_trial_user_attr(tid, "run_id", res.run_id)
            out.value = res.metrics.get("val_acc", res.val_acc or 0.0)
        with self.lock:
            if out.state == "complete":
                self.eta.finished((cell.name, seed), time.time() - t0)
                self.counts.trained += 1
            else:
                self.counts.failed += 1


# What a run may still need after its estimate ends: its last checkpoint and MLflow writes, and
# the estimate's own error (within 15% on the CPUs measured).
MARGIN_S = 30.0


def work(st: optuna.Study, s: StudyPlan, data: fer.FerData, heartbeat: int,
         poll: float = 5.0, concurrent: int | None = 1, meter: Meter | None = None,
         deadline: lifecycle.Deadline | None = None, slots: Slots | None = None) -> Counts:
    """:class:`CellWorker` until the queue is empty (or, with a ``deadline``, until no waiting
    unit would finish before it); this worker's counts. At the deadline itself the worker is
    stopped as SIGTERM stops it: each run in flight ends KILLED with its last epoch kept."""
    with _stop_at(deadline):
        return CellWorker(st, s, data, heartbeat, concurrent, meter, deadline,
                          slots).run(poll)


@contextlib.contextmanager
def _stop_at(deadline: lifecycle.Deadline | None):
    if deadline is None:
        yield
        return

    def stop() -> None:
        print(f"time limit reached ({deadline.said()}): stopping as SIGTERM does", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    timer = threading.Timer(max(deadline.left(), 0.0), stop)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


# --------------------------------------------------------------------------- entry point


@dataclass(frozen=True)
class AblateOptions:
    """One ablation command: the shared study options, the study file and its budget."""

    study: StudyOptions
    study_file: str = str(ABLATIONS / "study.yaml")
    profile: str = "quick"
    seeds: int | None = None  # None: the profile's
    budget: dict[str, Any] = field(default_factory=dict)  # --epochs, --data-fraction, --width
    report_dir: str = "ablation_report"
    jobs: int = 1
    log_models: LogModels | None = None  # None: the profile's
    write_report: bool = True
    concurrent: int | None = 1  # units at once in this worker; None: auto
    minutes: float | str | None = None  # --budget: "auto" (the profile's on a CPU), None: off
    deadline: lifecycle.Deadline | None = None  # --time-limit or the scheduler's job end
    threads: int | None = None  # --threads: each unit's (None: the cores split over the units)
    again: str = "the same command"  # the command that continues the study, in words


def run_ablate(o: AblateOptions, exp: tracking.Experiment | None = None) -> AblateOutcome:
    began = time.time()
    s = load_study(o.study_file, o.profile, o.seeds, o.budget)  # errors before anything else
    if o.log_models is not None:
        s.log_models = o.log_models
    data = fer.load_training(o.study.data)
    meter = Meter(data)
    # How many units at once, from the study's own networks, before its size: the size counts
    # on the speed-up.
    slots = choose_slots(s, o.concurrent, meter, o.threads)
    s = size_to_budget(s, meter, o.minutes, o.budget, o.study, slots)
    exp = exp or tracking.setup(None)
    name = o.study.study_name or lifecycle.study_name("ablate", o.study_file, o.profile,
                                                      data.digest, fingerprint(s))
    opened = lifecycle.open_or_join(o.study, exp, name, study_description(name, s),
                                    lambda op: set_up_queue(op, s, data.digest))
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
                      meter=meter, deadline=o.deadline, slots=slots)
    finally:
        for h in helpers:
            if h.wait() != 0:
                print(f"a local worker (pid {h.pid}) exited with {h.returncode}; its cells go "
                      f"back to the queue", flush=True)
    out = AblateOutcome(name, s.profile, opened.parent, view, counts.trained, counts.failed,
                        [h.returncode for h in helpers])
    if counts.unstarted:
        return replace(out, timing=_out_of_time(opened.study, s, counts, o))
    if not o.write_report:
        return out
    if any(h.returncode != 0 for h in helpers):  # their cells came back: train them here
        counts += work(opened.study, s, data, o.study.heartbeat, concurrent=o.concurrent,
                       meter=meter, deadline=o.deadline, slots=slots)
        if counts.unstarted:
            return replace(out, trained=counts.trained, failed=counts.failed,
                           timing=_out_of_time(opened.study, s, counts, o))
    text = report_once(opened.study, s, Path(o.report_dir), o.study.storage,
                       took_part=counts.took_part)
    timing = timing_line(opened.study, time.time() - began)
    lifecycle.finish_parent(opened.parent, opened.entry_run)
    registered = (lifecycle.register(lifecycle.own_runs(opened.study), o.study.register,
                                     o.study.alias) if o.study.register else None)
    return replace(out, trained=counts.trained, failed=counts.failed, report=text,
                   timing=timing, registered=registered)


def _out_of_time(st: optuna.Study, s: StudyPlan, counts: Counts, o: AblateOptions) -> str:
    done = sum(t.state == TrialState.COMPLETE for t in st.get_trials(deepcopy=False))
    return (f"study {st.study_name}: {o.deadline.source} came before the whole study: "
            f"{done} of {len(s.cells) * s.seeds} runs finished ({counts.trained} by this "
            f"command); {counts.unstarted} left unstarted, as none would finish before the "
            f"limit. Continue the study with {o.again}.")


# --seeds: a study of no seeds has no answer. An empty value (how `mlflow run` passes the
# parameter left at its default) is not given: the study's own number.
seed_count = Number(WHOLE_1)
# --concurrent: auto (None) or a whole number of units at once.
concurrency = Number(WHOLE_1, words={"auto": None})


def time_limit(text: str) -> float | None:
    """--time-limit: seconds, by the one rule for durations; empty is not given."""
    try:
        return lifecycle.parse_duration(text)
    except NumberError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _start_worker(o: AblateOptions, s: StudyPlan, name: str,
                  exp: tracking.Experiment) -> subprocess.Popen:
    args = [sys.executable, "-m", "pipeline.ablate", "--data", o.study.data,
            "--study", o.study_file, "--profile", s.profile, "--seeds", str(s.seeds),
            "--study-name", name,
            "--heartbeat", str(o.study.heartbeat), "--log-models", s.log_models,
            "--threads", str(lifecycle.worker_threads(o.jobs, o.concurrent or 1)), "--no-report",
            "--concurrent", str(o.concurrent or "auto"), "--budget", "off"]
    if o.deadline is not None:  # the same moment, whenever the helper starts
        args += ["--time-limit", f"{max(int(o.deadline.left()), 1)}s"]
    # The size this worker chose (or was given): a helper never sizes the study again.
    chosen = {**o.budget, **({k: s.budget[k] for k in ("epochs", "data_fraction")}
                             if s.sized else {})}
    for key, flag in (("epochs", "--epochs"), ("data_fraction", "--data-fraction"),
                      ("width", "--width")):
        if chosen.get(key):
            args += [flag, str(chosen[key])]
    # URLs through the environment: a password in them is not on a command line `ps` shows.
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
           "MLFLOW_EXPERIMENT_ID": exp.id(), STORAGE_ENV: o.study.storage}
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.Popen(args, env=env)


def main(argv: list[str] | None = None) -> int:
    p = parser("Run the ablation study (resumable; start it on several machines to share it).")
    lifecycle.add_study_args(p, DEFAULT_STORAGE, default_profile="auto")
    p.add_argument("--study", default=str(ABLATIONS / "study.yaml"))
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
    p.add_argument("--concurrent", type=concurrency, default=None, metavar="auto|K",
                   help="units this worker trains at once, each on its own thread (and CUDA "
                        "stream), each exactly as it trains alone; auto: the K a short "
                        "measurement finds at least 10%% faster (on a CPU, over the study's own "
                        "networks with the cores split between the units; a study shorter than "
                        "2 minutes trains one at a time)")
    p.add_argument("--time-limit", type=time_limit, default=None, metavar="DURATION",
                   help="stop by then (90s, 25m, 1h30m, 01:30:00; a bare number is minutes), "
                        "counted from this command's start: a run starts only where its "
                        "estimate ends in time, and the study says what is left and the command "
                        "that continues it (default: none, or the SLURM job's end where set)")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="build the report when the queue is empty (extra workers leave it to "
                        "the one that started them)")
    a = p.parse_args(argv)
    started = time.time()
    due = lifecycle.deadline(a.time_limit, started)
    again = lifecycle.again("pipeline.ablate", argv, bool(os.environ.get("MLFLOW_RUN_ID")))
    budget = {k: v for k, v in (("epochs", a.epochs), ("data_fraction", a.data_fraction),
                                ("width", a.width)) if v is not None}
    # auto begins with the cores for one unit (the rates the estimate reads); choose_slots
    # splits them where it takes several units at once.
    profile, exp = lifecycle.start(a, lambda prof: load_study(a.study, prof, a.seeds, budget),
                                   a.jobs, a.concurrent or 1)
    with lifecycle.resumable("pipeline.ablate", argv):
        out = run_ablate(AblateOptions(lifecycle.options(a), a.study, profile, a.seeds,
                                       budget, a.report_dir, a.jobs, a.log_models or None,
                                       a.report, a.concurrent, a.budget, deadline=due,
                                       again=again, threads=a.threads), exp)
    print(out.report)
    if out.timing:  # a helper started with --no-report leaves the end to its starter
        print(out.timing)
    print(f"Open it: mlflow ui --backend-store-uri {redact.url(mlflow.get_tracking_uri())}, then "
          f"http://127.0.0.1:5000/{out.view} (the study's cells, each the mean of its seeds; "
          f"the report is on the parent run `ablation {out.profile}`)."
          + ("" if out.profile == "full" else f"\n{FULL_ANSWER}"))
    return 0


if __name__ == "__main__":
    run_main(main)
