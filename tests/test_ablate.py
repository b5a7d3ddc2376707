"""The ablation study: the smoke grid through `mlflow run`, resume, failures, several workers."""

from __future__ import annotations

import json
import os
import re
import shlex
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

from pipeline import study as lifecycle
from pipeline.plan import load_study, pairs
from pipeline.report import collect
from pipeline.cli import UsageError
from tests.conftest import (PG, ROOT, ablate_study, child_runs, freeze_mid_trial,
                            mini_study, run_cli, start_cli, wait_until_complete)


@pytest.mark.slow
def test_smoke_study_through_mlflow_run(kaggle_csv, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_EXPERIMENT_ID", None)  # as the README runs it: by experiment name
    r = subprocess.run([str(Path(sys.executable).parent / "mlflow"), "run", str(ROOT), "-e",
                        "ablate", "--env-manager", "local", "--experiment-name",
                        "fer2013-ablation", "-P", f"data={kaggle_csv}",
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
    # Every effect row, recomputed here from the child runs with scipy, on test. Which arms
    # train in one tiny epoch may differ between CPUs, so each row is held to the rule its own
    # runs call for (both rules are checked with fixed figures in test_findings): an arm whose
    # clean train accuracy sits within 2 points of the majority rate makes the row "did not
    # train", with no size logged; otherwise the size and interval are the paired t's.
    runs = {(c.data.tags["cell"], int(c.data.tags["seed"])): c.data.metrics for c in children}

    def at_chance(cell):
        arm = [m for (c, _), m in runs.items() if c == cell]
        return np.mean([m["train_acc"] for m in arm]) <= np.mean(
            [m["majority_rate"] for m in arm]) + 0.02

    metrics = parent.data.metrics
    checked = {"sized": 0, "did not train": 0}
    for pr in pairs(s):
        row = next(r for r in report.splitlines() if r.startswith(f"| {pr.label} |"))
        cols = [c.strip() for c in row.strip("|").split("|")]
        assert cols[1] == str(s.seeds), row
        key = "effect_" + re.sub(r"[^a-z0-9]+", "_", pr.label.lower()).strip("_")
        if at_chance(pr.on) or at_chance(pr.off):
            assert cols[6].startswith("did not train at these settings"), row
            assert f"{key}/test_points" not in metrics
            checked["did not train"] += 1
            continue
        diffs = [runs[(pr.on, sd)][pr.on_metric] - runs[(pr.off, sd)][pr.off_metric]
                 for sd in range(s.seeds)]
        m = 100 * float(np.mean(diffs))
        half = 100 * float(scipy_stats.t.ppf(0.975, len(diffs) - 1) * np.std(diffs, ddof=1) /
                           np.sqrt(len(diffs)))
        assert cols[2] == f"{m:+.2f} [{m - half:+.2f}, {m + half:+.2f}]", row
        # Logged in points, rounded to 0.01 (what the runs' accuracies resolve).
        assert metrics[f"{key}/test_points"] == pytest.approx(m, abs=0.005 + 1e-9)
        assert metrics[f"{key}/test_points_lo"] == pytest.approx(m - half, abs=0.005 + 1e-9)
        checked["sized"] += 1
    assert sum(checked.values()) == len(pairs(s)) >= 6, checked
    # Holm over the family of rows with a p, recomputed from the logged raw p-values (both
    # logged to 3 significant digits, so they agree to the rounding of the two).
    raw = {k.split("/")[0]: v for k, v in metrics.items() if k.endswith("/p")}
    order = sorted(raw, key=raw.get)
    running = 0.0
    for i, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * raw[key]))
        assert metrics[f"{key}/p_holm"] == pytest.approx(running, rel=len(order) * 5e-3)
    # Effects are read on test only; the report shows each seed's values and what the seeds
    # could detect.
    assert not any("val_points" in k for k in metrics)
    assert "val effect" not in report and "## Effects on test" in report
    per_seed = report.split("## Per-seed values")[1]
    with_row = next(r for r in per_seed.splitlines() if r.startswith("| batchnorm (leave-one-out)"))
    assert with_row.endswith(" | ".join(f"{runs[('improved', sd)]['test_acc']:.4f}" for sd in range(s.seeds))
                             + " |")
    assert "Smallest detectable effect" in report or "cannot be stated" in report
    # No skip fits the basic net: its cell is left out, with the reason, not trained as a no-op.
    assert "`basic +residual` is left out: stage basic has no pair of convs" in report
    assert "basic +residual s0" not in names
    assert "effects at this budget do not transfer" in report.split("## Effects")[0]
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/forest.png", "report/ladder.png"} <= arts
    # The end names the address of a view the study stored in its experiment: its runs, grouped
    # by cell, with the test accuracy columns. It is the UI's own shared-view tag, read as the
    # UI reads it (plain JSON); the search keeps other studies' runs out of the groups.
    exp_id = parent.info.experiment_id
    url = re.search(r"then (http://127\.0\.0\.1:5000/\S+) ", r.stdout).group(1)
    assert url == (f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType="
                   f"machine_learning&viewStateShareKey={study_name}")
    tags = mlflow.MlflowClient().get_experiment(exp_id).tags
    view = json.loads(tags[f"mlflow.sharedViewState.{study_name}"])
    assert view["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "cell"}]
    assert {"metrics.`test_acc`", "metrics.`test_acc_tta`"} <= set(view["selectedColumns"])
    assert view["groupsExpanded"] == {f"tag.cell.{c.name}": False for c in s.cells}
    shown = mlflow.search_runs([exp_id], filter_string=view["searchFilter"], output_format="list")
    assert {x.info.run_id for x in shown} == {x.info.run_id for x in children}
    # Ordered by start_time, MLflow 3.17's UI fetches the shown runs' parents too and lists the
    # parent as a group of its own ("Additional runs").
    assert view["orderByKey"] != "attributes.start_time"
    assert tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.slow
def test_resume_skips_finished_cells(kaggle_csv, tmp_path):
    study = mini_study(tmp_path)
    first = ablate_study(kaggle_csv, study)
    assert first.trained == 4 and first.failed == 0
    again = ablate_study(kaggle_csv, study)
    assert again.trained == 0 and again.study == first.study
    children = child_runs(first.study)
    assert len(children) == 4
    assert "| batchnorm (added to reference) | 2 |" in again.report
    # The wall time is the study's (first run's start to last run's end), not this call's.
    span = (max(c.info.end_time for c in children) - min(c.info.start_time for c in children))
    assert f"wall time {span / 60000:.1f} min (first run's start" in again.report


@pytest.mark.slow
def test_a_study_has_its_own_experiment_and_its_report_is_the_parent_description(
        kaggle_csv, tmp_path, monkeypatch):
    from pipeline import tracking

    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")  # a plain shell: no experiment chosen
    exp = tracking.setup(None)
    assert exp.chosen_by == "default"
    study = mini_study(tmp_path)
    out = ablate_study(kaggle_csv, study, exp=exp)
    exp = mlflow.get_experiment_by_name(out.study)
    assert exp is not None and f"viewStateShareKey={out.study}`" in exp.tags[
        "mlflow.note.content"]
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the training view
    runs = mlflow.search_runs([exp.experiment_id], output_format="list")
    assert len(runs) == 1 + 4  # the parent and every (cell, seed), nothing else
    parent = mlflow.get_run(out.parent_run_id)
    assert parent.info.experiment_id == exp.experiment_id
    # The run's page opens on the answer (the effects with their Holm p, the forest plot
    # inline through the UI's artifact address), then the whole report.
    note = parent.data.tags["mlflow.note.content"]
    head, _, rest = note.partition(out.report)
    assert head.startswith("**The answer:** ") and rest == ""
    assert f"## Effects on test, `{out.study}`" in head
    assert "| component | effect on test (points) [95% CI] | Holm p | reading |" in head
    assert f"(get-artifact?path=report/forest.png&run_uuid={parent.info.run_id})" in head
    forest = mlflow.artifacts.download_artifacts(run_id=parent.info.run_id,
                                                 artifact_path="report/forest.png")
    assert Path(forest).stat().st_size > 0
    # The experiment's description leads with one line of the answer and the parent's address.
    first = exp.tags["mlflow.note.content"].split("\n")[0]
    assert first.startswith("**The answer** (") and \
        f"(#/experiments/{exp.experiment_id}/runs/{parent.info.run_id})" in first
    logged = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/study.yaml")
    assert logged == study.read_text()  # the study file, as tuning logs its space
    assert "`<reference> -T` is the reference with toggle T taken out" in out.report
    # Effects are in test points, with their interval bounds, as in the report; none on val.
    keys = set(parent.data.metrics)
    row = next(r for r in out.report.splitlines()
               if r.startswith("| batchnorm (added to reference) |"))
    assert ({f"effect_batchnorm_added_to_reference/test_points{s}"
             for s in ("", "_lo", "_hi")} <= keys) != ("did not train" in row)
    assert not any("val_points" in k for k in keys)
    default = mlflow.get_experiment_by_name("fer2013")
    assert default is None or not mlflow.search_runs([default.experiment_id],
                                                     output_format="list")


@pytest.mark.slow
def test_register_puts_the_best_val_model_in_the_registry(kaggle_csv, tmp_path):
    study = mini_study(tmp_path)
    with pytest.raises(UsageError, match="no finished run logged a model"):
        ablate_study(kaggle_csv, study, register="fer-best")
    out = ablate_study(kaggle_csv, study, study_name="logged", log_models="all",
                       register="fer-best", alias="champion")
    children = child_runs(out.study)
    best = max(children, key=lambda r: r.data.metrics["val_acc"])
    reg = out.registered
    assert reg["val_acc"] == best.data.metrics["val_acc"]
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("fer-best", "champion")
    # Chosen on val: its run has the best val accuracy of the study (ties are equally best).
    assert version.run_id == reg["run_id"]
    assert mlflow.get_run(version.run_id).data.metrics["val_acc"] == best.data.metrics["val_acc"]
    assert mlflow.get_run(version.run_id).data.tags["study"] == out.study
    model = mlflow.pyfunc.load_model("models:/fer-best@champion")
    pred = model.predict(np.zeros((2, 48, 48), np.uint8) + 100)
    assert list(pred.columns)[-1] == "label" and len(pred) == 2


@pytest.mark.slow
def test_only_the_study_s_own_units_are_registered_or_reported(kaggle_csv, tmp_path):
    """Runs tagged as the study's best (a better val, a model) that its storage does not name
    (in another experiment, or under its parent but never a trial's run), and a real unit whose
    model tag points at another run's model, are neither registered nor in the report."""
    study = mini_study(tmp_path)
    out = ablate_study(kaggle_csv, study, study_name="own", log_models="all")
    client = mlflow.MlflowClient()
    units = child_runs(out.study)
    real = {r.info.run_id for r in units}
    exp = units[0].info.experiment_id
    planted = []
    for where in (client.create_experiment("someone-else"), exp):
        mlflow.set_experiment(experiment_id=where)
        with mlflow.start_run(tags={"study": out.study, "cell": "basic", "seed": "0",
                                    "mlflow.parentRunId": out.parent_run_id}) as r:
            mlflow.log_metrics({"val_acc": 0.99, "test_acc": 0.99})
            info = mlflow.pyfunc.log_model(name="m", python_model=_Echo())
            mlflow.set_tag("model_uri", info.model_uri)
        planted.append((r.info.run_id, info.model_uri))
    # A real unit made to look best, its model tag pointed at a planted run's model.
    hijacked = units[0].info.run_id
    client.log_metric(hijacked, "val_acc", 0.98)
    client.set_tag(hijacked, "model_uri", planted[0][1])

    again = ablate_study(kaggle_csv, study, study_name="own", log_models="all",
                         register="fer-best", alias="champion")
    reg = again.registered
    assert reg["run_id"] in real and reg["run_id"] != hijacked
    version = client.get_model_version_by_alias("fer-best", "champion")
    assert version.run_id == reg["run_id"]
    st = optuna.load_study(study_name=out.study, storage="sqlite:///q.db")
    reported = collect(st).by_cell
    assert len(reported) == 4 and all(m["val_acc"] < 0.99 for m in reported.values())


class _Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        return model_input


def test_the_registered_model_is_chosen_by_the_val_accuracy_it_is_served_with():
    """A TTA model serves its TTA predictions, so its TTA val accuracy is what competes; a run
    with the best plain val but a worse TTA val must lose to one served better."""
    from pipeline import tracking

    for name, tta, val, val_tta in (("a", True, 0.70, 0.66), ("b", True, 0.65, 0.69),
                                    ("c", False, 0.68, 0.75)):
        with mlflow.start_run(run_name=name):
            mlflow.log_params({"tta": tta})
            mlflow.log_metrics({"val_acc": val, "val_acc_tta": val_tta})
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    best = tracking.best_served(runs)
    # a: served .66; b: served .69; c (no TTA): served .68, its .75 TTA figure is not served
    assert best.info.run_name == "b"
    assert tracking.served_val_acc(best) == 0.69


@pytest.mark.slow
def test_a_study_whose_tracking_store_is_gone_stops_before_training(kaggle_csv, tmp_path,
                                                                     monkeypatch):
    study = mini_study(tmp_path)
    ablate_study(kaggle_csv, study)
    # Start over with a new tracking store (`rm mlflow.db`), the study store kept.
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fresh)
    mlflow.set_tracking_uri(fresh)
    mlflow.set_experiment("tests")
    with pytest.raises(UsageError, match=r"parent run [0-9a-f]{32} is not in .*fresh\.db.*"
                                         r"remove q\.db or pass --study-name"):
        ablate_study(kaggle_csv, study)
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


@pytest.mark.slow
def test_a_rerun_under_mlflow_run_completes_the_study_and_leaves_no_empty_run(
        kaggle_csv, tmp_path, monkeypatch):
    """What `mlflow run` does on a kill and a rerun: each invocation has its own entry run
    (MLFLOW_RUN_ID, which the command takes off the environment into its options); the first
    one's becomes the study's parent and is left FAILED."""
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
    monkeypatch.setattr(ablate, "train", killed_on_third_cell)
    with pytest.raises(KeyboardInterrupt):
        ablate_study(kaggle_csv, study, entry_run=first)
    client.set_terminated(first, "FAILED")  # `mlflow run` saw its command die

    monkeypatch.setattr(ablate, "train", real_train)
    second = client.create_run(exp, run_name="entry-2").info.run_id
    out = ablate_study(kaggle_csv, study, entry_run=second)
    client.set_terminated(second, "FINISHED")  # `mlflow run` ends its own run

    assert out.parent_run_id == first and out.trained == 2
    parent = client.get_run(first)
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(first, "report")} >= {"report/report.md"}
    rerun = client.get_run(second)
    assert rerun.data.tags["mlflow.parentRunId"] == first
    assert rerun.info.run_name.startswith("worker")
    top = [r for r in client.search_runs([exp]) if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in top] == [first]
    assert len([r for r in child_runs(out.study) if r.info.status == "FINISHED"]) == 4


