"""``python -m pipeline.predict``: the emotion of every face in photos, folders of photos and
videos, through any logged model exactly as it is served (its own TTA views included).

One JSON line per photo, or per sampled video frame, on standard output (or ``--out``)::

    {"file": "group.jpg", "faces": [{"box": [x, y, w, h], "label": "happy",
                                     "probs": {"angry": 0.01, ...}}]}

A video's lines add ``frame`` and ``time`` (seconds). A photo with no face gets ``"faces": []``
and a line on standard error saying so. ``--annotate DIR`` writes each photo (and each sampled
frame with a face) with its boxes and labels drawn; a video also gets a plot of each emotion's
probability over time. No drawing replaces an input, two inputs never share an output, and a
file an earlier run left there is replaced only with ``--overwrite``. A file that cannot be read is one line on standard error naming it, and
the other files still run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

import numpy as np
from tqdm import tqdm

from . import faces, numbers, plots, serving
from .cli import parser, run_main
from .config import EMOTIONS
from .errors import InputError, UsageError, one_line

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}
DEFAULT_MODEL = str(Path(__file__).resolve().parent.parent / "models" / "improved")


@dataclass(frozen=True)
class Every:
    """How often a video is sampled: every ``n`` frames, or every ``seconds``."""
    n: int = 0
    seconds: float = 0.0

    def step(self, fps: float, path: Path) -> int:
        if self.n:
            return self.n
        if not fps > 0:
            raise InputError(f"{path}: the video states no frame rate, so --every "
                             f"{self.seconds:g}s cannot be turned into frames; give --every as "
                             f"a number of frames, e.g. --every 25.")
        return max(1, round(self.seconds * fps))


def every(text: str) -> Every | None:
    """``--every``: N frames (a whole number 1 or more) or T seconds (``0.5s``, above 0), each
    read by the rule of every number (numbers)."""
    t = text.strip().lower()
    if not t:
        return None  # not given: the flag's default
    rng = numbers.POSITIVE if t.endswith("s") else numbers.WHOLE_1
    try:
        v = numbers.parse(t[:-1] if t.endswith("s") else t, rng)
    except numbers.NumberError:
        v = None
    if v is not None:
        return Every(seconds=v) if t.endswith("s") else Every(n=v)
    raise argparse.ArgumentTypeError(f"expected a whole number of frames 1 or more (e.g. 10) "
                                     f"or seconds above 0 with an s (e.g. 0.5s), got "
                                     f"{numbers.shown(text)}")


@dataclass
class Tally:
    photos: int = 0
    videos: int = 0
    frames: int = 0
    faces: int = 0
    failed: list[str] = field(default_factory=list)
    skipped: int = 0
    written: list[Path] = field(default_factory=list)  # this run's drawings and plots


def _kind(path: Path) -> str:
    return "video" if path.suffix.lower() in VIDEO_SUFFIXES else "photo"


def gather(inputs: list[str]) -> tuple[list[tuple[Path, Path]], int]:
    """(file, its name under --annotate) for every input, folders walked in name order; and how
    many files in folders were skipped as neither photo nor video. Refuses missing paths, empty
    folders and anything that is neither a regular file nor a folder, before any work."""
    out: list[tuple[Path, Path]] = []
    skipped = 0
    for raw in inputs:
        p = Path(raw)
        try:
            mode = p.stat().st_mode
        except FileNotFoundError:
            raise UsageError(f"{p}: no such file or folder.") from None
        except OSError as e:
            raise UsageError(f"{p}: cannot be read ({e.strerror}).") from None
        if stat.S_ISDIR(mode):
            found = [f for f in sorted(p.rglob("*")) if f.is_file()]
            media = [f for f in found if f.suffix.lower() in PHOTO_SUFFIXES | VIDEO_SUFFIXES]
            if not media:
                raise UsageError(f"{p}: no photo or video in this folder (looked for "
                                 f"{', '.join(sorted(PHOTO_SUFFIXES | VIDEO_SUFFIXES))}).")
            skipped += len(found) - len(media)
            out += [(f, Path(p.name) / f.relative_to(p)) for f in media]
        elif stat.S_ISREG(mode):
            out.append((p, Path(p.name)))
        else:
            raise UsageError(f"{p}: not a regular file or a folder; give photos, videos or "
                             f"folders of them.")
    return out, skipped


@dataclass(frozen=True)
class Outputs:
    """Where one input's drawings go: its annotated photo, or a video's frame folder and plot."""

    photo: Path | None = None
    frames: Path | None = None
    plot: Path | None = None

    def paths(self) -> list[Path]:
        return [q for q in (self.photo, self.frames, self.plot) if q is not None]


def _outputs_of(path: Path, name: Path, ann: Path | None, plot_dir: Path) -> Outputs:
    if _kind(path) == "photo":
        return Outputs(photo=ann / _annotated_name(name) if ann else None)
    return Outputs(frames=ann / name.with_suffix("") if ann else None,
                   plot=plot_dir / f"{name.with_suffix('')}.emotions.png")


def _nth(name: Path, n: int) -> Path:
    return name if n == 1 else name.with_name(f"{name.stem}-{n}{name.suffix}")


def plan_outputs(files: list[tuple[Path, Path]], ann: Path | None, plot_dir: Path,
                 overwrite: bool) -> list[Outputs]:
    """Each input's outputs, decided before any work: no two inputs share one (``a.tif`` and
    ``a.png`` both draw to a PNG, two folders may hold an ``x.jpg``: the later gets ``-2``), no
    output is an input (never, whatever the flags: the user's photos are not drawn over), and
    none exists already unless ``overwrite``."""
    inputs = {os.path.realpath(f) for f, _ in files}
    taken: set[str] = set()
    plan = []
    for path, name in files:
        n = 1
        while True:
            out = _outputs_of(path, _nth(name, n), ann, plot_dir)
            keys = {os.path.realpath(q) for q in out.paths()}
            if not keys & taken:
                break
            n += 1
        taken |= keys
        for q in out.paths():
            if os.path.realpath(q) in inputs:
                raise UsageError(f"{q} is one of the inputs; drawing on it would replace the "
                                 f"photo itself. Give --annotate (or --plots) another folder.")
            if not overwrite and q.exists() and not (q.is_dir() and not any(q.iterdir())):
                raise UsageError(f"{q} exists (an earlier run's output?); nothing was written. "
                                 f"Give --annotate (or --plots) another folder, or pass "
                                 f"--overwrite to replace what this run writes there.")
        plan.append(out)
    return plan


def _face_records(boxes: np.ndarray, probs: np.ndarray) -> list[dict]:
    return [{"box": [int(v) for v in b], "label": EMOTIONS[int(p.argmax())],
             "probs": {e: round(float(v), 4) for e, v in zip(EMOTIONS, p)}}
            for b, p in zip(boxes, probs)]


def draw(rgb: np.ndarray, boxes: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """The photo with each face's box and its label (and probability) drawn on it."""
    import cv2

    img = np.ascontiguousarray(rgb).copy()
    side = max(img.shape[:2])
    thick = max(1, round(side / 400))
    scale = max(0.4, side / 1400)
    for (x, y, w, h), p in zip(boxes.tolist(), probs):
        k = int(p.argmax())
        text = f"{EMOTIONS[k]} {p[k]:.0%}"
        cv2.rectangle(img, (x, y), (x + w, y + h), (255, 220, 0), thick)
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        ty = y - 4 if y - th - base - 4 >= 0 else y + h + th + 4
        cv2.rectangle(img, (x, ty - th - base), (x + tw + 4, ty + base), (255, 220, 0), -1)
        cv2.putText(img, text, (x + 2, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick,
                    cv2.LINE_AA)
    return img


def _save_rgb(rgb: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def _annotated_name(name: Path) -> Path:
    keep = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
    return name if name.suffix.lower() in keep else name.with_suffix(".png")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror}).") from None


def photo(model: serving.ServedModel, path: Path, out: Outputs, tta: bool | None,
          wrote: list[Path]) -> dict:
    im = faces.open_image(_read_bytes(path), str(path))
    g = faces.grey(im, str(path))
    [(boxes, probs)] = model.read_photos([g], tta)
    if out.photo is not None:
        try:
            rgb = np.asarray(im.convert("RGB"))
        except ValueError:  # a mode with no RGB (LAB): drawn on its grey
            rgb = np.repeat(g[..., None], 3, axis=2)
        _save_rgb(draw(rgb, boxes, probs), out.photo)
        wrote.append(out.photo)
    return {"file": str(path), "faces": _face_records(boxes, probs)}


def video(model: serving.ServedModel, path: Path, out: Outputs, how: Every, tta: bool | None,
          bar: bool, wrote: list[Path]) -> Iterator[dict]:
    """One record per sampled frame; the emotions-over-time plot once the video ends."""
    import cv2

    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: cannot be read (permission denied).")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise InputError(f"{path}: not a video this reads (OpenCV could not open it; expected "
                         f"{', '.join(sorted(VIDEO_SUFFIXES))}).")
    try:
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        step = how.step(fps, path)
        times, means, counts = [], [], []
        index = 0
        with tqdm(total=total or None, desc=path.name, unit="frame", leave=False,
                  disable=None if bar else True) as progress:
            while cap.grab():
                if index % step == 0:
                    ok, frame = cap.retrieve()
                    if not ok:
                        break
                    g = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
                    [(boxes, probs)] = model.read_photos([g], tta)
                    t = index / fps if fps > 0 else float(index)
                    times.append(t)
                    counts.append(len(boxes))
                    means.append(probs.mean(0) if len(boxes) else np.full(len(EMOTIONS),
                                                                          np.nan))
                    if out.frames is not None and len(boxes):
                        rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                        _save_rgb(draw(rgb, boxes, probs), out.frames / f"frame_{index:06d}.jpg")
                        wrote.append(out.frames / f"frame_{index:06d}.jpg")
                    rec = {"file": str(path), "frame": index}
                    if fps > 0:
                        rec["time"] = round(t, 3)
                    rec["faces"] = _face_records(boxes, probs)
                    yield rec
                index += 1
                progress.update(1)
    finally:
        cap.release()
    if index == 0:
        raise InputError(f"{path}: no frame could be read (a damaged or unsupported video).")
    fig = plots.emotions_over_time(np.array(times), np.array(means), np.array(counts),
                                   f"{path.name}: emotions over time (mean over faces), "
                                   f"every {step} frame{'s' if step > 1 else ''}")
    out.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.plot, dpi=110)
    plots.close(fig)
    wrote.append(out.plot)
    print(f"{path}: {len(times)} frames sampled of {index}; emotions over time in {out.plot}",
          file=sys.stderr)


