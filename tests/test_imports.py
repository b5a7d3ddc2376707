"""Importing the pipeline changes nothing global: a notebook that imports it keeps its own
matplotlib backend."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize("module", ["pipeline.train", "pipeline.ablate", "pipeline.tune",
                                    "pipeline.predict", "pipeline.plots"])
@pytest.mark.slow
def test_importing_the_pipeline_keeps_the_backend_the_user_configured(module):
    code = ("import matplotlib; b = matplotlib.get_backend(); "
            f"import {module}; assert matplotlib.get_backend() == b, (b, "
            "matplotlib.get_backend()); print(b)")
    # An interactive backend, as a desktop or notebook configures it (its display is not needed
    # to name it).
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "MPLBACKEND": "TkAgg", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "TkAgg"


def test_the_entry_points_silence_named_warnings_and_show_every_other():
    """A deprecation from MLflow, Optuna or anything else reaches the terminal (it will break
    the pinned ranges one day); only the warnings named in cli.QUIET_WARNINGS are silenced."""
    import warnings

    from pipeline.cli import quiet_libraries

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn("Argument ``heartbeat_interval`` is an experimental feature. The "
                      "interface can change in the future.", UserWarning)
        warnings.warn("The specified dataset source can be interpreted in multiple ways: A, B.",
                      UserWarning)
        warnings.warn("RetryFailedTrialCallback has been deprecated in v4.9.0.", FutureWarning)
        warnings.warn_explicit("mlflow.foo is deprecated", DeprecationWarning, "x.py", 1,
                               module="mlflow.tracking")
    assert [str(w.message) for w in seen] == ["RetryFailedTrialCallback has been deprecated in "
                                              "v4.9.0.", "mlflow.foo is deprecated"]
