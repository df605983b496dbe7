"""llama.cpp server's own KV handling: fixed slots, per-slot context reserved up front, host prompt cache.

What llama-server does, reproduced here (the rules, each with the source
function it is read from, are in :mod:`llamatier.serving.slots`):

- ``-np n_parallel`` slots share ``-c n_ctx = n_parallel * slot_context_tokens``
  cells, all allocated when the context is created: in VRAM if they fit beside
  the weights, else (``-nkvo``) in host memory with attention on the CPU; beyond
  host memory the server does not start (no invented fallback).
- A request takes an idle slot by prompt similarity (``--slot-prompt-similarity``,
  0.1) or, failing that, the least recently used one; requests beyond the idle
  slots wait (FIFO). The slot keeps the longest common prefix, subject to the
  sliding-window cache's context checkpoints.
- The host prompt cache (``--cache-ram``, 8192 MiB) saves a slot's state before
  another conversation takes it, and loads back the entry that serves the new
  prompt better. Saves, loads and checkpoints are synchronous copies.
- Prompts are batched in slot order after the generating slots, split before
  their last ``4 + n_ubatch`` and last 4 tokens on sliding-window models (for
  checkpoints). Each slot holds its own copy of a shared system prompt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from llamatier.serving.policies.base import (
    PolicyCannotRun,
    ServingPolicy,
    register_serving_policy,
    uniform_layout,
)
from llamatier.serving.requests import DECODE, PREFILL
from llamatier.serving.slots import ServerConfig, Slots
from llamatier.tiers import DRAM, HBM, MoveTiming
from llamatier.units import format_bytes

if TYPE_CHECKING:
    from collections import deque

    from llamatier.serving.context import ServingContext
    from llamatier.serving.plan import Plan
    from llamatier.serving.requests import Request

DEFAULT_OPEN_LOOP_SLOTS = 4
DEFAULT_SLOT_PROMPT_SIMILARITY = 0.1  # common/common.h: slot_prompt_similarity


@register_serving_policy
class LlamaCppServerPolicy(ServingPolicy):
    """llama-server: n_parallel slots each reserving n_ctx/n_parallel; host prompt cache; FIFO queue."""

    name = "llamacpp-server"
    summary = "llama.cpp server: n_parallel slots reserved up front (VRAM, else -nkvo host), host prompt cache, FIFO queue"
    dram_reads = "host"

    def __init__(self, slot_prompt_similarity: float = DEFAULT_SLOT_PROMPT_SIMILARITY) -> None:
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
        lay = ctx.kv_layout()
        swa = np.asarray(ctx.windows)[ctx.kind_of_layer] > 0
        n_swa = 0 if lay.swa_full else int(max(lay.windows) if lay.windows else 0)
        self.slots = Slots(ServerConfig(
            n_slots=n,
            prefix_tokens=plan.prefix_tokens,
            n_swa=n_swa,
            swa_cells=lay.swa_cells,
            global_bytes_per_token=float(ctx.bytes_per_token_layer[~swa].sum()),
            swa_bytes_per_token=float(ctx.bytes_per_token_layer[swa].sum()),
            cache_limit_bytes=self.cache_limit_bytes,
            n_batch=sv.max_batch_tokens,
            n_ubatch=lay.n_ubatch,
            similarity=self.similarity,
        ))
        self.slot_of: dict[int, int] = {}  # rid -> slot
        self.host_copy_bytes = 0.0
        self.deferred: list[Request] = []  # requests refused for lack of a slot, in the order refused
        self.released = 0  # slots released since the last admission round
        return verdict

    # -- scheduling --------------------------------------------------------------------------
    def order_waiting(self, waiting: deque[Request]) -> None:
        """server-queue.cpp: a released slot moves one deferred task to the *front* of the task queue.

        ``pop_deferred_task`` runs once per released slot with ``emplace_front``, so
        deferred tasks popped in one iteration run last-popped first, ahead of tasks
        not yet tried; deferred tasks not popped keep waiting.
        """
        if not self.deferred:
            self.released = 0
            return
        popped = [r for r in self.deferred[: self.released]]
        head = set(id(r) for r in popped)
        rest = [r for r in waiting if id(r) not in head]
        waiting.clear()
        waiting.extend(reversed(popped))
        waiting.extend(r for r in rest if r not in self.deferred)  # tasks not tried yet, in arrival order
        waiting.extend(r for r in self.deferred[self.released:] if r in rest)  # still deferred
        self.released = 0

    def admit(self, req: Request, now_s: float) -> int | None:
        launch = self.slots.start(req.session, req.prompt_tokens)
        if launch is None:
            if req not in self.deferred:
                self.deferred.append(req)  # server_queue::defer
            return None
        if req in self.deferred:
            self.deferred.remove(req)
        self._copy(launch.saved_bytes, to_host=True)
        self._copy(launch.loaded_bytes, to_host=False)
        self.slot_of[req.rid] = launch.slot
        req.reused_by_tier = np.zeros(4, dtype=np.int64)
        req.reused_by_tier[DRAM if launch.from_cache and self.tier != DRAM else self.tier] = launch.n_past
        return launch.n_past

    def _copy(self, nbytes: float, *, to_host: bool) -> None:
        """A synchronous state copy between the slot's KV and host memory (prompt cache, checkpoints)."""
        if nbytes <= 0:
            return
        if self.tier == DRAM:
            self.host_copy_bytes += nbytes
        elif to_host:
            self.add_move(self.tier, DRAM, nbytes, self.transfers, MoveTiming.DEMAND)
        else:
            self.add_move(DRAM, self.tier, nbytes, self.transfers, MoveTiming.DEMAND)

    def seq_id(self, req: Request) -> int:
        return self.slot_of[req.rid]

    def form_batch(self, running: list[Request], max_tokens: int) -> tuple[list[Request], np.ndarray]:
        """server-context.cpp ``pre_decode``: generating slots in slot order, then prompts in slot order."""
        by_slot = sorted(running, key=lambda r: self.slot_of[r.rid])
        batch: list[Request] = [r for r in by_slot if r.phase == DECODE]
        n: list[int] = [1] * len(batch)
        used = len(batch)
        for r in by_slot:
            if r.phase != PREFILL or used >= max_tokens:
                continue
            slot = self.slot_of[r.rid]
            k = self.slots.prompt_chunk(slot, r.prefill_left, max_tokens - used)
            self._copy(self.slots.before_prompt_batch(slot, k, r.prefill_left), to_host=True)
            batch.append(r)
            n.append(k)
            used += k
        return batch, np.asarray(n, dtype=np.int64)

    def take_host_copy_bytes(self) -> float:
        b, self.host_copy_bytes = self.host_copy_bytes, 0.0
        return b

    def make_room(self, batch: list[Request], new_tokens: np.ndarray) -> list[Request]:
        return []  # every slot's cells were reserved at start

    def layout(self, batch: list[Request], c: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return uniform_layout(c, n, self.tier)

    def commit(self, batch: list[Request], c: np.ndarray, n: np.ndarray) -> None:
        for r, k in zip(batch, n.tolist(), strict=True):
            self.slots.add_tokens(self.slot_of[r.rid], int(k))

    def release(self, req: Request) -> None:
        self.slots.release(self.slot_of.pop(req.rid))
        self.released += 1

    def occupancy_bytes(self) -> np.ndarray:
        occ = np.zeros(4)
        occ[self.tier] += self.reserved
        occ[DRAM] += self.slots.cache_bytes()
        return occ

    def check(self) -> None:
        assert self.slots.cache_bytes() <= self.cache_limit_bytes + 1e-6
        assert all(h.n_tokens <= self.slot_tokens for h in self.slots.held)
        assert sum(self.slots.busy) == len(self.slot_of)
