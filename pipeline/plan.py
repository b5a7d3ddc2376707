"""The ablation's study file, read and checked: its cells (the ladder's stages, each toggle left out
of the reference and added to the base, the profile's extra arms), seeds and budget, and the
fingerprint that names the study."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from . import findings, numbers, sizing
from . import study as lifecycle
from .config import STAGES, TOGGLES, Config, build, config_path
from .errors import ConfigError, UsageError
from .models import supports_residual
from .numbers import WHOLE_1, Range

CellKind = Literal["stage", "leave-one-out", "add-one-in"]
LogModels = Literal["all", "none", "reference"]


@dataclass(frozen=True)
class Cell:
    name: str  # e.g. "advanced", "improved -batchnorm", "basic +augment"
    kind: CellKind
    stage: str
    overrides: dict[str, Any]
    toggle: str | None = None
    extra: bool = False  # declared in the profile's extra_cells (its own overrides)


@dataclass
class StudyPlan:
    """The study file, read and checked: its cells, seeds and budget. (The Optuna study of the
    same name is its work queue.)"""

    path: Path
    reference: str  # a stage name or a config YAML (e.g. the tuner's best_config.yaml)
    base: str
    ladder: list[str]
    seeds: int
    reported: dict[str, float]
    toggles: dict[str, dict]
    profile: str
    budget: dict[str, Any]
    log_models: LogModels  # reference: the reference stage's seed-0 model only
    # The profile's stage_set: a stage's own budget on top of `budget` (command-line budget
    # keys win over both).
    stage_budget: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: list[dict[str, Any]] = field(default_factory=list)  # the profile's extra_cells
    cells: list[Cell] = field(default_factory=list)
    # Cells left out because the toggle has nothing to act on in that stage, with the reason.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    bounds: sizing.Bounds | None = None  # the profile's sizing: how far --budget may resize it
    sized: sizing.Sizing | None = None  # the size --budget chose on this machine
    sizing_base: str | None = None  # the fingerprint of the study before it was sized

    def resize(self, data_fraction: float, epochs: int) -> StudyPlan:
        """The same study at another size: every cell's share of its train split and epochs."""
        keys = {"data_fraction": data_fraction, "epochs": epochs}
        return replace(self, budget={**self.budget, **keys}, cells=list(self.cells),
                       stage_budget={st: {k: v for k, v in kv.items() if k not in keys}
                                     for st, kv in self.stage_budget.items()})

    def config(self, cell: Cell, seed: int) -> Config:
        return build(config_path(cell.stage), {**cell.overrides, **self.budget,
                                               **self.stage_budget.get(cell.stage, {}),
                                               "seed": seed})

    def reduced(self) -> str:
        said = ", ".join(f"{k}={v}" for k, v in self.budget.items())
        for stage, kv in self.stage_budget.items():
            if kv:
                said += f"; stage {stage}: " + ", ".join(f"{k}={v}" for k, v in kv.items())
        return said or "none (the study's own settings)"


ACCURACY = Range(low=0, high=1)
STUDY_KEYS = ("reference", "base", "ladder", "seeds", "reported", "toggles", "profiles")


def _need(d: dict, key: str, kind: type, where: str) -> Any:
    if key not in d:
        raise UsageError(f"{where}: missing key {key!r}.")
    if not isinstance(d[key], kind):
        raise UsageError(f"{where}: {key} must be a {kind.__name__}, got {d[key]!r}.")
    return d[key]


def _check_toggles(toggles: dict, where: str) -> None:
    unknown = sorted(set(toggles) - set(TOGGLES))
    if unknown:
        raise UsageError(f"{where}: unknown toggle(s) {unknown}; valid toggles: "
                         f"{', '.join(TOGGLES)}.")
    for t, spec in toggles.items():
        if not (isinstance(spec, dict) and (spec.get("eval_only") or
                                            {"with", "without"} <= set(spec))):
            raise UsageError(f"{where}: toggle {t!r} needs 'with' and 'without' config keys "
                             f"(or eval_only: true).")
        for side in ("with", "without"):
            if side in spec and not isinstance(spec[side], dict):
                raise UsageError(f"{where}: toggle {t!r}: {side} must be a mapping of config "
                                 f"keys, got {spec[side]!r}.")
            if side in spec:
                spec[side] = lifecycle.check_budget(spec[side] or {}, f"{where} toggle {t} {side}")