@pytest.mark.slow
def test_jobs_start_local_workers_on_one_study(kaggle_csv, tmp_path):
    study = mini_study(tmp_path)
    out = ablate_study(kaggle_csv, study, jobs=2)
    assert out.helpers_exit == [0]  # the second worker joined and left cleanly
    runs = child_runs(out.study)
    cells = sorted((r.data.tags["cell"], r.data.tags["seed"]) for r in runs)
    assert len(cells) == 4 and len(set(cells)) == 4  # every (cell, seed) trained exactly once
    st = optuna.load_study(study_name=out.study, storage="sqlite:///q.db")
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in st.trials) == 4
    assert "| batchnorm (added to reference) | 2 |" in out.report


@pytest.mark.slow
def test_failing_cell_is_reported_and_the_study_goes_on(kaggle_csv, tmp_path):
    # An lr no net survives: the +batchnorm cells diverge in their first steps.
    study = mini_study(tmp_path, **{"with": {"batchnorm": True, "lr": 1e30}})
    out = ablate_study(kaggle_csv, study)
    assert out.failed == 2 and out.trained == 2  # the +batchnorm cells diverge
    assert "## Missing cells" in out.report and "loss became" in out.report
    assert "| basic | 0.57 |" in out.report


@pytest.mark.slow
def test_an_arm_at_the_majority_rate_is_reported_as_did_not_train(kaggle_csv, tmp_path):
    """The report reads each arm's clean train accuracy from its runs: an arm within 2 points
    of the majority-class rate did not train, and its row is no effect size. The case is made
    by setting the +batchnorm runs' train accuracy to their majority rate; rerunning the study
    trains nothing and rebuilds the report from the store."""
    study = mini_study(tmp_path)
    first = ablate_study(kaggle_csv, study)
    client = mlflow.MlflowClient()
    for r in child_runs(first.study):
        m = r.data.metrics
        assert 0 <= m["train_acc"] <= 1 and m["majority_rate"] == pytest.approx(1 / 7, abs=0.02)
        if r.data.tags["cell"] == "basic +batchnorm":
            client.log_metric(r.info.run_id, "train_acc", m["majority_rate"] + 0.01)
        else:
            client.log_metric(r.info.run_id, "train_acc", 0.9)
    again = ablate_study(kaggle_csv, study)
    assert again.trained == 0
    row = next(r for r in again.report.splitlines()
               if r.startswith("| batchnorm (added to reference) |"))
    assert "did not train at these settings (`basic +batchnorm` clean train acc" in row
    assert "[" not in row  # no interval
    parent = mlflow.get_run(again.parent_run_id).data.metrics
    # The effect metrics logged by the first report remain in history; none was added now.
    hist = client.get_metric_history(again.parent_run_id,
                                     "effect_batchnorm_added_to_reference/test_points")
    assert len(hist) <= 1 and ("effect_batchnorm_added_to_reference/test_points" in parent) == \
        (len(hist) == 1)
    assert (tmp_path / "rep" / "forest.png").stat().st_size > 0


