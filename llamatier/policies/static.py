"""llama.cpp's own KV placement, reproduced faithfully.

llama.cpp allocates the KV cache for the whole context when the context is
created (global layers: n_ctx cells; sliding-window layers without swa_full:
min(n_ctx, pad256(window + n_ubatch)) cells) and never moves it:

- it all goes to the GPU if it fits beside the weights (here: the HBM budget);
- otherwise the user runs with ``-nkvo`` (``offload_kqv=False``): all KV in host
  memory and attention on the CPU (``--static-mode nkvo``), or offloads fewer
  layers with ``-ngl`` (``--static-mode layers``): llama.cpp puts the *last*
  n_gpu_layers layers on the GPU, the rest (weights, KV and compute) on the host;
- if the KV does not fit in host memory either, llama.cpp fails to create the
  context: the verdict is "does not run" (no invented fallback).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from llamatier.policies.base import (
    UNCHANGED,
    Policy,
    StartDecision,
    StepDecision,
    StepView,
    register_policy,
)
from llamatier.tiers import DRAM, HBM
from llamatier.units import format_bytes

if TYPE_CHECKING:
    from llamatier.replay.context import ReplayContext


@register_policy
class StaticPolicy(Policy):
    """llama.cpp: KV for n_ctx reserved at start, all in HBM, else -nkvo or a per-layer split."""

    name = "static"
    summary = "llama.cpp's placement: all KV in HBM if it fits, else on the host (-nkvo) or split by -ngl"
    fixed_placement = True

    def __init__(self, mode: str | None = None) -> None:
        self.mode = mode  # None: the replay's --static-mode

    def params(self) -> dict[str, object]:
        return {"mode": self.mode} if self.mode else {}

    def start(self, ctx: ReplayContext) -> StartDecision:
        mode = self.mode or ctx.options.static_mode
        L, NB = ctx.n_layers, ctx.n_blocks
        per_layer = ctx.reserved_bytes_per_layer().astype(np.float64)
        need = float(per_layer.sum())
        cap = ctx.capacity_bytes
        what = f"llama.cpp reserves {format_bytes(need)} of KV for n_ctx={ctx.n_ctx}"
        if not ctx.host_only and need <= cap[HBM]:
            return StartDecision(
                placement=np.full((L, NB), HBM, dtype=np.int8),
                reserved_bytes=np.array([need, 0.0, 0.0, 0.0]),
                dram_reads="host",
                verdict=f"all KV in HBM ({what}; HBM budget {format_bytes(cap[HBM])})",
            )
        if ctx.host_only or mode == "nkvo":
            if need <= cap[DRAM]:
                how = "CPU host: all KV in DRAM" if ctx.host_only else "KV does not fit HBM: all KV on the host (-nkvo)"
                return StartDecision(
                    placement=np.full((L, NB), DRAM, dtype=np.int8),
                    reserved_bytes=np.array([0.0, need, 0.0, 0.0]),
                    dram_reads="host",
                    verdict=f"{how} ({what})",
                )
            return self._does_not_run(ctx, what)
        return self._layers(ctx, per_layer, what)

    def _layers(self, ctx: ReplayContext, per_layer: np.ndarray, what: str) -> StartDecision:
        """-ngl k: the last k layers (weights + KV) on the GPU, the rest on the host."""
        L, NB = ctx.n_layers, ctx.n_blocks
        w_layer = ctx.target.weight_bytes / L
        room = ctx.capacity_bytes[HBM] + ctx.target.weight_bytes  # HBM the model may use: weights + KV budget
        k = 0
        for n in range(L, -1, -1):
            if n * w_layer + per_layer[L - n :].sum() <= room:
                k = n
                break
        host = np.arange(L) < L - k
        host_kv = float(per_layer[host].sum())
        if host_kv + w_layer * (L - k) > ctx.capacity_bytes[DRAM]:
            return self._does_not_run(ctx, what)
        placement = np.repeat(np.where(host, DRAM, HBM).astype(np.int8)[:, None], NB, axis=1)
        gpu_kv = float(per_layer[~host].sum())
        return StartDecision(
            placement=placement,
            reserved_bytes=np.array([gpu_kv, host_kv, 0.0, 0.0]),
            host_layers=host,
            dram_reads="host",
            capacity_bonus_bytes=np.array([w_layer * (L - k), 0.0, 0.0, 0.0]),  # host layers' weights left HBM
            verdict=f"KV does not fit HBM: -ngl {k} of {L} layers on the GPU, {L - k} (weights, KV, compute) on the host ({what})",
        )

    def _does_not_run(self, ctx: ReplayContext, what: str) -> StartDecision:
        cap = ctx.capacity_bytes
        return StartDecision(
            placement=np.full((ctx.n_layers, ctx.n_blocks), DRAM, dtype=np.int8),
            runs=False,
            verdict=(
                f"does not run: {what}, beyond the HBM budget ({format_bytes(cap[HBM])}) and the DRAM budget "
                f"({format_bytes(cap[DRAM])}); llama.cpp fails to create the context"
            ),
        )

    def decide(self, view: StepView) -> StepDecision:
        return UNCHANGED

    def wants_mass(self) -> bool:
        return False
