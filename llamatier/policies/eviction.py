"""KV eviction and selection policies: which blocks a sequence keeps, decided from past attention only.

Each keeps at most ``--block-budget`` blocks (sparse mode) and chooses the
*same* blocks in every layer, because llama.cpp's memory API removes a
position from all layers at once: what these policies decide in a replay can
be measured in a real llama.cpp run (``llamatier quality --evict``). Two
blocks are never dropped at a decode step: the one receiving the new token
and the one holding the previous token (llama.cpp decodes position p only
after p - 1).

Permanent eviction (a dropped block never comes back; its KV is discarded):

- ``streaming`` (StreamingLLM): the first ``sink_blocks`` blocks (attention
  sinks) plus the most recent blocks.
- ``h2o`` (Heavy-Hitter Oracle): the most recent ``recent_blocks`` blocks
  plus the blocks with the most attention accumulated over every query so far
  (prefill steps count each of their query tokens).
- ``snapkv``: at the first decode step, the prompt blocks the prompt's last
  queries (the trace's last prefill step: its observation window) attended
  most, plus a window of ``window_blocks`` recent blocks that slides over the
  generated tokens.

Per-step selection (a block not chosen this step stays stored and may be read
again later):

- ``adaptive-select``: the adaptive policy's own causal scores (decayed
  attention mass plus a recency bonus), averaged over layers; each decode step
  reads the ``block_budget`` best blocks. Placement as the adaptive policy's.

Scores aggregate layers by their mean mass. Ties go to the more recent block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from llamatier.errors import LlamatierError
from llamatier.policies.adaptive import AdaptivePolicy, prefix_fit
from llamatier.policies.base import Policy, StartDecision, StepDecision, StepView, register_policy
from llamatier.registry import POLICIES
from llamatier.tiers import ABSENT, N_TIERS, REMOTE

if TYPE_CHECKING:
    from llamatier.replay.context import ReplayContext

MIN_KEEP_BLOCKS = 2  # the new token's block and the previous token's


def check_sparse_budget(ctx: Any, name: str) -> int:
    """The block budget of a sparse replay; a one-line error in lossless mode or below the minimum."""
    if ctx.options.mode != "sparse":
        raise LlamatierError(
            f"policy {name!r} drops KV blocks: replay it with --mode sparse --block-budget N (blocks kept per layer)"
        )
    budget = int(ctx.options.block_budget)
    if budget < MIN_KEEP_BLOCKS:
        raise LlamatierError(
            f"policy {name!r} needs --block-budget >= {MIN_KEEP_BLOCKS}: it always keeps the new token's block "
            "and the previous token's"
        )
    return budget


def protected_blocks(pos0: int, block_tokens: int) -> list[int]:
    """Blocks a decode step at position ``pos0`` never drops: the new token's and the previous token's."""
    cur = pos0 // block_tokens
    return sorted({cur, max(pos0 - 1, 0) // block_tokens})


def keep_top(score: np.ndarray, candidates: np.ndarray, protected: list[int], budget: int) -> np.ndarray:
    """bool [NB]: the protected blocks, then the highest-scoring candidates, ``budget`` blocks at most.

    Ties go to the higher block index (the more recent block).
    """
    keep = np.zeros(candidates.shape, dtype=bool)
    keep[protected] = True
    k = budget - int(keep.sum())
    cand = np.flatnonzero(candidates & ~keep)
    if k > 0 and cand.size:
        order = np.lexsort((-cand, -score[cand]))  # best score first, then the newest
        keep[cand[order[:k]]] = True
    return keep


def layer_uniform_policies() -> list[str]:
    """Registered policies that keep the same blocks in every layer: those a llama.cpp run can apply."""
    return [name for name in POLICIES.names() if getattr(POLICIES.get(name), "layer_uniform", False)]


class EvictionPolicy(Policy):
    """Base of permanent, layer-uniform eviction: subclasses rank the blocks still kept.

    ``score(view)`` gives float [n_blocks], higher is kept; ``learn(step, mass)``
    sees each step's attention after it ran. Dropped blocks are discarded: in the
    replay they are accounted in the remote tier (never read, never moved, no
    transfer charged). New blocks go to the fastest tier with room; kept blocks
    move up into room the dropped ones freed (the most recent first, charged as
    demand moves).
    """

    permanent: ClassVar[bool] = True
    layer_uniform: ClassVar[bool] = True

    def start(self, ctx: ReplayContext) -> StartDecision:
        self.budget = check_sparse_budget(ctx, self.name)
        L, NB = ctx.n_layers, ctx.n_blocks
        self.block_tokens = int(ctx.block_tokens)
        self.pos0 = np.asarray(ctx.pos0)
        self.n_tokens = np.asarray(ctx.n_tokens)
        self.caps = np.asarray(ctx.capacity_bytes, dtype=np.float64)
        self.sizes = np.broadcast_to(np.asarray(ctx.block_bytes, dtype=np.float64)[:, None], (L, NB))
        self.kept = np.zeros(NB, dtype=bool)
        self.reset(ctx)
        return StartDecision(
            placement=np.full((L, NB), ABSENT, dtype=np.int8),
            verdict=f"keeps {self.budget} blocks per layer ({self.summary}); dropped blocks are discarded "
            "(accounted in remote, never read or moved)",
        )

    def reset(self, ctx: ReplayContext) -> None:  # noqa: B027 - optional hook
        """Set up per-replay state."""

    def learn(self, step: int, decode: bool, mass: np.ndarray) -> None:  # noqa: B027 - optional hook
        """Layer-mean attention mass [n_blocks] that step ``step`` put on each block."""

    def score(self, view: StepView) -> np.ndarray:
        raise NotImplementedError

    def decide(self, view: StepView) -> StepDecision:
        alive_any = view.alive.any(axis=0)
        cand = (self.kept | view.new_blocks.any(axis=0)) & alive_any
        if view.decode:
            prot = protected_blocks(int(self.pos0[view.step]), self.block_tokens)
            keep = keep_top(self.score(view), cand, prot, self.budget)
        else:
            keep = cand  # nothing is dropped while the prompt is read
        self.kept = keep
        P = view.placement.copy()
        keep2 = keep[None, :] & view.alive
        P[view.alive & ~keep2] = REMOTE  # discarded
        new2 = view.new_blocks & keep2
        old2 = keep2 & ~new2
        occ = np.bincount(P[old2].astype(np.int64), weights=self.sizes[old2], minlength=N_TIERS)
        flat, sizes = P.ravel(), self.sizes.ravel()
        idx = np.flatnonzero(new2.ravel())
        start = 0
        for t in range(N_TIERS):
            n = prefix_fit(sizes[idx[start:]], self.caps[t] - occ[t])
            flat[idx[start : start + n]] = t
            occ[t] += sizes[idx[start : start + n]].sum()
            start += n
        flat[idx[start:]] = REMOTE  # nothing left anywhere: the capacity check reports it
        moves_bytes, moves_count = self._promote(flat, sizes, np.flatnonzero(old2.ravel()), occ, view.alive.shape[1])
        return StepDecision(
            placement=P,
            read_mask=keep2 & view.visible if view.decode else None,
            moves_bytes=moves_bytes,
            moves_count=moves_count,
        )

    def _promote(
        self, flat: np.ndarray, sizes: np.ndarray, kept: np.ndarray, occ: np.ndarray, n_blocks: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Move kept blocks up into room that dropped blocks freed (the most recent first); the moves made."""
        mb = np.zeros((N_TIERS, N_TIERS))
        mc = np.zeros((N_TIERS, N_TIERS))
        for t in range(N_TIERS - 1):
            up = kept[flat[kept] > t]
            if up.size == 0:
                continue
            up = up[np.argsort(-(up % n_blocks), kind="stable")]
            up = up[: prefix_fit(sizes[up], self.caps[t] - occ[t])]
            if up.size == 0:
                continue
            src = flat[up].astype(np.int64)
            np.add.at(mb, (src, t), sizes[up])
            np.add.at(mc, (src, t), 1.0)
            occ -= np.bincount(src, weights=sizes[up], minlength=N_TIERS)
            occ[t] += sizes[up].sum()
            flat[up] = t
        return mb, mc

    def observe(self, view: StepView, mass: np.ndarray) -> None:
        self.learn(view.step, view.decode, mass.mean(axis=0, dtype=np.float64))