def run_predict(inputs: list[str], model_uri: str, sink: IO[str], annotate: str | None = None,
                plots_dir: str | None = None, how: Every = Every(seconds=1.0),
                tta: bool | None = None, bar: bool = True, overwrite: bool = False) -> Tally:
    files, skipped = gather(inputs)
    ann = Path(annotate) if annotate else None
    plot_dir = Path(plots_dir) if plots_dir else (ann or Path("."))
    plan = plan_outputs(files, ann, plot_dir, overwrite)
    model = load(model_uri)
    tally = Tally(skipped=skipped)
    photos = [f for f in files if _kind(f[0]) == "photo"]
    with tqdm(total=len(photos), desc="photos", unit="photo", leave=False,
              disable=None if bar and len(photos) > 1 else True) as progress:
        for (path, _), out in zip(files, plan):
            try:
                if _kind(path) == "video":
                    for rec in video(model, path, out, how, tta, bar, tally.written):
                        tally.frames += 1
                        tally.faces += len(rec["faces"])
                        sink.write(json.dumps(rec) + "\n")
                    tally.videos += 1
                else:
                    rec = photo(model, path, out, tta, tally.written)
                    tally.photos += 1
                    tally.faces += len(rec["faces"])
                    if not rec["faces"]:
                        progress.write(one_line(f"{path}: no face found"), file=sys.stderr)
                    sink.write(json.dumps(rec) + "\n")
                    progress.update(1)
            except InputError as e:
                tally.failed.append(str(path))
                progress.write(f"error: {one_line(str(e))}", file=sys.stderr)
            sink.flush()
    return tally


