"""The study's parent MLflow run and its life: opening or joining the study, the creator's set-up,
joiners filing their entry run under the parent, finishing it, and finding a unit's run."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import mlflow
import optuna
from mlflow.exceptions import MlflowException

from .. import redact, tracking
from ..errors import UsageError
from ..stores import owner_alive, owner_tag
from .command import StudyOptions
from .queue import open_storage, storage_of

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
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                    **study_kwargs)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, **study_kwargs)
        created = False
    return Opened(study, created, exp, opts.entry_run, opts.storage)


def open_or_join(opts: StudyOptions, exp: tracking.Experiment, name: str, description: str,
                 set_up: Callable[[Opened], None], ready: str = "ready",
                 **study_kwargs: Any) -> Opened:
    """The study, created and set up by ``set_up`` (its parent run, its queue) if this worker is
    the first, else joined once its creator is done (:meth:`Opened.ready`)."""
    opened = open_study(opts, exp, name, description, **study_kwargs)
    if opened.created:
        with opened.setting_up():
            set_up(opened)
    opened.ready(ready)
    return opened


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
                 else f"delete study {study.study_name!r} from {redact.url(url)}")
        raise UsageError(
            f"study {study.study_name!r} was begun against another MLflow tracking store: its "
            f"parent run {parent} is not in {redact.url(mlflow.get_tracking_uri())}. To start over here, "
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


@functools.lru_cache(maxsize=64)
def _experiment_of(tracking_uri: str, parent: str) -> str:
    """A run's experiment, which never changes: asked of the store once per parent, not at
    every search of a unit's runs."""
    return mlflow.MlflowClient(tracking_uri).get_run(parent).info.experiment_id


def study_experiments(parent: str) -> list[str]:
    """Where a study's runs are: its parent's experiment, and the one this worker's units go to
    (the same, but for a rerun under `mlflow run` given another experiment). A run elsewhere is
    never the study's, whatever its tags say: anyone who may create an experiment on a shared
    server can tag a run there with a study's name."""
    ids = [_experiment_of(mlflow.get_tracking_uri(), parent)]
    here = os.environ.get("MLFLOW_EXPERIMENT_ID")
    return ids + ([here] if here and here not in ids else [])


def study_runs(study_name: str, parent: str, filt: str = "", max_results: int = 50_000):
    """The runs under the study's parent, in the study's experiments, newest first."""
    where = " and ".join([f"tags.study = '{study_name}'",
                          f"tags.mlflow.parentRunId = '{parent}'", *([filt] if filt else [])])
    return mlflow.search_runs(experiment_ids=study_experiments(parent), filter_string=where,
                              output_format="list", max_results=max_results)


def find_run(study_name: str, parent: str, status: str | None = None, **tags: Any):
    """The latest run of the study with these tags (and this status), or None."""
    filt = " and ".join([*(f"tags.{k} = '{v}'" for k, v in tags.items()),
                         *([f"attributes.status = '{status}'"] if status else [])])
    runs = study_runs(study_name, parent, filt, max_results=5)
    return runs[0] if runs else None


def own_runs(study: optuna.Study) -> list:
    """The study's finished units as its storage records them: each COMPLETE trial's run,
    found under the study's parent in its experiments, its cell and seed tags agreeing with the
    trial's. What the report and the registry read: a run the storage does not name is not the
    study's, whoever tagged it so."""
    recorded = {t.user_attrs["run_id"]: t.user_attrs for t in study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if "run_id" in t.user_attrs}
    runs = study_runs(study.study_name, study.user_attrs["parent_run_id"],
                      "attributes.status = 'FINISHED'")
    return [r for r in runs if r.info.run_id in recorded and all(
        r.data.tags.get(k) == str(recorded[r.info.run_id][k]) for k in ("cell", "seed")
        if k in recorded[r.info.run_id])]


def unit_runs(study_name: str, parent: str, **tags: Any):
    """A unit's runs so far: its finished run, if any (a worker that died after MLflow finished
    it, before the queue heard: it is reused, not trained again), and its latest run (a stopped
    one resumes from its checkpoint)."""
    done = find_run(study_name, parent, "FINISHED", **tags)
    return done, (None if done is not None else find_run(study_name, parent, **tags))


def run_id_of(study_name: str, parent: str, **tags: Any) -> str | None:
    """The id of a unit's latest run, where it began one (for its traceback)."""
    run = find_run(study_name, parent, **tags)
    return run.info.run_id if run is not None else None


def log_interval(parent: str, key: str, mean: float, lo: float, hi: float) -> None:
    """An effect and its interval on the parent run, in accuracy points rounded to 0.01 (the
    runs' own accuracies resolve one image in a few thousand, no finer)."""
    client = mlflow.MlflowClient()
    for suffix, v in (("", mean), ("_lo", lo), ("_hi", hi)):
        if math.isfinite(v):
            client.log_metric(parent, f"{key}{suffix}", round(100 * v, 2))


def register(runs: list, name: str, alias: str) -> dict[str, Any]:
    """Register the best of ``runs``: the study's own units, as :func:`own_runs` and the
    search's retrain found them, never a search of the server by tags."""
    reg = tracking.register_best(runs, name, alias)
    if reg is None:
        raise UsageError(f"nothing to register as {name!r}: no finished run logged a model "
                         f"(for a study, pass --log-models all or reference).")
    return reg