def test_extra_cells_are_named_after_their_overrides_and_paired(tmp_path):
    from pipeline.plan import pairs

    d = yaml.safe_load(mini_study(tmp_path).read_text())
    d["profiles"]["smoke"]["extra_cells"] = [
        {"toggle": "batchnorm", "set": {"batchnorm": True, "lr": 1e-4}}]
    p = tmp_path / "extra.yaml"
    p.write_text(yaml.safe_dump(d))
    s = load_study(p, "smoke")
    extra = s.cells[-1]
    assert extra.name == "basic +batchnorm lr=0.0001" and extra.extra
    assert s.config(extra, 1).lr == 1e-4 and s.config(extra, 1).batchnorm
    pr = next(x for x in pairs(s) if x.on == extra.name)
    assert (pr.label, pr.off) == ("batchnorm (added to reference; arm with: lr=0.0001)", "basic")
    full = load_study(ROOT / "ablations/study.yaml", "full")
    assert full.seeds == 5
    assert "improved -batchnorm lr=0.0001" in {c.name for c in full.cells}
    assert load_study(ROOT / "ablations/study.yaml", "full", seeds=2).seeds == 2


@pytest.mark.slow
def test_a_stage_budget_applies_to_that_stage_s_cells_and_the_command_line_overrides_it(
        tmp_path):
    from pipeline.plan import fingerprint

    d = yaml.safe_load((ROOT / "ablations/study.yaml").read_text())
    d["profiles"]["smoke"]["stage_set"] = {"basic": {"width": 0.25, "epochs": 2}}
    p = tmp_path / "staged.yaml"
    p.write_text(yaml.safe_dump(d))
    s = load_study(p, "smoke")
    width = {c.name: s.config(c, 0).width for c in s.cells}
    assert width["basic"] == width["basic +augment"] == 0.25  # both arms of a basic pair
    assert width["improved"] == width["improved -augment"] == 0.125  # the profile's
    assert s.config(s.cells[0], 0).epochs == 2
    assert s.reduced().endswith("; stage basic: epochs=2, width=0.25")  # (yaml sorts keys)
    plain = load_study(ROOT / "ablations/study.yaml", "smoke")
    assert fingerprint(s) != fingerprint(plain)  # another budget is another study
    cli = load_study(p, "smoke", budget={"width": 0.5})
    assert {cli.config(c, 0).width for c in cli.cells} == {0.5}
    assert cli.config(cli.cells[0], 0).epochs == 2  # what the command line left alone stays
    # The shipped quick profile trains the basic net wider than the rest.
    quick = load_study(ROOT / "ablations/study.yaml", "quick")
    assert {c.name for c in quick.cells if quick.config(c, 0).width == 0.25} == {
        c.name for c in quick.cells if c.stage == "basic"}


