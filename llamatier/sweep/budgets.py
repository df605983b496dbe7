"""HBM budget axes for sweeps: percentages of the trace's KV bytes, explicit sizes, or ranges.

``parse_budgets("10%..100%", steps=10)`` gives ten points from 10% to 100%;
``"1GiB,2GiB"`` two explicit sizes; ``"auto"`` the profile's own budget (HBM
capacity minus the weights). A percentage is resolved inside each sweep cell
against that cell's KV bytes (its KV type, geometry and block size), so one
axis stays comparable across KV types and geometries.
"""

from __future__ import annotations

import numpy as np

from llamatier.errors import LlamatierError
from llamatier.replay.budgets import BudgetPoint, parse_budget

__all__ = ["BudgetPoint", "parse_budgets"]

AXIS_HELP = "e.g. 10%..100% (with --steps), 25%,50%,100%, 1GiB,2GiB, 1GiB..8GiB or auto"


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
            points.append(parse_budget(item, help=AXIS_HELP))
            continue
        lo_text, _, hi_text = item.partition("..")
        lo, hi = parse_budget(lo_text, help=AXIS_HELP), parse_budget(hi_text, help=AXIS_HELP)
        if lo.is_auto or hi.is_auto:
            raise LlamatierError(f"HBM budget range {item.strip()!r} cannot include auto: {AXIS_HELP}")
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
        raise LlamatierError(f"no HBM budgets given: {AXIS_HELP}")
    return tuple(unique)