def load(model_uri: str) -> serving.ServedModel:
    """The model, as `evaluate` loads it; a registry or run URI reads the default store."""
    import mlflow

    from .evaluate import load_model
    from .tracking import DEFAULT_TRACKING_URI

    if not Path(model_uri).is_dir() and "MLFLOW_TRACKING_URI" not in os.environ:
        mlflow.set_tracking_uri(DEFAULT_TRACKING_URI)
    return load_model(model_uri)


class _Kept:
    """A sink that also keeps what it wrote, for the MLflow run of `mlflow run . -e predict`."""

    def __init__(self, sink: IO[str]):
        self.sink, self.parts = sink, []

    def write(self, text: str) -> None:
        self.sink.write(text)
        self.parts.append(text)

    def flush(self) -> None:
        self.sink.flush()

    def text(self) -> str:
        return "".join(self.parts)


def _log_to_run(a: argparse.Namespace, tally: Tally, lines: str) -> None:
    """The counts, the JSON lines, the annotated photos and the plots, in the run `mlflow run`
    chose, or in a new run of ``--experiment``."""
    import mlflow

    from . import tracking

    if os.environ.get("MLFLOW_RUN_ID"):
        run = mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"])
    else:
        tracking.setup(a.experiment)
        run = tracking.run(name="predict", tags={"stage": "predict"})
    with run:
        mlflow.set_tag("stage", "predict")
        mlflow.log_metrics({"photos": tally.photos, "videos": tally.videos,
                            "frames": tally.frames, "faces": tally.faces,
                            "unreadable_files": len(tally.failed)})
        mlflow.log_text(lines, "predictions.jsonl")
        # This run's files only, each under its folder's name as before; whatever else the
        # folder holds is not this run's.
        for folder in dict.fromkeys(d for d in (a.annotate, a.plots) if d):
            base = Path(folder)
            mine = [f for f in tally.written if f.is_relative_to(base)]
            if mine:
                with tempfile.TemporaryDirectory() as tmp:
                    for f in mine:
                        dest = Path(tmp) / f.relative_to(base)
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(f, dest)
                    mlflow.log_artifacts(tmp, base.name)
                tally.written = [f for f in tally.written if f not in mine]


