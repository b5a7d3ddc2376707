"""Several runs at once in one process: each draws from its own generators and trains exactly as it
would alone, one unit's failure or early end touches no other, and a stop reaches all of them."""

from __future__ import annotations

import _thread
import contextlib
import dataclasses
import os
import re
import shlex
import signal
import subprocess
import sys
import threading

import mlflow
import optuna
import pytest
import torch

from pipeline.ablate import concurrency
from pipeline.config import Config
from pipeline.engine import EarlyStopping, Runtime, TrainStep, current_slot, train_one_epoch
from pipeline.randomness import RunDropout
from pipeline.scoring import evaluate_split
from pipeline.errors import TrainingError
from pipeline.slots import Pool, measure_concurrent
from pipeline.study import Eta
from pipeline.train import Trainer
from tests.conftest import ROOT, child_runs, mini_study, start_cli
from tests.solo_reference import PINNED_ENV

# cuBLAS is deterministic across streams only with a fixed workspace, read when its first handle
# is made: set here, at collection, before any test touches a GPU (the GPU test below).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# A dropout-heavy run: element-wise dropout in every conv block and in the head.
DROPPY = Config(stage="improved", width=0.125, batch_size=16, epochs=3, augment=True,
                conv_dropout=0.25, fc_dropout=0.5, label_smoothing=0.1, grad_clip=1.0,
                normalize="symmetric", device="cpu", precision="fp32", seed=5)


# torch's own dropout masks for one generator state changed between releases (2.5.1 draws other
# masks than 2.14.1 from the same seed; its rand, randperm and init draws are the same): the
# reference holds the masks of the torch it was saved with, so it is compared only under a torch
# that draws those masks.
REFERENCE_DROPOUT = "15a1da9963"


def _dropout_fingerprint() -> str:
    import hashlib

    torch.manual_seed(3)
    mask = torch.nn.functional.dropout(torch.ones(16, 8, 12, 12), 0.25, True)
    return hashlib.sha1(mask.numpy().tobytes()).hexdigest()[:10]


