"""Serving workloads: concurrent requests, multi-turn sessions and shared prefixes across the four tiers.

``serve(workload, policy)`` plays a workload (see :mod:`llamatier.serving.workload`)
through a batched serving engine under a serving-level KV policy and returns a
:class:`ServeResult`; ``find_max_users`` searches the largest user count that
meets a p99 TPOT (and optionally TTFT) target. Step costs come from the replay's
cost model, so one user with one turn gives exactly the replay's per-token latencies.
"""

from __future__ import annotations

from llamatier.serving.capacity import CapacityResult, find_max_users
from llamatier.serving.context import ServingContext, build_context
from llamatier.serving.engine import ServeRecord, simulate
from llamatier.serving.plan import Plan, TraceShape, make_plan, trace_shape
from llamatier.serving.policies import (
    DEFAULT_SERVING_POLICIES,
    PolicyCannotRun,
    ServingPolicy,
    make_serving_policy,
    register_serving_policy,
    serving_policy_names,
)
from llamatier.serving.result import ServeResult
from llamatier.serving.run import serve
from llamatier.serving.workload import (
    WorkloadError,
    WorkloadSpec,
    load_workload,
    workload_from_dict,
)

__all__ = [
    "DEFAULT_SERVING_POLICIES",
    "CapacityResult",
    "Plan",
    "PolicyCannotRun",
    "ServeRecord",
    "ServeResult",
    "ServingContext",
    "ServingPolicy",
    "TraceShape",
    "WorkloadError",
    "WorkloadSpec",
    "build_context",
    "find_max_users",
    "load_workload",
    "make_plan",
    "make_serving_policy",
    "register_serving_policy",
    "serve",
    "serving_policy_names",
    "simulate",
    "trace_shape",
    "workload_from_dict",
]
