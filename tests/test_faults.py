"""Faults that must lose nothing: a crashed training process, a tracking store that dies or was
never there, and processes racing to initialise a fresh store."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from pipeline import stores, tracking
from tests.conftest import ROOT, free_port, start_cli, start_mlflow_server, stop_server

BASIC = str(ROOT / "ablations/stages/basic.yaml")
SIX_EPOCHS = "epochs=6 width=0.125 batch_size=16 checkpoint_every_s=0 device=cpu"


def _env(extra: dict | None) -> dict:
    # A store of its own: the experiment id the test's store set in the environment is not in it.
    env = {**os.environ, **(extra or {})}
    if extra:
        env.pop("MLFLOW_EXPERIMENT_ID", None)
    return env


def _start_training(data: Path, env: dict | None = None) -> subprocess.Popen:
    # A store of its own: the experiment id the test's store set in the environment is not in it.
    return start_cli("pipeline.train", "--config", BASIC, "--data", data, "--set", SIX_EPOCHS,
                     env=env, merge=False, drop=("MLFLOW_EXPERIMENT_ID",) if env else ())


def _stop_after_epoch(p: subprocess.Popen, epoch: int) -> None:
    """Freeze the process once it reports that epoch (its checkpoint follows the report)."""
    for line in p.stdout:
        if f"epoch {epoch}/6:" in line:
            p.send_signal(signal.SIGSTOP)
            return
    raise AssertionError(f"training ended before epoch {epoch}: {p.stderr.read()[-2000:]}")


def _the_run(uri: str | None = None):
    client = mlflow.MlflowClient(uri) if uri else mlflow.MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(exps)
    return run


def _resume(data: Path, run_id: str, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--config", BASIC, "--data", str(data), "--set",
         SIX_EPOCHS, "--resume", run_id], capture_output=True, text=True, env=_env(env),
        timeout=600)


def _epochs_logged(run_id: str, uri: str | None = None) -> list[int]:
    client = mlflow.MlflowClient(uri) if uri else mlflow.MlflowClient()
    return sorted(m.step for m in client.get_metric_history(run_id, "val/acc"))


@pytest.mark.slow
def test_a_crashed_training_is_seen_as_failed_and_resumes(kaggle_csv, tmp_path):
    p = _start_training(kaggle_csv)
    _stop_after_epoch(p, 2)
    run = _the_run()
    assert run.info.status == "RUNNING"
    # While its process lives, the run is not anyone else's to resume.
    r = _resume(kaggle_csv, run.info.run_id)
    assert r.returncode == 2 and "still training in process" in r.stderr, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1
    p.send_signal(signal.SIGSEGV)  # the crash: no handler runs, the run stays RUNNING
    p.send_signal(signal.SIGCONT)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGSEGV
    assert _the_run().info.status == "RUNNING"

    tracking.setup("tests")  # any later entry point on this machine, as it starts
    assert _the_run().info.status == "RUNNING"  # choosing the store sweeps nothing by itself
    assert tracking.sweep_dead_runs() == [run.info.run_id]
    after = _the_run()
    assert after.info.status == "FAILED"
    assert "ended without ending the run" in after.data.tags["failure"]

    r = _resume(kaggle_csv, run.info.run_id)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _the_run().info.status == "FINISHED"
    assert "failure" not in _the_run().data.tags  # it no longer describes the run
    assert _epochs_logged(run.info.run_id) == list(range(1, 7))


def test_a_live_run_on_another_process_is_not_marked_failed(tmp_path):
    tracking.setup("tests")
    with tracking.run("live"):
        rid = mlflow.active_run().info.run_id
        assert tracking.sweep_dead_runs() == []
    assert mlflow.get_run(rid).info.status == "FINISHED"
    assert stores.owner_alive(stores.owner_tag()) is True
    assert stores.owner_alive(stores.owner_tag().replace("@", "@another-host.")) is None


@pytest.mark.slow
def test_tracking_server_dying_mid_training_stops_with_one_line_and_resumes(kaggle_csv,
                                                                           tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {"MLFLOW_TRACKING_URI": uri}
    server = start_mlflow_server(tmp_path, port)
    try:
        p = _start_training(kaggle_csv, env)
        _stop_after_epoch(p, 2)
        run_id = _the_run(uri).info.run_id
        stop_server(server)
        p.send_signal(signal.SIGCONT)
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert f"stopped answering during run {run_id}" in line
        assert f"--resume {run_id}" in line
        assert (tmp_path / "checkpoints" / f"{run_id}.pt").exists()

        server = start_mlflow_server(tmp_path, port)
        r = _resume(kaggle_csv, run_id, env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert mlflow.MlflowClient(uri).get_run(run_id).info.status == "FINISHED"
        # Epochs checkpointed while the store was gone reach it on resume, none twice.
        assert _epochs_logged(run_id, uri) == list(range(1, 7))
    finally:
        if server.poll() is None:
            stop_server(server)


@pytest.mark.parametrize("uri", ["postgresql://postgres@127.0.0.1:1/test",
                                 "http://127.0.0.1:1"])
@pytest.mark.slow
def test_an_unreachable_tracking_store_fails_in_one_line(kaggle_csv, uri):
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--config", BASIC, "--data", str(kaggle_csv),
         "--set", SIX_EPOCHS], capture_output=True, text=True, timeout=60,
        env=_env({"MLFLOW_TRACKING_URI": uri}))
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: MLflow tracking store {uri} is not reachable")
    assert r.stderr.count("\n") == 1, r.stderr[-2000:]


def _first_use(uri: str, barrier, storage: str | None) -> None:
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # the test's own store's experiment
    mlflow.set_tracking_uri(uri)
    barrier.wait()  # every process starts at once
    if storage:
        from pipeline.study import open_storage

        open_storage(storage, 20)
    else:
        tracking.setup("race")
        with tracking.run("first"):
            mlflow.log_metric("m", 1.0)


def _race(uri: str, storage: str | None = None, n: int = 4) -> list[int]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(n)
    procs = [ctx.Process(target=_first_use, args=(uri, barrier, storage)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    return [p.exitcode for p in procs]


@pytest.mark.slow
def test_simultaneous_first_use_of_a_fresh_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert _race(uri) == [0, 0, 0, 0]
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("race")
    assert len(client.search_runs([exp.experiment_id])) == 4


@pytest.mark.slow
@pytest.mark.postgres
def test_simultaneous_first_use_of_a_fresh_postgres_database(tmp_path, fresh_pg):
    # The MLflow schema on a fresh database, then the Optuna schema on another fresh one.
    assert _race(fresh_pg) == [0, 0, 0, 0]
    client = mlflow.MlflowClient(fresh_pg)
    assert len(client.search_runs([client.get_experiment_by_name("race").experiment_id])) == 4


@pytest.mark.postgres
def test_simultaneous_workers_create_the_optuna_schema_once(tmp_path, fresh_pg):
    assert _race(f"sqlite:///{tmp_path / 'm.db'}", storage=fresh_pg) == [0, 0, 0, 0]


LONG = "epochs=200 width=0.125 batch_size=16 checkpoint_every_s=3600 device=cpu"


@pytest.mark.slow
def test_a_stop_mid_epoch_keeps_every_finished_epoch_whatever_the_interval(kaggle_csv,
                                                                         tmp_path):
    """No checkpoint is due for an hour; SIGTERM in epoch 2 or 3 still keeps the last finished
    epoch, logs exactly the epochs it keeps, and says which one it kept."""
    p = start_cli("pipeline.train", "--config", BASIC, "--data", kaggle_csv, "--set", LONG,
                  merge=False)
    for line in p.stdout:  # the event: epoch 2 reported, so epoch 1's state is in memory
        if "epoch 2/200:" in line:
            p.send_signal(signal.SIGTERM)
            break
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    import re

    import torch

    run_id = re.search(r"run ([0-9a-f]{32}) is KILLED", err).group(1)
    kept = int(re.search(r"its checkpoint after epoch (\d+) is kept", err).group(1))
    saved = torch.load(tmp_path / "checkpoints" / f"{run_id}.pt", weights_only=False)
    assert kept in (1, 2) and saved["epoch"] + 1 == kept
    assert _epochs_logged(run_id) == list(range(1, kept + 1))
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))

    r = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", BASIC, "--data",
                        str(kaggle_csv), "--set", LONG.replace("epochs=200", "epochs=4"),
                        "--resume", run_id], capture_output=True, text=True, timeout=600)
    # epochs=4 is another config: refused, the run left as it was.
    assert r.returncode == 2 and "another config" in r.stderr and "epochs" in r.stderr
    assert mlflow.get_run(run_id).info.status == "KILLED"


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_fails_the_run_in_one_line_and_keeps_its_epochs(
        kaggle_csv, tmp_path):
    """A file-size limit below the checkpoint's size makes its write fail as a full disk
    does: one line naming the folder, no partial file left, the trained epoch logged, the run
    FAILED with the reason in its `failure` tag."""
    import resource

    def limit():  # 8 MB: the store and the parse cache fit, a width-1 basic checkpoint not
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))

    r = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", BASIC, "--data",
                        str(kaggle_csv), "--set",
                        "epochs=3 width=1 batch_size=16 checkpoint_every_s=0 device=cpu"],
                       capture_output=True, text=True, timeout=600, preexec_fn=limit)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    [line] = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert "cannot write checkpoint" in line and "FER_CHECKPOINT_DIR" in line
    assert "MB free and the checkpoint needs about" in line
    # In the user's words, not torch's internals ("[enforce fail at inline_container.cc...").
    assert "enforce fail" not in line and ".cc" not in line, line
    assert not list((tmp_path / "checkpoints").glob("*"))  # no partial file
    run = _the_run()
    assert run.info.status == "FAILED"
    assert "cannot write checkpoint" in run.data.tags["failure"]
    assert _epochs_logged(run.info.run_id) == [1]


@pytest.mark.slow
def test_a_resume_of_a_run_killed_before_its_first_checkpoint_refuses_another_config(
        kaggle_csv, tmp_path):
    p = start_cli("pipeline.train", "--config", BASIC, "--data", kaggle_csv, "--set", LONG,
                  merge=False)
    for line in p.stdout:
        if "epoch 1/200:" in line:
            p.kill()  # kill -9: nothing is saved, the run stays RUNNING
            break
    p.wait(timeout=60)
    assert not list((tmp_path / "checkpoints").glob("*.pt"))
    run_id = _the_run().info.run_id
    params = dict(_the_run().data.params)
    r = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", BASIC, "--data",
                        str(kaggle_csv), "--set", LONG.replace("epochs=200", "epochs=4"),
                        "--resume", run_id], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert "another config (differs in epochs)" in r.stderr
    assert _the_run().info.status == "FAILED"  # swept as dead by that start, nothing more
    assert dict(_the_run().data.params) == params


@pytest.fixture
def small_disk(tmp_path):
    """A 1.6 MB tmpfs (needs the right to mount: root here and in CI), grown on demand."""
    d = tmp_path / "small"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1600k", "tmpfs", str(d)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")

    def grow():
        subprocess.run(["mount", "-o", "remount,size=64m", str(d)], check=True)

    try:
        yield d, grow
    finally:
        # Lazily: this process's MLflow client may still hold the database file open.
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.mark.slow
def test_a_full_tracking_store_is_one_line_and_the_run_resumes_once_there_is_room(
        kaggle_csv, tmp_path, small_disk):
    d, grow = small_disk
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{d / 'mlflow.db'}"}
    args = ["--config", BASIC, "--data", str(kaggle_csv), "--set",
            "epochs=300 width=0.125 batch_size=16 checkpoint_every_s=0 device=cpu"]
    r = subprocess.run([sys.executable, "-m", "pipeline.train", *args], capture_output=True,
                       text=True, env=_env(env), timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert f"its folder {d} is full" in r.stderr
    import re

    resume = re.search(r"continue from the run's last checkpoint with `([^`]+)`", r.stderr)
    run_id = resume.group(1).rsplit(" ", 1)[1]
    assert (tmp_path / "checkpoints" / f"{run_id}.pt").exists()
    grow()
    r = subprocess.run([sys.executable, "-m", "pipeline.train", *args, "--resume", run_id],
                       capture_output=True, text=True, env=_env(env), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    run = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(run_id)
    assert run.info.status == "FINISHED" and "failure" not in run.data.tags
    assert _epochs_logged(run_id, env["MLFLOW_TRACKING_URI"]) == list(range(1, 301))
