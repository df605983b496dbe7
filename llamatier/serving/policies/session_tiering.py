"""Session tiering: hot/warm/cold placement of whole sessions across the tiers.

It ranks sessions by whether they run, wait or went idle and for how long; it
never reads attention mass (that is the replay's ``adaptive`` policy, which
places blocks by the attention they received).

Built on the paged machinery (:mod:`llamatier.serving.policies.paged`):

- **hot** (HBM): running sequences and the shared system prompt, which every
  request reads every step; the prefix is pinned in HBM once computed;
- **warm** (DRAM): idle sessions likely to come back. Running sequences are not
  written through; when a session goes idle its HBM blocks are copied to DRAM
  in the background, at most half of each step's link time (write-back into
  idle link time), so that evicting them later costs no copy; blocks still
  uncopied when HBM needs the room are copied then;
- **cold**: idle sessions that have waited longer than the ``cold_quantile``
  of the think times observed so far (causal: learned from returns already
  seen, at least ``min_observations``), most of which have ended: first in
  line for eviction from HBM and from DRAM (down to SSD). When a session's
  next request arrives it is hot again, and while it waits for admission its
  KV is staged from SSD back into DRAM (a prefetch into idle link time);
- when HBM cannot hold every running sequence, instead of preempting or
  queueing, the oldest blocks of running sequences stay in (or move to) DRAM
  and are read there each step (host attention or fetch, whichever the cost
  model finds cheaper per layer), within a per-step budget of host-attention
  time: at most ``spill_budget_ms`` (default a quarter of the workload's TPOT
  SLO, else 20 ms) and at most the recent step time divided by the batch size
  (learned from the costed steps: beyond it a spilled sequence slows every
  other one more than it adds throughput). Beyond the budget it preempts like vLLM.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any

import numpy as np

from llamatier.serving.policies.base import register_serving_policy
from llamatier.serving.policies.paged import PagedPolicy
from llamatier.tiers import DRAM, SSD, TIER_NAMES, MoveTiming
from llamatier.units import format_bytes, format_seconds

if TYPE_CHECKING:
    from llamatier.serving.context import ServingContext
    from llamatier.serving.plan import Plan
    from llamatier.serving.requests import Request

DEFAULT_SPILL_FRACTION_OF_SLO = 0.25
DEFAULT_SPILL_BUDGET_S = 0.020


@register_serving_policy
class SessionTieringPolicy(PagedPolicy):
    """Hot/warm/cold across sessions: pinned prefix, write-back, cold detection, bounded spill of running KV."""

    name = "session-tiering"
    summary = "hot (running + shared prefix) in HBM, warm idle sessions in DRAM, cold ones to SSD; bounded DRAM spill"
    dram_reads = "auto"
    write_through = False
    pin_prefix = True
    cache_kind = "lru"

    def __init__(
        self,
        tiers: tuple[str, ...] | list[str] = ("dram", "ssd"),
        spill_budget_ms: float | None = None,
        cold_quantile: float = 0.95,
        min_observations: int = 8,
    ) -> None:
        super().__init__(tiers)
        if spill_budget_ms is not None and spill_budget_ms < 0:
            raise ValueError("spill_budget_ms must be >= 0")
        if not 0.0 < cold_quantile <= 1.0 or min_observations < 1:
            raise ValueError("cold_quantile must be in (0, 1] and min_observations >= 1")
        self.spill_budget_ms = spill_budget_ms
        self.cold_quantile = float(cold_quantile)
        self.min_observations = int(min_observations)

    def params(self) -> dict[str, Any]:
        return {
            **super().params(),
            "spill_budget_s": getattr(self, "spill_budget_s", None),
            "cold_quantile": self.cold_quantile,
            "min_observations": self.min_observations,
        }

    def start(self, ctx: ServingContext, plan: Plan) -> str:
        if self.spill_budget_ms is not None:
            self.spill_budget_s = self.spill_budget_ms / 1e3
        elif ctx.spec.slo_tpot_s is not None:
            self.spill_budget_s = DEFAULT_SPILL_FRACTION_OF_SLO * ctx.spec.slo_tpot_s
        else:
            self.spill_budget_s = DEFAULT_SPILL_BUDGET_S
        bb = float(ctx.block_bytes)
        has_dram_tier = "dram" in self.tier_names
        self.host_bw = float(ctx.profile.compute.host_attention_bytes_per_s)
        self.roundtrip_s = ctx.n_layers * float(ctx.profile.compute.host_roundtrip_s)
        self.spill_budget_blocks = 0
        if not ctx.host_only and has_dram_tier:
            self.spill_budget_blocks = int(max(self.spill_budget_s - self.roundtrip_s, 0.0) * self.host_bw // bb)
        self.recent_step_s: float | None = None
        self.recent_batch = 1.0
        link, dram = ctx.profile.link("hbm_dram"), ctx.profile.tier("dram")
        self.wb_bytes_per_s = min(link.bytes_per_s, dram.write_bytes_per_s)
        self.wb_queue: deque[int] = deque()
        ssd, ssd_link = ctx.profile.tier("ssd"), ctx.profile.link("dram_ssd").bytes_per_s
        self.stage_bytes_per_s = min(ssd_link, ssd.read_bytes_per_s, dram.write_bytes_per_s)
        self.spill_down_bytes_per_s = min(ssd_link, ssd.write_bytes_per_s, dram.read_bytes_per_s)
        self.stage_queue: deque[int] = deque()
        verdict = super().start(ctx, plan)
        self.spill_budget_blocks = min(self.spill_budget_blocks, self.cap_lower.get(DRAM, 0))
        self.released: OrderedDict[int, float] = OrderedDict()  # idle, not yet cold session -> time it went idle
        self.idle_since: dict[int, float] = {}  # every idle session -> time it went idle
        self.pending: list[int] = []  # went idle since the last tick (time known at the next one)
        self.think_obs: list[float] = []
        self.cold: set[int] = set()
        self._threshold: tuple[int, float] = (0, float("inf"))
        spill = (
            f"spills up to {format_bytes(self.spill_budget_blocks * bb)} of running KV to DRAM "
            f"({format_seconds(self.spill_budget_s)} of host attention per step)"
            if self.spill_budget_blocks
            else "no spill"
        )
        top = TIER_NAMES[self.top]
        return f"{verdict}; prefix pinned in {top}, write-back, cold after the q{self.cold_quantile:g} think time; {spill}"

    def can_spill(self) -> bool:
        return self.spill_budget_blocks > 0

    def observe(self, step_s: np.ndarray, batch_seqs: np.ndarray) -> None:
        if step_s.size:
            t, m = float(step_s.mean()), float(batch_seqs.mean())
            a = 0.2
            self.recent_step_s = t if self.recent_step_s is None else (1 - a) * self.recent_step_s + a * t
            self.recent_batch = (1 - a) * self.recent_batch + a * max(m, 1.0)

    def spill_allowed_blocks(self) -> int:
        """Blocks of running KV that may sit in DRAM now (see the module docstring)."""
        if self.spill_budget_blocks == 0:
            return 0
        if self.recent_step_s is None:
            return self.spill_budget_blocks
        budget = min(self.spill_budget_s, self.recent_step_s / self.recent_batch) - self.roundtrip_s
        return min(self.spill_budget_blocks, int(max(budget, 0.0) * self.host_bw // self.bb))

    # -- spill -------------------------------------------------------------------------------
    def spill_for_admission(self, req: Request, ids: np.ndarray, shortfall: int) -> int | None:
        own = ids.size - min(self.n_prefix, ids.size)
        if shortfall > own or self.low_active + shortfall > self.spill_allowed_blocks():
            return None
        return shortfall

    def place_low(self, low: np.ndarray, n_hit: int) -> None:
        bit = np.uint8(1 << DRAM)
        cache = self.caches[DRAM]
        for j, i in enumerate(low.tolist()):
            p = int(self.present[i])
            if p & int(self.topbit):  # cached in HBM: move it down
                self.free_q.pop(i, None)
                self.present[i] &= ~self.topbit
                self.used_top -= 1
                if not p & int(bit):
                    self.add_move(self.top, DRAM, self.bb, 1, MoveTiming.DEMAND)
            elif p & int(bit):
                pass
            elif j < n_hit:  # found on SSD/remote: staged into DRAM
                src = int(self.lowest_tier(np.array([i]))[0])
                self.add_move(src, DRAM, self.bb, 1, self.load_timing)
            cache.remove([i])
            self.present[i] |= bit
        self.low_active += low.size
        self.evicted_lower(DRAM, cache.resize(self.cap_lower[DRAM] - self.low_active))

    def spill_for_growth(self) -> bool:
        if self.low_active + 1 > self.spill_allowed_blocks():
            return False
        best, best_free = None, 0
        for rid, ids in self.seq_ids.items():
            movable = ids.size - min(self.n_prefix, ids.size) - self.seq_low[rid] - 1  # keep the growing tail
            if movable > best_free:
                best, best_free = rid, movable
        if best is None:
            return False
        ids = self.seq_ids[best]
        i = int(ids[min(self.n_prefix, ids.size) + self.seq_low[best]])
        self.present[i] = (self.present[i] & ~self.topbit) | np.uint8(1 << DRAM)
        self.pin[i] -= 1
        self.used_top -= 1
        self.add_move(self.top, DRAM, self.bb, 1, MoveTiming.DEMAND)
        self.seq_low[best] += 1
        self.low_active += 1
        self.caches[DRAM].remove([i])
        self.evicted_lower(DRAM, self.caches[DRAM].resize(self.cap_lower[DRAM] - self.low_active))
        return True

    def release_low(self, low: np.ndarray) -> None:
        cache = self.caches[DRAM]
        evicted = cache.resize(self.cap_lower[DRAM] - self.low_active)
        evicted += cache.store(low.tolist())  # already in DRAM: joins the cache without a copy
        kept = set(cache.stored_of(low.tolist()))
        lost = [i for i in low.tolist() if i not in kept]
        if lost:
            self.evicted_lower(DRAM, lost)
        if evicted:
            self.evicted_lower(DRAM, evicted)

    # -- write-back and cold sessions ---------------------------------------------------------
    def on_evict_top(self, ids: list[int]) -> None:
        dram_bit = 1 << DRAM
        back = [i for i in ids if not (int(self.present[i]) & dram_bit)]
        self.store_lower(DRAM, back, self.top)  # DRAM's coldest blocks make room (cold sessions first)

    def commit(self, batch: list[Request], c: np.ndarray, n: np.ndarray) -> None:
        """Background copies into the step's idle link time (at most half the recent step time per link):
        idle sessions' HBM blocks written back to DRAM, returning sessions' blocks staged from SSD to DRAM."""
        if DRAM not in self.caches or self.top != 0 or not (self.wb_queue or self.stage_queue):
            return
        step_s = self.recent_step_s if self.recent_step_s is not None else 0.0
        dram_bit, top = 1 << DRAM, int(self.topbit)
        # a copy into a full DRAM pushes a block down to SSD: that copy shares the budget too
        dram = self.caches[DRAM]
        free = max(dram.capacity - len(dram), 0)
        room = free + (int(0.5 * step_s * self.spill_down_bytes_per_s // self.bb) if SSD in self.caches else 0)
        budget = max(1, min(int(0.5 * step_s * self.wb_bytes_per_s // self.bb), room))
        out: list[int] = []
        while self.wb_queue and len(out) < budget:
            i = self.wb_queue.popleft()
            p = int(self.present[i])
            if p & top and not p & dram_bit and self.pin[i] == 0:
                out.append(i)
        self.store_lower(DRAM, out, self.top)
        room -= len(out)
        budget = min(int(0.5 * step_s * self.stage_bytes_per_s // self.bb), room)
        staged: list[int] = []
        while self.stage_queue and len(staged) < budget:
            i = self.stage_queue.popleft()
            if not int(self.present[i]) & (dram_bit | top) and self.present[i]:
                staged.append(i)
        if staged:
            src = self.lowest_tier(np.array(staged))
            for t in np.unique(src).tolist():
                self.store_lower(DRAM, [i for i, x in zip(staged, src.tolist(), strict=True) if x == t], int(t))

    def release(self, req: Request) -> None:
        ids = self.seq_ids[req.rid]
        super().release(req)
        self.pending.append(req.session)  # finished: the session goes idle
        own = ids[min(self.n_prefix, ids.size) :]
        self.wb_queue.extend(own[::-1].tolist())  # tail first, like eviction

    def arrived(self, req: Request, now_s: float) -> None:
        """A session came back: it is hot again; stage its KV from SSD into DRAM while it queues."""
        s = req.session
        self.released.pop(s, None)
        if s in self.idle_since:  # cold ones too: dropping them would bias the think times seen short
            self.think_obs.append(max(req.arrival_s - self.idle_since.pop(s), 0.0))
        if s in self.pending:
            self.pending.remove(s)
        self.cold.discard(s)
        dram = self.caches.get(DRAM)
        if dram is None or self.top != 0:
            return
        base = self.n_prefix + s * self.max_blocks
        p = self.present[base : base + self.max_blocks]
        held = np.flatnonzero(p)
        if held.size == 0:
            return
        run = held[: int(np.argmax(np.r_[np.diff(held) != 1, True])) + 1] if held[0] == 0 else held[:0]
        ids = (base + run).tolist()  # the leading blocks a prefix-cache lookup can use
        dram.touch(ids)
        self.stage_queue.extend(i for i in ids if not int(self.present[i]) & ((1 << DRAM) | int(self.topbit)))

    def admit(self, req: Request, now_s: float) -> int | None:
        reused = super().admit(req, now_s)
        if reused is not None:
            self.cold.discard(req.session)
        return reused

    def tick(self, now_s: float) -> None:
        for s in self.pending:
            self.released[s] = now_s
            self.idle_since[s] = now_s
        self.pending.clear()
        if len(self.think_obs) < self.min_observations or not self.released:
            return
        n, thr = self._threshold
        if n != len(self.think_obs):
            thr = float(np.quantile(self.think_obs, self.cold_quantile))
            self._threshold = (len(self.think_obs), thr)
        while self.released:
            s, t = next(iter(self.released.items()))
            if now_s - t <= thr:
                break
            self.released.pop(s)
            self._make_cold(s)

    def _make_cold(self, s: int) -> None:
        self.cold.add(s)
        base = self.n_prefix + s * self.max_blocks
        own = base + np.flatnonzero(self.present[base : base + self.max_blocks])
        for i in own.tolist():  # ascending: the tail ends up first in line
            if i in self.free_q:
                self.free_q.move_to_end(i, last=False)
        if DRAM in self.caches:
            self.caches[DRAM].demote_first(own.tolist())
