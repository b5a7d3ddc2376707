"""--budget: a reduced study sized to the minutes given, on the machine that runs it."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import yaml

from pipeline import sizing
from pipeline.plan import load_study
from pipeline.errors import UsageError
from tests.conftest import TINY, ablate_study

BOUNDS = sizing.Bounds(minutes=10, data_fraction=(0.2, 0.4), epochs=(1, 4))


def test_the_path_gives_up_the_share_before_an_epoch_and_takes_the_whole_split_before_one():
    # Written out by hand: at the share's floor the epochs up to the profile's own (2), then
    # the share up to its ceiling, then the epochs up to theirs.
    assert sizing.path(BOUNDS, own_epochs=2) == [
        (0.2, 1), (0.2, 2), (0.25, 2), (0.3, 2), (0.35, 2), (0.4, 2), (0.4, 3), (0.4, 4)]


def test_the_largest_size_that_fits_is_chosen_and_the_floor_when_none_does():
    def cost(df: float, epochs: int) -> float:  # a study whose seconds are images seen
        return 1000 * df * epochs

    # 10 min = 600 s: (0.3, 2) costs 600 and fits; (0.35, 2) costs 700 and does not.
    got = sizing.choose(cost, BOUNDS, 2, 10, "here")
    assert (got.data_fraction, got.epochs, got.predicted_s, got.floor_s) == (0.3, 2, 600, 200)
    assert got.fits
    big = sizing.choose(cost, BOUNDS, 2, 60, "here")  # 3600 s: the whole path fits
    assert (big.data_fraction, big.epochs) == (0.4, 4)
    tiny = sizing.choose(cost, BOUNDS, 2, 1, "here")  # 60 s: not even the floor's 200
    assert (tiny.data_fraction, tiny.epochs, tiny.fits) == (0.2, 1, False)


@pytest.mark.parametrize("spec, needle", [
    ({"minutes": 10, "data_fraction": [0.5, 1.0], "epochs": [1, 4]},
     "data_fraction [0.5, 1] must hold the profile's own data_fraction"),
    ({"minutes": 10, "data_fraction": [0.2, 1.0], "epochs": [3, 1]}, "floor <= ceiling"),
    ({"minutes": 10, "data_fraction": 0.2, "epochs": [1, 4]}, "expected [floor, ceiling]"),
    ({"minutes": 0, "data_fraction": [0.2, 1.0], "epochs": [1, 4]}, "minutes"),
    ({"minutes": 10, "data_fraction": [0.2, 1.0], "epochs": [1, 4], "seconds": 3}, "sizing:"),
    ({"minutes": 10, "data_fraction": [0.2, 1.5], "epochs": [1, 4]}, "data_fraction"),
])
def test_a_bad_sizing_is_refused_naming_the_file_and_profile(tmp_path, spec, needle):
    study = sized_study(tmp_path, spec)
    with pytest.raises(UsageError, match="profile smoke: sizing") as e:
        load_study(study, "smoke")
    assert needle in str(e.value) and str(study) in str(e.value)


def sized_study(tmp_path: Path, spec: dict | None = None) -> Path:
    """Two cells x 2 seeds at the smoke budget, with a sizing of its own."""
    bn = {"with": {"batchnorm": True}, "without": {"batchnorm": False}}
    d = {"reference": "basic", "base": "basic", "ladder": ["basic"], "seeds": 2,
         "reported": {"basic": 0.57}, "toggles": {"batchnorm": bn, "tta": {"eval_only": True}},
         "profiles": {"smoke": {"set": {**TINY, "data_fraction": 0.3}, "log_models": False,
                                "sizing": spec or {"minutes": 5, "data_fraction": [0.2, 0.6],
                                                   "epochs": [1, 2]}}}}
    p = tmp_path / "sized.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _trained_size(out: dict) -> set[tuple[float, int]]:
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.study = '{out.study}' and tags.cell != ''")
    return {(float(r.data.params["data_fraction"]), int(r.data.params["epochs"])) for r in runs}


@pytest.mark.slow
def test_a_budget_sizes_the_study_and_a_rerun_here_continues_it_where_another_machine_does_not(
        kaggle_csv, tmp_path, monkeypatch, capsys):
    study = sized_study(tmp_path)
    # A generous budget on a 13-row file: the whole path fits, so the ceiling is chosen.
    out = ablate_study(kaggle_csv, study, minutes=30)
    said = capsys.readouterr().out
    assert "budget 30 min: 0.6 of each train split for 2 epoch(s)" in said
    assert _trained_size(out) == {(0.6, 2)}
    parent = mlflow.get_run(out.parent_run_id).data.params
    assert (parent["sizing_budget_min"], parent["sizing_data_fraction"],
            parent["sizing_epochs"]) == ("30", "0.6", "2")
    assert parent["sizing_machine"] == sizing.machine()
    assert "budget 30 min; estimated at its start" in out.timing

    # The same command again: the size stored on the study, not a new measurement.
    with monkeypatch.context() as m:
        m.setattr(sizing, "choose", lambda *a, **k: pytest.fail("measured again"))
        again = ablate_study(kaggle_csv, study, minutes=30)
    assert again.study == out.study and again.trained == 0
    assert f"continuing study {out.study}, sized before" in capsys.readouterr().out

    # Another machine sizes its own study, and says so.
    monkeypatch.setattr(sizing, "machine", lambda: "a slower machine, 1 thread")
    elsewhere = ablate_study(kaggle_csv, study, minutes=30)
    said = capsys.readouterr().out
    assert f"study {out.study} in this storage was sized on {sizing.cpu_name()}" in said
    assert elsewhere.study != out.study


@pytest.mark.slow
def test_a_budget_the_floor_does_not_meet_runs_the_floor_and_says_how_long_it_takes(
        kaggle_csv, tmp_path, capsys):
    study = sized_study(tmp_path)
    out = ablate_study(kaggle_csv, study, minutes=0.001)
    said = capsys.readouterr().out
    assert "budget 0.001 min: even the smoke profile's floor (0.2 of each train split for 1 " \
           "epoch(s); below it its cells do not train) takes about" in said
    assert "--budget off runs the profile's own size" in said
    assert _trained_size(out) == {(0.2, 1)}


def test_budget_off_and_a_profile_without_sizing_leave_the_study_as_it_is(kaggle_csv, tmp_path):
    from pipeline.estimate import Meter, size_to_budget
    from pipeline.data import load_training
    from pipeline.study import StudyOptions

    study = sized_study(tmp_path)
    s = load_study(study, "smoke")
    data = load_training(kaggle_csv)
    where = StudyOptions(str(kaggle_csv), f"sqlite:///{tmp_path}/q.db")
    assert size_to_budget(s, Meter(data), None, {}, where) is s
    assert not (tmp_path / "q.db").exists()  # nothing is created to decide that
    plain = load_study(Path(__file__).parent.parent / "ablations/study.yaml", "smoke")
    with pytest.raises(UsageError, match="profile smoke of .* is not resized"):
        size_to_budget(plain, Meter(data), 5, {}, where)
    with pytest.raises(UsageError, match="pass --budget off to set --epochs"):
        size_to_budget(s, Meter(data), 5, {"epochs": 2}, where)


def test_the_quick_profile_is_sized_from_its_own_size_within_its_bounds():
    s = load_study(Path(__file__).parent.parent / "ablations/study.yaml", "quick")
    assert s.bounds is not None and s.bounds.minutes == 10
    own = (s.budget["data_fraction"], s.budget["epochs"])
    assert own in sizing.path(s.bounds, s.budget["epochs"])
    assert load_study(Path(__file__).parent.parent / "ablations/study.yaml", "full").bounds is None
    # Resizing changes every cell's share and epochs, a stage's own budget included.
    small = s.resize(0.2, 2)
    assert {(small.config(c, 0).data_fraction, small.config(c, 0).epochs)
            for c in small.cells} == {(0.2, 2)}
    assert s.budget["data_fraction"] == 0.4  # the plan it came from is unchanged


def test_a_profile_that_leaves_its_epochs_unset_is_sized_from_the_floor(tmp_path):
    spec = {"minutes": 5, "data_fraction": [0.2, 0.6], "epochs": [1, 2]}
    study = sized_study(tmp_path, spec)
    d = yaml.safe_load(study.read_text())
    del d["profiles"]["smoke"]["set"]["epochs"]
    study.write_text(yaml.safe_dump(d))
    s = load_study(study, "smoke")
    assert "epochs" not in s.budget and s.bounds.epochs == (1, 2)
    assert sizing.path(s.bounds, s.bounds.epochs[0])[:2] == [(0.2, 1), (0.25, 1)]


@pytest.mark.slow
def test_a_short_study_is_estimated_from_a_glance_and_a_long_one_is_measured(
        kaggle_csv, tmp_path, monkeypatch):
    from pipeline import estimate
    from pipeline.data import load_training

    s = load_study(sized_study(tmp_path), "smoke")
    data = load_training(kaggle_csv)
    short = estimate.meter_for(s, data)
    assert short.measure_s == 0.1 and len(short.rates) == 2  # its two networks, glanced at
    assert estimate.meter_for(s, data, short) is short  # measured already: read as it is
    monkeypatch.setattr(estimate, "GLANCE_ENOUGH_S", 0.0)  # every study is a long one now
    long = estimate.meter_for(s, data)
    assert long.measure_s == 1.0 and not long.rates  # measured closely when first read
    assert long.fixed_s > 0  # the glance's figures timing, not drawn again
