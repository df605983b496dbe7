"""LRU across the four tiers, one access at a time, vectorised per step.

Semantics (the same as libCacheSim's LRU when all blocks have one size): the
tiers form one exclusive cascade over a single recency stack. An access moves
its block to the top of the stack; a block lives in the first tier whose
cumulative capacity, counted from the top of the stack, holds the block and
everything above it. So HBM holds the most recently used blocks that fit,
DRAM the next ones, and so on; an access that finds its block below HBM
fetches it up (demand, on the critical path) and pushes the least recent
blocks of each tier one tier down.

Within a step the accesses are the blocks the step reads, in layer order then
block order (the new token's block is written and read in its place). Each
block's moves in a step are at most three: pushed down before its access,
fetched to the top at its access, pushed down after it. Blocks freed by a
sliding window stay in the stack as ghosts until they sink below every stored
block (a plain LRU does not know a block is dead).

When a step's accesses are not in stack order (sparse mode), the step runs
through :func:`llamatier.reference.lru_step_reference`, one access at a time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llamatier.policies.base import (
    N_TIERS,
    CapacityExhausted,
    Policy,
    StartDecision,
    StepDecision,
    StepView,
    default_read_selection,
    register_policy,
)


def lru_tier(position_bytes: np.ndarray, cum_capacity: np.ndarray) -> np.ndarray:
    """Tier of a block whose stack position (bytes from the top, itself included) is given."""
    t = np.searchsorted(cum_capacity, position_bytes, side="left")
    if t.size and int(t.max()) >= N_TIERS:
        raise CapacityExhausted(float(position_bytes.max()), float(cum_capacity[-1]))
    return t.astype(np.int64)


def tally_moves(src: np.ndarray, dst: np.ndarray, size: np.ndarray, out_bytes: np.ndarray, out_count: np.ndarray) -> None:
    """Add moves src -> dst (where they differ) to [4, 4] byte and count matrices."""
    m = src != dst
    if m.any():
        pair = src[m] * 4 + dst[m]
        out_bytes += np.bincount(pair, weights=size[m], minlength=16).reshape(4, 4)
        out_count += np.bincount(pair, minlength=16).reshape(4, 4)


@register_policy
class LRUPolicy(Policy):
    """Least-recently-used across HBM, DRAM, SSD, remote; fetch on access."""

    name = "lru"
    summary = "one recency stack over all tiers; fetch on access, evict the least recently used"

    def params(self) -> dict[str, Any]:
        return {}

    def start(self, ctx) -> StartDecision:  # noqa: ANN001 - ReplayContext
        self.ctx = ctx
        L, NB = ctx.n_layers, ctx.n_blocks
        self.sizes = np.repeat(ctx.block_bytes, NB)  # per flat index
        self.cumcap = np.cumsum(ctx.capacity_bytes)
        self.stack = np.zeros(0, dtype=np.int64)  # flat block indices, most recent first (ghosts included)
        self.pos_of = np.full(L * NB, -1, dtype=np.int64)
        self.sparse = ctx.options.mode == "sparse"
        self.budget = int(ctx.options.block_budget or 0)
        return StartDecision(
            placement=np.full((L, NB), -1, dtype=np.int8),
            dram_reads="fetch",
            verdict="LRU over all tiers, fetch into HBM on access",
        )

    def _accesses(self, view: StepView) -> tuple[np.ndarray, np.ndarray | None]:
        if self.sparse and view.decode:
            mask = default_read_selection(view, self.budget) | view.new_blocks
            return np.flatnonzero(mask.ravel()), mask & view.visible
        return np.flatnonzero(view.visible.ravel()), None

    def decide(self, view: StepView) -> StepDecision:
        acc, read_mask = self._accesses(view)
        st = self.stack
        pos_pre = np.cumsum(self.sizes[st])  # inclusive position of each stack entry before the step
        ap = self.pos_of[acc]
        old = ap >= 0
        if old.sum() > 1 and not (np.diff(ap[old]) < 0).all():
            return self._slow_step(view, acc, read_mask)
        size_acc = self.sizes[acc]
        before_acc = np.cumsum(size_acc) - size_acc  # bytes accessed earlier in this step
        top = lru_tier(size_acc, self.cumcap)  # where an access puts its block (HBM unless it is too small)
        end_pos = np.cumsum(size_acc[::-1])[::-1]  # after the step: accessed blocks above, in reverse order
        end_acc = lru_tier(end_pos, self.cumcap)
        mb, mc = np.zeros((4, 4)), np.zeros((4, 4))
        if old.any():
            a = lru_tier(pos_pre[ap[old]], self.cumcap)
            r = lru_tier(before_acc[old] + pos_pre[ap[old]], self.cumcap)
            so = size_acc[old]
            tally_moves(a, r, so, mb, mc)  # pushed down before the access
            tally_moves(r, top[old], so, mb, mc)  # fetched at the access
        tally_moves(top, end_acc, size_acc, mb, mc)  # pushed down after it
        keep = np.ones(st.size, dtype=bool)
        keep[ap[old]] = False
        rest = st[keep]
        alive_flat = view.alive.ravel()
        rest_alive = alive_flat[rest]
        if rest.size:
            rest_end = lru_tier(size_acc.sum() + np.cumsum(self.sizes[rest]), self.cumcap)
            rest_pre = lru_tier(pos_pre[keep], self.cumcap)
            ra = rest_alive
            tally_moves(rest_pre[ra], rest_end[ra], self.sizes[rest][ra], mb, mc)
            last_alive = int(np.flatnonzero(rest_alive)[-1]) + 1 if rest_alive.any() else 0
            rest = rest[:last_alive]
        P = np.full(view.alive.shape, -1, dtype=np.int8)
        Pf = P.ravel()
        Pf[acc] = end_acc
        if rest.size:
            alive_rest = alive_flat[rest]
            Pf[rest[alive_rest]] = rest_end[: rest.size][alive_rest]
        read_tier = P.copy()
        read_tier.ravel()[acc] = top
        self._set_stack(np.concatenate([acc[::-1], rest]))
        return StepDecision(placement=P, read_tier=read_tier, read_mask=read_mask, moves_bytes=mb, moves_count=mc)

    def _set_stack(self, stack: np.ndarray) -> None:
        self.pos_of[self.stack] = -1
        self.stack = stack
        self.pos_of[stack] = np.arange(stack.size)

    def _slow_step(self, view: StepView, acc: np.ndarray, read_mask: np.ndarray | None) -> StepDecision:
        from llamatier.reference import lru_step_reference

        stack, P, read_tier, mb, mc = lru_step_reference(
            list(self.stack.tolist()), acc.tolist(), view.alive, self.sizes, self.cumcap
        )
        self._set_stack(np.asarray(stack, dtype=np.int64))
        return StepDecision(placement=P, read_tier=read_tier, read_mask=read_mask, moves_bytes=mb, moves_count=mc)
