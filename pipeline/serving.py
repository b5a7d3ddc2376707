"""The logged model: an MLflow pyfunc that takes faces as a user has them, raw pixels or photos,
and answers with named emotions.

Two kinds of request, told apart by their form:

- **Raw pixels**: integers or floats 0..255, shaped (N, 48, 48), (N, 1, 48, 48) or (N, 2304),
  as a numpy array, nested lists (the JSON of `mlflow models serve`) or a DataFrame of 2304
  columns. Answer: one row per face, a probability per emotion and the predicted ``label``.
- **Photos**: a column (or key) named ``image`` holding encoded images (JPEG, PNG, BMP, WebP,
  TIFF, GIF) as bytes or base64 text, so ``curl`` can send them. Every face in each photo is
  found, cropped as FER2013 crops (:mod:`pipeline.faces`) and scored exactly as raw pixels are.
  Answer: one row per face found, with the photo's index (``image``) and the face's box
  (``x``, ``y``, ``w``, ``h``) before the probabilities; a photo with no face has no row.

Refused, with a one-line reason as the 400's message and no server traceback: other shapes,
values outside 0..255, NaN, a float batch already scaled to 0..1 (it would otherwise be read as
a nearly black face and answered wrongly), bad base64, damaged images, and batches over the
limits (:data:`MAX_FACES` over the whole request, photos' faces included; :data:`MAX_PHOTOS`;
:data:`MAX_REQUEST_PIXELS`, all the photos' pixels, read from their headers before any is decoded;
environment variables of the same names with a ``FER_`` prefix change them).

The folder keeps the network as a state dict (floats in half precision: the folder travels
with every checkout, and the scores hold; see the README) beside the run's resolved config, and
is loaded by this module (``loader_module``). The folder's ``code`` carries only what loading
imports, :data:`SERVED_MODULES`: no training, study or command-line code.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
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

from . import faces
from .augment import tta_thetas
from .config import EMOTIONS, from_dict, to_yaml
from .errors import InputError
from .models import FerClassifier, build_model

# The modules a model folder carries: this one and its imports, and nothing they do not need
# (a test loads a folder with only these on the path).
SERVED_MODULES = ("__init__.py", "errors.py", "numbers.py", "config.py", "augment.py",
                  "models.py", "faces.py", "serving.py")

WEIGHTS, CONFIG = "weights.pt", "config.yaml"
ACCEPTED = "raw grey pixels 0..255 shaped (N, 48, 48), (N, 1, 48, 48) or (N, 2304)"
PHOTOS = "photos as base64 text or bytes in a column (or key) named 'image'"
IMAGE = "image"
BOX = ("x", "y", "w", "h")


def _limit(name: str, default: int) -> int:
    raw = os.environ.get(f"FER_{name}", "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        value = 0
    if value < 1:
        raise InputError(f"FER_{name}={raw!r} must be a whole number of at least 1.")
    return value


# A request over these is refused at once rather than left to run past the server's timeout
# (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, 60 s by default), after which the server would go on
# scoring for a client that is gone. A 2-core CPU scored 4,000 faces with 4-view TTA in 54 s
# through `mlflow models serve` (the README has the figures): 2,000 leaves room for a slower one.
MAX_FACES = 2000
MAX_PHOTOS = 64
# Pixels of all a request's photos together: 64 photos of a 12-megapixel phone. Decoding is the
# photo path's cost (detection runs at DETECT_SIDE whatever the photo's size), and one photo is
# held decoded at a time.
MAX_REQUEST_PIXELS = 64 * 12_000_000


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
    out["label"] = [EMOTIONS[i] for i in probs.argmax(1)] if len(probs) else []
    return out


def photos_in(batch: Any) -> list | None:
    """The encoded photos of a request, or None when it is a raw-pixel request."""
    if isinstance(batch, pd.DataFrame):
        if IMAGE not in batch.columns:
            return None
        if len(batch.columns) != 1:
            raise InputError(f"a photo request holds one column, {IMAGE!r}; this one also has "
                             f"{[c for c in batch.columns if c != IMAGE][:5]}.")
        return list(batch[IMAGE])
    if isinstance(batch, dict) and IMAGE in batch:
        if len(batch) != 1:
            raise InputError(f"a photo request holds one key, {IMAGE!r}; this one also has "
                             f"{[k for k in batch if k != IMAGE][:5]}.")
        v = batch[IMAGE]
        return [v] if isinstance(v, (str, bytes)) else list(np.asarray(v, dtype=object).ravel())
    if isinstance(batch, (bytes, bytearray)):
        return [bytes(batch)]
    return None


_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,")


def photo_bytes(value: Any, i: int) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        blob = bytes(value)
    elif isinstance(value, str):
        try:
            blob = base64.b64decode(_DATA_URL.sub("", value.strip()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise InputError(f"image {i}: not base64 text ({e}); send the file's bytes encoded "
                             f"with base64, e.g. `base64 -w0 photo.jpg`.") from None
    else:
        raise InputError(f"image {i}: expected base64 text or bytes; got {type(value).__name__}.")
    if not blob:
        raise InputError(f"image {i} is empty.")
    return blob


def _fuse(module: torch.nn.Module) -> None:
    """Fold each eval-mode BatchNorm into the conv or linear layer just before it."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    pairs = ((torch.nn.Conv2d, torch.nn.BatchNorm2d, fuse_conv_bn_eval),
             (torch.nn.Linear, torch.nn.BatchNorm1d, fuse_linear_bn_eval))
    for seq in [m for m in module.modules() if isinstance(m, torch.nn.Sequential)]:
        for i in range(len(seq) - 1):
            for layer, norm, fuse in pairs:
                if type(seq[i]) is layer and type(seq[i + 1]) is norm and \
                        seq[i + 1].track_running_stats:
                    seq[i] = fuse(seq[i], seq[i + 1])
                    seq[i + 1] = torch.nn.Identity()


