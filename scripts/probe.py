"""Replay the README's "What survives a failure" table end to end, as a user meets each fault
(and, from scripts/probe_security.py, a row per finding of the security review):
the real commands in processes of their own, stopped with real signals, on real full disks
(a tmpfs; a file-size limit where this machine cannot mount one) and a real tracking server
killed mid-run. Prints OK or NOT OK (with what was seen) per row; exits 1 if any row is not OK.

    bash scripts/probe.sh            # every row, about 5 to 10 minutes on a 2-core CPU
    bash scripts/probe.sh sigterm    # the rows whose name contains a word

Each row runs in a fresh folder with its own tracking store, parse cache and checkpoints, on a
small generated FER2013 file (never the real data).
"""

from __future__ import annotations

import gzip
import os
import re
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BASIC = str(ROOT / "ablations" / "stages" / "basic.yaml")
STUDY = str(ROOT / "ablations" / "study.yaml")
PY = sys.executable


class NotOk(Exception):
    """What a row saw that the table says should not happen."""


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise NotOk(what)


# --------------------------------------------------------------------------- a row's world


class World:
    """A fresh folder: the data, the stores and the environment every command of a row gets."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "faces.csv"
        self.data.write_text(faces_csv())
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID",
                                 "MLFLOW_EXPERIMENT_NAME")}
        self.env.update(MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
                        FER_CACHE_DIR=str(root / "cache"),
                        FER_CHECKPOINT_DIR=str(root / "checkpoints"),
                        PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")

    def run(self, module: str, *args, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", module, *map(str, args)], cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=timeout, **kw)

    def start(self, module: str, *args, **kw) -> "Running":
        return Running(subprocess.Popen([PY, "-m", module, *map(str, args)], cwd=self.root,
                                        env=self.env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True,
                                        preexec_fn=_as_from_a_terminal, **kw))

    def client(self, uri: str | None = None):
        import mlflow

        return mlflow.MlflowClient(uri or self.env["MLFLOW_TRACKING_URI"])

    def runs(self, uri: str | None = None) -> list:
        c = self.client(uri)
        exps = [e.experiment_id for e in c.search_experiments()]
        return c.search_runs(exps, max_results=5000) if exps else []

    def epochs_logged(self, run_id: str, uri: str | None = None) -> list[int]:
        return sorted(m.step for m in self.client(uri).get_metric_history(run_id, "val/acc"))


def _as_from_a_terminal() -> None:
    """Ctrl-C's default meaning, as a command typed at a terminal has it: a probe started in
    the background by a non-interactive shell ignores SIGINT, and its children would inherit
    that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Running:
    """A command in the background whose output is read as it comes, line by line."""

    def __init__(self, p: subprocess.Popen):
        self.p, self.lines, self.done = p, [], False
        self.new = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stdout:
            with self.new:
                self.lines.append(line)
                self.new.notify_all()
        with self.new:
            self.done = True
            self.new.notify_all()

    def wait_for(self, pattern: str, timeout: float = 300) -> str:
        """The first line matching ``pattern``; NotOk if the command ends or time runs out."""
        rx, deadline = re.compile(pattern), time.time() + timeout
        with self.new:
            while True:
                hit = next((ln for ln in self.lines if rx.search(ln)), None)
                if hit is not None:
                    return hit
                if self.done or time.time() > deadline:
                    break
                self.new.wait(1)
        raise NotOk(f"never printed {pattern!r}; last output: {self.text()[-600:]!r}")

    def signal(self, sig: int) -> None:
        self.p.send_signal(sig)

    def end(self, timeout: float = 600) -> int:
        self.p.wait(timeout=timeout)
        time.sleep(0.2)  # the reader's last lines
        return self.p.returncode

    def text(self) -> str:
        with self.new:
            return "".join(self.lines)


