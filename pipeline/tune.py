"""``python -m pipeline.tune``: Optuna searches the LR schedule and dropout, on one machine or many.

The study lives in an Optuna RDB storage (SQLite here, PostgreSQL across machines); every trial is
a child MLflow run of one parent per study. ``--n-trials N`` is the number of finished trials the
study holds in total: running the command again resumes it up to N, and several workers together
stop at N. Workers record heartbeats, so a killed worker's trial is retried by another.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna
import torch
from optuna.trial import TrialState

from . import data as fer
from . import stats, tracking
from .cli import parser, run_main
from .config import (SCHEDULERS, Config, build, coerce, config_path, load_yaml,
                     served_val_metric, to_yaml)
from .errors import ConfigError, UsageError
from .engine import StopRun
from .train import train
from .workers import (attach_entry_run, check_parent_here, create_or_join, find_run,
                      finish_parent, open_storage, run_unit, storage_of, trial_id)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STORAGE = "sqlite:///tune.db"
PROFILES = ("smoke", "quick", "full")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


# --------------------------------------------------------------------------- the search file


SPACE_KEYS = ("base", "profiles", "sampler", "pruner", "space")


def load_space(path: str | Path, profile: str) -> "Space":
    """Read and check the search file, as :func:`pipeline.ablate.load_study` reads a study:
    through the same YAML reader, every config value checked, before any trial."""
    p = Path(path)
    d = load_yaml(p, "search-space", UsageError, SPACE_KEYS)
    profiles = d.get("profiles") or {}
    if profile not in profiles:
        raise UsageError(f"{p}: unknown profile {profile!r}; this file has "
                         f"{', '.join(profiles) or 'none'}.")
    budget = dict((profiles[profile] or {}).get("set") or {})
    sp = Space(path=p, base_path=config_path(str(d.get("base", "improved"))), profile=profile,
               budget=budget, retrain=dict((profiles[profile] or {}).get("retrain") or budget),
               sampler_spec=d.get("sampler") or {"name": "tpe", "seed": 0},
               pruner_spec=d.get("pruner") or {"name": "median"}, space=d.get("space") or {})
    if not sp.space:
        raise UsageError(f"{p}: the space is empty; give at least one parameter.")
    try:
        for k, v in {**sp.budget, **sp.retrain}.items():
            coerce(k, v, f"{p} profile {profile}")
        sp.check(sp.space, str(p))
        build(sp.base_path, sp.budget)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    sp.sampler()
    sp.pruner()
    return sp


@dataclass(frozen=True)
class Space:
    """The search file, checked: a base config, a nested space, a sampler, a pruner, budgets."""

    path: Path
    base_path: Path
    profile: str
    budget: dict[str, Any]
    retrain: dict[str, Any]  # the budget of --retrain-best (default: the search's)
    sampler_spec: dict[str, Any]
    pruner_spec: dict[str, Any]
    space: dict[str, Any]

    def check(self, space: dict, where: str) -> None:
        for key, spec in space.items():
            at = f"{where}: {key}"
            if not isinstance(spec, dict) or "type" not in spec:
                raise UsageError(f"{at}: expected {{type: float|int|categorical, ...}}.")
            if key not in Config().to_dict():
                coerce(key, None, at)  # raises: unknown key, with the valid ones listed
            if spec["type"] in ("float", "int"):
                lo, hi = spec.get("low"), spec.get("high")
                if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float))):
                    raise UsageError(f"{at}: needs numeric low and high.")
                if lo >= hi:
                    raise UsageError(f"{at}: empty or inverted range [{lo}, {hi}]; low must be "
                                     f"below high.")
                if spec.get("log") and lo <= 0:
                    raise UsageError(f"{at}: a log range needs low > 0, got {lo}.")
                coerce(key, int(lo) if spec["type"] == "int" else float(lo), at)
                coerce(key, int(hi) if spec["type"] == "int" else float(hi), at)
            elif spec["type"] == "categorical":
                choices = spec.get("choices")
                if not choices:
                    raise UsageError(f"{at}: categorical needs a non-empty list or mapping of "
                                     f"choices.")
                names = list(choices)
                if key == "scheduler":
                    bad = [c for c in names if c not in SCHEDULERS]
                    if bad:
                        raise UsageError(f"{at}: unknown scheduler(s) {bad}; choose from "
                                         f"{', '.join(SCHEDULERS)}.")
                for c in names:
                    coerce(key, c, at)
                if isinstance(choices, dict):
                    for c, sub in choices.items():
                        self.check(sub or {}, f"{at}={c}")
            else:
                raise UsageError(f"{at}: unknown type {spec['type']!r}; use float, int or "
                                 f"categorical.")

    def sample(self, trial: optuna.Trial, space: dict | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, spec in (self.space if space is None else space).items():
            if spec["type"] == "float":
                out[key] = trial.suggest_float(key, spec["low"], spec["high"],
                                               log=bool(spec.get("log")))
            elif spec["type"] == "int":
                out[key] = trial.suggest_int(key, spec["low"], spec["high"],
                                             log=bool(spec.get("log")))
            else:
                choice = trial.suggest_categorical(key, list(spec["choices"]))
                out[key] = choice
                if isinstance(spec["choices"], dict):
                    out.update(self.sample(trial, spec["choices"][choice] or {}))
        return out

    def config(self, params: dict[str, Any], budget: dict[str, Any], seed: int) -> Config:
        return build(self.base_path, {**budget, **params, "seed": seed})

    def sampler(self) -> optuna.samplers.BaseSampler:
        spec = dict(self.sampler_spec)
        name = spec.pop("name", "tpe")
        kinds = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
        if name not in kinds:
            raise UsageError(f"{self.path}: unknown sampler {name!r}; choose {', '.join(kinds)}.")
        return kinds[name](**spec)

    def pruner(self) -> optuna.pruners.BasePruner:
        spec = dict(self.pruner_spec)
        name = spec.pop("name", "median")
        kinds = {"median": optuna.pruners.MedianPruner,
                 "hyperband": optuna.pruners.HyperbandPruner,
                 "threshold": optuna.pruners.ThresholdPruner, "none": optuna.pruners.NopPruner}
        if name not in kinds:
            raise UsageError(f"{self.path}: unknown pruner {name!r}; choose {', '.join(kinds)}.")
        return kinds[name](**spec)


# --------------------------------------------------------------------------- the study


def counted(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Finished trials that count towards N: not the stale ones handed back for a retry, and not
    the surplus ones a worker gave up because others had already filled the study."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    return [t for t in trials if t.state in FINISHED and t.number not in retried
            and not t.user_attrs.get("surplus")]


def open_tune_study(storage, name: str, space: Space, wait_s: float = 120) -> optuna.Study:
    study, _ = create_or_join(storage, name, lambda st: _set_up_parent(st, name, space),
                              "parent_run_id", wait_s, sampler=space.sampler(),
                              pruner=space.pruner())
    return study


def _set_up_parent(study: optuna.Study, name: str, space: Space) -> None:
    client = mlflow.MlflowClient()
    parent = client.create_run(
        tracking.experiment_id(), run_name=f"tune {name}",
        tags={"study": name, "role": "tune", "git_commit": tracking.git_commit()}).info.run_id
    client.log_param(parent, "profile", space.profile)
    client.log_param(parent, "base", str(space.base_path.name))
    client.log_text(parent, space.path.read_text(), "search_space.yaml")
    study.set_user_attr("profile", space.profile)
    study.set_user_attr("parent_run_id", parent)  # last: joiners wait for it


def run_trial(study: optuna.Study, space: Space, data: fer.FerData, trial: optuna.Trial,
              seed: int) -> float:
    params = space.sample(trial)
    trial.set_user_attr("seed", seed)
    cfg = space.config(params, space.budget, seed)
    parent = study.user_attrs["parent_run_id"]
    origin = storage_of(study).get_trial(trial_id(trial)).system_attrs.get("failed_trial")

    def report(epoch: int, m: dict[str, float]) -> None:
        trial.report(m["val_acc"], epoch)
        if trial.should_prune():
            raise StopRun("pruned")

    tags = {"study": study.study_name, "trial": str(trial.number), "role": "trial",
            "params": json.dumps(params, sort_keys=True)}
    if origin is not None:
        tags["retry_of"] = str(origin)
    # score_test=False: a trial never evaluates the test split, so nothing about it can leak
    # into the search; only the explicit retrain after the search scores it.
    out = train(cfg, data, run_name=f"trial {trial.number}", parent_run_id=parent, tags=tags,
                log_model=False, on_epoch=report, score_test=False)
    trial.set_user_attr("run_id", out["run_id"])
    if out["state"] == "pruned":
        raise optuna.TrialPruned()
    return float(out[served_val_metric(cfg.tta)])  # TTA val for a TTA config


def work(study: optuna.Study, space: Space, data: fer.FerData, n_trials: int, heartbeat: int,
         timeout: float | None, seed: int, poll: float = 5.0) -> dict[str, int]:
    storage = storage_of(study)
    t0 = time.time()
    mine = {"complete": 0, "pruned": 0, "failed": 0}
    while True:
        optuna.storages.fail_stale_trials(study)
        done = len(counted(study))
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if done >= n_trials:
            return mine
        if timeout is not None and time.time() - t0 > timeout:
            print(f"--timeout {timeout:.0f}s reached; the study holds {done} of {n_trials}")
            return mine
        if done + len(running) >= n_trials and not waiting:
            print(f"waiting for {len(running)} running trial(s) on other workers", flush=True)
            time.sleep(poll)
            continue
        trial = study.ask()
        # Beat at once: a RUNNING trial that never beat is never found stale (see ablate.claim).
        storage.record_heartbeat(trial_id(trial))
        # Workers that asked at once may overfill the study: the latest-numbered running trials
        # give way, so the study ends with exactly n_trials.
        running = sorted(t.number for t in study.get_trials(deepcopy=False,
                                                           states=(TrialState.RUNNING,)))
        if len(counted(study)) + running.index(trial.number) + 1 > n_trials:
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            continue
        print(f"[{len(counted(study)) + 1}/{n_trials}] trial {trial.number}", flush=True)
        state, reason = run_unit(
            study, trial_id(trial), heartbeat,
            lambda: run_trial(study, space, data, trial, seed), f"trial {trial.number}",
            tell=lambda st, values, trial=trial: study.tell(trial, values, state=st))
        mine[state] += 1
        run = find_run(study.study_name, trial=trial.number)
        if run is not None:
            if reason:
                mlflow.MlflowClient().set_tag(run.info.run_id, "error", reason[:500])
            mlflow.MlflowClient().set_tag(run.info.run_id, "state", state)


# --------------------------------------------------------------------------- the summary


def summarize(study: optuna.Study, space: Space, out_dir: Path) -> dict[str, Any]:
    """On the parent run: best params as a config YAML, history and importance plots, a table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out_dir.mkdir(parents=True, exist_ok=True)
    parent = study.user_attrs["parent_run_id"]
    client = mlflow.MlflowClient()
    trials = counted(study)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    table = study.trials_dataframe()
    table.to_csv(out_dir / "trials.csv", index=False)
    client.log_artifact(parent, str(out_dir / "trials.csv"))
    summary: dict[str, Any] = {"study": study.study_name, "n_finished": len(trials),
                               "n_complete": len(complete),
                               "n_pruned": sum(t.state == TrialState.PRUNED for t in trials),
                               "n_failed": sum(t.state == TrialState.FAIL for t in trials)}
    if not complete:
        return summary
    best = study.best_trial
    params = {k: v for k, v in best.params.items()}
    seed = int(best.user_attrs.get("seed", 0))
    # The whole resolved config of the winning trial, budget and seed included, so
    # `train --config best_config.yaml` runs exactly the trial that won.
    best_cfg = space.config(params, space.budget, seed)
    budget = ", ".join(f"{k}={v}" for k, v in space.budget.items()) or "the base's own settings"
    header = (f"# Best of Optuna study {study.study_name}: trial {best.number}, val acc "
              f"{best.value:.4f}, profile {space.profile}.\n"
              f"# Found at this budget: {budget} (seed {seed}). A winner at a reduced budget "
              f"need not win at the full one.\n"
              f"# Use with: python -m pipeline.train --config best_config.yaml --data ...\n")
    (out_dir / "best_config.yaml").write_text(header + to_yaml(best_cfg))
    client.log_artifact(parent, str(out_dir / "best_config.yaml"))
    client.log_metric(parent, "best_val_acc", best.value)
    client.set_tag(parent, "best_trial", str(best.number))
    for name, fn in (("optimization_history.png", ovm.plot_optimization_history),
                     ("param_importances.png", ovm.plot_param_importances)):
        try:
            ax = fn(study)
            fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            fig.savefig(out_dir / name, dpi=110)
            plt.close(fig)
            client.log_artifact(parent, str(out_dir / name))
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            # Importances need two complete trials with differing params; say so, not crash.
            print(f"note: {name} not drawn ({e})")
    summary.update({"best_trial": best.number, "best_val_acc": best.value, "best_params": params})
    rows = "\n".join(f"| {k} | {v} |" for k, v in params.items())
    client.set_tag(parent, "mlflow.note.content", (
        f"# Search `{study.study_name}`\n\n{len(trials)} finished trials ({len(complete)} "
        f"complete, {summary['n_pruned']} pruned, {summary['n_failed']} failed), profile "
        f"{space.profile}, budget {budget}.\n\nBest: trial {best.number}, val acc "
        f"{best.value:.4f} (selected on val; no trial saw the test split).\n\n"
        f"| parameter | value |\n|---|---|\n{rows}\n\nArtifacts: `best_config.yaml`, "
        f"`optimization_history.png`, `param_importances.png`, `trials.csv`.\n"))
    return summary


