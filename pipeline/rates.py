"""How fast a network trains and scores on this machine: the one meter that a study's estimate
and ``pipeline.bench`` both read."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .config import Config
from .engine import Recipe, Runtime, TrainStep, build_net, build_optimizer, train_one_epoch
from .randomness import RunRandom
from .scoring import predict


@dataclass(frozen=True)
class Rates:
    """Images/s of one network on this machine: training, scoring in the training precision
    (validation between epochs) and scoring in fp32 (the final scores)."""

    train: float
    score: float
    score_fp32: float
    graphed: bool = False  # the training step ran as a CUDA graph


def measure_rates(cfg: Config, seconds: float = 1.0, images: torch.Tensor | None = None,
                  labels: torch.Tensor | None = None) -> Rates:
    """Training and scoring images/s of ``cfg``'s network on this machine, measured on random
    faces: the step the run will take (device, precision, augmentation, CUDA graph), after one
    warm-up epoch, then the same faces scored as validation scores them and as the final
    scores do (in fp32). ``images`` (N, 1, 48, 48) uint8 and ``labels``: faces of one's own
    instead. A short measurement: each rate is the median of three windows of ``seconds / 9``."""
    rt = Runtime(cfg)
    rng = RunRandom(0, rt.device)
    gen = rng.order
    if images is None:
        n = cfg.batch_size * 8  # a pass long enough that its fixed costs do not dominate
        images = torch.randint(0, 256, (n, 1, 48, 48), dtype=torch.uint8, generator=gen)
        labels = torch.randint(0, 7, (n,), generator=gen)
    model = build_net(cfg, rt, rng)
    opt = build_optimizer(cfg, model.parameters(), capturable=rt.graphs)
    step = TrainStep(model, opt, rt, images.to(rt.device), labels.to(rt.device), Recipe.of(cfg),
                     generators=rng.graphed_generators())
    fp32 = rt.fp32()
    try:
        rates = _windows(step, model, images, rt, fp32, gen, seconds)
    finally:
        step.release()
    return Rates(*rates, graphed=step.graphed)


def _windows(step: TrainStep, model, images: torch.Tensor, rt: Runtime, fp32: Runtime,
             gen: torch.Generator, seconds: float) -> list[float]:
    n = len(step.labels)
    rates = []
    for one_pass in (lambda: train_one_epoch(step, gen, desc="measuring"),
                     lambda: predict(model, images, rt),
                     lambda: predict(model, images, fp32)):
        one_pass()  # warm-up (the first scoring pass builds its own kernels)
        # The median of three short windows: one that another process interrupted does not set
        # the estimate for the whole study, and neither does one that caught the CPU at a burst
        # it does not keep up (the best window was 8 to 19% faster than a study then ran).
        windows = []
        for _ in range(3):
            done, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / 9 or done == 0:
                one_pass()
                done += n
            if rt.device.type == "cuda":
                torch.cuda.synchronize()
            windows.append(done / (time.perf_counter() - t0))
        rates.append(sorted(windows)[1])
    return rates
