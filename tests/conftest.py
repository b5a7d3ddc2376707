"""Shared fixtures: small generated FER2013 files in every layout, and an isolated MLflow store."""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, settings

from pipeline.data import EMOTIONS

ROOT = Path(__file__).resolve().parent.parent
# The budget small tests train at: seconds per run on two cores. Tests that need more say so
# beside it ({**TINY, "epochs": 2}).
# Generated-input tests (Hypothesis): the same examples on every run, so a suite that passed
# passes again (CI lands on it); FER_FUZZ=explore draws fresh ones. Health checks judge how the
# examples are drawn, not the code under test, and a loaded 2-core machine trips their timers.
settings.register_profile("ci", derandomize=True, database=None, deadline=None,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("explore", deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile("explore" if os.environ.get("FER_FUZZ") == "explore" else "ci")

TINY = {"epochs": 1, "width": 0.125, "data_fraction": 0.5, "batch_size": 16, "early_stopping": 0}
PG = "postgresql://postgres@127.0.0.1:5432/test"
DEV_DATA = Path(os.environ.get("FER_DEV_DATA", ROOT.parent / "shared" / "data" /
                               "fer2013-dev.csv.gz"))
# Per class and usage: enough rows that a stratified 80/20 split has every class on both sides.
COUNTS = {"Training": 10, "PublicTest": 3, "PrivateTest": 2}


def make_faces(per_usage: dict[str, int] = COUNTS, seed: int = 0, classes=range(7)):
    """Images with a class-dependent pattern (so a net can learn something), labels, usages."""
    rng = np.random.default_rng(seed)
    images, labels, usage = [], [], []
    yy, xx = np.mgrid[0:48, 0:48]
    for u, n in per_usage.items():
        for c in classes:
            for _ in range(n):
                base = 40 + 25 * c + 30 * np.sin((xx + 3 * c) / (3 + c))
                img = np.clip(base + rng.normal(0, 12, (48, 48)), 0, 255).astype(np.uint8)
                images.append(img)
                labels.append(c)
                usage.append(u)
    return np.stack(images), np.array(labels), np.array(usage)


def csv_text(images, labels, usage, layout: str = "kaggle") -> str:
    pix = [" ".join(map(str, im.ravel())) for im in images]
    if layout == "icml":
        rows = ["emotion, Usage, pixels"] + [f"{l}, {u}, {p}" for l, u, p in
                                             zip(labels, usage, pix)]
    else:
        rows = ["emotion,pixels,Usage"] + [f"{l},{p},{u}" for l, p, u in zip(labels, pix, usage)]
    return "\n".join(rows) + "\n"


def write_folder(root: Path, images, labels, usage) -> Path:
    from PIL import Image

    counter = 0
    for im, l, u in zip(images, labels, usage):
        split = "train" if u == "Training" else "test"
        d = root / split / EMOTIONS[l]
        d.mkdir(parents=True, exist_ok=True)
        # PNG keeps pixels exact, so the folder edition must equal the CSV one.
        Image.fromarray(im).save(d / f"{u}_{counter:05d}.png")
        counter += 1
    return root


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, created and migrated once: a copy costs 0.06 s where a
    fresh store costs 1.5 s, for every test of the suite."""
    import mlflow

    path = tmp_path_factory.mktemp("store-template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


# The tiers beside `fast`: a test in none of them is `fast` (python -m pytest -m fast).
SLOWER = ("slow", "realdata", "postgres")
# Processes a fast test may start, each in milliseconds: git (every run's commit) and sleep (a
# live process of known pid).
QUICK_PROCESSES = ("git", "sleep")
NO_STORE = "no-store-in-this-test://"


def pytest_configure(config):
    """Under pytest-xdist (scripts/test.sh), each worker on its own share of the cores: the
    processes its tests start inherit it, and the entry points size their thread pools to it,
    so two workers' trainings never fight over one core (two pools on 2 cores each ran 25x
    slower than one alone)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return
    cores = sorted(os.sched_getaffinity(0))
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    share = len(cores) // workers
    if share >= 1:
        i = int(worker.removeprefix("gw"))
        os.sched_setaffinity(0, cores[i * share:(i + 1) * share])
        os.environ["OMP_NUM_THREADS"] = str(share)


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu_check.sh runs these on one)")
    for item in items:
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if not any(item.get_closest_marker(m) for m in SLOWER):
            item.add_marker(pytest.mark.fast)
    # The longest first (the data-backed, then the other slow ones), so that two workers end
    # together on short tests instead of one waiting out a long one alone.
    items.sort(key=lambda item: (item.get_closest_marker("realdata") is None,
                                 item.get_closest_marker("fast") is not None))


