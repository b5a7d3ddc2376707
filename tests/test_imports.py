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
