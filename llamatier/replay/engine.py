"""The vectorised replay engine: one numpy pass per step over [layers, blocks] arrays.

It asks the policy for a placement, then counts with whole-array operations
(never a Python loop per block): bytes read per layer and tier, new KV written,
blocks allocated, freed and migrated, occupancy per tier. A policy with a fixed
placement (static) takes a faster path that counts all steps at once through
prefix sums over the placement. The counts go to :mod:`llamatier.cost`.

Memory is O(layers x blocks) of state plus the [steps, layers, 4] counts: the
trace's attention mass is read one step at a time, and only when something
needs it (sparse mode's dropped mass, a policy that learns from it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from llamatier.cost import StepTraffic
from llamatier.errors import LlamatierError
from llamatier.policies.base import (
    Policy,
    StartDecision,
    StepDecision,
    StepView,
    default_read_selection,
)
from llamatier.replay.context import ReplayContext
from llamatier.tiers import N_TIERS, N_TIMINGS, TIER_NAMES, MoveTiming
from llamatier.units import format_bytes

_CAPACITY_SLACK = 1e-9  # relative tolerance on budget checks (float sums of byte counts)


@dataclass(frozen=True)
class EngineRecord:
    """Raw per-step counts of one replay (input to the cost model and the result)."""

    start: StartDecision
    traffic: StepTraffic
    occupancy_bytes: np.ndarray  # [S, 4] after each step: the reservation if the policy made one, else stored bytes
    stored_bytes: np.ndarray  # [S, 4] bytes of stored (alive) blocks after each step
    alloc_bytes: np.ndarray  # [S, 4] blocks that appeared this step, by the tier they were written to
    freed_bytes: np.ndarray  # [S, 4] blocks dropped this step (sliding window), by tier
    dropped_mass: np.ndarray  # [S, L] attention mass on visible blocks the step did not read
    visible_blocks: np.ndarray  # [S] visible (layer, block) pairs
    decision_s: float  # policy time (perf_counter around start/decide/observe)
    engine: str  # "vectorised" or "vectorised-fixed"


def _check_placement(ctx: ReplayContext, policy: Policy, placement: np.ndarray, alive: np.ndarray, step: int) -> None:
    if placement.shape != (ctx.n_layers, ctx.n_blocks):
        raise LlamatierError(
            f"policy {policy.name!r} returned a placement of shape {placement.shape}, expected "
            f"{(ctx.n_layers, ctx.n_blocks)} (layers, blocks)"
        )
    t = np.where(alive, placement, 0)
    if (t < 0).any() or (t >= N_TIERS).any():
        raise LlamatierError(
            f"policy {policy.name!r} left a stored block without a tier (or outside 0..3) at step {step}"
        )


def capacity_of(ctx: ReplayContext, start: StartDecision) -> np.ndarray:
    """KV budget per tier for this replay (static's layer split frees the host layers' weight bytes)."""
    bonus = start.capacity_bonus_bytes
    return ctx.capacity_bytes if bonus is None else ctx.capacity_bytes + np.asarray(bonus, dtype=np.float64)


def _check_capacity(caps: np.ndarray, policy: Policy, occ: np.ndarray, step: int) -> None:
    over = occ > caps * (1 + _CAPACITY_SLACK) + 1.0
    if over.any():
        t = int(np.flatnonzero(over)[0])
        raise LlamatierError(
            f"policy {policy.name!r} put {format_bytes(occ[t])} of KV in {TIER_NAMES[t]} at step {step}, over "
            f"its budget {format_bytes(caps[t])}: a bug in the policy"
        )


def _write_counts(ctx: ReplayContext, s: int, tiers_of: np.ndarray | int, wb: np.ndarray, wn: np.ndarray) -> None:
    """Add step s's new K/V (positions pos0..ctx-1) to wb/wn [L, 4], by the tier of each written block.

    ``tiers_of``: the tier of each (layer, block), or one tier for every block. Byte counts are
    whole numbers, so adding them all at once gives the same floats as block by block.
    """
    B = ctx.block_tokens
    p0, p1 = int(ctx.pos0[s]), int(ctx.ctx_tokens[s])
    if p1 <= p0:
        return
    lay = np.arange(ctx.n_layers)
    b0, b1 = p0 // B, (p1 - 1) // B + 1
    blocks = np.arange(b0, b1)
    tok = np.minimum(p1, (blocks + 1) * B) - np.maximum(p0, blocks * B)  # tokens written into each block
    if isinstance(tiers_of, (int, np.integer)):
        wb[:, int(tiers_of)] += int(tok.sum()) * ctx.bytes_per_token
        wn[:, int(tiers_of)] += blocks.size
        return
    t = tiers_of[:, b0:b1].astype(np.int64)
    np.add.at(wb, (lay[:, None], t), tok[None, :] * ctx.bytes_per_token[:, None])
    np.add.at(wn, (lay[:, None], t), 1)


def _edge_corrections(ctx: ReplayContext, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """First/last visible block per layer and the tokens each lacks (partial blocks)."""
    B = ctx.block_tokens
    first = ctx.lo_visible[s]
    last = np.full(ctx.n_layers, ctx.hi_block[s] - 1, dtype=np.int64)
    miss_first = ctx.lo_visible_pos[s] - first * B
    miss_last = np.full(ctx.n_layers, ctx.hi_block[s] * B - ctx.ctx_tokens[s], dtype=np.int64)
    return first, last, miss_first, miss_last


def run_vectorised(ctx: ReplayContext, policy: Policy) -> EngineRecord:
    """Replay every step of ``ctx`` under ``policy`` (fast path for fixed placements)."""
    t0 = time.perf_counter()
    start = policy.start(ctx)
    decision_s = time.perf_counter() - t0
    if not start.runs:
        return _empty_record(ctx, start, decision_s)
    if policy.fixed_placement and ctx.options.mode == "lossless":
        return _run_fixed(ctx, policy, start, decision_s)
    return _run_steps(ctx, policy, start, decision_s)


class _StepCounts:
    """Per-step counts one replay fills in, step by step (all zero to start)."""

    def __init__(self, n_steps: int, n_layers: int) -> None:
        S, L = n_steps, n_layers
        self.read_bytes = np.zeros((S, L, N_TIERS))
        self.read_blocks = np.zeros((S, L, N_TIERS))
        self.read_tokens = np.zeros((S, L))
        self.write_bytes = np.zeros((S, L, N_TIERS))
        self.write_blocks = np.zeros((S, L, N_TIERS))
        self.move_bytes = np.zeros((S, N_TIMINGS, N_TIERS, N_TIERS))
        self.move_count = np.zeros((S, N_TIMINGS, N_TIERS, N_TIERS))
        self.occupancy = np.zeros((S, N_TIERS))
        self.stored = np.zeros((S, N_TIERS))
        self.alloc = np.zeros((S, N_TIERS))
        self.freed = np.zeros((S, N_TIERS))
        self.dropped = np.zeros((S, L))

    def record(
        self, ctx: ReplayContext, start: StartDecision, n_visible: np.ndarray, decision_s: float, engine: str
    ) -> EngineRecord:
        traffic = StepTraffic(
            read_bytes=self.read_bytes, read_blocks=self.read_blocks, read_tokens=self.read_tokens,
            write_bytes=self.write_bytes, write_blocks=self.write_blocks, move_bytes=self.move_bytes,
            move_count=self.move_count, n_tokens=ctx.n_tokens, ctx_tokens=ctx.ctx_tokens,
        )
        return EngineRecord(start, traffic, self.occupancy, self.stored, self.alloc, self.freed, self.dropped,
                            n_visible, decision_s, engine)


def _empty_record(ctx: ReplayContext, start: StartDecision, decision_s: float) -> EngineRecord:
    return _StepCounts(ctx.n_steps, ctx.n_layers).record(ctx, start, np.zeros(ctx.n_steps), decision_s, "none")


def _tier_counts(tiers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Blocks per (layer, tier) among ``mask`` (float64 [L, 4]): four byte-wide passes, no sorting."""
    out = np.empty((tiers.shape[0], N_TIERS))
    eq = np.empty(tiers.shape, dtype=bool)
    for t in range(N_TIERS):
        np.equal(tiers, t, out=eq)
        eq &= mask
        out[:, t] = eq.view(np.uint8).sum(axis=1, dtype=np.int32)
    return out


