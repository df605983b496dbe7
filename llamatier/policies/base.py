"""The placement-policy interface both replay engines drive, and the policy registry.

A policy decides, step by step, in which tier (0 hbm, 1 dram, 2 ssd, 3 remote)
each KV block of each layer lives. It sees only the past (``observe`` is called
after a step with that step's attention mass) unless it says otherwise (the
oracle reads the future from the context it gets at ``start``).

The calls, in order::

    start(ctx)            -> StartDecision      once, before step 0
    decide(view)          -> StepDecision       at each step, before its reads
    observe(view, mass)                         after each step (causal learning)

Built-in policies register with :func:`register_policy` exactly as third-party
ones do; packages can also expose policies through the ``llamatier.policies``
entry-point group (name = policy name, value = ``module:Class``); see
:mod:`llamatier.registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from llamatier.errors import LlamatierError
from llamatier.registry import POLICIES
from llamatier.tiers import ABSENT, N_TIERS, MoveTiming

if TYPE_CHECKING:
    from llamatier.replay.context import ReplayContext


@dataclass(frozen=True)
class StartDecision:
    """What a policy sets up before the first step."""

    placement: np.ndarray  # int8 [n_layers, n_blocks]: tier of each block (only alive blocks count)
    reserved_bytes: np.ndarray | None = None  # float64 [4]: bytes reserved up front per tier (static: n_ctx)
    host_layers: np.ndarray | None = None  # bool [n_layers]: layers computed on the host (static layers mode)
    capacity_bonus_bytes: np.ndarray | None = None  # float64 [4]: budget freed for KV (host layers' weights)
    dram_reads: str | None = None  # how reads of DRAM-resident KV run: "host", "fetch", "auto"; None: options
    runs: bool = True  # False: this placement cannot run at all (e.g. llama.cpp beyond DRAM)
    verdict: str = ""  # one line: the placement chosen, or why it does not run


@dataclass(frozen=True)
class StepDecision:
    """A policy's decision for one step.

    ``placement`` is where blocks are after this step's moves (None: unchanged).
    Reads happen from ``read_tier`` (None: from ``placement``); a policy that
    fetches on demand (lru) reads everything from HBM after moving it there and
    reports the moves it made in ``moves_bytes``/``moves_count`` ([src, dst]
    matrices); otherwise the engine derives moves from the placement change.
    ``read_mask`` selects the blocks read in sparse mode (None: every visible one).
    """

    placement: np.ndarray | None = None
    read_tier: np.ndarray | int | None = None  # an int: every access is served from that tier
    read_mask: np.ndarray | None = None
    moves_bytes: np.ndarray | None = None  # float64 [4, 4]
    moves_count: np.ndarray | None = None  # float64 [4, 4]
    move_timing: MoveTiming | str = MoveTiming.DEMAND  # when the moves are paid for (a MoveTiming or its name)


UNCHANGED = StepDecision()


@dataclass(frozen=True)
class StepView:
    """What a policy may look at when deciding step ``step``.

    All arrays are read-only and valid during the call only: the engine updates
    its masks in place from step to step, so copy what you keep.
    """

    step: int
    decode: bool
    hi_block: int  # one past the last block holding KV after this step
    lo_alive: np.ndarray  # int64 [n_layers]: first block still stored (sliding-window layers free older ones)
    lo_visible: np.ndarray  # int64 [n_layers]: first block this step's queries can see
    new_lo_block: int  # first block receiving this step's new tokens
    alive: np.ndarray  # bool [n_layers, n_blocks]: blocks holding KV after this step's writes
    visible: np.ndarray  # bool [n_layers, n_blocks]: blocks this step's queries see
    new_blocks: np.ndarray  # bool [n_layers, n_blocks]: alive now, not before this step
    placement: np.ndarray  # int8 [n_layers, n_blocks]: placement before this step
    occupancy_bytes: np.ndarray  # float64 [4]: bytes per tier of blocks that stay stored this step (before new ones)


class Policy(ABC):
    """Base class of KV placement policies (see the module docstring for the protocol)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    fixed_placement: ClassVar[bool] = False  # placement never changes after start: the engine's fast path
    is_bound: ClassVar[bool] = False  # sees the future: reported as a bound, not a policy

    @abstractmethod
    def start(self, ctx: ReplayContext) -> StartDecision:
        """Initial placement, reservations and verdict, before step 0."""

    @abstractmethod
    def decide(self, view: StepView) -> StepDecision:
        """Placement (and, in sparse mode, the blocks to read) for this step."""

    def observe(self, view: StepView, mass: np.ndarray) -> None:  # noqa: B027 - optional hook
        """Attention mass [n_layers, n_blocks] the step just replayed put on each block.

        Called only when :meth:`wants_mass` says so (the engine then reads the
        trace's mass step by step; otherwise it never has to).
        """

    def wants_mass(self) -> bool:
        """Whether :meth:`observe` needs each step's attention mass (asked after :meth:`start`)."""
        return True

    def params(self) -> dict[str, Any]:
        """Tunable parameters, for reports."""
        return {}


