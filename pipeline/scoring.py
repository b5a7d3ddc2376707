"""Scoring a model: its predictions on a split (with and without TTA), a run's final scores and
figures, and the work they take (``predicted_work``: what a study's estimate counts, written
beside the code that does it)."""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import classification_report, confusion_matrix
from torch import nn
from tqdm import tqdm

from . import data as fer
from . import plots, stats
from .augment import tta_thetas
from .config import Config
from .engine import Runtime, current_slot, stop_point
from .models import view_probs

if TYPE_CHECKING:
    from .train import Splits, Trainer


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, rt: Runtime, tta: bool = False,
            progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax probabilities (N, 7) on the CPU, and with ``tta`` also their average over the
    TTA views (the first view is the original, so both come from one pass)."""
    cfg = rt.cfg
    model.eval()
    thetas = tta_thetas(cfg) if tta else torch.eye(2, 3)[None]  # the original view alone
    bs = cfg.eval_batch_size or (1024 if rt.device.type == "cuda" else 64)
    plain, averaged = [], []
    rng = range(0, len(images), bs)
    for start in tqdm(rng, desc=progress, leave=False,
                      disable=None if progress and not current_slot().concurrent else True):
        stop_point()
        x = rt.to_input(images[start:start + bs].to(rt.device))
        with rt.autocast():
            ps = view_probs(model, x, thetas, cfg.normalize)
        plain.append(ps[0].cpu())
        if tta:
            averaged.append((sum(ps) / len(ps)).cpu())
    empty = torch.empty(0, 7)
    return (torch.cat(plain) if plain else empty,
            (torch.cat(averaged) if averaged else empty) if tta else None)


@dataclass(frozen=True)
class Scores:
    """One model's loss, accuracy and softmax probabilities on one split; from
    :func:`evaluate_split` also the images/s of the whole pass (TTA views included) and, with
    TTA, the same scores of the TTA-averaged predictions."""

    loss: float
    acc: float
    probs: torch.Tensor
    img_per_s: float = math.nan
    tta: Scores | None = None

    @classmethod
    def of(cls, probs: torch.Tensor, labels: torch.Tensor) -> Scores:
        y = labels.cpu()
        if len(y) == 0:
            return cls(math.nan, math.nan, probs)
        loss = F.nll_loss(torch.log(probs.clamp_min(1e-12)), y).item()
        return cls(loss, (probs.argmax(1) == y).float().mean().item(), probs)

    def served(self, tta: bool) -> Scores:
        """The scores of the predictions a run is served with (TTA-averaged or not)."""
        return self.tta if tta else self


def evaluate_split(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, rt: Runtime,
                   tta: bool = False) -> Scores:
    t0 = time.perf_counter()
    plain, averaged = predict(model, images, rt, tta)
    seconds = max(time.perf_counter() - t0, 1e-9)
    return replace(Scores.of(plain, labels),
                   img_per_s=len(images) * (len(tta_thetas(rt.cfg)) if tta else 1) / seconds,
                   tta=Scores.of(averaged, labels) if tta else None)


@dataclass
class FinalScores:
    """The selected model's final figures, in fp32 (the precision the logged model serves in),
    with and without TTA, so the toggle needs no retraining. ``train_acc`` is the clean
    accuracy on the train split (no augmentation, no dropout), beside ``majority_rate``, the
    share of its largest class: a net that did not train sits at the latter, whatever its last
    epoch's augmented accuracy said. ``y_true``/``y_pred`` are what the F1 and the figures
    describe: test (val when the run saw no test), as the run itself is served (TTA or not)."""

    metrics: dict[str, float]
    part: str
    rows: np.ndarray
    y_true: np.ndarray
    y_pred: np.ndarray
    predictions: dict[str, np.ndarray]


@dataclass(frozen=True)
class Work:
    """The images one run trains on and scores, as ``train`` and ``final_scores`` process them:
    what a study's estimate divides by the rates measured on its machine."""

    trained: float  # every epoch's share of the train split
    validated: float  # scored after each epoch, in the training precision
    final: float  # scored once at the end, in fp32: the clean train split, val and test


def predicted_work(cfg: Config, n_training: int, n_test: int) -> Work:
    """``n_training``: the file's Training rows (split here into train and val); ``n_test``:
    the rows a final score reads as test. Early stopping is not foreseen: every epoch counts."""
    n_val = round(n_training * cfg.val_fraction)
    n_train = (n_training - n_val) * cfg.data_fraction
    views = len(tta_thetas(cfg))
    return Work(trained=n_train * cfg.epochs,
                validated=cfg.epochs * n_val * (views if cfg.tta else 1),
                final=n_train + (n_val + n_test) * views)


