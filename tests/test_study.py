"""The study engine both studies share: whole numbers from the command line, the study file's
profiles, and a unit's outcome recorded whatever its body does."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
from datetime import datetime, timedelta
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from pipeline import study as lifecycle
from pipeline import cli, tracking
from pipeline.errors import RepeatedFailure, TrainingError, UsageError
from pipeline.numbers import NumberError
from pipeline.study import parse_duration


@pytest.mark.parametrize("text, value", [("3", 3), ("3.0", 3), ("0", 0)])
def test_whole_takes_what_mlproject_passes(text, value):
    assert cli.whole(text) == value


@pytest.mark.parametrize("text", ["3.5", "inf", "nan", "-1", "three"])
def test_whole_refuses_what_is_not_a_whole_number(text):
    with pytest.raises(argparse.ArgumentTypeError, match=repr(text).replace("'", ".")):
        cli.whole(text)


@pytest.mark.parametrize("profiles, needle", [
    (["quick"], "profiles must be a mapping"),
    ({"quick": ["epochs"]}, "profile quick must be a mapping"),
    ({"quick": {"set": {"epochz": 1}}}, "epochz"),
    ({"full": {}}, "unknown profile 'quick'; this file has full"),
])
def test_a_study_file_with_bad_profiles_is_refused_in_one_line(tmp_path, profiles, needle):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"profiles": profiles}))
    with pytest.raises(UsageError, match=needle) as e:
        lifecycle.read_study_file(p, "study", ("profiles",), "quick")
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def _claimed(n: int = 1):
    st = optuna.create_study(storage=optuna.storages.RDBStorage("sqlite:///q.db"),
                             direction="maximize")
    for i in range(n):
        st.enqueue_trial({}, user_attrs={"unit": i})
    return st, [lifecycle.claim(st) for _ in range(n)]


def test_a_unit_records_its_value_its_failure_or_its_pruning_and_the_study_goes_on():
    st, (ok, bad, pruned) = _claimed(3)
    with lifecycle.unit(st, lifecycle.trial_id(ok), 1, "ok") as out:
        out.value = 0.75
    assert out.state == "complete"
    with lifecycle.unit(st, lifecycle.trial_id(bad), 1, "bad") as out:
        raise TrainingError("the training loss became nan")
    assert out.state == "failed" and "loss became nan" in out.reason
    with lifecycle.unit(st, lifecycle.trial_id(pruned), 1, "pruned") as out:
        raise optuna.TrialPruned()
    assert out.state == "pruned"
    by_unit = {t.user_attrs["unit"]: t for t in st.get_trials()}
    assert by_unit[0].state == TrialState.COMPLETE and by_unit[0].value == 0.75
    assert by_unit[1].state == TrialState.FAIL and "loss became nan" in by_unit[1].user_attrs[
        "error"]
    assert by_unit[2].state == TrialState.PRUNED
    assert lifecycle.claim(st) is None  # nothing waits


def test_a_bug_in_a_unit_leaves_its_traceback_on_the_run_and_the_unit_back_in_the_queue(capsys):
    st, (t,) = _claimed(1)
    with mlflow.start_run() as run:
        pass

    def body():
        return {}["a key the code forgot"]

    with lifecycle.unit(st, lifecycle.trial_id(t), 1, "cell x seed 0",
                        run_of=lambda: run.info.run_id) as out:
        body()
    assert out.state == "failed" and out.reason == "KeyError: 'a key the code forgot'"
    tb = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/traceback.txt")
    assert "in body" in tb and tb.rstrip().endswith("KeyError: 'a key the code forgot'")
    assert "cell x seed 0: an unexpected error, KeyError" in capsys.readouterr().err
    # Not recorded as the unit's failure: it waits to be trained again once the bug is fixed.
    assert st.trials[0].state == TrialState.WAITING and "error" not in st.trials[0].user_attrs


def test_the_same_unexpected_error_three_times_stops_the_worker_in_one_line():
    st, units = _claimed(4)
    bugs = lifecycle.BugCount(st.study_name)
    for i, t in enumerate(units[:2]):
        with lifecycle.unit(st, lifecycle.trial_id(t), 1, f"u{i}", bugs=bugs) as out:
            raise KeyError("k")
        assert out.state == "failed"
    with lifecycle.unit(st, lifecycle.trial_id(units[2]), 1, "other", bugs=bugs):
        raise IndexError("another bug")  # another error counts apart
    with pytest.raises(RepeatedFailure) as e:
        with lifecycle.unit(st, lifecycle.trial_id(units[3]), 1, "u3", bugs=bugs):
            raise KeyError("k")
    said = str(e.value)
    assert said.startswith(f"3 units of study {st.study_name!r} failed with the same unexpected "
                           f"error, KeyError: 'k'") and "\n" not in said
    assert said.endswith("continue the study with the same command.")
    assert {tr.state for tr in st.trials} == {TrialState.WAITING}  # every unit kept for the rerun


@pytest.mark.parametrize("error, own", [
    (TrainingError("the training loss became nan"), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:116] DefaultCPUAllocator: can't allocate "
                  "memory: you tried to allocate 1073741824 bytes"), True),
    (MemoryError(), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (64x512 and 256x7)"), False),
    (ValueError("too many values to unpack"), False),
    (KeyError("stage"), False),
])
@pytest.mark.slow
def test_a_unit_fails_alone_on_its_own_trouble_and_anything_else_is_a_bug(error, own):
    assert lifecycle.units_own(error) is own


def test_a_stopped_unit_goes_back_to_the_queue_at_once_and_the_stop_goes_on_up():
    st, (t,) = _claimed(1)
    with pytest.raises(KeyboardInterrupt):
        with lifecycle.unit(st, lifecycle.trial_id(t), 60, "stopped"):
            raise KeyboardInterrupt
    trials = st.get_trials()
    # The same trial, waiting again: no failure is recorded for a stop.
    assert [x.state for x in trials] == [TrialState.WAITING]
    assert [x.number for x in lifecycle.settled(st)] == [trials[0].number]
    again = lifecycle.claim(st)
    assert again is not None and again.number == trials[0].number


def test_a_unit_handed_back_is_taken_before_those_that_never_began_and_beats_afresh():
    """Stopped while others waited behind it, it is the first taken again; its old heartbeat
    goes with the stop, so another worker cannot find it stale once it is taken again."""
    st, (t,) = _claimed(1)
    st.enqueue_trial({}, user_attrs={"unit": 1})
    storage = lifecycle.storage_of(st)
    with pytest.raises(KeyboardInterrupt):
        with lifecycle.unit(st, lifecycle.trial_id(t), 60, "stopped"):
            raise KeyboardInterrupt
    rdb = getattr(storage, "_backend", storage)
    assert rdb.get_trial(lifecycle.trial_id(t)).state == TrialState.WAITING
    from optuna.storages._rdb import models as rdb_models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(rdb.scoped_session) as session:
        assert rdb_models.TrialHeartbeatModel.where_trial_id(lifecycle.trial_id(t),
                                                              session) is None
    assert lifecycle.claim(st).user_attrs["unit"] == 0


def test_the_eta_moves_from_its_prior_to_the_measured_ratio_by_the_share_of_work_done():
    eta = lifecycle.Eta({"a": 10.0, "b": 20.0, "c": 70.0}, scale=1.25)  # the prior: 10 s of 100
    assert eta.left(["a", "b", "c"]) == 125.0  # before any unit: the prior on top
    eta.finished("a", 30.0)  # a short unit took three times its prediction:
    assert eta.left(["b", "c"]) == pytest.approx((12.5 + 30) / 20 * 90)  # half-way, not 3x
    eta.finished("b", 20.0)
    assert eta.left(["c"]) == pytest.approx((12.5 + 50) / 40 * 70)
    assert [lifecycle.duration(x) for x in (42, 420, 4200, 7260)] == \
        ["42 s", "7 min", "70 min", "2 h 01 min"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_printed_during_a_study_land_whole_above_its_progress_bar():
    term = _Terminal()
    with contextlib.redirect_stdout(term):
        with lifecycle.study_bar(total=5, done=1, file=term) as bar:
            bar.set_postfix_str("about 3 min left")
            print("basic epoch 1/3: loss 1.84 acc 0.24")
            print("partial", end="", flush=True)  # a line written in pieces stays one line
            bar.update()
            print(" line")
    text = term.getvalue()
    assert "basic epoch 1/3: loss 1.84 acc 0.24\n" in text
    assert "partial line\n" in text
    assert "study 1/5 runs" in text and "study 2/5 runs" in text
    assert "about 3 min left" in text
    # The bar is redrawn below each line: the last thing on screen after the first line is a bar.
    after = text.split("basic epoch 1/3: loss 1.84 acc 0.24\n", 1)[1]
    assert after.lstrip("\r").startswith("study 1/5 runs")


def test_the_study_bar_stays_off_where_its_output_is_not_a_terminal():
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        with lifecycle.study_bar(total=5, done=0, file=log) as bar:
            bar.set_postfix_str("about 3 min left")
            print("a line")
    assert log.getvalue() == "a line\n"


def test_a_unit_whose_worker_died_before_its_first_beat_is_retried_not_waited_on_for_ever(
        tmp_path):
    """Optuna never finds a trial without a heartbeat stale. The engine gives such a trial,
    once older than the grace period, a beat; a grace period later it is stale and retried.
    Time is moved by rewriting the stored times, not by waiting."""
    import sqlalchemy

    url = f"sqlite:///{tmp_path / 'h.db'}"
    st = optuna.create_study(storage=lifecycle.open_storage(url, heartbeat=1),
                             direction="maximize")
    st.enqueue_trial({}, user_attrs={"unit": 0})
    st._storage.set_trial_state_values(st.get_trials()[0]._trial_id, TrialState.RUNNING)
    engine = sqlalchemy.create_engine(url)

    def an_hour_ago(table: str, column: str) -> None:
        with engine.begin() as c:
            c.execute(sqlalchemy.text(f"UPDATE {table} SET {column} = :t"),
                      {"t": datetime.now() - timedelta(hours=1)})

    lifecycle.fail_stale(st)  # just started: left alone
    assert [t.state for t in st.get_trials()] == [TrialState.RUNNING]
    an_hour_ago("trials", "datetime_start")  # its worker died before beating, long ago
    lifecycle.fail_stale(st)
    assert [t.state for t in st.get_trials()] == [TrialState.RUNNING]  # beaten for it, once
    an_hour_ago("trial_heartbeats", "heartbeat")  # no beat since
    lifecycle.fail_stale(st)
    trials = st.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert lifecycle.claim(st).user_attrs["unit"] == 0  # the unit is trained again


def test_artifacts_go_beside_the_sqlite_store_whatever_the_working_folder(tmp_path,
                                                                          monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    tracking.setup("beside")
    with tracking.run("r"):
        tracking.log_text("hello", "note.txt")
        uri = mlflow.get_artifact_uri()
    assert Path(uri.removeprefix("file://")).is_relative_to(tmp_path / "mlruns")
    assert (Path(uri.removeprefix("file://")) / "note.txt").read_text() == "hello"
    assert not (elsewhere / "mlruns").exists()


def _dead_pid() -> int:
    pid = os.fork()  # a child that ends at once: its pid names no live process once reaped
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def _dead_owner() -> str:
    from pipeline.stores import owner_prefix

    return f"{owner_prefix()}{_dead_pid()}:?"


def test_a_study_parent_has_an_owner_from_its_first_write_and_outlives_it():
    """A parent whose owner died is KILLED by the next start here (not FAILED: the study can go
    on), with the reason; a worker joining takes it over and puts it back to RUNNING; a parent
    whose owner lives is left be."""
    import subprocess

    from pipeline.stores import owner_tag

    exp = tracking.setup("owners")
    parent = lifecycle.create_parent(exp, "s", "ablation quick", "ablation", params={},
                                     files={})
    client = mlflow.MlflowClient()
    assert client.get_run(parent).data.tags["owner"] == owner_tag()
    assert tracking.sweep_dead_runs() == []  # its owner (this process) lives

    client.set_tag(parent, "owner", _dead_owner())
    assert tracking.sweep_dead_runs() == [parent]
    run = client.get_run(parent)
    assert run.info.status == "KILLED" and "run the study's command again" in \
        run.data.tags["failure"]

    lifecycle.take_over_parent(parent, entry_run=None)
    run = client.get_run(parent)
    assert run.info.status == "RUNNING" and run.data.tags["owner"] == owner_tag()
    assert "failure" not in run.data.tags

    alive = subprocess.Popen(["sleep", "60"])
    try:
        other = owner_tag(alive.pid)
        client.set_tag(parent, "owner", other)
        assert tracking.sweep_dead_runs() == []
        lifecycle.take_over_parent(parent, entry_run=None)
        assert client.get_run(parent).data.tags["owner"] == other  # not taken from the living
    finally:
        alive.kill()
        alive.wait()


def test_the_sweep_marks_only_this_pipeline_s_runs_of_processes_it_can_see():
    """On a shared tracking server: another tool's run with an "owner" tag, a run of another
    container with this hostname (its pid means nothing here), and a run whose tag names no
    scope (an older version's) are left RUNNING, whatever their pid; this scope's dead one
    is swept."""
    import socket

    from pipeline.stores import owner_alive, owner_prefix

    exp = tracking.setup("shared")
    client = mlflow.MlflowClient()
    dead = _dead_pid()
    host = socket.gethostname()
    container = owner_prefix().replace(owner_prefix().split("#")[1], "0123456789:")
    tags = {"another tool": f"{host}:{dead}:?", "another container": f"{container}{dead}:?",
            "unseen": "someone", "this scope": f"{owner_prefix()}{dead}:?"}
    ids = {what: client.create_run(exp.id(), tags={"owner": tag}).info.run_id
           for what, tag in tags.items()}
    assert tracking.sweep_dead_runs() == [ids["this scope"]]
    for what, rid in ids.items():
        assert client.get_run(rid).info.status == ("FAILED" if what == "this scope"
                                                   else "RUNNING"), what
    assert owner_alive(f"{container}{dead}:?") is None
    assert owner_alive(f"{host}:{dead}:?") is None


def test_the_command_takes_the_entry_run_off_the_environment_and_the_library_leaves_it(
        monkeypatch, tmp_path):
    """Under `mlflow run` the entry run is in MLFLOW_RUN_ID: the command line moves it into its
    options (a unit would otherwise resume it); opening a study from code leaves it be."""
    p = argparse.ArgumentParser()
    lifecycle.add_study_args(p, f"sqlite:///{tmp_path}/q.db")
    monkeypatch.setenv("MLFLOW_RUN_ID", "entry-run-id")
    o = lifecycle.options(p.parse_args(["--data", "d.csv"]))
    assert o.entry_run == "entry-run-id" and "MLFLOW_RUN_ID" not in os.environ

    exp = tracking.setup(None)
    monkeypatch.setenv("MLFLOW_RUN_ID", "someone-else's")
    opened = lifecycle.open_study(lifecycle.StudyOptions("d.csv", f"sqlite:///{tmp_path}/q.db"),
                                  exp, "s", "a study")
    assert opened.entry_run is None and os.environ["MLFLOW_RUN_ID"] == "someone-else's"


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("25m", 1500), ("1h30m", 5400), ("1h 30m 10s", 5410), ("0.5h", 1800),
    ("01:30:00", 5400), ("5:30", 330), ("10", 600), ("2.5", 150), ("1e1s", 10)])
def test_a_duration_reads_units_clock_time_or_bare_minutes(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "-1", "0s", "1x", "h", "1h30", "1:60:00", "1:30:60",
                                  "1:2:3:4", "::", "nan", "inf", "٣m", "1e9", "true"])
def test_a_duration_refuses_anything_else_naming_the_forms_it_takes(text):
    with pytest.raises(NumberError, match=r"expected a duration such as 90s, 25m, 1h30m or "
                                          r"01:30:00 \(a bare number is minutes\), got"):
        parse_duration(text)


def test_a_duration_not_given_is_none():
    assert parse_duration("") is None and parse_duration(None) is None
