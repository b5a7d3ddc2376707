"""One config object per run, built in layers: dataclass defaults, a YAML file, ``--set`` overrides.

Unknown keys, wrong types and values outside a key's choices are errors that list what is valid.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .numbers import POSITIVE, SEED, WHOLE_0, WHOLE_1, Range, check, shown

# FER2013's label order: label k is EMOTIONS[k].
EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

STAGES = ("basic", "batchnorm", "resnet", "advanced", "improved")
SCHEDULERS = ("plateau", "cosine", "onecycle", "step", "none")
OPTIMIZERS = ("adam", "sgd")
NORMALIZE = ("unit", "symmetric")  # pixels in [0,1] or [-1,1]
PRECISIONS = ("auto", "bf16", "fp32")
TOGGLES = ("batchnorm", "residual", "augment", "label_smoothing", "grad_clip", "tta")


@dataclass(frozen=True)
class Config:
    # --- network
    stage: str = "improved"
    width: float = 1.0  # channel multiplier
    conv_dropout: float = 0.0
    fc_dropout: float = 0.5
    batchnorm: bool = True
    residual: bool = False
    # --- optimisation
    epochs: int = 15
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9  # sgd only (Nesterov)
    weight_decay: float = 0.0
    scheduler: str = "none"
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    min_lr: float = 1e-6
    cosine_floor: float = 0.0  # eta_min as a share of lr
    onecycle_max_lr: float = 1e-2
    onecycle_pct_start: float = 0.3
    step_size: int = 10
    step_gamma: float = 0.1
    early_stopping: int = 0  # patience in epochs; 0 = off
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # max grad norm; 0 = off
    # --- data
    data_fraction: float = 1.0  # share of the train split used
    val_fraction: float = 0.2
    split_seed: int = 0  # follows seed unless set: each seed draws its own train/val split
    normalize: str = "unit"
    augment: bool = False
    rotation: float = 10.0  # degrees
    translate: float = 0.1  # share of the image side
    scale_min: float = 1.0
    scale_max: float = 1.0
    flip: bool = True
    brightness: float = 0.0
    contrast: float = 0.0
    # --- evaluation
    tta: bool = False
    tta_rotation: float = 5.0
    tta_translate: float = 0.05
    eval_batch_size: int = 0  # 0 = auto: 64 on a CPU (cache-bound), 1024 on a GPU
    # --- runtime
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    cuda_graphs: bool = True  # replay each training step as one CUDA graph (GPU, Adam)
    deterministic: bool = False
    checkpoint_every_s: float = 30.0  # at most this often (and at every stop); 0 = every epoch

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {"stage": STAGES, "scheduler": SCHEDULERS, "optimizer": OPTIMIZERS,
            "normalize": NORMALIZE, "precision": PRECISIONS}
# The values each numeric key may take, as torch and numpy accept them, so a bad value is one
# line here and not a traceback from an optimiser's constructor. Read by pipeline.numbers, the one
# rule for numbers on every surface (a whole number also ends at numbers.WHOLE_MAX).
_SHARE, _AT_LEAST_0 = Range(low=0, high=1), Range(low=0)
_DEGREES = Range(low=0, high=180)
RANGES: dict[str, Range] = {
    "epochs": WHOLE_1, "batch_size": WHOLE_1, "eval_batch_size": WHOLE_0, "lr": POSITIVE,
    "width": POSITIVE, "data_fraction": Range(low=0, high=1, low_open=True),
    "val_fraction": _SHARE, "conv_dropout": _SHARE, "fc_dropout": _SHARE, "label_smoothing": _SHARE,
    "grad_clip": _AT_LEAST_0, "early_stopping": WHOLE_0,
    "plateau_factor": Range(low=0, high=1, low_open=True, high_open=True),
    "plateau_patience": WHOLE_0, "step_size": WHOLE_1,
    "onecycle_pct_start": Range(low=0, high=1, low_open=True, high_open=True),
    "cosine_floor": _SHARE, "momentum": Range(low=0, high=1, high_open=True),
    "weight_decay": _AT_LEAST_0, "min_lr": _AT_LEAST_0, "onecycle_max_lr": POSITIVE,
    "step_gamma": POSITIVE, "split_seed": SEED, "seed": SEED,
    "rotation": _DEGREES, "translate": _SHARE, "scale_min": POSITIVE, "scale_max": POSITIVE,
    "brightness": _SHARE, "contrast": _SHARE, "tta_rotation": _DEGREES, "tta_translate": _SHARE,
    "checkpoint_every_s": _AT_LEAST_0}
_TYPES = {f.name: f.type for f in fields(Config)}


def _hint(name: str) -> type:
    return typing.get_type_hints(Config)[name]


def coerce(key: str, value: Any, source: str = "config") -> Any:
    """Check one key and value against the dataclass; ``None`` (no value: the default applies)
    for a value not given. Numbers follow pipeline.numbers, as on every other surface."""
    if key not in _TYPES:
        valid = ", ".join(sorted(_TYPES))
        raise ConfigError(f"{source}: unknown key {key!r}. Valid keys: {valid}.")
    want = _hint(key)
    if key in RANGES:
        return check(value, RANGES[key], f"{source}: {key}", ConfigError)
    if value is None or value == "":
        return None
    if not (isinstance(value, bool) if want is bool else isinstance(value, str)):
        raise ConfigError(f"{source}: {key}: expected {'true or false' if want is bool else 'text'}"
                          f", got {shown(value)}.")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"{source}: {key}={value!r} is not valid; choose one of "
                          f"{', '.join(_CHOICES[key])}.")
    return value


def served_val_metric(tta: bool) -> str:
    """The final val metric a run's model is served with, and so selected and compared on: a run
    trained with ``tta`` serves (and validated) its TTA-averaged predictions."""
    return "val_acc_tta" if tta else "val_acc"


def from_dict(d: dict[str, Any], source: str = "config") -> Config:
    values = given({k: coerce(k, v, source) for k, v in d.items()})
    # An interval over seeds then covers which faces landed in val as well as initialisation;
    # paired arms of one seed share the split. Resolved here, so params show the split used.
    values.setdefault("split_seed", values.get("seed", 0))
    cfg = Config(**values)
    if cfg.scale_min > cfg.scale_max:
        raise ConfigError(f"{source}: scale_min={cfg.scale_min} > scale_max={cfg.scale_max}.")
    if not (cfg.device in ("auto", "cpu", "mps") or cfg.device.startswith("cuda")):
        raise ConfigError(f"{source}: device={cfg.device!r}; expected auto, cpu, cuda[:N] or mps.")
    return cfg


def load_yaml(path: str | Path, what: str = "config", error: type[Exception] = ConfigError,
              keys: typing.Collection[str] | None = None) -> dict[str, Any]:
    """The one way a YAML file of the project is read: a mapping, with its keys among ``keys``
    when given; anything else is ``error`` naming the file and what was expected."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{p}: no such {what} file.")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{p}: not valid YAML{_yaml_where(e)}.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{p}: cannot be read ({getattr(e, 'strerror', None) or e}).") from None
    if not isinstance(d, dict):
        raise error(f"{p}: expected a mapping of {what} keys, got {type(d).__name__}.")
    unknown = sorted(set(d) - set(keys)) if keys is not None else []
    if unknown:
        raise error(f"{p}: unknown key {unknown[0]!r}. Valid keys: {', '.join(sorted(keys))}.")
    return d