@pytest.mark.parametrize("stage_set, needle", [
    ({"vgg": {"width": 0.25}}, "stage_set entry 'vgg'"),
    ({"basic": {"width": 0}}, "width: expected a finite number above 0, got 0."),
    ([{"basic": {"width": 0.25}}], "stage_set must map stage names"),
])
def test_a_bad_stage_budget_fails_before_training(tmp_path, stage_set, needle):
    d = yaml.safe_load((ROOT / "ablations/study.yaml").read_text())
    d["profiles"]["smoke"]["stage_set"] = stage_set
    p = tmp_path / "bad_stage.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(UsageError) as e:
        load_study(p, "smoke")
    assert needle in str(e.value) and "profile smoke" in str(e.value)


@pytest.mark.parametrize("spec, needle", [
    ({"toggle": "dropout", "set": {"lr": 1e-4}}, "toggle 'dropout' is not a trained toggle"),
    ({"toggle": "batchnorm", "set": {"lr": 1e-4}}, "leave batchnorm as basic has it"),
    ({"toggle": "batchnorm", "stage": "resnet", "set": {"batchnorm": True}},
     "must be the reference (basic) or the base"),
    ({"toggle": "batchnorm", "set": {"batchnorm": True, "lr": -1}},
     "lr: expected a finite number above 0, got -1."),
    ({"toggle": "batchnorm", "set": {"batchnorm": True}}, "already trains"),
    ("improved -batchnorm", "expected a mapping"),
])
def test_bad_extra_cells_fail_before_training(tmp_path, spec, needle):
    d = yaml.safe_load(mini_study(tmp_path).read_text())
    d["profiles"]["smoke"]["extra_cells"] = [spec]
    p = tmp_path / "bad_extra.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(UsageError) as e:
        load_study(p, "smoke")
    assert needle in str(e.value) and "extra_cells[0]" in str(e.value)


