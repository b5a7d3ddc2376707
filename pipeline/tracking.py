"""The MLflow side of every entry point: which experiment runs go to (a value, chosen once at
the start), the runs themselves, what they log, and the Model Registry. What lies beneath the
store (locks, reachability, process liveness) is :mod:`pipeline.stores`."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from . import plots, redact
from .config import served_val_metric, unflatten
from .stores import (TrackingLost, check_reachable, first_use_lock, owner_alive, owner_prefix,
                     owner_tag, quick_http, reachable)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "fer2013"
# MLflow 3 opens an experiment without this tag in its GenAI view (traces, an assistant, the
# study as one collapsed row); with it, in the model-training view of runs and their metrics.
KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
ChosenBy = Literal["default", "user", "mlflow run", "environment"]


@dataclass(frozen=True)
class Experiment:
    """The experiment an entry point's runs go to, and who chose it: the default, the user
    (``--experiment``), ``mlflow run`` (its run's), or a parent process (a study's local worker,
    through ``MLFLOW_EXPERIMENT_ID``). ``name`` is None when it was not chosen by name here."""

    name: str | None
    chosen_by: ChosenBy

    def id(self) -> str:
        if os.environ.get("MLFLOW_EXPERIMENT_ID"):
            return os.environ["MLFLOW_EXPERIMENT_ID"]
        if os.environ.get("MLFLOW_RUN_ID"):
            return mlflow.get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id
        name = self.name or DEFAULT_EXPERIMENT
        exp = mlflow.get_experiment_by_name(name)
        return exp.experiment_id if exp else _set_experiment(name).experiment_id


def setup(experiment: str | None) -> Experiment:
    """Point MLflow at ``MLFLOW_TRACKING_URI`` (default: ``mlflow.db`` here) and choose the
    experiment. Under ``mlflow run`` the run and its experiment are already chosen; choosing
    another one would fail, so the name is then ignored."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(DEFAULT_TRACKING_URI)
    with first_use_lock(mlflow.get_tracking_uri()):
        # A fresh store is created and migrated by its first client; two processes starting
        # together on a fresh SQLite file would both migrate it and one would fail.
        check_reachable()
        if os.environ.get("MLFLOW_RUN_ID"):
            return Experiment(None, "mlflow run")
        if experiment or not os.environ.get("MLFLOW_EXPERIMENT_ID"):
            chosen = Experiment(experiment or DEFAULT_EXPERIMENT, "user" if experiment else "default")
            mark_model_training(_set_experiment(chosen.name))
            return chosen
        return Experiment(None, "environment")


def _set_experiment(name: str) -> Any:
    """``mlflow.set_experiment``, except that an experiment this creates in a SQLite store keeps
    its artifacts in ``mlruns/`` beside the database file (MLflow's default is ``./mlruns`` in
    whatever folder the first run started from)."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(name) is None:
        db = Path(uri[len("sqlite:///"):]).resolve()
        where = db.parent / "mlruns" / uuid.uuid4().hex[:12]
        with contextlib.suppress(MlflowException):  # another process created it first
            mlflow.MlflowClient().create_experiment(name, artifact_location=str(where))
    return mlflow.set_experiment(name)


def use_study_experiment(exp: Experiment, name: str, description: str) -> Experiment:
    """A study or search gets an experiment of its own, named after it, with a description;
    unless `mlflow run`, ``--experiment`` or a parent process already chose one."""
    client = mlflow.MlflowClient()
    if exp.chosen_by == "default":
        with first_use_lock(mlflow.get_tracking_uri()):
            found = _set_experiment(name)
        exp = Experiment(name, "default")
    elif exp.chosen_by == "mlflow run":  # `mlflow run --experiment-name X`: describe X if bare
        found = client.get_experiment(exp.id())
        if found.name == "Default":
            return exp
    else:
        return exp
    if not found.tags.get("mlflow.note.content"):
        client.set_experiment_tag(found.experiment_id, "mlflow.note.content", description)
    mark_model_training(found)
    return exp


def mark_model_training(exp: Any) -> None:
    """Open the experiment in MLflow's model-training view, unless its kind is already set."""
    if KIND_TAG not in exp.tags:
        mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, KIND_TAG, MODEL_TRAINING)


# The MLflow UI's Share button stores a runs-table view as an experiment tag under this prefix;
# the URL's viewStateShareKey names it, and the UI opens the experiment on that view. (Read off
# MLflow 3.17's UI: the shared state carries the search, the order, the columns and the
# grouping; it leaves out which runs are expanded.)
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."


