"""The ablation study: the smoke grid through `mlflow run`, resume, failures, several workers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import yaml
from scipy import stats as scipy_stats

from pipeline.ablate import load_study, run_ablate
from pipeline.cli import UsageError
from tests.conftest import ROOT, freeze_mid_trial, run_cli, wait_until_complete

TINY = {"epochs": 1, "width": 0.125, "data_fraction": 0.5, "batch_size": 16,
        "early_stopping": 0}


def mini_study(tmp_path: Path, **toggle_overrides) -> Path:
    """Two cells (the basic stage, and basic with BN: as the reference's +batchnorm and the
    base's, which are the same cell) x 2 seeds: seconds per cell."""
    bn = {"with": {"batchnorm": True}, "without": {"batchnorm": False}}
    bn.update(toggle_overrides)
    d = {"reference": "basic", "base": "basic", "ladder": ["basic"], "seeds": 2,
         "reported": {"basic": 0.57}, "toggles": {"batchnorm": bn, "tta": {"eval_only": True}},
         "profiles": {"smoke": {"set": TINY, "log_models": False}}}
    p = tmp_path / "mini.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def child_runs(study_name: str):
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.study = '{study_name}' and tags.cell != ''")


@pytest.mark.slow
def test_smoke_study_through_mlflow_run(kaggle_csv, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run([str(Path(sys.executable).parent / "mlflow"), "run", str(ROOT), "-e",
                        "ablate", "--env-manager", "local", "-P", f"data={kaggle_csv}",
                        "-P", "profile=smoke", "-P", f"storage=sqlite:///{tmp_path}/ablate.db",
                        # `mlflow run` works in the project folder: outputs go here instead
                        "-P", f"report_dir={tmp_path / 'ablation_report'}"],
                       capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    s = load_study(ROOT / "ablations/study.yaml", "smoke")
    parents = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                 filter_string="tags.role = 'study'")
    assert len(parents) == 1  # under `mlflow run`, the entry point's run is the parent
    study_name = parents[0].data.tags["study"]
    children = child_runs(study_name)
    assert len(children) == len(s.cells) * s.seeds
    parent_ids = {c.data.tags["mlflow.parentRunId"] for c in children}
    assert len(parent_ids) == 1
    parent = mlflow.get_run(parent_ids.pop())
    assert parent.data.tags["study"] == study_name
    assert len({frozenset(c.data.params) for c in children}) == 1  # same param keys everywhere
    names = {c.data.tags["mlflow.runName"] for c in children}
    assert "improved -batchnorm s1" in names and "advanced s0" in names
    report = (tmp_path / "ablation_report" / "report.md").read_text()
    for t in ("batchnorm", "residual", "augment", "label_smoothing", "grad_clip", "tta"):
        assert f"| {t} (" in report
    # The leave-one-out BatchNorm row, recomputed here from the child runs with scipy.
    acc = {(c.data.tags["cell"], int(c.data.tags["seed"])): c.data.metrics["test_acc"]
           for c in children}
    diffs = [acc[("improved", sd)] - acc[("improved -batchnorm", sd)] for sd in range(s.seeds)]
    m = 100 * float(np.mean(diffs))
    half = 100 * float(scipy_stats.t.ppf(0.975, len(diffs) - 1) * np.std(diffs, ddof=1) /
                       np.sqrt(len(diffs)))
    p = float(scipy_stats.ttest_1samp(diffs, 0).pvalue)
    row = next(r for r in report.splitlines() if r.startswith("| batchnorm (leave-one-out) |"))
    cols = [c.strip() for c in row.strip("|").split("|")]
    assert cols[1] == str(s.seeds)
    assert cols[4] == f"{m:+.2f} [{m - half:+.2f}, {m + half:+.2f}]"
    assert cols[5] == (f"{p:.3f}" if p >= 0.001 else "<0.001") or not np.isfinite(p)
    metrics = parent.data.metrics
    assert metrics["effect_batchnorm_leave_one_out/test_points"] == pytest.approx(m, abs=1e-9)
    assert metrics["effect_batchnorm_leave_one_out/test_points_lo"] == pytest.approx(m - half,
                                                                                     abs=1e-9)
    # No skip fits the basic net: its cell is left out, with the reason, not trained as a no-op.
    assert "`basic +residual` is left out: stage basic has no pair of convs" in report
    assert "basic +residual s0" not in names
    assert "effects at this budget do not transfer" in report.split("## Effects")[0]
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/forest.png", "report/ladder.png"} <= arts


def test_resume_skips_finished_cells(kaggle_csv, tmp_path):
    study = mini_study(tmp_path)
    first = run_ablate(str(kaggle_csv), str(study), "smoke", None, {}, "sqlite:///q.db", None,
                       "rep")
    assert first["trained"] == 4 and first["failed"] == 0
    again = run_ablate(str(kaggle_csv), str(study), "smoke", None, {}, "sqlite:///q.db", None,
                       "rep")
    assert again["trained"] == 0 and again["study"] == first["study"]
    assert len(child_runs(first["study"])) == 4
    assert "| batchnorm (added to reference) | 2 |" in again["report"]


def test_a_study_has_its_own_experiment_and_its_report_is_the_parent_description(
        kaggle_csv, tmp_path, monkeypatch):
    from pipeline import tracking

    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")  # a plain shell: no experiment chosen
    tracking.setup(None)
    study = mini_study(tmp_path)
    out = run_ablate(str(kaggle_csv), str(study), "smoke", None, {}, "sqlite:///q.db", None,
                     "rep")
    exp = mlflow.get_experiment_by_name(out["study"])
    assert exp is not None and "group by the tag `cell`" in exp.tags["mlflow.note.content"]
    runs = mlflow.search_runs([exp.experiment_id], output_format="list")
    assert len(runs) == 1 + 4  # the parent and every (cell, seed), nothing else
    parent = mlflow.get_run(out["parent_run_id"])
    assert parent.info.experiment_id == exp.experiment_id
    assert parent.data.tags["mlflow.note.content"] == out["report"]
    logged = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/study.yaml")
    assert logged == study.read_text()  # the study file, as tuning logs its space
    assert "`<reference> -T` is the reference with toggle T taken out" in out["report"]
    # Effects are in points on val and test, with their interval bounds, as in the report.
    keys = set(parent.data.metrics)
    for part in ("val", "test"):
        assert {f"effect_batchnorm_added_to_reference/{part}_points{s}"
                for s in ("", "_lo", "_hi")} <= keys
    default = mlflow.get_experiment_by_name("fer2013")
    assert default is None or not mlflow.search_runs([default.experiment_id],
                                                     output_format="list")


def test_register_puts_the_best_val_model_in_the_registry(kaggle_csv, tmp_path):
    study = mini_study(tmp_path)
    with pytest.raises(UsageError, match="no finished run logged a model"):
        run_ablate(str(kaggle_csv), str(study), "smoke", None, {}, "sqlite:///q.db", None,
                   "rep", register="fer-best")
    out = run_ablate(str(kaggle_csv), str(study), "smoke", None, {}, "sqlite:///q.db", "logged",
                     "rep", log_models="all", register="fer-best", alias="champion")
    children = child_runs(out["study"])
    best = max(children, key=lambda r: r.data.metrics["val_acc"])
    reg = out["registered"]
    assert reg["val_acc"] == best.data.metrics["val_acc"]
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("fer-best", "champion")
    # Chosen on val: its run has the best val accuracy of the study (ties are equally best).
    assert version.run_id == reg["run_id"]
    assert mlflow.get_run(version.run_id).data.metrics["val_acc"] == best.data.metrics["val_acc"]
    assert mlflow.get_run(version.run_id).data.tags["study"] == out["study"]
    model = mlflow.pyfunc.load_model("models:/fer-best@champion")
    pred = model.predict(np.zeros((2, 48, 48), np.uint8) + 100)
    assert list(pred.columns)[-1] == "label" and len(pred) == 2


def test_a_study_whose_tracking_store_is_gone_stops_before_training(kaggle_csv, tmp_path,
                                                                     monkeypatch):
    study = mini_study(tmp_path)
    run_ablate(str(kaggle_csv), str(study), "smoke", None, {}, "sqlite:///q.db", None, "rep")
    # Start over with a new tracking store (`rm mlflow.db`), the study store kept.
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fresh)
    mlflow.set_tracking_uri(fresh)
    mlflow.set_experiment("tests")
    with pytest.raises(UsageError, match=r"parent run [0-9a-f]{32} is not in .*fresh\.db.*"
                                         r"remove q\.db or pass --study-name"):
        run_ablate(str(kaggle_csv), str(study), "smoke", None, {}, "sqlite:///q.db", None,
                   "rep")
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_a_rerun_under_mlflow_run_completes_the_study_and_leaves_no_empty_run(
        kaggle_csv, tmp_path, monkeypatch):
    """What `mlflow run` does on a kill and a rerun: each invocation has its own entry run
    (MLFLOW_RUN_ID); the first one's becomes the study's parent and is left FAILED."""
    import pipeline.ablate as ablate

    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name("tests").experiment_id
    study = mini_study(tmp_path)
    real_train, calls = ablate.train, []

    def killed_on_third_cell(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_train(*a, **k)

    first = client.create_run(exp, run_name="entry-1").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", first)
    monkeypatch.setattr(ablate, "train", killed_on_third_cell)
    with pytest.raises(KeyboardInterrupt):
        run_ablate(str(kaggle_csv), str(study), "smoke", None, {}, "sqlite:///q.db", None, "rep")
    client.set_terminated(first, "FAILED")  # `mlflow run` saw its command die

    monkeypatch.setattr(ablate, "train", real_train)
    second = client.create_run(exp, run_name="entry-2").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", second)
    out = run_ablate(str(kaggle_csv), str(study), "smoke", None, {}, "sqlite:///q.db", None,
                     "rep")
    client.set_terminated(second, "FINISHED")  # `mlflow run` ends its own run

    assert out["parent_run_id"] == first and out["trained"] == 2
    parent = client.get_run(first)
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(first, "report")} >= {"report/report.md"}
    rerun = client.get_run(second)
    assert rerun.data.tags["mlflow.parentRunId"] == first
    assert rerun.info.run_name.startswith("worker")
    top = [r for r in client.search_runs([exp]) if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in top] == [first]
    assert len([r for r in child_runs(out["study"]) if r.info.status == "FINISHED"]) == 4


@pytest.mark.slow
def test_jobs_start_local_workers_on_one_study(kaggle_csv, tmp_path):
    study = mini_study(tmp_path)
    out = run_ablate(str(kaggle_csv), str(study), "smoke", None, {}, "sqlite:///q.db", None,
                     "rep", jobs=2)
    assert out["helpers_exit"] == [0]  # the second worker joined and left cleanly
    runs = child_runs(out["study"])
    cells = sorted((r.data.tags["cell"], r.data.tags["seed"]) for r in runs)
    assert len(cells) == 4 and len(set(cells)) == 4  # every (cell, seed) trained exactly once
    st = optuna.load_study(study_name=out["study"], storage="sqlite:///q.db")
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in st.trials) == 4
    assert "| batchnorm (added to reference) | 2 |" in out["report"]