@pytest.mark.parametrize("change, needle", [
    ({"toggles": {"dropout": {"with": {}, "without": {}}}}, "unknown toggle(s) ['dropout']"),
    ({"profiles": {"smoke": {"set": {"epochs": "many"}}}},
     "epochs: expected a whole number from 1 to 2147483647, got 'many'."),
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


@pytest.mark.slow
def test_unknown_profile_and_bad_data_are_clear_errors(kaggle_csv, tmp_path):
    r = run_cli("pipeline.ablate", "--data", str(kaggle_csv), "--profile", "huge")
    assert r.returncode == 2 and "invalid choice: 'huge'" in r.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("emotion,pixels,Usage\n3,1 2,Training\n")
    r = run_cli("pipeline.ablate", "--data", str(bad), "--profile", "smoke")
    assert r.returncode == 2 and "2 pixel values" in r.stderr
    assert not (tmp_path / "ablate.db").exists()


def _worker(data, study, uri, name, cwd, extra=()):
    return start_cli("pipeline.ablate", "--data", data, "--study", study, "--profile", "smoke",
                     "--storage", PG, "--study-name", name, "--experiment", "workers", *extra,
                     env={"MLFLOW_TRACKING_URI": uri}, cwd=cwd)


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
    # Both found the queue empty at the end; one built the report (of all 4 units), the other
    # left it be, so no metric on the parent gets a second point.
    assert sum("was built by another worker" in o for o in outs) == 1
    parent = mlflow.MlflowClient().get_run(st.user_attrs["parent_run_id"])
    assert parent.data.tags["report_units"] == "4"


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


@pytest.mark.slow
def test_a_stopped_study_says_the_command_that_continues_it_and_that_command_does(
        kaggle_csv, tmp_path):
    import shlex

    study = mini_study(tmp_path)
    p = start_cli("pipeline.ablate", "--data", kaggle_csv, "--study", study, "--profile",
                  "smoke", "--storage", "sqlite:///q.db", cwd=tmp_path)
    seen = []
    for line in p.stdout:  # the event: the second cell has begun, so the first is finished
        seen.append(line)
        if line.startswith("[2/4] "):
            break
    # It says how long, before the first run and at each one, measured on this machine.
    assert any(re.match(r"4 of 4 runs to train: about \d+ (s|min) on this machine", x)
               for x in seen), seen
    assert re.match(r"\[2/4\] .* seed \d \(about \d+ (s|min) left\)", line)
    p.send_signal(signal.SIGTERM)
    out = line + p.communicate(timeout=300)[0]
    assert p.returncode == 130, out[-2000:]
    hint = re.search(r"continue the study with `([^`]+)`", out).group(1)
    assert hint == (f"python -m pipeline.ablate --data {kaggle_csv} --study {study} "
                    f"--profile smoke --storage sqlite:///q.db")
    # The unit it had just begun went back to the queue at once: none is left RUNNING for its
    # heartbeat to go stale (a minute the continuing command would wait out).
    st = optuna.load_study(study_name=re.search(r"study (\S+): ", "".join(seen)).group(1),
                           storage=f"sqlite:///{tmp_path}/q.db")
    states = [tr.state for tr in st.get_trials(deepcopy=False)]
    assert optuna.trial.TrialState.RUNNING not in states and states.count(
        optuna.trial.TrialState.COMPLETE) == 1, states
    args = shlex.split(hint)
    r = subprocess.run([sys.executable, *args[1:]], cwd=tmp_path, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    name = re.search(r"study (\S+): ", r.stdout).group(1)
    assert "(joined)" in r.stdout  # the same study, continued
    runs = [r for r in child_runs(name) if r.info.status == "FINISHED"]
    assert len({(r.data.tags["cell"], r.data.tags["seed"]) for r in runs}) == 4


@pytest.mark.parametrize("module, flag", [("pipeline.ablate", "--study"),
                                          ("pipeline.tune", "--space")])
@pytest.mark.slow
def test_a_bad_study_or_search_file_is_reported_before_any_store_exists(kaggle_csv, tmp_path,
                                                                        module, flag):
    bad = tmp_path / "bad.yaml"
    bad.write_text("reference: basic\n  seeds: [3\n")
    stores = tmp_path / "stores"
    r = subprocess.run([sys.executable, "-m", module, "--data", str(kaggle_csv), flag, str(bad),
                        "--profile", "smoke", "--storage", f"sqlite:///{stores / 'study.db'}"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{stores / 'm.db'}"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{bad}: not valid YAML at line 2, column " in r.stderr
    assert not stores.exists()  # neither the tracking store nor the study's was created


def _with_seeds(tmp_path: Path, where: str, value) -> Path:
    d = yaml.safe_load((ROOT / "ablations/study.yaml").read_text())
    (d if where == "file" else d["profiles"]["smoke"])["seeds"] = value
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _seeds_refusal(p: Path, where: str, shown: str) -> str:
    return (f"{p}{' profile smoke' if where == 'profile' else ''}: seeds: expected a whole "
            f"number from 1 to 2147483647, got {shown}.")


@pytest.mark.parametrize("where", ["file", "profile"])
@pytest.mark.parametrize("value, shown", [("three", "'three'"), (2.5, "2.5"), (0, "0"),
                                          (-1, "-1"), (True, "true"), (".nan", "'.nan'")])
def test_a_seed_count_that_is_not_a_whole_number_1_or_more_is_refused(tmp_path, where, value,
                                                                       shown):
    """`seeds: three` was a traceback under quick and ignored under smoke (its profile's seeds
    won); `seeds: 2.5` was cut to 2."""
    p = _with_seeds(tmp_path, where, value)
    with pytest.raises(UsageError) as e:
        load_study(p, "smoke")
    assert str(e.value) == _seeds_refusal(p, where, shown)


def test_seeds_written_without_a_value_are_not_given_and_the_next_level_decides(tmp_path):
    assert load_study(_with_seeds(tmp_path, "profile", None), "smoke").seeds == 3  # the file's
    assert load_study(_with_seeds(tmp_path, "file", None), "smoke").seeds == 2  # the profile's
    assert load_study(_with_seeds(tmp_path, "file", "4.0"), "quick").seeds == 4  # text or not


@pytest.mark.parametrize("where, value, shown, profile", [("file", "three", "'three'", "quick"),
                                                           ("profile", 2.5, "2.5", "smoke")])
@pytest.mark.slow
def test_a_bad_seed_count_is_one_line_before_any_store_exists(kaggle_csv, tmp_path, where,
                                                               value, shown, profile):
    p = _with_seeds(tmp_path, where, value)
    stores = tmp_path / "stores"
    r = run_cli("pipeline.ablate", "--data", str(kaggle_csv), "--study", str(p), "--profile",
                profile, "--storage", f"sqlite:///{stores / 'a.db'}",
                env={"MLFLOW_TRACKING_URI": f"sqlite:///{stores / 'm.db'}"})
    assert r.returncode == 2, r.stdout[-1000:] + r.stderr[-1000:]
    assert r.stderr.strip().splitlines() == [f"error: {_seeds_refusal(p, where, shown)}"]
    assert not stores.exists()


@pytest.mark.parametrize("value", ["0", "2.5"])
@pytest.mark.slow
def test_seeds_on_the_command_line_must_be_1_or_more(kaggle_csv, tmp_path, value):
    """`--seeds 0` used to mean "the profile's seeds": hours of unasked-for training under
    full. It is refused before any store exists."""
    r = run_cli("pipeline.ablate", "--data", str(kaggle_csv), "--profile", "smoke",
                "--seeds", value, "--storage", f"sqlite:///{tmp_path / 's' / 'a.db'}",
                env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 's' / 'm.db'}"})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: argument --seeds: expected a whole number from 1 to 2147483647, got {value!r} "
        f"(see python -m pipeline.ablate --help)"]
    assert not (tmp_path / "s").exists()


def test_seeds_left_empty_mean_the_study_s_own_and_a_given_count_wins(tmp_path):
    from pipeline.ablate import seed_count

    assert seed_count("") is None and seed_count(" ") is None  # `mlflow run`'s default
    assert seed_count("2") == 2 and seed_count("4.0") == 4
    assert load_study(ROOT / "ablations/study.yaml", "smoke").seeds == 2  # the profile's
    assert load_study(ROOT / "ablations/study.yaml", "smoke", seeds=1).seeds == 1


@pytest.mark.slow
def test_a_stop_while_the_study_measures_this_machine_leaves_every_unit_waiting(kaggle_csv,
                                                                               tmp_path):
    """At full width the start's measurement of each network takes seconds on a CPU. A stop
    there used to leave the unit already claimed RUNNING until its heartbeat went stale (then a
    FAIL row and a retried copy); the measurement now comes before any claim."""
    p = start_cli("pipeline.ablate", "--data", kaggle_csv, "--profile", "full", "--storage",
                  "sqlite:///q.db", "--concurrent", "1", cwd=tmp_path)
    seen = []
    for line in p.stdout:
        seen.append(line)
        if "(created)" in line:
            break
    p.send_signal(signal.SIGTERM)
    out = "".join(seen) + p.communicate(timeout=300)[0]
    assert p.returncode == 130, out[-2000:]
    assert "runs to train" not in out  # the stop landed in the measurement
    name = re.search(r"study (\S+): ", out).group(1)
    st = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'q.db'}")
    assert {t.state for t in st.trials} == {optuna.trial.TrialState.WAITING}
    assert len(st.trials) == 75


def test_the_report_logs_p_to_3_significant_digits_and_answers_first(tmp_path):
    from pipeline import findings, report

    pair = findings.Pair("tta (on improved)", "improved", "improved", "test_acc_tta", "test_acc")
    e = findings.Effect(pair, {0: 0.70, 1: 0.71, 2: 0.69}, {0: 0.68, 1: 0.70, 2: 0.68},
                        mean=0.0133, lo=0.0051, hi=0.0216, p=0.012584798254389046,
                        detectable=0.01, p_holm=0.037754394763167138)
    r = report.StudyReport("s", [e], [], [], "cpu", None)
    exp = mlflow.create_experiment("p-digits")
    with mlflow.start_run(experiment_id=exp) as run:
        pass
    report.publish(run.info.run_id, tmp_path, r, "the report\n", {"forest.png": None})
    got = mlflow.get_run(run.info.run_id).data.metrics
    assert got["effect_tta_on_improved/p"] == 0.0126
    assert got["effect_tta_on_improved/p_holm"] == 0.0378
    assert got["effect_tta_on_improved/test_points"] == 1.33
    note = mlflow.get_run(run.info.run_id).data.tags["mlflow.note.content"]
    assert note.index("| tta (on improved) | +1.33 [+0.51, +2.16] | 0.038 |") < \
        note.index("the report")
    assert "get-artifact" not in note  # no plot logged, none shown
    answer = mlflow.get_experiment(exp).tags["mlflow.note.content"]
    assert answer.startswith("**The answer** (1 effect(s); 0 run(s) missing): Resolved after "
                             "Holm's adjustment: tta (on improved) +1.33 [+0.51, +2.16] points "
                             "(Holm p 0.038).")
    # A rebuilt report replaces its line rather than stacking another above it.
    report.publish(run.info.run_id, tmp_path, r, "the report\n", {"forest.png": None})
    assert mlflow.get_experiment(exp).tags["mlflow.note.content"].count("**The answer**") == 1


@pytest.mark.slow
def test_a_bug_in_training_leaves_tracebacks_on_the_runs_and_three_stop_the_worker(
        kaggle_csv, tmp_path, monkeypatch, capsys):
    from pipeline import ablate, train
    from pipeline.cli import run_main

    study = mini_study(tmp_path)
    args = ["--data", str(kaggle_csv), "--study", str(study), "--profile", "smoke",
            "--storage", "sqlite:///q.db", "--report-dir", str(tmp_path / "rep")]

    def deliberate(*a, **k):
        raise KeyError("deliberate")

    with monkeypatch.context() as m:
        m.setattr(train, "final_scores", deliberate)  # after each run's epochs, inside its run
        with pytest.raises(SystemExit) as stop:
            run_main(ablate.main, args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    last = err.rstrip().splitlines()[-1]
    assert last.startswith("error: 3 units of study 'ablate-mini-smoke-") and \
        "failed with the same unexpected error, KeyError: 'deliberate': a bug" in last
    assert err.count("Traceback (most recent call last)") == 3  # each in the log
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="tags.cell != ''")
    assert runs and all(r.info.status == "FAILED" for r in runs)
    for r in runs:
        tb = mlflow.artifacts.load_text(f"runs:/{r.info.run_id}/traceback.txt")
        assert "in deliberate" in tb and "KeyError: 'deliberate'" in tb
    # Fixed, the same command continues the study: every unit trains, none is lost as failed.
    with pytest.raises(SystemExit) as done:
        run_main(ablate.main, args)
    assert done.value.code == 0
    name = last.split("'")[1]
    st = optuna.load_study(study_name=name, storage="sqlite:///q.db")
    assert sorted(t.state.name for t in lifecycle.settled(st)) == ["COMPLETE"] * 4


class RoomForTwo:
    """A deadline with room for two units: ample until two have finished, none after. It
    follows the study's finished runs (an event), not the clock, so the split between trained
    and left is the same on any machine."""

    source = "--time-limit 1h"

    def left(self) -> float:
        done = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string="tags.cell != '' and "
                                                "attributes.status = 'FINISHED'")
        return 1e6 if len(done) < 2 else 0.0

    def said(self) -> str:
        return self.source


@pytest.mark.slow
def test_a_time_limit_starts_only_what_fits_leaves_nothing_running_and_says_how_to_go_on(
        kaggle_csv, tmp_path, monkeypatch, capsys):
    from pipeline import ablate
    from pipeline.cli import run_main

    study = mini_study(tmp_path)
    args = ["--data", str(kaggle_csv), "--study", str(study), "--profile", "smoke",
            "--storage", "sqlite:///q.db", "--report-dir", str(tmp_path / "rep"),
            "--time-limit", "1h"]
    with monkeypatch.context() as m:
        m.setattr(lifecycle, "deadline", lambda limit, started: RoomForTwo())
        with pytest.raises(SystemExit) as stop:
            run_main(ablate.main, args)
    assert stop.value.code == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "came before the whole study" in x)
    assert "2 of 4 runs finished (2 by this command); 2 left unstarted" in line
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="tags.cell != ''")
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 2  # none KILLED or RUNNING
    name = re.search(r"study (\S+): --time-limit", line).group(1)
    st = optuna.load_study(study_name=name, storage="sqlite:///q.db")
    assert sorted(t.state.name for t in st.trials) == ["COMPLETE"] * 2 + ["WAITING"] * 2
    command = re.search(r"Continue the study with `([^`]+)`", line).group(1)
    assert command.startswith("python -m pipeline.ablate ")
    with pytest.raises(SystemExit) as done:  # the printed command, without the stand-in
        run_main(ablate.main, shlex.split(command)[3:])
    assert done.value.code == 0
    assert sorted(t.state.name for t in lifecycle.settled(st)) == ["COMPLETE"] * 4
    assert "| batchnorm (added to reference) | 2 |" in capsys.readouterr().out


def test_a_deadline_is_the_time_limit_or_the_slurm_job_s_end_whichever_comes_first():
    assert lifecycle.deadline(None, 1000.0, {}) is None
    assert lifecycle.deadline(90.0, 1000.0, {}).at == 1090.0
    slurm = {"SLURM_JOB_END_TIME": "1050"}
    assert lifecycle.deadline(None, 1000.0, slurm).source == "the SLURM job's end"
    assert lifecycle.deadline(90.0, 1000.0, slurm).at == 1050.0
    assert lifecycle.deadline(30.0, 1000.0, slurm).at == 1030.0
    assert lifecycle.deadline(None, 1000.0, {"SLURM_JOB_END_TIME": "0"}) is None  # no limit
    for bad in ("soon", "inf", "nan"):
        with pytest.raises(UsageError, match=f"SLURM_JOB_END_TIME is '{bad}': expected"):
            lifecycle.deadline(None, 1000.0, {"SLURM_JOB_END_TIME": bad})
