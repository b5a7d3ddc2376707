"""A run's randomness: the global generators seeded for code beside a run, and the generators of
its own that every draw of the run comes from, so that runs trained side by side in one process
draw exactly what each draws alone."""

from __future__ import annotations

import contextlib
import random
import threading
from typing import Any

import numpy as np
import torch
from torch import nn


def seed_everything(seed: int, deterministic: bool = False, global_rng: bool = True) -> None:
    """Seed the global generators (a run draws from its own, :class:`RunRandom`; code beside it
    may not) and choose the kernels. ``global_rng=False`` leaves the global generators alone,
    as runs trained side by side must: one run's seeding would reseed the others'."""
    if global_rng:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = not deterministic


class RunRandom:
    """Every random draw of one run comes from generators of its own, never from torch's global
    one, so that runs trained side by side in one process draw exactly what each draws alone.

    Seeded so that a run draws what it drew when its draws came from the global generator
    seeded with its seed: ``init`` is that CPU stream (the network's initialisation, then, on a
    CPU, its dropout masks, in that order); on a GPU the dropout masks come from ``dropout``, a
    generator on the device seeded the same way, as the device's global one was. The data order
    and the augmentation draws keep their own CPU generator, ``order``, as before. Paired arms of
    one seed therefore still share their initial weights and batches (common random numbers)."""

    def __init__(self, seed: int, device: torch.device):
        self.order = torch.Generator().manual_seed(seed)
        self.init = torch.Generator().manual_seed(seed)
        self.dropout = (self.init if device.type == "cpu"
                        else torch.Generator(device).manual_seed(seed))

    def graphed_generators(self) -> tuple[torch.Generator, ...]:
        """The generators a CUDA graph of the run's step must be registered with."""
        return (self.dropout,) if self.dropout.device.type == "cuda" else ()

    def state_dict(self) -> dict[str, Any]:
        # The key names of the checkpoints written while these were global generators, so that
        # a checkpoint of either kind resumes the same run.
        return {"generator": self.order.get_state(), "torch_rng": self.init.get_state(),
                "dropout_rng": None if self.dropout is self.init else self.dropout.get_state()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.order.set_state(state["generator"])
        self.init.set_state(state["torch_rng"])
        if self.dropout is self.init:
            return
        if state.get("dropout_rng") is not None:
            self.dropout.set_state(state["dropout_rng"])
        elif state.get("cuda_rng") and device.type == "cuda":
            self.dropout.set_state(state["cuda_rng"][device.index or 0])


_GLOBAL_RNG = threading.Lock()


@contextlib.contextmanager
def drawing_from(gen: torch.Generator):
    """Run the block with torch's global CPU generator standing in for ``gen`` (and ``gen``
    advanced by what the block drew): a module's default initialisation takes no generator.
    The lock keeps two runs from building their networks on the global one at once."""
    with _GLOBAL_RNG:
        saved = torch.get_rng_state()
        torch.set_rng_state(gen.get_state())
        try:
            yield
        finally:
            gen.set_state(torch.get_rng_state())
            torch.set_rng_state(saved)


class RunDropout(nn.Module):
    """Element-wise dropout drawing its masks from a run's own generator, with the same kernels
    as ``nn.Dropout`` (CPU: a Bernoulli noise tensor; CUDA: the fused kernel that
    ``nn.Dropout`` calls there), so that from the same generator state it drops the same
    elements and scales them the same way."""

    def __init__(self, p: float, generator: torch.Generator):
        super().__init__()
        self.p, self.generator = p, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.numel() == 0:
            return x
        if self.p == 1:
            return x * torch.zeros((), dtype=x.dtype, device=x.device)
        if x.is_cuda:
            return torch._fused_dropout(x, 1 - self.p, self.generator)[0]
        noise = torch.empty_like(x).bernoulli_(1 - self.p, generator=self.generator)
        return x * noise.div_(1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