class _RangeMask:
    """A bool [L, NB] mask of the blocks ``lo[l] <= b < hi``, updated in place as the ranges move.

    Only the columns whose value can change are recomputed, so a step costs the
    width of what moved, not the whole array.
    """

    def __init__(self, L: int, NB: int) -> None:
        self.mask = np.zeros((L, NB), dtype=bool)
        self.bidx = np.arange(NB)
        self.lo = np.zeros(L, dtype=np.int64)
        self.hi = 0

    def update(self, lo: np.ndarray, hi: int) -> None:
        spans = []
        if not np.array_equal(lo, self.lo):
            spans.append((min(int(self.lo.min()), int(lo.min())), min(int(max(self.lo.max(), lo.max())), max(hi, self.hi))))
        if hi != self.hi:
            spans.append((min(hi, self.hi), max(hi, self.hi)))
        for c0, c1 in spans:
            if c1 > c0:
                b = self.bidx[c0:c1]
                self.mask[:, c0:c1] = (b >= lo[:, None]) & (b < hi)
        self.lo, self.hi = lo.copy(), hi


class _BlockWindow:
    """Which blocks exist, are visible and are new at each step, as masks updated in place.

    ``advance(s, ...)`` moves to step ``s`` (and records the KV its sliding
    window lets go, by the tier it was in); ``finish()`` makes this step the
    previous one. Every stored block lies in columns ``c0 .. hi``.
    """

    def __init__(self, ctx: ReplayContext) -> None:
        L, NB = ctx.n_layers, ctx.n_blocks
        self.ctx = ctx
        self.same_vis = bool(np.array_equal(ctx.lo_visible, ctx.lo_alive))
        self.alive_m = _RangeMask(L, NB)
        self.visible_m = self.alive_m if self.same_vis else _RangeMask(L, NB)
        self.new_m = np.zeros((L, NB), dtype=bool)  # blocks that appear this step, in columns new_c0:new_c1
        self.no_blocks = np.zeros((L, NB), dtype=bool)
        self.no_blocks.flags.writeable = False
        self.new_c0 = self.new_c1 = 0
        self.hi_prev, self.lo_prev = 0, np.zeros(L, dtype=np.int64)

    def advance(self, s: int, placement: np.ndarray, freed: np.ndarray) -> None:
        """Step ``s``'s blocks; ``freed`` [N_TIERS] gets the bytes of blocks that left, by their tier in ``placement``."""
        ctx = self.ctx
        self.hi = hi = int(ctx.hi_block[s])
        self.lo_a, self.lo_v = lo_a, lo_v = ctx.lo_alive[s], ctx.lo_visible[s]
        lo_prev, hi_prev = self.lo_prev, self.hi_prev
        self.lo_moved = not np.array_equal(lo_a, lo_prev)
        self.grew = hi > hi_prev or s == 0
        self.c0 = int(lo_a.min())
        if self.lo_moved:  # blocks that leave (sliding window), by the tier they were in
            g0 = int(lo_prev.min())
            gone = np.arange(g0, int(lo_a.max())) >= lo_prev[:, None]
            gone &= np.arange(g0, int(lo_a.max())) < np.minimum(lo_a, hi_prev)[:, None]
            if gone.any():
                w = np.broadcast_to(ctx.block_bytes[:, None], gone.shape)[gone]
                freed[:] = np.bincount(placement[:, g0 : g0 + gone.shape[1]][gone].astype(np.int64), weights=w,
                                       minlength=N_TIERS)
        self.alive_m.update(lo_a, hi)
        if not self.same_vis:
            self.visible_m.update(lo_v, hi)
        self.alive, self.visible = self.alive_m.mask, self.visible_m.mask
        if self.new_c1 > self.new_c0:
            self.new_m[:, self.new_c0 : self.new_c1] = False
        self.new_c0, self.new_c1 = (hi_prev, hi) if self.grew else (0, 0)
        self.new_m[:, self.new_c0 : self.new_c1] = self.alive[:, self.new_c0 : self.new_c1]
        self.new = self.new_m if self.grew else self.no_blocks

    def alloc_bytes(self, read_tier: np.ndarray | int, out: np.ndarray) -> None:
        """``out`` [N_TIERS]: bytes of this step's new blocks, by the tier they are written to."""
        if not self.grew:
            return
        bb = self.ctx.block_bytes
        nw = self.new[:, self.new_c0 : self.new_c1]
        if isinstance(read_tier, int):
            out[read_tier] = float((nw.sum(axis=1) * bb).sum())
        else:
            w = np.broadcast_to(bb[:, None], nw.shape)[nw]
            out[:] = np.bincount(read_tier[:, self.new_c0 : self.new_c1][nw].astype(np.int64), weights=w,
                                 minlength=N_TIERS)

    def finish(self) -> None:
        self.hi_prev, self.lo_prev = self.hi, self.lo_a