def share_view(experiment_id: str, key: str, state: dict[str, Any]) -> str:
    """Store a runs-table view in the experiment, as the UI's Share button would, and return
    the path and query that open the UI on it."""
    mlflow.MlflowClient().set_experiment_tag(experiment_id, SHARED_VIEW_PREFIX + key,
                                             json.dumps(state, separators=(",", ":")))
    # workflowType: MLflow 3's UI otherwise opens in its GenAI mode (traces, an assistant).
    return (f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={key}")


def sweep_dead_runs() -> list[str]:
    """Mark FAILED the RUNNING runs of this pipeline whose training process, one this process
    can see (this machine, container and boot), has died (a crash or kill -9 left them
    RUNNING); every entry point does this as it starts. No other run is looked at."""
    client = mlflow.MlflowClient()
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments(max_results=1000)],
        filter_string=f"attributes.status = 'RUNNING' and "
                      f"tags.owner LIKE '{owner_prefix()}%'", max_results=1000)
    dead = []
    for r in runs:
        if owner_alive(r.data.tags.get("owner")) is False:
            if r.data.tags.get("role"):
                # A study's parent: the study is not failed, only stopped; running its command
                # again continues it and puts the parent back to RUNNING.
                client.set_tag(r.info.run_id, "failure",
                               "the worker that owned this study's parent run stopped before the "
                               "study finished; run the study's command again to continue it")
                client.set_terminated(r.info.run_id, "KILLED")
            else:
                client.set_tag(r.info.run_id, "failure",
                               "its training process ended without ending the run (a crash, a "
                               "kill -9, or the tracking store unreachable when it ended)")
                client.set_terminated(r.info.run_id, "FAILED")
            dead.append(r.info.run_id)
    return dead


def git_commit() -> str:
    """The checkout's commit, asked of git each time (a few ms a run): no state kept here."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def run(name: str | None = None, parent_run_id: str | None = None, run_id: str | None = None,
        tags: dict[str, str] | None = None,
        resume_command: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start (or resume) a run, nested when another is active. An exception ends it FAILED;
    Ctrl-C or SIGTERM ends it KILLED (it was stopped, it did not fail), and the caller says
    what was kept. ``resume_command`` (``{run_id}`` standing for the run) is how to continue it
    should the store go away; by default, the same command."""
    nested = mlflow.active_run() is not None
    all_tags = {"git_commit": git_commit(), "owner": owner_tag(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    active = mlflow.start_run(run_id=run_id, run_name=None if run_id else name, nested=nested,
                              tags=all_tags)
    rid = active.info.run_id
    if run_id and "failure" in active.data.tags:
        # Resumed: why an earlier attempt ended no longer describes the run.
        mlflow.MlflowClient().delete_tag(rid, "failure")
    resume = (f"`{resume_command.replace('{run_id}', rid)}`" if resume_command
              else "the same command")
    try:
        yield active
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            mlflow.set_tag("failure", "stopped (Ctrl-C or SIGTERM); it continues from its "
                                      "checkpoint when resumed")
        mlflow.end_run("KILLED")
        raise
    except BaseException as e:
        if _store_full(e):
            with contextlib.suppress(Exception):
                mlflow.end_run("FAILED")  # cannot be written either; the next sweep marks it
            raise TrackingLost(
                f"the MLflow tracking store {redact.url(mlflow.get_tracking_uri())} cannot be "
                f"written: {_free_space_of(mlflow.get_tracking_uri())} (run {rid}); free some space, "
                f"then continue from the run's last checkpoint with {resume}") from None
        if not _store_error(e) or reachable():
            with contextlib.suppress(Exception):
                reason = str(e).strip().splitlines()[0][:500] if str(e).strip() else ""
                mlflow.set_tag("failure", f"{type(e).__name__}: {reason}" if reason
                               else type(e).__name__)
            mlflow.end_run("FAILED")
            raise
        # The store is gone: telling it the run failed would only wait out more retries.
        with quick_http(), contextlib.suppress(Exception):
            mlflow.end_run("FAILED")
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise TrackingLost(
            f"the MLflow tracking store {redact.url(mlflow.get_tracking_uri())} stopped answering "
            f"during "
            f"run {rid} ({msg}); the run's checkpoint is kept: once the store is back, continue "
            f"with {resume}") from None
    else:
        mlflow.end_run("FINISHED")


def _store_full(e: BaseException) -> bool:
    """A write to the tracking store or its artifacts failed for want of space."""
    seen: BaseException | None = e
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EFBIG,
                                                        errno.EDQUOT):
            return True
        if "database or disk is full" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _free_space_of(uri: str) -> str:
    folder = Path(uri[len("sqlite:///"):]).resolve().parent if uri.startswith("sqlite:///") \
        else Path(".").resolve()
    try:
        return f"its folder {folder} is full ({shutil.disk_usage(folder).free / 2**20:.1f} MB free)"
    except OSError:
        return f"its folder {folder} is full"


def _store_error(e: BaseException) -> bool:
    return isinstance(e, (MlflowException, OSError)) or "sqlalchemy" in type(e).__module__ or \
        "requests" in type(e).__module__ or "urllib3" in type(e).__module__


_INPUTS = threading.Lock()


def log_input(data: Any, context: str = "training") -> None:
    """Log the data set as a run input with a digest of the whole source; mlflow's own numpy
    digest hashes only the first rows, so two different files could look the same.

    MLflow looks the data set up in the experiment and inserts it when absent, so two runs
    starting together (slots of one worker, or two workers) can both insert it, and one then
    fails on the table's unique key; that one finds the data set on a second try."""
    with _INPUTS:
        for attempt in range(3):
            try:
                mlflow.log_input(dataset(data), context=context)
                return
            except MlflowException as e:
                if attempt == 2 or "unique" not in str(e).lower():
                    raise


def dataset(data: Any) -> Any:
    return mlflow.data.from_numpy(
        data.images, targets=data.labels, source=str(Path(data.source).resolve()),
        name=Path(data.source).name, digest=data.digest[-32:])


def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)