def main(argv: list[str] | None = None) -> int:
    # FFmpeg prints its own complaints about a damaged video; the one-line error says it instead.
    # Set here, where the command owns the process, not at import (OpenCV reads it at the first
    # video it opens).
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    p = parser("Find every face in photos, folders and videos and name its emotion; with "
               "--experiment (or under `mlflow run`) the results are also logged as a run.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="photos (JPEG, PNG, BMP, WebP, TIFF, GIF), videos, or folders of them")
    p.add_argument("--model-uri", default=DEFAULT_MODEL,
                   help="any logged model (models:/m-..., runs:/RUN/STAGE) or model folder")
    p.add_argument("--out", default=None, metavar="FILE.jsonl",
                   help="write the JSON lines here instead of standard output")
    p.add_argument("--annotate", default=None, metavar="DIR",
                   help="write each photo, and each sampled video frame with a face, with its "
                        "boxes and labels drawn")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="where a video's emotions-over-time plot goes (default: --annotate's "
                        "folder, else the current one)")
    p.add_argument("--every", type=every, default="1s", metavar="N|Ts",
                   help="sample videos every N frames, or every T seconds (e.g. 0.5s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files an earlier run left where this one draws (never an "
                        "input: a photo is not drawn over)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average over the model's TTA views (default: as the model is served)")
    a = p.parse_args(argv)
    if a.model_uri == DEFAULT_MODEL and not Path(DEFAULT_MODEL).is_dir():
        raise UsageError("no --model-uri given, and the shipped model (models/improved) comes "
                         "with a checkout of this project, not with the installed package: pass "
                         "--model-uri (models:/NAME@ALIAS, runs:/RUN_ID/improved, or a model "
                         "folder).")
    t0 = time.perf_counter()
    sink = open(a.out, "w") if a.out else sys.stdout
    kept = _Kept(sink) if os.environ.get("MLFLOW_RUN_ID") or a.experiment else sink
    try:
        tally = run_predict(a.inputs, a.model_uri, kept, a.annotate, a.plots, a.every, a.tta,
                            overwrite=a.overwrite)
    finally:
        if a.out:
            sink.close()
    if isinstance(kept, _Kept):
        _log_to_run(a, tally, kept.text())
    parts = [f"{tally.photos} photo{'s' * (tally.photos != 1)}"] \
        if tally.photos or not tally.videos else []
    if tally.videos:
        parts.append(f"{tally.videos} video{'s' * (tally.videos != 1)} "
                     f"({tally.frames} frames sampled)")
    msg = f"{', '.join(parts)}: {tally.faces} face{'s' * (tally.faces != 1)} in " \
          f"{time.perf_counter() - t0:.1f} s"
    if tally.skipped:
        msg += f"; {tally.skipped} other file{'s' * (tally.skipped != 1)} in folders skipped"
    if tally.failed:
        msg += f"; {len(tally.failed)} file{'s' * (len(tally.failed) != 1)} could not be read"
    print(msg, file=sys.stderr)
    if tally.failed:
        return 2 if not (tally.photos or tally.videos) else 1
    return 0


if __name__ == "__main__":
    run_main(main)