def test_failing_cell_is_reported_and_the_study_goes_on(kaggle_csv, tmp_path):
    study = mini_study(tmp_path, **{"with": {"batchnorm": True, "lr": float("inf")}})
    out = run_ablate(str(kaggle_csv), str(study), "smoke", None, {}, "sqlite:///q.db", None,
                     "rep")
    assert out["failed"] == 2 and out["trained"] == 2  # the +batchnorm cells diverge
    assert "## Missing cells" in out["report"] and "loss became" in out["report"]
    assert "| basic | 0.57 |" in out["report"]


@pytest.mark.parametrize("change, needle", [
    ({"toggles": {"dropout": {"with": {}, "without": {}}}}, "unknown toggle(s) ['dropout']"),
    ({"profiles": {"smoke": {"set": {"epochs": "many"}}}}, "epochs='many'"),
    ({"toggles": {"augment": {"with": {"augment": True}}}}, "needs 'with' and 'without'"),
    ({"seed": 5}, "unknown key 'seed'. Valid keys: base, ladder, profiles, reference"),
])
def test_bad_study_files_fail_before_training(tmp_path, change, needle):
    d = yaml.safe_load((ROOT / "ablations/study.yaml").read_text())
    for k, v in change.items():
        d[k] = v
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(UsageError) as e:
        load_study(p, "smoke")
    assert needle in str(e.value)