def _run_steps(ctx: ReplayContext, policy: Policy, start: StartDecision, decision_s: float) -> EngineRecord:
    """Step by step: the policy decides, then counts of the step's reads, writes and moves.

    Every stored block lies in columns ``lo_alive.min() .. hi_block``, so counts
    look at those columns only; the masks a policy sees are updated in place.
    """
    S, L, NB, B = ctx.n_steps, ctx.n_layers, ctx.n_blocks, ctx.block_tokens
    bb = ctx.block_bytes
    reserved = np.zeros(N_TIERS) if start.reserved_bytes is None else np.asarray(start.reserved_bytes, dtype=np.float64)
    caps = capacity_of(ctx, start)
    out = _StepCounts(S, L)
    n_visible = (ctx.hi_block[:, None] - ctx.lo_visible).sum(axis=1).astype(np.float64)
    wants_mass = ctx.options.mode == "sparse" or policy.wants_mass()
    masses = ctx.iter_mass() if wants_mass else None

    win = _BlockWindow(ctx)
    P = np.array(start.placement, dtype=np.int8, copy=True)
    st_prev = np.zeros(N_TIERS)
    counts_prev = np.zeros((L, N_TIERS))
    for s in range(S):
        win.advance(s, P, out.freed[s])
        hi, c0 = win.hi, win.c0
        view = StepView(
            step=s, decode=bool(ctx.is_decode[s]), hi_block=hi, lo_alive=win.lo_a, lo_visible=win.lo_v,
            new_lo_block=int(ctx.pos0[s]) // B, alive=win.alive, visible=win.visible, new_blocks=win.new,
            placement=P, occupancy_bytes=st_prev - out.freed[s],
        )

        # -- the policy's decision ----------------------------------------------------------
        t0 = time.perf_counter()
        dec: StepDecision = policy.decide(view)
        decision_s += time.perf_counter() - t0
        P_new = P if dec.placement is None else dec.placement
        if P_new.shape != (L, NB):
            _check_placement(ctx, policy, P_new, win.alive, s)
        if P_new is P and not win.grew and not win.lo_moved:
            counts_alive = counts_prev  # nothing moved, appeared or left: same counts
        else:
            counts_alive = _tier_counts(P_new[:, c0:hi], win.alive[:, c0:hi])
            if (counts_alive.sum(axis=1) != hi - win.lo_a).any():
                _check_placement(ctx, policy, P_new, win.alive, s)
        read_tier = P_new if dec.read_tier is None else dec.read_tier
        if isinstance(read_tier, np.integer):
            read_tier = int(read_tier)  # every access served from one tier

        # -- counts ---------------------------------------------------------------------------
        mass = None
        if wants_mass:
            ms, mass = next(masses)
            if ms != s:
                raise LlamatierError(f"the trace's attention came back for step {ms} at step {s}: re-record the trace")
        _count_reads(ctx, policy, s, view, dec, P_new, read_tier, counts_alive, mass, c0, out)
        _write_counts(ctx, s, read_tier, out.write_bytes[s], out.write_blocks[s])
        win.alloc_bytes(read_tier, out.alloc[s])
        _count_moves(policy, s, dec, P, P_new, win.lo_prev, win.hi_prev, win.lo_a, bb, out)
        st = counts_alive.T @ bb
        occ = st if start.reserved_bytes is None else reserved  # a reservation holds its blocks
        _check_capacity(caps, policy, occ, s)
        out.stored[s], out.occupancy[s] = st, occ

        if wants_mass:
            t0 = time.perf_counter()
            policy.observe(view, mass)
            decision_s += time.perf_counter() - t0
        P, st_prev, counts_prev = P_new, st, counts_alive
        win.finish()

    return out.record(ctx, start, n_visible, decision_s, "vectorised")


