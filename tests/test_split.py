"""The split: sizes, stratification, determinism, holdout, and the MLflow run it logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from pipeline import data as fer
from pipeline.split import make_split, run_split
from tests.conftest import COUNTS, ROOT, csv_text, make_faces, run_cli


def test_sizes_stratification_and_holdout(kaggle_csv):
    d = fer.load(kaggle_csv)
    s = make_split(d, val_fraction=0.2, seed=0)
    n_train = COUNTS["Training"]
    # round(10 * 0.2) = 2 val per class, 8 train per class
    assert np.bincount(d.labels[s.val], minlength=7).tolist() == [2] * 7
    assert np.bincount(d.labels[s.train], minlength=7).tolist() == [n_train - 2] * 7
    assert len(s.test) == 7 * COUNTS["PublicTest"] and (d.usage[s.test] == "PublicTest").all()
    assert len(s.holdout) == 7 * COUNTS["PrivateTest"]
    assert (d.usage[s.holdout] == "PrivateTest").all()
    parts = [set(p.tolist()) for p in s.parts().values()]
    assert sum(map(len, parts)) == len(d) and len(set().union(*parts)) == len(d)


def test_deterministic_and_seed_dependent(kaggle_csv):
    d = fer.load(kaggle_csv)
    a, b = make_split(d, 0.2, 5), make_split(d, 0.2, 5)
    np.testing.assert_array_equal(a.val, b.val)
    c = make_split(d, 0.2, 6)
    assert not np.array_equal(a.val, c.val)
    # A literal: numpy's PCG64 stream is the same on every machine, so a split that changes
    # (another shuffle, another stratification order) breaks every earlier study's pairing.
    assert a.val[:4].tolist() == [6, 7, 16, 19]


def test_file_without_public_test_still_splits(tmp_path):
    p = tmp_path / "train_only.csv"
    p.write_text(csv_text(*make_faces({"Training": 5})))
    s = make_split(fer.load(p))
    assert len(s.test) == 0 and len(s.holdout) == 0 and len(s.val) == 7


def test_unknown_usage_is_refused_for_split(tmp_path):
    images, labels, usage = make_faces({"Training": 3})
    usage = usage.astype(object)
    usage[4] = "Validation"
    p = tmp_path / "odd.csv"
    p.write_text(csv_text(images, labels, usage))
    with pytest.raises(fer.DataError, match="line 6: unknown Usage 'Validation'"):
        make_split(fer.load(p))


@pytest.mark.slow
def test_split_run_contents(kaggle_gz):
    out = run_split(str(kaggle_gz), 0.2, 3)
    run = mlflow.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["seed"] == "3" and run.data.params["val_fraction"] == "0.2"
    assert run.data.params["source"] == str(kaggle_gz)
    assert run.data.params["n_val"] == "14" and run.data.params["n_holdout"] == "14"
    assert set(run.data.metrics) == {"load_seconds"}  # counts stay out of the metric space
    table = json.loads(mlflow.artifacts.load_text(
        f"runs:/{run.info.run_id}/split/class_counts_table.json"))
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert {"split": "train", "emotion": "happy", "images": 8} in rows
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == fer.load(kaggle_gz).digest[-32:]
    arts = {f.path for f in mlflow.MlflowClient().list_artifacts(run.info.run_id, "split")}
    assert {"split/split_indices.npz", "split/class_counts.json",
            "split/class_distribution.png", "split/sample_faces.png"} <= arts
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                artifact_path="split/split_indices.npz")
    with np.load(local) as z:
        s = make_split(fer.load(kaggle_gz), 0.2, 3)
        np.testing.assert_array_equal(z["val"], s.val)


@pytest.mark.slow
def test_bad_data_leaves_no_run(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("emotion,pixels,Usage\n3,1 2 3,Training\n")
    r = run_cli("pipeline.split", "--data", str(p))
    assert r.returncode == 2 and "3 pixel values" in r.stderr
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 0 or (runs["status"] != "RUNNING").all()


@pytest.mark.slow
def test_mlflow_run_split_entry_point(kaggle_csv, tmp_path):
    """`mlflow run . -e split --env-manager local` from the project's environment."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    r = subprocess.run([mlflow_bin, "run", str(ROOT), "-e", "split", "--env-manager", "local",
                        "-P", f"data={kaggle_csv}", "-P", "seed=1"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    line = [l for l in r.stdout.splitlines() if l.startswith("{")][-1]
    out = json.loads(line)
    assert out["val"] == 14 and out["test"] == 21
    assert mlflow.get_run(out["run_id"]).info.status == "FINISHED"


@pytest.mark.realdata
def test_split_real_dev_file(dev_data):
    d = fer.load(dev_data)
    s = make_split(d)
    per_class = np.bincount(d.labels[d.rows("Training")], minlength=7)
    expected_val = [int(round(n * 0.2)) for n in per_class]
    assert np.bincount(d.labels[s.val], minlength=7).tolist() == expected_val
    assert len(s.train) + len(s.val) == 28709 and len(s.test) == 3589 and len(s.holdout) == 0
