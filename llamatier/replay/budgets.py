"""An HBM budget: a percentage of the replay's peak KV bytes, a size, or auto (the profile's).

``--hbm-budget`` on replay, compare and sweep takes the same values:
``25%`` (of the most KV bytes the replay stores at once, under its KV type,
geometry and block size), ``2GiB``, or ``auto`` (HBM capacity minus the
weights). Sweeps take lists and ranges of them (:mod:`llamatier.sweep.budgets`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llamatier.errors import LlamatierError
from llamatier.units import format_bytes, parse_size_bytes

AUTO = "auto"
VALUE_HELP = "e.g. 25%, 2GiB or auto"


@dataclass(frozen=True)
class BudgetPoint:
    """An HBM budget: a fraction of the replay's peak KV bytes, a byte count, or auto.

    Exactly one of ``fraction`` and ``size_bytes`` is set, or neither (auto: the
    profile's HBM capacity minus the model's weights).
    """

    fraction: float | None = None  # of the cell's peak KV bytes (1.0 = 100%)
    size_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.fraction is not None and self.size_bytes is not None:
            raise LlamatierError("an HBM budget is either a percentage or a size, not both")
        if self.fraction is not None and not (self.fraction >= 0 and np.isfinite(self.fraction)):
            raise LlamatierError(f"HBM budget {self.fraction * 100:g}% must be >= 0%")
        if self.size_bytes is not None and self.size_bytes < 0:
            raise LlamatierError(f"HBM budget {self.size_bytes} bytes must be >= 0")

    @property
    def is_auto(self) -> bool:
        return self.fraction is None and self.size_bytes is None

    @property
    def label(self) -> str:
        if self.fraction is not None:
            return f"{self.fraction * 100:.4g}%"
        if self.size_bytes is not None:
            return format_bytes(self.size_bytes)
        return AUTO

    def resolve_bytes(self, kv_peak_bytes: float) -> int | None:
        """The budget in bytes for a cell whose trace stores ``kv_peak_bytes`` at its peak (None: auto)."""
        if self.fraction is not None:
            return int(round(self.fraction * float(kv_peak_bytes)))
        return self.size_bytes


def parse_budget(text: str, *, what: str = "HBM budget", help: str = VALUE_HELP) -> BudgetPoint:
    """One HBM budget value: "25%", "2GiB" or "auto" (errors name ``what`` and end with ``help``)."""
    t = text.strip()
    if not t:
        raise LlamatierError(f"empty {what} value: {help}")
    if t.lower() == AUTO:
        return BudgetPoint()
    if t.endswith("%"):
        try:
            pct = float(t[:-1])
        except ValueError:
            raise LlamatierError(f"invalid {what} {text!r}: {help}") from None
        if not math.isfinite(pct):
            raise LlamatierError(f"invalid {what} {text!r}: give a finite percentage, e.g. 25%")
        return BudgetPoint(fraction=pct / 100.0)
    return BudgetPoint(size_bytes=parse_size_bytes(t, what=what))
