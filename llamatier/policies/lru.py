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
:func:`llamatier.policies.lru_reference.lru_step_reference`, one access at a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
from llamatier.policies.lru_reference import lru_step_reference

if TYPE_CHECKING:
    from llamatier.replay.context import ReplayContext


def lru_slots(capacity_bytes: np.ndarray, block_bytes: np.ndarray) -> np.ndarray:
    """Cumulative block slots per tier (int64 [4]): floor(capacity / largest block)."""
    slot = float(np.max(block_bytes))
    slots = np.floor(np.asarray(capacity_bytes, dtype=np.float64) / slot)
    return np.cumsum(np.minimum(slots, 2.0**60)).astype(np.int64)


def lru_tier(position: np.ndarray, cum_slots: np.ndarray) -> np.ndarray:
    """Tier (int8) of blocks at 1-based stack positions; positions past the last tier are the caller's check."""
    t = (position > cum_slots[0]).astype(np.int8)
    t += position > cum_slots[1]
    t += position > cum_slots[2]
    return t


def tally_moves(src: np.ndarray, dst: np.ndarray, size: np.ndarray | float, out_bytes: np.ndarray, out_count: np.ndarray) -> None:
    """Add moves src -> dst to [4, 4] byte and count matrices (the diagonal, no move, is the caller's to clear)."""
    pair = src * np.int8(4) + dst
    cnt = np.bincount(pair, minlength=16).astype(np.float64)
    out_count += cnt.reshape(4, 4)
    if isinstance(size, float):
        out_bytes += (cnt * size).reshape(4, 4)
    else:
        out_bytes += np.bincount(pair, weights=size, minlength=16).reshape(4, 4)


