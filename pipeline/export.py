"""``python -m pipeline.export``: copy a run's logged model out of the tracking store into a plain
MLflow model folder (``models/<name>/`` in a repo, say), rebuilt with this version's serving
wrapper and the run's own config, so ``mlflow.pyfunc.load_model(folder)`` works anywhere."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch
import yaml

from . import serving, tracking
from .cli import parser, run_main
from .config import build, from_dict
from .errors import UsageError
from .evaluate import load_model


def example_faces(n: int = 2) -> np.ndarray:
    """Synthetic uint8 faces for the model's input example: an exported folder is meant to be
    shared, so it carries no image of the data set it was trained on."""
    yy, xx = np.mgrid[0:48, 0:48]
    face = 200 - 120 * (((yy - 22) / 20) ** 2 + ((xx - 24) / 16) ** 2)  # a bright oval
    return np.stack([np.clip(face + 10 * i, 0, 255) for i in range(n)]).astype(np.uint8)


def export(model_uri: str, out: str | Path, force: bool = False,
           config: str | None = None) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: a file, not a model folder; --force replaces only a "
                         f"folder. Remove it or choose another path.")
    if out.exists() and not force:
        raise UsageError(f"{out} exists; pass --force to replace it.")
    if out.exists() and not (out / "MLmodel").is_file():
        # --force deletes what it replaces: only ever a model folder (`--out . --force` would
        # otherwise take the checkout with it).
        raise UsageError(f"--out {out}: not a model folder (no MLmodel file in it); --force "
                         f"replaces only a model folder. Choose a new or a model folder.")
    clf = load_model(model_uri).clf
    if config:
        cfg = build(config)
    else:
        run_id = mlflow.models.get_model_info(model_uri).run_id
        if not run_id:
            raise UsageError(f"{model_uri}: the model names no run, so its config is unknown; "
                             f"pass --config with the config it was trained with.")
        cfg_file = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.yaml")
        cfg = from_dict(yaml.safe_load(Path(cfg_file).read_text()), source=f"run {run_id} config")
    try:
        rebuilt = serving.classifier(cfg, clf.net.state_dict())
    except RuntimeError as e:  # load_state_dict: missing, unexpected or mis-shaped weights
        raise UsageError(f"{model_uri}: its network does not fit config {cfg.stage} "
                         f"({str(e).splitlines()[0][:200]}).") from None
    views = getattr(clf, "views", None)
    if views is not None and (rebuilt.tta != clf.tta or views.shape != rebuilt.views.shape or
                              not torch.allclose(views.float(), rebuilt.views)):
        raise UsageError(f"{model_uri}: its TTA views differ from those of the config; pass the "
                         f"config it was trained with.")
    # Write beside the target and swap, so a failed export never leaves half a folder.
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        staged = Path(tmp) / "model"
        serving.save(rebuilt, cfg, example_faces(), staged)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser("Export a logged model to an MLflow model folder.")
    p.add_argument("--model-uri", required=True,
                   help="e.g. models:/m-..., runs:/RUN_ID/STAGE or a folder")
    p.add_argument("--out", required=True, help="folder to write, e.g. models/improved")
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    p.add_argument("--config", default=None,
                   help="the config the model was trained with (default: its run's config.yaml)")
    a = p.parse_args(argv)
    tracking.setup(a.experiment)
    tracking.sweep_dead_runs()
    print(export(a.model_uri, a.out, a.force, a.config))
    return 0


if __name__ == "__main__":
    run_main(main)
