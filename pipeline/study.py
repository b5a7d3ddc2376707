"""The study engine that the ablation and the search share: a study is an Optuna RDB storage used
as a work queue, one parent MLflow run, and workers on any number of machines.

It owns the lifecycle both entry points go through:

1. :func:`open_study`: the storage, the study's experiment, and creating or joining the study
   (the entry run of ``mlflow run`` is taken off the environment so units never resume it);
2. :meth:`Opened.setting_up` (creator only) and :meth:`Opened.ready`: the creator writes the
   parent run and its queue; joiners wait until it is complete, then the entry run is filed
   under the parent;
3. :func:`unit`: one claimed unit (a cell and seed, or a trial) trained under a heartbeat, its
   outcome recorded whatever happens; a dead worker's unit goes back to the queue;
4. :func:`finish_parent` and :func:`register`.

The caller drives each step, so the walk from an entry point to a trained run goes down the
modules and never back up through a callback. Optuna's private attributes (a study's storage, a
trial's id) are used here and nowhere else, so an Optuna upgrade touches this one file.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import shlex
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Literal

import mlflow
import optuna
import torch
from mlflow.exceptions import MlflowException
from optuna.storages._rdb import models as rdb_models
from optuna.storages._rdb.storage import _create_scoped_session as rdb_session
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from . import tracking
from .cli import Number, whole  # noqa: F401 (the studies take it from here with their other arguments)
from .numbers import WHOLE_1
from .config import coerce, given, load_yaml
from .errors import EXPECTED, ConfigError, RepeatedFailure, UsageError
from .stores import TrackingLost, first_use_lock, owner_alive, owner_tag

PROFILES = ("smoke", "quick", "full")
Outcome = Literal["complete", "pruned", "failed"]
# A unit that fails with one of these is recorded as failed, with its reason, and the study goes
# on: what a run meets of its own (a diverging config, a cell its settings cannot build, data it
# cannot read, no memory left). Anything else is a bug in the code, not in the unit (BugCount).
UNIT_FAILURES = (*EXPECTED, torch.OutOfMemoryError, MemoryError)
# A CPU allocation that fails is a plain RuntimeError with this in its message.
OUT_OF_MEMORY = ("out of memory", "can't allocate memory")


def units_own(e: BaseException) -> bool:
    """Whether ``e`` is the unit's own failure (recorded, the study goes on) rather than a bug."""
    return isinstance(e, UNIT_FAILURES) or (
        isinstance(e, RuntimeError) and any(m in str(e).lower() for m in OUT_OF_MEMORY))


class BugCount:
    """A worker's unexpected errors, by type and message: the same one ``limit`` times stops the
    worker (a bug fails every unit alike; training the rest would only fail them too)."""

    def __init__(self, study: str, limit: int = 3, again: str = "the same command"):
        self.study, self.limit, self.again = study, limit, again
        self.seen: dict[str, int] = {}
        self._lock = threading.Lock()  # units training side by side fail from their threads

    def add(self, reason: str) -> None:
        with self._lock:
            self.seen[reason] = n = self.seen.get(reason, 0) + 1
        if n >= self.limit:
            raise RepeatedFailure(
                f"{n} units of study {self.study!r} failed with the same unexpected error, "
                f"{reason}: a bug, not a unit's own failure (each unit's traceback is in the log "
                f"and, where its run began, in that run's artifact traceback.txt). This worker "
                f"stopped; the units went back to the queue. Fix it, then continue the study "
                f"with {self.again}.")


# --------------------------------------------------------------------------- the command line


@dataclass(frozen=True)
class StudyOptions:
    """What every study command shares: its data, where the queue lives, and registration."""

    data: str
    storage: str
    study_name: str | None = None
    heartbeat: int = 20
    register: str | None = None
    alias: str = "best"