@pytest.mark.slow
def test_a_seeded_solo_run_has_the_weights_it_had_when_it_drew_from_the_global_generator():
    """tests/data/solo_reference.pt holds the weights this run got when its initialisation and
    dropout drew from torch's global generator (saved by that version of the pipeline). A
    per-run generator seeded otherwise, drawn in another order, or a dropout drawn with other
    kernels changes them."""
    if _dropout_fingerprint() != REFERENCE_DROPOUT:
        pytest.skip(f"torch {torch.__version__} draws other dropout masks from one seed than the "
                    f"torch that saved the reference")
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "solo_reference.py"), "compare",
                        str(ROOT / "tests" / "data" / "solo_reference.pt")],
                       env={**os.environ, **PINNED_ENV, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and ("bit-identical" in r.stdout or
                                  "same draws, weights within kernel rounding" in r.stdout), \
        r.stdout + r.stderr[-2000:]


def test_run_dropout_drops_what_nn_dropout_drops_from_the_same_generator_state():
    x = torch.randn(8, 6, 12, 12).contiguous(memory_format=torch.channels_last)
    for p in (0.25, 0.5, 1.0):
        torch.manual_seed(7)
        want = torch.nn.Dropout(p).train()(x)
        got = RunDropout(p, torch.Generator().manual_seed(7)).train()(x)
        assert torch.equal(got, want), p
    assert torch.equal(RunDropout(0.5, torch.Generator()).eval()(x), x)


class ReplayGraphs:
    """The CUDA graph machinery's semantics on the CPU, one per run: a warm-up runs its
    function, a capture records it without running it, a replay runs it once from None grads
    (the captured backward writes the grads afresh)."""

    def __init__(self, params):
        self.params = list(params)

    def eager(self, fn):
        fn()

    def capture(self, fn):
        params = self.params

        class Graph:
            def replay(self):
                for p in params:
                    p.grad = None
                fn()

        return Graph()


def _data(seed: int, n: int = 96):
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randint(0, 256, (n, 1, 48, 48), dtype=torch.uint8, generator=g)
    return x, torch.randint(0, 7, (n,), generator=g)


class Unit:
    """One run's training, as the study's units train: epochs, validation, early stopping. Its
    dropout masks are recorded (where an element was dropped from a nonzero input)."""

    def __init__(self, cfg: Config, *, nan_at_epoch: int | None = None,
                 max_epochs: int | None = None):
        self.cfg, self.nan_at_epoch, self.max_epochs = cfg, nan_at_epoch, max_epochs
        self.masks: list[torch.Tensor] = []
        self.failure: str | None = None
        self.weights: dict[str, torch.Tensor] | None = None
        self.epochs = 0
        self.threads: set[str] = set()

    def __call__(self) -> None:
        cfg = self.cfg
        self.threads.add(threading.current_thread().name)
        x, y = _data(cfg.seed)
        rt = Runtime(cfg)
        graphs = ReplayGraphs([])  # its params are the network's, once built
        t = Trainer(cfg, rt, x[:64], y[:64], graphs=graphs)
        graphs.params = list(t.model.parameters())
        for m in t.model.modules():
            if isinstance(m, RunDropout):
                m.register_forward_hook(lambda mod, inp, out: self.masks.append(
                    ((out == 0) & (inp[0] != 0)).clone()))
        stopper = EarlyStopping(0)
        try:
            for epoch in range(cfg.epochs):
                if self.max_epochs is not None and epoch >= self.max_epochs:
                    break  # ends early: its slot goes to the next unit
                if epoch == self.nan_at_epoch:
                    for g in t.opt.param_groups:
                        g["lr"] = 1e30
                train_one_epoch(t.step, t.gen, t.schedule)
                va = evaluate_split(t.model, x[64:], y[64:], rt)
                stopper.update(va.acc, epoch, t.model)
                self.epochs += 1
        except TrainingError as e:
            self.failure = str(e)
            return
        self.weights = {k: v.clone() for k, v in t.model.state_dict().items()}


def _units() -> list[Unit]:
    return [Unit(DROPPY),
            Unit(dataclasses.replace(DROPPY, stage="advanced", seed=6), max_epochs=1),
            Unit(dataclasses.replace(DROPPY, stage="basic", seed=7, conv_dropout=0.0),
                 nan_at_epoch=1),
            Unit(dataclasses.replace(DROPPY, seed=8, conv_dropout=0.0))]


def _run(units: list[Unit], k: int) -> None:
    queue = list(units)
    Pool(k).run(lambda slot: queue.pop(0) if queue else None)


@pytest.mark.slow
def test_units_interleaved_in_slots_train_exactly_as_each_alone(monkeypatch):
    """Four units on three slots with the CUDA graph stand-in: a dropout-heavy one, one that
    ends after its first epoch (its slot then takes the fourth), and one whose loss becomes
    NaN in its second epoch. The others' masks and weights are bit-identical to those they get
    alone, and the NaN fails its own unit only."""
    torch.set_num_threads(1)  # the same kernels in both: one thread each
    alone = _units()
    for u in alone:
        u()
    together = _units()
    _run(together, 3)
    assert len(set().union(*(u.threads for u in together))) == 3  # three slots trained them
    assert together[3].threads & (together[1].threads | together[2].threads)  # a freed slot
    for a, b in zip(alone, together):
        assert (a.failure is None) == (b.failure is None)
        assert a.epochs == b.epochs
        assert len(a.masks) == len(b.masks)
        assert all(torch.equal(m, n) for m, n in zip(a.masks, b.masks))
        if a.weights is not None:
            assert all(torch.equal(a.weights[key], b.weights[key]) for key in a.weights)
    assert together[0].masks and any(m.any() for m in together[0].masks)
    assert together[1].epochs == 1 and together[2].epochs == 1
    assert "non-finite" in together[2].failure or "became" in together[2].failure
    assert together[0].weights is not None and together[3].weights is not None


def test_a_unit_drawing_from_the_global_generator_would_not_be_exact():
    """The check above can fail: a run whose dropout drew from the global generator gets other
    masks when another run draws from it in between."""
    torch.set_num_threads(1)
    u = Unit(DROPPY)
    u()
    torch.manual_seed(0)
    v = Unit(DROPPY)
    orig = RunDropout.forward

    def global_draws(self, x):
        torch.rand(3)  # another run's draw from the shared generator, in between
        return torch.nn.functional.dropout(x, self.p, self.training)

    RunDropout.forward = global_draws
    try:
        v()
    finally:
        RunDropout.forward = orig
    assert not all(torch.equal(m, n) for m, n in zip(u.masks, v.masks))


def test_a_failure_that_escapes_a_job_stops_the_other_slots_and_is_raised():
    started, seen = threading.Barrier(2), []

    def endless():
        started.wait()
        try:
            while True:
                train_one_epoch(step, gen)
        except KeyboardInterrupt:
            seen.append("stopped")
            raise

    def broken():
        started.wait()
        raise KeyError("a bug")

    cfg = dataclasses.replace(DROPPY, stage="basic", width=0.125)
    x, y = _data(0, 32)
    t = Trainer(cfg, Runtime(cfg), x, y)
    step, gen = t.step, t.gen
    jobs = [endless, broken]
    with pytest.raises(KeyError, match="a bug"):
        Pool(2).run(lambda slot: jobs.pop(0) if jobs else None)
    assert seen == ["stopped"]


def test_ctrl_c_stops_every_slot_at_its_next_batch_and_is_raised_once_all_have_stopped():
    started, seen = threading.Barrier(3), []
    cfg = dataclasses.replace(DROPPY, stage="basic")

    def endless():
        x, y = _data(current_slot().index, 32)
        t = Trainer(cfg, Runtime(cfg), x, y)
        train_one_epoch(t.step, t.gen)
        started.wait()
        try:
            for _ in range(100_000):  # bounded: a stop that never arrives fails, not hangs
                train_one_epoch(t.step, t.gen)
        except KeyboardInterrupt:
            seen.append(current_slot().index)
            raise

    def interrupt():
        started.wait()  # both slots are mid-training
        _thread.interrupt_main(signal.SIGINT)

    # Ctrl-C's own handler, whatever this process inherited: one started in the background by a
    # non-interactive shell ignores SIGINT, and a simulated one would then do nothing.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt, daemon=True).start()
        jobs = [endless, endless]
        with pytest.raises(KeyboardInterrupt):
            Pool(2).run(lambda slot: jobs.pop(0) if jobs else None)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sorted(seen) == [0, 1]


def test_one_slot_runs_its_jobs_in_the_caller_s_thread():
    where = []
    jobs = [lambda: where.append(threading.current_thread()) for _ in range(2)]
    Pool(1).run(lambda slot: jobs.pop(0) if jobs else None)
    assert where == [threading.current_thread()] * 2


def test_the_estimate_counts_the_units_trained_at_once():
    eta = Eta({"a": 10.0, "b": 10.0, "c": 20.0}, scale=1.1, slots=2, speedup=1.6)
    assert eta.left(["a", "b", "c"]) == pytest.approx(1.1 * 40 / 1.6)
    # A unit beside another takes 2 / 1.6 times its time alone: 12.5 s for a 10 s unit is on
    # time, so the scale moves from the prior 1.1 toward 1.0 by its share of the work.
    eta.finished("a", 12.5)
    assert eta.scale == pytest.approx((1.1 * 4 + 10) / (4 + 10))
    assert eta.left(["b", "c"]) == pytest.approx(eta.scale * 30 / 1.6)


@pytest.mark.parametrize("text, want", [("auto", None), ("AUTO", None), ("1", 1), ("2", 2),
                                        ("4.0", 4)])
def test_concurrent_takes_auto_or_a_whole_number(text, want):
    assert concurrency(text) == want


@pytest.mark.parametrize("text", ["0", "-1", "2.5", "two", "nan"])
def test_concurrent_refuses_anything_else(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError,
                       match="expected auto or a whole number from 1 to 2147483647, got"):
        concurrency(text)


def test_measure_concurrent_reports_the_total_rate_of_k_slots():
    torch.set_num_threads(1)
    cfg = dataclasses.replace(DROPPY, stage="basic")
    one = measure_concurrent(cfg, 1, seconds=0.2, n_images=64)
    two = measure_concurrent(cfg, 2, seconds=0.2, n_images=64)
    assert one["img_per_s"] > 0 and two["img_per_s"] > 0
    assert one["threads_per_slot"] == two["threads_per_slot"] == 1
    assert "memory_per_slot_mib" not in two  # a GPU figure only


def _results(name: str) -> dict:
    return {(r.data.tags["cell"], r.data.tags["seed"]): (r.info.status, r.data.metrics["test_acc"],
                                                         r.data.metrics["val_loss"])
            for r in child_runs(name)}


@pytest.mark.slow
def test_a_study_at_two_slots_gives_every_cell_once_with_the_results_of_one_slot(
        kaggle_csv, tmp_path):
    study = mini_study(tmp_path)
    got = {}
    for k in (1, 2):
        r = subprocess.run([sys.executable, "-m", "pipeline.ablate", "--data", str(kaggle_csv),
                            "--study", str(study), "--profile", "smoke", "--storage",
                            f"sqlite:///k{k}.db", "--study-name", f"k{k}", "--concurrent",
                            str(k), "--threads", "1"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        runs = child_runs(f"k{k}")
        keys = [(x.data.tags["cell"], x.data.tags["seed"]) for x in runs]
        assert len(keys) == len(set(keys)) == 4  # every (cell, seed) exactly once
        got[k] = _results(f"k{k}")
        assert {v[0] for v in got[k].values()} == {"FINISHED"}
    assert "in slot 2" in r.stdout and "2 at a time" in r.stdout
    assert got[1] == got[2]  # the same test accuracy (and val loss) for every cell and seed


@pytest.mark.slow
def test_sigterm_with_two_slots_busy_keeps_each_run_s_last_epoch_and_the_command_finishes(
        kaggle_csv, tmp_path):
    study = mini_study(tmp_path)
    text = study.read_text().replace("epochs: 1", "epochs: 40")
    study.write_text(text)
    p = start_cli("pipeline.ablate", "--data", kaggle_csv, "--study", study, "--profile",
                  "smoke", "--storage", "sqlite:///q.db", "--concurrent", "2", "--threads", "1",
                  cwd=tmp_path)
    seen, labels = [], set()
    for line in p.stdout:  # the event: both slots have finished an epoch of their run
        seen.append(line)
        m = re.match(r"\[(.+?)\] \w+ epoch \d+/40", line)
        if m:
            labels.add(m.group(1))
        if len(labels) == 2:
            break
    p.send_signal(signal.SIGTERM)
    out = "".join(seen) + p.communicate(timeout=300)[0]
    assert p.returncode == 130, out[-3000:]
    kept = re.findall(r"stopped: run (\w+) is KILLED; its checkpoint after epoch (\d+) is kept",
                      out)
    assert len(kept) == 2, out[-3000:]
    for run_id, epoch in kept:
        run = mlflow.MlflowClient().get_run(run_id)
        assert run.info.status == "KILLED"
        logged = mlflow.MlflowClient().get_metric_history(run_id, "val/acc")
        assert sorted(m.step for m in logged) == list(range(1, int(epoch) + 1))
        assert (tmp_path / "checkpoints" / f"{run_id}.pt").exists()
    # Both units are back in the queue the moment the worker exits, none left RUNNING for a
    # heartbeat to time out.
    name = re.search(r"study (\S+): ", out).group(1)
    st = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'q.db'}")
    states = [t.state for t in st.trials]
    assert optuna.trial.TrialState.RUNNING not in states
    assert states.count(optuna.trial.TrialState.WAITING) == 4  # 2 never begun, 2 handed back
    hint = re.search(r"continue the study with `([^`]+)`", out).group(1)
    r = subprocess.run([sys.executable, *shlex.split(hint)[1:]], cwd=tmp_path,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "waiting for" not in r.stdout
    for run_id, epoch in kept:  # each resumed where it stopped, in its own run
        assert f"resuming run {run_id} at epoch {int(epoch) + 1}/40" in r.stdout
    name = re.search(r"study (\S+): ", r.stdout).group(1)
    runs = child_runs(name)
    assert sorted(x.info.status for x in runs) == ["FINISHED"] * 4
    assert {x.info.run_id for x in runs} >= {run_id for run_id, _ in kept}
    st = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'q.db'}")
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in st.trials) == 4


@pytest.mark.gpu
def test_four_units_at_once_on_the_gpu_train_as_each_alone():
    """K=4 on one GPU, each unit on its own stream with its own CUDA graph and generators,
    against the same four trained one after another. Deterministic kernels (a fixed cuDNN
    algorithm, not one chosen by timing, which contention would change): bit-identical."""
    base = dataclasses.replace(DROPPY, device="cuda", width=0.5, batch_size=64, epochs=2,
                               deterministic=True)

    def unit(seed: int):
        cfg = dataclasses.replace(base, seed=seed)
        x, y = _data(seed, 64 * 12)
        t = Trainer(cfg, Runtime(cfg), x.cuda(), y.cuda())
        assert t.step.graphed
        for _ in range(cfg.epochs):
            train_one_epoch(t.step, t.gen, t.schedule)
        torch.cuda.current_stream().synchronize()
        return {k: v.detach().cpu() for k, v in t.model.state_dict().items()}

    alone = [unit(s) for s in range(4)]
    together: dict[int, dict] = {}
    seeds = list(range(4))

    def take(slot):
        if not seeds:
            return None
        s = seeds.pop(0)
        return lambda: together.__setitem__(s, unit(s))

    Pool(4, "cuda").run(take)
    for s in range(4):
        differ = [k for k in alone[s] if not torch.equal(alone[s][k], together[s][k])]
        assert not differ, f"seed {s}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def test_a_data_set_another_run_inserted_meanwhile_is_logged_on_a_second_try(kaggle_csv,
                                                                             monkeypatch):
    """Two runs starting together both find the data set absent and insert it; the second
    insert fails on the table's unique key. That run must still log its input."""
    from mlflow.exceptions import MlflowException

    from pipeline import data as fer
    from pipeline import tracking

    data = fer.load_training(str(kaggle_csv))
    real, calls = mlflow.log_input, []

    def racing(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            with mlflow.start_run(nested=True):  # the other run: it inserts the data set first
                real(*a, **kw)
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: "
                                  "datasets.experiment_id, datasets.name, datasets.digest")
        return real(*a, **kw)

    monkeypatch.setattr(mlflow, "log_input", racing)
    with mlflow.start_run() as run:
        tracking.log_input(data)
    assert len(calls) == 2
    inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert [i.dataset.digest for i in inputs] == [data.digest[-32:]]


