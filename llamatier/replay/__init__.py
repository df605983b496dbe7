"""Replay a trace through the four-tier cost model under a placement policy.

``replay(trace, profile, policy, options) -> ReplayResult`` is a pure function:
no files, no printing. ``compare`` runs several policies on the same inputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from llamatier.cost import CostModel, StepCosts
from llamatier.hardware import Profile
from llamatier.policies import Policy, make_policy
from llamatier.replay.context import ReplayContext, prepare
from llamatier.replay.engine import EngineRecord, capacity_of, run_vectorised
from llamatier.replay.options import ReplayOptions
from llamatier.replay.result import Comparison, ReplayResult, summarize
from llamatier.trace import Trace

DEFAULT_POLICIES = ("static", "lru", "adaptive", "oracle")


def cost_model_for(ctx: ReplayContext, record: EngineRecord, *, trace_steps: bool = True) -> tuple[CostModel, list[str]]:
    """The cost model for a prepared replay and the notes it adds (host model used or not).

    ``trace_steps``: the model prices the trace's own steps (their logits rows come
    from the trace, as the host model was fitted); False for other steps (serving).
    """
    notes: list[str] = []
    prof = ctx.profile
    hm = prof.compute.host_model
    hm_args = None
    if ctx.host_only and hm is not None:
        if ctx.target.what_if:
            notes.append("calibrated host model not used: it is fitted to the traced model, not the what-if one")
        elif hm.model_name and hm.model_name != ctx.trace.model.name:
            notes.append(f"calibrated host model not used: it was fitted for {hm.model_name}, not {ctx.trace.model.name}")
        else:
            hm_args = {
                "type_k": ctx.type_k.name,
                "type_v": ctx.type_v.name,
                "n_threads": ctx.n_threads,
                "n_ctx": ctx.n_ctx,
            }
            if trace_steps:  # a prefill chunk computes logits only when its last token is sampled
                hm_args["n_outputs"] = (ctx.trace.steps["token_out"].to_numpy() >= 0).astype(np.float64)
            notes.append("host compute from the calibrated host model (includes attention over DRAM-resident KV)")
    g = ctx.target.geometry
    start = record.start
    model = CostModel(
        prof,
        n_layers=g.n_layers,
        n_head=ctx.target.n_head,
        head_dim_k=g.head_dim_k,
        head_dim_v=g.head_dim_v,
        n_params=ctx.target.n_params,
        weight_bytes=ctx.target.weight_bytes,
        host_layers=start.host_layers,
        dram_reads=start.dram_reads or ctx.options.dram_reads,
        host_model_args=hm_args,
    )
    return model, notes


def _evaluate(model: CostModel, record: EngineRecord) -> StepCosts:
    return model.evaluate(record.traffic)


def finish(
    ctx: ReplayContext,
    policy: Policy,
    record: EngineRecord,
    t_start: float,
    *,
    costs_for: Callable[[CostModel, EngineRecord], StepCosts] = _evaluate,
) -> ReplayResult:
    """Cost a replay's counts and wrap everything in a ReplayResult (shared by both engines).

    ``costs_for(model, record)`` prices the counts (default: the cost model's own
    vectorised evaluation; the reference engine passes its scalar formulas).
    """
    notes = list(ctx.notes)
    costs = None
    if record.start.runs:
        model, more = cost_model_for(ctx, record)
        notes += more
        costs = costs_for(model, record)
    o = ctx.options
    return ReplayResult(
        policy=policy.name,
        policy_params=policy.params(),
        is_bound=policy.is_bound,
        profile=ctx.profile.name,
        trace=str(ctx.trace.path) if ctx.trace.path else ctx.trace.model.name,
        model=ctx.target.label,
        what_if=ctx.target.what_if,
        type_k=ctx.type_k.name,
        type_v=ctx.type_v.name,
        mode=o.mode,
        block_budget=o.block_budget,
        block_tokens=ctx.block_tokens,
        capacity_bytes=capacity_of(ctx, record.start).copy(),
        runs=record.start.runs,
        verdict=record.start.verdict,
        is_decode=ctx.is_decode,
        costs=costs,
        record=record,
        replay_wall_s=time.perf_counter() - t_start,
        notes=tuple(notes),
    )


def policy_for(policy: str | type[Policy] | Policy, options: ReplayOptions) -> Policy:
    if isinstance(policy, Policy):
        return policy
    name = policy if isinstance(policy, str) else policy.name
    return make_policy(policy, **options.policy_params.get(str(name).lower(), {}))


def replay_prepared(
    ctx: ReplayContext, policy: str | type[Policy] | Policy, *, t_start: float | None = None
) -> ReplayResult:
    """Replay an already prepared context under ``policy`` (for callers that also read ``ctx``).

    ``t_start``: when the replay's wall time began (default: now).
    """
    t0 = time.perf_counter() if t_start is None else t_start
    pol = policy_for(policy, ctx.options)
    return finish(ctx, pol, run_vectorised(ctx, pol), t0)


def replay(
    trace: Trace,
    profile: Profile,
    policy: str | type[Policy] | Policy,
    options: ReplayOptions | None = None,
) -> ReplayResult:
    """Replay ``trace`` on ``profile`` under ``policy`` (a name, class or instance)."""
    t0 = time.perf_counter()
    ctx = prepare(trace, profile, options or ReplayOptions())
    return replay_prepared(ctx, policy, t_start=t0)


def compare(
    trace: Trace,
    profile: Profile,
    policies: Sequence[str | type[Policy] | Policy] = DEFAULT_POLICIES,
    options: ReplayOptions | None = None,
) -> Comparison:
    """Replay several policies on the same inputs; ratios are taken against ``static``."""
    options = options or ReplayOptions()
    results = []
    for p in policies:
        t0 = time.perf_counter()
        results.append(replay_prepared(prepare(trace, profile, options), p, t_start=t0))
    return Comparison(results=tuple(results))


__all__ = [
    "DEFAULT_POLICIES",
    "Comparison",
    "ReplayContext",
    "ReplayOptions",
    "ReplayResult",
    "compare",
    "prepare",
    "replay",
    "replay_prepared",
    "summarize",
]
