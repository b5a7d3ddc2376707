"""MLflow plumbing shared by every entry point: store, experiment, runs, tags, inputs."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import mlflow
import numpy as np

from .config import served_val_metric

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "fer2013"


def setup(experiment: str | None) -> None:
    """Point MLflow at ``MLFLOW_TRACKING_URI`` (default: ``mlflow.db`` here) and the experiment.

    Under ``mlflow run`` the run and its experiment are already chosen; choosing another one
    would fail, so the name is then ignored.
    """
    global _EXPERIMENT_NAME, _CHOSEN
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(DEFAULT_TRACKING_URI)
    with first_use_lock(mlflow.get_tracking_uri()):
        # A fresh store is created and migrated by its first client; two processes starting
        # together on a fresh SQLite file would both migrate it and one would fail.
        check_reachable()
        if os.environ.get("MLFLOW_RUN_ID"):
            _CHOSEN = "mlflow run"  # its run's experiment
        elif experiment or not os.environ.get("MLFLOW_EXPERIMENT_ID"):
            _CHOSEN = "user" if experiment else "default"
            _EXPERIMENT_NAME = experiment or DEFAULT_EXPERIMENT
            mlflow.set_experiment(_EXPERIMENT_NAME)
        else:
            _CHOSEN = "environment"  # a parent process (a study's local worker) chose it
    fail_dead_runs()


_EXPERIMENT_NAME = DEFAULT_EXPERIMENT
_CHOSEN = "default"  # who chose the experiment: default | user | mlflow run | environment


def use_study_experiment(name: str, description: str) -> str:
    """A study or search gets an experiment of its own, named after it, with a description;
    unless `mlflow run`, ``--experiment`` or a parent process already chose one."""
    global _EXPERIMENT_NAME
    client = mlflow.MlflowClient()
    if _CHOSEN == "default":
        _EXPERIMENT_NAME = name
        with first_use_lock(mlflow.get_tracking_uri()):
            exp = mlflow.set_experiment(name)
    elif _CHOSEN == "mlflow run":  # `mlflow run --experiment-name X`: describe X if bare
        exp = client.get_experiment(experiment_id())
        if exp.name == "Default":
            return exp.experiment_id
    else:
        return experiment_id()
    if not exp.tags.get("mlflow.note.content"):
        client.set_experiment_tag(exp.experiment_id, "mlflow.note.content", description)
    return exp.experiment_id


def experiment_id() -> str:
    """The experiment runs go to: the one `mlflow run` chose, else the one :func:`setup` named."""
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    if os.environ.get("MLFLOW_RUN_ID"):
        return mlflow.get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id
    exp = mlflow.get_experiment_by_name(_EXPERIMENT_NAME)
    return exp.experiment_id if exp else mlflow.set_experiment(_EXPERIMENT_NAME).experiment_id


# Bounds on MLflow's HTTP retries: its defaults (7 retries, 120 s timeout) hang for minutes on a
# dead tracking server before failing. Users can still set their own in the environment.
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
_QUICK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def bound_retries() -> None:
    for k, v in HTTP_BOUNDS.items():
        os.environ.setdefault(k, v)


@contextlib.contextmanager
def _quick_http() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in _QUICK}
    os.environ.update(_QUICK)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _is_db(uri: str) -> bool:
    return uri.split(":", 1)[0].split("+")[0] in ("postgresql", "mysql", "mssql")


def check_reachable() -> None:
    """Fail in seconds, before any training, when the tracking store cannot be reached."""
    from mlflow.exceptions import MlflowException

    uri = mlflow.get_tracking_uri()
    try:
        if _is_db(uri):
            # MLflow's own engine retries a dead database for ~100 s; one try says enough here.
            import sqlalchemy

            engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 5})
            try:
                engine.connect().close()
            finally:
                engine.dispose()
        with _quick_http():
            mlflow.MlflowClient().search_experiments(max_results=1)
    except Exception as e:  # MlflowException, OSError, sqlalchemy's and the drivers' errors
        if not isinstance(e, (MlflowException, OSError)) and "sqlalchemy" not in type(e).__module__:
            raise
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ConnectionError(f"MLflow tracking store {uri} is not reachable: {msg}") from None


def reachable() -> bool:
    try:
        check_reachable()
        return True
    except ConnectionError:
        return False


class TrackingLost(ConnectionError):
    """The tracking store stopped answering in the middle of a run."""


@contextlib.contextmanager
def first_use_lock(uri: str) -> Iterator[None]:
    """Serialise first uses of a store between processes: its first client creates and migrates
    the schema, and two doing so at once fail (a duplicate column on SQLite, a UniqueViolation
    on PostgreSQL). A file lock beside a SQLite file; an advisory lock on PostgreSQL."""
    if uri.startswith("sqlite:///") and not uri.endswith(":memory:"):
        import fcntl

        db = Path(uri[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{db}.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    elif uri.startswith("postgresql"):
        import sqlalchemy

        key = int.from_bytes(hashlib.sha1(b"fer-pipeline first use").digest()[:7], "big")
        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 5})
        try:
            conn = engine.connect()
        except Exception:
            engine.dispose()
            yield  # unreachable: the caller's own connection reports it
            return
        try:
            conn.execute(sqlalchemy.text(f"SELECT pg_advisory_lock({key})"))
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text(f"SELECT pg_advisory_unlock({key})"))
        finally:
            conn.close()
            engine.dispose()
    else:
        yield


# --------------------------------------------------------------------------- run ownership
# A run records which process trains it. A process that dies without ending its run (a crash,
# kill -9) leaves it RUNNING; any later entry point on the same machine marks it FAILED, so a
# resume, a report or a worker never takes it for a live one.


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_tag() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid) or '?'}"


def owner_alive(tag: str | None) -> bool | None:
    """Whether the process named by an owner tag still runs; None when it is on another host."""
    if not tag or tag.count(":") < 2:
        return None
    host, pid, start = tag.rsplit(":", 2)
    if host != socket.gethostname():
        return None
    now = _start_time(int(pid))
    if now is None:
        return False
    return start == "?" or now == start  # a reused pid has another start time


def fail_dead_runs() -> list[str]:
    """Mark FAILED the RUNNING runs whose training process on this machine has died."""
    client = mlflow.MlflowClient()
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments(max_results=1000)],
        filter_string=f"attributes.status = 'RUNNING' and "
                      f"tags.owner LIKE '{socket.gethostname()}:%'", max_results=1000)
    dead = []
    for r in runs:
        if owner_alive(r.data.tags.get("owner")) is False:
            client.set_tag(r.info.run_id, "failure", "its training process died without ending "
                                                     "the run (a crash or kill -9)")
            client.set_terminated(r.info.run_id, "FAILED")
            dead.append(r.info.run_id)
    return dead


_GIT: str | None = None


def git_commit() -> str:
    global _GIT
    if _GIT is None:
        try:
            _GIT = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                  cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            _GIT = "unknown"
    return _GIT


@contextlib.contextmanager
def run(name: str | None = None, parent_run_id: str | None = None, run_id: str | None = None,
        tags: dict[str, str] | None = None,
        resume_hint: bool = False) -> Iterator[mlflow.ActiveRun]:
    """Start (or resume) a run, nested when another is active. An exception ends it FAILED."""
    nested = mlflow.active_run() is not None
    all_tags = {"git_commit": git_commit(), "owner": owner_tag(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    active = mlflow.start_run(run_id=run_id, run_name=None if run_id else name, nested=nested,
                              tags=all_tags)
    rid = active.info.run_id
    resume = (f"`python -m pipeline.train --config ... --data ... --resume {rid}`" if resume_hint
              else "the same command")
    try:
        yield active
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM: the run was stopped, it did not fail; its checkpoint stays.
        mlflow.end_run("KILLED")
        if resume_hint:
            print(f"stopped: run {rid} is KILLED with its checkpoint kept; continue it with "
                  f"{resume}", file=sys.stderr, flush=True)
        raise
    except BaseException as e:
        if not _store_error(e) or reachable():
            mlflow.end_run("FAILED")
            raise
        # The store is gone: telling it the run failed would only wait out more retries.
        os.environ.update(_QUICK)
        with contextlib.suppress(Exception):
            mlflow.end_run("FAILED")
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise TrackingLost(
            f"the MLflow tracking store {mlflow.get_tracking_uri()} stopped answering during "
            f"run {rid} ({msg}); the run's checkpoint is kept: once the store is back, continue "
            f"with {resume}") from None
    else:
        mlflow.end_run("FINISHED")


def _store_error(e: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(e, (MlflowException, OSError)) or "sqlalchemy" in type(e).__module__ or \
        "requests" in type(e).__module__ or "urllib3" in type(e).__module__


def log_input(data: Any, context: str = "training") -> None:
    """Log the data set as a run input with a digest of the whole source; mlflow's own numpy
    digest hashes only the first rows, so two different files could look the same."""
    mlflow.log_input(dataset(data), context=context)


def dataset(data: Any) -> Any:
    return mlflow.data.from_numpy(
        data.images, targets=data.labels, source=str(Path(data.source).resolve()),
        name=Path(data.source).name, digest=data.digest[-32:])


def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)


def log_figure(fig: Any, artifact_file: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(fig, artifact_file)
    plt.close(fig)


def log_npz(arrays: dict[str, np.ndarray], artifact_file: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        np.savez_compressed(path, **arrays)
        parent = str(Path(artifact_file).parent)
        mlflow.log_artifact(str(path), None if parent == "." else parent)


def _served_metric(run) -> str:
    return served_val_metric(run.data.params.get("tta") == "True")


def served_val_acc(run) -> float | None:
    """The validation accuracy a run's logged model is served with: the TTA one for a run
    trained with ``tta`` (its model applies the views), the plain one otherwise."""
    return run.data.metrics.get(_served_metric(run))


def best_served(runs: list) -> Any:
    """The run with the best :func:`served_val_acc` (None if none has one)."""
    scored = [r for r in runs if served_val_acc(r) is not None]
    return max(scored, key=served_val_acc) if scored else None


def register_best(filter_string: str, name: str, alias: str) -> dict[str, Any] | None:
    """Register the model of the finished run with the best served val accuracy
    (:func:`served_val_acc`) among those matching ``filter_string`` (selected on val, never on
    test) as a new version of ``name``, and point ``alias`` at it. None when no such run logged
    a model."""
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"{filter_string} and attributes.status = "
                                            f"'FINISHED' and tags.model_uri != ''")
    best = best_served(runs)
    if best is None:
        return None
    acc = served_val_acc(best)
    kind = _served_metric(best)
    version = mlflow.register_model(best.data.tags["model_uri"], name)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(name, alias, version.version)
    client.set_model_version_tag(name, version.version, "selected_by", f"best {kind}")
    print(f"registered models:/{name}@{alias} (version {version.version}): run "
          f"{best.info.run_id}, {kind.replace('_', ' ')} {acc:.4f}", flush=True)
    return {"name": name, "version": version.version, "alias": alias,
            "run_id": best.info.run_id, "val_acc": acc, "selected_by": kind,
            "uri": f"models:/{name}@{alias}"}