@register_policy
class StreamingPolicy(EvictionPolicy):
    name = "streaming"
    summary = "StreamingLLM: attention-sink blocks plus the most recent blocks"

    def __init__(self, sink_blocks: int = 1) -> None:
        if sink_blocks < 0:
            raise ValueError("sink_blocks must be >= 0")
        self.sink_blocks = int(sink_blocks)

    def params(self) -> dict[str, Any]:
        return {"sink_blocks": self.sink_blocks}

    def score(self, view: StepView) -> np.ndarray:
        b = np.arange(view.alive.shape[1], dtype=np.float64)
        return np.where(b < self.sink_blocks, np.inf, b)


@register_policy
class H2OPolicy(EvictionPolicy):
    name = "h2o"
    summary = "H2O: recent blocks plus the heavy hitters of accumulated attention"

    def __init__(self, recent_blocks: int | None = None) -> None:
        if recent_blocks is not None and recent_blocks < 0:
            raise ValueError("recent_blocks must be >= 0")
        self.recent_blocks = recent_blocks

    def params(self) -> dict[str, Any]:
        return {"recent_blocks": self._recent if hasattr(self, "_recent") else self.recent_blocks}

    def reset(self, ctx: ReplayContext) -> None:
        self._recent = self.recent_blocks if self.recent_blocks is not None else self.budget // 2
        self.acc = np.zeros(ctx.n_blocks, dtype=np.float64)

    def learn(self, step: int, decode: bool, mass: np.ndarray) -> None:
        self.acc += mass * float(self.n_tokens[step])  # a prefill step's mass is the mean over its queries

    def score(self, view: StepView) -> np.ndarray:
        s = self.acc.copy()
        s[max(view.hi_block - self._recent, 0) : view.hi_block] = np.inf
        return s


