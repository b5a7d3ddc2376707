"""What the ablation and the tuner share to spread work over many workers: an Optuna RDB storage
with heartbeats (a dead worker's trial is retried by the others), the heartbeat itself, and the
running of one unit of work (a cell and seed, or a trial) to its recorded outcome.

Optuna's private attributes (a study's storage, a trial's id) are used here and nowhere else, so
an Optuna upgrade touches this one file.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import mlflow
import optuna
from mlflow.exceptions import MlflowException
from optuna.trial import TrialState

from .errors import EXPECTED, UsageError
from .tracking import TrackingLost, first_use_lock

# A unit that fails with one of these is recorded as failed, with its reason, and the study goes
# on (a diverging config, an out-of-memory cell); anything else stops the worker.
UNIT_FAILURES = (*EXPECTED, RuntimeError, MemoryError, ValueError)
Tell = Callable[[TrialState, "list[float] | None"], None]


def storage_of(study: optuna.Study):
    return study._storage


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    return trial._trial_id


def claim(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """Take one waiting trial; the storage locks the row, so two workers never take the same."""
    storage = storage_of(study)
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if storage.set_trial_state_values(trial_id(t), TrialState.RUNNING):
            # Beat at once: a RUNNING trial that never beat is never found stale, so a worker
            # killed right after claiming would hold its unit forever.
            storage.record_heartbeat(trial_id(t))
            return t
    return None


def run_unit(study: optuna.Study, tid: int, heartbeat: int, fn: Callable[[], float],
             what: str, tell: Tell | None = None) -> tuple[str, str | None]:
    """Run one claimed unit under a heartbeat and record its outcome.

    ``tell(state, values)`` records it (the tuner's ``study.tell``, so its sampler hears of the
    result); by default the storage is told directly. Returns ``("complete" | "pruned" |
    "failed", reason)``. Ctrl-C, SIGTERM or a lost tracking store hand the unit back to the
    queue at once (not when its heartbeat goes stale), for this or another worker, and
    re-raise."""
    storage = storage_of(study)

    def record(state: TrialState, values: list[float] | None = None) -> None:
        if tell is not None:
            tell(state, values)
        else:
            storage.set_trial_state_values(tid, state, values)

    try:
        with Heartbeat(storage, tid, heartbeat):
            value = fn()
        record(TrialState.COMPLETE, [float(value)])
        return "complete", None
    except optuna.TrialPruned:
        record(TrialState.PRUNED)
        return "pruned", None
    except (KeyboardInterrupt, TrackingLost):
        record(TrialState.FAIL)
        optuna.storages.RetryFailedTrialCallback()(study, storage.get_trial(tid))
        raise
    except UNIT_FAILURES as e:
        reason = f"{type(e).__name__}: {e}"[:1000]
        print(f"{what} failed: {reason}", flush=True)
        storage.set_trial_user_attr(tid, "error", reason)
        record(TrialState.FAIL)
        return "failed", reason


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


class Heartbeat:
    """Records the trial's heartbeat from a thread while the cell trains."""

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
    per attempt; the study's cells and report stay in the parent."""
    if not entry_run or entry_run == parent:
        return
    client = mlflow.MlflowClient()
    for k, v in {"mlflow.parentRunId": parent, "role": "worker", "study": study_name,
                 "worker_of": parent,
                 "mlflow.note.content": f"A worker's `mlflow run` invocation on study "
                                        f"`{study_name}`: its cells and the report are in the "
                                        f"parent run {parent}."}.items():
        client.set_tag(entry_run, k, v)
    name = client.get_run(entry_run).info.run_name
    if not name.startswith("worker"):
        client.set_tag(entry_run, "mlflow.runName", f"worker ({name})")


def finish_parent(parent: str, entry_run: str | None) -> None:
    """A complete study's parent ends FINISHED, whatever an earlier, killed invocation left it
    as (FAILED, KILLED). Under `mlflow run`, the entry run's own end is `mlflow run`'s job."""
    client = mlflow.MlflowClient()
    if parent != entry_run and client.get_run(parent).info.status != "FINISHED":
        client.set_terminated(parent, "FINISHED")


def create_or_join(storage, name: str, set_up: Callable[[optuna.Study], None], ready: str,
                   wait_s: float = 120, **study_kwargs: Any) -> tuple[optuna.Study, bool]:
    """Create the study and set it up (the first worker) or join it (every other one), once the
    creator has set the user attribute ``ready``, which ``set_up`` sets last."""
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                    **study_kwargs)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, **study_kwargs)
        created = False
    if created:
        try:
            set_up(study)
        except BaseException:
            # Leave nothing half-made: a study without its full set-up must not look valid.
            optuna.delete_study(study_name=name, storage=storage)
            raise
    deadline = time.time() + wait_s
    while not study.user_attrs.get(ready):
        if time.time() > deadline:
            raise UsageError(f"study {name!r} exists but was never completed (its creator died "
                             f"while setting it up); delete it or use another --study-name.")
        time.sleep(1)
    return study, created


def find_run(study_name: str, status: str | None = None, **tags: Any):
    """The latest run of the study with these tags (and this status), or None."""
    filt = " and ".join([f"tags.study = '{study_name}'",
                         *(f"tags.{k} = '{v}'" for k, v in tags.items())])
    if status:
        filt += f" and attributes.status = '{status}'"
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=filt,
                              output_format="list", max_results=5)
    return runs[0] if runs else None
