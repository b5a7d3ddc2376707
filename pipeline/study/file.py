"""A study or search file: its profiles, each one's budget checked as the config reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import coerce, given, load_yaml
from ..errors import ConfigError, UsageError

PROFILES = ("smoke", "quick", "full")


def read_study_file(path: str | Path, what: str, keys: tuple[str, ...],
                    profile: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A study or search file and its chosen profile, checked: the file's mapping and the
    profile's own (``set`` is its budget, checked key by key)."""
    p = Path(path)
    d = load_yaml(p, what, UsageError, keys)
    profiles = d.get("profiles")
    if not isinstance(profiles, dict):
        raise UsageError(f"{p}: profiles must be a mapping of profile names to settings, got "
                         f"{profiles!r}.")
    if profile not in profiles:
        raise UsageError(f"{p}: unknown profile {profile!r}; this file has "
                         f"{', '.join(profiles) or 'none'}.")
    prof = profiles[profile] or {}
    if not isinstance(prof, dict) or not isinstance(prof.get("set") or {}, dict):
        raise UsageError(f"{p}: profile {profile} must be a mapping with `set` a mapping of "
                         f"config keys, got {prof!r}.")
    prof = {**prof, "set": check_budget(prof.get("set") or {}, f"{p} profile {profile}")}
    return d, prof


def check_budget(budget: dict[str, Any], where: str) -> dict[str, Any]:
    """Config keys of a budget, each checked and read as the config reads it; a key written
    without a value is left out (not given)."""
    try:
        return given({k: coerce(k, v, where) for k, v in budget.items()})
    except ConfigError as e:
        raise UsageError(str(e)) from None
