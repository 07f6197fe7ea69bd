"""Value ranges declared beside each schema default, and the one function that enforces them.

    seed: int = ranged(42, ge=0, le=2**32 - 1)

``check_ranges`` runs in every schema section's ``__post_init__``: each number must be finite (inf
and NaN mean nothing in any setting) and inside its field's ``Range``; a list field's numbers each,
and its length when the ``Range`` names one. Imports nothing heavy (the command line checks early).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from train.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """The values a number field (or each number of a list field) may take; declared beside its default."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    length: int | None = None   # a list field: exactly this many numbers
    hint: str = ""               # appended to the message, e.g. "0 = only at the end"

    def admits(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        """"≥ 1", "> 0", "in [0, 1)" …"""
        low, high = _num(self.ge if self.ge is not None else self.gt), _num(self.le if self.le is not None else self.lt)
        if low and high:
            return f"in {'[' if self.ge is not None else '('}{low}, {high}{']' if self.le is not None else ')'}"
        if low:
            return f"{'≥' if self.ge is not None else '>'} {low}"
        return f"{'≤' if self.le is not None else '<'} {high}" if high else "a finite number"


def _num(x: float | None) -> str:
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


def ranged(default: Any, **bounds: Any) -> Any:
    """A dataclass field with a ``Range`` (lists get a default factory): ``seed: int = ranged(42, ge=0)``."""
    meta = {"range": Range(**bounds)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def check_ranges(section_obj: Any, group: str) -> None:
    """Every number of a schema section is finite and inside its declared ``Range``; else one ``ConfigError``.

    The one place value ranges are checked: a field declares its range, this enforces it (inf and NaN are
    refused everywhere: no setting means them).
    """
    for f in fields(section_obj):
        value, rule = getattr(section_obj, f.name), f.metadata.get("range")
        numbers = list(value) if isinstance(value, (list, tuple)) else [value]
        numbers = [v for v in numbers if isinstance(v, (int, float)) and not isinstance(v, bool)]
        key = f"{group}.{f.name}"
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ConfigError(f"{key} must be a finite number (got {value!r})")
        if rule is None or value is None:
            continue
        if rule.length is not None and len(numbers) != rule.length:
            raise ConfigError(f"{key} must be {rule.length} numbers {rule.describe()} (got {value!r})")
        if not all(rule.admits(v) for v in numbers):
            hint = f"; {rule.hint}" if rule.hint else ""
            raise ConfigError(f"{key} must be {rule.describe()} (got {value!r}){hint}")
