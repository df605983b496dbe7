"""The clairvoyant bound: placement from the future, migrations free.

The oracle reads the whole trace at start. A block's value at step s is the
discounted count of the steps, from s on, that read it, and its priority puts
the blocks this very step reads first (only they cost time now)::

    value[s]    = read[s] + gamma * value[s + 1]
    priority[s] = (1 / (1 - gamma) + 1) * read[s] + gamma * value[s + 1]

where ``read`` is the step's visible blocks (lossless) or, in sparse mode, the
``block_budget`` blocks of each layer with the most attention mass *in that
very step* (the best any selection can capture). Each step, stored blocks are
laid out fastest tier first in priority order (a prefix fill, so more capacity
never pushes a block down) and every move is free (``move_timing="free"``:
bytes are counted, time is not). Under these rules more HBM never costs time,
and with everything in HBM the oracle equals static. It is a bound for
comparison, not a policy one could run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from llamatier.policies.base import (
    Policy,
    StartDecision,
    StepDecision,
    StepView,
    fill_by_priority,
    register_policy,
)

if TYPE_CHECKING:
    from llamatier.replay.context import ReplayContext


def oracle_reads(ctx: ReplayContext) -> np.ndarray:
    """bool [S, L, NB]: blocks the oracle reads at each step."""
    S, L, NB = ctx.n_steps, ctx.n_layers, ctx.n_blocks
    b = np.arange(NB)[None, None, :]
    visible = (b >= ctx.lo_visible[:, :, None]) & (b < ctx.hi_block[:, None, None])
    if ctx.options.mode != "sparse":
        return visible
    k = min(int(ctx.options.block_budget), NB)
    mv = np.where(visible, ctx.mass, -np.inf)
    top = np.argpartition(-mv, k - 1, axis=2)[:, :, :k]
    sel = np.zeros((S, L, NB), dtype=bool)
    np.put_along_axis(sel, top, True, axis=2)
    sel &= visible
    return np.where(ctx.is_decode[:, None, None], sel, visible)


@register_policy
class OraclePolicy(Policy):
    """Sees the future: a bound on what any placement could reach, not a policy."""

    name = "oracle"
    summary = "clairvoyant bound: future reads order the tiers, migrations are free"
    is_bound = True

    def __init__(self, gamma: float = 0.9) -> None:
        if not 0.0 <= gamma < 1.0:
            raise ValueError("gamma must be in [0, 1)")
        self.gamma = float(gamma)

    def params(self) -> dict[str, Any]:
        return {"gamma": self.gamma}

    def start(self, ctx: ReplayContext) -> StartDecision:
        self.reads = oracle_reads(ctx)
        # priority[s] = K * read[s] + gamma * value[s + 1]: this step's reads first (moves are free, so
        # only they cost time now; K exceeds any future value), then the discounted future reads
        k = 1.0 / (1.0 - self.gamma) + 1.0
        priority = np.zeros(self.reads.shape, dtype=np.float32)
        future = np.zeros(self.reads.shape[1:], dtype=np.float32)  # value[s + 1]
        for s in range(ctx.n_steps - 1, -1, -1):
            priority[s] = k * self.reads[s] + self.gamma * future
            future *= self.gamma
            future += self.reads[s]
        self.value = priority
        self.caps = np.asarray(ctx.capacity_bytes, dtype=np.float64)
        self.block_bytes = np.asarray(ctx.block_bytes, dtype=np.float64)
        self.sparse = ctx.options.mode == "sparse"
        return StartDecision(
            placement=np.full((ctx.n_layers, ctx.n_blocks), -1, dtype=np.int8),
            verdict="a bound: placement from future reads, migrations free",
        )

    def decide(self, view: StepView) -> StepDecision:
        s = view.step
        placement = fill_by_priority(self.value[s], self.block_bytes, self.caps, view.alive)
        read_mask = self.reads[s] if (self.sparse and view.decode) else None
        return StepDecision(placement=placement, read_mask=read_mask, move_timing="free")
