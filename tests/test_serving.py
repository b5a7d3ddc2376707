"""The logged model takes raw pixels as users have them, refuses what it cannot read, answers
with named emotions, and serves over HTTP with `mlflow models serve`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from pipeline import serving
from pipeline.config import Config
from pipeline.data import EMOTIONS
from pipeline.models import build_model
from tests.conftest import ROOT, free_port, make_faces

FACES = make_faces({"Training": 1})[0][:4]  # uint8 (4, 48, 48)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A model folder as `train` and `export` write it (tiny net, TTA on, random weights)."""
    torch.manual_seed(0)
    cfg = Config(stage="improved", width=0.125, tta=True)
    # Sharpened: a fresh net answers nearly uniformly, which would hide a wrong TTA average.
    state = {k: v * 30 if k.startswith("head") and k.endswith("weight") else v
             for k, v in build_model(cfg).state_dict().items()}
    clf = serving.classifier(cfg, state)
    path = tmp_path_factory.mktemp("model") / "improved"
    serving.save(clf, cfg, FACES[:2], path)
    return path


@pytest.fixture(scope="module")
def model(folder):
    return mlflow.pyfunc.load_model(str(folder))


def _probs(out) -> np.ndarray:
    return out[list(EMOTIONS)].to_numpy()


def test_output_is_named_emotions_and_a_label(model, folder):
    out = model.predict(FACES)
    assert list(out.columns) == [*EMOTIONS, "label"]
    assert np.allclose(_probs(out).sum(1), 1, atol=1e-5)
    assert list(out["label"]) == [EMOTIONS[i] for i in _probs(out).argmax(1)]
    schema = model.metadata.get_output_schema()
    assert schema.input_names() == ["image", "x", "y", "w", "h", *EMOTIONS, "label"]
    # The photo's index and the face's box come only with a photo request.
    assert [c.required for c in schema.inputs] == [False] * 5 + [True] * 8


@pytest.mark.parametrize("form", ["uint8 (N,48,48)", "uint8 (N,1,48,48)", "uint8 (N,2304)",
                                  "int64", "int32", "float32", "float64", "nested lists",
                                  "DataFrame"])
def test_every_accepted_form_gives_the_same_answer(model, form):
    import pandas as pd

    x = FACES
    batch = {"uint8 (N,48,48)": x, "uint8 (N,1,48,48)": x[:, None],
             "uint8 (N,2304)": x.reshape(4, -1), "int64": x.astype(np.int64),
             "int32": x[:, None].astype(np.int32), "float32": x.astype(np.float32),
             "float64": x.reshape(4, -1).astype(np.float64), "nested lists": x.tolist(),
             "DataFrame": pd.DataFrame(x.reshape(4, -1))}[form]
    expected = _probs(model.predict(x))
    assert np.allclose(_probs(model.predict(batch)), expected, atol=1e-6)


def test_the_answer_is_the_network_on_normalised_pixels(folder):
    """Not just consistent: the probabilities are the net's softmax on pixels / 255, averaged
    over the TTA views, with the identity view first."""
    served = serving.load(str(folder))
    clf = served.clf
    x = torch.from_numpy(FACES[:, None].astype(np.float32))
    with torch.no_grad():
        plain = torch.softmax(clf.net(x / 255.0), dim=1).numpy()
    assert np.allclose(served.probs(FACES, tta=False), plain, atol=1e-6)
    assert not np.allclose(served.probs(FACES), plain, atol=1e-4)  # TTA on: other views count


@pytest.mark.slow
def test_a_folder_carries_only_what_serving_imports(folder):
    """A fresh process loads the folder with its own code first on the path, as `mlflow models
    serve` does: every pipeline module it imports comes from the folder, and none is training,
    study or command-line code (the folder holds no such module to import)."""
    code = folder / "code"
    assert {p.name for p in (code / "pipeline").glob("*.py")} == set(serving.SERVED_MODULES)
    probe = (
        "import json, sys, mlflow, numpy as np\n"
        f"m = mlflow.pyfunc.load_model({str(folder)!r})\n"
        "m.predict(np.full((2, 48, 48), 120, np.uint8))\n"
        "import pipeline\n"
        "print(json.dumps([pipeline.__file__, sorted(k for k in sys.modules "
        "if k.startswith('pipeline.'))]))\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                       cwd=folder.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    origin, loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(origin).parent == code / "pipeline"
    assert {m.split(".")[1] + ".py" for m in loaded} <= set(serving.SERVED_MODULES)
    assert "pipeline.serving" in loaded


def test_a_folder_with_fp32_weights_as_earlier_versions_wrote_still_loads_and_exports(
        folder, tmp_path):
    """Folders before half-precision weights stored fp32; evaluate and export still read them,
    and answer as the half-precision folder does (its weights are the fp32 ones rounded)."""
    import shutil

    from pipeline.export import export

    old = tmp_path / "old"
    shutil.copytree(folder, old)
    weights = old / "data" / "fer" / serving.WEIGHTS
    state = torch.load(weights, weights_only=True)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, weights)
    expected = serving.load(str(folder)).probs(FACES)
    assert np.allclose(serving.load(str(old)).probs(FACES), expected, atol=1e-6)
    out = export(str(old), tmp_path / "new", config=str(old / "data" / "fer" / serving.CONFIG))
    assert np.allclose(serving.load(str(out)).probs(FACES), expected, atol=1e-6)


