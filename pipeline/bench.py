"""``python -m pipeline.bench``: training and evaluation images/s for every stage, data load times,
the plain approach (PIL + per-image torchvision transforms in a DataLoader, fp32) for the
improved stage, so the speed-up is measured side by side, and a served model's scoring speed
against its bare network's forward pass, with and without TTA."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from . import data as fer
from . import numbers
from .cli import Number, parser, run_main
from .errors import UsageError
from .config import STAGE_DIR, STAGES, Config, build, parse_set
from .engine import Runtime, build_optimizer
from .randomness import seed_everything
from .rates import measure_rates
from .models import build_model

# The stage the plain recipe is compared on, and --concurrent measures by default: the default
# config's, the one the project serves.
REFERENCE = Config().stage
from .slots import OutOfMemory, measure_concurrent
from .study import worker_threads


def _images(data: fer.FerData | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    if data is not None:
        rows = np.arange(min(n, len(data)))
        return data.images[rows], data.labels[rows]
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 48, 48), dtype=np.uint8), rng.integers(0, 7, n)


def bench_stage(stage: str, images: np.ndarray, labels: np.ndarray, overrides: dict,
                seconds: float) -> dict[str, float]:
    """Training images/s through the same step as ``train`` (optimizer, augmentation, CUDA
    graph where the run would use one) and scoring images/s, measured as a study's estimate
    measures them (:func:`pipeline.rates.measure_rates`), on ``images``."""
    cfg = build(STAGE_DIR / f"{stage}.yaml", overrides)
    seed_everything(0)
    r = measure_rates(cfg, seconds, torch.from_numpy(images).unsqueeze(1),
                      torch.from_numpy(labels).long())
    return {"train_img_per_s": round(r.train, 1), "eval_img_per_s": round(r.score, 1),
            "cuda_graph": r.graphed}


def bench_plain(images: np.ndarray, labels: np.ndarray, overrides: dict,
                seconds: float) -> float:
    """The usual recipe: PIL images, per-image torchvision transforms in DataLoader workers,
    fp32 contiguous tensors."""
    cfg = build(STAGE_DIR / f"{REFERENCE}.yaml", overrides)
    device = Runtime(cfg).device
    tf = T.Compose([T.RandomAffine(cfg.rotation, (cfg.translate, cfg.translate),
                                   (cfg.scale_min, cfg.scale_max)),
                    T.RandomHorizontalFlip(), T.ColorJitter(cfg.brightness, cfg.contrast),
                    T.ToTensor(), T.Normalize([0.5], [0.5])])

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return tf(Image.fromarray(images[i])), int(labels[i])

    loader = torch.utils.data.DataLoader(DS(), batch_size=cfg.batch_size, shuffle=True,
                                         num_workers=2, persistent_workers=True)
    seed_everything(0)
    model = build_model(cfg).to(device).train()
    opt = build_optimizer(cfg, model.parameters())
    done, t0, warm = 0, 0.0, 2
    while True:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad()
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if warm:
                warm -= 1
                if not warm:
                    t0 = time.perf_counter()
                continue
            done += len(y)
            if time.perf_counter() - t0 > seconds:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return done / (time.perf_counter() - t0)


def bench_inference(model_uri: str, seconds: float, n: int = 1024) -> dict[str, Any]:
    """Images/s of a served model on the CPU, as ``evaluate`` and ``predict`` score (uint8 in,
    probabilities out), against the bare network: its forward pass alone on tensors already
    normalised, fp32, channels-last (the faster layout here), batches of 256. With TTA the bare
    figure is divided by the number of views, the work TTA cannot avoid."""
    from . import serving

    model = serving.load(model_uri)
    x8, _ = _images(None, n)
    net = model.clf.net.eval().to(memory_format=torch.channels_last)
    xf = (torch.from_numpy(x8).float().unsqueeze(1) / 255.0).contiguous(
        memory_format=torch.channels_last)

    def rate(fn) -> float:
        fn()  # warm-up
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or not done:
            fn()
            done += n
        return done / (time.perf_counter() - t0)

    @torch.no_grad()
    def bare():
        for s in range(0, n, 256):
            net(xf[s:s + 256])

    views = len(model.clf.views) if model.clf.tta else 1
    out = {"model": model_uri, "threads": torch.get_num_threads(), "tta_views": views,
           "bare_img_per_s": round(rate(bare), 1),
           "scoring_img_per_s": round(rate(lambda: model.probs(x8, tta=False)), 1)}
    out["scoring_share_of_bare"] = round(out["scoring_img_per_s"] / out["bare_img_per_s"], 3)
    if views > 1:
        out["scoring_tta_img_per_s"] = round(rate(lambda: model.probs(x8, tta=True)), 1)
        out["scoring_tta_share_of_bare"] = round(
            out["scoring_tta_img_per_s"] * views / out["bare_img_per_s"], 3)
    return out


def _dump_csv(images: np.ndarray, labels: np.ndarray, path: Path) -> None:
    with open(path, "w") as fh:
        fh.write("emotion,pixels,Usage\n")
        for img, lab in zip(images, labels):
            fh.write(f"{lab},{' '.join(map(str, img.ravel()))},Training\n")


def _time_loads(data_path: str | None, tmp: Path) -> dict[str, Any]:
    if data_path is None:
        imgs, labs = _images(None, 16384 if torch.cuda.is_available() else 4096)
        data_path = str(tmp / "bench.csv")
        _dump_csv(imgs, labs, Path(data_path))
    t0 = time.perf_counter()
    data = fer.load(data_path, cache=tmp)
    parse = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = fer.load(data_path, cache=tmp)
    return {"parse_seconds": round(parse, 3),
            "cached_load_seconds": round(time.perf_counter() - t0, 3), "rows": len(data),
            "cache_hit": again.from_cache and not data.from_cache, "data": data}


def bench_concurrent(stage: str, overrides: dict, seconds: float,
                     ks: list[int]) -> dict[str, dict[str, Any]]:
    """Total training images/s of ``stage`` with K runs at once in this process, each on its
    own thread (and CUDA stream and graph), for each K; on a CPU each run gets the cores
    divided by K as threads."""
    cfg = build(STAGE_DIR / f"{stage}.yaml", overrides)
    cpu = Runtime(cfg).device.type == "cpu"
    threads = torch.get_num_threads()
    out: dict[str, dict[str, Any]] = {}
    try:
        for k in ks:
            if cpu:
                torch.set_num_threads(worker_threads(1, k))
            try:
                out[str(k)] = measure_concurrent(cfg, k, seconds)
            except OutOfMemory:
                out[str(k)] = {"img_per_s": None, "error": "out of memory"}
                break
            one = out[str(ks[0])]["img_per_s"]
            out[str(k)]["speedup"] = round(out[str(k)]["img_per_s"] / one, 2)
            print(f"concurrent {k}: {out[str(k)]}", flush=True)
    finally:
        torch.set_num_threads(threads)
    return out


def run_bench(data_path: str | None, overrides: dict, seconds: float,
              stages: list[str], model_uri: str | None = None,
              concurrent: list[int] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:  # a cache of its own: a cold parse, then a hit
        out.update(_time_loads(data_path, Path(tmp)))
    data = out.pop("data")
    # A GPU epoch of 2,048 images is over before its clocks rise; give it more.
    images, labels = _images(data, 16384 if torch.cuda.is_available() else 2048)
    out["stages"] = {}
    for s in stages:
        out["stages"][s] = bench_stage(s, images, labels, overrides, seconds)
        print(f"{s:10s} {out['stages'][s]}", flush=True)
    if REFERENCE in stages:
        plain = bench_plain(images, labels, overrides, seconds)
        out[f"plain_{REFERENCE}_train_img_per_s"] = round(plain, 1)
        out[f"speedup_{REFERENCE}"] = round(out["stages"][REFERENCE]["train_img_per_s"] / plain,
                                            2)
    if concurrent:
        stage = REFERENCE if REFERENCE in stages or not stages else stages[0]
        out["concurrent_stage"] = stage
        out["concurrent"] = bench_concurrent(stage, overrides, seconds, concurrent)
    if model_uri:
        out["inference"] = bench_inference(model_uri, seconds)
        print(f"inference  {out['inference']}", flush=True)
    rt = Runtime(build(STAGE_DIR / f"{REFERENCE}.yaml", overrides))
    out["device"] = f"{rt.device.type}{'-bf16' if rt.bf16 else '-fp32'}" + (
        f" ({torch.cuda.get_device_name()})" if rt.device.type == "cuda" else
        f" ({torch.get_num_threads()} threads)")
    return out


def _ks(text: str) -> list[int]:
    """``1,2,4,8``: each a whole number 1 or more, by the rule of every number (numbers)."""
    ks = []
    for part in text.split(","):
        try:
            k = numbers.parse(part, numbers.WHOLE_1)
        except numbers.NumberError as e:
            raise UsageError(f"--concurrent {text}: {part.strip()!r}: {e}; give them separated "
                             f"by commas, e.g. 1,2,4,8.") from None
        if k is not None:
            ks.append(k)
    return ks


def main(argv: list[str] | None = None) -> int:
    p = parser("Measure training/evaluation throughput per stage and data load times.")
    p.add_argument("--data", default=None, help="time parsing this file (default: a generated one)")
    p.add_argument("--seconds", type=Number(numbers.POSITIVE), default=10.0,
                   help="about this many seconds per stage (its training and scoring rates, "
                        "each the median of three windows) and per other measurement")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides for every stage, e.g. --set width=0.5")
    p.add_argument("--model-uri", default=str(Path(__file__).resolve().parent.parent / "models" /
                                              "improved"),
                   help="a served model whose CPU scoring speed to measure ('' to skip)")
    p.add_argument("--concurrent", default="", metavar="K,K,...",
                   help="also measure the improved stage (or the first of --stages) with K runs "
                        "training at once in one process, for each K, e.g. 1,2,4,8")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    stages = [s for s in a.stages.split(",") if s]
    ks = _ks(a.concurrent)
    out = run_bench(a.data, parse_set(a.set), a.seconds, stages, a.model_uri or None, ks)
    if a.json:
        print(json.dumps(out))
    else:
        print(f"device {out['device']}: parse {out['parse_seconds']} s, cached load "
              f"{out['cached_load_seconds']} s ({out['rows']} rows)")
        if "speedup_improved" in out:
            print(f"improved: plain approach {out['plain_improved_train_img_per_s']} img/s, "
                  f"this pipeline {out['stages']['improved']['train_img_per_s']} img/s "
                  f"({out['speedup_improved']}x)")
        if "concurrent" in out:
            print(f"{out['concurrent_stage']}, runs training at once in one process:")
            print(f"{'K':>3} {'total img/s':>12} {'per run':>9} {'vs K=1':>7} {'threads/run':>11}"
                  f" {'GPU MiB/run':>11}")
            for k, r in out["concurrent"].items():
                if r["img_per_s"] is None:
                    print(f"{k:>3} {r['error']}")
                    continue
                print(f"{k:>3} {r['img_per_s']:>12,.0f} {r['img_per_s'] / int(k):>9,.0f} "
                      f"{r['speedup']:>6.2f}x {r['threads_per_slot']:>11} "
                      f"{r.get('memory_per_slot_mib', '-'):>11}")
        if "inference" in out:
            i = out["inference"]
            line = (f"served model, {i['threads']} threads: bare network {i['bare_img_per_s']} "
                    f"img/s, scoring {i['scoring_img_per_s']} img/s "
                    f"({i['scoring_share_of_bare']:.0%} of bare)")
            if "scoring_tta_img_per_s" in i:
                line += (f", with {i['tta_views']}-view TTA {i['scoring_tta_img_per_s']} img/s "
                         f"({i['scoring_tta_share_of_bare']:.0%} of bare per view)")
            print(line)
    return 0


if __name__ == "__main__":
    run_main(main)