def _count_reads(
    ctx: ReplayContext, policy: Policy, s: int, view: StepView, dec: StepDecision, placement: np.ndarray,
    read_tier: np.ndarray | int, counts_alive: np.ndarray, mass: np.ndarray | None, c0: int, out: _StepCounts,
) -> None:
    """Step s's reads per layer and tier (bytes, blocks, tokens) and, in sparse mode, the mass it dropped."""
    L, B, hi = ctx.n_layers, ctx.block_tokens, view.hi_block
    visible, alive = view.visible, view.alive
    one_tier = isinstance(read_tier, int)
    if ctx.options.mode == "sparse" and ctx.is_decode[s]:
        budget = int(ctx.options.block_budget or 0)
        rmask = dec.read_mask if dec.read_mask is not None else default_read_selection(view, budget)
        if (rmask & ~visible).any():
            raise LlamatierError(f"policy {policy.name!r} read blocks that are not visible at step {s}")
        if (rmask.sum(axis=1) > budget).any():
            raise LlamatierError(f"policy {policy.name!r} read more than --block-budget {budget} blocks in a layer")
        out.dropped[s] = np.where(visible & ~rmask, mass, 0.0).sum(axis=1)  # whole rows: the same float sums
    else:
        rmask = visible
    counts = np.zeros((L, N_TIERS))
    if rmask is alive and read_tier is placement:
        counts = counts_alive.copy()
    elif one_tier and rmask is visible:
        counts[:, read_tier] = hi - view.lo_visible
    elif one_tier:
        counts[:, read_tier] = rmask[:, c0:hi].sum(axis=1)
    else:
        counts = _tier_counts(read_tier[:, c0:hi], rmask[:, c0:hi])
    rb = counts * ctx.block_bytes[:, None]
    tok = counts.sum(axis=1) * B
    lay = np.arange(L)
    bpt = ctx.bytes_per_token.astype(np.float64)
    first, last, miss_f, miss_l = _edge_corrections(ctx, s)
    for blk, miss in ((first, miss_f), (last, miss_l)):
        hit = rmask[lay, blk] & (miss > 0)
        if hit.any():
            t = np.full(L, read_tier) if one_tier else read_tier[lay, blk].astype(np.int64)
            corr = np.where(hit, miss, 0)
            np.subtract.at(rb, (lay, t), corr * bpt)
            tok -= corr
    out.read_bytes[s], out.read_blocks[s], out.read_tokens[s] = rb, counts, tok


