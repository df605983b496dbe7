"""KV placement policies: one small interface (base.Policy), a registry, and the built-ins.

Built-ins register themselves exactly as a plug-in would; third-party packages
add policies through the ``llamatier.policies`` entry-point group (see
:mod:`llamatier.registry`). The tier vocabulary (``HBM``, ``MoveTiming``, ...)
is :mod:`llamatier.tiers`.
"""

from llamatier.policies.adaptive import AdaptivePolicy
from llamatier.policies.base import (
    ENTRY_POINT_GROUP,
    UNCHANGED,
    CapacityExhausted,
    Policy,
    StartDecision,
    StepDecision,
    StepView,
    default_read_selection,
    fill_by_priority,
    get_policy,
    make_policy,
    policy_names,
    register_policy,
)
from llamatier.policies.eviction import (
    AdaptiveSelectPolicy,
    EvictionPolicy,
    H2OPolicy,
    SnapKVPolicy,
    StreamingPolicy,
    layer_uniform_policies,
)
from llamatier.policies.lru import LRUPolicy
from llamatier.policies.oracle import OraclePolicy
from llamatier.policies.static import StaticPolicy
from llamatier.registry import POLICIES
from llamatier.tiers import ABSENT, DRAM, HBM, N_TIERS, REMOTE, SSD, MoveTiming

__all__ = [
    "ABSENT",
    "DRAM",
    "ENTRY_POINT_GROUP",
    "HBM",
    "N_TIERS",
    "POLICIES",
    "REMOTE",
    "SSD",
    "SnapKVPolicy",
    "UNCHANGED",
    "AdaptivePolicy",
    "AdaptiveSelectPolicy",
    "CapacityExhausted",
    "EvictionPolicy",
    "H2OPolicy",
    "LRUPolicy",
    "MoveTiming",
    "OraclePolicy",
    "Policy",
    "StartDecision",
    "StaticPolicy",
    "StepDecision",
    "StepView",
    "StreamingPolicy",
    "default_read_selection",
    "fill_by_priority",
    "get_policy",
    "layer_uniform_policies",
    "make_policy",
    "policy_names",
    "register_policy",
]
