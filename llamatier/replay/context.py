"""Everything a replay derives once from (trace, profile, options): shapes, ranges, bytes, budgets.

Both engines and every policy read the same :class:`ReplayContext`, so they agree
on what is visible, what is stored and how many bytes a block holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from llamatier.errors import LlamatierError
from llamatier.hardware import Profile
from llamatier.kvtypes import KVType, kv_type, parse_kv_pair
from llamatier.replay.budgets import BudgetPoint
from llamatier.replay.options import ReplayOptions
from llamatier.target import TargetModel, map_layers, target_from_model_info
from llamatier.tiers import TIER_NAMES
from llamatier.trace import Trace
from llamatier.units import format_bytes

KV_PAD_CELLS = 256  # llama.cpp pads KV cache sizes to 256 cells


@dataclass(frozen=True, eq=False)
class ReplayContext:
    """Per-replay arrays shared by engines and policies (read-only by convention)."""

    trace: Trace
    profile: Profile
    options: ReplayOptions
    target: TargetModel
    layer_map: np.ndarray  # int64 [n_layers]: traced layer each target layer replays
    type_k: KVType
    type_v: KVType
    block_tokens: int
    n_tokens: np.ndarray  # int64 [n_steps]
    pos0: np.ndarray  # int64 [n_steps]
    ctx_tokens: np.ndarray  # int64 [n_steps]: cells holding KV after the step
    is_decode: np.ndarray  # bool [n_steps]
    hi_block: np.ndarray  # int64 [n_steps]: one past the last block with KV
    lo_visible_pos: np.ndarray  # int64 [n_steps, n_layers]: first position the step's queries see
    lo_visible: np.ndarray  # int64 [n_steps, n_layers]: block of lo_visible_pos
    lo_alive: np.ndarray  # int64 [n_steps, n_layers]: first block still stored
    bytes_per_token: np.ndarray  # int64 [n_layers]: K+V bytes of one token in each layer
    block_bytes: np.ndarray  # float64 [n_layers]: bytes a block occupies (block_tokens tokens)
    capacity_bytes: np.ndarray  # float64 [4]: KV budget per tier
    n_ctx: int
    n_ubatch: int
    n_threads: int
    host_only: bool
    notes: tuple[str, ...] = field(default=())

    @property
    def n_steps(self) -> int:
        return int(self.hi_block.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.bytes_per_token.shape[0])

    @property
    def n_blocks(self) -> int:
        return int(self.hi_block.max()) if self.n_steps else 0

    @property
    def maps_layers(self) -> bool:
        """Target layers are not the traced layers one to one (a what-if geometry)."""
        return not (self.layer_map.size == self.trace.n_layers and (self.layer_map == np.arange(self.trace.n_layers)).all())

    def iter_mass(self, *, reverse: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """``(step, float32 [n_layers, n_blocks])`` of the target layers, one step at a time, read
        from the trace chunk by chunk (``reverse``: from the last step back)."""
        return self.trace.iter_mass(reverse=reverse, layers=self.layer_map if self.maps_layers else None)

    @cached_property
    def mass(self) -> np.ndarray:
        """All steps' mass, float32 [n_steps, n_layers, n_blocks] (small traces: the reference engine, tests)."""
        if not self.maps_layers:
            return self.trace.mass
        out = np.zeros((self.n_steps, self.n_layers, self.n_blocks), dtype=np.float32)
        for s, m in self.iter_mass():
            out[s] = m
        return out

    @property
    def sliding_window(self) -> np.ndarray:
        return np.asarray(self.target.geometry.sliding_window, dtype=np.int64)

    def reserved_tokens_per_layer(self) -> np.ndarray:
        """Cells llama.cpp allocates per layer at context creation (int64 [n_layers]).

        Global layers: n_ctx. Sliding-window layers without swa_full:
        min(n_ctx, pad256(window + n_ubatch)) (llama.cpp's SWA cache size).
        """
        w = self.sliding_window
        swa_cells = -(-(w + self.n_ubatch) // KV_PAD_CELLS) * KV_PAD_CELLS
        keep_all = (w == 0) | self.options.swa_full
        return np.where(keep_all, self.n_ctx, np.minimum(self.n_ctx, swa_cells)).astype(np.int64)

    def peak_kv_bytes(self) -> float:
        """Most KV bytes the trace stores at once under this replay (alive blocks, all layers).

        This is what "100%" means for an HBM budget given as a percentage: with
        this much HBM every block a step keeps fits in HBM (llama.cpp's static
        placement needs more: it reserves the whole n_ctx up front).
        """
        return _peak_kv_bytes(self.hi_block, self.lo_alive, self.block_bytes)

    def reserved_bytes_per_layer(self) -> np.ndarray:
        return self.reserved_tokens_per_layer() * self.bytes_per_token

    def visible_mask(self, step: int) -> np.ndarray:
        b = np.arange(self.n_blocks)
        return (b[None, :] >= self.lo_visible[step][:, None]) & (b[None, :] < self.hi_block[step])


def _peak_kv_bytes(hi_block: np.ndarray, lo_alive: np.ndarray, block_bytes: np.ndarray) -> float:
    if hi_block.size == 0:
        return 0.0
    alive_blocks = hi_block[:, None] - lo_alive  # [S, L]
    return float((alive_blocks * block_bytes[None, :]).sum(axis=1).max())


def _trace_kv_types(trace: Trace) -> tuple[KVType, KVType]:
    c = trace.context
    return kv_type(c.get("type_k", "f16")), kv_type(c.get("type_v", "f16"))


def _incomplete_note(trace: Trace) -> str:
    """What an incomplete trace holds, and why it stopped (from its meta.json)."""
    m, c = trace.meta, trace.context
    why = (
        "interrupted" if m.get("interrupted")
        else f"stopped by an error: {m['error']}" if m.get("error")
        else "the run stopped early, crashed or is still running"
    )
    held = int(trace.context_tokens[-1])
    planned = int(c.get("n_prompt_tokens", 0) or 0) + int(c.get("n_predict", 0) or 0)
    of = f" of {planned} planned" if planned > held else ""
    note = f"trace is incomplete ({why}): replaying the {trace.n_steps} steps it holds ({held}{of} tokens)"
    if not trace.is_decode.any():
        note += "; it holds no decode step, so there is no per-token latency"
    return note


def prepare(trace: Trace, profile: Profile, options: ReplayOptions) -> ReplayContext:
    """Derive the shared replay arrays; LlamatierError on inputs that cannot be replayed."""
    if trace.n_steps == 0:
        raise LlamatierError("the trace has no steps: record a longer run")
    if options.block_tokens is not None:
        trace = trace.with_block_tokens(int(options.block_tokens))
    notes: list[str] = []
    if not trace.complete:
        notes.append(_incomplete_note(trace))
    target = options.target or target_from_model_info(trace.model)
    if target.what_if:
        notes.append(
            f"what-if: attention pattern of {trace.model.name} replayed with the KV geometry and size of "
            f"{target.label} ({target.source}); target layers map onto traced layers of the same kind in depth order"
        )
    layer_map = map_layers(trace.model.geometry, target.geometry)
    tk, tv = parse_kv_pair(options.kv_type) if options.kv_type else _trace_kv_types(trace)
    L = target.geometry.n_layers
    B = int(trace.block_tokens)
    bpt = np.array([target.geometry.layer_bytes_per_token(i, tk, tv) for i in range(L)], dtype=np.int64)

    steps = trace.steps
    n_tokens = steps["n_tokens"].to_numpy().astype(np.int64)
    pos0 = steps["pos0"].to_numpy().astype(np.int64)
    ctx = pos0 + n_tokens
    hi = -(-ctx // B)
    w = np.asarray(target.geometry.sliding_window, dtype=np.int64)
    lo_vis_pos = np.where(w[None, :] > 0, np.maximum(0, pos0[:, None] - w[None, :] + 1), 0)
    lo_vis = lo_vis_pos // B
    lo_alive = lo_vis if not options.swa_full else np.zeros_like(lo_vis)

    n_ctx = max(int(trace.n_ctx), int(ctx.max()))
    c = trace.context
    n_ubatch = int(options.n_ubatch or c.get("n_ubatch", 512))
    n_threads = int(c.get("n_threads", 1) or 1)

    host_only = bool(profile.is_host_only)
    tier_caps = [float(profile.tier(t).capacity_bytes) for t in TIER_NAMES]
    weights = float(target.weight_bytes)
    if host_only:
        hbm = 0.0
        if options.hbm_budget_bytes or options.hbm_budget_fraction:
            notes.append("--hbm-budget ignored: this profile has no HBM (DRAM is its fastest tier)")
        dram_default = tier_caps[1] - weights
        if dram_default < 0 and options.dram_budget_bytes is None:
            raise LlamatierError(
                f"model weights ({format_bytes(weights)}) do not fit in {profile.name}'s DRAM "
                f"({format_bytes(tier_caps[1])}): use a profile with more memory"
            )
    else:
        room = tier_caps[0] - weights
        if room < 0:
            raise LlamatierError(
                f"model weights ({format_bytes(weights)}) do not fit in {profile.name}'s HBM "
                f"({format_bytes(tier_caps[0])}); partial weight offload is not modelled: choose a "
                "profile with more HBM or a smaller --geometry"
            )
        if options.hbm_budget_fraction is not None:  # of the peak KV, as a sweep's percentages
            peak = _peak_kv_bytes(hi, lo_alive, (bpt * B).astype(np.float64))
            hbm = float(BudgetPoint(fraction=options.hbm_budget_fraction).resolve_bytes(peak))
        else:
            hbm = float(options.hbm_budget_bytes) if options.hbm_budget_bytes is not None else room
        if hbm > room:
            notes.append(
                f"HBM budget {format_bytes(hbm)} exceeds what is left beside the weights ({format_bytes(room)})"
            )
        dram_default = tier_caps[1]
    caps = np.array(
        [
            hbm,
            float(options.dram_budget_bytes) if options.dram_budget_bytes is not None else dram_default,
            float(options.ssd_budget_bytes) if options.ssd_budget_bytes is not None else tier_caps[2],
            float(options.remote_budget_bytes) if options.remote_budget_bytes is not None else tier_caps[3],
        ],
        dtype=np.float64,
    )
    return ReplayContext(
        trace=trace,
        profile=profile,
        options=options,
        target=target,
        layer_map=layer_map,
        type_k=tk,
        type_v=tv,
        block_tokens=B,
        n_tokens=n_tokens,
        pos0=pos0,
        ctx_tokens=ctx,
        is_decode=trace.is_decode,
        hi_block=hi,
        lo_visible_pos=lo_vis_pos,
        lo_visible=lo_vis,
        lo_alive=lo_alive,
        bytes_per_token=bpt,
        block_bytes=(bpt * B).astype(np.float64),
        capacity_bytes=caps,
        n_ctx=n_ctx,
        n_ubatch=n_ubatch,
        n_threads=n_threads,
        host_only=host_only,
        notes=tuple(notes),
    )
