"""What lies under the tracking store and the study storage: reachability with bounded HTTP
retries, the cross-process lock on a store's first use, and which process owns a run (so a dead
one's runs can be told from live ones). No experiment, run or model is chosen here."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import socket
from pathlib import Path
from typing import Iterator

import mlflow
import sqlalchemy
from mlflow.exceptions import MlflowException

from . import redact


# Bounds on MLflow's HTTP retries: its defaults (7 retries, 120 s timeout) hang for minutes on a
# dead tracking server before failing. Users can still set their own in the environment.
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
_QUICK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def bound_retries() -> None:
    for k, v in HTTP_BOUNDS.items():
        os.environ.setdefault(k, v)


@contextlib.contextmanager
def quick_http() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in _QUICK}
    os.environ.update(_QUICK)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _is_db(uri: str) -> bool:
    return uri.split(":", 1)[0].split("+")[0] in ("postgresql", "mysql", "mssql")


_REFUSED = re.compile(r"endpoint (\S+) failed with error code (401|403)\b")


def refusal(e: BaseException) -> str | None:
    """A tracking server's 401 or 403 (MLflow's authentication) in words: who was refused, and
    what to do; None for any other error."""
    m = _REFUSED.search(str(e))
    if m is None:
        return None
    uri = redact.url(mlflow.get_tracking_uri())
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if m.group(2) == "401":
        who = (f"user {user!r} with that password was not accepted" if user else
               "no user and password were given")
        return (f"the MLflow tracking server {uri} refused this command: {who} (401). Set "
                f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to the account its "
                f"admin gave you (docs/many-machines.md).")
    return (f"the MLflow tracking server {uri} refused user {user!r} at {m.group(1)} (403): "
            f"the account may not write there. Ask the server's admin for EDIT on the "
            f"experiment (MANAGE on a registered model), or use an experiment of your own.")


def check_reachable() -> None:
    """Fail in seconds, before any training, when the tracking store cannot be reached."""
    uri = mlflow.get_tracking_uri()
    try:
        if _is_db(uri):
            # MLflow's own engine retries a dead database for ~100 s; one try says enough here.
            engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 5})
            try:
                engine.connect().close()
            finally:
                engine.dispose()
        with quick_http():
            mlflow.MlflowClient().search_experiments(max_results=1)
    except Exception as e:  # MlflowException, OSError, sqlalchemy's and the drivers' errors
        if not isinstance(e, (MlflowException, OSError)) and "sqlalchemy" not in type(e).__module__:
            raise
        reason = refusal(e)
        if reason:
            raise PermissionError(reason) from None
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ConnectionError(f"MLflow tracking store {redact.url(uri)} is not reachable: "
                              f"{redact.scrub(msg)}") from None


def reachable() -> bool:
    try:
        check_reachable()
        return True
    except ConnectionError:
        return False


class TrackingLost(ConnectionError):
    """The tracking store stopped answering in the middle of a run."""


@contextlib.contextmanager
def first_use_lock(uri: str) -> Iterator[None]:
    """Serialise first uses of a store between processes: its first client creates and migrates
    the schema, and two doing so at once fail (a duplicate column on SQLite, a UniqueViolation
    on PostgreSQL). A file lock beside a SQLite file; an advisory lock on PostgreSQL."""
    if uri.startswith("sqlite:///") and not uri.endswith(":memory:"):
        db = Path(uri[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{db}.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    elif uri.startswith("postgresql"):
        key = int.from_bytes(hashlib.sha1(b"fer-pipeline first use").digest()[:7], "big")
        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 5})
        try:
            conn = engine.connect()
        except Exception:
            engine.dispose()
            yield  # unreachable: the caller's own connection reports it
            return
        try:
            conn.execute(sqlalchemy.text(f"SELECT pg_advisory_lock({key})"))
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text(f"SELECT pg_advisory_unlock({key})"))
        finally:
            conn.close()
            engine.dispose()
    else:
        yield


# A run records which process trains it. A process that dies without ending its run (a crash,
# kill -9) leaves it RUNNING; an entry point's start on the same machine marks it FAILED
# (tracking.sweep_dead_runs), so a resume, a report or a worker never takes it for a live one.


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


# Runs this pipeline owns carry an owner tag that starts with this; the sweep of dead runs looks
# at no other run (a shared tracking server holds other people's, whose tags are theirs).
OWNER_MARK = "fer-pipeline"


def _scope() -> str:
    """Which processes this one can see: its boot and its PID namespace. Containers that share
    a hostname (and machines rebooted since) have another scope, and their pids mean nothing
    here."""
    parts = []
    for f in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(f) if f.endswith("/pid") else Path(f).read_text().strip())
        except OSError:
            parts.append("?")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:10]


def owner_prefix() -> str:
    """The start of the owner tag of every run owned by a process this one can see."""
    return f"{OWNER_MARK}@{socket.gethostname()}#{_scope()}:"


def owner_tag(pid: int | None = None) -> str:
    """The owner tag of process ``pid`` (this one by default): the pipeline's mark, host and
    scope, pid and start time (a pid reused later has another)."""
    pid = os.getpid() if pid is None else pid
    return f"{owner_prefix()}{pid}:{_start_time(pid) or '?'}"


def owner_alive(tag: str | None) -> bool | None:
    """Whether the process named by an owner tag still runs: None (unknown) for any process
    this one cannot see (another host, container or boot; a tag of another tool or of an older
    version, which named no scope), False only for one in this scope that is gone."""
    if not tag or not tag.startswith(owner_prefix()):
        return None
    pid, _, start = tag[len(owner_prefix()):].partition(":")
    if not pid.isdigit():
        return None
    now = _start_time(int(pid))
    if now is None:
        return None if Path(f"/proc/{pid}").exists() else False  # there but unreadable
    return start == "?" or now == start  # a reused pid has another start time
