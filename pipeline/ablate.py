"""``python -m pipeline.ablate``: the ablation study, as one parent MLflow run with a child per cell
and seed, handed out to any number of workers through an Optuna storage used as a work queue.

Each (cell, seed) is one enqueued Optuna trial. A worker claims a waiting trial atomically (the
storage's row lock), trains it, and marks it complete or failed with its reason. Workers record a
heartbeat; when one dies, any other worker turns its stale trial back into a waiting one, so no
cell is lost and none is trained twice. The report is built from MLflow by whichever worker finds
the queue empty.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import optuna
import torch
from optuna.trial import TrialState

from . import data as fer
from . import findings, plots, tracking
from .cli import parser, run_main
from .config import TOGGLES, Config, build, coerce, config_path, load_yaml
from .errors import ConfigError, UsageError
from .models import supports_residual
from .train import train
from .workers import (attach_entry_run, check_parent_here, claim, create_or_join, find_run,
                      finish_parent, open_storage, run_unit, storage_of, trial_id)

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ("smoke", "quick", "full")
DEFAULT_STORAGE = "sqlite:///ablate.db"


# --------------------------------------------------------------------------- the study file


@dataclass(frozen=True)
class Cell:
    name: str  # e.g. "advanced", "improved -batchnorm", "basic +augment"
    kind: str  # stage | leave-one-out | add-one-in
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
    log_models: str  # all | none | reference (the reference stage's seed-0 model only)
    extra: list[dict[str, Any]] = field(default_factory=list)  # the profile's extra_cells
    cells: list[Cell] = field(default_factory=list)
    # Cells left out because the toggle has nothing to act on in that stage, with the reason.
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def config(self, cell: Cell, seed: int) -> Config:
        return build(config_path(cell.stage), {**cell.overrides, **self.budget, "seed": seed})

    def reduced(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.budget.items()) or "none (the study's own settings)"


STUDY_KEYS = ("reference", "base", "ladder", "seeds", "reported", "toggles", "profiles")


def _need(d: dict, key: str, kind: type, where: str) -> Any:
    if key not in d:
        raise UsageError(f"{where}: missing key {key!r}.")
    if not isinstance(d[key], kind):
        raise UsageError(f"{where}: {key} must be a {kind.__name__}, got {d[key]!r}.")
    return d[key]


def load_study(path: str | Path, profile: str, seeds: int | None = None,
               budget: dict[str, Any] | None = None) -> StudyPlan:
    """Read and check the study file; every cell's config is built here, before any training."""
    p = Path(path)
    d = load_yaml(p, "study", UsageError, STUDY_KEYS)
    profiles = _need(d, "profiles", dict, str(p))
    if profile not in profiles:
        raise UsageError(f"{p}: unknown profile {profile!r}; this study has "
                         f"{', '.join(profiles)}.")
    prof = profiles[profile] or {}
    toggles = _need(d, "toggles", dict, str(p))
    unknown = sorted(set(toggles) - set(TOGGLES))
    if unknown:
        raise UsageError(f"{p}: unknown toggle(s) {unknown}; valid toggles: {', '.join(TOGGLES)}.")
    for t, spec in toggles.items():
        if not (isinstance(spec, dict) and (spec.get("eval_only") or
                                            {"with", "without"} <= set(spec))):
            raise UsageError(f"{p}: toggle {t!r} needs 'with' and 'without' config keys "
                             f"(or eval_only: true).")
    reported = d.get("reported") or {}
    s = StudyPlan(path=p, reference=_need(d, "reference", str, str(p)),
              base=_need(d, "base", str, str(p)), ladder=list(_need(d, "ladder", list, str(p))),
              seeds=int(seeds or prof.get("seeds") or d.get("seeds", 3)),
              reported={k: float(v) for k, v in reported.items()}, toggles=toggles,
              profile=profile, budget={**(prof.get("set") or {}), **(budget or {})},
              log_models="all" if prof.get("log_models", False) else "none",
              extra=list(prof.get("extra_cells") or []))
    if s.seeds < 1:
        raise UsageError(f"seeds must be at least 1, got {s.seeds}.")
    try:
        for k, v in s.budget.items():
            coerce(k, v, f"{p} profile {profile}")
        s.cells = _cells(s)
        for c in s.cells:
            s.config(c, 0)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    return s


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
    overrides = {k: coerce(k, v, where) for k, v in spec["set"].items()}
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


# --------------------------------------------------------------------------- the work queue