def add_study_args(p: argparse.ArgumentParser, default_storage: str,
                   default_profile: str = "quick") -> None:
    p.add_argument("--data", required=True, help="FER2013 in any supported layout")
    p.add_argument("--profile", default=default_profile, choices=(*PROFILES, "auto"),
                   help="the study's budget; auto: full on a CUDA GPU, quick on a CPU")
    p.add_argument("--storage", default=default_storage,
                   help="Optuna storage shared by the workers; postgresql://user@host/db to "
                        "share it between machines")
    p.add_argument("--study-name", default=None)
    p.add_argument("--heartbeat", type=Number(WHOLE_1), default=20,
                   help="seconds between worker heartbeats")
    p.add_argument("--register", default=None, metavar="NAME",
                   help="register the study's best model (by the val accuracy it is served "
                        "with) in the Model Registry as NAME, with the alias --alias")
    p.add_argument("--alias", default="best", help="alias of the registered version")


def resolve_profile(profile: str) -> str:
    """``auto``: the study's own settings (full) where a CUDA GPU can train them in minutes,
    the CPU demonstration (quick) elsewhere; said in one line."""
    if profile != "auto":
        return profile
    if torch.cuda.is_available():
        print(f"profile auto: full, the study's own settings (a CUDA GPU: "
              f"{torch.cuda.get_device_name()})", flush=True)
        return "full"
    print("profile auto: quick, a reduced demonstration (no CUDA GPU here; the study's own "
          "settings need one: pass --profile full to run them anyway)", flush=True)
    return "quick"


def say_stopped(module: str, argv: list[str] | None, under_mlflow_run: bool) -> None:
    """What a stopped study kept, and the exact command that continues it."""
    again = ("the same `mlflow run` command" if under_mlflow_run else
             f"`{shlex.join(['python', '-m', module, *(sys.argv[1:] if argv is None else argv)])}`")
    print(f"stopped: the study keeps every finished run, and the stopped ones go back to its "
          f"queue; continue the study with {again}", file=sys.stderr, flush=True)


def options(a: argparse.Namespace) -> StudyOptions:
    if a.heartbeat < 1:
        raise UsageError(f"--heartbeat must be at least 1 second, got {a.heartbeat}.")
    return StudyOptions(data=a.data, storage=a.storage, study_name=a.study_name or None,
                        heartbeat=a.heartbeat, register=a.register or None, alias=a.alias)


# --------------------------------------------------------------------------- the study file


def read_study_file(path: str | Path, what: str, keys: tuple[str, ...],
                    profile: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A study or search file and its chosen profile, checked: the file's mapping and the
    profile's own (``set`` is its budget, checked key by key)."""
    p = Path(path)
    d = load_yaml(p, what, UsageError, keys)
    profiles = d.get("profiles")
    if not isinstance(profiles, dict):
        raise UsageError(f"{p}: profiles must be a mapping of profile names to settings, got "
                         f"{profiles!r}.")
    if profile not in profiles:
        raise UsageError(f"{p}: unknown profile {profile!r}; this file has "
                         f"{', '.join(profiles) or 'none'}.")
    prof = profiles[profile] or {}
    if not isinstance(prof, dict) or not isinstance(prof.get("set") or {}, dict):
        raise UsageError(f"{p}: profile {profile} must be a mapping with `set` a mapping of "
                         f"config keys, got {prof!r}.")
    prof = {**prof, "set": check_budget(prof.get("set") or {}, f"{p} profile {profile}")}
    return d, prof


def check_budget(budget: dict[str, Any], where: str) -> dict[str, Any]:
    """Config keys of a budget, each checked and read as the config reads it; a key written
    without a value is left out (not given)."""
    try:
        return given({k: coerce(k, v, where) for k, v in budget.items()})
    except ConfigError as e:
        raise UsageError(str(e)) from None


# --------------------------------------------------------------------------- storage


def storage_of(study: optuna.Study):
    return study._storage


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    return trial._trial_id


def open_storage(url: str, heartbeat: int) -> optuna.storages.RDBStorage:
    kwargs: dict = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        kwargs["connect_args"] = {"connect_timeout": 5}  # an unreachable host fails in seconds
    try:
        with first_use_lock(url):  # the first worker creates the schema, alone
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=heartbeat, grace_period=heartbeat * 3,
                heartbeat_stale_trial_callback=optuna.storages.RetryFailedTrialCallback(
                    max_retry=3),
                engine_kwargs=kwargs)
    except Exception as e:  # sqlalchemy/psycopg2 raise many kinds; all mean the same here
        raise ConnectionError(f"Optuna storage {url} is not usable: "
                              f"{str(e).splitlines()[0][:300]}") from None


