"""The ablation's report: collected from the study's runs, computed (effects, intervals, Holm),
rendered as Markdown, and published on the parent run, its overview and the study's view."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna
from optuna.trial import TrialState

from . import findings, plots, tracking
from . import study as lifecycle
from .config import unflatten
from .plan import StudyPlan, pairs
from .stores import first_use_lock


@dataclass
class Collected:
    """What the study's store and queue hold: the finished runs' figures by (cell, seed), the
    failed units with their reasons, the device, and the wall time (first run's start to last
    run's end, whichever workers and sessions trained them)."""

    by_cell: dict[tuple[str, int], dict[str, Any]]
    failed: list[dict[str, Any]]
    device: str = "?"
    wall_s: float | None = None


def collect(st: optuna.Study) -> Collected:
    cells = [r for r in lifecycle.own_runs(st) if "cell" in r.data.tags]
    out = Collected({}, [], wall_s=(max(r.info.end_time for r in cells) -
                                    min(r.info.start_time for r in cells)) / 1000
                    if cells else None)
    for r in cells:
        out.by_cell[(r.data.tags["cell"], int(r.data.tags["seed"]))] = {
            **r.data.metrics, "tta": unflatten(r.data.params).get("tta", False)}
        out.device = r.data.tags.get("device", out.device)
    out.failed = [{"cell": t.user_attrs.get("cell"), "seed": t.user_attrs.get("seed"),
                   "error": t.user_attrs.get("error", "worker lost")}
                  for t in lifecycle.settled(st) if t.state == TrialState.FAIL and
                  (t.user_attrs.get("cell"), t.user_attrs.get("seed")) not in out.by_cell]
    return out


QUICK_WARNING = ("> **A pipeline demonstration; effects at this budget do not transfer.** "
                 "The `{profile}` profile trains every cell for a fraction of the study's own "
                 "budget, so its models end near chance and some effects here have the opposite "
                 "sign of their full-budget value. ")


@dataclass
class StudyReport:
    """The report's numbers, computed from the collected runs alone (no MLflow)."""

    name: str
    rows: list[findings.Effect]
    rungs: list[findings.Rung]
    missing: list[tuple[str, int, str]]
    device: str
    wall_s: float | None


def compute(name: str, s: StudyPlan, got: Collected) -> StudyReport:
    reasons = {(f["cell"], f["seed"]): f["error"] for f in got.failed}
    missing = [(c.name, sd, reasons.get((c.name, sd), "not finished yet")) for c in s.cells
               for sd in range(s.seeds) if (c.name, sd) not in got.by_cell]
    return StudyReport(name, findings.effects(pairs(s), got.by_cell),
                       findings.ladder(s.ladder, s.reported, got.by_cell), missing, got.device,
                       got.wall_s)


def render(s: StudyPlan, r: StudyReport) -> str:
    """The report as Markdown, from the computed figures alone."""
    lines = [f"# Ablation report: `{r.name}`", ""]
    if s.profile != "full":
        lines += [QUICK_WARNING.format(profile=s.profile) + ANSWER_IS, ""]
    lines += [f"Profile **{s.profile}**, {s.seeds} seed(s) per cell, device {r.device}"
              + (f", wall time {r.wall_s / 60:.1f} min (first run's start to last run's end)"
                 if r.wall_s else "") + ".",
              f"Budget applied to every cell: {s.reduced()}.", "", findings.HOW_TO_READ, "",
              "## Effects on test", "", *findings.effects_table(r.rows), "",
              *([why] if (why := _tta_at_this_size(s, r)) else []),
              findings.detectable_summary(r.rows, s.seeds), "",
              f"Cells (reference: {s.reference}, base: {s.base}): {CELL_GUIDE} Each child run "
              f"is named `<cell> s<seed>`.", ""]
    lines += [f"- `{cell}` is left out: {why}." for cell, why in s.skipped]
    lines += ["", "## Stage ladder", "", findings.LADDER_NOTE, "",
              *findings.ladder_table(r.rungs), "", "## Per-seed values", "",
              "Test accuracy of each arm per seed (the figures every effect above is computed "
              "from).", "", *findings.per_seed_table(r.rows)]
    if r.missing:
        lines += ["", "## Missing cells", ""]
        lines += [f"- `{c}` seed {sd}: {why}" for c, sd, why in r.missing]
    return "\n".join(lines) + "\n"


def _tta_at_this_size(s: StudyPlan, r: StudyReport) -> str:
    """A reduced study whose TTA row is not resolved says why, from its own figures: what its
    seeds detect and how far its models are from chance."""
    tta = next((e for e in r.rows if e.pair.on_metric == "test_acc_tta"), None)
    if s.profile == "full" or tta is None or not tta.is_size or \
            (math.isfinite(tta.lo) and (tta.lo > 0 or tta.hi < 0)):
        return ""
    tests = [g.figures["test_acc"][0] for g in r.rungs
             if math.isfinite(g.figures["test_acc"][0])]
    near = (f", and its stages reach only {min(tests):.2f} to {max(tests):.2f} test accuracy"
            if tests else "")
    det = (f"{tta.detectable * 100:.2f} points" if math.isfinite(tta.detectable) else
           "no size (no spread between seeds)")
    return (f"**TTA is not resolved at this size:** with {tta.n} seed(s) the smallest effect "
            f"found with 80% power here is {det}{near}; at the study's own settings it is "
            f"measured on models that train (the README's answer).\n")


def figures(s: StudyPlan, r: StudyReport) -> dict[str, Any]:
    return {"forest.png": plots.forest(r.rows) if r.rows else None,
            "ladder.png": plots.ladder(s.ladder, {g.stage: g.figures["val_selected"]
                                                  for g in r.rungs}, s.reported)}


def effect_key(e: findings.Effect) -> str:
    return "effect_" + re.sub(r"[^a-z0-9]+", "_", e.pair.label.lower()).strip("_")


def publish(parent: str, out_dir: Path, r: StudyReport, text: str, figs: dict[str, Any]) -> None:
    """The report and figures in ``out_dir`` and on the parent run (the report on its overview
    page), and each effect's size, interval and p-values as its metrics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(text)
    client = mlflow.MlflowClient()
    for fname, fig in figs.items():
        if fig is not None:
            fig.savefig(out_dir / fname, dpi=110)
            plots.close(fig)
            client.log_artifact(parent, str(out_dir / fname), "report")
    client.log_artifact(parent, str(out_dir / "report.md"), "report")
    client.set_tag(parent, "mlflow.note.content", overview(parent, r, text,
                                                            figs.get("forest.png") is not None))
    for e in r.rows:
        if e.is_size:
            lifecycle.log_interval(parent, f"{effect_key(e)}/test_points", e.mean, e.lo, e.hi)
            for stat, v in (("p", e.p), ("p_holm", e.p_holm)):
                if v == v:  # not NaN: no spread, no p
                    client.log_metric(parent, f"{effect_key(e)}/{stat}", float(f"{v:.3g}"))
    experiment = client.get_run(parent).info.experiment_id
    note = client.get_experiment(experiment).tags.get("mlflow.note.content", "")
    client.set_experiment_tag(experiment, "mlflow.note.content",
                              answer_note(parent, experiment, r) + note.split(ANSWER_END, 1)[-1])


# Where the answer at the top of the experiment's description ends and the rest begins, so a
# rebuilt report replaces its line instead of stacking another above it.
ANSWER_END = "\n\n---\n\n"


def forest_address(parent: str) -> str:
    """The forest plot as the MLflow UI serves an artifact, relative to the UI's own address,
    so a description shows it inline on whichever server opens the store."""
    return f"get-artifact?path=report/forest.png&run_uuid={parent}"


def overview(parent: str, r: StudyReport, text: str, has_forest: bool) -> str:
    """The parent run's description: the answer in a line (what MLflow 3.17 shows before its
    "Show more": 100 pixels of a run's description), then the effects and the forest plot, then
    the whole report."""
    head = [f"**The answer:** {findings.answer_line(r.rows)}", "",
            f"## Effects on test, `{r.name}`", "", *findings.answer_table(r.rows), ""]
    if has_forest:
        head += [f"![forest plot of the effects]({forest_address(parent)})", ""]
    return "\n".join(head) + "\n" + text


def answer_note(parent: str, experiment: str, r: StudyReport) -> str:
    return (f"**The answer** ({len(r.rows)} effect(s); {len(r.missing)} run(s) missing): "
            f"{findings.answer_line(r.rows)} The effects table and forest plot are on the parent "
            f"run [{r.name}](#/experiments/{experiment}/runs/{parent}).{ANSWER_END}")


def report(st: optuna.Study, s: StudyPlan, out_dir: Path) -> str:
    """Compute the findings from the study's finished runs, render them, and publish them."""
    r = compute(st.study_name, s, collect(st))
    text = render(s, r)
    publish(st.user_attrs["parent_run_id"], out_dir, r, text, figures(s, r))
    return text


def report_once(st: optuna.Study, s: StudyPlan, out_dir: Path, storage: str,
                took_part: bool) -> str:
    """The report. Workers that took part in the study's last stretch (trained or waited) find
    the queue empty at about the same time: the first builds the report and notes the units it
    covers on the parent; the others, finding that note, leave it be (two builds gave each effect
    metric two history points) and return its text. A rerun of a finished study, which took no
    part, rebuilds it from the store, as asked."""
    parent = st.user_attrs["parent_run_id"]
    with first_use_lock(storage):
        units = str(sum(t.state.is_finished() for t in lifecycle.settled(st)))
        client = mlflow.MlflowClient()
        if took_part and client.get_run(parent).data.tags.get("report_units") == units:
            print(f"the report of these {units} units was built by another worker; it is on "
                  f"the parent run {parent}", flush=True)
            return mlflow.artifacts.load_text(f"runs:/{parent}/report/report.md")
        text = report(st, s, out_dir)
        client.set_tag(parent, "report_units", units)
    return text


def timing_line(st: optuna.Study, command_s: float) -> str:
    """The study's end line: its budget, the estimate printed at its start and the time it took,
    so every run of the demonstration checks its own estimate."""
    span = collect(st).wall_s
    said = [f"this command took {command_s / 60:.1f} min"]
    if span:
        said.insert(0, f"its runs took {span / 60:.1f} min (first start to last end)")
        estimate_s = st.user_attrs.get("estimate_s")
        if estimate_s:
            off = span / estimate_s - 1
            said.insert(0, f"estimated at its start {estimate_s / 60:.1f} min")
            said[1] += f", {abs(off):.0%} {'over' if off > 0 else 'under'} the estimate"
    sized = st.user_attrs.get("sizing")
    if sized:
        said.insert(0, f"budget {sized['minutes']:g} min")
    return f"study {st.study_name}: " + "; ".join(said)


CELL_GUIDE = ("A cell named after a stage (`advanced`) trains that stage as the study describes "
              "it; `<reference> -T` is the reference with toggle T taken out (leave one out), "
              "`<reference> +T` with T put in where the reference lacks it; `<base> +T` is the "
              "base with T added (add one in).")


def cells_view(st: optuna.Study, name: str, s: StudyPlan) -> str:
    """A view of the study in the MLflow UI with no clicks: its runs grouped by cell, one row a
    cell (the groups collapsed), each showing the mean of its seeds' test accuracy, with and
    without TTA, and val accuracy. Returns the URL's path and query."""
    metrics = [f"metrics.`{m}`" for m in ("test_acc", "test_acc_tta", "val_acc")]
    return tracking.share_view(
        mlflow.get_run(st.user_attrs["parent_run_id"]).info.experiment_id, name,
        # Finished runs only: a stopped run's seed would count in its group without a figure.
        # `tags.cell != ''` leaves out the parent run, which has no cell: the UI would show it
        # as an empty group of its own ("Additional runs").
        {"searchFilter": f"tags.study = '{name}' and tags.cell != '' and "
                         f"attributes.status = 'FINISHED'",
         # By run name (cells in name order, each one's seeds together). Ordered by start
         # time, MLflow 3.17's UI fetches the parents of the runs it shows and would list the
         # parent as a group of its own ("Additional runs"); a key its sort menu does not name
         # (`attributes.created`) shows as "Sort: undefined".
         "orderByKey": "tags.`mlflow.runName`",
         "orderByAsc": True, "selectedColumns": [*metrics, "tags.`seed`"],
         "groupBy": {"aggregateFunction": "average",
                     "groupByKeys": [{"mode": "tag", "groupByData": "cell"}]},
         "groupsExpanded": {f"tag.cell.{c.name}": False for c in s.cells},
         "runsHiddenMode": "SHOW_ALL"})


def study_description(name: str, s: StudyPlan) -> str:
    return (f"Ablation study `{name}` ({s.profile} profile, {s.seeds} seed(s) per cell, "
            f"{len(s.cells)} cells). The parent run `ablation {s.profile}` holds the report on "
            f"its overview page; each child run is one cell and seed, named `<cell> s<seed>`. "
            f"{CELL_GUIDE} To compare cells, open the view the study stored: this "
            f"experiment's address ending in `/runs?workflowType=machine_learning&"
            f"viewStateShareKey={name}` (the address the study prints at its end) shows one "
            f"row per cell, the mean of its seeds' `test_acc`, `test_acc_tta` and `val_acc`."
            + ("" if s.profile == "full" else f" {FULL_ANSWER}"))


ANSWER_IS = ("The study's answer at its own settings is the README's \"The answer so far\" "
             "and docs/ablation-full/report.md in the project; its runs open with `mlflow ui "
             "--backend-store-uri sqlite:///docs/ablation-full/store/mlflow.db` there.")
FULL_ANSWER = f"This profile is a reduced demonstration whose effects do not transfer. {ANSWER_IS}"