@pytest.mark.parametrize("bad, needle", [
    (FACES / 255.0, "looks scaled to 0..1"),
    (FACES.astype(np.float32) / 255.0, "multiply by 255"),
    (np.where(np.arange(2304).reshape(1, 48, 48) == 7, 455, 200), "this batch spans 200..455"),
    (FACES.astype(np.int64) - 300, "must lie in 0..255"),
    (np.full((2, 48, 48), np.nan), "NaN"),
    (FACES[:, :40], "got shape (4, 40, 48)"),
    (FACES.reshape(4, -1)[:, :2000], "got shape (4, 2000)"),
    (FACES[0], "got shape (48, 48)"),
    (np.array([["a"] * 2304]), "got values of type"),
    (np.zeros((0, 48, 48), np.uint8), "holds no image"),
])
def test_unreadable_batches_are_refused_with_a_reason(model, bad, needle):
    with pytest.raises(Exception) as e:
        model.predict(bad)
    assert needle in str(e.value)


def _post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _serve(folder: Path):
    """`mlflow models serve` on a folder, on loopback; yields its /invocations URL."""
    port = free_port()
    bindir = Path(sys.executable).parent
    # `mlflow models serve` starts uvicorn by name: the venv's bin must be on PATH (activated).
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    p = subprocess.Popen([str(bindir / "mlflow"), "models", "serve", "-m", str(folder),
                          "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:  # the event: the server answers its health check
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                if p.poll() is not None:
                    raise AssertionError(f"server exited: {p.stderr.read()[-2000:]}")
                if time.time() > deadline:
                    raise TimeoutError("mlflow models serve did not come up")
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/invocations"
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=30)


@pytest.fixture(scope="module")
def server(folder):
    yield from _serve(folder)


@pytest.fixture(scope="module")
def shipped_server():
    """The README's serving example: the shipped folder, served as it is in the repository."""
    yield from _serve(ROOT / "models" / "improved")


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_real_request(model, server):
    status, body = _post(server, {"inputs": FACES[:2].reshape(2, -1).tolist()})
    assert status == 200, body
    rows = body["predictions"]
    assert [r["label"] for r in rows] == list(model.predict(FACES[:2])["label"])
    assert np.allclose([[r[e] for e in EMOTIONS] for r in rows],
                       _probs(model.predict(FACES[:2])), atol=1e-6)


def _photo_b64() -> str:
    import base64
    import io

    from PIL import Image
    skimage_data = pytest.importorskip("skimage.data")
    buf = io.BytesIO()
    Image.fromarray(skimage_data.astronaut()).save(buf, "JPEG", quality=90)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.slow
@pytest.mark.parametrize("form", ["inputs", "dataframe_records", "dataframe_split"])
def test_the_shipped_model_served_answers_a_photo_per_face(shipped_server, form):
    import pandas as pd

    b64 = _photo_b64()
    payload = {"inputs": {"image": [b64]},
               "dataframe_records": [{"image": b64}],
               "dataframe_split": {"columns": ["image"], "data": [[b64]]}}[form]
    status, body = _post(shipped_server, {form: payload})
    assert status == 200, body
    [row] = body["predictions"]
    assert row["label"] == "happy"  # the astronaut smiles broadly
    shipped = mlflow.pyfunc.load_model(str(ROOT / "models" / "improved"))
    expected = shipped.predict(pd.DataFrame({"image": [b64]})).iloc[0]
    assert [row[k] for k in ("image", "x", "y", "w", "h")] == \
        [int(expected[k]) for k in ("image", "x", "y", "w", "h")]
    assert np.allclose([row[e] for e in EMOTIONS], expected[list(EMOTIONS)].to_numpy(float),
                       atol=1e-6)


# Each refused request, and words its answer must hold: the model's own reason (or MLflow's,
# for a body MLflow cannot parse), never a server traceback.
REFUSED = [
    ({"inputs": (FACES[:1] / 255.0).tolist()}, "multiply by 255"),
    ({"inputs": [[300] * 2304]}, "must lie in 0..255"),
    ({"inputs": [[-1] * 2304]}, "must lie in 0..255"),
    ({"inputs": [[1e30] * 2304]}, "must lie in 0..255"),
    ({"inputs": [["a"] * 2304]}, "got values of type"),
    ({"inputs": [[True] * 2304]}, "got values of type"),
    ({"inputs": [[None] * 2304]}, "got values of type"),
    ({"inputs": []}, "got shape (0,)"),
    ({"inputs": [[]]}, "got shape (1, 0)"),
    ({"inputs": 7}, "got shape ()"),
    ({"inputs": FACES[:1, :40].tolist()}, "got shape (1, 40, 48)"),
    ({"inputs": {"pixels": [[1, 2]]}}, "got shape (1, 2)"),
    ({"inputs": {"image": ["%%%"]}}, "image 0: not base64 text"),
    ({"inputs": {"image": ["aGVsbG8="]}}, "image 0: not an image this reads"),
    ({"dataframe_records": [{"image": "aGVsbG8="}]}, "image 0: not an image this reads"),
    ({"dataframe_split": {"columns": ["a"], "data": [[1, 2]]}}, ""),
]


@pytest.mark.slow
def test_mlflow_models_serve_refuses_with_the_models_reason_and_no_traceback(server):
    for payload, needle in REFUSED:
        status, body = _post(server, payload)
        assert status == 400, (payload, body)
        assert needle in body.get("message", ""), (needle, body)
        assert "stack_trace" not in body and "Traceback" not in json.dumps(body), body
    status, _ = _post(server, {"inputs": FACES[:1].tolist()})
    assert status == 200  # and it goes on serving


@pytest.mark.parametrize("stage", ["basic", "batchnorm", "resnet", "advanced", "improved"])
def test_the_fast_scoring_copy_computes_what_the_trained_network_does(stage):
    """Scoring folds BatchNorm into the layer before it and uses channels-last weights; with
    running statistics far from the identity, that must change nothing but float rounding, for
    every stage's network, and leave the original (which export reads) untouched."""
    from pipeline.config import STAGE_DIR, build

    torch.manual_seed(0)
    cfg = build(STAGE_DIR / f"{stage}.yaml", {"width": 0.25})
    net = build_model(cfg)
    for m in net.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.2, 3.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    clf = serving.classifier(cfg, net.state_dict())
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    fast = serving.fast_copy(clf)
    folded = sum(isinstance(m, torch.nn.Identity) for m in fast.net.modules())
    assert folded >= (0 if stage == "basic" else 2)
    x = torch.from_numpy(make_faces({"Training": 2})[0][:9, None].astype(np.float32))
    with torch.no_grad():
        for tta in (False, True):
            assert np.allclose(fast.probs(x, tta).numpy(), clf.probs(x, tta).numpy(),
                               atol=1e-5)
    after = clf.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k])
                                                 for k in before)