def load_study(path: str | Path, profile: str, seeds: int | None = None,
               budget: dict[str, Any] | None = None) -> StudyPlan:
    """Read and check the study file; every cell's config is built here, before any training."""
    p = Path(path)
    d, prof = lifecycle.read_study_file(p, "study", STUDY_KEYS, profile)
    toggles = _need(d, "toggles", dict, str(p))
    _check_toggles(toggles, str(p))
    budget = lifecycle.check_budget(budget or {}, "the command line")
    s = StudyPlan(path=p, reference=_need(d, "reference", str, str(p)),
                  base=_need(d, "base", str, str(p)),
                  ladder=_ladder(d, p),
                  seeds=seeds if seeds is not None else _file_seeds(d, prof, p, profile),
                  reported=_reported(d, p), toggles=toggles,
                  profile=profile, budget={**(prof.get("set") or {}), **(budget or {})},
                  log_models="all" if prof.get("log_models", False) else "none",
                  extra=list(prof.get("extra_cells") or []),
                  stage_budget=_stage_budget(prof, budget or {}, f"{p} profile {profile}"),
                  bounds=sizing.read_bounds(prof["sizing"], f"{p} profile {profile}",
                                            prof.get("set") or {})
                  if prof.get("sizing") is not None else None)
    numbers.check(s.seeds, WHOLE_1, "seeds", UsageError)  # a study of no seeds has no answer
    try:
        s.cells = _cells(s)
        for c in s.cells:
            s.config(c, 0)
    except ConfigError as e:
        raise UsageError(str(e) if str(e).startswith(str(p)) else f"{p}: {e}") from None
    return s


def _ladder(d: dict, p: Path) -> list[str]:
    ladder = _need(d, "ladder", list, str(p))
    bad = [v for v in ladder if not isinstance(v, str) or not v.strip()]
    if bad or not ladder:
        raise UsageError(f"{p}: ladder: expected a list of stage names or config YAML paths, got "
                         f"{numbers.shown(bad[0] if bad else ladder)}.")
    return list(ladder)


def _file_seeds(d: dict, prof: dict, p: Path, profile: str) -> int:
    """The profile's seeds, else the file's (3 when neither says), each checked where it is
    written: a whole number 1 or more, never a value cut or a fallback taken silently."""
    found = None
    for where, mapping in ((f"{p} profile {profile}", prof), (str(p), d)):
        v = numbers.check(mapping.get("seeds"), WHOLE_1, f"{where}: seeds", UsageError)
        found = v if found is None else found
    return 3 if found is None else found


def _reported(d: dict, p: Path) -> dict[str, float]:
    reported = d.get("reported") or {}
    if not isinstance(reported, dict):
        raise UsageError(f"{p}: reported: expected a mapping of stage names to accuracies, got "
                         f"{numbers.shown(reported)}.")
    out = {}
    for stage, v in reported.items():
        got = numbers.check(v, ACCURACY, f"{p}: reported: {stage}", UsageError)
        if got is not None:
            out[str(stage)] = got
    return out