@pytest.mark.slow
def test_auto_trains_a_short_study_one_unit_at_a_time_and_a_given_k_is_measured(tmp_path, capsys,
                                                                                 kaggle_csv):
    from pipeline import data as fer
    from pipeline.estimate import Meter, choose_slots
    from pipeline.plan import load_study

    s = load_study(mini_study(tmp_path), "smoke")
    meter = Meter(fer.load_training(str(kaggle_csv)))
    assert choose_slots(s, None, meter).k == 1  # seconds long: measuring K would cost more
    assert capsys.readouterr().out == ""  # nothing measured, nothing said
    threads = torch.get_num_threads()
    try:
        slots = choose_slots(s, 2, meter)
        assert slots.k == 2 and slots.by_net and all(v > 0 for v in slots.by_net.values())
        assert re.match(r"concurrent 2 units at once, \d+ thread\(s\) each: the study [\d.]+x as "
                        r"fast as one unit at a time \(its networks' training img/s: ",
                        capsys.readouterr().out)
    finally:
        torch.set_num_threads(threads)


class WorkOf:
    """A meter whose units take the seconds given per network (with BatchNorm or without)."""

    def __init__(self, bn: float, plain: float, rest: float = 0.0):
        self.bn, self.plain, self.rest = bn, plain, rest

    def seconds(self, cfg) -> float:
        return sum(self.parts(cfg))

    def parts(self, cfg) -> tuple[float, float]:
        return (self.bn if cfg.batchnorm else self.plain), self.rest

    def glance(self):
        return self


