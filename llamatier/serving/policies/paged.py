"""Paged KV across tiers (vLLM-style blocks): the machinery the vllm-lru, vllm-arc and session-tiering policies share.

KV lives in blocks of ``block_tokens`` tokens spanning all layers. Block ids:
the shared system prompt's full blocks are ``0 .. n_prefix_blocks - 1`` and
are stored once for every session; session ``s``'s own block ``j`` is
``n_prefix_blocks + s * max_blocks + j``. ``present[id]`` is a bit mask of the
tiers holding a copy. The fastest tier (HBM; DRAM on a CPU host) holds every
running sequence's blocks (pinned) and idle blocks in an eviction queue
(vLLM's free-block queue: a finished request's blocks join it tail first, a
prefix-cache hit takes a block back out). Lower tiers are block caches
(:mod:`llamatier.serving.policies.caches`); what they evict goes one tier
down, and out of the last one.

A request's prompt reuses the longest run of leading blocks found in any tier
(prefix caching: only full blocks computed before count, and at least the last
prompt token is computed); blocks found below the top tier are loaded; the rest
is prefilled. Subclasses choose write-through or write-back, whether the shared
prefix is pinned, and what to do when the top tier is full (preempt, or spill).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from llamatier.errors import LlamatierError
from llamatier.serving.policies.base import (
    N_SEGMENTS,
    PolicyCannotRun,
    ServingPolicy,
)
from llamatier.serving.policies.caches import CACHE_KINDS
from llamatier.tiers import DRAM, HBM, TIER_NAMES, MoveTiming
from llamatier.units import format_bytes

if TYPE_CHECKING:
    from llamatier.serving.context import ServingContext
    from llamatier.serving.plan import Plan
    from llamatier.serving.requests import Request

LOWER_TIER_NAMES = ("dram", "ssd", "remote")


class PagedPolicy(ServingPolicy):
    """Block-granular KV across tiers with prefix caching (see the module docstring)."""

    cache_kind: ClassVar[str] = "lru"
    write_through: ClassVar[bool] = True  # store every completed block one tier down as it is computed
    pin_prefix: ClassVar[bool] = False  # keep the shared prefix in the top tier for good
    load_timing: ClassVar[int] = MoveTiming.PREFETCH  # loads overlap the step's compute (asynchronous copies)

    def __init__(self, tiers: tuple[str, ...] | list[str] = ("dram", "ssd")) -> None:
        super().__init__()
        bad = [t for t in tiers if t not in LOWER_TIER_NAMES]
        if bad:
            raise LlamatierError(f"unknown offload tier {bad[0]!r}: use {', '.join(LOWER_TIER_NAMES)}")
        self.tier_names = tuple(t for t in LOWER_TIER_NAMES if t in tiers)

    def params(self) -> dict[str, Any]:
        return {"offload_tiers": list(self.tier_names), "eviction": self.cache_kind}

    # -- setup ---------------------------------------------------------------------------
    def start(self, ctx: ServingContext, plan: Plan) -> str:
        B = ctx.block_tokens
        self.B = B
        self.bb = float(ctx.block_bytes)
        self.top = DRAM if ctx.host_only else HBM
        self.topbit = np.uint8(1 << self.top)
        cap_blocks = np.floor(ctx.capacity_bytes / self.bb).astype(np.int64)
        self.cap_top = int(cap_blocks[self.top])
        self.lower = [TIER_NAMES.index(t) for t in self.tier_names if TIER_NAMES.index(t) > self.top]
        cls = CACHE_KINDS[self.cache_kind]
        self.cap_lower = {t: int(cap_blocks[t]) for t in self.lower}
        self.caches = {t: cls(self.cap_lower[t]) for t in self.lower}
        self.n_prefix = plan.prefix_tokens // B
        slot = ctx.spec.server.slot_context_tokens
        self.max_blocks = -(-slot // B) + 1
        n_ids = self.n_prefix + plan.n_sessions * self.max_blocks
        self.present = np.zeros(n_ids, dtype=np.uint8)
        self.pin = np.zeros(n_ids, dtype=np.int32)
        self.free_q: OrderedDict[int, None] = OrderedDict()
        self.used_top = 0
        self.low_active = 0  # blocks of running sequences kept below the top tier (spill)
        self.active: OrderedDict[int, Request] = OrderedDict()
        self.seq_ids: dict[int, np.ndarray] = {}
        self.seq_low: dict[int, int] = {}  # own blocks [0, k) of a running sequence kept in DRAM
        self.prefix_pinned = False
        longest = int((plan.req_prompt_tokens + plan.req_decode_steps).max()) if plan.n_requests else 0
        need = -(-longest // B)
        if need > self.cap_top and not self.can_spill():
            raise PolicyCannotRun(
                f"the longest sequence ({longest} tokens) needs {format_bytes(need * self.bb)} of KV in "
                f"{TIER_NAMES[self.top]}, which has {format_bytes(self.cap_top * self.bb)} for KV: "
                "use a bigger profile or shorter sessions"
            )
        lower = ", ".join(f"{TIER_NAMES[t]} {format_bytes(self.cap_lower[t] * self.bb)}" for t in self.lower)
        return (
            f"paged KV in {B}-token blocks ({format_bytes(self.bb)}): {TIER_NAMES[self.top]} "
            f"{format_bytes(self.cap_top * self.bb)}" + (f", offload to {lower} ({self.cache_kind})" if lower else "")
        )

    def can_spill(self) -> bool:
        return False

    # -- ids -------------------------------------------------------------------------------
    def ids_for(self, session: int, n_blocks: int) -> np.ndarray:
        own = max(0, n_blocks - self.n_prefix)
        base = self.n_prefix + session * self.max_blocks
        return np.concatenate([np.arange(min(n_blocks, self.n_prefix)), base + np.arange(own)]).astype(np.int64)

    def lowest_tier(self, ids: np.ndarray) -> np.ndarray:
        """The fastest tier holding each block (4 where none does)."""
        p = self.present[ids].astype(np.int64)
        t = np.full(p.shape, 4, dtype=np.int64)
        for tier in (3, 2, 1, 0):
            t = np.where(p & (1 << tier), tier, t)
        return t

    # -- tier operations -----------------------------------------------------------------
    def store_lower(self, tier: int, keys: list[int], src: int, timing: int = MoveTiming.PREFETCH) -> None:
        """Copy blocks into a lower tier's cache; what it evicts goes one tier further down."""
        cache = self.caches.get(tier)
        if cache is None or not keys:
            return
        bit = np.uint8(1 << tier)
        keys = [k for k in keys if not self.present[k] & bit]
        if not keys:
            return
        evicted = cache.store(keys)
        stored = keys if len(keys) <= cache.capacity else cache.stored_of(keys)
        if stored:
            self.present[stored] |= bit
            self.add_move(src, tier, len(stored) * self.bb, len(stored), timing)
        if evicted:
            self.evicted_lower(tier, evicted)

    def evicted_lower(self, tier: int, evicted: list[int]) -> None:
        bit = np.uint8(1 << tier)
        self.present[evicted] &= ~bit
        nxt = [t for t in self.lower if t > tier]
        if nxt:
            self.store_lower(nxt[0], evicted, tier, MoveTiming.PREFETCH)

    def evict_top(self, k: int) -> None:
        """Free ``k`` top-tier blocks from the head of the eviction queue."""
        if k <= 0:
            return
        if k > len(self.free_q):
            raise AssertionError("evict_top beyond the eviction queue")  # callers check room first
        out = [self.free_q.popitem(last=False)[0] for _ in range(k)]
        self.present[out] &= ~self.topbit
        self.used_top -= k
        self.on_evict_top(out)

    def on_evict_top(self, ids: list[int]) -> None:  # noqa: B027 - write-back hook
        """Blocks just dropped from the top tier (write-through: copies are already below)."""

    def free_top(self) -> int:
        return self.cap_top - self.used_top

    # -- admission -------------------------------------------------------------------------
    def admit(self, req: Request, now_s: float) -> int | None:
        B = self.B
        P = req.prompt_tokens
        nb = -(-P // B)
        ids = self.ids_for(req.session, nb)
        lim = min(req.known_tokens // B, (P - 1) // B)  # full blocks computed before; >= 1 token left to compute
        miss = np.flatnonzero(self.present[ids[:lim]] == 0)
        h = int(miss[0]) if miss.size else max(lim, 0)
        in_top = (self.present[ids] & self.topbit) != 0
        queued = in_top & (self.pin[ids] == 0)
        need = nb - int(in_top.sum())
        avail = self.free_top() + len(self.free_q) - int(queued.sum())
        k = 0
        if need > avail:
            k = self.spill_for_admission(req, ids, need - avail)
            if k is None:
                return None
        found = self.lowest_tier(ids[:h])
        req.reused_by_tier = np.bincount(found, minlength=5)[:4].astype(np.int64) * B
        for cache in self.caches.values():
            cache.touch(ids.tolist())
        own0 = min(self.n_prefix, nb)
        low = ids[own0 : own0 + k]
        top_ids = np.concatenate([ids[:own0], ids[own0 + k :]])
        t_in = (self.present[top_ids] & self.topbit) != 0
        missing = top_ids[~t_in]
        if missing.size:  # hits found below the top tier are loaded (copied up) before anything is evicted
            src = self.lowest_tier(missing[np.isin(missing, ids[:h])])
            for t in np.unique(src).tolist():
                cnt = int((src == t).sum())
                self.add_move(int(t), self.top, cnt * self.bb, cnt, self.load_timing)
        # blocks kept below the top tier for this run (spill): moved down or found there
        if k:
            self.place_low(low, max(h - own0, 0))
        # the rest in the top tier: cached blocks are taken back from the queue, missing ones allocated
        for i in top_ids[t_in & (self.pin[top_ids] == 0)].tolist():
            self.free_q.pop(i, None)
        self.evict_top(missing.size - self.free_top())
        self.present[missing] |= self.topbit
        self.used_top += int(missing.size)
        self.pin[top_ids] += 1
        if self.pin_prefix and not self.prefix_pinned and own0 >= self.n_prefix and self.n_prefix:
            self.pin[: self.n_prefix] += 1
            self.prefix_pinned = True
        self.seq_ids[req.rid] = ids
        self.seq_low[req.rid] = k
        self.active[req.rid] = req
        return h * B

    def spill_for_admission(self, req: Request, ids: np.ndarray, shortfall: int) -> int | None:
        """Own blocks to keep below the top tier so that the request fits (None: it must wait)."""
        return None

    def place_low(self, low: np.ndarray, n_hit: int) -> None:  # pragma: no cover - spilling subclasses
        raise NotImplementedError

    # -- steps ------------------------------------------------------------------------------
    def make_room(self, batch: list[Request], new_tokens: np.ndarray) -> list[Request]:
        B = self.B
        want = {r.rid: -(-(r.ctx + int(nn)) // B) - self.seq_ids[r.rid].size for r, nn in zip(batch, new_tokens, strict=True)}
        total = sum(v for v in want.values() if v > 0)
        preempted: list[Request] = []
        while total > self.free_top() + len(self.free_q):
            if self.spill_for_growth():
                continue
            rid = next(reversed(self.active))  # the most recently admitted request (vLLM's order)
            victim = self.active[rid]
            self.release_blocks(victim)
            preempted.append(victim)
            total -= max(want.pop(rid, 0), 0)
        self.evict_top(total - self.free_top())
        for r in batch:
            k = want.get(r.rid, 0)
            if k <= 0:
                continue
            ids = self.seq_ids[r.rid]
            add = self.ids_for(r.session, ids.size + k)[ids.size :]
            self.present[add] |= self.topbit
            self.pin[add] += 1
            self.used_top += k
            self.seq_ids[r.rid] = np.concatenate([ids, add])
        return preempted

    def spill_for_growth(self) -> bool:
        """Free one top-tier block by moving a running sequence's block down (False: cannot)."""
        return False

    def layout(self, batch: list[Request], c: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = len(batch)
        pre = self.n_prefix * self.B
        low = np.array([self.seq_low[r.rid] for r in batch], dtype=np.int64) * self.B
        end = np.empty((m, N_SEGMENTS), dtype=np.int64)
        end[:, 0] = pre
        end[:, 1] = pre + low
        end[:, 2] = np.maximum(c + n, pre + low)
        tiers = np.empty((m, N_SEGMENTS), dtype=np.int64)
        tiers[:, 0] = self.top
        tiers[:, 1] = DRAM if self.top == HBM else self.top
        tiers[:, 2] = self.top
        return end, tiers

    def commit(self, batch: list[Request], c: np.ndarray, n: np.ndarray) -> None:
        if not self.write_through or not self.lower:
            return
        B = self.B
        f0, f1 = c // B, (c + n) // B
        first = self.lower[0]
        for i in np.flatnonzero(f1 > f0).tolist():
            ids = self.seq_ids[batch[i].rid][int(f0[i]) : int(f1[i])]
            self.store_lower(first, ids.tolist(), self.top, MoveTiming.PREFETCH)

    def release(self, req: Request) -> None:
        self.release_blocks(req)

    def release_blocks(self, req: Request) -> None:
        """Unpin a sequence's blocks (finished or preempted): they join the eviction queue, tail first."""
        ids = self.seq_ids.pop(req.rid)
        k = self.seq_low.pop(req.rid)
        self.active.pop(req.rid, None)
        own0 = min(self.n_prefix, ids.size)
        low = ids[own0 : own0 + k]
        top_ids = np.concatenate([ids[:own0], ids[own0 + k :]])
        self.pin[top_ids] -= 1
        freed = top_ids[self.pin[top_ids] == 0]
        for i in freed[::-1].tolist():  # tail first: the tail is evicted before the head
            self.free_q[i] = None
        if k:
            self.low_active -= k
            self.release_low(low)

    def release_low(self, low: np.ndarray) -> None:  # pragma: no cover - spilling subclasses
        raise NotImplementedError

    # -- reporting ---------------------------------------------------------------------------
    def occupancy_bytes(self) -> np.ndarray:
        occ = np.zeros(4)
        occ[self.top] = self.used_top * self.bb
        for t, cache in self.caches.items():
            occ[t] += len(cache) * self.bb
        occ[DRAM] += self.low_active * self.bb
        return occ

    def check(self) -> None:
        in_top = (self.present & self.topbit) != 0
        assert int(in_top.sum()) == self.used_top, (int(in_top.sum()), self.used_top)
        assert self.used_top <= self.cap_top
        assert (self.pin >= 0).all()
        assert int((in_top & (self.pin == 0)).sum()) == len(self.free_q)
        for i in self.free_q:
            assert in_top[i] and self.pin[i] == 0
        for t, cache in self.caches.items():
            held = int(((self.present & np.uint8(1 << t)) != 0).sum())
            extra = self.low_active if t == DRAM else 0
            assert held == len(cache) + extra, (TIER_NAMES[t], held, len(cache), extra)
            assert len(cache) + extra <= self.cap_lower[t]
        assert self.low_active == sum(self.seq_low.values())
