"""``python -m pipeline.train``: train one stage as one MLflow run, resumable, and print its JSON."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import mlflow
from mlflow.exceptions import MlflowException
import numpy as np
import torch

from . import data as fer
from . import redact, serving, tracking
from .cli import parser, run_main
from .config import TOGGLES, Config, build, flatten, parse_set, to_yaml
from .engine import (CudaGraphs, EarlyStopping, EpochCallback, Recipe, Runtime, StopRun,
                     TrainStep, build_net, build_optimizer, build_scheduler, current_slot,
                     load_optimizer_state, train_one_epoch)
from .randomness import RunRandom, seed_everything
from .scoring import evaluate_split, final_figures, final_scores
from .errors import ConfigError, DataError, TrainingError, UsageError
from .stores import owner_alive
from .models import count_params
from .split import Split, make_split, subsample


def checkpoint_dir() -> Path:
    return Path(os.environ.get("FER_CHECKPOINT_DIR", "checkpoints"))


def check_checkpoint_dir() -> None:
    """Fail before any training, not after the first epoch, when checkpoints cannot be kept."""
    d = checkpoint_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        # A probe of its own: runs starting together in one process (slots) must not remove
        # each other's.
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"checkpoint folder {d} (FER_CHECKPOINT_DIR) is not writable: "
                         f"{e.strerror or e}.") from None


def _state_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v) for v in obj)
    return 0


def _save_atomic(obj: Any, path: Path) -> None:
    """Write beside the target and swap: a kill or a full disk mid-save leaves the previous
    checkpoint intact and no partial file behind. The temporary file is made new with a name
    no one can guess (a link planted at a predictable name would redirect the write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    why = None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        # torch's own words for a short write quote its C++ source; say what they mean.
        why = (e.strerror if isinstance(e, OSError) and e.strerror else
               "the write stopped short: a full disk or a file-size limit")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if why is not None:
        # Raised outside the handler, with no disk error as its context: the tracking store
        # reads a full disk in an error's context as its own, and this one is the checkpoint's.
        need = _state_bytes(obj) / 2**20
        free = shutil.disk_usage(path.parent).free / 2**20
        raise TrainingError(
            f"cannot write checkpoint {path}: the folder (FER_CHECKPOINT_DIR) has "
            f"{free:.1f} MB free and the checkpoint needs about {need:.1f} MB ({why}).")


def _load_state(path: Path) -> dict[str, Any]:
    """A checkpoint as tensors and plain values only: unpickling could run any code that
    someone able to write into the checkpoint folder put there."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise TrainingError(f"{path}: not a checkpoint this pipeline writes (it holds objects "
                            f"other than tensors and plain values: "
                            f"{str(e).strip().splitlines()[0][:200]}); delete it to start the "
                            f"run's epochs again.") from None


def toggles_of(cfg: Config) -> str:
    return ",".join(f"{t}={getattr(cfg, t)}" for t in TOGGLES)


RunState = Literal["complete", "pruned", "interrupted"]


@dataclass
class RunResult:
    """What :func:`train` returns, whatever happened: the run, how it ended, the epochs it
    trained, the best epoch's selected val accuracy and, for a complete run, its final metrics
    and logged model."""

    run_id: str
    state: RunState
    epochs_run: int
    val_acc: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    model_uri: str | None = None

    @classmethod
    def of_run(cls, run: Any) -> "RunResult":
        """A run that already finished (a worker died after MLflow heard, before its queue)."""
        m = run.data.metrics
        return cls(run.info.run_id, "complete", int(m.get("epochs_run", 0)), m.get("val_acc"),
                   dict(m), run.data.tags.get("model_uri"))


class Trainer:
    """What a run trains and carries across epochs: the network, optimiser, schedule, early
    stopping, the run's own random generators, and the history so far. Its whole state goes in
    and out through :meth:`state_dict` and :meth:`load_state_dict`. ``graphs`` replaces the
    CUDA graph machinery (tests)."""

    def __init__(self, cfg: Config, rt: Runtime, xtr: torch.Tensor, ytr: torch.Tensor, *,
                 graphs: CudaGraphs | None = None):
        seed_everything(cfg.seed, cfg.deterministic, global_rng=not current_slot().concurrent)
        self.cfg, self.rt = cfg, rt
        self.rng = RunRandom(cfg.seed, rt.device)
        self.gen = self.rng.order
        self.model = build_net(cfg, rt, self.rng)
        self.opt = build_optimizer(cfg, self.model.parameters(), capturable=rt.graphs)
        self.schedule = build_scheduler(cfg, self.opt, -(-len(ytr) // cfg.batch_size))
        self.step = TrainStep(self.model, self.opt, rt, xtr, ytr, Recipe.of(cfg), graphs=graphs,
                              generators=self.rng.graphed_generators())
        self.stopper = EarlyStopping(cfg.early_stopping)
        self.history: list[dict[str, float]] = []
        self.next_epoch, self.train_seconds = 0, 0.0

    def should_stop(self) -> bool:
        return self.next_epoch >= self.cfg.epochs or self.stopper.stopped

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.next_epoch - 1, "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(), "scheduler": self.schedule.state_dict(),
                "early_stopping": self.stopper.state_dict(), **self.rng.state_dict(),
                "history": self.history, "train_seconds": self.train_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        load_optimizer_state(self.opt, state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        self.stopper.load_state_dict(state["early_stopping"])
        self.rng.load_state_dict(state, self.rt.device)
        self.history, self.next_epoch = state["history"], state["epoch"] + 1
        self.train_seconds = state["train_seconds"]


class Checkpoint:
    """A run's checkpoint file: written atomically, and on load checked to have been made with
    this config and this data. What goes in it is the trainer's own state."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.path = checkpoint_dir() / f"{run_id}.pt"

    def save(self, state: dict[str, Any], cfg: Config, data: fer.FerData) -> None:
        _save_atomic({"config": cfg.to_dict(), "data_digest": data.digest, **state}, self.path)

    def load(self, cfg: Config, data: fer.FerData) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        state = _load_state(self.path)
        if state["config"] != cfg.to_dict():
            diff = sorted(k for k in cfg.to_dict() if state["config"].get(k) != getattr(cfg, k))
            raise ConfigError(f"{self.path}: the checkpoint of run {self.run_id} was made with "
                              f"another config (differs in {', '.join(diff)}); resume with the "
                              f"same config.")
        if state.get("data_digest", data.digest) != data.digest:
            raise DataError(f"{self.path}: run {self.run_id} was trained on other data (digest "
                            f"{state['data_digest']}, not {data.digest}); resume it with the "
                            f"same --data.")
        return state

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass
class Splits:
    """The run's rows as tensors: train on the run's device (uint8, 2.3 KB an image), val and
    test on the CPU (test empty when the run must not see it)."""

    split: Split
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


def _splits(cfg: Config, data: fer.FerData, device: torch.device, score_test: bool) -> Splits:
    split = make_split(data, cfg.val_fraction, cfg.split_seed)
    train_rows = subsample(split.train, data.labels, cfg.data_fraction, cfg.seed)
    if len(split.val) == 0 or len(train_rows) < 2:
        raise DataError(f"{data.source}: too few Training rows for a train/val split "
                        f"({len(train_rows)} train, {len(split.val)} val).")

    def tensors(rows: np.ndarray, dev: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(data.images[rows]).unsqueeze(1).to(dev)
        return x, torch.from_numpy(data.labels[rows]).to(dev)

    return Splits(split, tensors(train_rows, device), tensors(split.val, "cpu"),
                  tensors(split.test if score_test else split.test[:0], "cpu"))


def train(cfg: Config, data: fer.FerData, *, run_name: str | None = None,
          tags: dict[str, str] | None = None, parent_run_id: str | None = None,
          resume_run_id: str | None = None, on_epoch: EpochCallback | None = None,
          log_model: bool = True, max_epochs: int | None = None,
          score_test: bool = True, resume_command: str | None = None) -> RunResult:
    """Train ``cfg`` on ``data`` as one MLflow run.

    ``resume_run_id`` continues that run from its last checkpoint (or starts it, if it has
    none). ``on_epoch(epoch, metrics)`` may raise :class:`StopRun` to stop (Optuna pruning);
    ``max_epochs`` stops after that many epochs in this call, leaving the checkpoint and the
    run KILLED. ``score_test=False`` never touches the test split (searches select on val
    alone). ``resume_command`` (``{run_id}`` standing for the run) is printed, should the run
    be stopped, as the way to continue it.
    """
    rt = Runtime(cfg)
    sp = _splits(cfg, data, rt.device, score_test)
    t = Trainer(cfg, rt, *sp.train)
    check_checkpoint_dir()
    # Checked before the run is touched: a refused resume leaves the run as it was.
    if resume_run_id:
        _check_resumable(resume_run_id)
    state = Checkpoint(resume_run_id).load(cfg, data) if resume_run_id else None
    if resume_run_id and state is None:
        _check_same_params(resume_run_id, cfg, data)
    all_tags = {"stage": cfg.stage, "seed": str(cfg.seed), "toggles": toggles_of(cfg),
                "device": f"{rt.device.type}{'-bf16' if rt.bf16 else ''}", **(tags or {})}
    ckpt = None
    try:
        with tracking.run(name=run_name or f"{cfg.stage} s{cfg.seed}",
                          parent_run_id=parent_run_id, run_id=resume_run_id, tags=all_tags,
                          resume_command=resume_command) as active:
            ckpt = Checkpoint(active.info.run_id)
            result = _run(t, data, sp, state, ckpt, on_epoch=on_epoch, max_epochs=max_epochs,
                          log_model=log_model)
    except KeyboardInterrupt:
        if ckpt is not None:
            _say_stopped(ckpt, resume_command)
        raise
    finally:
        t.step.release()
    if result.state == "interrupted":
        # Not FINISHED: a worker or a report must never take a half-trained run for done.
        mlflow.MlflowClient().set_terminated(result.run_id, "KILLED")
    return result


def _say_stopped(ckpt: Checkpoint, resume_command: str | None) -> None:
    """What a stop kept, as it is: a checkpoint and the epoch it holds, or none."""
    if ckpt.path.exists():
        epoch = _load_state(ckpt.path)["epoch"] + 1
        kept = f"its checkpoint after epoch {epoch} is kept"
    else:
        kept = "no epoch had been checkpointed yet, so it starts again from epoch 1"
    how = (f"; continue it with `{resume_command.replace('{run_id}', ckpt.run_id)}`"
           if resume_command else "")
    print(f"stopped: run {ckpt.run_id} is KILLED; {kept}{how}", file=sys.stderr, flush=True)


def _run(t: Trainer, data: fer.FerData, sp: Splits, state: dict[str, Any] | None,
         ckpt: Checkpoint, *, on_epoch: EpochCallback | None, max_epochs: int | None,
         log_model: bool) -> RunResult:
    """Inside the active run: begin or resume it, train its epochs, and finish it."""
    _begin(t, data, sp, state)
    outcome = _epochs(t, data, sp.val, ckpt, on_epoch, max_epochs)
    result = RunResult(ckpt.run_id, outcome, len(t.history), t.stopper.best)
    if outcome == "pruned":
        mlflow.log_metric("val_acc", t.stopper.best)
    elif outcome == "complete":
        if t.stopper.best_state is not None:
            t.model.load_state_dict(t.stopper.best_state)  # select on validation
        result.metrics, result.model_uri = _finish(t, data, sp, log_model)
    if outcome != "interrupted":
        mlflow.set_tag("state", outcome)
        ckpt.remove()
    return result


def _begin(t: Trainer, data: fer.FerData, sp: Splits, state: dict[str, Any] | None) -> None:
    """A resumed run takes its checkpoint's state; a new one logs what it is."""
    run_id = mlflow.active_run().info.run_id
    if state is not None:
        t.load_state_dict(state)
        _log_unlogged(run_id, t.history)
        if t.should_stop():  # stopped after its last epoch, in its final scoring
            print(f"resuming run {run_id} after its last epoch ({len(t.history)}/"
                  f"{t.cfg.epochs}): its final scores")
        else:
            print(f"resuming run {run_id} at epoch {t.next_epoch + 1}/{t.cfg.epochs}")
        return
    mlflow.log_params(flatten(t.cfg))
    mlflow.log_params({"n_train": len(sp.train[1]), "n_params": count_params(t.model),
                       "data_digest": data.digest})
    tracking.log_input(data)
    tracking.log_text(to_yaml(t.cfg), "config.yaml")


def _epoch(t: Trainer, xva: torch.Tensor, yva: torch.Tensor) -> dict[str, float]:
    """Train one epoch and validate it; the row of the history it adds."""
    cfg = t.cfg
    desc = f"{cfg.stage} epoch {t.next_epoch + 1}/{cfg.epochs}"
    tr = train_one_epoch(t.step, t.gen, t.schedule, desc=desc)
    # A TTA run selects its epoch, steps its plateau and stops early on the accuracy it is
    # served with, the TTA one, as the study validated with TTA.
    va = evaluate_split(t.model, xva, yva, t.rt, tta=cfg.tta)
    selected = va.served(cfg.tta).acc
    t.train_seconds += tr["seconds"]
    # Epochs count from 1 everywhere (the progress line, the step, best_epoch), and no
    # per-epoch point sits at step 0, the step whose metrics MLflow ties to a logged model.
    row = {"epoch": t.next_epoch + 1, "train/loss": tr["loss"], "train/acc": tr["acc"],
           "val/loss": va.loss, "val/acc": va.acc,
           "train/img_per_s": tr["img_per_s"], "lr": float(t.opt.param_groups[0]["lr"])}
    if cfg.tta:
        row["val/acc_tta"] = selected
    who = current_slot().label
    print(f"{f'[{who}] ' if who else ''}{desc}: loss {tr['loss']:.4f} acc {tr['acc']:.4f} | val loss "
          f"{va.loss:.4f} acc {va.acc:.4f}"
          f"{f' (tta {selected:.4f})' if cfg.tta else ''} | {tr['img_per_s']:.0f} img/s",
          flush=True)
    return row


def _selected(row: dict[str, float]) -> float:
    return row.get("val/acc_tta", row["val/acc"])


def _epochs(t: Trainer, data: fer.FerData, val: tuple[torch.Tensor, torch.Tensor],
            ckpt: Checkpoint, on_epoch: EpochCallback | None,
            max_epochs: int | None) -> RunState:
    """Train epochs until the run is done ("complete"), pruned ("pruned") or has trained
    ``max_epochs`` in this call ("interrupted"). A checkpoint is written at most every
    ``checkpoint_every_s`` and at every stop, and the epochs it covers are logged right after
    it: MLflow never shows an epoch that a resume would train again."""
    pending: list[dict[str, float]] = []  # epochs not yet in MLflow nor in the checkpoint
    last_save, this_call = time.monotonic(), 0
    # The state at the end of the last finished epoch not yet checkpointed: a stop mid-epoch
    # saves it, so whatever the interval, a stop keeps every finished epoch.
    unsaved: dict[str, Any] | None = None

    def save(state: dict[str, Any]) -> None:
        try:
            ckpt.save(state, t.cfg, data)
        except TrainingError as e:
            # The trained epochs still reach MLflow, and the run says why it failed.
            _log_rows(pending)
            mlflow.set_tag("failure", str(e))
            raise
        _log_rows(pending)
        pending.clear()

    try:
        while not t.should_stop():
            if max_epochs is not None and this_call >= max_epochs:
                return "interrupted"
            row = _epoch(t, *val)
            t.history.append(row)
            pending.append(row)
            t.schedule.after_epoch(_selected(row))
            epoch = t.next_epoch
            stopped = t.stopper.update(_selected(row), epoch, t.model)
            t.next_epoch += 1
            this_call += 1
            halt = max_epochs is not None and this_call >= max_epochs
            if stopped or halt or t.next_epoch >= t.cfg.epochs or on_epoch is not None or \
                    time.monotonic() - last_save >= t.cfg.checkpoint_every_s:
                unsaved = None
                save(t.state_dict())
                last_save = time.monotonic()
            else:
                unsaved = copy.deepcopy(t.state_dict())
            if on_epoch is not None:
                try:
                    on_epoch(epoch, {"val_acc": _selected(row), "train_acc": row["train/acc"]})
                except StopRun:
                    return "pruned"
    except KeyboardInterrupt:
        if unsaved is not None:
            save(unsaved)
        raise
    return "complete"


def _log_rows(rows: list[dict[str, float]]) -> None:
    for r in rows:
        mlflow.log_metrics({k: v for k, v in r.items() if k != "epoch"}, step=int(r["epoch"]))


def _log_unlogged(run_id: str, history: list[dict[str, float]]) -> None:
    """Log the checkpointed epochs that never reached MLflow (the store went away between the
    checkpoint and the log), and none twice."""
    logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "val/acc")}
    _log_rows([row for row in history if int(row["epoch"]) not in logged])


