"""What the ablation and the tuner share to spread work over many workers: an Optuna RDB storage
with heartbeats (a dead worker's trial is retried by the others) and the heartbeat itself."""

from __future__ import annotations

import threading

import optuna

from .cli import UsageError
from .tracking import first_use_lock


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
    import mlflow
    from mlflow.exceptions import MlflowException

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
    import mlflow

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
    import mlflow

    client = mlflow.MlflowClient()
    if parent != entry_run and client.get_run(parent).info.status != "FINISHED":
        client.set_terminated(parent, "FINISHED")
