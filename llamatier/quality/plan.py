"""What an eviction policy drops, step by step, when a trace is replayed: the plan a llama.cpp run applies.

The replay decides (sparse mode, ``block_budget`` = the blocks kept per layer),
llama.cpp measures: :func:`plan_eviction` replays the trace under the policy,
records the blocks each decode step reads, and checks that llama.cpp's memory
API can express them:

- the same blocks in every layer (``llama_memory_seq_rm`` removes a position
  from all layers at once; per-layer or per-head choices cannot be measured);
- the previous token's position kept (llama.cpp decodes position p only when
  the sequence's last position is p - 1).

A plan whose dropped blocks never come back is *permanent* eviction; otherwise
it is per-step selection (both can be measured, see :mod:`llamatier.quality.eviction`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from llamatier.errors import LlamatierError
from llamatier.policies import (
    Policy,
    StartDecision,
    StepDecision,
    StepView,
    default_read_selection,
    get_policy,
    layer_uniform_policies,
)
from llamatier.replay import ReplayOptions, ReplayResult, replay
from llamatier.replay.context import ReplayContext
from llamatier.trace import Trace

PLAN_PROFILE = "a100-40g"  # the plans' decisions depend on attention and budget only, not on the hardware


@dataclass(frozen=True, eq=False)
class EvictionPlan:
    """The blocks a policy keeps at each decode step of a trace (the same blocks in every layer)."""

    policy: str
    keep_blocks: int  # the block budget (blocks kept per layer)
    params: dict[str, Any]
    block_tokens: int
    steps: np.ndarray  # int64 [D]: the trace step of each decode step
    pos: np.ndarray  # int64 [D]: position of the token each decode step reads
    kept: np.ndarray  # bool [D, n_blocks]: blocks kept (read) at each decode step
    held: np.ndarray  # int64 [D]: blocks some layer can see at each decode step (the new one included)
    dropped_mass: np.ndarray  # float64 [D, n_layers]: attention mass (from the trace) on dropped visible blocks
    permanent: bool  # no dropped block is ever kept again (observed in this plan)
    kind: str  # "eviction" (the policy discards what it drops) or "selection" (it re-chooses every step)
    result: ReplayResult  # the sparse replay the plan comes from

    @property
    def mass_dropped_per_step(self) -> np.ndarray:
        """float64 [D]: mean over layers of the dropped mass (what the replay reports)."""
        return self.dropped_mass.mean(axis=1)

    def dropped_ranges(self, i: int) -> list[tuple[int, int]]:
        """Position ranges [p0, p1) dropped at decode step ``i`` (adjacent blocks merged)."""
        p = int(self.pos[i])
        B = self.block_tokens
        hi = -(-(p + 1) // B)
        drop = ~self.kept[i, :hi]
        out: list[tuple[int, int]] = []
        for b in np.flatnonzero(drop):
            p0, p1 = int(b) * B, min((int(b) + 1) * B, p)
            if p1 <= p0:
                continue
            if out and out[-1][1] == p0:
                out[-1] = (out[-1][0], p1)
            else:
                out.append((p0, p1))
        return out


class _Recorder(Policy):
    """Wraps a policy in a replay and records the blocks it reads at each decode step."""

    def __init__(self, inner: Policy) -> None:
        self.inner = inner
        self.name = inner.name
        self.summary = inner.summary
        self.is_bound = inner.is_bound
        self.reads: list[tuple[int, np.ndarray, np.ndarray]] = []  # (step, read mask, visible)

    def start(self, ctx: ReplayContext) -> StartDecision:
        self.budget = int(ctx.options.block_budget)
        return self.inner.start(ctx)

    def decide(self, view: StepView) -> StepDecision:
        dec = self.inner.decide(view)
        if view.decode:
            rm = dec.read_mask if dec.read_mask is not None else default_read_selection(view, self.budget)
            self.reads.append((view.step, np.array(rm, dtype=bool), view.visible.copy()))
        return dec

    def observe(self, view: StepView, mass: np.ndarray) -> None:
        self.inner.observe(view, mass)

    def params(self) -> dict[str, Any]:
        return self.inner.params()


def plan_eviction(
    trace: Trace, policy: str | Policy, keep_blocks: int, *, policy_params: dict[str, Any] | None = None
) -> EvictionPlan:
    """Replay ``trace`` in sparse mode under ``policy`` keeping ``keep_blocks`` blocks per layer; its plan."""
    if not trace.is_decode.any():
        raise LlamatierError("the trace has no decode step: eviction is measured on decode steps; trace with --n-predict > 0")
    if isinstance(policy, Policy):
        inner = policy
    else:
        cls = get_policy(policy)
        try:
            inner = cls(**(policy_params or {}))
        except (TypeError, ValueError) as exc:
            raise LlamatierError(f"bad parameters for policy {cls.name!r}: {exc}") from None
    rec = _Recorder(inner)
    from llamatier.hardware import load_profile

    result = replay(trace, load_profile(PLAN_PROFILE), rec, ReplayOptions(mode="sparse", block_budget=int(keep_blocks)))
    steps = np.array([s for s, _, _ in rec.reads], dtype=np.int64)
    kept = np.stack([rm.any(axis=0) for _, rm, _ in rec.reads])
    for (s, rm, vis), k in zip(rec.reads, kept, strict=True):
        if not np.array_equal(rm, k[None, :] & vis):
            raise LlamatierError(
                f"policy {inner.name!r} reads different blocks in different layers (step {s}): llama.cpp's memory "
                "API removes a position from every layer at once, so only layer-uniform policies can be measured "
                f"({', '.join(layer_uniform_policies())})"
            )
    B = int(trace.block_tokens)
    pos = trace.steps["pos0"].to_numpy().astype(np.int64)[steps]
    prev = np.maximum(pos - 1, 0) // B
    bad = np.flatnonzero(~kept[np.arange(steps.size), prev])
    if bad.size:
        raise LlamatierError(
            f"policy {inner.name!r} dropped the block holding the previous token at step {int(steps[bad[0]])}: "
            "llama.cpp decodes position p only after p - 1, so a measurable policy keeps it"
        )
    held = np.array([vis.any(axis=0).sum() for _, _, vis in rec.reads], dtype=np.int64)
    existed = np.arange(kept.shape[1])[None, :] < (pos[:-1] // B + 1)[:, None]  # blocks held at the step before
    permanent = not (kept[1:] & ~kept[:-1] & existed).any()
    return EvictionPlan(
        policy=inner.name,
        keep_blocks=int(keep_blocks),
        params=inner.params(),
        block_tokens=B,
        steps=steps,
        pos=pos,
        kept=kept,
        held=held,
        dropped_mass=result.record.dropped_mass[steps].astype(np.float64),
        permanent=permanent,
        kind="eviction" if getattr(inner, "permanent", True) else "selection",
        result=result,
    )