def _check_resumable(run_id: str) -> None:
    try:
        run = mlflow.MlflowClient().get_run(run_id)
        status = run.info.status
    except MlflowException:
        raise UsageError(f"--resume {run_id}: no such run in the tracking store "
                         f"{redact.url(mlflow.get_tracking_uri())}.") from None
    if status == "FINISHED":
        raise UsageError(f"--resume {run_id}: that run is FINISHED; there is nothing to resume "
                         f"(train a new run instead).")
    owner = run.data.tags.get("owner")
    if status == "RUNNING" and owner_alive(owner):
        raise UsageError(f"--resume {run_id}: that run is still training in process "
                         f"{owner.rsplit(':', 2)[1]} on this machine; stop it first.")


def _check_same_params(run_id: str, cfg: Config, data: fer.FerData) -> None:
    """A run stopped before its first checkpoint has no state to check a resume against, but
    its logged params say what it was; another config or other data is refused, the run left
    as it was (MLflow would refuse the changed params only after the run had been reopened)."""
    logged = mlflow.MlflowClient().get_run(run_id).data.params
    want = {**flatten(cfg), "data_digest": data.digest}
    diff = sorted(k for k, v in want.items() if k in logged and logged[k] != v)
    if "data_digest" in diff:
        raise DataError(f"--resume {run_id}: that run was trained on other data (digest "
                        f"{logged['data_digest']}, not {data.digest}); resume it with the same "
                        f"--data.")
    if diff:
        raise ConfigError(f"--resume {run_id}: that run was started with another config "
                          f"(differs in {', '.join(diff)}); resume it with the same config and "
                          f"--set values.")