@register_policy
class LRUPolicy(Policy):
    """Least-recently-used across HBM, DRAM, SSD, remote; fetch on access."""

    name = "lru"
    summary = "one recency stack over all tiers; fetch on access, evict the least recently used"

    def params(self) -> dict[str, Any]:
        return {}

    def wants_mass(self) -> bool:
        return False  # recency only

    def start(self, ctx: ReplayContext) -> StartDecision:
        self.ctx = ctx
        L, NB = ctx.n_layers, ctx.n_blocks
        self.sizes = np.repeat(ctx.block_bytes, NB)  # per flat index
        self.uniform = bool((ctx.block_bytes == ctx.block_bytes[0]).all())
        self._steady_key: tuple | None = None
        self._last_n = -1
        self.size0 = float(ctx.block_bytes[0])
        self.cumslots = lru_slots(ctx.capacity_bytes, ctx.block_bytes)
        self.stack = np.zeros(0, dtype=np.int64)  # flat block indices, most recent first (ghosts included)
        self.pos_of = np.full(L * NB, -1, dtype=np.int64)
        self.n_blocks = NB
        self.block_bytes = np.asarray(ctx.block_bytes, dtype=np.float64)
        # while the stack is exactly the last step's visible blocks, most recent first, it is kept as
        # those ranges (first block per layer, one past the last) instead of in stack/pos_of
        self._ranges: tuple[np.ndarray, int] | None = (np.zeros(L, dtype=np.int64), 0)
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

    def _steady(self, view: StepView) -> StepDecision | None:
        """The step reads exactly what the last one read, and nothing else is stacked: O(1).

        Then the block at stack index j (from the top) sits at position n - j... every
        block is pushed to position n before its access and returns to its place after,
        so the placement is unchanged and the moves follow from slot counts alone.
        """
        key = (view.hi_block, view.lo_visible.tobytes())
        if not (self.uniform and self._steady_key == key and view.decode and not self.sparse):
            self._steady_key = key
            return None
        if not (self._stack_size() == self._last_n and not view.new_blocks.any()):
            return None
        n, cs = self._last_n, self.cumslots
        bounds = np.concatenate([[0], np.minimum(cs, n)])
        per_tier = np.diff(bounds).astype(np.float64)  # blocks per tier, by position 1..n
        top = int(lru_tier(np.ones(1), cs)[0])
        r = int(lru_tier(np.array([n]), cs)[0])
        mc = np.zeros((4, 4))
        mc[:, r] += per_tier  # pushed down to position n before the access
        mc[r, top] += n  # fetched at the access
        mc[top, :] += per_tier  # back to its place after
        np.fill_diagonal(mc, 0.0)
        return StepDecision(placement=None, read_tier=top, moves_bytes=mc * self.size0, moves_count=mc)

    def decide(self, view: StepView) -> StepDecision:
        fast = self._steady(view)
        if fast is not None:
            return fast
        if self._ranges is not None and not (self.sparse and view.decode):
            fast = self._in_order(view)
            if fast is not None:
                return fast
        self._materialize()
        acc, read_mask = self._accesses(view)
        st = self.stack
        cs = self.cumslots
        ap = self.pos_of[acc]  # 0-based stack index before the step, -1: first touch
        old = ap >= 0
        ap_old = ap[old]
        if ap_old.size > 1 and not (ap_old[1:] < ap_old[:-1]).all():
            return self._slow_step(view, acc, read_mask)
        n = acc.size
        keep = np.ones(st.size, dtype=bool)
        keep[ap_old] = False
        rest_idx = np.flatnonzero(keep)
        if n + rest_idx.size > cs[3]:
            raise CapacityExhausted(float(n + rest_idx.size), float(cs[3]))
        sizes = self.size0 if self.uniform else self.sizes[acc]
        top = lru_tier(np.ones(1), cs)[0]  # an access puts its block on top (HBM unless HBM has no slot)
        end_acc = lru_tier(np.arange(n, 0, -1), cs)  # after the step: reverse access order
        mb, mc = np.zeros((4, 4)), np.zeros((4, 4))
        if ap_old.size:
            # with accesses in stack order, nothing accessed earlier this step was above the block,
            # so at its access it sits (accesses so far) below its place before the step
            a = lru_tier(ap_old + 1, cs)
            r = lru_tier(np.flatnonzero(old) + ap_old + 1, cs)
            so = sizes if self.uniform else sizes[old]
            tally_moves(a, r, so, mb, mc)  # pushed down before the access
            tally_moves(r, np.full(r.size, top, dtype=np.int8), so, mb, mc)  # fetched at the access
        tally_moves(np.full(n, top, dtype=np.int8), end_acc, sizes, mb, mc)  # pushed down after it
        P = np.full(view.alive.shape, -1, dtype=np.int8)
        Pf = P.ravel()
        Pf[acc] = end_acc
        rest = st[rest_idx]
        if rest.size:
            ra = view.alive.ravel()[rest]
            if ra.any():
                rest_end = lru_tier(n + np.arange(1, rest.size + 1), cs)
                rest_pre = lru_tier(rest_idx + 1, cs)
                rs = self.size0 if self.uniform else self.sizes[rest][ra]
                tally_moves(rest_pre[ra], rest_end[ra], rs, mb, mc)
                Pf[rest[ra]] = rest_end[ra]
                rest = rest[: int(np.flatnonzero(ra)[-1]) + 1]  # ghosts below every stored block leave the stack
            else:
                rest = rest[:0]
        np.fill_diagonal(mb, 0.0)
        np.fill_diagonal(mc, 0.0)
        self._last_n = n if rest.size == 0 else -1
        if rest.size == 0 and read_mask is None:  # the stack is this step's visible blocks: keep it as ranges
            self.pos_of[self.stack] = -1
            self._ranges = (view.lo_visible.copy(), view.hi_block)
        else:
            self._set_stack(np.concatenate([acc[::-1], rest]))
        return StepDecision(placement=P, read_tier=int(top), read_mask=read_mask, moves_bytes=mb, moves_count=mc)

    def _set_stack(self, stack: np.ndarray) -> None:
        """Hold the stack as flat indices (``pos_of`` is -1 everywhere while it is held as ranges)."""
        if self._ranges is None:
            self.pos_of[self.stack] = -1
        self._ranges = None
        self.stack = stack
        self.pos_of[stack] = np.arange(stack.size)

    def _stack_size(self) -> int:
        if self._ranges is None:
            return int(self.stack.size)
        lo, hi = self._ranges
        return int(np.maximum(hi - lo, 0).sum())

    def _materialize(self) -> None:
        """Write the stack kept as ranges out as flat indices (for the general step)."""
        if self._ranges is None:
            return
        lo, hi = self._ranges
        NB = self.n_blocks
        parts = [layer * NB + np.arange(lo[layer], hi) for layer in range(lo.size) if hi > lo[layer]]
        self._ranges = None
        self.stack = np.concatenate(parts)[::-1].copy() if parts else np.zeros(0, dtype=np.int64)
        self.pos_of[self.stack] = np.arange(self.stack.size)  # pos_of was -1 everywhere

    def _in_order(self, view: StepView) -> StepDecision | None:
        """A step that reads every visible block while the stack holds exactly the last step's
        visible blocks: positions are arithmetic, so moves and placement follow per layer, O(layers).

        Before the step, old block b of layer l sits at position m - off0[l] - (b - lo0[l])
        (m blocks stacked, the last read on top); when the step reaches it, the blocks read
        before it this step are on top and those above it are still unread, so it sits at a
        position that is the same for the whole layer. After the step the i-th access of
        the step is at position n - i. Blocks that left the window sink as ghosts, and
        leave the stack since nothing alive is below them; if one is still stored (``--swa-full``),
        the general step handles it.
        """
        lo0, hi0 = self._ranges
        lo, hi = view.lo_visible, view.hi_block
        len0 = np.maximum(hi0 - lo0, 0)
        len1 = np.maximum(hi - lo, 0)
        gone = np.maximum(np.minimum(lo, hi0) - lo0, 0)  # left the window: no longer read
        if (gone > 0).any() and (np.minimum(lo, hi0) > view.lo_alive)[gone > 0].any():
            return None  # a block left the window but is still stored
        off0 = np.cumsum(len0) - len0
        off1 = np.cumsum(len1) - len1
        m, n = int(len0.sum()), int(len1.sum())
        cs = self.cumslots
        if n + int(gone.sum()) > cs[3]:
            raise CapacityExhausted(float(n + gone.sum()), float(cs[3]))
        n_old = np.maximum(hi0 - np.maximum(lo, lo0), 0)
        n_old = np.where(len0 > 0, np.minimum(n_old, len1), 0)
        top = int(lru_tier(np.ones(1), cs)[0])
        edges = np.concatenate([[0], cs])  # tier t holds positions edges[t] + 1 .. edges[t + 1]

        def per_tier(first: np.ndarray, last: np.ndarray) -> np.ndarray:
            """int64 [L, 4]: positions first..last (inclusive) of each layer that lie in each tier."""
            a = np.maximum(first[:, None], edges[None, :-1] + 1)
            b = np.minimum(last[:, None], edges[None, 1:])
            return np.maximum(b - a + 1, 0)

        size = self.block_bytes
        mc = np.zeros((4, 4))
        mb = np.zeros((4, 4))
        # old blocks: pushed down from where they were to where the step finds them, then fetched up
        before_first = m - off0 - (hi0 - 1 - lo0)  # position of the layer's last old block (b = hi0 - 1)
        before_last = m - off0 - (np.maximum(lo, lo0) - lo0)
        cnt = np.where(n_old[:, None] > 0, per_tier(before_first, before_last), 0)
        r = lru_tier(m + off1 - off0 - (lo - lo0), cs).astype(np.int64)
        for t in range(N_TIERS):
            np.add.at(mc[t], r, cnt[:, t])
            np.add.at(mb[t], r, cnt[:, t] * size)
        np.add.at(mc[:, top], r, n_old)
        np.add.at(mb[:, top], r, n_old * size)
        # every access: from the top to its place after the step
        after = per_tier(n - off1 - len1 + 1, n - off1)
        mc[top] += after.sum(axis=0)
        mb[top] += (after * size[:, None]).sum(axis=0)
        np.fill_diagonal(mb, 0.0)
        np.fill_diagonal(mc, 0.0)
        if self.uniform:
            mb = mc * self.size0
        P = np.full(view.alive.shape, -1, dtype=np.int8)
        base = n - off1 + lo  # block b of layer l ends at position base[l] - b
        for layer in np.flatnonzero(len1):
            for t in range(N_TIERS):
                b0 = max(int(lo[layer]), int(base[layer] - edges[t + 1]))
                b1 = min(hi, int(base[layer] - edges[t]))
                if b1 > b0:
                    P[layer, b0:b1] = t
        self._ranges = (lo.copy(), hi)
        self._last_n = n
        return StepDecision(placement=P, read_tier=top, moves_bytes=mb, moves_count=mc)

    def _slow_step(self, view: StepView, acc: np.ndarray, read_mask: np.ndarray | None) -> StepDecision:
        stack, P, read_tier, mb, mc = lru_step_reference(
            list(self.stack.tolist()), acc.tolist(), view.alive, self.sizes, self.cumslots
        )
        self._set_stack(np.asarray(stack, dtype=np.int64))
        self._last_n = -1
        return StepDecision(placement=P, read_tier=read_tier, read_mask=read_mask, moves_bytes=mb, moves_count=mc)