def test_the_study_s_speedup_weights_each_network_by_its_share_of_the_work(tmp_path):
    """Two networks, one 2.0x faster at K=2 and one not at all: the study goes as fast as the
    mix of its work, not as its reference network (which alone would say 2.0x)."""
    from pipeline.estimate import Slots, net_of
    from pipeline.plan import load_study

    s = load_study(mini_study(tmp_path), "smoke")
    bn = next(s.config(c, 0) for c in s.cells if s.config(c, 0).batchnorm)
    plain = next(s.config(c, 0) for c in s.cells if not s.config(c, 0).batchnorm)
    slots = Slots(2, {net_of(bn): 2.0, net_of(plain): 1.0})
    assert slots.speedup(s, WorkOf(bn=90.0, plain=10.0)) == pytest.approx(100 / 55)
    assert slots.speedup(s, WorkOf(bn=10.0, plain=90.0)) == pytest.approx(100 / 95)
    assert Slots().speedup(s, WorkOf(1.0, 1.0)) == 1.0
    # Each unit's scoring and run (10 s here) are not counted as going any faster.
    assert slots.speedup(s, WorkOf(bn=90.0, plain=10.0, rest=10.0)) == pytest.approx(120 / 75)


@pytest.mark.parametrize("mix, k", [(1.05, 1), (1.5, 2)])
def test_auto_on_a_cpu_takes_two_units_where_the_study_s_mix_is_10_percent_faster(
        tmp_path, monkeypatch, capsys, mix, k):
    """A study long enough to be worth measuring, on 2 cores: K=2 with a thread each where the
    study's networks go 1.5x as fast together, one unit with both cores where only 1.05x."""
    import os

    from pipeline import estimate
    from pipeline.plan import load_study

    s = load_study(mini_study(tmp_path), "smoke")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    asked = []

    def measured(nets, work, k_, alone, each):
        asked.append((k_, alone, each))
        return estimate.Slots(k_, {n: mix for n in nets}, mix)

    monkeypatch.setattr(estimate, "_measure_mix", measured)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        chosen = estimate.choose_slots(s, None, WorkOf(300.0, 300.0))
        assert chosen.k == k and asked == [(2, 2, 1)]  # 2 units of 1 thread against 1 of 2
        assert torch.get_num_threads() == (1 if k == 2 else 2)
    finally:
        torch.set_num_threads(threads)
    said = capsys.readouterr().out
    assert ("auto: 2 units at once, 1 thread(s) each: the study 1.50x as fast" in said if k == 2
            else "auto: 1 unit at a time (2 units at once: the study 1.05x as fast;" in said)