# Bumped when what a cell's run means changes (2: element-wise block dropout, TTA-val
# selection, a split per seed, common random numbers), so that a study begun under another
# protocol is never continued with runs of this one.
PROTOCOL = 2


def fingerprint(s: StudyPlan) -> str:
    spec = [(c.name, c.stage, sorted(c.overrides.items())) for c in s.cells]
    return hashlib.sha1(json.dumps([spec, s.seeds, sorted(s.budget.items()), PROTOCOL],
                                   default=str).encode()).hexdigest()[:12]


def open_study(storage, name: str, s: StudyPlan, digest: str, entry_run_id: str | None,
               wait_s: float = 120) -> tuple[optuna.Study, bool]:
    """Create the study and its queue (first worker) or join it (every other worker)."""
    study, created = create_or_join(
        storage, name, lambda st: _set_up_queue(st, name, s, digest, entry_run_id), "ready",
        wait_s)
    attrs = study.user_attrs
    if attrs["fingerprint"] != fingerprint(s) or attrs["data_digest"] != digest:
        raise UsageError(f"study {name!r} already exists with other cells, seeds, budget or data; "
                         f"use another --study-name for a different study.")
    return study, created


def _set_up_queue(study: optuna.Study, name: str, s: StudyPlan, digest: str,
                  entry_run_id: str | None) -> None:
    """The creating worker: the parent run, then one waiting trial per (cell, seed)."""
    client = mlflow.MlflowClient()
    parent = entry_run_id or client.create_run(
        tracking.experiment_id(), run_name=f"ablation {s.profile}",
        tags={"study": name, "role": "study", "git_commit": tracking.git_commit()}).info.run_id
    client.set_tag(parent, "study", name)
    client.set_tag(parent, "role", "study")
    client.set_tag(parent, "mlflow.runName", f"ablation {s.profile}")
    # Prefixed: under `mlflow run` the parent already holds the entry point's own params.
    for k, v in {"study_profile": s.profile, "study_seeds": s.seeds,
                 "study_budget": s.reduced()[:500], "study_cells": len(s.cells),
                 "data_digest": digest}.items():
        client.log_param(parent, k, v)
    client.log_text(parent, s.path.read_text(), "study.yaml")
    for c in s.cells:
        for seed in range(s.seeds):
            study.enqueue_trial({}, user_attrs={"cell": c.name, "seed": seed})
    study.set_user_attr("fingerprint", fingerprint(s))
    study.set_user_attr("data_digest", digest)
    study.set_user_attr("parent_run_id", parent)
    study.set_user_attr("ready", True)  # last: joiners wait for a complete queue


def run_cell(s: StudyPlan, study_name: str, cell: Cell, seed: int, data: fer.FerData,
             parent: str) -> dict[str, Any]:
    done = find_run(study_name, "FINISHED", cell=cell.name, seed=seed)
    if done is not None:  # a worker that died after MLflow finished, before the queue heard
        return {"run_id": done.info.run_id, "val_acc": done.data.metrics.get("val_acc")}
    earlier = find_run(study_name, cell=cell.name, seed=seed)
    cfg = s.config(cell, seed)
    return train(cfg, data, run_name=f"{cell.name} s{seed}", parent_run_id=parent,
                 resume_run_id=earlier.info.run_id if earlier else None,
                 tags={"study": study_name, "cell": cell.name, "cell_kind": cell.kind,
                       "toggle": cell.toggle or ""},
                 log_model=s.log_models == "all" or (s.log_models == "reference" and seed == 0
                                                     and cell.name == label(s.reference)))


def work(study: optuna.Study, s: StudyPlan, data: fer.FerData, heartbeat: int,
         poll: float = 5.0) -> dict[str, int]:
    """Train waiting cells until none is left, and none is running anywhere."""
    by_name = {c.name: c for c in s.cells}
    parent = study.user_attrs["parent_run_id"]
    storage = storage_of(study)
    counts = {"trained": 0, "failed": 0}
    total = len(s.cells) * s.seeds
    while True:
        optuna.storages.fail_stale_trials(study)  # dead workers' cells go back to the queue
        t = claim(study)
        if t is None:
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not running:
                return counts
            print(f"waiting for {len(running)} running cell(s) on other workers", flush=True)
            time.sleep(poll)
            continue
        cell, seed = by_name[t.user_attrs["cell"]], int(t.user_attrs["seed"])
        finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        print(f"[{finished + 1}/{total}] {cell.name} seed {seed}", flush=True)

        def train_cell() -> float:
            out = run_cell(s, study.study_name, cell, seed, data, parent)
            storage.set_trial_user_attr(trial_id(t), "run_id", out["run_id"])
            return float(out.get("val_acc") or 0.0)

        state, _ = run_unit(study, trial_id(t), heartbeat, train_cell,
                            f"cell {cell.name} seed {seed}")
        counts["trained" if state == "complete" else "failed"] += 1