def _runs() -> int:
    return len(mlflow.search_runs(search_all_experiments=True))


@pytest.mark.slow
def test_evaluate_names_a_damaged_model_folder_in_one_line(folder, tmp_path, kaggle_csv):
    import shutil

    from tests.conftest import run_cli

    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    weights = damaged / "data" / "fer" / serving.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:5000])
    r = run_cli("pipeline.evaluate", "--model-uri", str(damaged), "--data", str(kaggle_csv))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{weights} is damaged or truncated" in r.stderr and r.stderr.count("\n") == 1
    assert _runs() == 0


@pytest.mark.slow
def test_evaluate_refuses_a_folder_as_its_predictions_file_before_logging(folder, tmp_path,
                                                                          kaggle_csv):
    from pipeline.errors import UsageError
    from pipeline.evaluate import run_evaluate

    (tmp_path / "out").mkdir()
    with pytest.raises(UsageError, match="--predictions .*out: that is a folder"):
        run_evaluate(str(folder), str(kaggle_csv), predictions=str(tmp_path / "out"))
    assert _runs() == 0  # nothing logged as FINISHED for a file never written
    run_evaluate(str(folder), str(kaggle_csv), predictions=str(tmp_path / "out" / "p.csv"))
    assert (tmp_path / "out" / "p.csv").exists() and _runs() == 1


def test_export_refuses_to_replace_a_file_even_with_force(folder, tmp_path):
    from pipeline.errors import UsageError
    from pipeline.export import export

    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(UsageError, match="a file, not a model folder"):
        export(str(folder), target, force=True, config=str(folder / "data/fer/config.yaml"))
    assert target.read_text() == "mine"


def test_export_force_replaces_only_a_model_folder(folder, tmp_path):
    """`--out . --force` once deleted the folder it was given, whatever it held."""
    from pipeline.errors import UsageError
    from pipeline.export import export

    cfg = str(folder / "data/fer/config.yaml")
    mine = tmp_path / "my-work"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(UsageError, match=r"not a model folder \(no MLmodel file in it\)"):
        export(str(folder), mine, force=True, config=cfg)
    assert (mine / "notes.txt").read_text() == "keep"
    model = export(str(folder), tmp_path / "model", config=cfg)
    again = export(str(folder), model, force=True, config=cfg)  # a model folder: replaced
    assert (again / "MLmodel").is_file()
