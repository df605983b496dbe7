"""HBM budget axes for sweeps: percentages of the trace's KV bytes, explicit sizes, or ranges.

``parse_budgets("10%..100%", steps=10)`` gives ten points from 10% to 100%;
``"1GiB,2GiB"`` two explicit sizes; ``"auto"`` the profile's own budget (HBM
capacity minus the weights). A percentage is resolved inside each sweep cell
against that cell's KV bytes (its KV type, geometry and block size), so one
axis stays comparable across KV types and geometries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llamatier.errors import LlamatierError
from llamatier.units import format_bytes, parse_size_bytes

AUTO = "auto"
_HELP = "e.g. 10%..100% (with --steps), 25%,50%,100%, 1GiB,2GiB, 1GiB..8GiB or auto"


@dataclass(frozen=True)
class BudgetPoint:
    """One HBM budget of a sweep: a fraction of the trace's KV bytes, a byte count, or auto.

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


def _parse_value(text: str) -> BudgetPoint:
    t = text.strip()
    if not t:
        raise LlamatierError(f"empty HBM budget value: {_HELP}")
    if t.lower() == AUTO:
        return BudgetPoint()
    if t.endswith("%"):
        try:
            pct = float(t[:-1])
        except ValueError:
            raise LlamatierError(f"invalid HBM budget {text!r}: {_HELP}") from None
        if not math.isfinite(pct):
            raise LlamatierError(f"invalid HBM budget {text!r}: give a finite percentage, e.g. 25%")
        return BudgetPoint(fraction=pct / 100.0)
    return BudgetPoint(size_bytes=parse_size_bytes(t, what="HBM budget"))


def parse_budgets(spec: str, *, steps: int = 10) -> tuple[BudgetPoint, ...]:
    """Parse an ``--hbm-budget`` axis: comma-separated values and ``A..B`` ranges of ``steps`` points.

    Both ends of a range are of one kind (two percentages or two sizes) and
    ``A <= B``; range points are evenly spaced, ends included. Duplicates are
    dropped, the order kept.
    """
    if steps < 1:
        raise LlamatierError(f"--steps must be >= 1 (got {steps})")
    points: list[BudgetPoint] = []
    for item in str(spec).split(","):
        if ".." not in item:
            points.append(_parse_value(item))
            continue
        lo_text, _, hi_text = item.partition("..")
        lo, hi = _parse_value(lo_text), _parse_value(hi_text)
        if lo.is_auto or hi.is_auto:
            raise LlamatierError(f"HBM budget range {item.strip()!r} cannot include auto: {_HELP}")
        if (lo.fraction is None) != (hi.fraction is None):
            raise LlamatierError(
                f"HBM budget range {item.strip()!r} mixes a percentage and a size: use two of one kind"
            )
        if lo.fraction is not None:
            a, b = lo.fraction, hi.fraction
        else:
            a, b = float(lo.size_bytes), float(hi.size_bytes)
        if b < a:
            raise LlamatierError(f"HBM budget range {item.strip()!r} goes down: write it low..high")
        values = np.linspace(a, b, steps) if steps > 1 else np.array([a])
        if lo.fraction is not None:
            points.extend(BudgetPoint(fraction=float(round(v, 12))) for v in values)
        else:
            points.extend(BudgetPoint(size_bytes=int(round(v))) for v in values)
    unique = list(dict.fromkeys(points))
    if not unique:
        raise LlamatierError(f"no HBM budgets given: {_HELP}")
    return tuple(unique)
