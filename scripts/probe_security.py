"""The security rows of `scripts/probe.sh`: what a team's shared server and database, other
people's photos and a shared folder can do to the pipeline, tried as a user meets each. One row
per finding of the team's security review (docs/many-machines.md, docs/serving.md), each in a
fresh folder of its own (probe.py's World)."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import signal
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np

from probe import (PY, ROOT, STUDY, NotOk, World, _free_port, error_lines, expect,
                   one_line_error, train_args)

ADMIN_PASSWORD = "probe-admin-password"
MODEL = ROOT / "models" / "improved"


def _auth_server(w: World, default: str) -> tuple[subprocess.Popen, str]:
    folder = w.root / "server"
    folder.mkdir()
    ini = folder / "auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = {default}\n"
                   f"database_uri = sqlite:///{folder / 'auth.db'}\nadmin_username = admin\n"
                   f"authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = _free_port()
    env = {**w.env, "MLFLOW_AUTH_CONFIG_PATH": str(ini),
           "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    p = subprocess.Popen([str(Path(PY).parent / "mlflow"), "server", "--app-name", "basic-auth",
                          "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                          "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
                          "--artifacts-destination", str(folder / "artifacts")],
                         env=env, cwd=folder, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return p, url
        except OSError:
            if p.poll() is not None:
                raise NotOk("the basic-auth server did not start")
            time.sleep(0.3)
    raise NotOk("the basic-auth server never answered /health")


def _admin(url: str, endpoint: str, body: dict) -> None:
    token = base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{endpoint}",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Basic {token}"})
    urllib.request.urlopen(req, timeout=30).close()


def row_auth_server(w: World) -> None:
    """1. A tracking server with MLflow's authentication: the workers' account trains; no
    account is one line (401), another account one line (403), and neither writes a run."""
    server, url = _auth_server(w, "NO_PERMISSIONS")
    try:
        for user in ("workers", "alice"):
            _admin(url, "users/create", {"username": user, "password": f"{user}-probe-password"})

        def train(user: str | None) -> subprocess.CompletedProcess:
            w.env.update(MLFLOW_TRACKING_URI=url, MLFLOW_TRACKING_USERNAME=user or "",
                         MLFLOW_TRACKING_PASSWORD=f"{user}-probe-password" if user else "")
            return w.run("pipeline.train", *train_args(w, 1), "--experiment", "team")

        r = train("workers")
        expect(r.returncode == 0, f"the workers' account: exit {r.returncode}: {r.stderr[-600:]!r}")
        one_line_error(train(None), "(401)")
        one_line_error(train("alice"), "refused user 'alice'", "(403)")
        os.environ.update(MLFLOW_TRACKING_USERNAME="admin",  # this process, looking as admin
                          MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD)
        try:
            runs = w.runs(url)
        finally:
            del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
        expect(len(runs) == 1, f"{len(runs)} runs on the server, expected the workers' one")
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def row_password_under_mlflow_run(w: World) -> None:
    """2. A password in `-P storage=` under `mlflow run` is refused in one line naming the run
    that logged it and how to delete it; the line does not repeat the password."""
    r = subprocess.run([str(Path(PY).parent / "mlflow"), "run", str(ROOT), "-e", "ablate",
                        "--env-manager", "local", "-P", f"data={w.data}", "-P", "profile=smoke",
                        "-P", "storage=postgresql://fer:probe-secret-1@127.0.0.1:1/optuna"],
                       cwd=w.root, capture_output=True, text=True, timeout=600,
                       env={**w.env, "PATH": f"{Path(PY).parent}:{os.environ['PATH']}"})
    lines = error_lines(r.stderr)
    expect(r.returncode != 0 and len(lines) == 1, f"exit {r.returncode}: {r.stderr[-600:]!r}")
    expect("mlflow runs delete --run-id" in lines[0] and "~/.pgpass" in lines[0], lines[0])
    expect("probe-secret-1" not in lines[0], "the refusal repeats the password")


def _fresh_database() -> str | None:
    import sqlalchemy

    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    try:
        eng = sqlalchemy.create_engine(admin, isolation_level="AUTOCOMMIT",
                                       connect_args={"connect_timeout": 5})
        name = f"probe_{uuid.uuid4().hex[:10]}"
        with eng.connect() as c:
            c.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
        eng.dispose()
        return name
    except Exception:
        return None


def _drop_database(name: str) -> None:
    import sqlalchemy

    eng = sqlalchemy.create_engine("postgresql://postgres@127.0.0.1:5432/postgres",
                                   isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    eng.dispose()


def row_secrets_never_shown(w: World) -> None:
    """3. A storage URL with a password, given straight to a study of two local workers: the
    study runs, and the password is in none of its output, its helper's command line (what `ps`
    shows), its runs' params and tags, or the files it wrote."""
    db = _fresh_database()
    if db is None:
        raise NotOk("no PostgreSQL on 127.0.0.1:5432 to try it on")
    secret = "probe-db-secret-7"
    storage = f"postgresql://postgres:{secret}@127.0.0.1:5432/{db}"  # trust auth: not checked
    p = w.start("pipeline.ablate", "--data", w.data, "--study", STUDY, "--storage", storage,
                "--profile", "smoke", "--seeds", "1", "--jobs", "2", "--no-report")
    seen: list[str] = []
    while p.p.poll() is None:  # every process it started, as `ps` shows them
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and int(proc.name) != p.p.pid:
                    stat = (proc / "stat").read_text()
                    if int(stat.rsplit(")", 1)[1].split()[1]) == p.p.pid:
                        seen.append((proc / "cmdline").read_bytes().decode(errors="replace"))
            except (OSError, ValueError):
                pass
        time.sleep(0.2)
    p.end()
    _drop_database(db)
    expect(p.p.returncode == 0, f"exit {p.p.returncode}: {p.text()[-600:]!r}")
    expect(any("pipeline.ablate" in c for c in seen), "the second worker was never seen")
    expect(not [c for c in seen if secret in c], "a helper's command line holds the password")
    expect(secret not in p.text(), "the output shows the password")
    fields = [f"{k}={v}" for r in w.runs() for k, v in {**r.data.params, **r.data.tags}.items()]
    expect(not [f for f in fields if secret in f], "a run's param or tag holds the password")
    files = [f for f in w.root.rglob("*") if f.is_file() and secret.encode() in f.read_bytes()]
    expect(not files, f"written into {files[:3]}")


