"""Several training runs at once in one process, each exactly as it would train alone.

At batch 64 on 48x48 faces a GPU spends most of a run waiting: each kernel is small, and one
run's kernels never fill the card. Runs in separate processes do not overlap on a GPU (without
MPS their kernels take turns). Runs in one process, each in a thread of its own with its own
CUDA stream, do: :class:`Pool` gives each of K slots a thread, a stream, and a :class:`Slot`
through which a stop reaches its run. Nothing of a run is shared with the others: its
generators (:class:`~pipeline.engine.RunRandom`), its graph and the graph's memory pool, its
optimiser and its data are its own, so its weights are those it gets alone.

Threads suit this: a CUDA graph's replay and every CPU kernel release the GIL, and what remains
per step in Python is a few copies and one replay.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable

import torch

from .config import Config
from .engine import (Recipe, Runtime, Slot, TrainStep, build_net, build_optimizer, in_slot,
                     train_one_epoch)
from .randomness import RunRandom

Job = Callable[[], Any]
Take = Callable[[Slot], "Job | None"]


@contextlib.contextmanager
def _own_stream(device: torch.device):
    if device.type != "cuda":
        yield
        return
    if device.index is not None:  # "cuda" alone is the current device, which threads share
        torch.cuda.set_device(device)
    with torch.cuda.stream(torch.cuda.Stream(device)):
        yield


class Pool:
    """``k`` slots on ``device``. :meth:`run` has each slot take jobs until there are none; a
    slot frees itself for the next job the moment its job ends, however it ends.

    A job handles the failures it expects (a unit's own, recorded as its outcome). Anything
    that escapes a job stops every slot, and once all have stopped, the first such exception is
    raised from :meth:`run`. Ctrl-C or SIGTERM in the caller's thread stops every slot the same
    way (each running job sees a KeyboardInterrupt at its next batch, as a run alone would) and
    KeyboardInterrupt is raised once all have stopped. With ``k`` 1 the job runs in the
    caller's own thread, as before there were slots."""

    def __init__(self, k: int, device: torch.device | str = "cpu"):
        if k < 1:
            raise ValueError(f"a pool needs at least one slot, got {k}")
        self.k, self.device = k, torch.device(device)

    def run(self, take: Take) -> None:
        if self.k == 1:
            slot = Slot()
            while (job := take(slot)) is not None:
                job()
            return
        stop, lock = threading.Event(), threading.Lock()
        errors: list[BaseException] = []
        # Each slot says it has ended through an event of its own: a KeyboardInterrupt that
        # lands in Thread.join can mark a live thread as ended (CPython 3.11), and the process
        # would then exit while a slot still records its unit.
        ended = [threading.Event() for _ in range(self.k)]

        def serve(index: int) -> None:
            try:
                with in_slot(Slot(index, stop, "", True)) as slot, _own_stream(self.device):
                    while not stop.is_set():
                        with lock:  # one claim at a time: two slots never take the same job
                            job = None if stop.is_set() else take(slot)
                        if job is None:
                            return
                        try:
                            job()
                        except KeyboardInterrupt:
                            return  # a stop: the job has kept what it keeps on Ctrl-C
                        except BaseException as e:
                            errors.append(e)
                            stop.set()
                            return
                        finally:
                            slot.label = ""
            except BaseException as e:  # a claim that failed, or the stream
                errors.append(e)
                stop.set()
            finally:
                ended[index].set()

        for i in range(self.k):
            threading.Thread(target=serve, args=(i,), name=f"slot-{i + 1}", daemon=True).start()
        try:
            for e in ended:
                while not e.wait(0.2):
                    pass
        except KeyboardInterrupt:
            stop.set()
            for e in ended:
                while not e.wait(0.2):
                    pass
            raise
        if errors:
            raise errors[0]


def measure_concurrent(cfg: Config, k: int, seconds: float = 2.0,
                       n_images: int = 0) -> dict[str, Any]:
    """Total training images/s of ``cfg``'s network with ``k`` runs training at once, each on
    its own random faces (``n_images`` each, default 32 batches), after a warm-up epoch each;
    and on a GPU the peak memory per slot. Every slot starts timing together and the figure is
    their images over the span from that start to the last slot's end."""
    rt = Runtime(cfg)
    n = n_images or cfg.batch_size * 32
    ready = threading.Barrier(k)
    done = [0] * k
    spans: list[tuple[float, float]] = []
    jobs = list(range(k))
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()

    def job(i: int) -> None:
        try:
            measure(i)
        except BaseException:
            ready.abort()  # the other slots must not wait for this one
            raise

    def measure(i: int) -> None:
        rng = RunRandom(i, rt.device)
        images = torch.randint(0, 256, (n, 1, 48, 48), dtype=torch.uint8, generator=rng.order)
        labels = torch.randint(0, 7, (n,), generator=rng.order)
        model = build_net(cfg, rt, rng)
        opt = build_optimizer(cfg, model.parameters(), capturable=rt.graphs)
        step = TrainStep(model, opt, rt, images.to(rt.device), labels.to(rt.device),
                         Recipe.of(cfg), generators=rng.graphed_generators())
        per_epoch = n - (n % cfg.batch_size if step.graphed else 0)
        try:
            train_one_epoch(step, rng.order, desc="measuring")  # kernels, allocator, graph
            _sync(rt)
            ready.wait()
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds or not done[i]:
                train_one_epoch(step, rng.order, desc="measuring")
                done[i] += per_epoch
            _sync(rt)
            spans.append((t0, time.perf_counter()))
        finally:
            step.release()

    def take(slot: Slot) -> Job | None:
        if not jobs:
            return None
        i = jobs.pop(0)
        return lambda: job(i)

    Pool(k, rt.device).run(take)
    span = max(e for _, e in spans) - min(s for s, _ in spans)
    out: dict[str, Any] = {"img_per_s": round(sum(done) / span, 1),
                           "threads_per_slot": torch.get_num_threads()}
    if rt.device.type == "cuda":
        out["memory_per_slot_mib"] = round(
            (torch.cuda.max_memory_allocated() - base) / k / 2**20, 1)
    return out


def _sync(rt: Runtime) -> None:
    if rt.device.type == "cuda":
        torch.cuda.current_stream().synchronize()


# torch.OutOfMemoryError is the device-generic name from torch 2.5 on.
OutOfMemory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
# Out of memory as other layers word it: cuBLAS failing to allocate its handle or workspace, an
# allocation in a kernel launch.
OUT_OF_MEMORY_WORDS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def out_of_memory(e: BaseException) -> bool:
    return isinstance(e, OutOfMemory) or (
        isinstance(e, RuntimeError) and any(w in str(e) for w in OUT_OF_MEMORY_WORDS))


def best_k(cfg: Config, candidates: tuple[int, ...] = (1, 2, 4, 8),
           seconds: float = 1.0) -> tuple[int, dict[int, float]]:
    """The number of slots that trains ``cfg``'s network fastest here, by a short measurement
    at each candidate; a larger K must beat the best smaller one by 10% to be chosen (more
    slots hold more memory and say less about any one run). A K that does not fit (out of
    memory) ends the search at the best K before it. Any other failure is raised: a capture or
    a stream that broke at some K may have left the device in a state (an allocator still in
    capture mode) that no study should go on in."""
    rates: dict[int, float] = {}
    best = candidates[0]
    for k in candidates:
        try:
            rates[k] = measure_concurrent(cfg, k, seconds)["img_per_s"]
        except RuntimeError as e:
            if k == candidates[0] or not out_of_memory(e):
                raise
            print(f"concurrent auto: {k} units at once do not fit in this device's memory; "
                  f"staying at {best}", flush=True)
            break
        if rates[k] > 1.1 * rates[best]:
            best = k
    return best, rates
