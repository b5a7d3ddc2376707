"""A reduced study sized to the minutes a user gives it (``ablate --budget MINUTES``).

A profile that declares ``sizing`` (the ``quick`` demonstration) is resized on the machine that
runs it: from the rates measured there, the study's predicted time is computed for each size on
one path, and the largest size that fits the budget is kept. The path changes the share of the
train split first, then the epochs: shrinking from the profile's own size, the share goes down
to its floor before an epoch goes; growing, the share goes up to the whole split before an
epoch is added. The floor is the smallest size at which the demonstration's cells still train;
when even the floor does not fit, the study runs at the floor and says how long it will take.

The size is part of the study's identity (its fingerprint holds the budget), so the first size
a machine chose is stored on the study, and a rerun on the same machine reuses it instead of
measuring again: a few per cent of noise in a measurement would otherwise start another study.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from . import numbers
from .errors import UsageError
from .numbers import Range

# The grid of sizes: a share of the train split to a twentieth, whole epochs.
SHARE_STEP = 0.05
MINUTES = Range(low=0, low_open=True, high=10_000)


@dataclass(frozen=True)
class Bounds:
    """A profile's ``sizing``: its default budget and how far its size may go each way."""

    minutes: float | None  # the default budget on a CPU (None: resized only when asked)
    data_fraction: tuple[float, float]
    epochs: tuple[int, int]


@dataclass(frozen=True)
class Sizing:
    """The size chosen for a budget on one machine, and what it is predicted to take."""

    minutes: float
    data_fraction: float
    epochs: int
    predicted_s: float  # the whole study at this size, on this machine
    floor_s: float  # the study at its floor
    machine: str

    @property
    def fits(self) -> bool:
        return self.predicted_s <= self.minutes * 60

    def as_attrs(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of_attrs(cls, d: dict[str, Any]) -> Sizing:
        return cls(**d)

    def params(self) -> dict[str, Any]:
        """The parent run's params that say how the study was sized."""
        return {"sizing_budget_min": f"{self.minutes:g}", "sizing_data_fraction": self.data_fraction,
                "sizing_epochs": self.epochs,
                "sizing_estimate_min": round(self.predicted_s / 60, 1),
                "sizing_machine": self.machine}

    def said(self) -> str:
        return (f"{self.data_fraction:g} of each train split for {self.epochs} epoch(s), about "
                f"{_minutes(self.predicted_s)} on {self.machine}")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def read_bounds(spec: Any, where: str, profile_set: dict[str, Any]) -> Bounds:
    """The profile's ``sizing`` mapping, checked: ``minutes`` (the default budget on a CPU),
    ``data_fraction: [floor, ceiling]`` and ``epochs: [floor, ceiling]``, each range holding
    the profile's own size where it sets one."""
    if not isinstance(spec, dict) or set(spec) - {"minutes", "data_fraction", "epochs"}:
        raise UsageError(f"{where}: sizing: expected a mapping of minutes, data_fraction: "
                         f"[floor, ceiling] and epochs: [floor, ceiling], got "
                         f"{numbers.shown(spec)}.")
    minutes = numbers.check(spec.get("minutes"), MINUTES, f"{where}: sizing: minutes",
                            UsageError)
    share = _pair(spec.get("data_fraction"), Range(low=0, high=1, low_open=True),
                  f"{where}: sizing: data_fraction")
    epochs = _pair(spec.get("epochs"), numbers.WHOLE_1, f"{where}: sizing: epochs")
    for key, (lo, hi) in (("data_fraction", share), ("epochs", epochs)):
        own = profile_set.get(key)  # not given: the path starts from the floor
        if own is not None and not lo <= own <= hi:
            raise UsageError(f"{where}: sizing: {key} [{lo:g}, {hi:g}] must hold the profile's "
                             f"own {key} (its set: {key}: {own}).")
    return Bounds(minutes, share, (int(epochs[0]), int(epochs[1])))


def _pair(value: Any, rng: Range, where: str) -> tuple[float, float]:
    if not isinstance(value, list) or len(value) != 2:
        raise UsageError(f"{where}: expected [floor, ceiling], got {numbers.shown(value)}.")
    lo, hi = (numbers.check(v, rng, where, UsageError) for v in value)
    if lo is None or hi is None or lo > hi:
        raise UsageError(f"{where}: expected [floor, ceiling] with floor <= ceiling, got "
                         f"{numbers.shown(value)}.")
    return lo, hi


def path(b: Bounds, own_epochs: int) -> list[tuple[float, int]]:
    """Every size a budget may choose, smallest first: at the share's floor, the epochs from
    their floor up to the profile's own; then the share up to the whole split; then the epochs
    up to their ceiling. Shrinking, a study gives up its share before its epochs; growing, it
    takes the whole split before another epoch."""
    lo = math.ceil(b.data_fraction[0] / SHARE_STEP - 1e-9)
    hi = math.floor(b.data_fraction[1] / SHARE_STEP + 1e-9)
    shares = [round(i * SHARE_STEP, 4) for i in range(lo, hi + 1)] or [b.data_fraction[0]]
    out = [(shares[0], e) for e in range(b.epochs[0], own_epochs + 1)]
    out += [(s, own_epochs) for s in shares[1:]]
    out += [(shares[-1], e) for e in range(own_epochs + 1, b.epochs[1] + 1)]
    return out


def choose(cost: Callable[[float, int], float], b: Bounds, own_epochs: int, minutes: float,
           machine: str) -> Sizing:
    """The largest size on the path whose predicted seconds fit ``minutes`` (the floor when
    none does). ``cost(data_fraction, epochs)`` is the whole study's predicted seconds."""
    sizes = path(b, own_epochs)
    floor_s = cost(*sizes[0])
    best, best_s = sizes[0], floor_s
    for size in sizes[1:]:
        s = cost(*size)
        if s > minutes * 60:
            break  # the cost grows along the path
        best, best_s = size, s
    return Sizing(float(minutes), float(best[0]), int(best[1]), best_s, floor_s, machine)


def machine() -> str:
    """What sets the study's speed here, in words: the accelerator, or the CPU and the cores
    this process may run on (however many units share them: a rerun that measures another
    number of units at once must still find the size it chose here)."""
    if torch.cuda.is_available():
        return f"cuda {torch.cuda.get_device_name()}"
    cores = len(os.sched_getaffinity(0))
    return f"{cpu_name()}, {cores} core{'s' if cores != 1 else ''}"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or f"cpu x{os.cpu_count()}"

