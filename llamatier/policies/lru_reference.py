"""The tiered LRU computed access by access in plain Python: the oracle the vectorised LRU is tested against.

:func:`lru_step_reference` replays one step's accesses one at a time with the
rules of :mod:`llamatier.policies.lru`; the vectorised policy falls back to it
when a step's accesses are not in stack order (sparse mode).
:class:`ReferenceLRU` is a whole policy built on it (not registered; tests
replay it next to ``lru``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from llamatier.policies.base import (
    CapacityExhausted,
    Policy,
    StartDecision,
    StepDecision,
    StepView,
    default_read_selection,
)
from llamatier.tiers import N_TIERS

if TYPE_CHECKING:
    from llamatier.replay.context import ReplayContext


def _tier_at(position: int, cum_slots: list[float]) -> int:
    t = 0
    while t < N_TIERS and position > cum_slots[t]:
        t += 1
    if t == N_TIERS:
        raise CapacityExhausted(position, cum_slots[-1])
    return t


def lru_step_reference(
    stack: list[int], accesses: list[int], alive: np.ndarray, sizes: np.ndarray, cum_slots: np.ndarray
) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One step of the tiered LRU, access by access (see llamatier.policies.lru for the rules).

    ``cum_slots`` are the cumulative block slots per tier. Returns the new stack,
    the placement after the step, the tier each access was served from, and
    the [4, 4] move bytes and counts.
    """
    slots = [float(x) for x in cum_slots]
    alive_flat = alive.ravel()
    tier_start = {e: _tier_at(i + 1, slots) for i, e in enumerate(stack)}
    current = list(stack)
    tier_access: dict[int, int] = {}
    tier_top: dict[int, int] = {}
    for k in accesses:
        if k in tier_start:
            i = current.index(k)
            tier_access[k] = _tier_at(i + 1, slots)
            del current[i]
        current.insert(0, k)
        tier_top[k] = _tier_at(1, slots)
    tier_end = {e: _tier_at(i + 1, slots) for i, e in enumerate(current)}
    mb = np.zeros((4, 4))
    mc = np.zeros((4, 4))

    def move(a: int, b: int, e: int) -> None:
        if a != b:
            mb[a, b] += float(sizes[e])
            mc[a, b] += 1

    accessed = set(accesses)
    for k in accesses:
        if k in tier_access:
            move(tier_start[k], tier_access[k], k)
            move(tier_access[k], tier_top[k], k)
        move(tier_top[k], tier_end[k], k)
    for e in stack:
        if e not in accessed and alive_flat[e]:
            move(tier_start[e], tier_end[e], e)
    while current and not alive_flat[current[-1]]:
        current.pop()
    placement = np.full(alive.shape, -1, dtype=np.int8)
    pf = placement.ravel()
    for e in current:
        if alive_flat[e]:
            pf[e] = tier_end[e]
    read_tier = placement.copy()
    rf = read_tier.ravel()
    for k in accesses:
        rf[k] = tier_top[k]
    return current, placement, read_tier, mb, mc


class ReferenceLRU(Policy):
    """The tiered LRU computed access by access in plain Python (for cross-checks)."""

    name = "lru"
    summary = "reference per-access LRU"

    def start(self, ctx: ReplayContext) -> StartDecision:
        self.sizes = np.repeat(ctx.block_bytes, ctx.n_blocks)
        slot = float(np.max(ctx.block_bytes))
        self.cum_slots = np.cumsum([c // slot for c in ctx.capacity_bytes])
        self.stack: list[int] = []
        self.sparse = ctx.options.mode == "sparse"
        self.budget = int(ctx.options.block_budget or 0)
        return StartDecision(
            placement=np.full((ctx.n_layers, ctx.n_blocks), -1, dtype=np.int8),
            dram_reads="fetch",
            verdict="LRU over all tiers, fetch into HBM on access",
        )

    def decide(self, view: StepView) -> StepDecision:
        read_mask = None
        L, NB = view.alive.shape
        if self.sparse and view.decode:
            read_mask = default_read_selection(view, self.budget)
            want = read_mask | view.new_blocks
        else:
            want = view.visible
        accesses = [layer * NB + b for layer in range(L) for b in range(NB) if want[layer, b]]
        self.stack, P, rt, mb, mc = lru_step_reference(self.stack, accesses, view.alive, self.sizes, self.cum_slots)
        return StepDecision(placement=P, read_tier=rt, read_mask=read_mask, moves_bytes=mb, moves_count=mc)