def _finish(t: Trainer, data: fer.FerData, sp: Splits,
            log_model: bool) -> tuple[dict[str, float], str | None]:
    """Compute the final figures, render them, and log them (and the model) in the run."""
    fs = final_scores(t, sp)
    model_uri = model_id = None
    if log_model:
        info = serving.log(serving.classifier(t.cfg, t.model.state_dict()), t.cfg,
                           data.images[sp.split.val[:2]])
        model_uri, model_id = info.model_uri, info.model_id
        mlflow.set_tag("model_uri", model_uri)
    # Linked to the model and the data set, so the model's page shows these final figures.
    mlflow.log_metrics(fs.metrics, model_id=model_id, dataset=tracking.dataset(data))
    for name, item in final_figures(t.history, fs, data.images).items():
        if isinstance(item, str):
            tracking.log_text(item, name)
        else:
            tracking.log_figure(item, name)
    tracking.log_npz(fs.predictions, "predictions.npz")
    return fs.metrics, model_uri


def run_name(cfg: Config, overrides: dict[str, Any]) -> str:
    """``resnet s0 augment=false``: the stage, the seed and what the command line changed."""
    shown = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                     for k, v in overrides.items() if k != "seed")
    return f"{cfg.stage} s{cfg.seed}" + (f" {shown}" if shown else "")