@register_policy
class SnapKVPolicy(EvictionPolicy):
    name = "snapkv"
    summary = "SnapKV: prompt blocks the prompt's last queries attended most, plus a recent window"

    def __init__(self, window_blocks: int | None = None) -> None:
        if window_blocks is not None and window_blocks < 0:
            raise ValueError("window_blocks must be >= 0")
        self.window_blocks = window_blocks

    def params(self) -> dict[str, Any]:
        return {"window_blocks": self._window if hasattr(self, "_window") else self.window_blocks}

    def reset(self, ctx: ReplayContext) -> None:
        self._window = self.window_blocks if self.window_blocks is not None else max(1, self.budget // 4)
        self.obs = np.zeros(ctx.n_blocks, dtype=np.float64)
        self.prompt_blocks = 0

    def learn(self, step: int, decode: bool, mass: np.ndarray) -> None:
        if not decode:  # the last prefill step's queries are the observation window
            self.obs = mass
            self.prompt_blocks = int(-(-(self.pos0[step] + self.n_tokens[step]) // self.block_tokens))

    def score(self, view: StepView) -> np.ndarray:
        NB = view.alive.shape[1]
        b = np.arange(NB)
        # generated blocks that left the window go first (oldest first), then the least attended prompt blocks
        s = np.where(b < self.prompt_blocks, 1.0 + self.obs, -1.0 + b / NB)
        s[max(view.hi_block - self._window, 0) : view.hi_block] = np.inf
        return s


@register_policy
class AdaptiveSelectPolicy(AdaptivePolicy):
    name = "adaptive-select"
    summary = "the adaptive policy's decayed attention scores, layer-uniform: reads the best blocks each step"
    permanent: ClassVar[bool] = False
    layer_uniform: ClassVar[bool] = True

    def start(self, ctx: ReplayContext) -> StartDecision:
        check_sparse_budget(ctx, self.name)
        self.block_tokens = int(ctx.block_tokens)
        self.pos0 = np.asarray(ctx.pos0)
        self.n_layers = ctx.n_layers
        return super().start(ctx)

    def _select(self, view: StepView, p: np.ndarray) -> np.ndarray:
        L, NB = view.alive.shape
        row = self.score[:NB].astype(np.float64)  # every layer holds the same scores
        if self.recent_blocks and self.recency_bonus:
            row[max(view.hi_block - self.recent_blocks, 0) : view.hi_block] += self.recency_bonus
        prot = protected_blocks(int(self.pos0[view.step]), self.block_tokens)
        keep = keep_top(row, view.visible.any(axis=0), prot, self.budget)
        return keep[None, :] & view.visible

    def observe(self, view: StepView, mass: np.ndarray) -> None:
        self.score *= self.decay
        self.score += np.tile(mass.mean(axis=0, dtype=np.float64).astype(np.float32), self.n_layers)
