"""Block caches for the offload tiers: LRU and ARC with the semantics of vLLM's offloading managers.

Keys are block ids; capacity is a number of blocks. Both caches follow
``vllm/v1/kv_offload`` (``LRUOffloadingManager``, ``ARCOffloadingManager``):

- ``touch(keys)`` walks the keys in reverse, so that the first block of a
  request ends up most recent and tails are evicted first;
- ``store(keys)`` inserts the keys not yet cached, evicting as many as needed
  first, and returns the evicted keys;
- ARC keeps T1 (seen once), T2 (seen again) and ghost lists B1/B2; a touch of a
  T1 block promotes it to T2, a ghost hit moves the T1 target (``p``) up (B1)
  or down (B2) by ``max(1, |other ghost| / |this ghost|)``; eviction takes T1's
  least recent block while ``|T1| >= p``, else T2's; ghosts are bounded by the
  capacity.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class BlockLRU:
    """Least-recently-used block cache."""

    kind = "lru"

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = int(capacity_blocks)
        self.order: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self.order)

    def __contains__(self, key: int) -> bool:
        return key in self.order

    def touch(self, keys: Iterable[int]) -> None:
        order = self.order
        for k in reversed(list(keys)):
            if k in order:
                order.move_to_end(k)

    def store(self, keys: Iterable[int]) -> list[int]:
        new = [k for k in keys if k not in self.order]
        if not new:
            return []
        if len(new) > self.capacity:
            new = new[: self.capacity]
        evicted = []
        while len(self.order) + len(new) > self.capacity:
            k, _ = self.order.popitem(last=False)
            evicted.append(k)
        for k in new:
            self.order[k] = None
        return evicted

    def stored_of(self, keys: list[int]) -> list[int]:
        """The keys the last ``store`` call actually kept (a store larger than the cache keeps its head)."""
        return [k for k in keys if k in self.order]

    def demote_first(self, keys: Iterable[int]) -> None:
        """Make ``keys`` the next to be evicted (cold data)."""
        for k in keys:
            if k in self.order:
                self.order.move_to_end(k, last=False)

    def remove(self, keys: Iterable[int]) -> None:
        for k in keys:
            self.order.pop(k, None)

    def resize(self, capacity_blocks: int) -> list[int]:
        """Change the capacity; return the keys evicted to fit."""
        self.capacity = max(int(capacity_blocks), 0)
        evicted = []
        while len(self.order) > self.capacity:
            k, _ = self.order.popitem(last=False)
            evicted.append(k)
        return evicted


class BlockARC:
    """Adaptive replacement block cache (vLLM's ARCOffloadingManager semantics)."""

    kind = "arc"

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = int(capacity_blocks)
        self.p = 0.0
        self.t1: OrderedDict[int, None] = OrderedDict()
        self.t2: OrderedDict[int, None] = OrderedDict()
        self.b1: OrderedDict[int, None] = OrderedDict()
        self.b2: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self.t1) + len(self.t2)

    def __contains__(self, key: int) -> bool:
        return key in self.t1 or key in self.t2

    def touch(self, keys: Iterable[int]) -> None:
        for k in reversed(list(keys)):
            if k in self.t1:
                del self.t1[k]
                self.t2[k] = None
            elif k in self.t2:
                self.t2.move_to_end(k)
            elif k in self.b1:
                self.p = min(self.p + max(1.0, len(self.b2) / len(self.b1)), float(self.capacity))
                self.b1.move_to_end(k)
            elif k in self.b2:
                self.p = max(self.p - max(1.0, len(self.b1) / len(self.b2)), 0.0)
                self.b2.move_to_end(k)

    def store(self, keys: Iterable[int]) -> list[int]:
        new = [k for k in keys if k not in self]
        if not new:
            return []
        if len(new) > self.capacity:
            new = new[: self.capacity]
        evicted = []
        while len(self) + len(new) > self.capacity:
            evicted.append(self._evict_one())
        for ghosts in (self.b1, self.b2):
            while len(ghosts) > self.capacity:
                ghosts.popitem(last=False)
        for k in new:
            self.t1[k] = None
            self.b1.pop(k, None)
            self.b2.pop(k, None)
        return evicted

    def stored_of(self, keys: list[int]) -> list[int]:
        return [k for k in keys if k in self]

    def demote_first(self, keys: Iterable[int]) -> None:
        for k in keys:
            for lst in (self.t1, self.t2):
                if k in lst:
                    lst.move_to_end(k, last=False)

    def remove(self, keys: Iterable[int]) -> None:
        for k in keys:
            self.t1.pop(k, None)
            self.t2.pop(k, None)

    def resize(self, capacity_blocks: int) -> list[int]:
        self.capacity = max(int(capacity_blocks), 0)
        self.p = min(self.p, float(self.capacity))
        evicted = []
        while len(self) > self.capacity:
            evicted.append(self._evict_one())
        return evicted

    def _evict_one(self) -> int:
        if self.t1 and (len(self.t1) >= int(self.p) or not self.t2):
            k, _ = self.t1.popitem(last=False)
            self.b1[k] = None
        else:
            k, _ = self.t2.popitem(last=False)
            self.b2[k] = None
        return k


CACHE_KINDS = {"lru": BlockLRU, "arc": BlockARC}
