"""The study's split of FER2013 (stratified, seeded train/val from Training; PublicTest as test;
PrivateTest kept apart), and ``python -m pipeline.split``, which logs it as an MLflow run."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import mlflow
import numpy as np

from . import data as fer
from . import plots, tracking
from .cli import Number, parser, run_main, share
from .numbers import SEED
from .data import EMOTIONS, FerData, check_usage
from .errors import DataError


@dataclass(frozen=True)
class Split:
    """Row indices into a :class:`FerData` for each part of the study's protocol."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    holdout: np.ndarray  # PrivateTest rows: never used for training, selection or tuning

    def parts(self) -> dict[str, np.ndarray]:
        return {"train": self.train, "val": self.val, "test": self.test, "holdout": self.holdout}


def stratified_indices(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions 0..len(labels)-1 into (rest, picked) with ``round(n_c * fraction)`` of
    each class picked. Uses numpy's PCG64, whose stream is the same on every platform."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in range(len(EMOTIONS)):
        idx = np.flatnonzero(labels == c)
        k = int(round(len(idx) * fraction))
        picked.append(rng.permutation(idx)[:k])
    chosen = np.sort(np.concatenate(picked)) if picked else np.empty(0, np.int64)
    rest = np.setdiff1d(np.arange(len(labels)), chosen)
    return rest, chosen


def make_split(data: FerData, val_fraction: float = 0.2, seed: int = 0) -> Split:
    if not 0 < val_fraction < 1:
        raise DataError(f"val fraction {val_fraction} is out of range; expected a share in (0, 1).")
    check_usage(data)
    training = data.rows("Training")
    rest, val = stratified_indices(data.labels[training], val_fraction, seed)
    return Split(train=training[rest], val=training[val], test=data.rows("PublicTest"),
                 holdout=data.rows("PrivateTest"))


def subsample(rows: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified share of ``rows`` (for quick runs on part of the train split)."""
    if fraction >= 1.0:
        return rows
    _, picked = stratified_indices(labels[rows], fraction, seed)
    return rows[picked]


def class_counts(labels: np.ndarray) -> dict[str, int]:
    counts = np.bincount(labels, minlength=len(EMOTIONS))
    return {e: int(n) for e, n in zip(EMOTIONS, counts)}


def run_split(path: str, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Load, split and log; returns the per-split class counts and the run id."""
    t0 = time.perf_counter()
    ds = fer.load(path)  # before the run starts: bad data leaves no run behind
    split = make_split(ds, val_fraction, seed)
    load_s = time.perf_counter() - t0
    counts = {name: class_counts(ds.labels[idx]) for name, idx in split.parts().items()}
    with tracking.run(name=f"split s{seed}", tags={"stage": "split", "seed": str(seed)}) as r:
        mlflow.log_params({"source": ds.source, "val_fraction": val_fraction, "seed": seed,
                           "data_digest": ds.digest})
        tracking.log_input(ds, context="source")
        # Counts are facts about the data, not results: params and a table, so they stay out
        # of the metric columns and charts that compare trained models.
        mlflow.log_params({"n_rows": len(ds),
                           **{f"n_{part}": sum(c.values()) for part, c in counts.items()}})
        mlflow.log_table({"split": [p for p in counts for _ in fer.EMOTIONS],
                          "emotion": [e for _ in counts for e in fer.EMOTIONS],
                          "images": [counts[p][e] for p in counts for e in fer.EMOTIONS]},
                         "split/class_counts_table.json")
        mlflow.log_metric("load_seconds", load_s)
        tracking.log_npz({k: v.astype(np.int32) for k, v in split.parts().items()},
                         "split/split_indices.npz")
        tracking.log_text(json.dumps(counts, indent=2), "split/class_counts.json")
        tracking.log_figure(plots.class_distribution(counts), "split/class_distribution.png")
        train = split.train
        tracking.log_figure(plots.face_grid(ds.images[train], ds.labels[train], seed=seed),
                            "split/sample_faces.png")
    if len(split.test) == 0:
        print(f"note: {ds.source} has no PublicTest rows; later stages will report no test "
              f"accuracy.")
    return {"run_id": r.info.run_id, "counts": counts, "load_seconds": load_s}


def main(argv: list[str] | None = None) -> int:
    p = parser("Split FER2013 into train/val (stratified, seeded), test and holdout, and log it.")
    p.add_argument("--data", required=True, help="fer2013.csv(.gz), icml_face_data.csv or an "
                                                 "image folder with train/ and test/")
    p.add_argument("--val-fraction", type=share, default=0.2)
    p.add_argument("--seed", type=Number(SEED), default=0)
    a = p.parse_args(argv)
    fer.check_source(a.data)  # before any store is created
    tracking.setup(a.experiment)
    tracking.sweep_dead_runs()
    out = run_split(a.data, a.val_fraction, a.seed)
    rows = [(part, sum(c.values())) for part, c in out["counts"].items()]
    print("  ".join(f"{p}={n}" for p, n in rows))
    print(json.dumps({"run_id": out["run_id"], **{p: n for p, n in rows}}))
    return 0


if __name__ == "__main__":
    run_main(main)
