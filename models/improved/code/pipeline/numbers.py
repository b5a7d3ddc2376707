"""One rule for every number a person gives, wherever it is written: a command-line flag, a
``--set`` value, a stage YAML, the study file or the search file.

- Not given (no value, an empty string, YAML's ``~``) is ``None``; the caller's default applies.
  Never a falsy value: ``0`` is zero, and is refused where zero means nothing.
- A number may be written as text (``"3"``, ``"3.0"``, ``"1e-4"``) or as a YAML number; the two
  mean the same. A whole number may carry a zero fraction (``3.0``: MLproject writes its float
  parameters so) but never a non-zero one: ``2.5`` seeds are refused, not cut to 2.
- ``true``/``false``, words, ``nan``, ``inf`` and anything outside the range are refused with
  one line naming where the value was written, the value and what was expected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# The largest whole number any setting takes unless its range says otherwise (torch, numpy and
# the storage's integer columns all hold it); "1e40 epochs" is a typo, not a plan.
WHOLE_MAX = 2**31 - 1


class NumberError(ValueError):
    """A value that is not the number expected; the message is one line without the place."""


@dataclass(frozen=True)
class Range:
    """The numbers a setting takes: whole or not, and its bounds (``None``: unbounded; a
    whole number is bounded by ``WHOLE_MAX`` all the same)."""

    whole: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def top(self) -> float | None:
        return self.high if self.high is not None or not self.whole else WHOLE_MAX

    def expected(self) -> str:
        kind = "a whole number" if self.whole else "a finite number"
        lo, hi = self.low, self.top()
        if lo is None and hi is None:
            return kind
        if hi is None:
            return f"{kind} {'above' if self.low_open else 'of at least'} {_fmt(lo)}"
        if lo is None:
            return f"{kind} {'below' if self.high_open else 'of at most'} {_fmt(hi)}"
        if self.whole and not self.low_open and not self.high_open:
            return f"{kind} from {_fmt(lo)} to {_fmt(hi)}"
        return (f"{kind} in {'(' if self.low_open else '['}{_fmt(lo)}, {_fmt(hi)}"
                f"{')' if self.high_open else ']'}")

    def holds(self, v: float) -> bool:
        lo, hi = self.low, self.top()
        return not ((lo is not None and (v <= lo if self.low_open else v < lo)) or
                    (hi is not None and (v >= hi if self.high_open else v > hi)))


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def shown(value: Any) -> str:
    """The value as the person wrote it: text quoted, YAML's booleans and nothing by name."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse(value: Any, rng: Range) -> int | float | None:
    """``value`` as ``rng`` reads it, ``None`` when not given; ``NumberError`` otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    bad = NumberError(f"expected {rng.expected()}, got {shown(value)}")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise bad
    if isinstance(value, str):
        text = value.strip()
        if not text.isascii():
            # Python's int() reads other scripts' digits ("٣" is 3); YAML and a reader do not.
            raise bad
        try:
            # int() first: a long whole number keeps every digit a float would round.
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise bad from None
    if isinstance(value, float):
        if not math.isfinite(value) or (rng.whole and not value.is_integer()):
            raise bad
        if rng.whole:
            value = int(value)
    if not rng.holds(value):
        raise bad
    return int(value) if rng.whole else float(value)


def check(value: Any, rng: Range, where: str, error: type[Exception]) -> int | float | None:
    """``parse``, its refusal raised as ``error`` with ``where`` (a file and key, or a flag)
    in front: the one line every surface prints."""
    try:
        return parse(value, rng)
    except NumberError as e:
        raise error(f"{where}: {e}.") from None


WHOLE_0 = Range(whole=True, low=0)
WHOLE_1 = Range(whole=True, low=1)
POSITIVE = Range(low=0, low_open=True)
SHARE_OPEN = Range(low=0, high=1, low_open=True, high_open=True)
SEED = Range(whole=True, low=0, high=2**32 - 1)
