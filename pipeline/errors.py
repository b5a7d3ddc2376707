"""The errors an entry point turns into one line for the person who typed the command. They sit
below every module that raises them, so the training core never imports the command line."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot be used, with the valid keys or values in the message."""


class DataError(ValueError):
    """A data source that cannot be used, with a message a person can act on."""


class UsageError(ValueError):
    """Bad arguments or a bad study/search file, phrased for the person who typed them."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, for example)."""


# What an entry point reports in one line (exit 2) instead of a traceback.
EXPECTED = (DataError, ConfigError, UsageError, TrainingError, ConnectionError, FileNotFoundError)
