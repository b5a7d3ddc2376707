"""The errors an entry point turns into one line for the person who typed the command. They sit
below every module that raises them, so the training core never imports the command line."""

from __future__ import annotations

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE


class ConfigError(ValueError):
    """A config that cannot be used, with the valid keys or values in the message."""


class DataError(ValueError):
    """A data source that cannot be used, with a message a person can act on."""


class UsageError(ValueError):
    """Bad arguments or a bad study/search file, phrased for the person who typed them."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, for example)."""


class InputError(MlflowException, ValueError):
    """A request the served model cannot read (pixels or photos), with the reason. As an
    MlflowException with INVALID_PARAMETER_VALUE, `mlflow models serve` answers it with 400 and
    this reason as its message, and sends no server traceback to the client."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class RepeatedFailure(RuntimeError):
    """A worker that met the same unexpected error (a bug) in several units and stopped, with
    the error and how to go on in the message."""


# What an entry point reports in one line (exit 2) instead of a traceback.
EXPECTED = (DataError, ConfigError, UsageError, TrainingError, InputError, ConnectionError,
            FileNotFoundError, PermissionError, RepeatedFailure)


def one_line(message: str) -> str:
    """``message`` as one line a terminal shows as one: a character that is not printable (a
    newline or a control character in a file name, say) is shown as its Python escape."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in message)