def _stage_budget(prof: dict, cli: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """The profile's ``stage_set``, checked; the command line's budget keys take precedence."""
    by_stage = prof.get("stage_set") or {}
    if not isinstance(by_stage, dict):
        raise UsageError(f"{where}: stage_set must map stage names to config keys, got "
                         f"{by_stage!r}.")
    out = {}
    for stage, kv in by_stage.items():
        if stage not in STAGES or not isinstance(kv, dict):
            raise UsageError(f"{where}: stage_set entry {stage!r}: {kv!r}; expected one of "
                             f"{', '.join(STAGES)} mapped to config keys.")
        kv = lifecycle.check_budget(kv, f"{where} stage_set {stage}")
        out[stage] = {k: v for k, v in kv.items() if k not in cli}
    return out


def _is_on(cfg: Config, spec: dict) -> bool:
    return all(getattr(cfg, k) == v for k, v in spec["with"].items())


def label(stage_or_yaml: str) -> str:
    """A cell's name for a stage (``improved``) or a config YAML (``best_config``)."""
    return Path(stage_or_yaml).stem if stage_or_yaml.endswith((".yaml", ".yml")) else stage_or_yaml


def _cells(s: StudyPlan) -> list[Cell]:
    # The reference and base need their own cells when they are not on the ladder (a tuned
    # config YAML as the reference, say).
    names = list(dict.fromkeys([*s.ladder, s.reference, s.base]))
    cells = [Cell(label(st), "stage", st, {}) for st in names]
    ref = build(config_path(s.reference))
    base = build(config_path(s.base))
    for t, spec in s.toggles.items():
        if spec.get("eval_only"):
            continue
        on = _is_on(ref, spec)
        # Leave-one-out: flip the toggle in the reference (for one it lacks, "flip" means add).
        loo = Cell(f"{label(s.reference)} {'-' if on else '+'}{t}", "leave-one-out",
                   s.reference, dict(spec["without" if on else "with"]), t)
        aoi = None if _is_on(base, spec) else Cell(f"{label(s.base)} +{t}", "add-one-in",
                                                   s.base, dict(spec["with"]), t)
        for cell, cfg in ((loo, ref), (aoi, base)):
            if cell is None or cell.name in {c.name for c in cells}:
                continue  # the base is the reference: adding T to it is the same cell
            if t == "residual" and not supports_residual(cfg.stage):
                s.skipped.append((cell.name, f"stage {cfg.stage} has no pair of convs at a "
                                             f"constant channel count to put a skip around"))
                continue
            cells.append(cell)
    return cells + [_extra_cell(s, spec, i, {c.name for c in cells})
                    for i, spec in enumerate(s.extra)]


def _token(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"{'+' if value else '-'}{key}"
    return f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"


def _extra_cell(s: StudyPlan, spec: Any, i: int, taken: set[str]) -> Cell:
    """One of the profile's ``extra_cells``: a toggle's arm at settings of its own (the improved
    net without BatchNorm at an lr at which it trains, say), paired against the reference (a
    leave-one-out) or the base (an add-one-in), and named after its overrides."""
    where = f"{s.path} profile {s.profile} extra_cells[{i}]"
    if not isinstance(spec, dict) or not isinstance(spec.get("set"), dict) or \
            set(spec) - {"stage", "set", "toggle"}:
        raise UsageError(f"{where}: expected a mapping with 'toggle', 'set' (config keys) and "
                         f"optionally 'stage' (default the reference), got {spec!r}.")
    stage, toggle = spec.get("stage", s.reference), spec.get("toggle")
    if toggle not in s.toggles or s.toggles[toggle].get("eval_only"):
        trained = [t for t, v in s.toggles.items() if not v.get("eval_only")]
        raise UsageError(f"{where}: toggle {toggle!r} is not a trained toggle of this study; "
                         f"choose one of {', '.join(trained)}.")
    if stage not in (s.reference, s.base):
        raise UsageError(f"{where}: stage {stage!r} must be the reference ({s.reference}) or the "
                         f"base ({s.base}), the cells an extra arm is paired against.")
    overrides = lifecycle.check_budget(spec["set"], where)
    against = build(config_path(stage))
    arm = build(config_path(stage), overrides)
    if _is_on(arm, s.toggles[toggle]) == _is_on(against, s.toggles[toggle]):
        raise UsageError(f"{where}: its settings leave {toggle} as {label(stage)} has it; an "
                         f"extra arm must flip the toggle (e.g. set: {s.toggles[toggle]['without']}).")
    name = " ".join([label(stage), *(_token(k, v) for k, v in overrides.items())])
    if name in taken:
        raise UsageError(f"{where}: it is the cell {name!r}, which the study already trains.")
    kind = "leave-one-out" if stage == s.reference else "add-one-in"
    return Cell(name, kind, stage, overrides, toggle, extra=True)



# Bumped when what a cell's run means changes (2: element-wise block dropout, TTA-val
# selection, a split per seed, common random numbers), so that a study begun under another
# protocol is never continued with runs of this one.
PROTOCOL = 2


def fingerprint(s: StudyPlan) -> str:
    spec = [(c.name, c.stage, sorted(c.overrides.items())) for c in s.cells]
    parts = [spec, s.seeds, sorted(s.budget.items()), PROTOCOL]
    if any(s.stage_budget.values()):
        parts.append(sorted((k, sorted(v.items())) for k, v in s.stage_budget.items() if v))
    if s.sized:  # a size chosen for a budget is that machine's: another machine's is another study
        parts.append(["sized", s.sized.minutes, s.sized.machine])
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def pairs(s: StudyPlan) -> list[findings.Pair]:
    """The effects the study's cells measure, each as the cell with the component minus the cell
    without it."""
    ref_cell, base_cell = label(s.reference), label(s.base)
    out = []
    for c in s.cells:
        if c.kind == "stage":
            continue
        against = ref_cell if c.kind == "leave-one-out" else base_cell
        has_it = _is_on(s.config(c, 0), s.toggles[c.toggle])
        on, off = (c.name, against) if has_it else (against, c.name)
        if c.extra:
            own = " ".join(_token(k, v) for k, v in c.overrides.items()
                           if k not in s.toggles[c.toggle]["with"])
            kind = (f"added to {base_cell}" if c.kind == "add-one-in" else
                     "leave-one-out" if off == c.name else "added to reference")
            text = f"{c.toggle} ({kind}; arm {'with' if has_it else 'without'}: {own})"
        elif c.kind == "leave-one-out":
            text = (f"{c.toggle} (leave-one-out)" if off == c.name
                    else f"{c.toggle} (added to reference)")
        else:
            text = f"{c.toggle} (added to {base_cell})"
        out.append(findings.Pair(text, on, off))
    if "tta" in s.toggles:
        out.append(findings.Pair(f"tta (on {s.reference})", ref_cell, ref_cell, "test_acc_tta",
                                 "test_acc"))
    return out
