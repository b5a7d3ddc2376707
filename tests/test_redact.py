"""Secrets in URLs: shown as ***, moved out of the tracking URL, refused where `mlflow run` logged
them; and, end to end, a study given both never writes or shows them anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from pipeline import redact
from pipeline.errors import UsageError
from tests.conftest import ROOT

@pytest.mark.parametrize("given, shown", [
    ("postgresql://fer:s3cr%40t@db.example:5432/optuna",
     "postgresql://fer:***@db.example:5432/optuna"),
    ("postgresql+psycopg2://fer:pw:with:colons@db/optuna?sslmode=require",
     "postgresql+psycopg2://fer:***@db/optuna?sslmode=require"),
    ("postgresql://fer@db/optuna?password=hunter22&sslmode=require",
     "postgresql://fer@db/optuna?password=***&sslmode=require"),
    ("mysql://root:p@ss@host/db", "mysql://root:***@host/db"),
    ("https://alice:tok3n@mlflow.example/path", "https://mlflow.example/path"),
    ("https://ghp_token123@mlflow.example", "https://mlflow.example"),
    ("postgresql://fer@db/optuna", "postgresql://fer@db/optuna"),
    ("sqlite:///ablate.db", "sqlite:///ablate.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("not a url", "not a url"),
])
def test_a_url_is_shown_without_its_secrets_and_keeps_the_rest(given, shown):
    assert redact.url(given) == shown


def test_text_and_command_lines_lose_every_secret_they_quote():
    redact.remember("postgresql://fer:Zq9-wombat@db/optuna")
    msg = 'connection to "db" failed: password "Zq9-wombat" rejected'
    assert "Zq9-wombat" not in redact.scrub(msg)
    shown = redact.argv(["python", "-m", "pipeline.ablate", "--storage",
                         "postgresql://fer:Zq9-wombat@db/optuna",
                         "--storage=postgresql://u:other-secret@h/d"])
    assert shown[4] == "postgresql://fer:***@db/optuna"
    assert shown[5] == "--storage=postgresql://u:***@h/d"


def test_a_tracking_url_with_a_user_and_password_is_split_as_mlflow_documents():
    env = {"MLFLOW_TRACKING_URI": "https://alice:p%2Fw@mlflow.example:8443"}
    redact.tracking_credentials(env)
    assert env == {"MLFLOW_TRACKING_URI": "https://mlflow.example:8443",
                   "MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "p/w"}
    plain = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}
    redact.tracking_credentials(plain)
    assert plain == {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}


def test_a_password_under_mlflow_run_is_refused_with_where_it_belongs_and_the_run_to_delete():
    url = "postgresql://fer:hunter22@db/optuna"
    with pytest.raises(UsageError) as e:
        redact.refuse_logged(url, "abc123")
    msg = str(e.value)
    assert "hunter22" not in msg
    assert "mlflow runs delete --run-id abc123" in msg
    assert "~/.pgpass" in msg and "PGPASSWORD" in msg
    redact.refuse_logged(url, None)  # given straight to a command: used, never shown
    redact.refuse_logged("postgresql://fer@db/optuna", "abc123")  # no password: nothing logged


AUDIT = '''\
import json, os, sys
_log = os.environ.get("FER_TEST_AUDIT")
if _log:
    def _note(kind, words):
        with open(_log, "a") as fh:
            fh.write(json.dumps([kind, os.getpid(), [str(w) for w in words]]) + "\\n")

    _note("start", sys.orig_argv)

    def _hook(event, args):
        if event == "subprocess.Popen":
            words = args[1]
            _note("popen", words if isinstance(words, (list, tuple)) else [words])

    sys.addaudithook(_hook)
'''


def _database_rows(url: str) -> str:
    import sqlalchemy

    eng = sqlalchemy.create_engine(url)
    with eng.connect() as c:
        tables = c.execute(sqlalchemy.text(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"))
        names = [t for (t,) in tables]
        rows = [r for n in names for (r,) in c.execute(sqlalchemy.text(
            f'SELECT row_to_json(t)::text FROM "{n}" t'))]
    eng.dispose()
    assert "studies" in names and rows  # the study is there to be searched
    return "\n".join(rows)


@pytest.mark.slow
@pytest.mark.postgres
def test_a_study_given_a_storage_and_a_tracking_url_with_secrets_never_writes_or_shows_them(
        kaggle_csv, tmp_path, fresh_pg):
    from tests.conftest import free_port, mini_study, start_cli, start_mlflow_server, stop_server

    db_word, http_word = "Wombat-db-7c1e", "Wombat-http-3f9a"
    storage = fresh_pg.replace("postgres@", f"postgres:{db_word}@")  # trust auth: not checked
    (tmp_path / "server").mkdir()
    port = free_port()
    server = start_mlflow_server(tmp_path / "server", port, log=tmp_path / "server" / "log")
    hook, audit = tmp_path / "hook", tmp_path / "audit.jsonl"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(AUDIT)
    try:
        p = start_cli("pipeline.ablate", "--data", kaggle_csv, "--study", mini_study(tmp_path),
                      "--profile", "smoke", "--storage", storage, "--jobs", "2",
                      "--report-dir", tmp_path / "report",
                      env={"MLFLOW_TRACKING_URI": f"http://fer:{http_word}@127.0.0.1:{port}",
                           "PYTHONPATH": str(hook), "FER_TEST_AUDIT": str(audit)},
                      drop=("MLFLOW_EXPERIMENT_ID",))
        printed = p.communicate(timeout=900)[0]
        assert p.returncode == 0, printed[-3000:]
        client = mlflow.MlflowClient(f"http://127.0.0.1:{port}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    finally:
        stop_server(server)
    assert len([r for r in runs if "cell" in r.data.tags]) == 4  # the study trained, through it
    records = [json.loads(ln) for ln in audit.read_text().splitlines()]
    helpers = [words for kind, pid, words in records
               if kind == "start" and pid != p.pid and "pipeline.ablate" in words]
    assert helpers, "the second worker was never started"
    # Its own command line is the user's; everything the study started, and everything it
    # wrote or printed, is searched.
    shown = [" ".join(words) for kind, pid, words in records if not (kind == "start"
                                                                      and pid == p.pid)]
    written = [f.read_bytes().decode("latin-1") for f in tmp_path.rglob("*")
               if f.is_file() and f != audit and hook not in f.parents]
    fields = [f"{k}={v}" for r in runs for k, v in {**r.data.params, **r.data.tags}.items()]
    fields += [k for r in runs for k in r.data.metrics]
    for word in (db_word, http_word):
        assert word not in printed, [ln for ln in printed.splitlines() if word in ln]
        assert not [s for s in shown if word in s]
        assert not [w[:200] for w in written if word in w]
        assert not [f for f in fields if word in f]
        assert word not in _database_rows(fresh_pg)


@pytest.mark.slow
def test_mlflow_run_with_a_password_in_its_storage_parameter_is_refused_in_one_line(
        kaggle_csv, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    r = subprocess.run([str(Path(sys.executable).parent / "mlflow"), "run", str(ROOT), "-e",
                        "ablate", "--env-manager", "local", "-P", f"data={kaggle_csv}",
                        "-P", "profile=smoke",
                        "-P", "storage=postgresql://fer:Wombat-pw-81@127.0.0.1:1/optuna"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode != 0
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    # What `mlflow run` did before any of the project's code ran; the message says so.
    assert run.data.params["storage"].endswith("Wombat-pw-81@127.0.0.1:1/optuna")
    assert f"mlflow runs delete --run-id {run.info.run_id}" in line
    assert "Wombat-pw-81" not in line and "~/.pgpass" in line
    assert not (tmp_path / "ablation_report").exists()