def final_scores(t: "Trainer", sp: "Splits") -> FinalScores:
    rt = t.rt.fp32()
    (xva, yva), (xte, yte) = sp.val, sp.test
    tr = evaluate_split(t.model, t.step.images, t.step.labels, rt)
    counts = torch.bincount(t.step.labels.cpu(), minlength=len(fer.EMOTIONS))
    va = evaluate_split(t.model, xva, yva, rt, tta=True)
    te = evaluate_split(t.model, xte, yte, rt, tta=True) if len(yte) else None
    ref, ref_y = (te, yte) if te is not None else (va, yva)
    y_true = ref_y.numpy()
    y_pred = ref.served(t.cfg.tta).probs.argmax(1).numpy()
    cs = stats.class_scores(y_true, y_pred, len(fer.EMOTIONS))
    h = t.history
    metrics = {"val_acc": va.acc, "val_acc_tta": va.tta.acc, "val_loss": va.loss,
               "train_acc": tr.acc, "majority_rate": float(counts.max() / counts.sum()),
               "macro_f1": cs.macro_f1, "train_seconds": t.train_seconds, "epochs_run": len(h),
               "best_epoch": t.stopper.best_epoch + 1,
               "train_img_per_s": float(np.mean([r["train/img_per_s"] for r in h])),
               "eval_img_per_s": va.img_per_s, "train_acc_final": h[-1]["train/acc"]}
    metrics.update({f"f1_{e}": float(f) for e, f in zip(fer.EMOTIONS, cs.f1) if np.isfinite(f)})
    # Per-image predictions let the ablation run paired tests between models.
    preds = {"val": va.probs.argmax(1).numpy().astype(np.int8),
             "val_tta": va.tta.probs.argmax(1).numpy().astype(np.int8),
             "val_labels": yva.numpy().astype(np.int8)}
    if te is not None:
        metrics.update({"test_acc": te.acc, "test_acc_tta": te.tta.acc})
        preds.update({"test": te.probs.argmax(1).numpy().astype(np.int8),
                      "test_tta": te.tta.probs.argmax(1).numpy().astype(np.int8),
                      "test_labels": yte.numpy().astype(np.int8)})
    return FinalScores(metrics, "test" if te is not None else "val",
                       sp.split.test if te is not None else sp.split.val, y_true, y_pred, preds)


def final_figures(history: list[dict[str, float]], fs: FinalScores,
                  images: np.ndarray) -> dict[str, Any]:
    """The run's figures and its classification report, by artifact name (``images``: the
    file's faces, indexed by ``fs.rows``)."""
    labels = list(range(len(fer.EMOTIONS)))
    cm = confusion_matrix(fs.y_true, fs.y_pred, labels=labels)
    return {"learning_curves.png": plots.learning_curves(history),
            "confusion_matrix.png": plots.confusion(
                cm, f"Confusion matrix, {fs.part} (rows normalised)"),
            "classification_report.txt": classification_report(
                fs.y_true, fs.y_pred, labels=labels, target_names=list(fer.EMOTIONS), digits=4,
                zero_division=0),
            "misclassified.png": plots.misclassified(images[fs.rows], fs.y_true, fs.y_pred)}


def figures_seconds(n_scored: int, epochs: int) -> float:
    """How long a run's final figures take to draw and encode as PNG on this machine, on made-up
    predictions of ``n_scored`` faces: most of what a short run spends outside its passes."""
    rng = np.random.default_rng(0)
    y_true, y_pred = (rng.integers(0, len(fer.EMOTIONS), n_scored) for _ in range(2))
    fs = FinalScores({}, "test", np.arange(n_scored), y_true, y_pred, {})
    history = [{"epoch": e + 1, "train/loss": 1.0, "train/acc": 0.5, "val/loss": 1.0,
                "val/acc": 0.5, "train/img_per_s": 1.0, "lr": 1e-3} for e in range(epochs)]
    images = rng.integers(0, 256, (n_scored, 48, 48), dtype=np.uint8)
    t0 = time.perf_counter()
    for item in final_figures(history, fs, images).values():
        if not isinstance(item, str):
            item.savefig(io.BytesIO(), format="png")  # as mlflow.log_figure saves it
            plots.close(item)
    return time.perf_counter() - t0
