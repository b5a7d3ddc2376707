"""MLflow plumbing shared by every entry point: store, experiment, runs, tags, inputs."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import mlflow
import numpy as np

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "fer2013"


def setup(experiment: str | None) -> None:
    """Point MLflow at ``MLFLOW_TRACKING_URI`` (default: ``mlflow.db`` here) and the experiment.

    Under ``mlflow run`` the run and its experiment are already chosen; choosing another one
    would fail, so the name is then ignored.
    """
    global _EXPERIMENT_NAME
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(DEFAULT_TRACKING_URI)
    check_reachable()
    if os.environ.get("MLFLOW_RUN_ID") or os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return
    _EXPERIMENT_NAME = experiment or DEFAULT_EXPERIMENT
    mlflow.set_experiment(_EXPERIMENT_NAME)


_EXPERIMENT_NAME = DEFAULT_EXPERIMENT


def experiment_id() -> str:
    """The experiment runs go to: the one `mlflow run` chose, else the one :func:`setup` named."""
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    if os.environ.get("MLFLOW_RUN_ID"):
        return mlflow.get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id
    exp = mlflow.get_experiment_by_name(_EXPERIMENT_NAME)
    return exp.experiment_id if exp else mlflow.set_experiment(_EXPERIMENT_NAME).experiment_id


def check_reachable() -> None:
    """Fail in seconds, before any training, when the tracking server cannot be reached."""
    from mlflow.exceptions import MlflowException

    uri = mlflow.get_tracking_uri()
    # MLflow retries HTTP with backoff for minutes by default; one quick try says enough here.
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    try:
        mlflow.MlflowClient().search_experiments(max_results=1)
    except (MlflowException, OSError) as e:
        msg = str(e).splitlines()[0][:300]
        raise ConnectionError(f"MLflow tracking store {uri} is not reachable: {msg}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
    all_tags = {"git_commit": git_commit(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else name, nested=nested,
                          tags=all_tags) as active:
        try:
            yield active
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM: the run was stopped, it did not fail; its checkpoint stays.
            mlflow.end_run("KILLED")
            if resume_hint:
                rid = active.info.run_id
                print(f"stopped: run {rid} is KILLED with its checkpoint kept; continue it with "
                      f"`python -m pipeline.train --config ... --data ... --resume {rid}`",
                      file=sys.stderr, flush=True)
            raise


def log_input(data: Any, context: str = "training") -> None:
    """Log the data set as a run input with a digest of the whole source; mlflow's own numpy
    digest hashes only the first rows, so two different files could look the same."""
    ds = mlflow.data.from_numpy(
        data.images, targets=data.labels, source=str(Path(data.source).resolve()),
        name=Path(data.source).name, digest=data.digest[-32:])
    mlflow.log_input(ds, context=context)


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