def fail_stale(study: optuna.Study) -> None:
    """Hand dead workers' units back to the queue. Optuna finds a trial stale only once it has
    a heartbeat, so a worker killed between taking a trial and its first beat would hold it
    RUNNING for ever, and the other workers would wait on it for ever. Such a trial, older than
    the grace period and still without a beat, is given one now: if its worker is alive it
    beats on; if not, the trial goes stale a grace period later and is retried like any other."""
    storage = storage_of(study)
    rdb = getattr(storage, "_backend", storage)  # the RDB storage under Optuna's cache
    optuna.storages.fail_stale_trials(study)
    grace = rdb.grace_period or 2 * (rdb.heartbeat_interval or 60)
    now = datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.datetime_start is None or (now - t.datetime_start).total_seconds() < grace:
            continue
        with rdb_session(rdb.scoped_session) as session:
            unbeaten = rdb_models.TrialHeartbeatModel.where_trial_id(trial_id(t), session) is None
        if unbeaten:
            storage.record_heartbeat(trial_id(t))


def settled(study: optuna.Study) -> list[FrozenTrial]:
    """The study's trials that stand for their unit: not the ones a dead or stopped worker
    handed back (their retry stands instead), and not the surplus ones a search worker gave up
    because others had already filled the study."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    return [t for t in trials if t.number not in retried and not t.user_attrs.get("surplus")]


# --------------------------------------------------------------------------- lifecycle


@dataclass
class Opened:
    """A study this worker created or joined, with the experiment its runs go to and the entry
    run of ``mlflow run`` (taken off the environment), if any."""

    study: optuna.Study
    created: bool
    experiment: tracking.Experiment
    entry_run: str | None
    url: str
    wait_s: float = 120

    @property
    def name(self) -> str:
        return self.study.study_name

    @property
    def parent(self) -> str:
        return self.study.user_attrs["parent_run_id"]

    @contextlib.contextmanager
    def setting_up(self, ready: str = "ready") -> Iterator[None]:
        """The creator's set-up (parent run, queue); ``ready`` is set last, and a set-up that
        fails deletes the study, so none is ever left half-made and looking valid."""
        try:
            yield
            self.study.set_user_attr(ready, True)
        except BaseException:
            optuna.delete_study(study_name=self.name, storage=storage_of(self.study))
            raise

    def ready(self, ready: str = "ready") -> None:
        """Wait until the creator has set the study up, check that its parent run is in this
        tracking store, and file this worker's entry run under it."""
        deadline = time.time() + self.wait_s
        while not self.study.user_attrs.get(ready):
            if time.time() > deadline:
                raise UsageError(f"study {self.name!r} exists but was never completed (its "
                                 f"creator died while setting it up); delete it or use another "
                                 f"--study-name.")
            time.sleep(1)
        check_parent_here(self.study, self.url)
        attach_entry_run(self.entry_run, self.parent, self.name)
        take_over_parent(self.parent, self.entry_run)


def open_study(opts: StudyOptions, exp: tracking.Experiment, name: str, description: str,
               **study_kwargs: Any) -> Opened:
    """Open the storage, give the study its experiment, and create or join the study."""
    storage = open_storage(opts.storage, opts.heartbeat)
    exp = tracking.use_study_experiment(exp, name, description)
    # Under `mlflow run` the entry point's run is in the environment; units must not resume it.
    entry_run = os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                    **study_kwargs)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, **study_kwargs)
        created = False
    return Opened(study, created, exp, entry_run, opts.storage)


def create_parent(exp: tracking.Experiment, name: str, run_name: str, role: str, *,
                  params: dict[str, Any], files: dict[str, str],
                  adopt: str | None = None) -> str:
    """The study's parent run: ``adopt`` (the entry run of ``mlflow run``) or a new one, named,
    tagged with the study and its role, with ``params`` and ``files`` (name -> text)."""
    client = mlflow.MlflowClient()
    # The owner goes in with the run's first write: a worker that dies at any point after
    # leaves a parent the next start on this machine can see is orphaned.
    parent = adopt or client.create_run(exp.id(), run_name=run_name,
                                        tags={"owner": owner_tag()}).info.run_id
    for k, v in {"study": name, "role": role, "git_commit": tracking.git_commit(),
                 "mlflow.runName": run_name}.items():
        client.set_tag(parent, k, v)
    for k, v in params.items():
        client.log_param(parent, k, v)
    for fname, text in files.items():
        client.log_text(parent, text, fname)
    return parent


