"""``python -m pipeline.tune``: Optuna searches the LR schedule and dropout, on one machine or many.

The study lives in an Optuna RDB storage (SQLite here, PostgreSQL across machines); every trial is
a child MLflow run of one parent per study. ``--n-trials N`` is the number of finished trials the
study holds in total: running the command again resumes it up to N, and several workers together
stop at N. Workers record heartbeats, so a killed worker's trial is retried by another.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import mlflow
import optuna
from optuna.trial import TrialState

from . import data as fer
from . import plots, stats, tracking
from . import study as lifecycle
from .cli import Number, parser, run_main
from .config import ABLATIONS, Config, served_val_metric, to_yaml
from .engine import StopRun
from .errors import UsageError
from .numbers import POSITIVE, SEED, WHOLE_1
from .space import Space, fingerprint, load_space
from .study import StudyOptions, find_run, storage_of, trial_id
from .train import RunResult, train

DEFAULT_STORAGE = "sqlite:///tune.db"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


# --------------------------------------------------------------------------- the study


def counted(st: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Finished trials that count towards N (:func:`pipeline.study.settled` ones)."""
    return [t for t in lifecycle.settled(st) if t.state in FINISHED]


def set_up_parent(opened: lifecycle.Opened, space: Space) -> None:
    parent = lifecycle.create_parent(
        opened.experiment, opened.name, f"tune {opened.name}", "tune",
        params={"profile": space.profile, "base": str(space.base_path.name)},
        files={"search_space.yaml": space.path.read_text()})
    opened.study.set_user_attr("profile", space.profile)
    opened.study.set_user_attr("parent_run_id", parent)  # joiners of older studies wait on it


def run_trial(st: optuna.Study, space: Space, data: fer.FerData, trial: optuna.Trial,
              seed: int) -> float:
    params = space.sample(trial)
    trial.set_user_attr("seed", seed)
    cfg = space.config(params, space.budget, seed)
    origin = storage_of(st).get_trial(trial_id(trial)).system_attrs.get("failed_trial")

    def report(epoch: int, m: dict[str, float]) -> None:
        trial.report(m["val_acc"], epoch)
        if trial.should_prune():
            raise StopRun("pruned")

    tags = {"study": st.study_name, "trial": str(trial.number), "role": "trial",
            "params": json.dumps(params, sort_keys=True)}
    if origin is not None:
        tags["retry_of"] = str(origin)
    # score_test=False: a trial never evaluates the test split, so nothing about it can leak
    # into the search; only the explicit retrain after the search scores it.
    out = train(cfg, data, run_name=f"trial {trial.number}",
                parent_run_id=st.user_attrs["parent_run_id"], tags=tags, log_model=False,
                on_epoch=report, score_test=False)
    trial.set_user_attr("run_id", out.run_id)
    if out.state == "pruned":
        raise optuna.TrialPruned()
    return float(out.metrics[served_val_metric(cfg.tta)])  # TTA val for a TTA config


def _ask(st: optuna.Study, n_trials: int) -> optuna.Trial | None:
    """A new trial for this worker, or None when workers that asked at once overfill the
    study: the latest-numbered running trials give way, so it ends with exactly n_trials."""
    trial = st.ask()
    # Beat at once: a RUNNING trial that never beat is never found stale (see study.claim).
    storage_of(st).record_heartbeat(trial_id(trial))
    running = sorted(t.number for t in st.get_trials(deepcopy=False,
                                                     states=(TrialState.RUNNING,)))
    if len(counted(st)) + running.index(trial.number) + 1 > n_trials:
        trial.set_user_attr("surplus", True)
        st.tell(trial, state=TrialState.FAIL)
        return None
    return trial


