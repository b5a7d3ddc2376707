"""Exactly one training epoch, and the pieces it needs (device, precision, optimiser, scheduler,
early stopping, the network built from a run's own generators, and the slot a run trains in when
several train at once in one process). Scoring is :mod:`pipeline.scoring`."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .augment import N_DRAWS, augment_batch, normalize
from .models import NETWORKS, build_model
from .config import OPTIMIZERS, SCHEDULERS, Config
from .errors import ConfigError, TrainingError
from .randomness import RunDropout, RunRandom, drawing_from


# Graph-safe draws from a run's own CUDA generators: torch 2.5 to 2.13 need each generator
# registered with the graph that draws from it; from 2.14 a capture registers every generator it
# draws from itself, and the explicit call is a deprecated no-op that warns at every capture.
TORCH_VERSION = tuple(int(v) for v in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
LAZY_GENERATORS = TORCH_VERSION >= (2, 14)
GRAPH_SAFE_RNG = LAZY_GENERATORS or hasattr(torch.cuda.CUDAGraph, "register_generator_state")


def build_net(cfg: Config, rt: "Runtime", rng: RunRandom) -> nn.Module:
    """``cfg``'s network on the run's device, initialised from ``rng.init`` and with its dropout
    drawing from ``rng.dropout``. Its state_dict is the plain network's (dropout has none)."""
    with drawing_from(rng.init):
        model = build_model(cfg)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, name, RunDropout(child.p, rng.dropout))
    return rt.model(model)


# --------------------------------------------------------------------------- slots


@dataclass
class Slot:
    """Where the current thread's run trains: alone (the default), or in slot ``index`` of
    several trained at once, with ``stop`` set when they must all stop (a stop reaches a run
    as a KeyboardInterrupt at its next batch, as Ctrl-C reaches a run trained alone) and
    ``label`` naming the run on its printed lines."""

    index: int = 0
    stop: threading.Event | None = None
    label: str = ""
    concurrent: bool = False


_SOLO = Slot()
_here = threading.local()


def current_slot() -> Slot:
    return getattr(_here, "slot", _SOLO)


@contextlib.contextmanager
def in_slot(slot: Slot):
    _here.slot = slot
    try:
        yield slot
    finally:
        _here.slot = _SOLO


def stop_point() -> None:
    stop = current_slot().stop
    if stop is not None and stop.is_set():
        raise KeyboardInterrupt


def available_devices() -> list[str]:
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        out.append("mps")
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    have = available_devices()
    if (dev.type if dev.type in ("cpu", "mps") else f"{dev.type}:{dev.index or 0}") not in have:
        raise ConfigError(f"device={name!r}: no such device here; available: "
                          f"{', '.join(have)} (or auto).")
    return dev


def cpu_has_native_bf16() -> bool:
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((check and check()) or (amx and amx()))


