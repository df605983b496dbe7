"""The memory-tier vocabulary every part of llamatier shares.

Four tiers, fastest first; three links, each joining a tier to the one above it
(SSD and remote reach HBM only through DRAM); two directions on a link; three
timings for a move between tiers. Arrays indexed by tier, link, direction or
move timing use these integer values everywhere (policies, the cost model,
the serving engine, reports), and the names below are the keys of every
report and profile file.
"""

from __future__ import annotations

from enum import IntEnum
from functools import cache

import numpy as np


class TierId(IntEnum):
    """A memory tier, fastest first (the index of every per-tier array)."""

    HBM = 0
    DRAM = 1
    SSD = 2
    REMOTE = 3

    @property
    def label(self) -> str:
        """The tier's name in profiles and reports ("hbm", ...)."""
        return TIER_NAMES[self]


HBM, DRAM, SSD, REMOTE = TierId.HBM, TierId.DRAM, TierId.SSD, TierId.REMOTE
TIER_NAMES = ("hbm", "dram", "ssd", "remote")
N_TIERS = len(TierId)
ABSENT = -1  # placement value of a block that holds no KV (not yet written, or freed)

# Links, each (upper tier, lower tier): the hierarchy is a tree rooted at HBM.
LINK_ENDS: dict[str, tuple[str, str]] = {
    "hbm_dram": ("hbm", "dram"),
    "dram_ssd": ("dram", "ssd"),
    "dram_remote": ("dram", "remote"),
}
LINK_NAMES = tuple(LINK_ENDS)
N_LINKS = len(LINK_NAMES)


class Direction(IntEnum):
    """Direction of a transfer on a link: towards the faster tier (up) or away from it (down)."""

    UP = 0
    DOWN = 1

    @property
    def label(self) -> str:
        return DIRECTION_NAMES[self]


UP, DOWN = Direction.UP, Direction.DOWN
DIRECTION_NAMES = ("up", "down")


class MoveTiming(IntEnum):
    """When a move between tiers is paid for."""

    DEMAND = 0  # on the step's critical path
    PREFETCH = 1  # may hide in link time left idle during the step's compute
    FREE = 2  # costs nothing (the oracle's bound)

    @property
    def label(self) -> str:
        return MOVE_TIMING_NAMES[self]

    @classmethod
    def parse(cls, value: MoveTiming | str | int) -> MoveTiming:
        """A timing from itself, its index or its name ("demand"); ValueError otherwise."""
        if isinstance(value, str):
            if value.strip().lower() in MOVE_TIMING_NAMES:
                return cls(MOVE_TIMING_NAMES.index(value.strip().lower()))
            raise ValueError(value)
        return cls(value)


MOVE_TIMING_NAMES = ("demand", "prefetch", "free")
N_TIMINGS = len(MoveTiming)

# How attention reads KV held in DRAM by a layer that runs on the GPU: attended on the host
# where it lives (llama.cpp -nkvo), fetched over the link, or the cheaper of the two per layer.
DRAM_READ_MODES = ("host", "fetch", "auto")


def link_ends() -> list[tuple[TierId, TierId]]:
    """(upper, lower) tier of each link, in LINK_NAMES order."""
    return [(TierId(TIER_NAMES.index(a)), TierId(TIER_NAMES.index(b))) for a, b in LINK_ENDS.values()]


@cache
def links_crossed(src: int, dst: int) -> tuple[tuple[int, Direction], ...]:
    """(link index, direction) of every link a block crosses going from tier ``src`` to ``dst``.

    In travel order: it climbs from ``src`` to the closest tier both reach going up, then
    descends to ``dst``.
    """
    parent: dict[int, tuple[int, int]] = {int(lo): (int(up), i) for i, (up, lo) in enumerate(link_ends())}

    def chain(t: int) -> list[int]:
        out = [t]
        while out[-1] in parent:
            out.append(parent[out[-1]][0])
        return out

    up_a, up_b = chain(int(src)), chain(int(dst))
    common = next(t for t in up_a if t in up_b)
    climb = [(parent[t][1], UP) for t in up_a[: up_a.index(common)]]
    descend = [(parent[t][1], DOWN) for t in reversed(up_b[: up_b.index(common)])]
    return tuple(climb + descend)


def link_paths() -> np.ndarray:
    """float64 [tier, tier, link, direction]: 1 where a move from the first tier to the second crosses that link that way."""
    m = np.zeros((N_TIERS, N_TIERS, N_LINKS, len(Direction)))
    for a in range(N_TIERS):
        for b in range(N_TIERS):
            for li, d in links_crossed(a, b):
                m[a, b, li, d] = 1.0
    return m
