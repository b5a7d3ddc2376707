"""The wheel: `pip install .` without -e gives every module and the default study, search and
stage files, and the commands run from outside the checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.conftest import ROOT

COMMANDS = ("train", "evaluate", "split", "export", "predict", "bench", "ablate", "tune")


def _wheel(tmp_path: Path) -> Path:
    src = tmp_path / "src"  # a copy: the build writes its build/ folder into the tree it builds
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("pipeline", "ablations"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    # The venv's own setuptools where it is one pyproject accepts (no download); else pip
    # fetches one into an isolated build environment.
    isolation = [] if int(version("setuptools").split(".")[0]) < 68 else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation,
                    "-q", "-w", str(tmp_path / "dist"), str(src)], check=True, timeout=300,
                   capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    return wheel


@pytest.mark.slow
def test_the_wheel_installs_every_module_and_default_file_and_runs_outside_the_checkout(
        tmp_path, kaggle_csv):
    wheel = _wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "pipeline").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    files = {f"pipeline/{p.relative_to(ROOT).as_posix()}" for p in
             (ROOT / "ablations").rglob("*.yaml")}
    assert files and files <= names, sorted(files - names)

    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, timeout=300, capture_output=True)

    def run(*args: str) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path),
               "FER_CACHE_DIR": str(tmp_path / "cache")}
        return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, text=True,
                              capture_output=True, timeout=600)

    r = run("-c", "import pipeline, pipeline.config as c; print(pipeline.__file__); "
                  "print(c.ABLATIONS)")
    where, ablations = r.stdout.split()
    assert Path(where).is_relative_to(site) and Path(ablations) == site / "pipeline/ablations"
    # Every command's parser, with its defaults, in one process (each its own costs seconds).
    r = run("-c", "import contextlib, importlib, io\n"
                  f"for c in {COMMANDS!r}:\n"
                  "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
                  "        importlib.import_module('pipeline.' + c).main(['--help'])\n"
                  "    print(c)")
    assert r.returncode == 0 and r.stdout.split() == list(COMMANDS), r.stderr[-2000:]
    r = run("-c", "from pipeline.config import ABLATIONS; from pipeline.plan import load_study; "
                  "from pipeline.space import load_space; "
                  "print(len(load_study(ABLATIONS / 'study.yaml', 'smoke').cells)); "
                  "load_space(ABLATIONS / 'tune.yaml', 'smoke')")
    assert r.returncode == 0 and int(r.stdout) > 0, r.stderr[-2000:]
    r = run("-m", "pipeline.split", "--data", str(kaggle_csv))
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("-m", "pipeline.predict", str(kaggle_csv))
    assert r.returncode == 2 and "--model-uri" in r.stderr and "Traceback" not in r.stderr
