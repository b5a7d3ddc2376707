"""What every entry point shares: common arguments and turning known errors into one paragraph."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from mlflow.exceptions import MlflowException

from . import numbers, redact
from .errors import EXPECTED, UsageError, TrainingError, one_line  # noqa: F401 (imported from here too)
from .numbers import Range
from .stores import bound_retries, refusal


class Number:
    """An argparse ``type`` that reads a flag's value by pipeline.numbers' rule; an empty value
    is not given, so the flag keeps its default (MLproject passes "" for a parameter left out).
    ``words`` name values that are not numbers (``{"auto": None}``)."""

    def __init__(self, rng: Range, words: dict[str, Any] | None = None):
        self.rng, self.words = rng, dict(words or {})
        self.__name__ = "number"  # argparse names the type in some of its own messages

    def expected(self) -> str:
        return " or ".join((*self.words, self.rng.expected()))

    def __call__(self, text: str) -> Any:
        if text.strip().lower() in self.words:
            return self.words[text.strip().lower()]
        try:
            return numbers.parse(text, self.rng)
        except numbers.NumberError:
            raise argparse.ArgumentTypeError(f"expected {self.expected()}, got "
                                             f"{numbers.shown(text)}") from None


whole = Number(numbers.WHOLE_0)
share = Number(numbers.SHARE_OPEN)


class Parser(argparse.ArgumentParser):
    """argparse with two rules of the project: a refused value is one line (``error: argument
    --seeds: expected ..., got '0'``), and a flag whose value reads as not given (``None``: an
    empty number) keeps its default."""

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        for action in self._actions:
            d = action.default
            if action.type is not None and d is not None and getattr(ns, action.dest, 0) is None:
                setattr(ns, action.dest, action.type(d) if isinstance(d, str) else d)
        return ns, rest

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _prog() -> str | None:
    """``python -m pipeline.ablate`` for an entry point started so (argparse would say
    ``ablate.py``, a command that does not run); argparse's own choice otherwise."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is not None and script.suffix == ".py" and script.parent.name == "pipeline":
        return f"python -m pipeline.{script.stem}"
    return None


def parser(description: str) -> argparse.ArgumentParser:
    p = Parser(prog=_prog(), description=description,
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--experiment", default=None,
                   help="MLflow experiment name (ignored under `mlflow run`, which chose one); "
                        "default fer2013")
    return p


# Warnings silenced by what they say, each for its reason; any other shows, so that a deprecation
# in MLflow, Optuna or their dependencies is seen before it breaks the ranges pyproject allows.
QUIET_WARNINGS = (
    # Optuna's heartbeats and stale-trial retries, which the study queue is built on
    # (pipeline.study.queue), and its matplotlib plots are marked experimental; used knowingly.
    r"Argument ``heartbeat_interval`` is an experimental feature",
    r"optuna\.storages\._heartbeat\.fail_stale_trials is experimental",
    r"RetryHeartbeatStaleTrialCallback is experimental",
    r"optuna\.visualization\.matplotlib\.\S+ is experimental",
    # Workers record trial heartbeats themselves (pipeline.study.Heartbeat) around ask/tell.
    r"Heartbeat of storage is supposed to be used with Study\.optimize",
    # MLflow resolves a local data file's source among two registrations of one class.
    r"The specified dataset source can be interpreted in multiple ways",
    # Inside MLflow's own SQL store (mlflow 3.17 with SQLAlchemy 2); nothing to change here.
    r"The ``noload`` loader strategy is deprecated",
)


def quiet_libraries() -> None:
    # MLflow and alembic print migrations and hints on every start; keep the terminal for our own
    # progress and results.
    os.environ.setdefault("MLFLOW_ENABLE_PROACTIVE_SYSTEM_METRICS", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    bound_retries()
    for name in ("mlflow", "alembic", "optuna", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # It logs each database error with a traceback before raising it; the entry point reports
    # the raised error in one line.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_main(fn: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run an entry point; expected errors print one paragraph and exit 2, never a traceback."""
    quiet_libraries()
    redact.tracking_credentials()
    # SIGTERM (a scheduler's or `kill`'s stop) is handled as Ctrl-C: runs end KILLED with their
    # checkpoints kept, and a worker hands its cell straight back to the queue.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        code = fn(argv)
    except EXPECTED as e:
        # One line: the terminal wraps it, and grep and logs keep it whole.
        print(f"error: {redact.scrub(one_line(str(e)))}", file=sys.stderr)
        sys.exit(2)
    except MlflowException as e:
        # A tracking server's authentication refusing a write (403) or the account (401): the
        # first write refused, so nothing of this command's was written there.
        reason = refusal(e)
        if reason is None:
            raise
        print(f"error: {redact.scrub(reason)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