@pytest.fixture(autouse=True)
def fast_stays_in_process(request, monkeypatch):
    """A fast test that starts a Python process (seconds to import torch and MLflow) fails,
    saying so, instead of slowing the fast tier down unseen."""
    if request.node.get_closest_marker("fast") is None:
        return
    real = subprocess.Popen.__init__

    def only_quick(self, args, *a, **kw):
        first = args if isinstance(args, (str, bytes, os.PathLike)) else args[0]
        if Path(os.fsdecode(first).split()[0]).name not in QUICK_PROCESSES:
            raise AssertionError(f"a fast test started a process ({args!r}): mark the test "
                                 f"slow (tests/conftest.py, SLOWER)")
        real(self, args, *a, **kw)

    monkeypatch.setattr(subprocess.Popen, "__init__", only_quick)


@pytest.fixture(autouse=True)
def isolated(request, tmp_path, monkeypatch):
    """Every test gets its own working directory, parse cache and checkpoints, and, unless it is
    marked ``no_store``, its own MLflow store (a copy of a migrated template). A ``no_store``
    test that reaches MLflow fails at once on a tracking URI no store answers."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FER_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    if request.node.get_closest_marker("no_store"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", NO_STORE)
        if "mlflow" in sys.modules:  # an earlier test's store is still MLflow's own setting
            sys.modules["mlflow"].set_tracking_uri(NO_STORE)
        yield tmp_path
        return
    shutil.copyfile(request.getfixturevalue("store_template"), tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    while mlflow.active_run():
        mlflow.end_run()
    # MLflow remembers the active experiment per process; one from an earlier test's store
    # must not leak into this one.
    mlflow.set_experiment("tests")
    yield tmp_path


@pytest.fixture
def faces():
    return make_faces()


@pytest.fixture
def kaggle_csv(tmp_path, faces) -> Path:
    p = tmp_path / "fer2013.csv"
    p.write_text(csv_text(*faces))
    return p


@pytest.fixture
def kaggle_gz(tmp_path, faces) -> Path:
    p = tmp_path / "fer2013.csv.gz"
    p.write_bytes(gzip.compress(csv_text(*faces).encode()))
    return p


@pytest.fixture
def icml_csv(tmp_path, faces) -> Path:
    p = tmp_path / "icml_face_data.csv"
    p.write_text(csv_text(*faces, layout="icml"))
    return p


@pytest.fixture
def image_folder(tmp_path, faces) -> Path:
    return write_folder(tmp_path / "fer_images", *faces)


@pytest.fixture
def dev_data() -> Path:
    if not DEV_DATA.exists():
        pytest.skip(f"{DEV_DATA} not present")
    return DEV_DATA


def run_cli(module: str, *args: str, env: dict | None = None, cwd: Path | None = None):
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=e, cwd=cwd, timeout=900)


def start_cli(module: str, *args: str, env: dict | None = None, cwd: Path | None = None,
              merge: bool = True, drop: tuple[str, ...] = ()) -> subprocess.Popen:
    """An entry point started in the background, its output readable line by line as it comes
    (stderr in stdout, unless ``merge`` is False); ``env`` adds to this process's environment,
    ``drop`` takes variables out of it."""
    e = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in drop}
    return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=e,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge else subprocess.PIPE, text=True)


def ablate_study(data: Path, study: Path, storage: str = "sqlite:///q.db", **kw):
    """``run_ablate`` on a generated file and study file, at the smoke profile unless told."""
    from pipeline.ablate import AblateOptions, run_ablate
    from pipeline.study import StudyOptions

    shared = {k: kw.pop(k) for k in ("study_name", "heartbeat", "register", "alias",
                                     "entry_run") if k in kw}
    exp = kw.pop("exp", None)
    return run_ablate(AblateOptions(StudyOptions(str(data), storage, **shared), str(study),
                                    kw.pop("profile", "smoke"), report_dir="rep", **kw), exp)


def tune_study(data: Path, space: Path, n_trials: int, storage: str = "sqlite:///t.db", **kw):
    """``run_tune`` on a generated file and search file, at the smoke profile unless told."""
    from pipeline.study import StudyOptions
    from pipeline.tune import TuneOptions, run_tune

    shared = {k: kw.pop(k) for k in ("study_name", "heartbeat", "register", "alias",
                                     "entry_run") if k in kw}
    exp = kw.pop("exp", None)
    return run_tune(TuneOptions(StudyOptions(str(data), storage, **shared), str(space),
                                kw.pop("profile", "smoke"), n_trials, **kw), exp)


_STORAGES: dict = {}


def _storage(url: str):
    """One Optuna storage (one connection pool) per URL for the whole test session: polling
    with a fresh one each time leaks a PostgreSQL connection per poll until the server refuses."""
    import optuna

    if url not in _STORAGES:
        _STORAGES[url] = optuna.storages.RDBStorage(url)
    return _STORAGES[url]


def _trials(study_name: str, storage: str, state):
    import optuna

    try:
        st = optuna.load_study(study_name=study_name, storage=_storage(storage))
    except KeyError:
        return None  # the worker has not created the study yet
    return st.get_trials(deepcopy=False, states=(state,))


def wait_until_running(study_name: str, storage: str, timeout: float = 300) -> None:
    """Block until the Optuna study has a RUNNING trial (a worker is mid-cell)."""
    import time

    import optuna

    deadline = time.time() + timeout
    while time.time() < deadline:
        if _trials(study_name, storage, optuna.trial.TrialState.RUNNING):
            return
        time.sleep(0.2)
    raise TimeoutError(f"no trial of {study_name} started within {timeout} s")


def freeze_mid_trial(proc, study_name: str, storage: str, timeout: float = 300) -> None:
    """SIGSTOP ``proc`` at a moment when its study has a RUNNING trial, so a kill that follows
    lands mid-trial whatever the machine's speed (a trial that ends between the check and the
    signal is simply waited out for the next one)."""
    import signal
    import time

    import optuna

    deadline = time.time() + timeout
    while time.time() < deadline:
        wait_until_running(study_name, storage, timeout=deadline - time.time())
        proc.send_signal(signal.SIGSTOP)
        if _trials(study_name, storage, optuna.trial.TrialState.RUNNING):
            return
        proc.send_signal(signal.SIGCONT)
    raise TimeoutError(f"no trial of {study_name} was running when checked")


def wait_until_complete(study_name: str, storage: str, n: int = 1, timeout: float = 300) -> None:
    """Block until the Optuna study has at least ``n`` COMPLETE trials."""
    import time

    import optuna

    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(_trials(study_name, storage, optuna.trial.TrialState.COMPLETE) or []) >= n:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{study_name} had fewer than {n} complete trials after {timeout} s")


@pytest.fixture
def fresh_pg():
    """The URL of a new, empty PostgreSQL database, dropped after the test."""
    import sqlalchemy

    eng = sqlalchemy.create_engine(PG, isolation_level="AUTOCOMMIT",
                                   connect_args={"connect_timeout": 5})
    try:
        eng.connect().close()
    except Exception:
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    name = f"fresh_{uuid.uuid4().hex[:10]}"
    with eng.connect() as c:
        c.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    with eng.connect() as c:
        c.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    eng.dispose()


def _pg_available() -> bool:
    import optuna

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
    import mlflow
    import optuna
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(folder: Path, port: int, *extra: str, env: dict | None = None,
                        log: Path | None = None) -> subprocess.Popen:
    """A real `mlflow server` on loopback, its store and artifacts in ``folder``; returns once
    it answers /health. ``extra``: more server flags (``--app-name basic-auth``)."""
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    out = open(log, "ab") if log else subprocess.DEVNULL
    p = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--artifacts-destination", str(folder / "server-artifacts"), "--workers", "1", *extra],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder,
        # Tracking alone: the server's job runners are half a dozen more processes to start.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})})
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return p
        except OSError:
            if p.poll() is not None:
                raise AssertionError("mlflow server exited at start"
                                     + (f": {log.read_text()[-2000:]}" if log else ""))
            time.sleep(0.3)
    raise TimeoutError("mlflow server did not answer /health")


def stop_server(p: subprocess.Popen) -> None:
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=30)


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
    import mlflow

    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.study = '{study_name}' and tags.cell != ''")