# --------------------------------------------------------------------------- the report


def collect(study: optuna.Study) -> tuple[dict[tuple[str, int], dict[str, Any]], list[dict],
                                         str, float | None]:
    """Finished runs' figures by (cell, seed), the failed cells with their reasons, the device
    the runs trained on, and the study's wall time: its first run's start to its last run's
    end, whichever workers and sessions trained them."""
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.study = '{study.study_name}' and "
                                            f"attributes.status = 'FINISHED'")
    by_cell: dict[tuple[str, int], dict[str, Any]] = {}
    device = "?"
    cells = [r for r in runs if "cell" in r.data.tags]
    span = ((max(r.info.end_time for r in cells) - min(r.info.start_time for r in cells)) / 1000
            if cells else None)
    for r in cells:
        by_cell[(r.data.tags["cell"], int(r.data.tags["seed"]))] = {
            **r.data.metrics, "tta": r.data.params.get("tta") == "True"}
        device = r.data.tags.get("device", device)
    retried = {t.system_attrs.get("failed_trial") for t in study.get_trials(deepcopy=False)}
    failed = [{"cell": t.user_attrs.get("cell"), "seed": t.user_attrs.get("seed"),
               "error": t.user_attrs.get("error", "worker lost")}
              for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
              if t.number not in retried and
              (t.user_attrs.get("cell"), t.user_attrs.get("seed")) not in by_cell]
    return by_cell, failed, device, span


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


QUICK_WARNING = ("> **A pipeline demonstration; effects at this budget do not transfer.** "
                 "The `{profile}` profile trains every cell for a fraction of the study's own "
                 "budget, so its models end near chance and some effects here have the opposite "
                 "sign of their full-budget value. The study's answer is the `full` profile's "
                 "report; the project ships one in `docs/ablation-full/report.md`.")


def render(name: str, s: StudyPlan, rows: list[findings.Effect], rungs: list[findings.Rung],
           missing: list[tuple[str, int, str]], device: str, wall_s: float | None) -> str:
    """The report as Markdown, from the computed figures alone."""
    lines = [f"# Ablation report: `{name}`", ""]
    if s.profile != "full":
        lines += [QUICK_WARNING.format(profile=s.profile), ""]
    lines += [f"Profile **{s.profile}**, {s.seeds} seed(s) per cell, device {device}"
              + (f", wall time {wall_s / 60:.1f} min (first run's start to last run's end)"
                 if wall_s else "") + ".",
              f"Budget applied to every cell: {s.reduced()}.", "", findings.HOW_TO_READ, "",
              "## Effects on test", "", *findings.effects_table(rows), "",
              findings.detectable_summary(rows, s.seeds), "",
              f"Cells (reference: {s.reference}, base: {s.base}): {CELL_GUIDE} Each child run "
              f"is named `<cell> s<seed>`.", ""]
    lines += [f"- `{cell}` is left out: {why}." for cell, why in s.skipped]
    lines += ["", "## Stage ladder", "", findings.LADDER_NOTE, "", *findings.ladder_table(rungs),
              "", "## Per-seed values", "",
              "Test accuracy of each arm per seed (the figures every effect above is computed "
              "from).", "", *findings.per_seed_table(rows)]
    if missing:
        lines += ["", "## Missing cells", ""]
        lines += [f"- `{c}` seed {sd}: {why}" for c, sd, why in missing]
    return "\n".join(lines) + "\n"


