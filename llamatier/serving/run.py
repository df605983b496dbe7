"""Run one workload under one serving policy: build the context and plan, simulate, wrap the result."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from llamatier.hardware import Profile
from llamatier.serving.context import ServingContext, build_context
from llamatier.serving.engine import simulate
from llamatier.serving.plan import check_run_fits, make_plan
from llamatier.serving.policies import PolicyCannotRun, ServingPolicy, make_serving_policy
from llamatier.serving.result import ServeResult
from llamatier.serving.workload import WorkloadSpec, load_workload


def serve(
    workload: WorkloadSpec | str | Path,
    policy: str | type[ServingPolicy] | ServingPolicy = "session-tiering",
    *,
    profile: str | Profile | None = None,
    users: int | None = None,
    context: ServingContext | None = None,
    check: bool = False,
) -> ServeResult:
    """Play a workload under one serving policy (``profile``/``users`` override the file's)."""
    spec = workload if isinstance(workload, WorkloadSpec) else load_workload(workload)
    if users is not None:
        spec = spec.with_users(users)
    prof_obj = profile if isinstance(profile, Profile) else None
    if isinstance(profile, str):
        spec = spec.with_overrides(profile=profile)
    if context is None:
        context = build_context(spec, profile=prof_obj)
    elif context.spec is not spec:
        context = dataclasses.replace(context, spec=spec)
    check_run_fits(spec, list(context.shapes))
    plan = make_plan(spec, list(context.shapes))
    pol = make_serving_policy(policy)
    record = None
    try:
        record = simulate(context, pol, plan, check=check)
        verdict, runs = record.policy_verdict, True
    except PolicyCannotRun as exc:
        verdict, runs = str(exc), False
    t = context.target
    return ServeResult(
        policy=pol.name,
        policy_params=pol.params(),
        runs=runs,
        verdict=verdict,
        workload=spec.name,
        profile=context.profile.name,
        model=t.label,
        what_if=t.what_if,
        kv_type=f"{context.type_k.name}/{context.type_v.name}",
        users=spec.users,
        arrival_rate_per_s=spec.arrival_rate_per_s,
        capacity_bytes=context.capacity_bytes.copy(),
        slo_tpot_s=spec.slo_tpot_s,
        slo_ttft_s=spec.slo_ttft_s,
        plan=plan,
        record=record,
        notes=record.notes if record is not None else tuple(context.notes),
    )