def work(st: optuna.Study, space: Space, data: fer.FerData, o: "TuneOptions",
         poll: float = 5.0) -> dict[str, int]:
    """Run trials until the study holds ``o.n_trials`` finished ones (over all workers) or this
    worker's ``o.timeout`` is up."""
    n_trials, timeout = o.n_trials, o.timeout
    t0 = time.time()
    mine = {"complete": 0, "pruned": 0, "failed": 0}
    bugs = lifecycle.BugCount(st.study_name)
    while True:
        lifecycle.fail_stale(st)
        done = len(counted(st))
        running = st.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        waiting = st.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if done >= n_trials:
            return mine
        if timeout is not None and time.time() - t0 > timeout:
            print(f"--timeout {timeout:.0f}s reached; the study holds {done} of {n_trials}")
            return mine
        if done + len(running) >= n_trials and not waiting:
            lifecycle.wait_for_others(len(running), "trial", poll)
            continue
        trial = _ask(st, n_trials)
        if trial is None:
            continue
        # The unit begins at once: a stop between the ask and it would leave the trial RUNNING
        # until its heartbeat went stale.
        with lifecycle.unit(st, trial_id(trial), o.study.heartbeat, f"trial {trial.number}",
                            tell=lambda state, v, t=trial: st.tell(t, v, state=state), bugs=bugs,
                            run_of=partial(lifecycle.run_id_of, st.study_name,
                                           st.user_attrs["parent_run_id"],
                                           trial=trial.number)) as out:
            print(f"[{len(counted(st)) + 1}/{n_trials}] trial {trial.number}", flush=True)
            out.value = run_trial(st, space, data, trial, o.seed)
        mine[out.state] += 1
        run = find_run(st.study_name, st.user_attrs["parent_run_id"], trial=trial.number)
        if run is not None:
            if out.reason:
                mlflow.MlflowClient().set_tag(run.info.run_id, "error", out.reason[:500])
            mlflow.MlflowClient().set_tag(run.info.run_id, "state", out.state)


# --------------------------------------------------------------------------- the summary


@dataclass
class SearchSummary:
    """The search's numbers, from its storage alone: trials by state and the best one, with
    the whole resolved config that won (budget and seed included)."""

    study: str
    n_finished: int
    n_complete: int
    n_pruned: int
    n_failed: int
    budget: str
    best_trial: int | None = None
    best_val_acc: float | None = None
    best_params: dict[str, Any] | None = None
    best_config: Config | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("study", "n_finished", "n_complete", "n_pruned",
                                             "n_failed")}
        if self.best_trial is not None:
            out.update(best_trial=self.best_trial, best_val_acc=self.best_val_acc,
                       best_params=self.best_params)
        return out


def summary_of(st: optuna.Study, space: Space) -> SearchSummary:
    trials = counted(st)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    out = SearchSummary(st.study_name, len(trials), len(complete),
                        sum(t.state == TrialState.PRUNED for t in trials),
                        sum(t.state == TrialState.FAIL for t in trials),
                        ", ".join(f"{k}={v}" for k, v in space.budget.items())
                        or "the base's own settings")
    if complete:
        best = st.best_trial
        out.best_trial, out.best_val_acc, out.best_params = best.number, best.value, \
            dict(best.params)
        out.best_config = space.config(out.best_params, space.budget,
                                       int(best.user_attrs.get("seed", 0)))
    return out


def best_config_text(s: SearchSummary, space: Space) -> str:
    # The whole resolved config of the winning trial, so `train --config best_config.yaml`
    # runs exactly the trial that won.
    head = [f"Best of Optuna study {s.study}: trial {s.best_trial}, val acc "
            f"{s.best_val_acc:.4f}, profile {space.profile}.",
            f"Found at this budget: {s.budget} (seed {s.best_config.seed}). A winner at a "
            f"reduced budget need not win at the full one.",
            "Use with: python -m pipeline.train --config best_config.yaml --data ..."]
    return "".join(f"# {line}\n" for line in head) + to_yaml(s.best_config)


def summary_note(s: SearchSummary, space: Space) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in s.best_params.items())
    return (f"# Search `{s.study}`\n\n{s.n_finished} finished trials ({s.n_complete} "
            f"complete, {s.n_pruned} pruned, {s.n_failed} failed), profile {space.profile}, "
            f"budget {s.budget}.\n\nBest: trial {s.best_trial}, val acc {s.best_val_acc:.4f} "
            f"(selected on val; no trial saw the test split).\n\n| parameter | value |\n"
            f"|---|---|\n{rows}\n\nArtifacts: `best_config.yaml`, "
            f"`optimization_history.png`, `param_importances.png`, `trials.csv`.\n")


