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

import tempfile
from typing import TYPE_CHECKING, Any

import numpy as np

from llamatier.errors import LlamatierError
from llamatier.policies.base import (
    CapacityExhausted,
    Policy,
    StartDecision,
    StepDecision,
    StepView,
    fill_by_priority,
    register_policy,
)

if TYPE_CHECKING:
    from llamatier.replay.context import ReplayContext


def step_reads(ctx: ReplayContext, s: int, visible: np.ndarray, mass: np.ndarray | None) -> np.ndarray:
    """bool [L, NB]: blocks the oracle reads at step ``s`` (sparse decode steps: the ``block_budget``
    visible blocks with the most mass in that very step)."""
    if ctx.options.mode != "sparse" or not ctx.is_decode[s]:
        return visible
    k = min(int(ctx.options.block_budget), ctx.n_blocks)
    mv = np.where(visible, mass, -np.inf)
    top = np.argpartition(-mv, k - 1, axis=1)[:, :k]
    sel = np.zeros(visible.shape, dtype=bool)
    np.put_along_axis(sel, top, True, axis=1)
    return sel & visible


def future_reads_table(gamma: float, n_max: int) -> np.ndarray:
    """float32 [n_max + 1]: the priority of a block read now and in each of the next n steps.

    The same float32 operations as the backward recurrence below, done once per
    count n: a visible block stays visible for one unbroken run of steps, so in
    lossless mode its priority depends on nothing else.
    """
    g = np.float32(gamma)
    future = np.zeros(n_max + 1, dtype=np.float32)  # value[s + 1] after n reads in a row
    for n in range(1, n_max + 1):
        future[n] = np.float32(future[n - 1] * g) + np.float32(1.0)
    k = 1.0 / (1.0 - gamma) + 1.0
    return (k + (gamma * future).astype(np.float64)).astype(np.float32)


def last_visible_step(ctx: ReplayContext) -> np.ndarray:
    """int64 [L, NB]: the last step that sees each block (first visible blocks never move back)."""
    b = np.arange(ctx.n_blocks)
    return np.stack([np.searchsorted(ctx.lo_visible[:, layer], b, side="right") - 1 for layer in range(ctx.n_layers)])