def _count_moves(
    policy: Policy, s: int, dec: StepDecision, placement: np.ndarray, placement_new: np.ndarray,
    lo_before: np.ndarray, hi_before: int, lo: np.ndarray, block_bytes: np.ndarray, out: _StepCounts,
) -> None:
    """Step s's moves between tiers: as the policy reported them, else from its placement change."""
    try:
        k = MoveTiming.parse(dec.move_timing)
    except ValueError:
        raise LlamatierError(f"policy {policy.name!r} gave move timing {dec.move_timing!r}: use demand, prefetch or free") from None
    if dec.moves_bytes is not None:
        out.move_bytes[s, k] = dec.moves_bytes
        out.move_count[s, k] = dec.moves_count if dec.moves_count is not None else 0.0
    elif placement_new is not placement:
        k0 = int(lo.min())  # stored before and after the step: columns max(lo, lo_before) .. hi_before
        if hi_before <= k0:
            return
        changed = placement_new[:, k0:hi_before] != placement[:, k0:hi_before]
        changed &= np.arange(k0, hi_before) >= np.maximum(lo, lo_before)[:, None]
        if changed.any():
            pair = placement[:, k0:hi_before][changed].astype(np.int64) * N_TIERS
            pair += placement_new[:, k0:hi_before][changed].astype(np.int64)
            w = np.broadcast_to(block_bytes[:, None], changed.shape)[changed]
            out.move_bytes[s, k] = np.bincount(pair, weights=w, minlength=N_TIERS**2).reshape(N_TIERS, N_TIERS)
            out.move_count[s, k] = np.bincount(pair, minlength=N_TIERS**2).reshape(N_TIERS, N_TIERS)