def _yaml_where(e: yaml.YAMLError) -> str:
    """`` at line 3, column 7: mapping values are not allowed here``: the one line of a YAML
    error that says where and what (PyYAML's own message spans several, with the text)."""
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    return (f" at line {mark.line + 1}, column {mark.column + 1}: {what}" if mark is not None
            else f": {what}")


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["epochs=1", "tta=false"]`` -> ``{"epochs": 1, "tta": False}`` (values read as YAML)."""
    out: dict[str, Any] = {}
    # An item may hold several pairs separated by spaces (MLproject passes one string).
    for item in [w for it in items or [] for w in it.split()]:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set epochs=1.")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def build(config: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file, then overrides; each layer is checked as it is applied."""
    d: dict[str, Any] = {}
    if config is not None:
        d.update(given({k: coerce(k, v, str(config)) for k, v in load_yaml(config).items()}))
    d.update(given({k: coerce(k, v, "--set") for k, v in (overrides or {}).items()}))
    return from_dict(d)


def given(d: dict[str, Any]) -> dict[str, Any]:
    """The keys given a value; a key written without one keeps the layer below."""
    return {k: v for k, v in d.items() if v is not None}


def _ablations() -> Path:
    """The study, search and stage files: inside the package where a wheel put them
    (``pipeline/ablations``), else in the checkout beside it."""
    here = Path(__file__).resolve().parent
    return here / "ablations" if (here / "ablations").is_dir() else here.parent / "ablations"


ABLATIONS = _ablations()
STAGE_DIR = ABLATIONS / "stages"


def config_path(name: str) -> Path:
    """A stage name (``improved``) or a config YAML path (``tune_report/best_config.yaml``)."""
    if name.endswith((".yaml", ".yml")):
        return Path(name)
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)} or give a "
                          f"config YAML path.")
    return STAGE_DIR / f"{name}.yaml"


def flatten(cfg: Config) -> dict[str, str]:
    """Params for MLflow: every key, always, so runs compare column by column."""
    return {k: str(v) for k, v in cfg.to_dict().items()}


def unflatten(params: dict[str, str]) -> dict[str, Any]:
    """A run's logged params read back as the config's types (``flatten`` wrote them as text),
    the one place they are parsed; params that are not config keys are left out."""
    defaults = Config().to_dict()
    out: dict[str, Any] = {}
    for k, text in params.items():
        if k not in defaults:
            continue
        kind = type(defaults[k])
        out[k] = (text == "True" if kind is bool else kind(text) if kind in (int, float)
                  else None if text == "None" else text)
    return out


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML. ``split_seed`` is written only where it differs from
    ``seed``: otherwise it followed the seed, and a study that reseeds this file (a tuned
    ``best_config.yaml`` as its reference, say) must draw a split per seed again."""
    d = cfg.to_dict()
    if d["split_seed"] == d["seed"]:
        del d["split_seed"]
    return yaml.safe_dump(d, sort_keys=False)
