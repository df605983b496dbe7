"""Replay options: what-if knobs that are not part of the trace or the hardware profile."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llamatier.errors import LlamatierError
from llamatier.kvtypes import parse_kv_pair
from llamatier.target import TargetModel
from llamatier.tiers import DRAM_READ_MODES

MODES = ("lossless", "sparse")
STATIC_MODES = ("nkvo", "layers")


@dataclass(frozen=True)
class ReplayOptions:
    """How to replay a trace (every field has a default that reproduces the traced run)."""

    mode: str = "lossless"  # "lossless": every visible block read each step; "sparse": block_budget per layer
    block_budget: int | None = None  # sparse mode: blocks read per layer per decode step
    hbm_budget_bytes: int | None = None  # KV bytes allowed in HBM (default: HBM capacity - weight bytes)
    dram_budget_bytes: int | None = None  # KV bytes allowed in DRAM (default: capacity; host profiles: minus weights)
    ssd_budget_bytes: int | None = None  # default: SSD capacity
    remote_budget_bytes: int | None = None  # default: remote capacity
    kv_type: str | None = None  # "q8_0/f16" (K/V) or "q4_0" (both); default: the trace's types
    target: TargetModel | None = None  # what-if model geometry; default: the traced model
    block_tokens: int | None = None  # re-aggregate the trace to coarser blocks
    static_mode: str = "nkvo"  # static policy when KV does not fit HBM: "nkvo" (all on host) or "layers"
    dram_reads: str = "auto"  # adaptive/oracle: DRAM-resident KV "host"-attended, "fetch"ed, or "auto" per layer
    prefetch: bool = False  # adaptive: migrations may use idle link time during compute
    swa_full: bool = False  # llama.cpp --swa-full: keep all cells of sliding-window layers
    n_ubatch: int | None = None  # llama.cpp n_ubatch (static's window-layer reservation); default: the trace's
    policy_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # {policy name: constructor kwargs}

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise LlamatierError(f"unknown mode {self.mode!r}: use lossless or sparse")
        if self.mode == "sparse":
            if self.block_budget is None or int(self.block_budget) < 1:
                raise LlamatierError("sparse mode needs --block-budget N (blocks read per layer per step, N >= 1)")
        elif self.block_budget is not None:
            raise LlamatierError("--block-budget only applies with --mode sparse (lossless reads every block)")
        if self.static_mode not in STATIC_MODES:
            raise LlamatierError(f"unknown static mode {self.static_mode!r}: use nkvo or layers")
        if self.dram_reads not in DRAM_READ_MODES:
            raise LlamatierError(f"unknown DRAM read mode {self.dram_reads!r}: use host, fetch or auto")
        for name in ("hbm_budget_bytes", "dram_budget_bytes", "ssd_budget_bytes", "remote_budget_bytes"):
            v = getattr(self, name)
            if v is not None and int(v) < 0:
                flag = "--" + name.removesuffix("_bytes").replace("_", "-")
                raise LlamatierError(f"{flag} must be >= 0 bytes (got {v})")
        if self.kv_type is not None:
            parse_kv_pair(self.kv_type)  # raises with the valid names
        if self.block_tokens is not None and int(self.block_tokens) < 1:
            raise LlamatierError(f"--block-tokens must be >= 1 (got {self.block_tokens})")
        if self.n_ubatch is not None and int(self.n_ubatch) < 1:
            raise LlamatierError(f"n_ubatch must be >= 1 (got {self.n_ubatch})")