def report(study: optuna.Study, s: StudyPlan, out_dir: Path) -> str:
    """Compute the findings from the study's finished runs, render them, and publish them: the
    report and figures in ``out_dir`` and on the parent run, and the effects as its metrics."""
    by_cell, failed, device, wall_s = collect(study)
    rows = findings.effects(pairs(s), by_cell)
    rungs = findings.ladder(s.ladder, s.reported, by_cell)
    reasons = {(f["cell"], f["seed"]): f["error"] for f in failed}
    missing = [(c.name, sd, reasons.get((c.name, sd), "not finished yet")) for c in s.cells
               for sd in range(s.seeds) if (c.name, sd) not in by_cell]
    text = render(study.study_name, s, rows, rungs, missing, device, wall_s)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(text)
    figs = {"forest.png": plots.forest(rows) if rows else None,
            "ladder.png": plots.ladder(s.ladder, {r.stage: r.figures["val_selected"]
                                                  for r in rungs}, s.reported)}
    parent = study.user_attrs["parent_run_id"]
    client = mlflow.MlflowClient()
    for fname, fig in figs.items():
        if fig is not None:
            fig.savefig(out_dir / fname, dpi=110)
            client.log_artifact(parent, str(out_dir / fname), "report")
    client.log_artifact(parent, str(out_dir / "report.md"), "report")
    client.set_tag(parent, "mlflow.note.content", text)  # the report on the run's overview page
    for e in rows:
        if not e.is_size:
            continue
        key = "effect_" + re.sub(r"[^a-z0-9]+", "_", e.pair.label.lower()).strip("_")
        for stat, v in (("", e.mean), ("_lo", e.lo), ("_hi", e.hi)):
            if math.isfinite(v):
                client.log_metric(parent, f"{key}/test_points{stat}", 100 * v)
        for stat, v in (("p", e.p), ("p_holm", e.p_holm)):
            if math.isfinite(v):
                client.log_metric(parent, f"{key}/{stat}", v)
    return text


CELL_GUIDE = ("A cell named after a stage (`advanced`) trains that stage as the study describes "
              "it; `<reference> -T` is the reference with toggle T taken out (leave one out), "
              "`<reference> +T` with T put in where the reference lacks it; `<base> +T` is the "
              "base with T added (add one in).")


def study_description(name: str, s: StudyPlan) -> str:
    return (f"Ablation study `{name}` ({s.profile} profile, {s.seeds} seed(s) per cell, "
            f"{len(s.cells)} cells). The parent run `ablation {s.profile}` holds the report on "
            f"its overview page; each child run is one cell and seed, named `<cell> s<seed>`. "
            f"{CELL_GUIDE} To compare cells: in the runs table, group by the tag `cell` and "
            f"show `val_acc`, `test_acc` and `test_acc_tta`.")


# --------------------------------------------------------------------------- entry point


def run_ablate(data_path: str, study_path: str, profile: str, seeds: int | None,
               budget: dict[str, Any], storage_url: str, study_name: str | None,
               report_dir: str, heartbeat: int = 20, jobs: int = 1,
               log_models: str | None = None, write_report: bool = True,
               register: str | None = None, alias: str = "best") -> dict[str, Any]:
    s = load_study(study_path, profile, seeds, budget)  # errors before anything else
    if log_models is not None:
        s.log_models = log_models
    data = fer.load(data_path)
    fer.check_usage(data)
    tracking.check_reachable()
    storage = open_storage(storage_url, heartbeat)
    # The default name changes with the cells, seeds, budget and data, so an edited study file
    # starts a new study instead of clashing with the old one; an unchanged one resumes.
    name = study_name or (f"ablate-{Path(study_path).stem}-{profile}-{data.digest[-6:]}-"
                          f"{fingerprint(s)[:6]}")
    tracking.use_study_experiment(name, study_description(name, s))
    # Under `mlflow run` the entry's run becomes the parent (when this worker creates the
    # study); child runs must not resume it through the environment.
    entry_run = os.environ.pop("MLFLOW_RUN_ID", None)
    study, created = open_study(storage, name, s, data.digest, entry_run)
    check_parent_here(study, storage_url)
    parent = study.user_attrs["parent_run_id"]
    attach_entry_run(entry_run, parent, name)
    print(f"study {name}: {len(s.cells)} cells x {s.seeds} seeds "
          f"({'created' if created else 'joined'}), parent run {parent}", flush=True)
    # Extra local workers join the study only now that it exists, so they never race to
    # create the stores.
    helpers = [_start_worker(data_path, study_path, s, budget, storage_url, name, heartbeat,
                             jobs) for _ in range(jobs - 1)]
    try:
        counts = work(study, s, data, heartbeat)
    finally:
        for h in helpers:
            if h.wait() != 0:
                print(f"a local worker (pid {h.pid}) exited with {h.returncode}; its cells go "
                      f"back to the queue", flush=True)
    counts["helpers_exit"] = [h.returncode for h in helpers]
    if not write_report:
        return {"study": name, "parent_run_id": parent, "report": "", **counts}
    if any(h.returncode != 0 for h in helpers):
        for k, v in work(study, s, data, heartbeat).items():
            counts[k] += v
    text = report(study, s, Path(report_dir))
    finish_parent(parent, entry_run)
    out = {"study": name, "parent_run_id": parent, "report": text, **counts}
    if register:
        out["registered"] = _register(f"tags.study = '{name}'", register, alias)
    return out


