"""llamatier: trace real llama.cpp KV-cache reads and replay them through a four-tier memory model."""

from llamatier.errors import LlamatierError
from llamatier.hardware import Profile, list_profiles, load_profile
from llamatier.kvtypes import KV_TYPES, KVType, kv_type
from llamatier.model import KVGeometry, ModelInfo, read_model_info
from llamatier.policies import Policy, get_policy, register_policy
from llamatier.quality import lookup_quality, measure_quality
from llamatier.replay import ReplayOptions, ReplayResult, compare
from llamatier.trace import Trace, TraceWriter, load_trace

__version__ = "0.1.0"

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
