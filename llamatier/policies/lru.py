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

Capacity is counted in slots of one block: a tier of C bytes holds
floor(C / block_bytes) blocks (when layers' blocks differ in size, every slot
is sized for the largest, so no tier ever overflows). When a step's accesses
are not in stack order (sparse mode), the step runs through
:func:`llamatier.reference.lru_step_reference`, one access at a time.
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


def lru_slots(capacity_bytes: np.ndarray, block_bytes: np.ndarray) -> np.ndarray:
    """Cumulative block slots per tier (float64 [4]): floor(capacity / largest block)."""
    slot = float(np.max(block_bytes))
    return np.cumsum(np.floor(np.asarray(capacity_bytes, dtype=np.float64) / slot))


def lru_tier(position: np.ndarray, cum_slots: np.ndarray) -> np.ndarray:
    """Tier of a block at a 1-based stack position (blocks from the top, itself included)."""
    t = np.searchsorted(cum_slots, position, side="left")
    if t.size and int(t.max()) >= N_TIERS:
        raise CapacityExhausted(float(position.max()), float(cum_slots[-1]))
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
        self.cumslots = lru_slots(ctx.capacity_bytes, ctx.block_bytes)
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
            sel = default_read_selection(view, self.budget)
            return np.flatnonzero((sel | view.new_blocks).ravel()), sel
        return np.flatnonzero(view.visible.ravel()), None

    def decide(self, view: StepView) -> StepDecision:
        acc, read_mask = self._accesses(view)
        st = self.stack
        cs = self.cumslots
        ap = self.pos_of[acc]  # 0-based stack index before the step, -1: first touch
        old = ap >= 0
        if old.sum() > 1 and not (np.diff(ap[old]) < 0).all():
            return self._slow_step(view, acc, read_mask)
        n = acc.size
        size_acc = self.sizes[acc]
        top = lru_tier(np.ones(n), cs)  # an access puts its block on top (HBM unless HBM has no slot)
        end_acc = lru_tier(np.arange(n, 0, -1, dtype=np.float64), cs)  # after the step: reverse access order
        mb, mc = np.zeros((4, 4)), np.zeros((4, 4))
        if old.any():
            # with accesses in stack order, nothing accessed earlier this step was above the block,
            # so at its access it sits (accesses so far) below its place before the step
            a = lru_tier(ap[old] + 1.0, cs)
            r = lru_tier(np.flatnonzero(old) + ap[old] + 1.0, cs)
            so = size_acc[old]
            tally_moves(a, r, so, mb, mc)  # pushed down before the access
            tally_moves(r, top[old], so, mb, mc)  # fetched at the access
        tally_moves(top, end_acc, size_acc, mb, mc)  # pushed down after it
        keep = np.ones(st.size, dtype=bool)
        keep[ap[old]] = False
        rest_idx = np.flatnonzero(keep)
        rest = st[rest_idx]
        alive_flat = view.alive.ravel()
        P = np.full(view.alive.shape, -1, dtype=np.int8)
        Pf = P.ravel()
        Pf[acc] = end_acc
        if rest.size:
            ra = alive_flat[rest]
            rest_end = lru_tier(n + np.arange(1, rest.size + 1, dtype=np.float64), cs)
            rest_pre = lru_tier(rest_idx + 1.0, cs)
            tally_moves(rest_pre[ra], rest_end[ra], self.sizes[rest][ra], mb, mc)
            Pf[rest[ra]] = rest_end[ra]
            last_alive = int(np.flatnonzero(ra)[-1]) + 1 if ra.any() else 0
            rest = rest[:last_alive]  # ghosts below every stored block leave the stack
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
            list(self.stack.tolist()), acc.tolist(), view.alive, self.sizes, self.cumslots
        )
        self._set_stack(np.asarray(stack, dtype=np.int64))
        return StepDecision(placement=P, read_tier=read_tier, read_mask=read_mask, moves_bytes=mb, moves_count=mc)
