"""The shape every study command shares (``ablate``, ``tune``): its options, its threads, its start
(profile, file and data checked before any store, the experiment, dead runs swept), its name,
and what a stopped study says."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .. import data as fer
from .. import redact, tracking
from ..cli import Number
from ..errors import UsageError
from ..numbers import WHOLE_0, WHOLE_1, NumberError, Range, parse, shown
from .file import PROFILES
from .progress import duration


# Where a worker's helpers find the storage URL: their environment, not their command line.
STORAGE_ENV = "FER_STORAGE"


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
    p.add_argument("--storage", default=os.environ.get(STORAGE_ENV) or default_storage,
                   help=f"Optuna storage shared by the workers (or {STORAGE_ENV} in the "
                        f"environment); postgresql://user@host/db to share it between machines, "
                        f"its password in ~/.pgpass or PGPASSWORD, never in this URL under "
                        f"`mlflow run`")
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
    redact.remember(a.storage)
    redact.refuse_logged(a.storage, os.environ.get("MLFLOW_RUN_ID"))
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


def again(module: str, argv: list[str] | None, under_mlflow_run: bool) -> str:
    """The exact command that continues a study, in words."""
    if under_mlflow_run:
        return "the same `mlflow run` command"
    words = ["python", "-m", module, *(sys.argv[1:] if argv is None else argv)]
    return f"`{shlex.join(redact.argv(words))}`"


def say_stopped(module: str, argv: list[str] | None, under_mlflow_run: bool) -> None:
    """What a stopped study kept, and the exact command that continues it."""
    print(f"stopped: the study keeps every finished run, and the stopped ones go back to its "
          f"queue; continue the study with {again(module, argv, under_mlflow_run)}",
          file=sys.stderr, flush=True)


# The longest limit taken: a year of seconds, well inside every clock this code reads.
DURATION_MAX_S = 366 * 24 * 3600
_UNITS = re.compile(r"(?:(?P<h>[^hms]+)h)?(?:(?P<m>[^hms]+)m)?(?:(?P<s>[^hms]+)s)?")


def parse_duration(value: Any) -> float | None:
    """Seconds from ``90s``, ``25m``, ``1h30m``, ``1h 30m 10s``, ``HH:MM:SS`` or ``MM:SS``, or a
    bare number of minutes (as ``--budget`` and SLURM take them), ``None`` when not given. Each
    part is a number by :func:`parse`'s rule; the whole is above zero and at most a year."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    bad = NumberError(f"expected a duration such as 90s, 25m, 1h30m or 01:30:00 (a bare "
                      f"number is minutes), got {shown(value)}")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise bad
    text = str(value).strip().lower().replace(" ", "")
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) not in (2, 3) or not all(parts):
                raise bad
            lead = [parse(p, WHOLE_0) for p in parts[:-1]]
            secs = parse(parts[-1], Range(low=0, high=60, high_open=True))
            if len(lead) == 2 and lead[1] >= 60:
                raise bad
            seconds = sum(v * 60 ** (len(parts) - 1 - i) for i, v in enumerate(lead)) + secs
        elif text and (text[-1] in "hms"):
            m = _UNITS.fullmatch(text)
            if m is None or not any(m.groupdict().values()):
                raise bad
            seconds = sum(parse(v, Range(low=0)) * {"h": 3600, "m": 60, "s": 1}[k]
                          for k, v in m.groupdict().items() if v is not None)
        else:
            seconds = parse(text, Range(low=0)) * 60
    except NumberError:
        raise bad from None
    if not 0 < seconds <= DURATION_MAX_S:
        raise bad
    return float(seconds)


@dataclass(frozen=True)
class Deadline:
    """When a study must have stopped (a Unix time), and what set it, in words."""

    at: float
    source: str

    def left(self) -> float:
        return self.at - time.time()

    def said(self) -> str:
        return f"{self.source}, at {time.strftime('%H:%M:%S', time.localtime(self.at))}"


def deadline(limit_s: float | None, started: float,
             environ: Any = os.environ) -> Deadline | None:
    """The study's deadline: ``--time-limit`` counted from the command's start, or the end of
    the scheduler's job where it states one (SLURM's ``SLURM_JOB_END_TIME``, a Unix time),
    whichever comes first; None where neither is set. A job end that is not a time is refused
    rather than ignored: the study would otherwise run into the job's kill."""
    found = []
    if limit_s is not None:
        found.append(Deadline(started + limit_s, f"--time-limit {duration(limit_s)}"))
    end = (environ.get("SLURM_JOB_END_TIME") or "").strip()
    if end:
        try:  # by the one number rule: nan and inf are no end
            at = parse(end, Range(low=0))
        except NumberError:
            raise UsageError(f"SLURM_JOB_END_TIME is {end!r}: expected the job's end as a Unix "
                             f"time (seconds); unset it or pass --time-limit.") from None
        if at > 0:  # SLURM writes 0 where the job has no limit
            found.append(Deadline(at, "the SLURM job's end"))
    return min(found, key=lambda d: d.at) if found else None


def options(a: argparse.Namespace) -> StudyOptions:
    if a.heartbeat < 1:
        raise UsageError(f"--heartbeat must be at least 1 second, got {a.heartbeat}.")
    # Taken off the environment here, once, by the command: MLflow would otherwise resume it as
    # the active run of every unit this process trains.
    entry_run = os.environ.pop("MLFLOW_RUN_ID", None)
    return StudyOptions(data=a.data, storage=a.storage, study_name=a.study_name or None,
                        heartbeat=a.heartbeat, register=a.register or None, alias=a.alias,
                        entry_run=entry_run)
