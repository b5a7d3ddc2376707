"""The work queue: an Optuna RDB storage whose trials are the study's units. A worker claims a
unit under the storage's row lock, trains it under a heartbeat, and records its outcome; a dead
worker's unit goes back to the queue. Optuna's private attributes (a study's storage, a trial's
id, its RDB models) are used here and nowhere else, so an Optuna upgrade touches this one file."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Iterator, Literal

import mlflow
import optuna
from optuna.storages._rdb import models as rdb_models
from optuna.storages._rdb.storage import _create_scoped_session as rdb_session
from optuna.trial import FrozenTrial, TrialState

from .. import redact
from ..errors import EXPECTED, RepeatedFailure
from ..slots import OutOfMemory
from ..stores import TrackingLost, first_use_lock

Outcome = Literal["complete", "pruned", "failed"]
# A unit that fails with one of these is recorded as failed, with its reason, and the study goes
# on: what a run meets of its own (a diverging config, a cell its settings cannot build, data it
# cannot read, no memory left). Anything else is a bug in the code, not in the unit (BugCount).
UNIT_FAILURES = (*EXPECTED, OutOfMemory, MemoryError)
# A dead worker's trial comes back WAITING as a new trial (system attr `failed_trial`). Optuna
# 4.9 renamed the callback and drops the old name in 6.0; the range allowed here has one or both.
RETRY = (getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
         or optuna.storages.RetryFailedTrialCallback)
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
                heartbeat_stale_trial_callback=RETRY(max_retry=3),
                engine_kwargs=kwargs)
    except Exception as e:  # sqlalchemy/psycopg2 raise many kinds; all mean the same here
        raise ConnectionError(f"Optuna storage {redact.url(url)} is not usable: "
                              f"{redact.scrub(str(e).splitlines()[0][:300])}") from None


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



# --------------------------------------------------------------------------- units of work


def wait_for_others(running: int, what: str, poll: float) -> None:
    """Nothing to take here while other workers still train ``running`` units: wait a poll."""
    print(f"waiting for {running} running {what}(s) on other workers", flush=True)
    time.sleep(poll)


def claim(study: optuna.Study,
          fits: Callable[[FrozenTrial], bool] | None = None) -> FrozenTrial | None:
    """Take one waiting trial (the first for which ``fits`` holds, where given); the storage
    locks the row, so two workers never take the same."""
    storage = storage_of(study)
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if fits is not None and not fits(t):
            continue
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
            RETRY()(study, storage.get_trial(tid))

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
