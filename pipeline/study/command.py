"""The shape every study command shares (``ablate``, ``tune``): its options, its threads, its start
(profile, file and data checked before any store, the experiment, dead runs swept), its name,
and what a stopped study says."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .. import data as fer
from .. import tracking
from ..cli import Number
from ..errors import UsageError
from ..numbers import WHOLE_1
from .file import PROFILES


@dataclass(frozen=True)
class StudyOptions:
    """What every study command shares: its data, where the queue lives, and registration."""

    data: str
    storage: str
    study_name: str | None = None
    heartbeat: int = 20
    register: str | None = None
    alias: str = "best"
    # Under `mlflow run`, the run it started for this command: the study's parent, or a worker
    # filed under it. Never resumed by a unit.
    entry_run: str | None = None


def add_study_args(p: argparse.ArgumentParser, default_storage: str,
                   default_profile: str = "quick") -> None:
    p.add_argument("--data", required=True, help="FER2013 in any supported layout")
    p.add_argument("--profile", default=default_profile, choices=(*PROFILES, "auto"),
                   help="the study's budget; auto: full on a CUDA GPU, quick on a CPU")
    p.add_argument("--storage", default=default_storage,
                   help="Optuna storage shared by the workers; postgresql://user@host/db to "
                        "share it between machines")
    p.add_argument("--study-name", default=None)
    p.add_argument("--heartbeat", type=Number(WHOLE_1), default=20,
                   help="seconds between worker heartbeats")
    p.add_argument("--register", default=None, metavar="NAME",
                   help="register the study's best model (by the val accuracy it is served "
                        "with) in the Model Registry as NAME, with the alias --alias")
    p.add_argument("--alias", default="best", help="alias of the registered version")
    p.add_argument("--threads", type=Number(WHOLE_1, words={"auto": None}), default=None,
                   metavar="auto|N",
                   help="torch CPU threads of each unit this worker trains (default auto: the "
                        "cores split over the units that train at once on this machine)")


def worker_threads(jobs: int, concurrent: int = 1) -> int:
    """Threads per unit when ``jobs`` workers of ``concurrent`` units each share the cores this
    process may run on (all of them, unless ``taskset`` or a container narrowed them): one pool
    each oversubscribes the cores, and two trainings on 2 cores then each ran 25x slower than
    one alone."""
    return max(1, len(os.sched_getaffinity(0)) // max(jobs * concurrent, 1))


def start(a: argparse.Namespace, check: Callable[[str], Any], jobs: int = 1,
          concurrent: int = 1) -> tuple[str, tracking.Experiment]:
    """A study command's start, before any unit: its threads (``--threads``, or the cores split
    over ``jobs`` x ``concurrent`` units at once), its profile, ``check(profile)`` of its file
    and the data's source (a bad one fails before any store is created or migrated), its
    experiment, and the runs of dead workers on this machine swept."""
    torch.set_num_threads(a.threads or worker_threads(jobs, concurrent))
    profile = resolve_profile(a.profile)
    check(profile)
    fer.check_source(a.data)
    exp = tracking.setup(a.experiment)
    tracking.sweep_dead_runs()
    return profile, exp


@contextlib.contextmanager
def resumable(module: str, argv: list[str] | None) -> Iterator[None]:
    """Ctrl-C or SIGTERM inside: say what the study kept and the command that continues it."""
    under_mlflow_run = bool(os.environ.get("MLFLOW_RUN_ID"))
    try:
        yield
    except KeyboardInterrupt:
        say_stopped(module, argv, under_mlflow_run)
        raise


def study_name(kind: str, file: str | Path, profile: str, data_digest: str,
               fingerprint: str) -> str:
    """A study's default name: its command, its file's name (once: ``tune-quick-...`` for
    tune.yaml), the profile, the data and the fingerprint of the parsed file, so an edit that
    changes what the study trains starts a new one, and a comment or a reordering does not."""
    return "-".join(dict.fromkeys([kind, Path(file).stem, profile, data_digest[-6:],
                                   fingerprint[:6]]))


def resolve_profile(profile: str) -> str:
    """``auto``: the study's own settings (full) where a CUDA GPU can train them in minutes,
    the CPU demonstration (quick) elsewhere; said in one line."""
    if profile != "auto":
        return profile
    if torch.cuda.is_available():
        print(f"profile auto: full, the study's own settings (a CUDA GPU: "
              f"{torch.cuda.get_device_name()})", flush=True)
        return "full"
    print("profile auto: quick, a reduced demonstration (no CUDA GPU here; the study's own "
          "settings need one: pass --profile full to run them anyway)", flush=True)
    return "quick"


def say_stopped(module: str, argv: list[str] | None, under_mlflow_run: bool) -> None:
    """What a stopped study kept, and the exact command that continues it."""
    again = ("the same `mlflow run` command" if under_mlflow_run else
             f"`{shlex.join(['python', '-m', module, *(sys.argv[1:] if argv is None else argv)])}`")
    print(f"stopped: the study keeps every finished run, and the stopped ones go back to its "
          f"queue; continue the study with {again}", file=sys.stderr, flush=True)


def options(a: argparse.Namespace) -> StudyOptions:
    if a.heartbeat < 1:
        raise UsageError(f"--heartbeat must be at least 1 second, got {a.heartbeat}.")
    # Taken off the environment here, once, by the command: MLflow would otherwise resume it as
    # the active run of every unit this process trains.
    entry_run = os.environ.pop("MLFLOW_RUN_ID", None)
    return StudyOptions(data=a.data, storage=a.storage, study_name=a.study_name or None,
                        heartbeat=a.heartbeat, register=a.register or None, alias=a.alias,
                        entry_run=entry_run)