def fast_copy(clf: FerClassifier) -> FerClassifier:
    """The classifier as scored on a CPU: BatchNorm folded into the layer before it and
    channels-last weights (oneDNN's fast layout), the same function to within float rounding
    (probabilities within 1e-5). The original stays untouched for export and training."""
    import copy

    fast = copy.deepcopy(clf).eval()
    _fuse(fast.net)
    return fast.to(memory_format=torch.channels_last)


class ServedModel:
    """What ``mlflow.pyfunc.load_model`` returns the inside of: the run's classifier, fp32 on
    the CPU, with its TTA views applied when the run was trained with TTA."""

    def __init__(self, clf):
        self.clf = clf.eval()
        self.fast = fast_copy(self.clf)

    def probs(self, batch: Any, tta: bool | None = None) -> np.ndarray:
        return self._scores(to_pixels(batch), tta)

    @torch.no_grad()
    def _scores(self, x: torch.Tensor, tta: bool | None, batch_size: int = 256) -> np.ndarray:
        # In batches: memory stays flat however many faces come.
        use = self.clf.tta if tta is None else tta
        out = [self.fast.probs(x[s:s + batch_size], use).float().numpy()
               for s in range(0, len(x), batch_size)]
        return np.concatenate(out)

    def read_photos(self, greys: list[np.ndarray], tta: bool | None = None
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each grey photo, its face boxes (k, 4) and their probabilities (k, 7), all faces
        scored in one batch."""
        return self.score_faces([faces.faces(g) for g in greys], tta)

    def score_faces(self, found: list[tuple[np.ndarray, np.ndarray]], tta: bool | None = None
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """(boxes, crops) per photo -> (boxes, probabilities) per photo, in one batch."""
        crops = np.concatenate([c for _, c in found])
        probs = self.probs(crops, tta) if len(crops) else np.zeros((0, len(EMOTIONS)))
        out, at = [], 0
        for boxes, _ in found:
            out.append((boxes, probs[at:at + len(boxes)]))
            at += len(boxes)
        return out

    def predict(self, model_input: Any, params: dict | None = None) -> pd.DataFrame:
        photos = photos_in(model_input)
        if photos is None:
            x = to_pixels(model_input)
            limit = _limit("MAX_FACES", MAX_FACES)
            if len(x) > limit:
                raise InputError(f"the batch holds {len(x)} faces; this server scores at most "
                                 f"{limit} per request (FER_MAX_FACES): send them in parts.")
            return answer(self._scores(x, None))
        if not photos:
            raise InputError("the request holds no photo.")
        limit = _limit("MAX_PHOTOS", MAX_PHOTOS)
        if len(photos) > limit:
            raise InputError(f"the request holds {len(photos)} photos; this server reads at most "
                             f"{limit} per request (FER_MAX_PHOTOS): send them in parts.")
        found = self.score_faces(find_faces([photo_bytes(v, i) for i, v in enumerate(photos)]))
        rows = [(i, *b) for i, (boxes, _) in enumerate(found) for b in boxes.tolist()]
        head = pd.DataFrame(rows, columns=[IMAGE, *BOX], dtype=np.int64)
        return pd.concat([head, answer(np.concatenate([p for _, p in found]))], axis=1)


def find_faces(blobs: list[bytes]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(boxes, crops) of each encoded photo. The request's pixels are counted from the photos'
    headers before any is decoded (FER_MAX_REQUEST_PIXELS), the photos are decoded one at a
    time (only their crops are kept), and the faces are counted over the whole request
    (FER_MAX_FACES), so that neither many photos nor one tiled with faces takes more than a
    request may."""
    names = [f"image {i}" for i in range(len(blobs))]
    pixels = sum(w * h for w, h in (faces.size_of(b, n) for b, n in zip(blobs, names)))
    limit = _limit("MAX_REQUEST_PIXELS", MAX_REQUEST_PIXELS)
    if pixels > limit:
        raise InputError(f"the request's photos hold {pixels / 1e6:.0f} megapixels; this server "
                         f"reads at most {limit / 1e6:.0f} per request "
                         f"(FER_MAX_REQUEST_PIXELS): send them in parts, or smaller.")
    most, found, count = _limit("MAX_FACES", MAX_FACES), [], 0
    for blob, name in zip(blobs, names):
        found.append(faces.faces(faces.grey(faces.open_image(blob, name), name)))
        count += len(found[-1][0])
        if count > most:
            raise InputError(f"the request's photos hold more than {most} faces (found by "
                             f"{name}); this server scores at most {most} per request "
                             f"(FER_MAX_FACES): send the photos in parts.")
    return found


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
    try:
        state = torch.load(d / WEIGHTS, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise RuntimeError(f"{d / WEIGHTS} is damaged or truncated ({str(e).splitlines()[0]}"
                           f"); the model folder must be written again") from None
    return ServedModel(classifier(cfg, state))


def signature() -> ModelSignature:
    # No input schema: MLflow would enforce one dtype and one shape, and the model takes three
    # shapes in any numeric dtype; to_pixels checks the input and says what it expects.
    # The photo columns come only with a photo request, so they are optional.
    return ModelSignature(outputs=Schema(
        [ColSpec("long", c, required=False) for c in (IMAGE, *BOX)] +
        [ColSpec("double", e) for e in EMOTIONS] + [ColSpec("string", "label")]))


def _requirements() -> list[str]:
    # Stated, not inferred: inference loads the model in a subprocess and takes a minute.
    pins = [f"torch=={torch.__version__.split('+')[0]}"]
    return pins + [f"{p}=={version(p)}" for p in ("mlflow", "numpy", "pyyaml", "scikit-learn",
                                                   "pandas", "pillow", "opencv-python-headless")]


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
                metadata={"input": f"{ACCEPTED}; or {PHOTOS}",
                          "output": "a probability per emotion and label (per face found, with "
                                    "its photo's index and box, for photos)",
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