def search_figures(st: optuna.Study) -> dict[str, Any]:
    figs = {}
    # Imported here: it imports pyplot, which settles matplotlib's backend for the process.
    from optuna.visualization import matplotlib as ovm

    for name, fn in (("optimization_history.png", ovm.plot_optimization_history),
                     ("param_importances.png", ovm.plot_param_importances)):
        try:
            ax = fn(st)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            # Importances need two complete trials with differing params; say so, not crash.
            print(f"note: {name} not drawn ({e})")
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        figs[name] = fig
    return figs


def summarize(st: optuna.Study, space: Space, out_dir: Path) -> SearchSummary:
    """Compute the summary, render it, and publish it on the parent run: the best config as a
    YAML, the history and importance plots, the trials table and a note."""
    out_dir.mkdir(parents=True, exist_ok=True)
    parent = st.user_attrs["parent_run_id"]
    client = mlflow.MlflowClient()
    s = summary_of(st, space)
    st.trials_dataframe().to_csv(out_dir / "trials.csv", index=False)
    client.log_artifact(parent, str(out_dir / "trials.csv"))
    if s.best_trial is None:
        return s
    (out_dir / "best_config.yaml").write_text(best_config_text(s, space))
    client.log_artifact(parent, str(out_dir / "best_config.yaml"))
    client.log_metric(parent, "best_val_acc", s.best_val_acc)
    client.set_tag(parent, "best_trial", str(s.best_trial))
    for name, fig in search_figures(st).items():
        fig.savefig(out_dir / name, dpi=110)
        plots.close(fig)
        client.log_artifact(parent, str(out_dir / name))
    client.set_tag(parent, "mlflow.note.content", summary_note(s, space))
    return s


def retrain_best(st: optuna.Study, space: Space, data: fer.FerData, seeds: list[int],
                 best_params: dict[str, Any]) -> dict[str, Any]:
    """Train the best config and the hand-tuned base on fresh seeds at the retrain budget, with
    test metrics, and their difference paired by seed. Finished retrains are reused, so an
    interrupted retrain resumes where it stopped."""
    parent = st.user_attrs["parent_run_id"]
    runs: dict[str, dict[int, dict[str, Any]]] = {"best": {}, "base": {}}
    for label, params in (("best", best_params), ("base", {})):
        for sd in seeds:
            done, earlier = lifecycle.unit_runs(st.study_name, parent, role=f"retrain-{label}",
                                                seed=sd)
            r = RunResult.of_run(done) if done is not None else train(
                space.config(params, space.retrain, sd), data, run_name=f"retrain {label} s{sd}",
                parent_run_id=parent, tags={"study": st.study_name, "role": f"retrain-{label}"},
                resume_run_id=earlier.info.run_id if earlier else None)
            # In the storage, as the ablation's units are: what --register may choose from.
            st.set_user_attr(f"retrain-{label}-s{sd}", r.run_id)
            runs[label][sd] = {"run_id": r.run_id, **{k: r.metrics.get(k) for k in (
                "val_acc", "val_acc_tta", "test_acc", "test_acc_tta")}}
    # On test only: val chose each retrain's epoch, so a val difference is one of two maxima.
    diff = {}
    for key in ("test_acc", "test_acc_tta"):
        e = stats.paired_effect({sd: float(v[key]) for sd, v in runs["best"].items()},
                                {sd: float(v[key]) for sd, v in runs["base"].items()})
        diff[key] = dataclasses.asdict(e)
        lifecycle.log_interval(parent, f"tuned_minus_base/{key}_points", e.mean, e.lo, e.hi)
    return {"seeds": seeds, "runs": runs, "tuned_minus_base": diff}


@dataclass(frozen=True)
class TuneOptions:
    """One search command: the shared study options, the search file and its budget."""

    study: StudyOptions
    space_file: str = str(ABLATIONS / "tune.yaml")
    profile: str = "quick"
    n_trials: int = 20
    timeout: float | None = None
    seed: int = 0
    out_dir: str = "tune_report"
    retrain: bool = False
    retrain_seeds: int = 3