class StreamPool:
    """CUDA's streams as c10/cuda/CUDAStream.cpp hands them out: 32 per priority per device, in
    rotation (the 33rd low-priority stream asked for is the first again), plus each thread's
    current stream. Stands in for ``torch.cuda``'s stream and graph calls, and records which
    stream each capture and each other use (a slot's own stream, a warm-up) ran on."""

    SIZE = 32

    def __init__(self):
        self.lock = threading.Lock()
        self.asked = {"low": 0, "high": 0}
        self.local = threading.local()
        self.captures: list[tuple] = []
        self.others: list[tuple] = []
        pool = self

        class Stream:
            def __init__(self, device=None, priority=0, **_):
                kind = "high" if priority < 0 else "low"
                with pool.lock:
                    self.key = (kind, pool.asked[kind] % pool.SIZE)
                    pool.asked[kind] += 1

            def wait_stream(self, other):
                pass

            def synchronize(self):
                pass

        class Graph:
            def register_generator_state(self, g):
                pass

            def replay(self):
                pass

        class graph:  # torch.cuda.graph: a class-level default capture stream, made once
            default_capture_stream = None

            def __init__(self, cuda_graph, pool_=None, stream=None, capture_error_mode="global"):
                if stream is None:
                    if graph.default_capture_stream is None:
                        graph.default_capture_stream = Stream()
                    stream = graph.default_capture_stream
                self.stream = stream

            def __enter__(self):
                pool.captures.append(self.stream.key)
                self.saved = pool.current()
                pool.local.current = self.stream

            def __exit__(self, *exc):
                pool.local.current = self.saved

        self.Stream, self.Graph, self.graph = Stream, Graph, graph

    def current(self):
        return getattr(self.local, "current", None)

    @contextlib.contextmanager
    def stream(self, s):
        self.others.append(s.key)
        saved = self.current()
        self.local.current = s
        try:
            yield
        finally:
            self.local.current = saved

    def install(self, monkeypatch):
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "Stream", self.Stream)
        monkeypatch.setattr(cuda, "CUDAGraph", self.Graph)
        monkeypatch.setattr(cuda, "graph", self.graph)
        monkeypatch.setattr(cuda, "stream", self.stream)
        monkeypatch.setattr(cuda, "current_stream", lambda *a: self.current() or self.Stream())
        monkeypatch.setattr(cuda, "current_device", lambda: 0)
        monkeypatch.setattr(cuda, "set_device", lambda d: None)
        monkeypatch.setattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None, raising=False)


