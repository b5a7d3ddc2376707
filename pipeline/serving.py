"""The logged model: an MLflow pyfunc that takes raw face pixels as a user has them and answers
with named emotions.

Accepted input: integers or floats 0..255, shaped (N, 48, 48), (N, 1, 48, 48) or (N, 2304), as a
numpy array, nested lists (the JSON of `mlflow models serve`) or a DataFrame of 2304 columns.
Rejected, with a one-line reason: other shapes, values outside 0..255, NaN, and a float batch
already scaled to 0..1 (it would otherwise be read as a nearly black face and answered wrongly).
Output: a DataFrame with one probability column per emotion and the predicted ``label``.

The folder keeps the network as a state dict (floats in half precision: the folder travels
with every checkout, and the scores hold; see the README) beside the run's resolved config, and
is loaded by this module (``loader_module``). The folder's ``code`` carries only what loading
imports, :data:`SERVED_MODULES`: no training, study or command-line code.
"""

from __future__ import annotations

import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
import yaml
from mlflow.models.signature import ModelSignature
from mlflow.types import ColSpec, Schema

from .augment import tta_thetas
from .config import EMOTIONS, from_dict, to_yaml
from .models import FerClassifier, build_model

# The modules a model folder carries: this one and its imports, and nothing they do not need
# (a test loads a folder with only these on the path).
SERVED_MODULES = ("__init__.py", "errors.py", "config.py", "augment.py", "models.py",
                  "serving.py")

WEIGHTS, CONFIG = "weights.pt", "config.yaml"
ACCEPTED = "raw grey pixels 0..255 shaped (N, 48, 48), (N, 1, 48, 48) or (N, 2304)"


class InputError(ValueError):
    """A batch the model cannot read as faces."""


def to_pixels(batch: Any) -> torch.Tensor:
    """Raw pixels in any accepted form -> float32 tensor (N, 1, 48, 48) in 0..255."""
    if isinstance(batch, pd.DataFrame):
        batch = batch.to_numpy()
    elif isinstance(batch, dict) and len(batch) == 1:  # {"inputs": ...} from a served request
        batch = next(iter(batch.values()))
    try:
        x = np.asarray(batch)
    except ValueError:
        raise InputError(f"expected {ACCEPTED}; got a ragged batch.") from None
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise InputError(f"expected {ACCEPTED}; got values of type {x.dtype}.")
    shape = tuple(x.shape)
    if x.ndim == 2 and shape[1] == 48 * 48:
        x = x.reshape(-1, 1, 48, 48)
    elif x.ndim == 3 and shape[1:] == (48, 48):
        x = x[:, None]
    elif not (x.ndim == 4 and shape[1:] == (1, 48, 48)):
        raise InputError(f"expected {ACCEPTED}; got shape {shape}.")
    if len(x) == 0:
        raise InputError("the batch holds no image.")
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise InputError("the batch holds NaN or infinite values; expected pixels 0..255.")
        hi = float(x.max())
        if 0 < hi <= 1.0:
            raise InputError(f"the batch looks scaled to 0..1 (max {hi:g}); the model takes raw "
                             f"pixels 0..255: multiply by 255.")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 255:
        raise InputError(f"pixel values must lie in 0..255; this batch spans {lo:g}..{hi:g}.")
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def answer(probs: np.ndarray) -> pd.DataFrame:
    out = pd.DataFrame(probs.astype(np.float64), columns=list(EMOTIONS))
    out["label"] = [EMOTIONS[i] for i in probs.argmax(1)]
    return out


class ServedModel:
    """What ``mlflow.pyfunc.load_model`` returns the inside of: the run's classifier, fp32 on
    the CPU, with its TTA views applied when the run was trained with TTA."""

    def __init__(self, clf):
        self.clf = clf.eval()

    @torch.no_grad()
    def probs(self, batch: Any, tta: bool | None = None, batch_size: int = 256) -> np.ndarray:
        x = to_pixels(batch)
        use = self.clf.tta if tta is None else tta
        out = [self.clf.probs(x[s:s + batch_size], use).float().numpy()
               for s in range(0, len(x), batch_size)]
        return np.concatenate(out)

    def predict(self, model_input: Any, params: dict | None = None) -> pd.DataFrame:
        return answer(self.probs(model_input))


