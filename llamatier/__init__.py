"""llamatier: trace real llama.cpp KV-cache reads and replay them through a four-tier memory model.

The public names below are imported on first use, so that ``import llamatier`` (and the
CLI's start-up) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "LlamatierError": "llamatier.errors",
    "Profile": "llamatier.hardware",
    "list_profiles": "llamatier.hardware",
    "load_profile": "llamatier.hardware",
    "KV_TYPES": "llamatier.kvtypes",
    "KVType": "llamatier.kvtypes",
    "kv_type": "llamatier.kvtypes",
    "KVGeometry": "llamatier.model",
    "ModelInfo": "llamatier.model",
    "read_model_info": "llamatier.model",
    "Policy": "llamatier.policies",
    "get_policy": "llamatier.policies",
    "register_policy": "llamatier.policies",
    "lookup_quality": "llamatier.quality",
    "measure_quality": "llamatier.quality",
    "ReplayOptions": "llamatier.replay",
    "ReplayResult": "llamatier.replay",
    "compare": "llamatier.replay",
    "Trace": "llamatier.trace",
    "TraceWriter": "llamatier.trace",
    "load_trace": "llamatier.trace",
}

if TYPE_CHECKING:
    from llamatier.errors import LlamatierError
    from llamatier.hardware import Profile, list_profiles, load_profile
    from llamatier.kvtypes import KV_TYPES, KVType, kv_type
    from llamatier.model import KVGeometry, ModelInfo, read_model_info
    from llamatier.policies import Policy, get_policy, register_policy
    from llamatier.quality import lookup_quality, measure_quality
    from llamatier.replay import ReplayOptions, ReplayResult, compare
    from llamatier.trace import Trace, TraceWriter, load_trace


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llamatier' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "KV_TYPES",
    "KVGeometry",
    "KVType",
    "LlamatierError",
    "ModelInfo",
    "Policy",
    "Profile",
    "ReplayOptions",
    "ReplayResult",
    "Trace",
    "TraceWriter",
    "compare",
    "get_policy",
    "kv_type",
    "list_profiles",
    "load_profile",
    "load_trace",
    "lookup_quality",
    "measure_quality",
    "read_model_info",
    "register_policy",
]
