"""llama.cpp server's own KV handling: fixed slots, per-slot context reserved up front, host prompt cache.

What llama-server does (tools/server, with the host-memory prompt cache of
ggml-org/llama.cpp PR #16391), reproduced here:

- ``-np n_parallel`` slots share ``-c n_ctx = n_parallel * slot_context_tokens``
  cells, all allocated when the context is created: in VRAM if they fit beside
  the weights, else (``-nkvo``) in host memory with attention on the CPU; beyond
  host memory the server does not start (no invented fallback).
- A request takes an idle slot: the one whose cached tokens share the longest
  common prefix with its prompt when that covers more than
  ``slot_prompt_similarity`` (0.5) of the prompt, else the least recently used.
  Requests beyond the idle slots wait in a FIFO queue. The slot keeps the
  common prefix of its cells and prefills the rest of the prompt.
- Host prompt cache (``--cache-ram``, 8192 MiB by default; at most ``n_ctx``
  cached tokens): before a slot is reused by another conversation its state is
  saved to host RAM; when a cached state shares a longer prefix with the new
  prompt than the slot does, it is loaded into the slot. Entries are whole
  conversation states, evicted least-recently-used. Saves and loads are
  synchronous copies (``llama_state_seq_get/set_data``), one transfer per
  layer and K/V tensor.
- Each slot holds its own copy of a shared system prompt (llama.cpp does not
  share cells between slots); reuse of the prompt comes from the prefix match.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

from llamatier.serving.policies.base import (
    PolicyCannotRun,
    ServingPolicy,
    register_serving_policy,
    uniform_layout,
)
from llamatier.tiers import DRAM, HBM, MoveTiming
from llamatier.units import format_bytes

if TYPE_CHECKING:
    from llamatier.serving.context import ServingContext
    from llamatier.serving.plan import Plan
    from llamatier.serving.requests import Request

DEFAULT_OPEN_LOOP_SLOTS = 4


@register_serving_policy
class LlamaCppServerPolicy(ServingPolicy):
    """llama-server: n_parallel slots each reserving n_ctx/n_parallel; 8 GiB host prompt cache; FIFO queue."""

    name = "llamacpp-server"
    summary = "llama.cpp server: n_parallel slots reserved up front (VRAM, else -nkvo host), host prompt cache, FIFO queue"
    dram_reads = "host"

    def __init__(self, slot_prompt_similarity: float = 0.5) -> None:
        super().__init__()
        self.similarity = float(slot_prompt_similarity)

    def params(self) -> dict[str, Any]:
        return {
            "n_parallel": getattr(self, "n_slots", None),
            "slot_prompt_similarity": self.similarity,
            "cache_ram_bytes": getattr(self, "cache_limit_bytes", None),
            "kv_tier": getattr(self, "tier_name", None),
        }

    def start(self, ctx: ServingContext, plan: Plan) -> str:
        sv = ctx.spec.server
        if sv.n_parallel is not None:
            n = sv.n_parallel
            how = "from server.n_parallel"
        elif ctx.spec.closed_loop:
            n = int(ctx.spec.users)
            how = "one per user"
        else:
            n = DEFAULT_OPEN_LOOP_SLOTS
            how = "llama-server's default for an open-loop workload"
        self.n_slots = n
        self.slot_tokens = sv.slot_context_tokens
        self.n_ctx = n * self.slot_tokens
        self.bpt = float(ctx.bytes_per_token)
        self.transfers = 2.0 * ctx.n_layers  # one per layer and K/V tensor
        self.prefix = plan.prefix_tokens
        reserved = self.n_ctx * self.bpt
        caps = ctx.capacity_bytes
        self.cache_limit_bytes = float(sv.cache_ram_bytes)
        what = f"{n} slots ({how}) x {self.slot_tokens} tokens reserve {format_bytes(reserved)} of KV"
        if not ctx.host_only and reserved <= caps[HBM]:
            self.tier, self.tier_name = HBM, "hbm"
            verdict = f"{what} in VRAM"
        elif reserved <= caps[DRAM]:
            self.tier, self.tier_name = DRAM, "dram"
            verdict = f"{what}: {'CPU host, KV in RAM' if ctx.host_only else 'over VRAM, so -nkvo: KV in host RAM'}"
        else:
            raise PolicyCannotRun(
                f"{what}: more than VRAM ({format_bytes(caps[HBM])}) and host RAM ({format_bytes(caps[DRAM])}): "
                "llama-server does not start"
            )
        room = caps[DRAM] - (reserved if self.tier == DRAM else 0.0)
        if self.cache_limit_bytes > room:
            self.cache_limit_bytes = max(room, 0.0)
            verdict += f"; host prompt cache cut to the {format_bytes(room)} of RAM left"
        self.reserved = reserved
        self.slot_session = np.full(n, -1, dtype=np.int64)
        self.slot_tokens_held = np.zeros(n, dtype=np.int64)
        self.slot_busy = np.zeros(n, dtype=bool)
        self.slot_last = np.zeros(n, dtype=np.int64)
        self.slot_of: dict[int, int] = {}  # rid -> slot
        self.cache: OrderedDict[int, int] = OrderedDict()  # session -> tokens, least recent first
        self.cache_tokens = 0
        self.clock = 0
        return verdict

    # -- prefix matching ------------------------------------------------------------------
    def _lcp(self, held_session: int, held_tokens: int, session: int, prompt: int) -> int:
        if held_session < 0 or held_tokens <= 0:
            return 0
        if held_session == session:
            return min(held_tokens, prompt)
        return min(self.prefix, held_tokens, prompt)

    def _save(self, slot: int) -> None:
        """Save a slot's state to the host prompt cache (replacing the session's older entry)."""
        s, tok = int(self.slot_session[slot]), int(self.slot_tokens_held[slot])
        if s < 0 or tok <= 0:
            return
        if s in self.cache:
            self.cache_tokens -= self.cache.pop(s)
        if tok * self.bpt > self.cache_limit_bytes or tok > self.n_ctx:
            return
        self.add_move(self.tier, DRAM, tok * self.bpt, self.transfers, MoveTiming.DEMAND)
        self.cache[s] = tok
        self.cache_tokens += tok
        while self.cache_tokens * self.bpt > self.cache_limit_bytes or self.cache_tokens > self.n_ctx:
            _, t = self.cache.popitem(last=False)
            self.cache_tokens -= t

    def admit(self, req: Request, now_s: float) -> int | None:
        idle = np.flatnonzero(~self.slot_busy)
        if idle.size == 0:
            return None
        P = req.prompt_tokens
        lcps = np.array([self._lcp(int(self.slot_session[i]), int(self.slot_tokens_held[i]), req.session, P) for i in idle])
        best = int(np.argmax(lcps))
        if P > 0 and lcps[best] > self.similarity * P:
            slot = int(idle[best])
        else:
            slot = int(idle[np.argmin(self.slot_last[idle])])  # least recently used (never used: 0)
        keep = self._lcp(int(self.slot_session[slot]), int(self.slot_tokens_held[slot]), req.session, P)
        cached = [(self._lcp(s, tok, req.session, P), s) for s, tok in self.cache.items()]
        found_tier = self.tier
        if cached:
            c_lcp, c_sess = max(cached)
            if c_lcp > keep:
                tok = self.cache.pop(c_sess)
                self.cache_tokens -= tok
                if self.slot_session[slot] != req.session:
                    self._save(slot)
                self.add_move(DRAM, self.tier, tok * self.bpt, self.transfers, MoveTiming.DEMAND)
                keep, found_tier = c_lcp, DRAM
        if found_tier == self.tier and self.slot_session[slot] not in (-1, req.session):
            self._save(slot)
        keep = min(keep, max(P - 1, 0))  # the last prompt token is always evaluated (its logits give the first output)
        self.slot_session[slot] = req.session
        self.slot_tokens_held[slot] = keep
        self.slot_busy[slot] = True
        self.clock += 1
        self.slot_last[slot] = self.clock
        self.slot_of[req.rid] = slot
        req.reused_by_tier = np.zeros(4, dtype=np.int64)
        req.reused_by_tier[found_tier] = keep
        return keep

    def make_room(self, batch: list[Request], new_tokens: np.ndarray) -> list[Request]:
        return []  # every slot's cells were reserved at start

    def layout(self, batch: list[Request], c: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return uniform_layout(c, n, self.tier)

    def release(self, req: Request) -> None:
        slot = self.slot_of.pop(req.rid)
        self.slot_busy[slot] = False
        self.slot_tokens_held[slot] = req.ctx
        self.clock += 1
        self.slot_last[slot] = self.clock

    def occupancy_bytes(self) -> np.ndarray:
        occ = np.zeros(4)
        occ[self.tier] += self.reserved
        occ[DRAM] += self.cache_tokens * self.bpt
        return occ

    def check(self) -> None:
        assert self.cache_tokens == sum(self.cache.values())
        assert self.cache_tokens * self.bpt <= self.cache_limit_bytes + 1e-6
        assert (self.slot_tokens_held <= self.slot_tokens).all()
        assert int(self.slot_busy.sum()) == len(self.slot_of)