def retrain_best(study: optuna.Study, space: Space, data: fer.FerData, seeds: list[int],
                 summary: dict[str, Any]) -> dict[str, Any]:
    """Train the best config and the hand-tuned base on fresh seeds at the retrain budget, with
    test metrics, and their difference paired by seed. Finished retrains are reused, so an
    interrupted retrain resumes where it stopped."""
    parent = study.user_attrs["parent_run_id"]
    runs: dict[str, dict[int, dict[str, Any]]] = {"best": {}, "base": {}}
    for label, params in (("best", summary["best_params"]), ("base", {})):
        for sd in seeds:
            done = find_run(study.study_name, "FINISHED", role=f"retrain-{label}", seed=sd)
            if done is not None:
                r = {"run_id": done.info.run_id, **done.data.metrics}
            else:
                cfg = space.config(params, space.retrain, sd)
                r = train(cfg, data, run_name=f"retrain {label} s{sd}", parent_run_id=parent,
                          tags={"study": study.study_name, "role": f"retrain-{label}"})
            runs[label][sd] = {k: r.get(k) for k in ("run_id", "val_acc", "val_acc_tta",
                                                     "test_acc", "test_acc_tta")}
    # On test only: val chose each retrain's epoch, so a val difference is one of two maxima.
    diff = {}
    for key in ("test_acc", "test_acc_tta"):
        e = stats.paired_effect({sd: float(v[key]) for sd, v in runs["best"].items()},
                                {sd: float(v[key]) for sd, v in runs["base"].items()})
        diff[key] = e
        for stat in ("mean", "lo", "hi"):
            if math.isfinite(e[stat]):
                suffix = "" if stat == "mean" else f"_{stat}"
                mlflow.MlflowClient().log_metric(parent, f"tuned_minus_base/{key}_points{suffix}",
                                                 100 * e[stat])
    return {"seeds": seeds, "runs": runs, "tuned_minus_base": diff}