def row_mlproject_injection(w: World) -> None:
    """4. A `-P set=` value that holds shell syntax runs no command; the documented two-word
    value is one argument."""
    r = subprocess.run([str(Path(PY).parent / "mlflow"), "run", str(ROOT), "-e", "train",
                        "--env-manager", "local", "-P", f"data={w.data}",
                        "-P", f"set=epochs=1 width=0.125$(touch {w.root / 'INJECTED'})"],
                       cwd=w.root, capture_output=True, text=True, timeout=600,
                       env={**w.env, "PATH": f"{Path(PY).parent}:{os.environ['PATH']}"})
    expect(not (w.root / "INJECTED").exists(), "the shell ran the value's command")
    expect(r.returncode != 0 and "Traceback" not in r.stderr,
           f"exit {r.returncode}; {r.stderr[-400:]!r}")


class _Planted:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PROBE_MARK']}",))


def row_planted_checkpoint(w: World) -> None:
    """5. A checkpoint replaced by a pickle that runs code: the resume refuses it in one line
    and runs nothing."""
    p = w.start("pipeline.train", *train_args(w, 40))
    p.wait_for(r"epoch 2/40:")
    p.signal(signal.SIGTERM)
    p.end()
    (run,) = w.runs()
    mark = w.root / "PLANTED"
    os.environ["PROBE_MARK"] = str(mark)
    (w.root / "checkpoints" / f"{run.info.run_id}.pt").write_bytes(pickle.dumps(_Planted()))
    r = w.run("pipeline.train", *train_args(w, 40), "--resume", run.info.run_id)
    expect(not mark.exists(), "loading the checkpoint ran its code")
    one_line_error(r, run.info.run_id)


def _request(photos: list[bytes], env: dict) -> str:
    code = ("import base64, sys, json; from pipeline import serving; "
            "m = serving.load(sys.argv[1]); "
            "m.predict({'image': [base64.b64decode(x) for x in json.load(sys.stdin)]})")
    r = subprocess.run([PY, "-c", code, str(MODEL)], capture_output=True, text=True,
                       input=json.dumps([base64.b64encode(b).decode() for b in photos]),
                       env={**os.environ, **env}, timeout=300)
    return r.stderr.strip().splitlines()[-1] if r.returncode else "answered"


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def _faces_photo() -> bytes:
    from skimage import data as skdata

    a = skdata.astronaut()
    return _png(np.hstack([a, a]))  # two faces


def row_served_limits(w: World) -> None:
    """6. The served model counts faces over the whole request and budgets its pixels from the
    photos' headers: two photos of two faces each under FER_MAX_FACES=3, and two 1000x1000
    photos under FER_MAX_REQUEST_PIXELS=1500000, are refused naming the limit."""
    two = _faces_photo()
    expect(_request([two], {"FER_MAX_FACES": "3"}) == "answered", "one photo of two faces refused")
    line = _request([two, two], {"FER_MAX_FACES": "3"})
    expect("more than 3 faces" in line and "FER_MAX_FACES" in line, line)
    big = _png(np.zeros((1000, 1000), np.uint8))
    line = _request([big, big], {"FER_MAX_REQUEST_PIXELS": "1500000"})
    expect("FER_MAX_REQUEST_PIXELS" in line, line)