def log_figure(fig: Any, artifact_file: str) -> None:
    mlflow.log_figure(fig, artifact_file)
    plots.close(fig)


def log_npz(arrays: dict[str, np.ndarray], artifact_file: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        np.savez_compressed(path, **arrays)
        parent = str(Path(artifact_file).parent)
        mlflow.log_artifact(str(path), None if parent == "." else parent)


def _served_metric(run) -> str:
    return served_val_metric(unflatten(run.data.params).get("tta", False))


def served_val_acc(run) -> float | None:
    """The validation accuracy a run's logged model is served with: the TTA one for a run
    trained with ``tta`` (its model applies the views), the plain one otherwise."""
    return run.data.metrics.get(_served_metric(run))


def best_served(runs: list) -> Any:
    """The run with the best :func:`served_val_acc` (None if none has one)."""
    scored = [r for r in runs if served_val_acc(r) is not None]
    return max(scored, key=served_val_acc) if scored else None


def model_of(run) -> str | None:
    """The model ``run`` logged itself: its ``model_uri`` tag where that names a model whose
    source run is this run (a tag anyone with write access could point elsewhere)."""
    uri = run.data.tags.get("model_uri", "")
    if uri.startswith(f"runs:/{run.info.run_id}/"):
        return uri
    if uri.startswith("models:/m-"):
        try:
            model = mlflow.get_logged_model(uri[len("models:/"):].split("/", 1)[0])
        except MlflowException:
            return None
        return uri if model.source_run_id == run.info.run_id else None
    return None


def register_best(runs: list, name: str, alias: str) -> dict[str, Any] | None:
    """Register the model of the finished run with the best served val accuracy
    (:func:`served_val_acc`) among ``runs`` (selected on val, never on test) as a new version of
    ``name``, and point ``alias`` at it; only a model the run logged itself counts. None when
    no such run logged a model."""
    runs = [r for r in runs if r.info.status == "FINISHED" and model_of(r)]
    best = best_served(runs)
    if best is None:
        return None
    acc = served_val_acc(best)
    kind = _served_metric(best)
    version = mlflow.register_model(model_of(best), name)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(name, alias, version.version)
    client.set_model_version_tag(name, version.version, "selected_by", f"best {kind}")
    print(f"registered models:/{name}@{alias} (version {version.version}): run "
          f"{best.info.run_id}, {kind.replace('_', ' ')} {acc:.4f}", flush=True)
    return {"name": name, "version": version.version, "alias": alias,
            "run_id": best.info.run_id, "val_acc": acc, "selected_by": kind,
            "uri": f"models:/{name}@{alias}"}