def _run_fixed(ctx: ReplayContext, policy: Policy, start: StartDecision, decision_s: float) -> EngineRecord:
    """All steps at once for a placement that never changes: prefix sums over blocks."""
    S, L, NB, B = ctx.n_steps, ctx.n_layers, ctx.n_blocks, ctx.block_tokens
    P = np.asarray(start.placement, dtype=np.int8)
    ever_alive = np.arange(NB)[None, :] < int(ctx.hi_block.max())
    _check_placement(ctx, policy, P, np.broadcast_to(ever_alive, (L, NB)), 0)
    cum = np.zeros((4, L, NB + 1), dtype=np.int32)  # blocks of each tier before each column
    for t in range(4):
        np.cumsum(P == t, axis=1, dtype=np.int32, out=cum[t, :, 1:])
    lay = np.arange(L)[None, :]
    hi = np.broadcast_to(ctx.hi_block[:, None], (S, L))
    lo_v, lo_a = ctx.lo_visible, ctx.lo_alive

    def range_sum(c: np.ndarray, lo: np.ndarray, up: np.ndarray) -> np.ndarray:  # -> float64 [S, L, 4]
        return np.moveaxis(c[:, lay, up] - c[:, lay, lo], 0, -1).astype(np.float64)

    counts = range_sum(cum, lo_v, hi)
    bpt = ctx.bytes_per_token.astype(np.float64)
    read_bytes = counts * ctx.block_bytes[None, :, None]
    read_tokens = counts.sum(axis=2) * B
    # partial first (window start) and last blocks
    miss_f = ctx.lo_visible_pos - lo_v * B
    miss_l = hi * B - ctx.ctx_tokens[:, None]
    s_idx = np.broadcast_to(np.arange(S)[:, None], (S, L))
    l_idx = np.broadcast_to(np.arange(L)[None, :], (S, L))
    for blk, miss in ((lo_v, miss_f), (hi - 1, miss_l)):
        t = P[l_idx, blk].astype(np.int64)
        np.subtract.at(read_bytes, (s_idx, l_idx, t), miss * bpt[None, :])
        read_tokens -= miss
    read_blocks = counts

    write_bytes = np.zeros((S, L, 4))
    write_blocks = np.zeros((S, L, 4))
    for s in range(S):
        _write_counts(ctx, s, P, write_bytes[s], write_blocks[s])

    bb = ctx.block_bytes[None, :, None]  # whole numbers of bytes: the sums below are exact

    def bytes_sum(lo: np.ndarray, up: np.ndarray) -> np.ndarray:  # -> [S, 4]
        return (range_sum(cum, lo, up) * bb).sum(axis=1)

    stored = bytes_sum(lo_a, hi)
    hi_prev = np.concatenate([np.zeros((1, L), dtype=np.int64), hi[:-1]])
    lo_a_prev = np.concatenate([np.zeros((1, L), dtype=np.int64), lo_a[:-1]])
    alloc = bytes_sum(np.maximum(hi_prev, lo_a), np.maximum(hi_prev, hi))
    freed = bytes_sum(lo_a_prev, np.maximum(lo_a_prev, np.minimum(lo_a, hi_prev)))
    reserved = np.zeros(4) if start.reserved_bytes is None else np.asarray(start.reserved_bytes, dtype=np.float64)
    occupancy = stored if start.reserved_bytes is None else np.broadcast_to(reserved, stored.shape).copy()
    caps = capacity_of(ctx, start)
    for s in np.flatnonzero((occupancy > caps * (1 + _CAPACITY_SLACK) + 1.0).any(axis=1))[:1]:
        _check_capacity(caps, policy, occupancy[s], int(s))
    n_visible = (hi - lo_v).sum(axis=1).astype(np.float64)
    traffic = StepTraffic(
        read_bytes=read_bytes, read_blocks=read_blocks, read_tokens=read_tokens, write_bytes=write_bytes,
        write_blocks=write_blocks, move_bytes=np.zeros((S, 3, 4, 4)), move_count=np.zeros((S, 3, 4, 4)),
        n_tokens=ctx.n_tokens, ctx_tokens=ctx.ctx_tokens,
    )
    return EngineRecord(
        start, traffic, occupancy, stored, alloc, freed, np.zeros((S, L)), n_visible, decision_s, "vectorised-fixed"
    )
