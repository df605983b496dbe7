"""Serving-level KV policies: an interface, a registry, and the built-ins.

``llamacpp-server`` (llama.cpp server's slots and host prompt cache), ``lru`` and
``arc`` (vLLM's offloading connector), ``adaptive`` (the project's hot/warm/cold
placement across sessions). Importing this package registers them.
"""

from llamatier.serving.policies.adaptive import AdaptiveServingPolicy
from llamatier.serving.policies.base import (
    DRAM,
    HBM,
    REMOTE,
    SSD,
    PolicyCannotRun,
    ServingPolicy,
    make_serving_policy,
    register_serving_policy,
    serving_policy_names,
)
from llamatier.serving.policies.llamacpp import LlamaCppServerPolicy
from llamatier.serving.policies.offload import VLLMOffloadARC, VLLMOffloadLRU
from llamatier.serving.policies.paged import PagedPolicy

DEFAULT_SERVING_POLICIES = ("llamacpp-server", "lru", "arc", "adaptive")

__all__ = [
    "DEFAULT_SERVING_POLICIES",
    "DRAM",
    "HBM",
    "REMOTE",
    "SSD",
    "AdaptiveServingPolicy",
    "LlamaCppServerPolicy",
    "PagedPolicy",
    "PolicyCannotRun",
    "ServingPolicy",
    "VLLMOffloadARC",
    "VLLMOffloadLRU",
    "make_serving_policy",
    "register_serving_policy",
    "serving_policy_names",
]