def use_bf16(precision: str, device: torch.device) -> bool:
    """``auto`` takes bf16 only where the hardware computes it natively: CPUs without
    AVX512-BF16/AMX emulate it and run several times slower than fp32."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def build_optimizer(cfg: Config, params, capturable: bool = False) -> torch.optim.Optimizer:
    """``capturable``: Adam with its step count and lr as device tensors, so a CUDA graph can
    replay its update and a scheduler can still change the lr between replays."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        if capturable:
            params = list(params)
            lr = torch.tensor(cfg.lr, device=params[0].device)
            return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay,
                                    capturable=True, foreach=True)
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``opt.load_state_dict`` for the device this optimiser runs on now, whichever device wrote
    the checkpoint. Torch keeps the saved groups' flags: a GPU run's capturable Adam resumed on
    a CPU would ask the CPU for a capturable update, and a CPU run's resumed on a GPU would fail
    its capture. So each group keeps the flags it was built with here, each ``step`` goes where
    that kind of update reads it (the parameter's device when capturable, else the CPU), and
    the lr stays the kind it was built as: a captured graph must keep reading the device
    tensor it was built with, and a checkpoint's lr (a tensor, on the CPU once loaded) is
    copied into it."""
    built = [{k: g[k] for k in ("lr", "capturable", "foreach", "fused") if k in g}
             for g in opt.param_groups]
    opt.load_state_dict(state)
    for g, was in zip(opt.param_groups, built):
        g.update({k: v for k, v in was.items() if k != "lr"})
        old = was["lr"]
        if isinstance(old, torch.Tensor):
            old.fill_(float(g["lr"]))
            g["lr"] = old
        else:
            g["lr"] = float(g["lr"])
        on_device = bool(g.get("capturable") or g.get("fused"))
        for p in g["params"]:
            step = opt.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor):
                opt.state[p]["step"] = (step.to(device=p.device, dtype=torch.float32)
                                        if on_device else step.to("cpu"))


class Schedule:
    """The run's LR schedule with one interface, as timm's schedulers have: the training loop
    calls :meth:`after_batch` after every optimiser step and :meth:`after_epoch` with the
    selected val accuracy after every epoch, and each schedule acts where it should (OneCycle
    per batch, cosine and step per epoch, plateau on the metric, none never)."""

    def __init__(self, sched: Any = None, per_batch: bool = False, on_metric: bool = False):
        self.sched, self.per_batch, self.on_metric = sched, per_batch, on_metric

    def after_batch(self) -> None:
        if self.per_batch:
            self.sched.step()

    def after_epoch(self, metric: float) -> None:
        if self.sched is None or self.per_batch:
            return
        if self.on_metric:
            self.sched.step(metric)
        else:
            self.sched.step()

    def state_dict(self) -> dict[str, Any] | None:
        return self.sched.state_dict() if self.sched is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.sched is not None:
            self.sched.load_state_dict(state)


def build_scheduler(cfg: Config, opt: torch.optim.Optimizer, steps_per_epoch: int) -> Schedule:
    s, lrs = cfg.scheduler, torch.optim.lr_scheduler
    if s == "none":
        return Schedule()
    if s == "plateau":
        return Schedule(lrs.ReduceLROnPlateau(opt, mode="max", factor=cfg.plateau_factor,
                                              patience=cfg.plateau_patience, min_lr=cfg.min_lr),
                        on_metric=True)
    if s == "cosine":
        return Schedule(lrs.CosineAnnealingLR(opt, T_max=cfg.epochs,
                                              eta_min=cfg.lr * cfg.cosine_floor))
    if s == "onecycle":
        return Schedule(lrs.OneCycleLR(opt, max_lr=cfg.onecycle_max_lr,
                                       total_steps=cfg.epochs * steps_per_epoch,
                                       pct_start=cfg.onecycle_pct_start), per_batch=True)
    if s == "step":
        return Schedule(lrs.StepLR(opt, step_size=cfg.step_size, gamma=cfg.step_gamma))
    raise ValueError(f"unknown scheduler {s!r}; choose one of {', '.join(SCHEDULERS)}")


@dataclass
class EarlyStopping:
    """Tracks the best val accuracy and its weights; ``patience`` 0 never stops."""

    patience: int
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    best_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def update(self, acc: float, epoch: int, model: nn.Module) -> bool:
        """Record an epoch; returns :attr:`stopped`."""
        if acc > self.best:
            self.best, self.best_epoch, self.bad_epochs = acc, epoch, 0
            self.best_state = {k: v.detach().to("cpu", copy=True)
                               for k, v in model.state_dict().items()}
        else:
            self.bad_epochs += 1
        return self.stopped

    @property
    def stopped(self) -> bool:
        """The one stopping rule: ``patience`` epochs in a row without a new best."""
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"patience": self.patience, "best": self.best, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "best_state": self.best_state}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)


# The two cuBLAS workspace settings under which its results do not depend on the stream or the
# run (torch's reproducibility notes); read when cuBLAS starts in a process.
DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")


def deterministic_cublas(environ: Any = os.environ, cuda_started: bool | None = None) -> None:
    """Make cuBLAS deterministic for a run that asks for determinism on a GPU: the workspace
    setting goes in before CUDA starts, or the run is refused (set after, it would change
    nothing, and torch would only warn at every matmul)."""
    have = environ.get("CUBLAS_WORKSPACE_CONFIG")
    if have in DETERMINISTIC_CUBLAS:
        return
    started = torch.cuda.is_initialized() if cuda_started is None else cuda_started
    if have is None and not started:
        environ["CUBLAS_WORKSPACE_CONFIG"] = DETERMINISTIC_CUBLAS[0]
        return
    why = (f"it is {have!r}" if have is not None else
           "it was not set when this process started CUDA")
    raise ConfigError(f"deterministic=true on a GPU needs CUBLAS_WORKSPACE_CONFIG=:4096:8 (or "
                      f":16:8) before CUDA starts, and {why}: run `export "
                      f"CUBLAS_WORKSPACE_CONFIG=:4096:8` and start again, or set "
                      f"deterministic=false.")


class Runtime:
    """Device, precision and memory format, decided once per run."""

    def __init__(self, cfg: Config):
        self.device = resolve_device(cfg.device)
        if cfg.deterministic and self.device.type == "cuda":
            deterministic_cublas()  # before anything below starts CUDA
        self.bf16 = use_bf16(cfg.precision, self.device)
        self.channels_last = cfg.channels_last and self.device.type in ("cpu", "cuda")
        projection = NETWORKS[cfg.stage].projection_inputs
        if self.channels_last and self.device.type == "cpu" and projection \
                and projection * cfg.width < 16:
            # oneDNN in torch 2.14 on AVX-512 CPUs segfaults (or aborts) in the backward pass of
            # the narrow ResNet with channels_last: seen at widths .125 and .15 with batches of
            # 3, 5 and 7, in fp32 and bf16, never in the other stages or with contiguous tensors.
            # It matches oneDNN issue #6035 (1x1 stride-2 convolution backward_weights in nhwc
            # with fewer input channels than one 16-channel block writes past its workspace):
            # the ResNet's first projection has 64 * width inputs, under 16 below width .25.
            self.channels_last = False
        # A CUDA graph replays one fixed kernel sequence: only where nothing in the step needs
        # the host (Adam's capturable update; schedulers that change the lr alone).
        # A run's own dropout generator must advance with each replay (GRAPH_SAFE_RNG).
        self.graphs = (cfg.cuda_graphs and self.device.type == "cuda" and cfg.optimizer == "adam"
                       and cfg.scheduler != "onecycle" and GRAPH_SAFE_RNG)
        self.cfg = cfg

    def fp32(self) -> Runtime:
        """The same runtime scoring in fp32, the precision a logged model serves in."""
        out = copy.copy(self)
        out.bf16 = False
        return out

    def autocast(self, cache: bool = True):
        if not self.bf16:
            return nullcontext()
        # A graph capture must not keep autocast's cast-weight cache (stale across replays).
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=cache)

    def to_input(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """(B, 1, 48, 48) uint8 on device -> float in [0, 1], in the run's memory format."""
        x = x_uint8.float().div_(255.0)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def model(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


@dataclass(frozen=True)
class Recipe:
    """Everything a training step does besides the forward pass, read from the config once, so
    the loop's signature shows what it depends on."""

    batch_size: int
    augment: Config | None  # the augmentation's parameters; None: no augmentation
    normalize: str
    label_smoothing: float
    grad_clip: float

    @classmethod
    def of(cls, cfg: Config) -> "Recipe":
        return cls(cfg.batch_size, cfg if cfg.augment else None, cfg.normalize,
                   cfg.label_smoothing, cfg.grad_clip)


_CAPTURE = threading.Lock()
_CAPTURE_STREAMS: dict[int, Any] = {}


def _capture_stream() -> "torch.cuda.Stream":
    """The one stream every capture on the current device runs on (called under ``_CAPTURE``).

    CUDA hands out streams from a pool of 32 per priority, in rotation: the 33rd low-priority
    stream asked for is the first again. ``torch.cuda.graph``'s own default capture stream is
    a low-priority one, so slots and warm-ups asking for theirs would, after 32 more, be given
    it, and a warm-up that makes it wait on an event from outside the capture invalidates the
    capture. This one is high-priority, which nothing else in the process asks for."""
    dev = torch.cuda.current_device()
    if dev not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[dev] = torch.cuda.Stream(priority=-1)
    return _CAPTURE_STREAMS[dev]


def _clear_cublas_workspaces() -> None:
    # cuBLAS keeps a workspace per (handle, stream); one allocated during a capture lives in the
    # graph's pool, and one made outside must not be captured into it. Torch's inductor clears
    # them just before and after each of its captures for the same reason.
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


class CudaGraphs:
    """How a graphed :class:`TrainStep` runs its warm-up steps and captures its graph: warm-up
    on a side stream of its own (as capture requires), made once, and capture with
    ``torch.cuda.graph`` on the process's one capture stream (:func:`_capture_stream`). A
    stand-in with the same methods (capture records ``fn`` without running it, as CUDA does)
    lets the step's logic be checked without a GPU.

    ``generators`` are the run's own CUDA generators the step draws from (dropout): a graph
    advances a generator's offset on each replay only if it is registered with it. Captures are
    one at a time in a process (torch's rule); while runs train side by side, a capture checks
    only its own thread's calls, so that the other slots go on launching and allocating."""

    def __init__(self, generators: tuple[torch.Generator, ...] = ()):
        self.generators = generators
        self.side: Any = None

    def eager(self, fn: Callable[[], None]) -> None:
        if self.side is None:
            self.side = torch.cuda.Stream()
        side = self.side
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, fn: Callable[[], None]) -> "torch.cuda.CUDAGraph":
        graph = torch.cuda.CUDAGraph()
        for g in () if LAZY_GENERATORS else self.generators:
            graph.register_generator_state(g)
        mode = "thread_local" if current_slot().concurrent else "global"
        with _CAPTURE:
            _clear_cublas_workspaces()
            try:
                with torch.cuda.graph(graph, stream=_capture_stream(), capture_error_mode=mode):
                    fn()
            finally:
                _clear_cublas_workspaces()
        return graph


class TrainStep:
    """One optimisation step on a batch given by indices into the run's uint8 images: gather,
    augment, normalise, forward, loss, backward, clip, update, and running sums of loss and
    correct answers kept on the device.

    On a GPU with ``rt.graphs`` the first ``WARMUP - 1`` steps run eagerly on a side stream
    (they settle cuDNN's algorithm choice and the allocator); the next call captures the step
    as a CUDA graph and replays it, and every later call only replays. At batch 64 on 48x48
    faces a step is a few hundred small kernels, and launching them one by one from Python
    costs more than running them. Every call updates the weights exactly once: capture records
    without running, so the capturing call's batch is trained by its one replay. A graph has one
    batch shape, so the epoch's last, partial batch is skipped (a different one each epoch).
    ``graphs`` replaces the CUDA machinery (tests); ``generators`` are the run's own CUDA
    generators that the step draws from, for the graph to advance.
    """

    WARMUP = 3

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, rt: Runtime,
                 images: torch.Tensor, labels: torch.Tensor, recipe: Recipe, *,
                 graphs: CudaGraphs | None = None,
                 generators: tuple[torch.Generator, ...] = ()):
        self.model, self.opt, self.rt, self.recipe = model, opt, rt, recipe
        self.images, self.labels = images, labels  # on the device, for the whole run
        self.batch_size = batch_size = recipe.batch_size
        dev = images.device
        self.loss_sum = torch.zeros((), device=dev)
        self.correct = torch.zeros((), device=dev, dtype=torch.long)
        self.finite = torch.ones((), device=dev, dtype=torch.bool)
        self.last_loss = torch.zeros((), device=dev)
        self.graphed = (rt.graphs or graphs is not None) and len(labels) >= batch_size
        self.graphs = graphs or CudaGraphs(generators)
        if self.graphed:
            self.idx = torch.zeros(batch_size, device=dev, dtype=torch.long)
            self.u = torch.zeros(batch_size, N_DRAWS, device=dev)
        self.graph: Any = None
        self.steps = 0

    def reset(self) -> None:
        """Zero the running sums in place (a captured graph holds their addresses)."""
        self.loss_sum.zero_()
        self.correct.zero_()
        self.finite.fill_(True)

    def _body(self, idx: torch.Tensor, u: torch.Tensor | None, cache: bool = True) -> None:
        r = self.recipe
        x = self.rt.to_input(self.images[idx])
        y = self.labels[idx]
        if r.augment is not None:
            x = augment_batch(x, r.augment, u)
        x = normalize(x, r.normalize)
        with self.rt.autocast(cache):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=r.label_smoothing)
        loss.backward()
        if r.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), r.grad_clip)
        self.opt.step()
        loss = loss.detach()
        self.last_loss.copy_(loss)
        self.loss_sum.add_(loss * len(idx))
        self.correct.add_((logits.argmax(1) == y).sum())
        self.finite.logical_and_(torch.isfinite(loss))

    def _eager(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self._body(self.idx, self.u, cache=False)

    def __call__(self, idx: torch.Tensor, u: torch.Tensor | None) -> None:
        self.steps += 1
        if not self.graphed:
            self.opt.zero_grad(set_to_none=True)
            self._body(idx, u)
            return
        self.idx.copy_(idx)
        if u is not None:
            self.u.copy_(u)
        if self.graph is None:
            if self.steps < self.WARMUP:
                self.graphs.eager(self._eager)
                return
            # Grads set to None now are allocated by the capture from the graph's own pool,
            # and every replay's backward writes them afresh.
            self.opt.zero_grad(set_to_none=True)
            self.graph = self.graphs.capture(lambda: self._body(self.idx, self.u, cache=False))
        self.graph.replay()

    def release(self) -> None:
        """Let the captured graph go (a run's end), under the capture lock: on torch 2.11 and
        older a graph's destructor touches the default generator's registry without a lock of
        its own, and another slot may be capturing."""
        if self.graph is not None:
            with _CAPTURE:
                self.graph = None  # the last reference: the destructor runs here


def train_one_epoch(step: TrainStep, gen: torch.Generator, schedule: Schedule | None = None,
                    desc: str = "train") -> dict[str, float]:
    """One pass over ``step``'s images in an order (and augmentation draws) from ``gen``; what
    each step does is ``step.recipe``."""
    rt, bs, augment = step.rt, step.batch_size, step.recipe.augment is not None
    step.model.train()
    n = len(step.labels)
    # The epoch's randomness is drawn at once on the CPU from the seeded generator (so runs
    # are reproducible on any device and resumable), then moved in one copy.
    # An arm without augmentation draws (and discards) the same uniforms, so that paired arms
    # of one seed see the same batches in the same order: common random numbers.
    order = torch.randperm(n, generator=gen)
    draws = torch.rand(n, N_DRAWS, generator=gen)
    order = order.to(rt.device)
    draws = draws.to(rt.device) if augment else None
    sync_each_step = rt.device.type == "cpu"  # a host sync is free on the CPU, costly on a GPU
    step.reset()
    seen = 0
    t0 = time.perf_counter()
    bar = tqdm(range(0, n, bs), desc=desc, leave=False, unit="batch",
               disable=True if current_slot().concurrent else None)
    for i, start in enumerate(bar):
        stop_point()
        idx = order[start:start + bs]
        if (len(idx) < 2 and n > 1) or (step.graphed and len(idx) < bs):
            continue  # BatchNorm cannot train on a batch of one; a graph has one batch shape
        step(idx, draws[start:start + len(idx)] if draws is not None else None)
        seen += len(idx)
        if schedule is not None:
            schedule.after_batch()
        if sync_each_step:
            if not torch.isfinite(step.last_loss):
                raise TrainingError(f"the training loss became {step.last_loss.item()} at batch "
                                    f"{i} (lr {float(step.opt.param_groups[0]['lr']):.3g}); lower "
                                    f"lr or set grad_clip, e.g. --set lr=1e-4 --set grad_clip=1.0.")
            if bar.disable is False and i % 20 == 0:
                bar.set_postfix(loss=f"{step.loss_sum.item() / seen:.3f}",
                                acc=f"{step.correct.item() / seen:.3f}")
    if not bool(step.finite):
        raise TrainingError("the training loss became non-finite during the epoch; lower lr or "
                            "set grad_clip, e.g. --set lr=1e-4 --set grad_clip=1.0.")
    secs = time.perf_counter() - t0
    seen = max(seen, 1)
    return {"loss": step.loss_sum.item() / seen, "acc": step.correct.item() / seen,
            "img_per_s": seen / secs, "seconds": secs}


EpochCallback = Callable[[int, dict[str, float]], None]


class StopRun(Exception):
    """Raised by an epoch callback to end a run early but cleanly (an Optuna pruning, say);
    ``state`` is recorded as the run's ``state`` tag."""

    def __init__(self, state: str):
        super().__init__(state)
        self.state = state