def check_parent_here(study: optuna.Study, url: str) -> None:
    """Stop before any training when the study's parent run is not in this tracking store: the
    store was deleted or replaced since the study began, and its runs went with it."""
    parent = study.user_attrs["parent_run_id"]
    try:
        gone = mlflow.MlflowClient().get_run(parent).info.lifecycle_stage == "deleted"
    except MlflowException:
        gone = True
    if gone:
        where = (f"remove {url[len('sqlite:///'):]}" if url.startswith("sqlite:///")
                 else f"delete study {study.study_name!r} from {url}")
        raise UsageError(
            f"study {study.study_name!r} was begun against another MLflow tracking store: its "
            f"parent run {parent} is not in {mlflow.get_tracking_uri()}. To start over here, "
            f"{where} or pass --study-name with a new name; to continue it, point "
            f"MLFLOW_TRACKING_URI at the store that holds that run.")


def attach_entry_run(entry_run: str | None, parent: str, study_name: str) -> None:
    """Under `mlflow run`, a worker whose entry run is not the study's parent (a rerun after a
    kill, a second machine) files that run under the parent, so no empty top-level run is left
    per attempt; the study's units and report stay in the parent."""
    if not entry_run or entry_run == parent:
        return
    client = mlflow.MlflowClient()
    for k, v in {"mlflow.parentRunId": parent, "role": "worker", "study": study_name,
                 "worker_of": parent,
                 "mlflow.note.content": f"A worker's `mlflow run` invocation on study "
                                        f"`{study_name}`: its units and the report are in the "
                                        f"parent run {parent}."}.items():
        client.set_tag(entry_run, k, v)
    name = client.get_run(entry_run).info.run_name
    if not name.startswith("worker"):
        client.set_tag(entry_run, "mlflow.runName", f"worker ({name})")


def take_over_parent(parent: str, entry_run: str | None) -> None:
    """A worker joining a study owns its parent run when no live process does (its owner died,
    or it never had one), and puts back to RUNNING a parent a sweep marked KILLED meanwhile:
    the study goes on. Under `mlflow run` the entry run is `mlflow run`'s to own and end."""
    if parent == entry_run:
        return
    client = mlflow.MlflowClient()
    run = client.get_run(parent)
    owner = run.data.tags.get("owner")
    # RUNNING with an owner that lives, or that lives on another machine (unknown here), is
    # left be; KILLED or FAILED means a sweep found its owner dead.
    if run.info.status == "FINISHED" or (run.info.status == "RUNNING" and owner and
                                         owner_alive(owner) is not False):
        return
    client.set_tag(parent, "owner", owner_tag())
    if run.info.status != "RUNNING":
        client.update_run(parent, status="RUNNING")
        if "failure" in run.data.tags:
            client.delete_tag(parent, "failure")


def finish_parent(parent: str, entry_run: str | None) -> None:
    """A complete study's parent ends FINISHED, whatever an earlier, killed invocation left it
    as (FAILED, KILLED). Under `mlflow run`, the entry run's own end is `mlflow run`'s job."""
    client = mlflow.MlflowClient()
    if parent != entry_run and client.get_run(parent).info.status != "FINISHED":
        client.set_terminated(parent, "FINISHED")


def find_run(study_name: str, status: str | None = None, **tags: Any):
    """The latest run of the study with these tags (and this status), or None."""
    filt = " and ".join([f"tags.study = '{study_name}'",
                         *(f"tags.{k} = '{v}'" for k, v in tags.items())])
    if status:
        filt += f" and attributes.status = '{status}'"
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=filt,
                              output_format="list", max_results=5)
    return runs[0] if runs else None


def log_interval(parent: str, key: str, mean: float, lo: float, hi: float) -> None:
    """An effect and its interval on the parent run, in accuracy points rounded to 0.01 (the
    runs' own accuracies resolve one image in a few thousand, no finer)."""
    client = mlflow.MlflowClient()
    for suffix, v in (("", mean), ("_lo", lo), ("_hi", hi)):
        if math.isfinite(v):
            client.log_metric(parent, f"{key}{suffix}", round(100 * v, 2))