def faces_csv() -> str:
    """105 + 21 + 14 rows with a class-dependent pattern, in Kaggle's layout."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:48]
    rows = ["emotion,pixels,Usage"]
    for usage, n in (("Training", 15), ("PublicTest", 3), ("PrivateTest", 2)):
        for c in range(7):
            for _ in range(n):
                img = np.clip(40 + 25 * c + 30 * np.sin((xx + 3 * c) / (3 + c)) +
                              rng.normal(0, 12, (48, 48)), 0, 255).astype(np.uint8)
                rows.append(f"{c},{' '.join(map(str, img.ravel()))},{usage}")
    return "\n".join(rows) + "\n"


def error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    expect(r.returncode == 2, f"exit code {r.returncode}, expected 2: {r.stderr[-600:]!r}")
    expect("Traceback" not in r.stderr, f"a traceback: {r.stderr[-600:]!r}")
    lines = error_lines(r.stderr)
    expect(len(lines) == 1, f"{len(lines)} error lines: {r.stderr[-600:]!r}")
    for n in needles:
        expect(n in lines[0], f"{n!r} not in {lines[0]!r}")
    return lines[0]


def train_args(w: World, epochs: int, width: float = 0.125) -> list[str]:
    return ["--config", BASIC, "--data", str(w.data), "--set",
            f"epochs={epochs} width={width} batch_size=16 checkpoint_every_s=0 device=cpu"]


def the_run(w: World, uri: str | None = None):
    runs = w.runs(uri)
    expect(len(runs) == 1, f"{len(runs)} runs in the store, expected 1")
    return runs[0]


# --------------------------------------------------------------------------- the table's rows


def train_stopped(w: World, sig: int) -> None:
    p = w.start("pipeline.train", *train_args(w, 40))
    p.wait_for(r"epoch 2/40:")
    p.signal(sig)
    rc = p.end()
    expect(rc == 130, f"exit code {rc}, expected 130: {p.text()[-600:]!r}")
    run = the_run(w)
    rid = run.info.run_id
    expect(run.info.status == "KILLED", f"the run is {run.info.status}, expected KILLED")
    expect(run.data.tags.get("failure", "").startswith("stopped"),
           f"failure tag {run.data.tags.get('failure')!r}, expected 'stopped ...'")
    expect(f"--resume {rid}" in p.text(), "the printed line does not name --resume <run>")
    expect((w.root / "checkpoints" / f"{rid}.pt").exists(), "no checkpoint kept")
    r = w.run("pipeline.train", *train_args(w, 40), "--resume", rid)
    expect(r.returncode == 0, f"resume exit code {r.returncode}: {r.stderr[-600:]!r}")
    run = the_run(w)
    expect(run.info.status == "FINISHED" and "failure" not in run.data.tags,
           f"after resume {run.info.status}, tags {run.data.tags.get('failure')!r}")
    expect(w.epochs_logged(rid) == list(range(1, 41)), "epochs not logged once each")


def row_train_sigterm(w: World) -> None:
    """Ctrl-C or SIGTERM (train): KILLED, checkpoint kept, tag `failure: stopped`, the line
    names the resume command; the resume ends FINISHED, every epoch logged once."""
    train_stopped(w, signal.SIGTERM)


def row_train_ctrl_c(w: World) -> None:
    """The same for Ctrl-C (SIGINT), as a terminal sends it."""
    train_stopped(w, signal.SIGINT)


def study_state(w: World, storage: str) -> dict[str, int]:
    db = storage.removeprefix("sqlite:///")
    if not Path(w.root / db).exists():
        return {}
    with sqlite3.connect(w.root / db) as c:
        return dict(c.execute("select state, count(*) from trials group by state").fetchall())


def cell_runs(w: World) -> dict[tuple[str, str], list[str]]:
    out: dict[tuple[str, str], list[str]] = {}
    for r in w.runs():
        if "cell" in r.data.tags:
            out.setdefault((r.data.tags["cell"], r.data.tags["seed"]), []).append(r.info.status)
    return out


ABLATE = ["--profile", "smoke", "--seeds", "1", "--concurrent", "1", "--no-report"]


def ablate_args(w: World, storage: str = "sqlite:///study.db", *extra: str) -> list[str]:
    return ["--data", str(w.data), "--study", STUDY, "--storage", storage, *ABLATE, *extra]


def check_study_done(w: World, storage: str = "sqlite:///study.db", *, fails_ok: bool = False):
    states = study_state(w, storage)
    expect(set(states) <= {"COMPLETE", "FAIL"} and states.get("COMPLETE"),
           f"trial states {states}, expected all COMPLETE")
    expect(fails_ok or "FAIL" not in states, f"{states.get('FAIL')} trial(s) FAIL")
    cells = cell_runs(w)
    twice = {k: v for k, v in cells.items() if v.count("FINISHED") != 1}
    expect(not twice, f"units not FINISHED exactly once: {twice}")
    expect(len(cells) == states["COMPLETE"], f"{len(cells)} cell runs for "
                                             f"{states['COMPLETE']} complete units")


def row_ablate_sigterm(w: World) -> None:
    """Ctrl-C or SIGTERM (ablate): the stopped unit goes back WAITING, nothing RUNNING or
    FAIL; its run KILLED with reason stopped; the printed command continues the study, to every
    unit once."""
    p = w.start("pipeline.ablate", *ablate_args(w))
    p.wait_for(r"^\[2/\d+\]")
    p.signal(signal.SIGTERM)
    rc = p.end()
    expect(rc == 130, f"exit code {rc}, expected 130: {p.text()[-600:]!r}")
    states = study_state(w, "sqlite:///study.db")
    expect("RUNNING" not in states and "FAIL" not in states,
           f"trial states after the stop {states}")
    # The unit's run, if the stop came after it began one: KILLED with the reason.
    runs = [r for r in w.runs() if "cell" in r.data.tags]
    stopped = [r for r in runs if r.info.status != "FINISHED"]
    expect(all(r.info.status == "KILLED" and r.data.tags.get("failure", "").startswith("stopped")
               for r in stopped),
           f"unfinished unit runs {[(r.info.status, r.data.tags.get('failure')) for r in stopped]}")
    again = re.search(r"continue the study with `([^`]+)`", p.text())
    expect(again is not None, "no command printed to continue the study")
    r = w.run("pipeline.ablate", *ablate_args(w))
    expect(r.returncode == 0, f"the rerun exits {r.returncode}: {r.stderr[-600:]!r}")
    check_study_done(w)


def row_train_kill9(w: World) -> None:
    """kill -9 (train): the run stays RUNNING; the next entry point marks it FAILED (tag
    failure); --resume continues it from its last checkpoint to FINISHED."""
    p = w.start("pipeline.train", *train_args(w, 40))
    p.wait_for(r"epoch 3/40:")
    p.signal(signal.SIGKILL)
    p.end()
    run = the_run(w)
    expect(run.info.status == "RUNNING", f"after kill -9 the run is {run.info.status}")
    r = w.run("pipeline.split", "--data", w.data)  # any next entry point
    expect(r.returncode == 0, f"the next entry point exits {r.returncode}: {r.stderr[-600:]!r}")
    runs = {x.info.run_id: x for x in w.runs()}
    run = runs[run.info.run_id]
    expect(run.info.status == "FAILED" and run.data.tags.get("failure"),
           f"not marked FAILED with a reason: {run.info.status}")
    r = w.run("pipeline.train", *train_args(w, 40), "--resume", run.info.run_id)
    expect(r.returncode == 0, f"resume exits {r.returncode}: {r.stderr[-600:]!r}")
    expect("resuming" in r.stdout + r.stderr, "the resume did not start from a checkpoint")
    after = {x.info.run_id: x for x in w.runs()}[run.info.run_id]
    expect(after.info.status == "FINISHED", f"after resume {after.info.status}")
    expect(w.epochs_logged(run.info.run_id) == list(range(1, 41)), "epochs not logged once each")


def row_ablate_kill9(w: World) -> None:
    """kill -9 (an ablation worker): its parent run is marked KILLED with the reason, the next
    worker takes the parent over and the crashed unit is retried; every unit FINISHED once."""
    p = w.start("pipeline.ablate", *ablate_args(w, "sqlite:///study.db", "--heartbeat", "2"))
    p.wait_for(r"^\[2/\d+\]")
    p.signal(signal.SIGKILL)
    p.end()
    r = w.run("pipeline.ablate", *ablate_args(w, "sqlite:///study.db", "--heartbeat", "2"))
    expect(r.returncode == 0, f"the next worker exits {r.returncode}: {r.stderr[-600:]!r}")
    check_study_done(w, fails_ok=True)  # the crashed unit: FAIL, and its retried copy
    parents = [x for x in w.runs() if x.data.tags.get("role") == "study"]
    expect(parents and all(x.info.status in ("RUNNING", "FINISHED") for x in parents),
           f"parent runs {[x.info.status for x in parents]}")


def row_two_workers_fresh_store(w: World) -> None:
    """Two workers started at once on a fresh study store and a fresh tracking store: both
    finish, every unit trained exactly once."""
    a = w.start("pipeline.ablate", *ablate_args(w, "sqlite:///fresh.db", "--threads", "1"))
    b = w.start("pipeline.ablate", *ablate_args(w, "sqlite:///fresh.db", "--threads", "1"))
    ra, rb = a.end(), b.end()
    expect(ra == 0 and rb == 0, f"exit codes {ra}, {rb}: {a.text()[-400:]!r} {b.text()[-400:]!r}")
    check_study_done(w, "sqlite:///fresh.db")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(w: World, port: int) -> subprocess.Popen:
    p = subprocess.Popen([str(Path(PY).parent / "mlflow"), "server", "--host", "127.0.0.1",
                          "--port", str(port), "--backend-store-uri",
                          f"sqlite:///{w.root / 'server.db'}", "--artifacts-destination",
                          str(w.root / "server-artifacts"), "--workers", "1"],
                         env=w.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return p
        except OSError:
            expect(p.poll() is None, "mlflow server exited at start")
            time.sleep(0.3)
    raise NotOk("mlflow server did not answer /health in 120 s")


def row_tracking_server_dies(w: World) -> None:
    """The tracking server dies mid-training: one line naming the run and its resume command,
    the checkpoint kept; once the server is back, the resume ends FINISHED with every epoch
    logged once (those trained while it was gone included)."""
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    w.env["MLFLOW_TRACKING_URI"] = uri
    server = _server(w, port)
    try:
        p = w.start("pipeline.train", *train_args(w, 40))
        p.wait_for(r"epoch 2/40:")
        rid = the_run(w, uri).info.run_id
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(30)
        rc = p.end()
        expect(rc == 2, f"exit code {rc}, expected 2: {p.text()[-600:]!r}")
        lines = error_lines(p.text())
        expect(len(lines) == 1 and f"--resume {rid}" in lines[0],
               f"error lines {lines!r}")
        expect((w.root / "checkpoints" / f"{rid}.pt").exists(), "no checkpoint kept")
        server = _server(w, port)
        r = w.run("pipeline.train", *train_args(w, 40), "--resume", rid)
        expect(r.returncode == 0, f"resume exits {r.returncode}: {r.stderr[-600:]!r}")
        expect(w.client(uri).get_run(rid).info.status == "FINISHED", "not FINISHED")
        expect(w.epochs_logged(rid, uri) == list(range(1, 41)), "epochs not logged once each")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)


def _small_disk(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def row_full_disk_checkpoints(w: World) -> None:
    """A full disk under the checkpoint folder: one line naming the checkpoint, the space free
    and needed; no partial file; the epochs trained logged; the run FAILED with the reason."""
    d = w.root / "small"
    mounted = _small_disk(d, "256k")
    w.env["FER_CHECKPOINT_DIR"] = str(d)

    def limit():  # where no tmpfs can be mounted, a file-size limit fails the write alike
        if not mounted:
            resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))

    try:
        r = w.run("pipeline.train", *train_args(w, 3, width=1), preexec_fn=limit)
        one_line_error(r, "cannot write checkpoint", "MB free and the checkpoint needs about")
        expect(not [f for f in d.iterdir() if f.suffix == ".pt" or ".tmp" in f.name],
               f"files left in the checkpoint folder: {list(d.iterdir())}")
        run = the_run(w)
        expect(run.info.status == "FAILED" and "cannot write checkpoint" in
               run.data.tags.get("failure", ""), f"run {run.info.status}, tags {run.data.tags}")
        expect(w.epochs_logged(run.info.run_id) == [1], "the trained epoch was not logged")
    finally:
        if mounted:
            _unmount(d)


def row_full_disk_tracking_store(w: World) -> None:
    """A full disk under the tracking store: one line naming its folder and the command that
    continues the run; once there is room, the run resumes to FINISHED, every epoch once."""
    d = w.root / "small"
    if not _small_disk(d, "1600k"):
        raise NotOk("cannot mount a tmpfs here (needs root): row not replayed")
    try:
        w.env["MLFLOW_TRACKING_URI"] = f"sqlite:///{d / 'mlflow.db'}"
        args = train_args(w, 300)
        r = w.run("pipeline.train", *args)
        line = one_line_error(r, f"its folder {d} is full")
        m = re.search(r"continue from the run's last checkpoint with `([^`]+)`", line)
        expect(m is not None, f"no command to continue in {line!r}")
        rid = m.group(1).rsplit(" ", 1)[1]
        subprocess.run(["mount", "-o", "remount,size=64m", str(d)], check=True)
        r = w.run("pipeline.train", *args, "--resume", rid)
        expect(r.returncode == 0, f"resume exits {r.returncode}: {r.stderr[-600:]!r}")
        run = w.client().get_run(rid)
        expect(run.info.status == "FINISHED" and "failure" not in run.data.tags, "not FINISHED")
        expect(w.epochs_logged(rid) == list(range(1, 301)), "epochs not logged once each")
    finally:
        _unmount(d)


def row_damaged_parse_cache(w: World) -> None:
    """A damaged parse cache (truncated, emptied, bit-flipped) is a miss: the source is parsed
    again and the entry rewritten."""
    r = w.run("pipeline.split", "--data", w.data)
    expect(r.returncode == 0, f"split exits {r.returncode}: {r.stderr[-600:]!r}")
    [entry] = list((w.root / "cache").iterdir())
    good = entry.read_bytes()
    for name, bad in (("truncated", good[: len(good) // 2]), ("emptied", b""),
                      ("bit-flipped", good[:100] + bytes([good[100] ^ 0x40]) + good[101:])):
        entry.write_bytes(bad)
        r = w.run("pipeline.split", "--data", w.data)
        expect(r.returncode == 0, f"{name}: split exits {r.returncode}: {r.stderr[-600:]!r}")
        expect(entry.read_bytes() == good, f"{name}: the entry was not rewritten")


def row_unreadable_data(w: World) -> None:
    """Data that cannot be read is one line naming the file: a FIFO (refused at once), pixels
    separated by tabs (said so), a truncated gzip (with the last intact line), an image that
    claims more pixels than the decompression-bomb limit."""
    fifo = w.root / "fifo.csv"
    os.mkfifo(fifo)
    one_line_error(w.run("pipeline.split", "--data", fifo, timeout=60), str(fifo),
                   "not a regular file")
    tabs = w.root / "tabs.csv"
    lines = w.data.read_text().splitlines()
    tabs.write_text("\n".join([lines[0], *(ln.replace(" ", "\t") for ln in lines[1:])]) + "\n")
    one_line_error(w.run("pipeline.split", "--data", tabs), str(tabs), "separated by '\\t'")
    cut = w.root / "cut.csv.gz"
    z = gzip.compress(w.data.read_bytes())
    cut.write_bytes(z[: len(z) * 2 // 3])
    one_line_error(w.run("pipeline.split", "--data", cut), str(cut),
                   "corrupt or truncated gzip data after line")
    folder = w.root / "folder"
    from PIL import Image

    for split in ("train", "test"):
        (folder / split / "happy").mkdir(parents=True)
        Image.new("L", (48, 48)).save(folder / split / "happy" / "a.png")
    big = folder / "train" / "happy" / "bomb.png"
    Image.new("1", (20000, 20000)).save(big)  # 400 megapixels in a few kilobytes
    one_line_error(w.run("pipeline.split", "--data", folder), str(big))


def row_tracking_store_gone(w: World) -> None:
    """A study whose tracking store is gone stops before any training and says which study
    file to remove or which other --storage to pass."""
    p = w.start("pipeline.ablate", *ablate_args(w))
    p.wait_for(r"^\[1/\d+\]")
    p.signal(signal.SIGTERM)
    p.end()
    (w.root / "mlflow.db").unlink()
    r = w.run("pipeline.ablate", *ablate_args(w))
    one_line_error(r, "study.db")
    expect(not w.runs() or all("cell" not in x.data.tags for x in w.runs()),
           "a run was started in the new tracking store")


ROWS: dict[str, Callable[[World], None]] = {
    "ctrl-c (train)": row_train_ctrl_c,
    "sigterm (train)": row_train_sigterm,
    "sigterm (ablate)": row_ablate_sigterm,
    "kill -9 (train)": row_train_kill9,
    "kill -9 (ablate worker)": row_ablate_kill9,
    "two workers on a fresh store": row_two_workers_fresh_store,
    "tracking server dies mid-training": row_tracking_server_dies,
    "full disk under the checkpoints": row_full_disk_checkpoints,
    "full disk under the tracking store": row_full_disk_tracking_store,
    "damaged parse cache": row_damaged_parse_cache,
    "data that cannot be read": row_unreadable_data,
    "tracking store gone": row_tracking_store_gone,
}


def main(argv: list[str]) -> int:
    sys.modules.setdefault("probe", sys.modules[__name__])  # one module, whoever imports it
    from probe_security import ROWS as SECURITY

    ROWS.update(SECURITY)
    chosen = [k for k in ROWS if not argv or any(a.lower() in k for a in argv)]
    if not chosen:
        print(f"no row matches {argv}; rows: {', '.join(ROWS)}", file=sys.stderr)
        return 2
    bad = 0
    for name in chosen:
        t0 = time.time()
        root = Path(tempfile.mkdtemp(prefix="probe-"))
        try:
            ROWS[name](World(root))
            verdict = "OK    "
        except NotOk as e:
            verdict, bad = "NOT OK", bad + 1
            name = f"{name}: {e}"
        except Exception:  # the probe's own failure is a row not shown to work
            verdict, bad = "NOT OK", bad + 1
            name = f"{name}: {traceback.format_exc(limit=3)}"
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"{verdict} {name} ({time.time() - t0:.0f} s)", flush=True)
    print(f"{len(chosen) - bad} of {len(chosen)} rows OK")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
