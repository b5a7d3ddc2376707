"""What every entry point shares: common arguments and turning known errors into one paragraph."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import warnings
from typing import Callable

from .errors import EXPECTED, UsageError, TrainingError  # noqa: F401 (imported from here too)
from .stores import bound_retries


def whole(text: str) -> int:
    """A whole number from the command line; MLproject passes "3.0", which is one, and 3.5 is
    refused with one line instead of being cut to 3."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not math.isfinite(v) or v != int(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number 0 or more, got {text!r}")
    return int(v)


def share(text: str) -> float:
    """A share strictly between 0 and 1 (a fraction of the rows)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") \
            from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1 (both excluded), "
                                         f"got {text!r}")
    return v


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--experiment", default=None,
                   help="MLflow experiment name (ignored under `mlflow run`, which chose one); "
                        "default fer2013")
    return p


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
    warnings.filterwarnings("ignore", module="mlflow")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is experimental.*")
    warnings.filterwarnings("ignore", message=".*is an experimental feature.*")
    # Workers record trial heartbeats themselves (pipeline.study.Heartbeat) around ask/tell.
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_main(fn: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run an entry point; expected errors print one paragraph and exit 2, never a traceback."""
    quiet_libraries()
    # SIGTERM (a scheduler's or `kill`'s stop) is handled as Ctrl-C: runs end KILLED with their
    # checkpoints kept, and a worker hands its cell straight back to the queue.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        code = fn(argv)
    except EXPECTED as e:
        # One line: the terminal wraps it, and grep and logs keep it whole.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
