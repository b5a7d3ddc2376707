"""Figures logged as artifacts. Every function returns a matplotlib Figure of its own, made without
pyplot, whose figure registry is not thread-safe: runs training side by side in one process draw
their figures at the same time. Nothing here chooses matplotlib's backend (a Figure saves to PNG
through Agg whatever it is), so importing the pipeline in a notebook leaves the notebook's own."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from .config import EMOTIONS


def _subplots(*grid: int, figsize: tuple[float, float], **kw: Any):
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **kw)


def class_distribution(counts: dict[str, dict[str, int]]):
    """Grouped bars: one group per emotion, one bar per split."""
    fig, ax = _subplots(figsize=(9, 4))
    parts = [p for p, c in counts.items() if sum(c.values())]
    w = 0.8 / max(len(parts), 1)
    x = np.arange(len(EMOTIONS))
    for i, part in enumerate(parts):
        ax.bar(x + i * w, [counts[part][e] for e in EMOTIONS], w, label=part)
    ax.set_xticks(x + w * (len(parts) - 1) / 2, EMOTIONS)
    ax.set_ylabel("images")
    ax.set_title("Class distribution per split")
    ax.legend()
    fig.tight_layout()
    return fig


def face_grid(images: np.ndarray, labels: np.ndarray, per_class: int = 8, seed: int = 0,
              title: str = "Sample faces per emotion"):
    rng = np.random.default_rng(seed)
    fig, axes = _subplots(len(EMOTIONS), per_class, figsize=(per_class * 1.1, 7 * 1.15))
    for c, name in enumerate(EMOTIONS):
        idx = np.flatnonzero(labels == c)
        pick = rng.permutation(idx)[:per_class]
        for j in range(per_class):
            ax = axes[c, j]
            ax.axis("off")
            if j < len(pick):
                ax.imshow(images[pick[j]], cmap="gray", vmin=0, vmax=255)
        axes[c, 0].set_title(name, fontsize=8, loc="left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def learning_curves(history: list[dict[str, float]]):
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = _subplots(1, 2, figsize=(10, 4))
    for part in ("train", "val"):
        a1.plot(ep, [h[f"{part}/loss"] for h in history], marker="o", label=part)
        a2.plot(ep, [h[f"{part}/acc"] for h in history], marker="o", label=part)
    a1.set(xlabel="epoch", ylabel="loss", title="Loss")
    a2.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    a1.legend()
    a2.legend()
    fig.tight_layout()
    return fig


def confusion(cm: np.ndarray, title: str = "Confusion matrix (rows normalised)"):
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = _subplots(figsize=(6.5, 5.5))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(EMOTIONS)), EMOTIONS, rotation=45, ha="right")
    ax.set_yticks(range(len(EMOTIONS)), EMOTIONS)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    for i in range(len(EMOTIONS)):
        for j in range(len(EMOTIONS)):
            ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def misclassified(images: np.ndarray, labels: np.ndarray, preds: np.ndarray, n: int = 32,
                  seed: int = 0):
    wrong = np.flatnonzero(labels != preds)
    pick = np.random.default_rng(seed).permutation(wrong)[:n]
    cols = 8
    rows = max(1, int(np.ceil(len(pick) / cols)))
    fig, axes = _subplots(rows, cols, figsize=(cols * 1.3, rows * 1.5), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(pick):
            i = pick[k]
            ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{EMOTIONS[labels[i]][:4]}->{EMOTIONS[preds[i]][:4]}", fontsize=7)
    fig.suptitle("Misclassified (true -> predicted)")
    fig.tight_layout()
    return fig


def forest(rows: Sequence[Any]):
    """One line per effect on test (``findings.Effect``): mean and 95% CI in accuracy points,
    zero marked; a row whose arm did not train shows that instead of a size."""
    fig, ax = _subplots(figsize=(8.5, 0.45 * len(rows) + 1.6))
    y = np.arange(len(rows))[::-1]
    for yi, e in zip(y, rows):
        if not e.is_size:
            ax.text(0, yi, "did not train at these settings", ha="center", va="center",
                    fontsize=8, color="tab:red", bbox=dict(facecolor="white", edgecolor="none"))
            continue
        if np.isfinite(e.lo):
            ax.plot([e.lo * 100, e.hi * 100], [yi, yi], color="tab:blue", lw=2)
        ax.plot([e.mean * 100], [yi], "o", color="tab:blue" if np.isfinite(e.mean) else "tab:red")
    ax.axvline(0, color="grey", ls="--", lw=1)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_yticks(y, [e.pair.label for e in rows])
    ax.set_xlabel("effect on test accuracy (points), mean and 95% CI over seeds")
    ax.set_title("What each component buys")
    fig.tight_layout()
    return fig


def ladder(stages: Sequence[str], measured: dict[str, tuple[float, float, float]],
           reported: dict[str, float]):
    """Measured val accuracy (mean, lo, hi) per stage, as selected on (with TTA where the stage
    validates with TTA), beside the study's reported figure."""
    fig, ax = _subplots(figsize=(7, 4))
    x = np.arange(len(stages))
    m = np.array([measured.get(s, (np.nan,) * 3)[0] for s in stages])
    # An accuracy interval never leaves [0, 1], however few seeds stretched it.
    lo = np.clip([measured.get(s, (np.nan,) * 3)[1] for s in stages], 0, 1)
    hi = np.clip([measured.get(s, (np.nan,) * 3)[2] for s in stages], 0, 1)
    err = np.nan_to_num(np.vstack([m - lo, hi - m]))
    ax.bar(x - 0.2, m, 0.4, yerr=err, capsize=3, label="measured (val, as selected on)")
    ax.bar(x + 0.2, [reported.get(s, np.nan) for s in stages], 0.4, label="reported (val)")
    ax.set_xticks(x, stages)
    ax.set_ylabel("accuracy")
    ax.set_title("Stage ladder")
    ax.legend()
    fig.tight_layout()
    return fig


def emotions_over_time(times: np.ndarray, probs: np.ndarray, faces: np.ndarray, title: str):
    """Each emotion's probability at each sampled moment of a video, averaged over the faces
    found then; moments without a face are gaps, and a strip below counts the faces."""
    fig, (ax, axn) = _subplots(2, 1, figsize=(10, 4.6), sharex=True,
                                  gridspec_kw={"height_ratios": [4, 1]})
    for i, e in enumerate(EMOTIONS):
        ax.plot(times, probs[:, i], marker=".", ms=3, lw=1.2, label=e)
    ax.set_ylim(0, 1)
    ax.set_ylabel("probability")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    axn.bar(times, faces, width=(times[1] - times[0]) * 0.8 if len(times) > 1 else 0.5,
            color="grey")
    axn.set_ylabel("faces")
    axn.set_xlabel("time (s)")
    fig.tight_layout()
    return fig


def close(fig: Any) -> None:
    """Free a figure once it is saved or logged: pyplot keeps every one it made (Optuna's plots
    come from pyplot); a Figure of our own is freed with its last reference."""
    if getattr(getattr(fig, "canvas", None), "manager", None) is not None:
        import matplotlib.pyplot as plt

        plt.close(fig)