def classifier(cfg, net_state: dict[str, torch.Tensor]):
    """The served form of a trained network: fp32 on the CPU, raw pixels in, with the run's own
    TTA views (applied when the run was trained with TTA)."""
    net = build_model(cfg)
    net.load_state_dict({k: v.detach().cpu().float() for k, v in net_state.items()})
    return FerClassifier(net, cfg.normalize, tta_thetas(cfg), cfg.tta).eval()


def _load_pyfunc(data_path: str) -> ServedModel:
    """MLflow's entry point for this folder's python_function flavor."""
    d = Path(data_path)
    cfg = from_dict(yaml.safe_load((d / CONFIG).read_text()), source=str(d / CONFIG))
    return ServedModel(classifier(cfg, torch.load(d / WEIGHTS, map_location="cpu",
                                                  weights_only=True)))


def signature() -> ModelSignature:
    # No input schema: MLflow would enforce one dtype and one shape, and the model takes three
    # shapes in any numeric dtype; to_pixels checks the input and says what it expects.
    return ModelSignature(outputs=Schema([ColSpec("double", e) for e in EMOTIONS] +
                                         [ColSpec("string", "label")]))


def _requirements() -> list[str]:
    # Stated, not inferred: inference loads the model in a subprocess and takes a minute.
    pins = [f"torch=={torch.__version__.split('+')[0]}"]
    return pins + [f"{p}=={version(p)}" for p in ("mlflow", "numpy", "pyyaml", "scikit-learn",
                                                   "pandas")]


def _half(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.half() if t.is_floating_point() else t


def _model_files(clf, cfg, tmp: Path) -> Path:
    d = tmp / "fer"
    d.mkdir()
    torch.save({k: _half(v) for k, v in clf.net.state_dict().items()}, d / WEIGHTS)
    (d / CONFIG).write_text(to_yaml(cfg))
    return d


def _code(tmp: Path) -> Path:
    """The package as the folder carries it: :data:`SERVED_MODULES` alone."""
    d = tmp / "pipeline"
    d.mkdir()
    here = Path(__file__).parent
    for name in SERVED_MODULES:
        shutil.copy(here / name, d / name)
    return d


def _kwargs(example: np.ndarray, tmp: Path) -> dict[str, Any]:
    return dict(loader_module="pipeline.serving", code_paths=[str(_code(tmp))],
                signature=signature(), input_example=np.asarray(example, dtype=np.uint8),
                pip_requirements=_requirements(),
                metadata={"input": ACCEPTED, "output": "a probability per emotion and label",
                          "emotions": list(EMOTIONS)})


def log(clf, cfg, example: np.ndarray, **kwargs) -> Any:
    """Log the classifier in the active run, named after its stage; returns MLflow's ModelInfo."""
    with tempfile.TemporaryDirectory() as tmp:
        return mlflow.pyfunc.log_model(name=cfg.stage, data_path=str(_model_files(clf, cfg,
                                                                                   Path(tmp))),
                                       **_kwargs(example, Path(tmp)), **kwargs)


def save(clf, cfg, example: np.ndarray, path: str | Path) -> None:
    """Write an MLflow model folder loadable with ``mlflow.pyfunc.load_model(path)``."""
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.pyfunc.save_model(str(path), data_path=str(_model_files(clf, cfg, Path(tmp))),
                                 **_kwargs(example, Path(tmp)))


def load(model_uri: str) -> ServedModel:
    """The served model of a URI or folder, for scoring in this process (``evaluate``); models
    logged as a pickled torch module by earlier versions load too."""
    local = Path(model_uri) if Path(model_uri).is_dir() else \
        Path(mlflow.artifacts.download_artifacts(model_uri))
    flavors = yaml.safe_load((local / "MLmodel").read_text())["flavors"]
    if "pytorch" in flavors:
        return ServedModel(mlflow.pytorch.load_model(str(local), map_location="cpu"))
    data = flavors["python_function"]["data"]
    return _load_pyfunc(str(local / data))
