"""Argument checks shared by the attack constructors."""

from __future__ import annotations

import math


def check_positive(name: str, value: object) -> float:
    """``value`` as a float, finite and > 0; TypeError/ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number > 0, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)
