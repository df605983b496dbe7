"""vLLM with its KV offloading connector: paged KV in HBM, write-through to CPU, then disk; LRU or ARC.

As vLLM V1 does it (``OffloadingConnector`` with ``LRUOffloadingManager`` or
``ARCOffloadingManager``, tiered GPU -> CPU -> disk):

- running sequences' blocks are in GPU memory (attention reads only HBM);
  finished requests' blocks stay there as prefix cache until the free-block
  queue evicts them (least recently freed first, tails first);
- every block is stored to the CPU tier as soon as it is full (write-through,
  asynchronous: charged as transfers that overlap compute); the CPU tier evicts
  by LRU or ARC, and what it evicts goes to the SSD tier (same policy), then out;
- a request reuses its longest cached prefix (GPU hits first, then blocks loaded
  from CPU/SSD) and prefills the rest; requests are admitted first come, first
  served when their prompt's blocks fit; when a running sequence needs a block
  and none can be evicted, the most recently admitted request is preempted
  (its KV released, recomputed or reloaded when it is rescheduled).
"""

from __future__ import annotations

from llamatier.serving.policies.base import register_serving_policy
from llamatier.serving.policies.paged import PagedPolicy


@register_serving_policy
class VLLMOffloadLRU(PagedPolicy):
    """vLLM offloading connector, LRU eviction in the CPU and disk tiers."""

    name = "vllm-lru"
    summary = "vLLM offloading connector: paged HBM prefix cache, write-through to DRAM then SSD, LRU eviction"
    cache_kind = "lru"


@register_serving_policy
class VLLMOffloadARC(PagedPolicy):
    """vLLM offloading connector, ARC eviction in the CPU and disk tiers."""

    name = "vllm-arc"
    summary = "vLLM offloading connector: paged HBM prefix cache, write-through to DRAM then SSD, ARC eviction"
    cache_kind = "arc"
