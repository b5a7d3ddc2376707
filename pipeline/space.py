"""The search file of ``pipeline.tune``, read and checked: a base config, a nested space of its
keys, a sampler, a pruner, and each profile's budgets; and the fingerprint that names the search."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from . import numbers
from . import study as lifecycle
from .config import RANGES, SCHEDULERS, Config, build, coerce, config_path
from .errors import ConfigError, UsageError
from .numbers import SEED, WHOLE_0, WHOLE_1, Range


SPACE_KEYS = ("base", "profiles", "sampler", "pruner", "space")
# The arguments a search file may give each sampler and pruner, with the numbers each takes.
SAMPLERS = {"tpe": (optuna.samplers.TPESampler,
                    {"seed": SEED, "n_startup_trials": WHOLE_0, "n_ei_candidates": WHOLE_1}),
            "random": (optuna.samplers.RandomSampler, {"seed": SEED})}
_STEPS = {"n_warmup_steps": WHOLE_0, "interval_steps": WHOLE_1}
PRUNERS = {"median": (optuna.pruners.MedianPruner,
                      {"n_startup_trials": WHOLE_0, "n_min_trials": WHOLE_1, **_STEPS}),
           "hyperband": (optuna.pruners.HyperbandPruner,
                         {"min_resource": (WHOLE_1, ("auto",)),
                          "max_resource": (WHOLE_1, ("auto",)),
                          "reduction_factor": Range(whole=True, low=2)}),
           "threshold": (optuna.pruners.ThresholdPruner,
                         {"lower": Range(), "upper": Range(), **_STEPS}),
           "none": (optuna.pruners.NopPruner, {})}


def load_space(path: str | Path, profile: str) -> "Space":
    """Read and check the search file, as :func:`pipeline.ablate.load_study` reads a study:
    through the same reader, every config value checked, before any trial."""
    p = Path(path)
    d, prof = lifecycle.read_study_file(p, "search-space", SPACE_KEYS, profile)
    budget = dict(prof.get("set") or {})
    retrain = prof.get("retrain") or budget
    space = d.get("space") or {}
    if not isinstance(space, dict) or not isinstance(retrain, dict):
        raise UsageError(f"{p}: space and a profile's retrain must be mappings, got "
                         f"{space!r} and {retrain!r}.")
    base = d.get("base") if d.get("base") is not None else Config().stage
    if not isinstance(base, str):
        raise UsageError(f"{p}: base: expected a stage name or a config YAML path, got "
                         f"{numbers.shown(base)}.")
    try:
        base_path = config_path(base)
    except ConfigError as e:
        raise UsageError(f"{p}: base: {e}") from None
    sp = Space(path=p, base_path=base_path, profile=profile,
               budget=budget, retrain=dict(retrain),
               sampler_spec=d.get("sampler") or {"name": "tpe", "seed": 0},
               pruner_spec=d.get("pruner") or {"name": "median"}, space=space)
    if not sp.space:
        raise UsageError(f"{p}: the space is empty; give at least one parameter.")
    sp.retrain.update(lifecycle.check_budget(sp.retrain, f"{p} profile {profile} retrain"))
    try:
        sp.check(sp.space, str(p))
        build(sp.base_path, sp.budget)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    sp.sampler()
    sp.pruner()
    return sp


@dataclass(frozen=True)
class Space:
    """The search file, checked: a base config, a nested space, a sampler, a pruner, budgets."""

    path: Path
    base_path: Path
    profile: str
    budget: dict[str, Any]
    retrain: dict[str, Any]  # the budget of --retrain-best (default: the search's)
    sampler_spec: dict[str, Any]
    pruner_spec: dict[str, Any]
    space: dict[str, Any]

    def check(self, space: dict, where: str) -> None:
        for key, spec in space.items():
            at = f"{where}: {key}"
            if not isinstance(spec, dict) or "type" not in spec:
                raise UsageError(f"{at}: expected {{type: float|int|categorical, ...}}.")
            if key not in Config().to_dict():
                coerce(key, None, at)  # raises: unknown key, with the valid ones listed
            if spec["type"] in ("float", "int"):
                self._check_range(key, spec, at)
            elif spec["type"] == "categorical":
                choices = spec.get("choices")
                if not choices:
                    raise UsageError(f"{at}: categorical needs a non-empty list or mapping of "
                                     f"choices.")
                names = list(choices)
                if key == "scheduler":
                    bad = [c for c in names if c not in SCHEDULERS]
                    if bad:
                        raise UsageError(f"{at}: unknown scheduler(s) {bad}; choose from "
                                         f"{', '.join(SCHEDULERS)}.")
                for c in names:
                    coerce(key, c, at)
                if isinstance(choices, dict):
                    for c, sub in choices.items():
                        self.check(sub or {}, f"{at}={c}")
            else:
                raise UsageError(f"{at}: unknown type {spec['type']!r}; use float, int or "
                                 f"categorical.")

    @staticmethod
    def _check_range(key: str, spec: dict, at: str) -> None:
        """``low`` and ``high`` read by the key's own range (pipeline.numbers), written back as
        numbers, so ``1e-4`` (text to YAML) samples as it reads."""
        rng = RANGES.get(key)
        if rng is None:
            raise UsageError(f"{at}: {key} is not a number; search it as type: categorical.")
        if spec["type"] == "float" and rng.whole:
            raise UsageError(f"{at}: {key} is a whole number; search it as type: int.")
        rng = dataclasses.replace(rng, whole=spec["type"] == "int")
        for end in ("low", "high"):
            spec[end] = numbers.check(spec.get(end), rng, f"{at}: {end}", UsageError)
            if spec[end] is None:
                raise UsageError(f"{at}: {end}: expected {rng.expected()}, got nothing.")
        if spec["low"] >= spec["high"]:
            raise UsageError(f"{at}: empty or inverted range [{spec['low']}, {spec['high']}]; "
                             f"low must be below high.")
        if not isinstance(spec.get("log", False), bool):
            raise UsageError(f"{at}: log: expected true or false, got "
                             f"{numbers.shown(spec['log'])}.")
        if spec.get("log") and spec["low"] <= 0:
            raise UsageError(f"{at}: a log range needs low > 0, got {spec['low']}.")

    def sample(self, trial: optuna.Trial, space: dict | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, spec in (self.space if space is None else space).items():
            if spec["type"] == "float":
                out[key] = trial.suggest_float(key, spec["low"], spec["high"],
                                               log=bool(spec.get("log")))
            elif spec["type"] == "int":
                out[key] = trial.suggest_int(key, spec["low"], spec["high"],
                                             log=bool(spec.get("log")))
            else:
                choice = trial.suggest_categorical(key, list(spec["choices"]))
                out[key] = choice
                if isinstance(spec["choices"], dict):
                    out.update(self.sample(trial, spec["choices"][choice] or {}))
        return out

    def config(self, params: dict[str, Any], budget: dict[str, Any], seed: int) -> Config:
        return build(self.base_path, {**budget, **params, "seed": seed})

    def sampler(self) -> optuna.samplers.BaseSampler:
        return self._engine("sampler", self.sampler_spec, "tpe", SAMPLERS)

    def pruner(self) -> optuna.pruners.BasePruner:
        return self._engine("pruner", self.pruner_spec, "median", PRUNERS)

    def _engine(self, what: str, spec: Any, default: str,
                kinds: dict[str, tuple[Any, dict[str, Any]]]) -> Any:
        """An Optuna sampler or pruner from its spec, every argument checked as a number here:
        a wrong one is one line naming the file, not a TypeError from Optuna's constructor."""
        if not isinstance(spec, dict):
            raise UsageError(f"{self.path}: {what}: expected a mapping such as "
                             f"{{name: {default}}}, got {numbers.shown(spec)}.")
        spec = dict(spec)
        name = spec.pop("name", default)
        if not isinstance(name, str) or name not in kinds:
            raise UsageError(f"{self.path}: unknown {what} {numbers.shown(name)}; choose "
                             f"{', '.join(kinds)}.")
        cls, args = kinds[name]
        kwargs = {}
        for k, v in spec.items():
            if k not in args:
                raise UsageError(f"{self.path}: {what} {name}: unknown key {k!r}; valid keys: "
                                 f"{', '.join(args) or 'none'}.")
            rng, words = args[k] if isinstance(args[k], tuple) else (args[k], ())
            if v in words:
                kwargs[k] = v
            else:
                got = numbers.check(v, rng, f"{self.path}: {what} {name}: {k}", UsageError)
                if got is not None:
                    kwargs[k] = got
        return cls(**kwargs)


def fingerprint(sp: Space) -> str:
    """What the search trains, parsed: a new comment or a reordered file is the same search."""
    parts = [sp.base_path.stem, sorted(sp.budget.items()), sorted(sp.retrain.items()),
             sp.sampler_spec, sp.pruner_spec, sp.space]
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]
