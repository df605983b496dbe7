"""The serving-level policy interface and its registry.

A serving policy owns where every session's KV lives across the four tiers:
which requests it can admit, which cached tokens a returning session reuses
(and from which tier), where new KV goes, what it evicts, demotes or
preempts when a tier is full. The engine (:mod:`llamatier.serving.engine`)
owns requests, batching, time and costing. The calls, in order::

    start(ctx, plan)                 -> verdict line         once
    tick(now_s)                                              at each scheduling point
    arrived(req, now_s)                                      a request joins the waiting queue
    admit(req, now_s)                -> reused tokens | None  a waiting request (None: not now)
    make_room(batch, new_tokens)     -> preempted requests   before each step
    layout(batch, c, n)              -> (seg_end, seg_tier)  where each sequence's KV is, for the reads
    commit(batch, c, n)                                      after the step's tokens are in KV
    release(req)                                             a request finished
    observe(step_s, batch_seqs)                              costed step times, after each chunk
    take_moves()                     -> bytes, transfers     [3 timings, 4 src, 4 dst] since last call
    occupancy_bytes()                -> [4]                  bytes held per tier now
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from llamatier.errors import LlamatierError
from llamatier.registry import SERVING_POLICIES
from llamatier.serving.requests import DECODE, PREFILL
from llamatier.tiers import N_TIERS, N_TIMINGS, MoveTiming

if TYPE_CHECKING:
    from collections import deque

    from llamatier.serving.context import ServingContext
    from llamatier.serving.plan import Plan
    from llamatier.serving.requests import Request

N_SEGMENTS = 3  # layout segments per sequence: shared prefix, lower part, upper part


class PolicyCannotRun(LlamatierError):
    """This policy cannot serve this workload on this machine (the verdict says why)."""


class ServingPolicy(ABC):
    """Base class of serving-level KV policies (see the module docstring for the protocol)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    dram_reads: ClassVar[str] = "fetch"  # how the cost model reads DRAM-resident KV: "host", "fetch", "auto"

    def __init__(self) -> None:
        self._moves_bytes = np.zeros((N_TIMINGS, N_TIERS, N_TIERS))
        self._moves_count = np.zeros((N_TIMINGS, N_TIERS, N_TIERS))

    @abstractmethod
    def start(self, ctx: ServingContext, plan: Plan) -> str:
        """Set up; return a one-line verdict, or raise PolicyCannotRun."""

    def tick(self, now_s: float) -> None:  # noqa: B027 - optional hook
        """Time-driven housekeeping at a scheduling point (called before admissions)."""

    def arrived(self, req: Request, now_s: float) -> None:  # noqa: B027 - optional hook
        """``req`` joined the waiting queue (a server sees a request arrive before it can run it)."""

    @abstractmethod
    def admit(self, req: Request, now_s: float) -> int | None:
        """Start ``req`` now: reserve its KV and return the prompt tokens reused (None: it must wait).

        Must also set ``req.reused_by_tier`` (tokens found per tier for this admission).
        """

    @abstractmethod
    def make_room(self, batch: list[Request], new_tokens: np.ndarray) -> list[Request]:
        """Make room for this step's new KV; return requests preempted (their KV released)."""

    @abstractmethod
    def layout(self, batch: list[Request], c: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Segments of each sequence's KV after this step's writes: (seg_end [m, 3], seg_tier [m, 3])."""

    def commit(self, batch: list[Request], c: np.ndarray, n: np.ndarray) -> None:  # noqa: B027 - optional hook
        """The step's tokens are in KV now (``req.ctx`` = c + n; c, n as given to ``layout``)."""

    @abstractmethod
    def release(self, req: Request) -> None:
        """``req`` finished: its KV becomes its session's idle KV (kept, demoted or dropped)."""

    @abstractmethod
    def occupancy_bytes(self) -> np.ndarray:
        """Bytes held (or reserved) per tier now, float64 [4]."""

    def form_batch(self, running: list[Request], max_tokens: int) -> tuple[list[Request], np.ndarray]:
        """This step's batch: decoding sequences first (one token each), then prefill chunks in admission order."""
        batch: list[Request] = []
        n: list[int] = []
        budget = max_tokens
        for r in running:
            if r.phase == DECODE and budget > 0:
                batch.append(r)
                n.append(1)
                budget -= 1
        for r in running:
            if budget <= 0:
                break
            if r.phase == PREFILL:
                k = min(r.prefill_left, budget)
                batch.append(r)
                n.append(k)
                budget -= k
        return batch, np.asarray(n, dtype=np.int64)

    def order_waiting(self, waiting: deque[Request]) -> None:  # noqa: B027 - optional hook
        """Reorder the waiting queue in place before admissions (default: first come, first served)."""

    def seq_id(self, req: Request) -> int | None:
        """The llama.cpp sequence (KV stream) of a running request, or None: its place in the batch."""
        return None

    def take_host_copy_bytes(self) -> float:
        """Bytes copied within host memory since the last call (synchronous state copies)."""
        return 0.0

    def observe(self, step_s: np.ndarray, batch_seqs: np.ndarray) -> None:  # noqa: B027 - optional hook
        """Costed times of the steps just run and their batch sizes (causal feedback)."""

    def params(self) -> dict[str, Any]:
        """Tunable parameters, for reports."""
        return {}

    def check(self) -> None:  # noqa: B027 - optional hook
        """Verify internal invariants (tests call it; raises AssertionError)."""

    # -- moves -------------------------------------------------------------------------
    def add_move(self, src: int, dst: int, n_bytes: float, transfers: float, timing: int = MoveTiming.DEMAND) -> None:
        """Record a copy of ``n_bytes`` from tier ``src`` to ``dst`` in ``transfers`` transfers."""
        if n_bytes <= 0 or src == dst:
            return
        self._moves_bytes[timing, src, dst] += n_bytes
        self._moves_count[timing, src, dst] += transfers

    def take_moves(self) -> tuple[np.ndarray, np.ndarray]:
        """Moves recorded since the last call (bytes, transfers), each [3, 4, 4]."""
        b, c = self._moves_bytes, self._moves_count
        self._moves_bytes = np.zeros((N_TIMINGS, N_TIERS, N_TIERS))
        self._moves_count = np.zeros((N_TIMINGS, N_TIERS, N_TIERS))
        return b, c


def register_serving_policy(cls: type[ServingPolicy]) -> type[ServingPolicy]:
    """Register a ServingPolicy subclass under ``cls.name`` (a decorator); duplicates are refused."""
    return SERVING_POLICIES.register(cls)


def serving_policy_names() -> list[str]:
    """Registered serving policy names (built-ins and plug-ins)."""
    return SERVING_POLICIES.names()


def make_serving_policy(policy: str | type[ServingPolicy] | ServingPolicy, **params: Any) -> ServingPolicy:
    """A fresh policy from a name, class or instance; an unknown name lists the valid ones."""
    return SERVING_POLICIES.create(policy, **params)


def uniform_layout(c: np.ndarray, n: np.ndarray, tier: int) -> tuple[np.ndarray, np.ndarray]:
    """Every sequence's KV in one tier (llama.cpp slots)."""
    m = c.shape[0]
    end = np.zeros((m, N_SEGMENTS), dtype=np.int64)
    end[:, :] = (c + n)[:, None]
    return end, np.full((m, N_SEGMENTS), tier, dtype=np.int64)
