"""The team setup's tracking server, with MLflow's own authentication (`--app-name basic-auth`):
a worker with its account trains; no account, or a read-only one, is refused in one line and
writes nothing."""

from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path

import mlflow
import pytest

from tests.conftest import ROOT, free_port, run_cli, start_mlflow_server, stop_server

ADMIN_PASSWORD = "admin-password-for-tests"
BASIC = str(ROOT / "ablations/stages/basic.yaml")
TINY_SET = "epochs=1 width=0.125 batch_size=16 data_fraction=0.5 early_stopping=0"


def _as_admin(url: str, endpoint: str, body: dict) -> dict:
    token = base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()
    req = urllib.request.Request(f"{url}/api/{endpoint}",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Basic {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"{}")


@pytest.fixture
def auth_server(tmp_path):
    """A basic-auth tracking server on loopback, as docs/many-machines.md starts it (an account
    sees and writes only what it created or was given), with two accounts."""
    folder = tmp_path / "server"
    folder.mkdir()
    ini = folder / "auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                   f"database_uri = sqlite:///{folder / 'auth.db'}\nadmin_username = admin\n"
                   f"authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = free_port()
    server = start_mlflow_server(folder, port, "--app-name", "basic-auth",
                                 log=folder / "log",
                                 env={"MLFLOW_AUTH_CONFIG_PATH": str(ini),
                                      "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
                                      "MLFLOW_FLASK_SERVER_SECRET_KEY": "tests-only-key"})
    url = f"http://127.0.0.1:{port}"
    accounts = {}
    for user in ("worker", "reader"):
        accounts[user] = f"{user}-password-for-tests"
        _as_admin(url, "2.0/mlflow/users/create", {"username": user, "password": accounts[user]})
    try:
        yield url, accounts
    finally:
        stop_server(server)


def _train(kaggle_csv: Path, url: str, user: str | None, password: str | None):
    env = {"MLFLOW_TRACKING_URI": url, "MLFLOW_EXPERIMENT_ID": "",
           "MLFLOW_TRACKING_USERNAME": user or "", "MLFLOW_TRACKING_PASSWORD": password or ""}
    return run_cli("pipeline.train", "--data", str(kaggle_csv), "--config", BASIC,
                   "--set", TINY_SET, "--experiment", "team", env=env)


def _errors(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


@pytest.mark.slow
def test_the_worker_trains_and_no_account_or_a_read_only_one_is_refused_writing_nothing(
        kaggle_csv, auth_server, monkeypatch):
    url, accounts = auth_server
    r = _train(kaggle_csv, url, "worker", accounts["worker"])
    assert r.returncode == 0, r.stderr[-3000:]
    run_id = json.loads(r.stdout.strip().splitlines()[-1])["run_id"]

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    admin = mlflow.MlflowClient(url)
    team = admin.get_experiment_by_name("team").experiment_id
    # The reader may look at the team's experiment, not write to it.
    _as_admin(url, "3.0/mlflow/users/permissions/grant",
              {"username": "reader", "resource_type": "experiment", "resource_id": team,
               "permission": "READ"})

    r = _train(kaggle_csv, url, None, None)
    assert r.returncode == 2
    (line,) = _errors(r.stderr)
    assert "(401)" in line and "MLFLOW_TRACKING_USERNAME" in line

    r = _train(kaggle_csv, url, "reader", accounts["reader"])
    assert r.returncode == 2
    (line,) = _errors(r.stderr)
    assert "refused user 'reader'" in line and "(403)" in line

    runs = admin.search_runs([team])
    assert [x.info.run_id for x in runs] == [run_id]  # the refused ones wrote nothing
    assert runs[0].info.status == "FINISHED"
