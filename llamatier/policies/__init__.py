"""KV placement policies: one small interface (base.Policy), a registry, and the built-ins.

Built-ins register themselves exactly as a plug-in would; third-party packages
add policies through the ``llamatier.policies`` entry-point group.
"""

# Built-ins: importing the modules registers them.
from llamatier.policies.adaptive import AdaptivePolicy  # noqa: E402
from llamatier.policies.base import (
    ABSENT,
    DRAM,
    ENTRY_POINT_GROUP,
    HBM,
    N_TIERS,
    REMOTE,
    SSD,
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
from llamatier.policies.lru import LRUPolicy  # noqa: E402
from llamatier.policies.oracle import OraclePolicy  # noqa: E402
from llamatier.policies.static import StaticPolicy  # noqa: E402

__all__ = [
    "ABSENT",
    "DRAM",
    "ENTRY_POINT_GROUP",
    "HBM",
    "N_TIERS",
    "REMOTE",
    "SSD",
    "UNCHANGED",
    "AdaptivePolicy",
    "CapacityExhausted",
    "LRUPolicy",
    "OraclePolicy",
    "Policy",
    "StartDecision",
    "StaticPolicy",
    "StepDecision",
    "StepView",
    "default_read_selection",
    "fill_by_priority",
    "get_policy",
    "make_policy",
    "policy_names",
    "register_policy",
]