class _SpilledPriorities:
    """The sparse-mode oracle's future knowledge: a backward pass over the trace's mass runs the
    recurrence and writes each step's priorities (stored blocks only) and reads to a temporary
    file; the replay reads them back one step at a time."""

    def __init__(self, ctx: ReplayContext, gamma: float) -> None:
        L, NB = ctx.n_layers, ctx.n_blocks
        self.shape = (L, NB)
        self.file = tempfile.TemporaryFile(prefix="llamatier-oracle-")
        self.where: dict[int, tuple[int, int, int, int]] = {}  # step -> (offset, first column, width, top width)
        k = 1.0 / (1.0 - gamma) + 1.0
        future = np.zeros((L, NB), dtype=np.float32)
        b = np.arange(NB)
        try:
            for s, mass in ctx.iter_mass(reverse=True):
                hi = int(ctx.hi_block[s])
                visible = (b[None, :] >= ctx.lo_visible[s][:, None]) & (b[None, :] < hi)
                reads = step_reads(ctx, s, visible, mass)
                priority = (k * reads + gamma * future).astype(np.float32)
                c0 = int(ctx.lo_alive[s].min())
                off = self.file.tell()
                self.file.write(np.ascontiguousarray(priority[:, c0:hi]).tobytes())
                top = np.ascontiguousarray(reads[:, c0:hi]) if reads is not visible else None
                if top is not None:
                    self.file.write(np.packbits(top, axis=1).tobytes())
                self.where[s] = (off, c0, hi - c0, -1 if top is None else top.shape[1])
                future *= gamma
                future += reads
        except OSError as exc:
            self.file.close()
            raise LlamatierError(f"the oracle could not write its future knowledge to a temporary file: {exc}; "
                                 "free disk space in the temporary directory (TMPDIR)") from None

    def step(self, s: int, alive: np.ndarray, visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        off, c0, w, top_w = self.where[s]
        L, NB = self.shape
        self.file.seek(off)
        priority = np.zeros((L, NB), dtype=np.float32)
        priority[:, c0 : c0 + w] = np.frombuffer(self.file.read(L * w * 4), dtype=np.float32).reshape(L, w)
        if top_w < 0:
            return priority, visible
        packed = np.frombuffer(self.file.read(L * ((w + 7) // 8)), dtype=np.uint8).reshape(L, -1)
        reads = np.zeros((L, NB), dtype=bool)
        reads[:, c0 : c0 + w] = np.unpackbits(packed, axis=1, count=w).astype(bool)
        return priority, reads

    def close(self) -> None:
        self.file.close()


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

    def wants_mass(self) -> bool:
        return False  # the future comes from the backward pass at start

    def start(self, ctx: ReplayContext) -> StartDecision:
        self.caps = np.asarray(ctx.capacity_bytes, dtype=np.float64)
        self.block_bytes = np.asarray(ctx.block_bytes, dtype=np.float64)
        self.sparse = ctx.options.mode == "sparse"
        self.n_steps = ctx.n_steps
        if self.sparse:
            self.spilled = _SpilledPriorities(ctx, self.gamma)
        else:
            # lossless: a block is visible over one run of steps, so its priority follows from the
            # number of steps left in that run (same float32 values as the backward recurrence)
            self.last_visible = last_visible_step(ctx).astype(np.int32)
            self.table = future_reads_table(self.gamma, ctx.n_steps)
            # fill_by_priority's order: priority rounded to 2**-20, descending. Rank the distinct
            # rounded values once (a block not visible has priority 0, the last rank).
            q = np.round(self.table.astype(np.float64) * 2.0**20).astype(np.int64)
            levels = np.unique(np.concatenate([q, [0]]))[::-1]
            self.rank_of_left = np.searchsorted(-levels, -q).astype(np.int16)
            self.rank_hidden = int(np.searchsorted(-levels, 0))
            self.n_ranks = int(levels.size)
            self.uniform = bool((self.block_bytes == self.block_bytes[0]).all())
        return StartDecision(
            placement=np.full((ctx.n_layers, ctx.n_blocks), -1, dtype=np.int8),
            verdict="a bound: placement from future reads, migrations free",
        )

    def decide(self, view: StepView) -> StepDecision:
        s = view.step
        read_mask = None
        if self.sparse:
            priority, reads = self.spilled.step(s, view.alive, view.visible)
            if view.decode:
                read_mask = reads
            if s == self.n_steps - 1:
                self.spilled.close()
        elif self.uniform:
            return StepDecision(placement=self._fill_lossless(view), move_timing="free")
        else:
            left = np.clip(self.last_visible - s, 0, self.n_steps)
            priority = np.where(view.visible, self.table[left], np.float32(0.0))
        placement = fill_by_priority(priority, self.block_bytes, self.caps, view.alive)
        return StepDecision(placement=placement, read_mask=read_mask, move_timing="free")

    def _fill_lossless(self, view: StepView) -> np.ndarray:
        """fill_by_priority for lossless mode and equal block sizes, without sorting.

        Priorities take few distinct values (one per count of steps left, saturating), so the
        blocks fall into ranked classes, and tier boundaries are slot counts. A class that a
        boundary cuts is split in fill_by_priority's tie order, row-major flat index: the cut
        is found from per-layer counts, and the blocks after it move one tier down.
        """
        s, hi = view.step, view.hi_block
        c0 = int(view.lo_alive.min())
        alive = view.alive[:, c0:hi]
        # steps left in each block's visible run; blocks not stored may index the table anywhere
        rank = self.rank_of_left[self.last_visible[:, c0:hi] - np.int32(s)]
        if view.visible is not view.alive:
            rank[~view.visible[:, c0:hi]] = self.rank_hidden
        one_rect = bool((view.lo_alive == c0).all())  # every layer stores the same blocks: alive is all True
        counts = np.bincount(rank.ravel() if one_rect else rank[alive], minlength=self.n_ranks)
        n = int(counts.sum())
        size = float(self.block_bytes[0])
        bounds, remaining = [], n
        for t in range(4):  # the same prefix fill as fill_by_priority's uniform path
            k = int(min(remaining, np.floor(float(self.caps[t]) / size)))
            bounds.append(n - remaining + k)
            remaining -= k
        if remaining > 0:
            raise CapacityExhausted(n * size, float(np.sum(self.caps)))
        ends = np.cumsum(counts)
        starts = ends - counts
        edges = np.asarray(bounds)
        tier_of = np.searchsorted(edges, starts, side="right").astype(np.int8)  # tier of each class's first block
        win = tier_of[rank]
        only = np.flatnonzero(counts)
        for j in only:
            cuts = [b - starts[j] for b in bounds if starts[j] < b < ends[j]]
            if not cuts:
                continue
            member = alive if (one_rect and only.size == 1) else (rank == j) & alive
            per_row = np.full(member.shape[0], member.shape[1]) if member is alive and one_rect else member.sum(axis=1)
            cum = np.cumsum(per_row)
            for k in cuts:  # the k-th member (0-based) and all after it go one tier further down
                r = int(np.searchsorted(cum, k, side="right"))
                col = int(np.flatnonzero(member[r])[k - (int(cum[r - 1]) if r else 0)])
                win[r, col:] += member[r, col:]
                np.add(win[r + 1 :], member[r + 1 :], out=win[r + 1 :], casting="unsafe")
        out = np.full(view.alive.shape, -1, dtype=np.int8)
        out[:, c0:hi] = win if one_rect else np.where(alive, win, np.int8(-1))
        return out