def register(filter_string: str, name: str, alias: str) -> dict[str, Any]:
    reg = tracking.register_best(filter_string, name, alias)
    if reg is None:
        raise UsageError(f"nothing to register as {name!r}: no finished run logged a model "
                         f"(for a study, pass --log-models all or reference).")
    return reg


# --------------------------------------------------------------------------- how long


def duration(seconds: float) -> str:
    """``42 s``, ``7 min``, ``1 h 05 min``: as precise as an estimate deserves."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


@dataclass
class Eta:
    """How long the units left will take this worker: each unit's predicted seconds (the images
    it trains and scores over the rates measured on this machine, plus its fixed costs) times a
    scale. The scale starts at a prior and moves to the ratio of measured to predicted time as
    units finish here, in proportion to the share of the predicted work they make up, so that
    one short unit cannot swing the estimate of the whole.

    A worker that trains ``slots`` units at once gets through the whole ``speedup`` times
    faster (measured), and each unit then takes ``slots / speedup`` times its time alone."""

    # The prediction counts every pass and a run's figures, measured here: on 2-core CPUs it
    # came within the noise of the measurement itself (docs/performance.md), so the prior is 1.
    PRIOR: ClassVar[float] = 1.0

    predicted: dict[Any, float]
    scale: float = PRIOR
    weight: float = 0.0  # predicted seconds the prior counts as; 0: a tenth of the total
    slots: int = 1
    speedup: float = 1.0
    _predicted_done: float = 0.0
    _measured_done: float = 0.0

    def __post_init__(self) -> None:
        self._prior = self.scale
        self.weight = self.weight or max(0.1 * sum(self.predicted.values()), 1e-9)

    def finished(self, key: Any, seconds: float) -> None:
        """``seconds``: the unit's wall time, beside whatever else this worker trained."""
        self._predicted_done += self.predicted[key]
        self._measured_done += seconds * self.speedup / self.slots
        self.scale = ((self._prior * self.weight + self._measured_done)
                      / (self.weight + self._predicted_done))

    def left(self, keys: list[Any]) -> float:
        return self.scale * sum(self.predicted[k] for k in keys) / self.speedup


class _AboveBars(io.TextIOBase):
    """Standard output printed above the progress bars, a whole line at a time, so that a bar
    is never drawn into the middle of a line."""

    def __init__(self, out: Any, bars_file: Any):
        self.out, self.bars_file, self.pending = out, bars_file, ""
        self._lock = threading.Lock()  # runs training side by side print from their threads

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            self.pending += text
            if "\n" in self.pending:
                lines, _, self.pending = self.pending.rpartition("\n")
                with tqdm.external_write_mode(file=self.bars_file):
                    self.out.write(lines + "\n")
                    self.out.flush()
        return len(text)

    def flush(self) -> None:
        self.out.flush()


@contextlib.contextmanager
def study_bar(total: int, done: int, file: Any = None) -> Iterator[tqdm]:
    """A bar across the whole study, kept below everything else the workers print (per-epoch
    lines and bars); the caller sets its ETA as the postfix. Shown on a terminal only: a log
    file gets the progress lines alone."""
    file = file if file is not None else sys.stderr
    bar = tqdm(total=total, initial=done, file=file, disable=None, unit="run", desc="study",
               bar_format="{desc} {n_fmt}/{total_fmt} runs |{bar}| {elapsed} so far{postfix}",
               dynamic_ncols=True)
    try:
        if bar.disable:
            yield bar
        else:
            with contextlib.redirect_stdout(_AboveBars(sys.stdout, file)) as above:
                try:
                    yield bar
                finally:
                    above.write("\n" if above.pending else "")
    finally:
        bar.close()


# --------------------------------------------------------------------------- units of work


def claim(study: optuna.Study) -> FrozenTrial | None:
    """Take one waiting trial; the storage locks the row, so two workers never take the same."""
    storage = storage_of(study)
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if storage.set_trial_state_values(trial_id(t), TrialState.RUNNING):
            # Beat at once: a RUNNING trial that never beat is never found stale, so a worker
            # killed right after claiming would hold its unit forever.
            storage.record_heartbeat(trial_id(t))
            return t
    return None