def run_tune(data_path: str, space_path: str, n_trials: int, storage_url: str,
             study_name: str | None, profile: str, timeout: float | None = None,
             retrain: bool = False, heartbeat: int = 20, seed: int = 0,
             out_dir: str = "tune_report", retrain_seeds: int = 3,
             register: str | None = None, alias: str = "best") -> dict[str, Any]:
    if n_trials < 1:
        raise UsageError(f"--n-trials must be at least 1, got {n_trials}.")
    if register and not retrain:
        raise UsageError("--register needs --retrain-best: the registered model is the best "
                         "retrain of the winning config.")
    if retrain and retrain_seeds < 1:
        raise UsageError(f"--retrain-seeds must be at least 1, got {retrain_seeds}.")
    space = load_space(space_path, profile)  # every check before anything is created
    tracking.check_reachable()
    data = fer.load(data_path)
    fer.check_usage(data)
    storage = open_storage(storage_url, heartbeat)
    entry_run = os.environ.pop("MLFLOW_RUN_ID", None)  # trials are new runs, not the entry's
    spec = hashlib.sha1(Path(space_path).read_bytes()).hexdigest()[:6]
    name = study_name or f"tune-{Path(space_path).stem}-{profile}-{data.digest[-6:]}-{spec}"
    tracking.use_study_experiment(name, (
        f"Optuna search `{name}` ({space.profile} profile) over {space.path.name}. The parent "
        f"run `tune {name}` holds the best config, the history and importance plots and the "
        f"trials table; each child run is one trial, tagged `state` complete, pruned or "
        f"failed, and holds no test metric."))
    study = open_tune_study(storage, name, space)
    check_parent_here(study, storage_url)
    attach_entry_run(entry_run, study.user_attrs["parent_run_id"], name)
    print(f"study {name}: {len(counted(study))} of {n_trials} trials finished", flush=True)
    mine = work(study, space, data, n_trials, heartbeat, timeout, seed)
    summary = {**summarize(study, space, Path(out_dir)), "this_worker": mine}
    if retrain and summary.get("best_params") is not None:
        # Fresh seeds: none of them is the one the search selected on.
        fresh = [seed + 1 + i for i in range(retrain_seeds)]
        summary["retrain"] = retrain_best(study, space, data, fresh, summary)
        if register:
            summary["registered"] = tracking.register_best(
                f"tags.study = '{name}' and tags.role = 'retrain-best'", register, alias)
    if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        finish_parent(study.user_attrs["parent_run_id"], entry_run)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = parser("Tune the LR schedule and dropout with Optuna (resumable; shareable by workers).")
    p.add_argument("--data", required=True)
    p.add_argument("--space", default=str(ROOT / "ablations" / "tune.yaml"))
    p.add_argument("--n-trials", type=lambda v: int(float(v)), default=20,
                   help="finished trials the study should hold in total, over all workers")
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help="Optuna storage; postgresql://user@host/db to share it between machines")
    p.add_argument("--study-name", default=None)
    p.add_argument("--profile", default="quick", choices=PROFILES)
    p.add_argument("--timeout", type=float, default=None, help="seconds this worker may search")
    p.add_argument("--retrain-best", action=argparse.BooleanOptionalAction, default=False,
                   help="train the best config and the base at the profile's retrain budget on "
                        "--retrain-seeds fresh seeds, and compare them paired by seed")
    p.add_argument("--retrain-seeds", type=lambda v: int(float(v)), default=3,
                   help="fresh seeds for --retrain-best (seed+1, seed+2, ...)")
    p.add_argument("--heartbeat", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="training seed of every trial")
    p.add_argument("--out-dir", default="tune_report")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: all cores); split the cores when several workers "
                        "share this machine")
    p.add_argument("--register", default=None, metavar="NAME",
                   help="with --retrain-best: register the best retrain of the winning config "
                        "(by val accuracy) in the Model Registry as NAME, with the alias --alias")
    p.add_argument("--alias", default="best", help="alias of the registered version")
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    tracking.setup(a.experiment)
    s = run_tune(a.data, a.space, a.n_trials, a.storage, a.study_name or None, a.profile, a.timeout,
                 a.retrain_best, a.heartbeat, a.seed, a.out_dir, a.retrain_seeds,
                 a.register or None, a.alias)
    print(json.dumps(s, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)))
    return 0


if __name__ == "__main__":
    run_main(main)