def _register(filter_string: str, name: str, alias: str) -> dict[str, Any]:
    reg = tracking.register_best(filter_string, name, alias)
    if reg is None:
        raise UsageError(f"nothing to register as {name!r}: no finished run logged a model "
                         f"(pass --log-models all or reference).")
    return reg


def worker_threads(jobs: int) -> int:
    """Threads per worker when ``jobs`` share this machine: one pool each oversubscribes the
    cores, and two trainings on 2 cores then each ran 25x slower than one alone."""
    return max(1, (os.cpu_count() or 1) // max(jobs, 1))


def _start_worker(data_path: str, study_path: str, s: StudyPlan, budget: dict[str, Any],
                  storage_url: str, name: str, heartbeat: int, jobs: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "pipeline.ablate", "--data", data_path, "--study", study_path,
            "--profile", s.profile, "--seeds", str(s.seeds), "--storage", storage_url,
            "--study-name", name, "--heartbeat", str(heartbeat), "--log-models", s.log_models,
            "--threads", str(worker_threads(jobs)), "--no-report"]
    for key, flag in (("epochs", "--epochs"), ("data_fraction", "--data-fraction"),
                      ("width", "--width")):
        if budget.get(key):
            args += [flag, str(budget[key])]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
           "MLFLOW_EXPERIMENT_ID": tracking.experiment_id()}
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.Popen(args, env=env)


def _whole(text: str) -> int:
    """An int that MLproject may have passed as a float ("3.0")."""
    v = float(text)
    if v != int(v) or v < 0:
        raise ValueError(text)
    return int(v)


def main(argv: list[str] | None = None) -> int:
    p = parser("Run the ablation study (resumable; start it on several machines to share it).")
    p.add_argument("--data", required=True)
    p.add_argument("--study", default=str(ROOT / "ablations" / "study.yaml"))
    p.add_argument("--profile", default="quick", choices=PROFILES)
    p.add_argument("--seeds", type=_whole, default=None,
                   help="seeds per cell (default: the study's; 0 also means that)")
    p.add_argument("--epochs", type=_whole, default=None, help="cap (0: the profile's)")
    p.add_argument("--data-fraction", type=float, default=None)
    p.add_argument("--width", type=float, default=None)
    p.add_argument("--storage", default=None,
                   help=f"Optuna storage shared by the workers (default {DEFAULT_STORAGE}; "
                        f"postgresql://... for several machines)")
    p.add_argument("--study-name", default=None)
    p.add_argument("--report-dir", default="ablation_report")
    p.add_argument("--heartbeat", type=int, default=20, help="seconds between worker heartbeats")
    p.add_argument("--jobs", type=_whole, default=1,
                   help="workers on this machine (one process each, the CPU threads split "
                        "between them; on a GPU they share it)")
    p.add_argument("--log-models", choices=("all", "none", "reference", ""), default=None,
                   help="which runs log an MLflow model (default: the profile's; reference: "
                        "only the reference stage's seed-0 run)")
    p.add_argument("--threads", type=_whole, default=0,
                   help="torch CPU threads of this worker (0: the cores split over --jobs)")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="build the report when the queue is empty (extra workers leave it to "
                        "the one that started them)")
    p.add_argument("--register", default=None, metavar="NAME",
                   help="register the study's best model (by val accuracy) in the Model "
                        "Registry as NAME, with the alias --alias")
    p.add_argument("--alias", default="best", help="alias of the registered version")
    a = p.parse_args(argv)
    if a.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {a.jobs}.")
    torch.set_num_threads(a.threads or worker_threads(a.jobs))
    budget = {k: v for k, v in (("epochs", a.epochs), ("data_fraction", a.data_fraction),
                                ("width", a.width)) if v}
    tracking.setup(a.experiment)
    out = run_ablate(a.data, a.study, a.profile, a.seeds or None, budget,
                     a.storage or DEFAULT_STORAGE, a.study_name or None, a.report_dir,
                     a.heartbeat, a.jobs, a.log_models or None, a.report, a.register or None,
                     a.alias)
    print(out["report"])
    return 0


if __name__ == "__main__":
    run_main(main)