@dataclass
class Result:
    """What a unit's body sets (``value``: the objective) and what the engine recorded."""

    value: float = 0.0
    state: Outcome = "complete"
    reason: str | None = None


Tell = Callable[[TrialState, "list[float] | None"], None]


@contextlib.contextmanager
def unit(study: optuna.Study, tid: int, heartbeat: int, what: str,
         tell: Tell | None = None, bugs: BugCount | None = None,
         run_of: Callable[[], str | None] | None = None) -> Iterator[Result]:
    """Run the body as one claimed unit under a heartbeat, and record its outcome.

    ``tell(state, values)`` records it (the search's ``study.tell``, so its sampler hears of the
    result); by default the storage is told directly. A unit that fails with one of
    :data:`UNIT_FAILURES` is recorded failed with its reason, and the body's exception ends
    here. Any other exception is a bug: its traceback goes to the log and, as ``traceback.txt``,
    to the unit's MLflow run (``run_of()``), the unit goes back to the queue as a stop does, and
    ``bugs`` stops the worker when the same error has come back ``bugs.limit`` times. Ctrl-C, SIGTERM or a lost tracking store hand the unit back to the queue at once (not
    when its heartbeat goes stale), for this or another worker, and go on up: by default as the
    same trial, WAITING again, so that it is taken before the units that never began and no
    failure is recorded for a stop; a search's trial ends FAIL and a retry of it waits."""
    storage = storage_of(study)
    out = Result()

    def record(state: TrialState, values: list[float] | None = None) -> None:
        if tell is not None:
            tell(state, values)
        else:
            storage.set_trial_state_values(tid, state, values)

    def give_back() -> None:
        if tell is None:
            hand_back(storage, tid)
        else:  # a search's sampler must hear of the trial's end; its retry is a new trial
            record(TrialState.FAIL)
            optuna.storages.RetryFailedTrialCallback()(study, storage.get_trial(tid))

    try:
        with Heartbeat(storage, tid, heartbeat):
            yield out
        record(TrialState.COMPLETE, [float(out.value)])
    except optuna.TrialPruned:
        record(TrialState.PRUNED)
        out.state = "pruned"
    except (KeyboardInterrupt, TrackingLost):
        give_back()
        raise
    except Exception as e:
        out.state, out.reason = "failed", f"{type(e).__name__}: {e}"[:1000]
        if units_own(e):
            print(f"{what} failed: {out.reason}", flush=True)
            storage.set_trial_user_attr(tid, "error", out.reason)
            record(TrialState.FAIL)
            return
        _report_bug(what, out.reason, traceback.format_exc(), run_of)
        give_back()
        if bugs is not None:
            bugs.add(out.reason)


def _report_bug(what: str, reason: str, tb: str, run_of: Callable[[], str | None] | None) -> None:
    print(f"{what}: an unexpected error, {reason} (a bug: the unit goes back to the queue). "
          f"Its traceback:\n{tb}", file=sys.stderr, flush=True)
    run_id = run_of() if run_of is not None else None
    if run_id is not None:
        mlflow.MlflowClient().log_text(run_id, tb, "traceback.txt")


def hand_back(storage, tid: int) -> None:
    """A claimed unit WAITING again, without the heartbeat it had: an old beat on a trial taken
    again would look stale to another worker before the new one's first beat."""
    rdb = getattr(storage, "_backend", storage)
    with rdb_session(rdb.scoped_session) as session:
        beat = rdb_models.TrialHeartbeatModel.where_trial_id(tid, session)
        if beat is not None:
            session.delete(beat)
    storage.set_trial_state_values(tid, TrialState.WAITING)


class Heartbeat:
    """Records the trial's heartbeat from a thread while the unit trains."""

    def __init__(self, storage, trial_id: int, interval: int):
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._beat, args=(storage, trial_id, interval),
                                   daemon=True)

    def _beat(self, storage, trial_id: int, interval: int) -> None:
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # a missed beat is retried; the grace period covers several
                pass
            if self._stop.wait(interval):
                return

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(timeout=5)