def test_no_stream_a_capture_runs_on_is_handed_to_anything_else(monkeypatch):
    """What a study's start and its units ask of the stream pool on a GPU: the measurement of
    1, 2, 4 and 8 units at once (best_k), then 40 units at 8 slots, each a graphed step that
    warms up, captures and replays, in the real Pool and CudaGraphs. Over 32 low-priority
    streams are asked for; none of them may be a stream a capture ran on (a warm-up that made
    it wait on an event from outside the capture would invalidate the capture)."""
    from pipeline.engine import CudaGraphs, Recipe

    pool = StreamPool()
    pool.install(monkeypatch)
    cfg = Config(stage="basic", batch_size=4, device="cpu", precision="fp32")
    rt = Runtime(cfg)

    def unit() -> None:
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48 * 48, 7))
        opt = torch.optim.Adam(model.parameters())
        x, y = _data(0, 16)
        step = TrainStep(model, opt, rt, x, y, Recipe.of(cfg), graphs=CudaGraphs())
        train_one_epoch(step, torch.Generator().manual_seed(0))
        assert step.graph is not None  # warmed up, captured and replayed
        step.release()

    def run(k: int, n: int) -> None:
        jobs = [unit] * n
        Pool(k, "cuda").run(lambda slot: jobs.pop() if jobs else None)

    for k in (1, 2, 4, 8):
        run(k, k)
    run(8, 40)
    assert pool.asked["low"] > StreamPool.SIZE and len(pool.captures) == 55
    reused = set(pool.captures) & set(pool.others)
    assert not reused, f"capture streams {sorted(reused)} were also given to slots or warm-ups"


@pytest.mark.parametrize("error, ends", [
    (torch.OutOfMemoryError("CUDA out of memory"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
     True),
    (RuntimeError("operation not permitted when stream is capturing"), False)])
def test_best_k_stops_at_out_of_memory_and_raises_anything_else(monkeypatch, error, ends):
    """Running out of memory at K=4 is an answer (K=2 is the most that fits); a capture that
    broke at K=4 may have left the device unusable and must stop the study's start."""
    from pipeline import slots

    def measure(cfg, k, seconds):
        if k == 4:
            raise error
        return {"img_per_s": 100.0 * k}

    monkeypatch.setattr(slots, "measure_concurrent", measure)
    if ends:
        assert slots.best_k(DROPPY) == (2, {1: 100.0, 2: 200.0})
    else:
        with pytest.raises(RuntimeError, match="capturing"):
            slots.best_k(DROPPY)
