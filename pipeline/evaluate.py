"""``python -m pipeline.evaluate``: score a logged model on any file and Usage, logged as a run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix

from . import data as fer
from . import plots, serving, stats, tracking
from .cli import parser, run_main
from .errors import UsageError


def load_model(model_uri: str) -> serving.ServedModel:
    try:
        return serving.load(model_uri)
    except (MlflowException, OSError, KeyError, RuntimeError) as e:
        raise UsageError(f"cannot load model {model_uri!r}: {str(e).splitlines()[0][:300]}. "
                         f"Expected a model folder or a URI printed by `pipeline.train`, e.g. "
                         f"models:/m-... or runs:/<run_id>/<stage>.") from None


def _or_none(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def score(y: np.ndarray, probs: np.ndarray, usage: str) -> dict[str, Any]:
    """Accuracy, macro-F1 and each class's scores, by the one rule ``train`` logs them with
    (:func:`pipeline.stats.class_scores`): a class the rows lack has no F1 (null)."""
    pred = probs.argmax(1)
    s = stats.class_scores(y, pred, len(fer.EMOTIONS))
    per_class = {e: {"precision": _or_none(s.precision[i]), "recall": _or_none(s.recall[i]),
                     "f1": _or_none(s.f1[i]), "support": int(s.support[i])}
                 for i, e in enumerate(fer.EMOTIONS)}
    return {"usage": usage, "n": int(len(y)), "accuracy": float((pred == y).mean()),
            "macro_f1": s.macro_f1, "per_class": per_class}


def check_output(predictions: str) -> None:
    """Refuse an unusable --predictions path before anything is scored or logged."""
    p = Path(predictions)
    if p.is_dir():
        raise UsageError(f"--predictions {p}: that is a folder; give a file, e.g. {p / 'preds.csv'}.")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--predictions {p}: {parent} is a file, not a folder.")
            break


def run_evaluate(model_uri: str, path: str, usage: str = "PublicTest", tta: bool | None = None,
                 predictions: str | None = None) -> dict[str, Any]:
    if predictions:
        check_output(predictions)
    ds = fer.load(path)
    rows = ds.rows(usage)
    if len(rows) == 0:
        have = ", ".join(f"{u} ({n})" for u, n in zip(*np.unique(ds.usage, return_counts=True)))
        raise UsageError(f"{path}: no rows with Usage {usage!r}; the file has {have}.")
    model = load_model(model_uri)
    y = ds.labels[rows]
    tta = model.clf.tta if tta is None else tta  # None: as the model is served
    probs = model.probs(ds.images[rows], tta)
    result = score(y, probs, usage)
    if predictions:  # written before the run is logged: a run is never left claiming a file
        table = pd.DataFrame({"index": rows, "label": y, "predicted": probs.argmax(1)})
        for i, e in enumerate(fer.EMOTIONS):
            table[f"p_{e}"] = probs[:, i].round(6)
        Path(predictions).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(predictions, index=False)
    with tracking.run(name=f"evaluate {usage}{' tta' if tta else ''}",
                      tags={"stage": "evaluate", "model_uri": model_uri}):
        mlflow.log_params({"model_uri": model_uri, "data": ds.source, "usage": usage,
                           "tta": tta, "data_digest": ds.digest})
        tracking.log_input(ds, context=usage)
        mlflow.log_metrics({"accuracy": result["accuracy"], "macro_f1": result["macro_f1"],
                            "n": result["n"]})
        mlflow.log_metrics({f"f1_{e}": v["f1"] for e, v in result["per_class"].items()
                            if v["f1"] is not None})
        cm = confusion_matrix(y, probs.argmax(1), labels=list(range(len(fer.EMOTIONS))))
        tracking.log_figure(plots.confusion(cm, f"Confusion matrix, {usage}"),
                            "confusion_matrix.png")
        tracking.log_text(json.dumps(result, indent=2), "evaluation.json")
    return result


def main(argv: list[str] | None = None) -> int:
    p = parser("Score a logged model on a FER2013 file, for one Usage value.")
    p.add_argument("--model-uri", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--usage", default="PublicTest", help="any Usage value in the file")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average over the model's own test-time augmentation views (default: "
                        "as the model is served, i.e. with TTA if its run was trained with it)")
    p.add_argument("--predictions", default=None, metavar="FILE.csv",
                   help="write one row per image: index, label, predicted, 7 probabilities")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    a = p.parse_args(argv)
    fer.check_source(a.data)  # before any store is created
    tracking.setup(a.experiment)
    tracking.sweep_dead_runs()
    r = run_evaluate(a.model_uri, a.data, a.usage, a.tta, a.predictions)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{r['usage']}: n={r['n']} accuracy={r['accuracy']:.4f} "
              f"macro_f1={r['macro_f1']:.4f}")
        for e, v in r["per_class"].items():
            f1 = "  -  " if v["f1"] is None else f"{v['f1']:.3f}"
            print(f"  {e:9s} f1={f1} support={v['support']}")
    return 0


if __name__ == "__main__":
    run_main(main)