def main(argv: list[str] | None = None) -> int:
    p = parser("Train one stage of the study as an MLflow run.")
    p.add_argument("--config", required=True, help="a YAML under ablations/stages/")
    p.add_argument("--data", required=True, help="FER2013 in any supported layout")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set epochs=1 (repeatable)")
    p.add_argument("--resume", default=None, metavar="RUN_ID",
                   help="continue an interrupted run from its checkpoint")
    a = p.parse_args(argv)
    overrides = parse_set(a.set)
    cfg = build(a.config, overrides)
    fer.check_source(a.data)  # before any store is created
    tracking.setup(a.experiment)
    tracking.sweep_dead_runs()
    data = fer.load_training(a.data)
    resume = a.resume or os.environ.get("MLFLOW_RUN_ID")
    again = ["python", "-m", "pipeline.train", "--config", a.config, "--data", a.data,
             *(["--set", " ".join(a.set)] if a.set else []), "--resume", "RUN_ID"]
    out = train(cfg, data, resume_run_id=resume, run_name=run_name(cfg, overrides),
                resume_command=shlex.join(again).replace("RUN_ID", "{run_id}"))
    print(json.dumps({"run_id": out.run_id, "model_uri": out.model_uri,
                      **{k: out.metrics.get(k) for k in ("val_acc", "test_acc", "val_acc_tta",
                                                         "test_acc_tta")}}))
    return 0


if __name__ == "__main__":
    run_main(main)
