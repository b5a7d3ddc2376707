"""The Optuna search: nested runs, best config, plots, resume to N, pruning, failures, workers."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from pipeline.cli import UsageError
from pipeline.config import build, flatten
from pipeline.tune import counted, load_space
from tests.conftest import PG, ROOT, TINY, freeze_mid_trial, run_cli, start_cli, tune_study

TWO_EPOCHS = {**TINY, "epochs": 2}  # pruning needs an epoch to compare against


def space_file(tmp_path: Path, **changes) -> Path:
    d = yaml.safe_load((ROOT / "ablations/tune.yaml").read_text())
    d["base"] = "basic"  # the smallest net: trials take seconds
    d["profiles"] = {"smoke": {"set": TWO_EPOCHS, "retrain": TWO_EPOCHS}}
    d.update(changes)
    p = tmp_path / f"space_{uuid.uuid4().hex[:6]}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def trial_runs(study: str):
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.study = '{study}' and tags.role = 'trial'")


@pytest.mark.slow
def test_smoke_study_nested_runs_best_config_and_plots(kaggle_csv, tmp_path, monkeypatch):
    from pipeline import tracking

    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")  # a plain shell: the search gets its experiment
    exp = tracking.setup(None)
    s = tune_study(kaggle_csv, space_file(tmp_path), 4, out_dir="rep", exp=exp)
    assert s["n_finished"] == 4 and s["n_complete"] >= 1
    runs = trial_runs(s["study"])
    assert len(runs) == 4
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parents) == 1
    assert {r.data.tags["state"] for r in runs} <= {"complete", "pruned"}
    parent = parents.pop()
    exp = mlflow.get_experiment_by_name(s["study"])
    assert "Optuna search" in exp.tags["mlflow.note.content"]
    assert {r.info.experiment_id for r in runs} == {exp.experiment_id}
    note = mlflow.get_run(parent).data.tags["mlflow.note.content"]
    assert f"Best: trial {s['best_trial']}, val acc {s['best_val_acc']:.4f}" in note
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent)}
    assert {"best_config.yaml", "optimization_history.png", "param_importances.png",
            "trials.csv"} <= arts
    cfg = build(Path("rep/best_config.yaml"))  # train --config accepts it
    assert cfg.scheduler == s["best_params"]["scheduler"] and cfg.stage == "basic"
    # ... and it is the winning trial's whole config, its budget and seed included.
    best_run = next(r for r in runs if r.data.tags["trial"] == str(s["best_trial"]))
    assert flatten(cfg) == {k: v for k, v in best_run.data.params.items() if k in flatten(cfg)}
    assert cfg.epochs == TWO_EPOCHS["epochs"] and cfg.width == TWO_EPOCHS["width"]
    header = Path("rep/best_config.yaml").read_text().splitlines()[1]
    assert header.startswith("# Found at this budget:") and "epochs=2" in header
    for r in runs:  # a trial never evaluates the test split: no metric, no prediction
        assert not any(k.startswith("test") for k in r.data.metrics), r.data.metrics
        if r.data.tags["state"] != "complete":
            continue  # a pruned trial stops before its final evaluation
        preds = mlflow.artifacts.download_artifacts(run_id=r.info.run_id,
                                                    artifact_path="predictions.npz")
        with np.load(preds) as z:
            assert set(z.files) == {"val", "val_tta", "val_labels"}


@pytest.mark.slow
def test_retrain_compares_on_fresh_seeds_paired(kaggle_csv, tmp_path):
    sp = space_file(tmp_path)
    s = tune_study(kaggle_csv, sp, 2, study_name="rt", retrain=True, retrain_seeds=2, seed=0)
    r = s["retrain"]
    assert r["seeds"] == [1, 2]  # never the search's own seed 0
    for label in ("best", "base"):
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.study = 'rt' and tags.role = "
                                                f"'retrain-{label}'")
        assert sorted(x.data.tags["seed"] for x in runs) == ["1", "2"]
        assert all("test_acc" in x.data.metrics for x in runs)
    # Tuned minus base on test only: val chose each retrain's epoch.
    assert set(r["tuned_minus_base"]) == {"test_acc", "test_acc_tta"}
    parent = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                filter_string="tags.study = 'rt' and tags.role = 'tune'")
    assert parent and not any(k.startswith("tuned_minus_base/val")
                              for k in parent[0].data.metrics)
    d = r["tuned_minus_base"]["test_acc"]
    best, base = r["runs"]["best"], r["runs"]["base"]
    assert d["n"] == 2
    assert d["mean"] == pytest.approx(np.mean([best[k]["test_acc"] - base[k]["test_acc"]
                                               for k in (1, 2)]))
    # Run again: the finished retrains are reused, not trained twice.
    again = tune_study(kaggle_csv, sp, 2, study_name="rt", retrain=True, retrain_seeds=2, seed=0)
    assert again["retrain"]["runs"]["best"][1]["run_id"] == best[1]["run_id"]
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string="tags.study = 'rt' and tags.role LIKE "
                                                "'retrain-%'")) == 4


@pytest.mark.slow
def test_resume_up_to_n(kaggle_csv, tmp_path):
    sp = space_file(tmp_path)
    first = tune_study(kaggle_csv, sp, 2, study_name="resume")
    assert first["n_finished"] == 2
    second = tune_study(kaggle_csv, sp, 3, study_name="resume")
    assert second["n_finished"] == 3
    assert sum(second["this_worker"].values()) == 1
    again = tune_study(kaggle_csv, sp, 3, study_name="resume")
    assert sum(again["this_worker"].values()) == 0 and len(trial_runs("resume")) == 3


def test_pruned_trial(kaggle_csv, tmp_path):
    # Every trial below 99% val accuracy after its first epoch is pruned.
    sp = space_file(tmp_path, pruner={"name": "threshold", "lower": 0.99, "n_warmup_steps": 0})
    s = tune_study(kaggle_csv, sp, 2, study_name="prune")
    assert s["n_pruned"] == 2 and s["n_complete"] == 0
    runs = trial_runs("prune")
    assert [r.data.tags["state"] for r in runs] == ["pruned", "pruned"]
    assert all(len(mlflow.MlflowClient().get_metric_history(r.info.run_id, "val/acc")) == 1
               for r in runs)


def test_failing_trial_does_not_stop_the_study(kaggle_csv, tmp_path):
    space = yaml.safe_load((ROOT / "ablations/tune.yaml").read_text())["space"]
    space["lr"] = {"type": "float", "low": 1e20, "high": 1e21, "log": True}
    space["scheduler"] = {"type": "categorical", "choices": {"plateau": {}}}  # onecycle sets its own lr
    s = tune_study(kaggle_csv, space_file(tmp_path, space=space), 2, study_name="fail")
    assert s["n_failed"] == 2 and s["n_finished"] == 2
    st = optuna.load_study(study_name="fail", storage="sqlite:///t.db")
    assert all("loss became" in t.user_attrs["error"] for t in st.trials)
    assert {r.data.tags["state"] for r in trial_runs("fail")} == {"failed"}


@pytest.mark.parametrize("space_change, needle", [
    ({"scheduler": {"type": "categorical", "choices": {"linear": {}}}},
     "unknown scheduler(s) ['linear']"),
    ({"lr": {"type": "float", "low": 0.01, "high": 0.001}}, "empty or inverted range"),
    ({"fc_dropout": {"type": "float", "low": 0.5, "high": 0.5}}, "empty or inverted range"),
    ({"momentum_x": {"type": "float", "low": 0.1, "high": 0.2}}, "unknown key 'momentum_x'"),
    ({"weight_decay": {"type": "float", "low": 0, "high": 0.1, "log": True}},
     "log range needs low > 0"),
    ({"lr": {"type": "float", "low": 0, "high": 0.1}},
     "lr: low: expected a finite number above 0, got 0."),
    ({"lr": {"type": "float", "low": "1e-4", "high": ".nan"}},
     "lr: high: expected a finite number above 0, got '.nan'."),
    ({"epochs": {"type": "float", "low": 1, "high": 5}}, "epochs is a whole number; search it "
                                                         "as type: int."),
    ({"step_size": {"type": "int", "low": 1, "high": 2.5}},
     "step_size: high: expected a whole number from 1 to 2147483647, got 2.5."),
    ({"fc_dropout": {"type": "float", "low": True, "high": 0.5}},
     "fc_dropout: low: expected a finite number in [0, 1], got true."),
])
def test_bad_space_is_refused(tmp_path, space_change, needle):
    space = yaml.safe_load((ROOT / "ablations/tune.yaml").read_text())["space"]
    space.update(space_change)
    with pytest.raises(UsageError) as e:
        load_space(space_file(tmp_path, space=space), "smoke")
    assert needle in str(e.value)


@pytest.mark.slow
def test_unreachable_storage_and_tracking_fail_fast(kaggle_csv, tmp_path):
    r = run_cli("pipeline.tune", "--data", str(kaggle_csv), "--profile", "smoke",
                "--storage", "postgresql://postgres@127.0.0.1:1/none")
    assert r.returncode == 2 and "Optuna storage postgresql://" in r.stderr
    r = run_cli("pipeline.tune", "--data", str(kaggle_csv), "--profile", "smoke",
                env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:1"})
    assert r.returncode == 2 and "not reachable" in r.stderr
    assert "Retry" not in r.stderr  # one quick try, not MLflow's minutes of backoff
    assert not (tmp_path / "tune.db").exists()


def _worker(data, space, uri, name, cwd, n, extra=()):
    return start_cli("pipeline.tune", "--data", data, "--space", space, "--profile", "smoke",
                     "--storage", PG, "--study-name", name, "--n-trials", n,
                     "--experiment", "workers", *extra, env={"MLFLOW_TRACKING_URI": uri},
                     cwd=cwd)


@pytest.mark.postgres
@pytest.mark.slow
def test_two_workers_finish_exactly_n(kaggle_csv, tmp_path, pg_mlflow):
    uri, studies = pg_mlflow
    name = f"tune2-{uuid.uuid4().hex[:8]}"
    studies.append(name)
    sp = space_file(tmp_path)
    procs = [_worker(kaggle_csv, sp, uri, name, tmp_path, 5) for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    st = optuna.load_study(study_name=name, storage=PG)
    assert len(counted(st)) == 5
    runs = trial_runs(name)
    numbers = sorted(int(r.data.tags["trial"]) for r in runs)
    assert len(numbers) == 5 and len(set(numbers)) == 5
    assert set(numbers) == {t.number for t in counted(st)}


@pytest.mark.postgres
@pytest.mark.slow
def test_killed_worker_trial_is_retried(kaggle_csv, tmp_path, pg_mlflow):
    uri, studies = pg_mlflow
    name = f"tunek-{uuid.uuid4().hex[:8]}"
    studies.append(name)
    sp = space_file(tmp_path)
    a = _worker(kaggle_csv, sp, uri, name, tmp_path, 3, ["--heartbeat", "1"])
    freeze_mid_trial(a, name, PG)
    a.send_signal(signal.SIGKILL)
    a.wait()
    b = _worker(kaggle_csv, sp, uri, name, tmp_path, 3, ["--heartbeat", "1"])
    out = b.communicate(timeout=900)[0]
    assert b.returncode == 0, out
    st = optuna.load_study(study_name=name, storage=PG)
    trials = st.get_trials()
    stale = [t for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("surplus")]
    assert len(stale) == 1
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == stale[0].number]
    assert len(retry) == 1 and retry[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    # The retry keeps whatever the killed worker had sampled and samples the rest.
    assert all(retry[0].params[k] == v for k, v in stale[0].params.items())
    assert len(counted(st)) == 3
    assert all(t.state != TrialState.RUNNING for t in trials)
