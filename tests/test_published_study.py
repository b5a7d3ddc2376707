"""The corrected full study's stores, committed so that the next GPU lease resumes them: they
open, hold the runs the README names, and are still the study this code would continue."""

from __future__ import annotations

import shutil

import mlflow
import optuna
from optuna.trial import TrialState

from pipeline.plan import fingerprint, load_study
from tests.conftest import ROOT

STORE = ROOT / "docs" / "ablation-full" / "store"
NAME = "ablate-study-full-5ca2fb-f36d0e"


def test_the_committed_study_opens_and_this_code_would_resume_it(tmp_path):
    for f in ("mlflow.db", "ablate.db"):  # copies: opening a store may migrate it
        shutil.copy(STORE / f, tmp_path / f)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.study = '{NAME}' and "
                                            f"attributes.status = 'FINISHED'")
    done = sorted((r.data.tags["cell"], int(r.data.tags["seed"])) for r in runs
                  if "cell" in r.data.tags)
    stages = ("basic", "batchnorm", "resnet", "advanced")
    assert done == sorted([(c, s) for c in stages for s in range(5)] + [("improved", 0)])
    assert all({"val_acc", "test_acc", "test_acc_tta", "train_acc"} <= set(r.data.metrics)
               for r in runs if "cell" in r.data.tags)
    st = optuna.load_study(study_name=NAME, storage=f"sqlite:///{tmp_path / 'ablate.db'}")
    # The same cells, seeds, budget and protocol as this code's full profile: resumable.
    s = load_study(ROOT / "ablations" / "study.yaml", "full")
    assert st.user_attrs["fingerprint"] == fingerprint(s)
    queued = {(t.user_attrs["cell"], t.user_attrs["seed"]) for t in st.trials}
    assert queued == {(c.name, sd) for c in s.cells for sd in range(s.seeds)}
    complete = {(t.user_attrs["cell"], t.user_attrs["seed"]) for t in st.trials
                if t.state == TrialState.COMPLETE}
    assert complete == set(done)
    assert mlflow.get_run(st.user_attrs["parent_run_id"]).data.tags["study"] == NAME