def _check(o: TuneOptions) -> None:
    if o.n_trials < 1:
        raise UsageError(f"--n-trials must be at least 1, got {o.n_trials}.")
    if o.study.register and not o.retrain:
        raise UsageError("--register needs --retrain-best: the registered model is the best "
                         "retrain of the winning config.")
    if o.retrain and o.retrain_seeds < 1:
        raise UsageError(f"--retrain-seeds must be at least 1, got {o.retrain_seeds}.")
    if o.timeout is not None and not (math.isfinite(o.timeout) and o.timeout > 0):
        raise UsageError(f"--timeout must be a positive number of seconds, got {o.timeout}.")


def search_description(name: str, space: Space) -> str:
    return (f"Optuna search `{name}` ({space.profile} profile) over {space.path.name}. The "
            f"parent run `tune {name}` holds the best config, the history and importance plots "
            f"and the trials table; each child run is one trial, tagged `state` complete, "
            f"pruned or failed, and holds no test metric.")


def run_tune(o: TuneOptions, exp: tracking.Experiment | None = None) -> dict[str, Any]:
    _check(o)
    space = load_space(o.space_file, o.profile)  # every check before anything is created
    data = fer.load_training(o.study.data)
    exp = exp or tracking.setup(None)
    name = o.study.study_name or lifecycle.study_name("tune", o.space_file, o.profile,
                                                      data.digest, fingerprint(space))
    opened = lifecycle.open_or_join(
        o.study, exp, name, search_description(name, space),
        lambda op: set_up_parent(op, space),
        # Joiners of searches begun before `ready` was set wait on the parent run alone.
        ready="parent_run_id", sampler=space.sampler(), pruner=space.pruner())
    st = opened.study
    print(f"study {name}: {len(counted(st))} of {o.n_trials} trials finished", flush=True)
    mine = work(st, space, data, o)
    s = summarize(st, space, Path(o.out_dir))
    summary = {**s.as_dict(), "this_worker": mine}
    if o.retrain and s.best_params is not None:
        # Fresh seeds: none of them is the one the search selected on.
        fresh = [o.seed + 1 + i for i in range(o.retrain_seeds)]
        summary["retrain"] = retrain_best(st, space, data, fresh, s.best_params)
        if o.study.register:
            mine = {st.user_attrs.get(f"retrain-best-s{sd}") for sd in fresh}
            best = [r for r in lifecycle.study_runs(st.study_name, st.user_attrs["parent_run_id"],
                                                    "tags.role = 'retrain-best'")
                    if r.info.run_id in mine]
            summary["registered"] = lifecycle.register(best, o.study.register, o.study.alias)
    if not st.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        lifecycle.finish_parent(opened.parent, opened.entry_run)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = parser("Tune the LR schedule and dropout with Optuna (resumable; shareable by workers).")
    lifecycle.add_study_args(p, DEFAULT_STORAGE)
    p.add_argument("--space", default=str(ABLATIONS / "tune.yaml"))
    p.add_argument("--n-trials", type=Number(WHOLE_1), default=20,
                   help="finished trials the study should hold in total, over all workers")
    p.add_argument("--timeout", type=Number(POSITIVE), default=None,
                   help="seconds this worker may search (default: no limit)")
    p.add_argument("--retrain-best", action=argparse.BooleanOptionalAction, default=False,
                   help="train the best config and the base at the profile's retrain budget on "
                        "--retrain-seeds fresh seeds, and compare them paired by seed (needed "
                        "by --register)")
    p.add_argument("--retrain-seeds", type=Number(WHOLE_1), default=3,
                   help="fresh seeds for --retrain-best (seed+1, seed+2, ...)")
    p.add_argument("--seed", type=Number(SEED), default=0, help="training seed of every trial")
    p.add_argument("--out-dir", default="tune_report")
    a = p.parse_args(argv)
    profile, exp = lifecycle.start(a, lambda prof: load_space(a.space, prof))
    with lifecycle.resumable("pipeline.tune", argv):
        s = run_tune(TuneOptions(lifecycle.options(a), a.space, profile, a.n_trials, a.timeout,
                                 a.seed, a.out_dir, a.retrain_best, a.retrain_seeds), exp)
    print(json.dumps(s, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)))
    return 0


if __name__ == "__main__":
    run_main(main)
