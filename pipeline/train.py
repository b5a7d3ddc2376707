"""``python -m pipeline.train``: train one stage as one MLflow run, resumable, and print its JSON."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from sklearn.metrics import classification_report, confusion_matrix

from . import data as fer
from . import plots, serving, stats, tracking
from .cli import parser, run_main
from .config import TOGGLES, Config, build, flatten, parse_set, to_yaml
from .engine import (EarlyStopping, EpochCallback, Recipe, Runtime, StopRun, TrainStep,
                     build_optimizer, build_scheduler, evaluate_split, load_optimizer_state,
                     seed_everything,
                     train_one_epoch)
from .errors import ConfigError, DataError, UsageError
from .models import build_model, count_params
from .split import Split, make_split, subsample


def checkpoint_dir() -> Path:
    return Path(os.environ.get("FER_CHECKPOINT_DIR", "checkpoints"))


def check_checkpoint_dir() -> None:
    """Fail before any training, not after the first epoch, when checkpoints cannot be kept."""
    d = checkpoint_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"checkpoint folder {d} (FER_CHECKPOINT_DIR) is not writable: "
                         f"{e.strerror or e}.") from None


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill mid-save leaves the previous checkpoint intact


def toggles_of(cfg: Config) -> str:
    return ",".join(f"{t}={getattr(cfg, t)}" for t in TOGGLES)


class Trainer:
    """What a run trains and carries across epochs: the network, optimiser, scheduler, early
    stopping, the data order's generator, and the history so far."""

    def __init__(self, cfg: Config, rt: Runtime, xtr: torch.Tensor, ytr: torch.Tensor):
        seed_everything(cfg.seed, cfg.deterministic)
        self.cfg, self.rt = cfg, rt
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.model = rt.model(build_model(cfg))
        self.opt = build_optimizer(cfg, self.model.parameters(), capturable=rt.graphs)
        self.sched, self.when = build_scheduler(cfg, self.opt, -(-len(ytr) // cfg.batch_size))
        self.step = TrainStep(self.model, self.opt, rt, xtr, ytr, Recipe.of(cfg))
        self.stopper = EarlyStopping(cfg.early_stopping)
        self.history: list[dict[str, float]] = []
        self.next_epoch, self.train_seconds = 0, 0.0

    def should_stop(self) -> bool:
        st = self.stopper
        return self.next_epoch >= self.cfg.epochs or (st.patience > 0 and
                                                      st.bad_epochs >= st.patience)


class Checkpoint:
    """A run's checkpoint file and its one layout: written atomically, and on load checked to
    have been made with this config and this data."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.path = checkpoint_dir() / f"{run_id}.pt"

    def save(self, t: Trainer, data: fer.FerData) -> None:
        _save_atomic({"config": t.cfg.to_dict(), "data_digest": data.digest,
                      "epoch": t.next_epoch - 1, "model": t.model.state_dict(),
                      "optimizer": t.opt.state_dict(),
                      "scheduler": t.sched.state_dict() if t.sched is not None else None,
                      "early_stopping": t.stopper.state_dict(), "generator": t.gen.get_state(),
                      "torch_rng": torch.get_rng_state(),
                      "cuda_rng": (torch.cuda.get_rng_state_all()
                                   if torch.cuda.is_available() else None),
                      "numpy_rng": np.random.get_state(), "history": t.history,
                      "train_seconds": t.train_seconds}, self.path)

    def load(self, cfg: Config, data: fer.FerData) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
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

    @staticmethod
    def restore(state: dict[str, Any], t: Trainer) -> None:
        t.model.load_state_dict(state["model"])
        load_optimizer_state(t.opt, state["optimizer"])
        if t.sched is not None:
            t.sched.load_state_dict(state["scheduler"])
        t.stopper.load_state_dict(state["early_stopping"])
        t.gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if torch.cuda.is_available() and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        np.random.set_state(state["numpy_rng"])
        t.history, t.next_epoch = state["history"], state["epoch"] + 1
        t.train_seconds = state["train_seconds"]

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def train(cfg: Config, data: fer.FerData, *, run_name: str | None = None,
          tags: dict[str, str] | None = None, parent_run_id: str | None = None,
          resume_run_id: str | None = None, on_epoch: EpochCallback | None = None,
          log_model: bool = True, max_epochs: int | None = None,
          score_test: bool = True) -> dict[str, Any]:
    """Train ``cfg`` on ``data`` as one MLflow run.

    ``resume_run_id`` continues that run from its last checkpoint (or starts it, if it has
    none). ``on_epoch(epoch, metrics)`` may raise :class:`StopRun` to stop (Optuna pruning);
    ``max_epochs`` stops after that many epochs in this call, leaving the checkpoint and the
    run KILLED. ``score_test=False`` never touches the test split (searches select on val
    alone).

    Returns one shape whatever happened: ``run_id``, ``state`` (complete, pruned or
    interrupted), ``epochs_run``, ``val_acc`` (the best epoch's), and for a complete run its
    final metrics and ``model_uri``.
    """
    rt = Runtime(cfg)
    split = make_split(data, cfg.val_fraction, cfg.split_seed)
    train_rows = subsample(split.train, data.labels, cfg.data_fraction, cfg.seed)
    if len(split.val) == 0 or len(train_rows) < 2:
        raise DataError(f"{data.source}: too few Training rows for a train/val split "
                        f"({len(train_rows)} train, {len(split.val)} val).")
    test_rows = split.test if score_test else split.test[:0]

    def tensors(rows: np.ndarray, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(data.images[rows]).unsqueeze(1).to(device)
        return x, torch.from_numpy(data.labels[rows]).to(device)

    xtr, ytr = tensors(train_rows, rt.device)  # uint8 on the device: 2.3 KB per image
    xva, yva = tensors(split.val, "cpu")
    xte, yte = tensors(test_rows, "cpu")
    t = Trainer(cfg, rt, xtr, ytr)

    check_checkpoint_dir()
    # Checked before the run is touched: a refused resume leaves the run as it was.
    if resume_run_id:
        _check_resumable(resume_run_id)
    state = Checkpoint(resume_run_id).load(cfg, data) if resume_run_id else None
    all_tags = {"stage": cfg.stage, "seed": str(cfg.seed), "toggles": toggles_of(cfg),
                "device": f"{rt.device.type}{'-bf16' if rt.bf16 else ''}", **(tags or {})}
    with tracking.run(name=run_name or f"{cfg.stage} s{cfg.seed}", parent_run_id=parent_run_id,
                      run_id=resume_run_id, tags=all_tags, resume_hint=True) as active:
        run_id = active.info.run_id
        ckpt = Checkpoint(run_id)
        if state is not None:
            Checkpoint.restore(state, t)
            _log_unlogged(run_id, t.history)
            print(f"resuming run {run_id} at epoch {t.next_epoch + 1}/{cfg.epochs}")
        else:
            mlflow.log_params(flatten(cfg))
            mlflow.log_params({"n_train": len(train_rows), "n_params": count_params(t.model),
                               "data_digest": data.digest})
            tracking.log_input(data)
            tracking.log_text(to_yaml(cfg), "config.yaml")
        outcome = _epochs(t, data, xva, yva, ckpt, on_epoch, max_epochs)
        result: dict[str, Any] = {"run_id": run_id, "state": outcome,
                                  "epochs_run": len(t.history), "val_acc": t.stopper.best}
        if outcome == "pruned":
            mlflow.set_tag("state", outcome)
            mlflow.log_metric("val_acc", t.stopper.best)
            ckpt.remove()
        elif outcome == "complete":
            if t.stopper.best_state is not None:
                t.model.load_state_dict(t.stopper.best_state)  # select on validation
            result.update(_finish(t, data, split, (xva, yva), (xte, yte), log_model))
            mlflow.set_tag("state", outcome)
            ckpt.remove()
    if outcome == "interrupted":
        # Not FINISHED: a worker or a report must never take a half-trained run for done.
        mlflow.MlflowClient().set_terminated(run_id, "KILLED")
    return result


def _epochs(t: Trainer, data: fer.FerData, xva: torch.Tensor, yva: torch.Tensor,
            ckpt: Checkpoint, on_epoch: EpochCallback | None, max_epochs: int | None) -> str:
    """Train epochs until the run is done ("complete"), pruned ("pruned") or has trained
    ``max_epochs`` in this call ("interrupted"). A checkpoint is written at most every
    ``checkpoint_every_s`` and at every stop, and the epochs it covers are logged right after
    it: MLflow never shows an epoch that a resume would train again."""
    cfg = t.cfg
    pending: list[dict[str, float]] = []  # epochs not yet in MLflow nor in the checkpoint
    last_save = time.monotonic()
    this_call = 0
    while not t.should_stop():
        if max_epochs is not None and this_call >= max_epochs:
            return "interrupted"
        desc = f"{cfg.stage} epoch {t.next_epoch + 1}/{cfg.epochs}"
        tr = train_one_epoch(t.step, t.gen, t.sched if t.when == "batch" else None, desc=desc)
        # A TTA run selects its epoch, steps its plateau and stops early on the accuracy it is
        # served with, the TTA one, as the study validated with TTA.
        va = evaluate_split(t.model, xva, yva, t.rt, tta=cfg.tta)
        selected = va["tta"]["acc"] if cfg.tta else va["acc"]
        t.train_seconds += tr["seconds"]
        # Epochs count from 1 everywhere (the progress line, the step, best_epoch), and no
        # per-epoch point sits at step 0, the step whose metrics MLflow ties to a logged model.
        row = {"epoch": t.next_epoch + 1, "train/loss": tr["loss"], "train/acc": tr["acc"],
               "val/loss": va["loss"], "val/acc": va["acc"],
               "train/img_per_s": tr["img_per_s"], "lr": float(t.opt.param_groups[0]["lr"])}
        if cfg.tta:
            row["val/acc_tta"] = selected
        t.history.append(row)
        pending.append(row)
        print(f"{desc}: loss {tr['loss']:.4f} acc {tr['acc']:.4f} | val loss "
              f"{va['loss']:.4f} acc {va['acc']:.4f}"
              f"{f' (tta {selected:.4f})' if cfg.tta else ''} | {tr['img_per_s']:.0f} img/s",
              flush=True)
        if t.when == "metric":
            t.sched.step(selected)
        elif t.when == "epoch" and t.sched is not None:
            t.sched.step()
        epoch = t.next_epoch
        stopped = t.stopper.update(selected, epoch, t.model)
        t.next_epoch += 1
        this_call += 1
        halt = max_epochs is not None and this_call >= max_epochs
        if stopped or halt or t.next_epoch >= cfg.epochs or on_epoch is not None or \
                time.monotonic() - last_save >= cfg.checkpoint_every_s:
            ckpt.save(t, data)
            for r in pending:
                mlflow.log_metrics({k: v for k, v in r.items() if k != "epoch"},
                                   step=int(r["epoch"]))
            pending.clear()
            last_save = time.monotonic()
        if on_epoch is not None:
            try:
                on_epoch(epoch, {"val_acc": selected, "train_acc": tr["acc"]})
            except StopRun:
                return "pruned"
    return "complete"


def _log_unlogged(run_id: str, history: list[dict[str, float]]) -> None:
    """Log the checkpointed epochs that never reached MLflow (the store went away between the
    checkpoint and the log), and none twice."""
    logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "val/acc")}
    for row in history:
        if int(row["epoch"]) not in logged:
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"},
                               step=int(row["epoch"]))


def _check_resumable(run_id: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow.MlflowClient().get_run(run_id)
        status = run.info.status
    except MlflowException:
        raise UsageError(f"--resume {run_id}: no such run in the tracking store "
                         f"{mlflow.get_tracking_uri()}.") from None
    if status == "FINISHED":
        raise UsageError(f"--resume {run_id}: that run is FINISHED; there is nothing to resume "
                         f"(train a new run instead).")
    owner = run.data.tags.get("owner")
    if status == "RUNNING" and tracking.owner_alive(owner):
        raise UsageError(f"--resume {run_id}: that run is still training in process "
                         f"{owner.rsplit(':', 2)[1]} on this machine; stop it first.")


def _finish(t: Trainer, data: fer.FerData, split: Split, val: tuple[torch.Tensor, torch.Tensor],
            test: tuple[torch.Tensor, torch.Tensor], log_model: bool) -> dict[str, Any]:
    """Final metrics of the selected model (with and without TTA, so the toggle needs no
    retraining) and artifacts.

    They are computed in fp32, the precision the logged model serves in, whatever precision
    trained the run. ``train_acc`` is the clean accuracy on the train split (no augmentation, no
    dropout), beside ``majority_rate``, the share of its largest class: a net that did not
    train sits at the latter, whatever its last epoch's augmented accuracy said."""
    model, cfg, history, stopper = t.model, t.cfg, t.history, t.stopper
    (xva, yva), (xte, yte) = val, test
    rt = copy.copy(t.rt)
    rt.bf16 = False
    tr = evaluate_split(model, t.step.images, t.step.labels, rt)
    counts = torch.bincount(t.step.labels.cpu(), minlength=len(fer.EMOTIONS))
    va = evaluate_split(model, xva, yva, rt, tta=True)
    va_t = va["tta"]
    has_test = len(yte) > 0
    te = evaluate_split(model, xte, yte, rt, tta=True) if has_test else None
    te_t = te["tta"] if has_test else None
    # The run's own TTA choice decides which predictions the F1 and the figures describe.
    ref_y, ref = (yte, te_t if cfg.tta else te) if has_test else (yva, va_t if cfg.tta else va)
    y_true = ref_y.numpy()
    y_pred = ref["probs"].argmax(1).numpy()
    labels = list(range(len(fer.EMOTIONS)))
    macro, f1s = stats.macro_f1(y_true, y_pred, len(labels))
    metrics = {"val_acc": va["acc"], "val_acc_tta": va_t["acc"], "val_loss": va["loss"],
               "train_acc": tr["acc"], "majority_rate": float(counts.max() / counts.sum()),
               "macro_f1": macro, "train_seconds": t.train_seconds,
               "epochs_run": len(history), "best_epoch": stopper.best_epoch + 1,
               "train_img_per_s": float(np.mean([h["train/img_per_s"] for h in history])),
               "eval_img_per_s": va["img_per_s"],
               "train_acc_final": history[-1]["train/acc"]}
    metrics.update({f"f1_{e}": float(f) for e, f in zip(fer.EMOTIONS, f1s) if np.isfinite(f)})
    if has_test:
        metrics.update({"test_acc": te["acc"], "test_acc_tta": te_t["acc"]})
    model_uri = model_id = None
    if log_model:
        info = serving.log(serving.classifier(cfg, model.state_dict()), cfg,
                           data.images[split.val[:2]])
        model_uri, model_id = info.model_uri, info.model_id
        mlflow.set_tag("model_uri", model_uri)
    # Linked to the model and the data set, so the model's page shows these final figures.
    mlflow.log_metrics(metrics, model_id=model_id, dataset=tracking.dataset(data))

    part = "test" if has_test else "val"
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    tracking.log_figure(plots.learning_curves(history), "learning_curves.png")
    tracking.log_figure(plots.confusion(cm, f"Confusion matrix, {part} (rows normalised)"),
                        "confusion_matrix.png")
    tracking.log_text(classification_report(y_true, y_pred, labels=labels,
                                            target_names=list(fer.EMOTIONS), digits=4,
                                            zero_division=0), "classification_report.txt")
    rows = split.test if has_test else split.val
    tracking.log_figure(plots.misclassified(data.images[rows], y_true, y_pred),
                        "misclassified.png")
    # Per-image predictions let the ablation run paired tests between models.
    preds = {"val": va["probs"].argmax(1).numpy().astype(np.int8),
             "val_tta": va_t["probs"].argmax(1).numpy().astype(np.int8),
             "val_labels": yva.numpy().astype(np.int8)}
    if has_test:
        preds.update({"test": te["probs"].argmax(1).numpy().astype(np.int8),
                      "test_tta": te_t["probs"].argmax(1).numpy().astype(np.int8),
                      "test_labels": yte.numpy().astype(np.int8)})
    tracking.log_npz(preds, "predictions.npz")
    return {"model_uri": model_uri, **metrics,
            "test_acc": metrics.get("test_acc"), "test_acc_tta": metrics.get("test_acc_tta")}


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
    tracking.setup(a.experiment)
    tracking.check_reachable()
    data = fer.load(a.data)
    fer.check_usage(data)
    resume = a.resume or os.environ.get("MLFLOW_RUN_ID")
    out = train(cfg, data, resume_run_id=resume, run_name=run_name(cfg, overrides))
    keys = ("run_id", "model_uri", "val_acc", "test_acc", "val_acc_tta", "test_acc_tta")
    print(json.dumps({k: out.get(k) for k in keys}))
    return 0


if __name__ == "__main__":
    run_main(main)
