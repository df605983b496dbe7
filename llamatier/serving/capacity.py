"""The largest number of concurrent users a policy serves within a latency SLO (a search over the user count).

The search doubles the user count from ``start`` while the run meets the SLO
(every request completes, p99 TPOT <= target, and p99 TTFT <= target when one
is given), then bisects between the last success and the first failure. Each
trial is a full run of the closed-loop workload with that many users (same
seed: user i draws the same sessions at every count). Latency need not be
monotone in the user count; every trial is reported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from llamatier.errors import LlamatierError
from llamatier.registry import SERVING_POLICIES
from llamatier.serving.context import ServingContext, build_context
from llamatier.serving.policies import ServingPolicy
from llamatier.serving.result import ServeResult
from llamatier.serving.run import serve
from llamatier.serving.workload import WorkloadSpec


@dataclass(frozen=True)
class CapacityResult:
    """Outcome of a user-count search for one policy."""

    policy: str
    slo_tpot_s: float
    slo_ttft_s: float | None
    max_users: int  # largest count that met the SLO (0: not even `start` users)
    capped: bool  # every count up to max_search met the SLO: the true capacity is higher
    trials: tuple[dict[str, Any], ...]  # users, meets, tpot/ttft p99, per trial, in the order run
    best: ServeResult | None  # the run at max_users

    def summary(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "slo_tpot_s": self.slo_tpot_s,
            "slo_ttft_s": self.slo_ttft_s,
            "max_users": self.max_users,
            "capped": self.capped,
            "trials": list(self.trials),
            "at_max": self.best.summary() if self.best is not None else None,
        }


def find_max_users(
    spec: WorkloadSpec,
    policy: str | type[ServingPolicy] | ServingPolicy,
    *,
    slo_tpot_s: float | None = None,
    slo_ttft_s: float | None = None,
    start: int = 1,
    max_search: int = 1024,
    resolution: float = 0.0,
    context: ServingContext | None = None,
) -> CapacityResult:
    """Search the user count (closed-loop workloads); ``resolution`` stops bisecting within that fraction."""
    tpot = slo_tpot_s if slo_tpot_s is not None else spec.slo_tpot_s
    ttft = slo_ttft_s if slo_ttft_s is not None else spec.slo_ttft_s
    if tpot is None:
        raise LlamatierError("the user-count search needs a TPOT target: give --slo-tpot-ms or slo.tpot_ms")
    if start < 1 or max_search < start:
        raise LlamatierError(f"search bounds must satisfy 1 <= start <= max ({start}, {max_search})")
    spec = spec.with_users(start).with_overrides(slo_tpot_s=tpot, slo_ttft_s=ttft)
    if isinstance(policy, str):
        policy = SERVING_POLICIES.canonical(policy)  # an unknown name fails before the first trial
    ctx = context or build_context(spec)
    trials: list[dict[str, Any]] = []
    results: dict[int, ServeResult] = {}

    def trial(u: int) -> bool:
        s = spec.with_users(u)
        r = serve(s, policy, context=dataclasses.replace(ctx, spec=s))
        ok = r.meets_slo(tpot, ttft)
        summ = r.summary()
        lat = summ.get("latency", {})
        trials.append({
            "users": u,
            "meets": ok,
            "runs": r.runs,
            "tpot_p99_s": lat.get("tpot_p99_s"),
            "ttft_p99_s": lat.get("ttft_p99_s"),
            "completed": summ.get("completed"),
            "requests": summ["requests"],
        })
        results[u] = r
        return ok

    lo, hi = 0, None
    u = start
    while True:
        if not trial(u):
            hi = u
            break
        lo = u
        if u >= max_search:
            break
        u = min(2 * u, max_search)
    capped = hi is None
    if hi is not None:
        while hi - lo > max(1, int(resolution * lo)):
            mid = (lo + hi) // 2
            if trial(mid):
                lo = mid
            else:
                hi = mid
    return CapacityResult(
        policy=policy if isinstance(policy, str) else policy.name,
        slo_tpot_s=tpot,
        slo_ttft_s=ttft,
        max_users=lo,
        capped=capped,
        trials=tuple(trials),
        best=results.get(lo),
    )
