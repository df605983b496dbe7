"""Adaptive placement: learns from past attention, keeps hot blocks high, moves a bounded amount.

Priority of a stored block (causal: only steps already replayed count):

- lossless mode: 1 if the step reads it (every visible block is read every
  step, so attention mass cannot make one visible block cheaper to keep than
  another), 0 for stored blocks no query can see (``--swa-full`` window layers);
- sparse mode: ``score + recency``, where ``score <- decay * score + mass`` after
  every step (heavy hitters and sinks accumulate) and the newest
  ``recent_blocks`` blocks of each layer get ``recency_bonus`` (the local
  window, StreamingLLM-style). Reads are the ``block_budget`` highest.

Each step: new blocks go to the fastest tier with room, in priority order.
Then, tier by tier from HBM down, the best blocks below a tier move into its
free room, and swap with its worst blocks when they beat them by the
hysteresis margin (``p_up > (1 + hysteresis) * p_down``), at most
``max_moves_per_step`` blocks per step. With ``prefetch`` the moves are
flagged so that the cost model hides them behind compute (idle link time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from llamatier.policies.base import (
    CapacityExhausted,
    Policy,
    StartDecision,
    StepDecision,
    StepView,
    register_policy,
)
from llamatier.tiers import N_TIERS, MoveTiming

if TYPE_CHECKING:
    from llamatier.replay.context import ReplayContext


def top_k_indices(candidates: np.ndarray, priority: np.ndarray, k: int, *, largest: bool) -> np.ndarray:
    """Up to k flat indices from ``candidates`` with the largest (or smallest) priority, best first.

    Ties go to the lower flat index (deterministic).
    """
    if candidates.size == 0 or k <= 0:
        return candidates[:0]
    key = -priority[candidates] if largest else priority[candidates]
    if candidates.size > k:
        part = np.argpartition(key, k - 1)[:k]
        cand, key = candidates[part], key[part]
    else:
        cand = candidates
    order = np.lexsort((cand, key))
    return cand[order]


def stored_where(window: np.ndarray, c0: int, c1: int, n_blocks: int) -> np.ndarray:
    """Flat indices (layer * n_blocks + block) of the True cells of columns ``c0:c1`` of a
    [layers, n_blocks] mask, in the order ``np.flatnonzero`` gives them on the whole mask."""
    idx = np.flatnonzero(window)  # row-major within the window: the same order (~10x faster than 2-D nonzero)
    if idx.size == 0 or (c0 == 0 and c1 == n_blocks):
        return idx
    layer, col = np.divmod(idx, c1 - c0)
    return layer * n_blocks + col + c0


def prefix_fit(sizes: np.ndarray, room: float) -> int:
    """How many of the leading ``sizes`` fit together in ``room`` bytes."""
    if sizes.size == 0 or room <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(sizes), room, side="right"))


@register_policy
class AdaptivePolicy(Policy):
    """Causal heat from past attention mass; hot in HBM, warm in DRAM, cold below; bounded migration."""

    name = "adaptive"
    summary = "learns block heat from past attention (decay + recency), hysteresis, bounded migration, optional prefetch"

    def __init__(
        self,
        decay: float = 0.8,
        recent_blocks: int = 2,
        recency_bonus: float = 1.0,
        hysteresis: float = 0.25,
        max_moves_per_step: int = 64,
        prefetch: bool | None = None,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError("decay must be in [0, 1)")
        if hysteresis < 0 or max_moves_per_step < 0 or recent_blocks < 0:
            raise ValueError("hysteresis, max_moves_per_step and recent_blocks must be >= 0")
        self.decay = float(decay)
        self.recent_blocks = int(recent_blocks)
        self.recency_bonus = float(recency_bonus)
        self.hysteresis = float(hysteresis)
        self.max_moves_per_step = int(max_moves_per_step)
        self.prefetch = prefetch

    def params(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "recent_blocks": self.recent_blocks,
            "recency_bonus": self.recency_bonus,
            "hysteresis": self.hysteresis,
            "max_moves_per_step": self.max_moves_per_step,
            "prefetch": self._prefetch,
        }

    def start(self, ctx: ReplayContext) -> StartDecision:
        L, NB = ctx.n_layers, ctx.n_blocks
        self.caps = np.asarray(ctx.capacity_bytes, dtype=np.float64)
        self.sizes = np.repeat(ctx.block_bytes, NB)
        self.score = np.zeros(L * NB, dtype=np.float32)
        self.sparse = ctx.options.mode == "sparse"
        self.budget = int(ctx.options.block_budget or 0)
        self._prefetch = bool(ctx.options.prefetch if self.prefetch is None else self.prefetch)
        # lossless without --swa-full: every stored block is read every step, so priorities never differ
        self.uniform_priority = not self.sparse and not ctx.options.swa_full
        self.min_block = float(np.min(ctx.block_bytes))
        # lossless: all visible blocks are read, but blocks below HBM cost a host round trip (or a
        # transfer) per layer that has any, so keep them in as few layers as possible: the last ones
        tilt = 1.0 + 0.1 * (L - 1 - np.arange(L)) / max(L, 1)
        self.layer_tilt = np.repeat(tilt.astype(np.float32), NB)
        return StartDecision(
            placement=np.full((L, NB), -1, dtype=np.int8),
            verdict="reads ranked by past attention" if self.sparse else "every visible block read each step, fastest tier with room first",
        )

    def _priority(self, view: StepView) -> np.ndarray:
        if not (self.sparse and view.decode):  # read every step; later layers first to go below HBM
            L, NB = view.alive.shape
            c0, hi = int(view.lo_alive.min()), view.hi_block
            p = np.zeros(L * NB, dtype=np.float32)
            np.multiply(view.visible[:, c0:hi], self.layer_tilt.reshape(L, NB)[:, c0:hi], out=p.reshape(L, NB)[:, c0:hi])
            return p
        vis = view.visible.ravel()
        p = self.score.copy()
        if self.recent_blocks and self.recency_bonus:
            NB = view.alive.shape[1]
            lo = max(view.hi_block - self.recent_blocks, 0)
            p.reshape(-1, NB)[:, lo : view.hi_block] += self.recency_bonus
        p[~vis] = -1.0
        return p

    def decide(self, view: StepView) -> StepDecision:
        occ = np.array(view.occupancy_bytes, dtype=np.float64)  # blocks staying this step, before new ones
        NB = view.alive.shape[1]
        c0, hi = int(view.lo_alive.min()), view.hi_block  # every stored block lies in these columns
        has_new = bool(view.new_blocks[:, view.new_lo_block : hi].any())
        P: np.ndarray | None = None  # copied on first change
        p = self._priority(view) if (self.sparse and view.decode) or not self.uniform_priority or has_new else None
        if has_new:
            P = view.placement.ravel().copy()
            idx = stored_where(view.new_blocks[:, view.new_lo_block : hi], view.new_lo_block, hi, NB)
            idx = idx[np.argsort(-p[idx], kind="stable")]
            start = 0
            for t in range(N_TIERS):
                n = prefix_fit(self.sizes[idx[start:]], self.caps[t] - occ[t])
                P[idx[start : start + n]] = t
                occ[t] += self.sizes[idx[start : start + n]].sum()
                start += n
            if start < idx.size:
                raise CapacityExhausted(float(occ.sum() + self.sizes[idx[start:]].sum()), float(self.caps.sum()))
        moves_left = self.max_moves_per_step
        if has_new:
            moves_left -= self._displace(view, P, p, idx, moves_left)
        old = None
        for t in range(N_TIERS - 1):
            if moves_left <= 0:
                break
            if not (occ[t + 1 :] > 0).any():
                break  # nothing stored below this tier
            room = self.caps[t] - occ[t]
            may_swap = not (self.uniform_priority and not (self.sparse and view.decode))
            if room < self.min_block and not may_swap:
                continue
            if P is None:
                P = view.placement.ravel().copy()
            if p is None:
                p = self._priority(view)
            if old is None:
                old = view.alive[:, c0:hi] & ~view.new_blocks[:, c0:hi]
            below = stored_where(old & (P.reshape(-1, NB)[:, c0:hi] > t), c0, hi, NB)
            if below.size == 0:
                continue
            up = top_k_indices(below, p, moves_left, largest=True)
            n = prefix_fit(self.sizes[up], room)
            if n:  # free room in tier t: promote the best blocks from below
                for src in range(t + 1, N_TIERS):
                    occ[src] -= self.sizes[up[:n]][P[up[:n]] == src].sum()
                P[up[:n]] = t
                occ[t] += self.sizes[up[:n]].sum()
                moves_left -= n
                up = up[n:]
            if not may_swap or up.size == 0 or moves_left <= 1:
                continue
            here = stored_where(old & (P.reshape(-1, NB)[:, c0:hi] == t), c0, hi, NB)
            down = top_k_indices(here, p, min(up.size, moves_left // 2), largest=False)
            m = min(up.size, down.size)
            if m == 0:
                continue
            up, down = up[:m], down[:m]
            ok = (p[up] > (1.0 + self.hysteresis) * p[down] + 1e-12) & (self.sizes[up] == self.sizes[down])
            ok = np.logical_and.accumulate(ok)  # pairs are sorted: stop at the first that does not pay
            if ok.any():
                u, d = up[ok], down[ok]
                P[d] = P[u]
                P[u] = t
                moves_left -= 2 * int(ok.sum())
        changed = P is not None and not np.array_equal(P.reshape(-1, NB)[:, c0:hi], view.placement[:, c0:hi])
        placement = P.reshape(view.alive.shape) if changed else None
        read_mask = None
        if self.sparse and view.decode:
            read_mask = self._select(view, p)
        return StepDecision(
            placement=placement, read_mask=read_mask, move_timing=MoveTiming.PREFETCH if self._prefetch else MoveTiming.DEMAND
        )

    def _displace(self, view: StepView, P: np.ndarray, p: np.ndarray, new_idx: np.ndarray, budget: int) -> int:
        """New blocks that landed below a full tier take the place of that tier's lowest-priority
        blocks when they outrank them (one demotion each instead of a slow first write)."""
        moved = 0
        NB = view.alive.shape[1]
        c0, hi = int(view.lo_alive.min()), view.hi_block
        old = view.alive[:, c0:hi] & ~view.new_blocks[:, c0:hi]
        for t in range(N_TIERS - 1):
            if moved >= budget:
                break
            cand = new_idx[P[new_idx] > t]
            if cand.size == 0:
                continue
            cand = cand[np.argsort(-p[cand], kind="stable")][: budget - moved]
            here = stored_where(old & (P.reshape(-1, NB)[:, c0:hi] == t), c0, hi, NB)
            low = top_k_indices(here, p, cand.size, largest=False)
            m = min(cand.size, low.size)
            if m == 0:
                continue
            up, down = cand[:m], low[:m]
            ok = np.logical_and.accumulate((p[up] > p[down]) & (self.sizes[up] == self.sizes[down]))
            if ok.any():
                u, d = up[ok], down[ok]
                P[d] = P[u]
                P[u] = t
                moved += int(ok.sum())
        return moved

    def _select(self, view: StepView, p: np.ndarray) -> np.ndarray:
        L, NB = view.alive.shape
        k = min(self.budget, NB)
        pv = np.where(view.visible.ravel(), p, -np.inf).reshape(L, NB)
        top = np.argpartition(-pv, k - 1, axis=1)[:, :k]
        mask = np.zeros((L, NB), dtype=bool)
        np.put_along_axis(mask, top, True, axis=1)
        return mask & view.visible

    def wants_mass(self) -> bool:
        return self.sparse  # lossless priorities come from visibility alone

    def observe(self, view: StepView, mass: np.ndarray) -> None:
        if self.sparse:
            self.score *= self.decay
            self.score += mass.ravel()
