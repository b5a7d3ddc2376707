"""How long a study has left: the estimate, its duration in words, and the bar across the study."""

from __future__ import annotations

import contextlib
import io
import sys
import threading
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

from tqdm import tqdm

def duration(seconds: float) -> str:
    """``42 s``, ``7 min``, ``1 h 05 min``: as precise as an estimate deserves."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


@dataclass
class Eta:
    """How long the units left will take this worker: each unit's predicted seconds (the images
    it trains and scores over the rates measured on this machine, plus its fixed costs) times a
    scale. The scale starts at a prior and moves to the ratio of measured to predicted time as
    units finish here, in proportion to the share of the predicted work they make up, so that
    one short unit cannot swing the estimate of the whole.

    A worker that trains ``slots`` units at once gets through the whole ``speedup`` times
    faster (measured), and each unit then takes ``slots / speedup`` times its time alone."""

    # The prediction counts every pass and a run's figures, measured here: on 2-core CPUs it
    # came within the noise of the measurement itself (docs/performance.md), so the prior is 1.
    PRIOR: ClassVar[float] = 1.0

    predicted: dict[Any, float]
    scale: float = PRIOR
    weight: float = 0.0  # predicted seconds the prior counts as; 0: a tenth of the total
    slots: int = 1
    speedup: float = 1.0
    _predicted_done: float = 0.0
    _measured_done: float = 0.0

    def __post_init__(self) -> None:
        self._prior = self.scale
        self.weight = self.weight or max(0.1 * sum(self.predicted.values()), 1e-9)

    def finished(self, key: Any, seconds: float) -> None:
        """``seconds``: the unit's wall time, beside whatever else this worker trained."""
        self._predicted_done += self.predicted[key]
        self._measured_done += seconds * self.speedup / self.slots
        self.scale = ((self._prior * self.weight + self._measured_done)
                      / (self.weight + self._predicted_done))

    def left(self, keys: list[Any]) -> float:
        return self.scale * sum(self.predicted[k] for k in keys) / self.speedup

    def unit(self, key: Any) -> float:
        """One unit's wall time from its start, beside the others trained at once."""
        return self.scale * self.predicted[key] * self.slots / self.speedup


class _AboveBars(io.TextIOBase):
    """Standard output printed above the progress bars, a whole line at a time, so that a bar
    is never drawn into the middle of a line."""

    def __init__(self, out: Any, bars_file: Any):
        self.out, self.bars_file, self.pending = out, bars_file, ""
        self._lock = threading.Lock()  # runs training side by side print from their threads

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            self.pending += text
            if "\n" in self.pending:
                lines, _, self.pending = self.pending.rpartition("\n")
                with tqdm.external_write_mode(file=self.bars_file):
                    self.out.write(lines + "\n")
                    self.out.flush()
        return len(text)

    def flush(self) -> None:
        self.out.flush()


@contextlib.contextmanager
def study_bar(total: int, done: int, file: Any = None) -> Iterator[tqdm]:
    """A bar across the whole study, kept below everything else the workers print (per-epoch
    lines and bars); the caller sets its ETA as the postfix. Shown on a terminal only: a log
    file gets the progress lines alone."""
    file = file if file is not None else sys.stderr
    bar = tqdm(total=total, initial=done, file=file, disable=None, unit="run", desc="study",
               bar_format="{desc} {n_fmt}/{total_fmt} runs |{bar}| {elapsed} so far{postfix}",
               dynamic_ncols=True)
    try:
        if bar.disable:
            yield bar
        else:
            with contextlib.redirect_stdout(_AboveBars(sys.stdout, file)) as above:
                try:
                    yield bar
                finally:
                    above.write("\n" if above.pending else "")
    finally:
        bar.close()
