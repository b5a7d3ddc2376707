"""Training runs end to end: every stage, resume, NaN handling, the logged model, evaluate."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import mlflow
import numpy as np
import pytest
import torch

from pipeline import data as fer
from pipeline.config import STAGES, build
from pipeline.evaluate import run_evaluate
from pipeline.cli import UsageError
from pipeline.errors import TrainingError
from pipeline.train import train
from tests.conftest import ROOT, TINY, csv_text, make_faces, run_cli, start_cli

# The whole train split (the resume and TTA tests compare epoch by epoch); resume is bit-exact
# on a CPU.
TRAIN = {**TINY, "data_fraction": 1.0, "device": "cpu"}


def stage_cfg(stage: str, **over):
    return build(ROOT / "ablations/stages" / f"{stage}.yaml", {**TRAIN, **over})


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.slow
def test_one_epoch_of_every_stage(stage, kaggle_csv):
    data = fer.load(kaggle_csv)
    out = train(stage_cfg(stage), data, log_model=stage == "improved")
    run = mlflow.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    for key in ("val_acc", "val_acc_tta", "test_acc", "test_acc_tta", "macro_f1",
                "f1_happy", "train_seconds", "train_img_per_s", "eval_img_per_s"):
        assert key in m, key
    preds = mlflow.artifacts.download_artifacts(run_id=out.run_id,
                                                artifact_path="predictions.npz")
    with np.load(preds) as z:  # the final figures are those of the per-image predictions
        assert m["val_acc"] == pytest.approx(float((z["val"] == z["val_labels"]).mean()))
        assert m["test_acc_tta"] == pytest.approx(float((z["test_tta"] ==
                                                          z["test_labels"]).mean()))
    assert run.data.tags["stage"] == stage and "batchnorm=" in run.data.tags["toggles"]
    hist = mlflow.MlflowClient().get_metric_history(out.run_id, "val/acc")
    assert [h.step for h in hist] == [1]  # epochs count from 1, as best_epoch does
    assert m["best_epoch"] == 1
    arts = {f.path for f in mlflow.MlflowClient().list_artifacts(out.run_id)}
    assert {"config.yaml", "learning_curves.png", "confusion_matrix.png",
            "classification_report.txt", "misclassified.png", "predictions.npz"} <= arts


@pytest.mark.slow
def test_params_have_the_same_keys_in_every_run(kaggle_csv):
    data = fer.load(kaggle_csv)
    a = train(stage_cfg("basic"), data, log_model=False)
    b = train(stage_cfg("resnet"), data, log_model=False)
    pa, pb = (mlflow.get_run(r.run_id).data.params for r in (a, b))
    assert set(pa) == set(pb) and pa["stage"] != pb["stage"]


@pytest.mark.slow
def test_interrupted_run_resumes_to_identical_metrics(kaggle_csv):
    data = fer.load(kaggle_csv)
    cfg = stage_cfg("advanced", epochs=3)  # plateau scheduler, augmentation, dropout
    whole = train(cfg, data, log_model=False)
    part = train(cfg, data, log_model=False, max_epochs=1)
    assert part.state == "interrupted" and part.epochs_run == 1
    # Stopped early: KILLED, never FINISHED, so no worker or report takes it for done.
    assert mlflow.get_run(part.run_id).info.status == "KILLED"
    resumed = train(cfg, data, log_model=False, resume_run_id=part.run_id)
    assert resumed.run_id == part.run_id
    for k in ("val_acc", "val_acc_tta", "test_acc", "test_acc_tta", "macro_f1"):
        assert resumed.metrics[k] == pytest.approx(whole.metrics[k], abs=0), k
    client = mlflow.MlflowClient()
    h1 = [m.value for m in client.get_metric_history(whole.run_id, "train/loss")]
    h2 = [m.value for m in client.get_metric_history(part.run_id, "train/loss")]
    assert h1 == h2 and len(h1) == 3
    assert mlflow.get_run(part.run_id).info.status == "FINISHED"
    with pytest.raises(UsageError, match="that run is FINISHED"):
        train(cfg, data, log_model=False, resume_run_id=part.run_id)
    assert len(client.get_metric_history(part.run_id, "train/loss")) == 3  # untouched
    with pytest.raises(UsageError, match="no such run"):
        train(cfg, data, log_model=False, resume_run_id="0123456789abcdef0123456789abcdef")


@pytest.mark.slow
def test_a_run_stopped_in_its_final_scoring_resumes_to_its_scores_and_says_so(kaggle_csv,
                                                                             monkeypatch,
                                                                             capsys):
    """It used to say `resuming run ... at epoch 3/2`."""
    import pipeline.train as train_module

    data = fer.load(kaggle_csv)
    cfg = stage_cfg("basic", epochs=2)
    real = train_module.final_scores

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "final_scores", stopped)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, data, log_model=False)
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "KILLED" and run.data.tags["failure"].startswith("stopped")
    monkeypatch.setattr(train_module, "final_scores", real)
    capsys.readouterr()
    out = train(cfg, data, log_model=False, resume_run_id=run.info.run_id)
    said = capsys.readouterr().out
    assert f"resuming run {run.info.run_id} after its last epoch (2/2): its final scores" in said
    assert "epoch 3/2" not in said
    assert out.state == "complete" and out.epochs_run == 2 and "test_acc" in out.metrics
    assert "failure" not in mlflow.get_run(run.info.run_id).data.tags


def test_unwritable_checkpoint_folder_fails_before_training(kaggle_csv, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the checkpoint folder should be")
    monkeypatch.setenv("FER_CHECKPOINT_DIR", str(blocker / "ckpt"))
    with pytest.raises(UsageError, match="FER_CHECKPOINT_DIR"):
        train(stage_cfg("basic"), fer.load(kaggle_csv), log_model=False)
    assert len(mlflow.search_runs(search_all_experiments=True)) == 0  # no run was started


def test_resume_refuses_other_data(kaggle_csv, tmp_path):
    data = fer.load(kaggle_csv)
    cfg = stage_cfg("basic", epochs=2)
    part = train(cfg, data, log_model=False, max_epochs=1)
    other = tmp_path / "other.csv"
    other.write_text(csv_text(*make_faces(seed=1)))
    with pytest.raises(fer.DataError, match="trained on other data"):
        train(cfg, fer.load(other), log_model=False, resume_run_id=part.run_id)
    assert mlflow.get_run(part.run_id).info.status == "KILLED"  # left as it was


@pytest.mark.slow
def test_non_finite_loss_fails_the_run_with_a_message(kaggle_csv):
    r = run_cli("pipeline.train", "--config", str(ROOT / "ablations/stages/basic.yaml"),
                "--data", str(kaggle_csv), "--set", "lr=1e30 epochs=2 width=0.125")
    assert r.returncode == 2, r.stderr[-1500:]
    assert "loss became" in r.stderr and "Traceback" not in r.stderr
    runs = mlflow.search_runs(search_all_experiments=True)
    assert list(runs["status"]) == ["FAILED"]


@pytest.mark.slow
def test_cli_json_logged_model_and_evaluate(kaggle_csv, tmp_path):
    r = run_cli("pipeline.train", "--config", str(ROOT / "ablations/stages/improved.yaml"),
                "--data", str(kaggle_csv), "--set", "epochs=1 width=0.125")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out) >= {"run_id", "model_uri", "val_acc", "test_acc"}
    # The run's name says what the command line changed.
    assert mlflow.get_run(out["run_id"]).info.run_name == "improved s0 epochs=1 width=0.125"

    model = mlflow.pyfunc.load_model(out["model_uri"])
    batch = np.random.default_rng(0).integers(0, 256, (3, 48, 48)).astype(np.uint8)
    pred = model.predict(batch)  # raw uint8 pixels, as a user has them
    probs = pred[list(fer.EMOTIONS)].to_numpy()
    assert probs.shape == (3, 7) and np.allclose(probs.sum(1), 1, atol=1e-4)
    assert set(pred["label"]) <= set(fer.EMOTIONS)
    # The model is named after its stage, and its page shows the run's final figures, tied to
    # the data set, not the per-epoch curves.
    logged = mlflow.get_logged_model(out["model_uri"].split("/")[-1])
    assert logged.name == "improved" and logged.source_run_id == out["run_id"]
    by_key = {m.key: m for m in logged.metrics}
    assert by_key["test_acc"].value == pytest.approx(out["test_acc"])
    assert by_key["val_acc"].value == pytest.approx(out["val_acc"])
    assert by_key["test_acc"].dataset_name == kaggle_csv.name
    assert not any("/" in k for k in by_key)
    assert mlflow.get_run(out["run_id"]).data.tags["model_uri"] == out["model_uri"]

    # A file with a Usage of its own and only two of the seven classes.
    images, labels, usage = make_faces({"Clinic": 4}, seed=3, classes=[0, 3])
    p = tmp_path / "clinic.csv"
    p.write_text(csv_text(images, labels, usage))
    preds = tmp_path / "preds.csv"
    r = run_cli("pipeline.evaluate", "--model-uri", out["model_uri"], "--data", str(p),
                "--usage", "Clinic", "--tta", "--json", "--predictions", str(preds))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["usage"] == "Clinic" and res["n"] == 8
    assert res["per_class"]["disgust"]["support"] == 0 and res["per_class"]["happy"]["support"] == 4
    assert np.isfinite(res["macro_f1"])
    import pandas as pd

    table = pd.read_csv(preds)
    assert len(table) == 8 and {"index", "label", "predicted", "p_neutral"} <= set(table.columns)
    assert np.allclose(table.filter(like="p_").sum(axis=1), 1, atol=1e-4)

    missing = run_cli("pipeline.evaluate", "--model-uri", out["model_uri"], "--data", str(p),
                      "--usage", "PrivateTest")
    assert missing.returncode == 2
    assert "no rows with Usage 'PrivateTest'" in " ".join(missing.stderr.split())


@pytest.mark.slow
def test_evaluate_matches_training_test_accuracy_and_macro_f1(tmp_path):
    """One macro-F1: over the classes the scored labels hold. PublicTest here lacks class 3,
    so averaging all seven labels (an absent class counted as 0) would disagree."""
    images, labels, usage = make_faces()
    keep = ~((usage == "PublicTest") & (labels == 3))
    p = tmp_path / "no_happy_in_test.csv"
    p.write_text(csv_text(images[keep], labels[keep], usage[keep]))
    data = fer.load(p)
    out = train(stage_cfg("basic"), data)
    res = run_evaluate(out.model_uri, str(p), "PublicTest", tta=False)
    assert res["accuracy"] == pytest.approx(out.metrics["test_acc"], abs=1e-6)
    assert res["macro_f1"] == pytest.approx(out.metrics["macro_f1"], abs=1e-9)
    f1 = [v["f1"] for e, v in res["per_class"].items() if e != "happy"]
    assert out.metrics["macro_f1"] == pytest.approx(float(np.mean(f1)), abs=1e-9)
    # One rule for the absent class in both: no F1, none logged (evaluate once logged a 0).
    assert res["per_class"]["happy"] == {"precision": res["per_class"]["happy"]["precision"],
                                         "recall": None, "f1": None, "support": 0}
    assert "f1_happy" not in mlflow.get_run(out.run_id).data.metrics
    evaluated = mlflow.search_runs(filter_string="tags.stage = 'evaluate'", output_format="list",
                                   search_all_experiments=True)
    logged = evaluated[0].data.metrics
    assert "f1_happy" not in logged and logged["f1_angry"] == pytest.approx(
        res["per_class"]["angry"]["f1"])


@pytest.mark.slow
def test_a_tta_run_selects_plateaus_and_stops_on_tta_val(kaggle_csv, monkeypatch):
    """The study validated its improved net with TTA: the epoch kept, the plateau's metric and
    early stopping follow TTA val accuracy. Scripted val figures make plain and TTA val
    disagree on the best epoch."""
    import pipeline.train as train_mod

    plain = [0.50, 0.10, 0.10, 0.10]
    tta_acc = [0.10, 0.20, 0.60, 0.30]
    real = train_mod.evaluate_split
    calls = []

    def scripted(model, images, labels, rt, tta=False):
        out = real(model, images, labels, rt, tta)
        i = len(calls)
        calls.append(tta)
        return replace(out, acc=plain[i],
                       tta=replace(out.tta, acc=tta_acc[i]) if tta else None)

    monkeypatch.setattr(train_mod, "evaluate_split", scripted)
    data = fer.load(kaggle_csv)
    client = mlflow.MlflowClient()
    # plateau_patience 0: the lr halves after every epoch that does not improve the metric.
    for use_tta, best, lrs in ((True, 3, [1e-3] * 4), (False, 1, [1e-3, 1e-3, 5e-4, 2.5e-4])):
        calls.clear()
        cfg = stage_cfg("advanced", epochs=4, tta=use_tta, early_stopping=0, plateau_patience=0)
        out = train(cfg, data, log_model=False)
        assert calls == [use_tta] * 4
        m = mlflow.get_run(out.run_id).data.metrics
        assert m["best_epoch"] == best, use_tta
        assert [h.value for h in client.get_metric_history(out.run_id, "lr")] == \
            pytest.approx(lrs)
        hist = client.get_metric_history(out.run_id, "val/acc_tta")
        assert [h.value for h in hist] == (tta_acc if use_tta else [])
    # Early stopping with patience 1: TTA val improves until epoch 3, so all 4 epochs run (on
    # plain val, epoch 2 would have been the first bad one and the run would stop there).
    calls.clear()
    out = train(stage_cfg("advanced", epochs=4, tta=True, early_stopping=1), data,
                log_model=False)
    assert out.epochs_run == 4
    assert mlflow.get_run(out.run_id).data.metrics["best_epoch"] == 3


@pytest.mark.slow
def test_train_acc_is_the_clean_accuracy_of_the_selected_model(kaggle_csv):
    """Not the last epoch's running figure under augmentation and dropout: the kept model,
    scored on its train split in eval mode, as served."""
    from pipeline import serving
    from pipeline.split import make_split, subsample

    data = fer.load(kaggle_csv)
    cfg = stage_cfg("advanced", epochs=2, data_fraction=0.5, seed=1)
    out = train(cfg, data)
    m = mlflow.get_run(out.run_id).data.metrics
    split = make_split(data, cfg.val_fraction, cfg.split_seed)
    rows = subsample(split.train, data.labels, cfg.data_fraction, cfg.seed)
    probs = serving.load(out.model_uri).probs(data.images[rows], False)
    assert m["train_acc"] == pytest.approx(float((probs.argmax(1) == data.labels[rows]).mean()),
                                           abs=1.5 / len(rows))
    counts = np.bincount(data.labels[rows], minlength=7)
    assert m["majority_rate"] == pytest.approx(counts.max() / counts.sum())


@pytest.mark.slow
def test_sigterm_ends_the_run_killed_with_its_checkpoint(kaggle_csv, tmp_path):
    import signal

    p = start_cli("pipeline.train", "--config", ROOT / "ablations/stages/basic.yaml", "--data",
                  kaggle_csv, "--set", "epochs=200 width=0.125 batch_size=16 checkpoint_every_s=0",
                  merge=False)
    for line in p.stdout:  # the event: an epoch finished, so a checkpoint exists
        if "epoch 2/200:" in line:
            break
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    run_id = re.search(r"run ([0-9a-f]{32}) is KILLED", err).group(1)
    # The hint is the real command: the real config and data paths, the same overrides.
    hint = re.search(r"continue it with `([^`]+)`", err).group(1)
    assert hint == (f"python -m pipeline.train --config {ROOT / 'ablations/stages/basic.yaml'} "
                    f"--data {kaggle_csv} --set 'epochs=200 width=0.125 batch_size=16 "
                    f"checkpoint_every_s=0' --resume {run_id}")
    kept = int(re.search(r"its checkpoint after epoch (\d+) is kept", err).group(1))
    assert mlflow.get_run(run_id).info.status == "KILLED"
    saved = torch.load(tmp_path / "checkpoints" / f"{run_id}.pt", weights_only=False)
    assert saved["epoch"] + 1 == kept >= 1  # what it says it kept, it kept


class _Planted:
    """An object whose unpickling runs code: what a file planted in a checkpoint folder holds."""

    def __reduce__(self):
        import os

        return (os.system, ("touch planted-code-ran",))


def test_a_checkpoint_holding_code_is_refused_and_its_code_never_runs(tmp_path, monkeypatch):
    from pipeline.config import Config
    from pipeline.train import Checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FER_CHECKPOINT_DIR", str(tmp_path / "ck"))
    ck = Checkpoint("0" * 32)
    ck.path.parent.mkdir()
    torch.save({"config": {}, "epoch": 0, "x": _Planted()}, ck.path)
    with pytest.raises(TrainingError, match=r"not a checkpoint this pipeline writes"):
        ck.load(Config(), None)
    assert not (tmp_path / "planted-code-ran").exists()


def test_a_checkpoint_write_never_follows_a_link_planted_beside_it(tmp_path, monkeypatch):
    from pipeline.config import Config
    from pipeline.train import Checkpoint

    monkeypatch.setenv("FER_CHECKPOINT_DIR", str(tmp_path / "ck"))
    ck = Checkpoint("1" * 32)
    ck.path.parent.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    for name in (ck.path.with_suffix(".tmp"), ck.path.parent / f".{ck.path.stem}.tmp"):
        name.symlink_to(victim)

    class Data:
        digest = "d"

    ck.save({"epoch": 0, "w": torch.ones(2)}, Config(), Data())
    assert victim.read_text() == "mine"
    assert torch.load(ck.path, weights_only=True)["epoch"] == 0


@pytest.mark.slow
def test_the_mlproject_passes_each_value_as_one_word_and_runs_none_of_it(kaggle_csv, tmp_path):
    """MLflow quotes every parameter for the shell itself: a value the MLproject quoted again
    would come out unquoted, run what it holds and split at its spaces."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    base = [str(bindir / "mlflow"), "run", str(ROOT), "-e", "train", "--env-manager", "local",
            "-P", f"data={kaggle_csv}"]
    planted = [ROOT / "injected-by-a-parameter", tmp_path / "injected-by-a-parameter"]
    r = subprocess.run(base + ["-P", "set=epochs=1 x$(touch injected-by-a-parameter)"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    try:
        assert not any(p.exists() for p in planted)
    finally:
        for p in planted:
            p.unlink(missing_ok=True)
    assert r.returncode != 0 and "expected key=value" in r.stderr, r.stderr[-2000:]
    r = subprocess.run(base + ["-P", "set=epochs=1 width=0.125 data_fraction=0.5 batch_size=16 "
                                     "tta=false"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    run_id = json.loads(r.stdout.strip().splitlines()[-1])["run_id"]
    params = mlflow.get_run(run_id).data.params
    assert (params["epochs"], params["width"], params["batch_size"]) == ("1", "0.125", "16")


def test_runs_starting_together_in_one_process_each_find_the_checkpoint_folder_writable(
        tmp_path, monkeypatch):
    """Units start side by side in one process (slots): each checks the folder at its start,
    and none may take another's probe for its own (one failed as "not writable")."""
    import threading

    from pipeline.train import check_checkpoint_dir

    monkeypatch.setenv("FER_CHECKPOINT_DIR", str(tmp_path / "ck"))
    together, errors = threading.Barrier(4), []

    def start_units() -> None:
        together.wait()
        for _ in range(300):
            try:
                check_checkpoint_dir()
            except Exception as e:  # noqa: BLE001 (recorded, asserted below)
                errors.append(e)
                return

    threads = [threading.Thread(target=start_units) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert not list((tmp_path / "ck").iterdir())  # no probe left behind