def test_unknown_profile_and_bad_data_are_clear_errors(kaggle_csv, tmp_path):
    r = run_cli("pipeline.ablate", "--data", str(kaggle_csv), "--profile", "huge")
    assert r.returncode == 2 and "invalid choice: 'huge'" in r.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("emotion,pixels,Usage\n3,1 2,Training\n")
    r = run_cli("pipeline.ablate", "--data", str(bad), "--profile", "smoke")
    assert r.returncode == 2 and "2 pixel values" in r.stderr
    assert not (tmp_path / "ablate.db").exists()


PG = "postgresql://postgres@127.0.0.1:5432/test"


def _pg_available() -> bool:
    try:
        optuna.storages.RDBStorage(PG)
        return True
    except Exception:
        return False


@pytest.fixture
def pg_mlflow():
    """A fresh PostgreSQL database as the shared MLflow backend (as a tracking server would
    use), dropped afterwards with the Optuna studies the test made."""
    if not _pg_available():
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    import sqlalchemy

    name = f"mlflow_{uuid.uuid4().hex[:10]}"
    eng = sqlalchemy.create_engine(PG, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    uri = f"postgresql://postgres@127.0.0.1:5432/{name}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("workers")  # creates the schema once, before the workers race
    studies: list[str] = []
    yield uri, studies
    mlflow.set_tracking_uri("sqlite:///mlflow.db")
    for st in studies:
        try:
            optuna.delete_study(study_name=st, storage=PG)
        except KeyError:
            pass
    with eng.connect() as c:
        c.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    eng.dispose()


def _worker(data, study, uri, name, cwd, extra=()):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    return subprocess.Popen([sys.executable, "-m", "pipeline.ablate", "--data", str(data),
                             "--study", str(study), "--profile", "smoke", "--storage", PG,
                             "--study-name", name, "--experiment", "workers", *extra],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.mark.postgres
@pytest.mark.slow
def test_two_workers_on_postgres_train_each_cell_once(kaggle_csv, tmp_path, pg_mlflow):
    uri, studies = pg_mlflow
    study, name = mini_study(tmp_path), f"two-{uuid.uuid4().hex[:8]}"
    studies.append(name)
    # Deterministic interleaving: A is frozen holding one cell while B trains the rest, then
    # A finishes its own; each of them trains at least one cell whatever the machine's speed.
    slow_beat = ["--heartbeat", "60"]  # A's frozen cell must not go stale while B works
    a = _worker(kaggle_csv, study, uri, name, tmp_path, slow_beat)
    freeze_mid_trial(a, name, PG)
    b = _worker(kaggle_csv, study, uri, name, tmp_path, slow_beat)
    wait_until_complete(name, PG, 1)
    a.send_signal(signal.SIGCONT)
    procs = [a, b]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    runs = child_runs(name)
    keys = sorted((r.data.tags["cell"], r.data.tags["seed"]) for r in runs)
    assert len(keys) == 4 and len(set(keys)) == 4
    assert all(r.info.status == "FINISHED" for r in runs)
    trained = [len(re.findall(r"^\[\d+/4\] ", o, re.M)) for o in outs]
    assert sum(trained) == 4 and all(n > 0 for n in trained)  # both took part
    st = optuna.load_study(study_name=name, storage=PG)
    assert len(st.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 4


@pytest.mark.postgres
@pytest.mark.slow
def test_killed_worker_cell_goes_back_to_the_pool(kaggle_csv, tmp_path, pg_mlflow):
    uri, studies = pg_mlflow
    study, name = mini_study(tmp_path), f"kill-{uuid.uuid4().hex[:8]}"
    studies.append(name)
    a = _worker(kaggle_csv, study, uri, name, tmp_path, ["--heartbeat", "1"])
    freeze_mid_trial(a, name, PG)
    a.send_signal(signal.SIGKILL)
    a.wait()
    b = _worker(kaggle_csv, study, uri, name, tmp_path, ["--heartbeat", "1"])
    out = b.communicate(timeout=900)[0]
    assert b.returncode == 0, out
    st = optuna.load_study(study_name=name, storage=PG)
    states = [t.state for t in st.get_trials()]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 4
    assert optuna.trial.TrialState.FAIL in states  # the killed worker's trial, then retried
    finished = [r for r in child_runs(name) if r.info.status == "FINISHED"]
    keys = [(r.data.tags["cell"], r.data.tags["seed"]) for r in finished]
    assert len(keys) == 4 and len(set(keys)) == 4