ENTRY_POINT_GROUP = POLICIES.entry_point_group


def register_policy(cls: type[Policy] | None = None, *, name: str | None = None, replace: bool = False) -> Any:
    """Register a Policy subclass under ``name`` (default ``cls.name``); usable as a decorator.

    Registering a taken name raises unless ``replace=True``.
    """
    return POLICIES.register(cls, name=name, replace=replace)


def policy_names() -> list[str]:
    """Registered policy names (built-ins and plug-ins)."""
    return POLICIES.names()


def get_policy(name: str) -> type[Policy]:
    """The policy class registered as ``name``; the error lists the valid names."""
    return POLICIES.get(name)


def make_policy(policy: str | type[Policy] | Policy, **params: Any) -> Policy:
    """A fresh policy instance from a name, a class or an instance (instances are used as given)."""
    return POLICIES.create(policy, **params)


# -- helpers shared by policies ------------------------------------------------------


def fill_by_priority(
    priority: np.ndarray, sizes: np.ndarray, capacity_bytes: np.ndarray, alive: np.ndarray
) -> np.ndarray:
    """Place alive blocks fastest-tier-first in priority order (ties: lower flat index first).

    Tier t takes the next blocks in order while they fit (a prefix fill, so a
    bigger capacity never pushes a block to a slower tier). Priorities are
    compared after rounding to 2**-20. Returns int8 placement with ABSENT for
    blocks that are not alive; raises when the alive blocks do not fit in all
    tiers together.
    """
    flat_alive = np.flatnonzero(alive.ravel())
    out = np.full(alive.shape, ABSENT, dtype=np.int8)
    n = flat_alive.size
    if n == 0:
        return out
    # one unique integer key per block: rounded priority first, then lower flat index
    q = np.round(priority.ravel()[flat_alive].astype(np.float64) * 2.0**20).astype(np.int64)
    key = q * alive.size + (alive.size - 1 - flat_alive)
    of = out.ravel()
    uniform = bool((sizes == sizes[0]).all())
    if uniform:  # k-th largest by partition, no full sort
        size = float(sizes[0])
        remaining = np.arange(n)
        for t in range(N_TIERS):
            k = int(min(remaining.size, np.floor(float(capacity_bytes[t]) / size)))
            if k >= remaining.size:
                of[flat_alive[remaining]] = t
                return out
            if k > 0:
                part = np.argpartition(-key[remaining], k - 1)
                of[flat_alive[remaining[part[:k]]]] = t
                remaining = remaining[part[k:]]
        raise CapacityExhausted(n * size, float(np.sum(capacity_bytes)))
    order = flat_alive[np.argsort(-key)]
    sz = np.broadcast_to(sizes[:, None], alive.shape).ravel()[order]
    cum = np.cumsum(sz, dtype=np.float64)
    tiers = np.empty(order.size, dtype=np.int8)
    start, base = 0, 0.0
    for t in range(N_TIERS):
        end = int(np.searchsorted(cum, base + float(capacity_bytes[t]), side="right"))
        tiers[start:end] = t
        if end > start:
            base = float(cum[end - 1])
        start = end
    if start < order.size:
        raise CapacityExhausted(float(cum[-1]), float(np.sum(capacity_bytes)))
    of[order] = tiers
    return out


class CapacityExhausted(LlamatierError):
    """The KV does not fit in all tiers together."""

    def __init__(self, need_bytes: float, have_bytes: float) -> None:
        from llamatier.units import format_bytes

        super().__init__(
            f"the KV cache ({format_bytes(need_bytes)}) does not fit in all tiers together "
            f"({format_bytes(have_bytes)}): raise --dram-budget or use a profile with more memory"
        )
        self.need_bytes = need_bytes
        self.have_bytes = have_bytes


def default_read_selection(view: StepView, budget: int) -> np.ndarray:
    """Sparse-mode reads for policies without their own, StreamingLLM-style: the newest visible
    block (it holds the current token), the first visible block (attention sink), then the next
    newest, up to ``budget`` blocks per layer."""
    vis = view.visible
    b = np.arange(vis.shape[1])[None, :]
    n_recent = max(budget - 1, 1)
    recent = b >= view.hi_block - n_recent
    if budget >= 2:
        recent = recent | (b == view.lo_visible[:, None])
    return vis & recent
