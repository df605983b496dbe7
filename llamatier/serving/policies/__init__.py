"""Serving-level KV policies: an interface, a registry, and the built-ins.

- ``llamacpp-server``: llama.cpp server's slots and host prompt cache;
- ``vllm-lru``, ``vllm-arc``: vLLM's offloading connector with LRU or ARC eviction;
- ``session-tiering``: hot/warm/cold placement of whole sessions (running,
  waiting, idle), with a bounded spill of running KV to DRAM.

Importing this package registers them (:data:`llamatier.registry.SERVING_POLICIES`).
The names ``lru``, ``arc`` and ``adaptive`` of earlier releases still work, as
deprecated aliases: the replay has its own ``lru`` and ``adaptive``, which model
other algorithms.
"""

from llamatier.registry import SERVING_POLICIES
from llamatier.serving.policies.base import (
    PolicyCannotRun,
    ServingPolicy,
    make_serving_policy,
    register_serving_policy,
    serving_policy_names,
)
from llamatier.serving.policies.llamacpp import LlamaCppServerPolicy
from llamatier.serving.policies.offload import VLLMOffloadARC, VLLMOffloadLRU
from llamatier.serving.policies.paged import PagedPolicy
from llamatier.serving.policies.session_tiering import SessionTieringPolicy

SERVING_POLICIES.alias("lru", "vllm-lru")
SERVING_POLICIES.alias("arc", "vllm-arc")
SERVING_POLICIES.alias("adaptive", "session-tiering")

DEFAULT_SERVING_POLICIES = ("llamacpp-server", "vllm-lru", "vllm-arc", "session-tiering")

__all__ = [
    "DEFAULT_SERVING_POLICIES",
    "SERVING_POLICIES",
    "LlamaCppServerPolicy",
    "PagedPolicy",
    "PolicyCannotRun",
    "ServingPolicy",
    "SessionTieringPolicy",
    "VLLMOffloadARC",
    "VLLMOffloadLRU",
    "make_serving_policy",
    "register_serving_policy",
    "serving_policy_names",
]