def row_photo_modes(w: World) -> None:
    """7. A folder with a LAB TIFF, a photo with a broken EXIF block and a good photo: each is
    read or named in one line, and the folder's run goes on."""
    from PIL import Image

    folder = w.root / "photos"
    folder.mkdir()
    grey = np.add.outer(np.arange(64), np.arange(64)).astype(np.uint8)
    Image.merge("LAB", [Image.fromarray(grey)] * 3).save(folder / "a_lab.tif")
    png = _png(grey)
    body = b"eXIf" + b"garbage!!"
    import struct
    import zlib

    chunk = struct.pack(">I", 9) + body + struct.pack(">I", zlib.crc32(body))
    (folder / "b_exif.png").write_bytes(png[:33] + chunk + png[33:])
    (folder / "c_good.png").write_bytes(png)
    r = w.run("pipeline.predict", folder)
    expect("Traceback" not in r.stderr, r.stderr[-600:])
    done = [json.loads(ln)["file"] for ln in r.stdout.splitlines() if ln.startswith("{")]
    expect(done == [str(folder / "a_lab.tif"), str(folder / "c_good.png")], f"read {done}")
    lines = error_lines(r.stderr)
    expect(len(lines) == 1 and "b_exif.png" in lines[0], f"errors {lines}")


def row_annotate_overwrite(w: World) -> None:
    """8. `predict --annotate` into the photos' own folder is refused before any work, the
    photo untouched; an earlier run's drawing is replaced only with --overwrite."""
    from skimage import data as skdata

    photo = w.root / "a.png"
    photo.write_bytes(_png(skdata.astronaut()))
    before = photo.read_bytes()
    one_line_error(w.run("pipeline.predict", photo, "--annotate", w.root), "is one of the inputs")
    expect(photo.read_bytes() == before, "the photo was drawn over")
    (w.root / "drawn").mkdir()
    (w.root / "drawn" / "a.png").write_bytes(b"an earlier drawing")
    one_line_error(w.run("pipeline.predict", photo, "--annotate", w.root / "drawn"),
                   "--overwrite")
    r = w.run("pipeline.predict", photo, "--annotate", w.root / "drawn", "--overwrite")
    expect(r.returncode == 0 and (w.root / "drawn" / "a.png").read_bytes()[:4] == b"\x89PNG",
           f"exit {r.returncode}: {r.stderr[-400:]!r}")


def row_export_force(w: World) -> None:
    """9. `export --force` onto a folder that is not a model folder refuses and deletes
    nothing."""
    keep = w.root / "work"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    r = w.run("pipeline.export", "--model-uri", MODEL, "--config",
              MODEL / "data" / "fer" / "config.yaml", "--out", keep, "--force")
    expect(r.returncode == 2 and (keep / "notes.txt").exists(),
           f"exit {r.returncode}, notes kept: {(keep / 'notes.txt').exists()}")


def row_sweep_only_own(w: World) -> None:
    """10. A RUNNING run of another tool (an `owner` tag of its own, a dead pid on this host)
    is left RUNNING by the next command's sweep of dead runs."""
    import socket

    import mlflow

    c = w.client()
    exp = c.create_experiment("someone-else")
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    rid = c.create_run(exp, tags={"owner": f"{socket.gethostname()}:{pid}:1"}).info.run_id
    r = w.run("pipeline.train", *train_args(w, 1))
    expect(r.returncode == 0, r.stderr[-400:])
    status = mlflow.MlflowClient(w.env["MLFLOW_TRACKING_URI"]).get_run(rid).info.status
    expect(status == "RUNNING", f"another tool's run is now {status}")


def row_shared_cache_labels(w: World) -> None:
    """11. A parse-cache entry in a shared FER_CACHE_DIR with labels outside the emotions is
    not trusted: the next command parses the source again and rewrites it."""
    r = w.run("pipeline.split", "--data", w.data)
    expect(r.returncode == 0, r.stderr[-400:])
    (entry,) = (w.root / "cache").glob("*.npz")
    with np.load(entry) as z:
        images, labels, usage = z["images"], z["labels"].copy(), z["usage"]
    labels[:] = 9
    with open(entry, "wb") as fh:
        np.savez(fh, images=images, labels=labels, usage=usage)
    r = w.run("pipeline.split", "--data", w.data)
    expect(r.returncode == 0, r.stderr[-400:])
    with np.load(entry) as z:
        expect(int(z["labels"].max()) <= 6, "the bad labels were used and kept")


ROWS = {
    "auth: tracking server with authentication": row_auth_server,
    "auth: password under mlflow run": row_password_under_mlflow_run,
    "auth: secrets never shown": row_secrets_never_shown,
    "input: shell syntax in an MLproject value": row_mlproject_injection,
    "input: planted checkpoint": row_planted_checkpoint,
    "input: served request limits": row_served_limits,
    "input: every photo mode": row_photo_modes,
    "input: annotate never overwrites": row_annotate_overwrite,
    "input: export --force on a non-model folder": row_export_force,
    "shared: sweep only this pipeline's runs": row_sweep_only_own,
    "shared: cache labels checked": row_shared_cache_labels,
}
