"""What a serving run derives once from (workload, profile): model, KV bytes, tier budgets, cost models.

The target model, KV types, per-layer bytes and tier budgets come from the
replay's own :func:`llamatier.replay.prepare` on the workload's first trace, so a
serving run and a single-trace replay agree on every byte and budget; step costs
come from the replay's :class:`llamatier.cost.CostModel`, built by
:func:`llamatier.replay.cost_model_for`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from llamatier.cost import CostModel
from llamatier.errors import LlamatierError
from llamatier.hardware import Profile, load_profile
from llamatier.kvtypes import KVType
from llamatier.policies import StartDecision
from llamatier.replay import ReplayOptions, cost_model_for, prepare
from llamatier.serving.plan import TraceShape, trace_shape
from llamatier.serving.ubatch import KVLayout
from llamatier.serving.workload import WorkloadError, WorkloadSpec
from llamatier.target import TargetModel, resolve_geometry
from llamatier.trace import Trace, load_trace
from llamatier.units import format_bytes


@dataclass(eq=False)
class ServingContext:
    """Shared, read-only inputs of a serving run (policies and the engine read it)."""

    spec: WorkloadSpec
    profile: Profile
    target: TargetModel
    type_k: KVType
    type_v: KVType
    traces: tuple[Trace, ...]
    shapes: tuple[TraceShape, ...]
    block_tokens: int
    bytes_per_token_layer: np.ndarray  # int64 [L]: K+V bytes of one token per layer
    windows: np.ndarray  # int64 [K]: distinct sliding windows (0 = global) among the layers
    kind_of_layer: np.ndarray  # int64 [L]: index into ``windows``
    capacity_bytes: np.ndarray  # float64 [4]: KV budget per tier (the replay's rule)
    host_only: bool
    notes: tuple[str, ...]
    _replay_ctx: object = field(repr=False, default=None)
    _cost_models: dict[str, tuple[CostModel, list[str]]] = field(default_factory=dict, repr=False)

    @property
    def n_layers(self) -> int:
        return int(self.bytes_per_token_layer.shape[0])

    @property
    def bytes_per_token(self) -> int:
        """K+V bytes of one token over all layers."""
        return int(self.bytes_per_token_layer.sum())

    @property
    def block_bytes(self) -> int:
        """Bytes of one KV block (block_tokens tokens, all layers)."""
        return self.block_tokens * self.bytes_per_token

    def kv_layout(self) -> KVLayout:
        """What decides the cells each layer attends in the server's llama.cpp (windows, caches, flash attention)."""
        sv = self.spec.server
        hm = self.profile.compute.host_model
        return KVLayout(
            windows=tuple(int(w) for w in self.windows[self.kind_of_layer]),
            n_ctx_seq=sv.slot_context_tokens,
            n_ubatch=int(hm.n_ubatch) if hm is not None and hm.n_ubatch else 512,
            swa_full=sv.swa_full,
            flash_attn=sv.flash_attn != "off",  # "auto" resolves to on for the CPU backend
        )

    def cost_model(self, dram_reads: str) -> tuple[CostModel, list[str]]:
        """The replay's cost model for this target and profile with a DRAM read mode (cached)."""
        if dram_reads not in self._cost_models:
            shim = SimpleNamespace(start=StartDecision(placement=np.zeros((1, 1), dtype=np.int8), dram_reads=dram_reads))
            self._cost_models[dram_reads] = cost_model_for(self._replay_ctx, shim, trace_steps=False)  # type: ignore[arg-type]
        return self._cost_models[dram_reads]


def build_context(spec: WorkloadSpec, *, profile: Profile | None = None, traces: list[Trace] | None = None) -> ServingContext:
    """Load the workload's traces and profile and derive the shared arrays."""
    try:
        prof = profile or load_profile(spec.profile)
    except LlamatierError as exc:
        raise WorkloadError(f"{spec.source}: workload.profile: {exc}") from None
    if traces is None:
        traces = []
        for i, p in enumerate(spec.traces):
            try:
                traces.append(load_trace(p))
            except LlamatierError as exc:
                raise WorkloadError(f"{spec.source}: workload.traces[{i}]: {exc}") from None
    shapes = [trace_shape(t, label=_label(t, i)) for i, t in enumerate(traces)]
    first = traces[0]
    for i, t in enumerate(traces[1:], start=1):
        if t.model.geometry != first.model.geometry and spec.geometry is None:
            raise WorkloadError(
                f"{spec.source}: workload.traces[{i}]: recorded with another model ({t.model.name}) than "
                f"traces[0] ({first.model.name}): set workload.geometry so that all requests cost one model"
            )
    target = None
    if spec.geometry is not None:
        try:
            target = resolve_geometry(spec.geometry)
        except LlamatierError as exc:
            raise WorkloadError(f"{spec.source}: workload.geometry: {exc}") from None
    budgets = spec.server.budgets_bytes
    B = int(spec.server.block_tokens or first.block_tokens)
    opts = ReplayOptions(
        kv_type=spec.kv_type,
        target=target,
        hbm_budget_bytes=budgets[0],
        dram_budget_bytes=budgets[1],
        ssd_budget_bytes=budgets[2],
        remote_budget_bytes=budgets[3],
        swa_full=True,
    )
    try:
        rctx = prepare(first, prof, opts)
    except LlamatierError as exc:
        raise WorkloadError(f"{spec.source}: {exc}") from None
    bpt = rctx.bytes_per_token.astype(np.int64)
    win = np.asarray(rctx.target.geometry.sliding_window, dtype=np.int64)
    windows, kind_of = np.unique(win, return_inverse=True)
    notes = [n for n in rctx.notes if not n.startswith("trace is incomplete")]
    if (win > 0).any():
        notes.append("sliding-window layers read only their window but keep their whole context (as --swa-full)")
    caps = rctx.capacity_bytes.astype(np.float64).copy()
    seq_bytes = float(spec.server.slot_context_tokens) * float(bpt.sum())
    ctx = ServingContext(
        spec=spec,
        profile=prof,
        target=rctx.target,
        type_k=rctx.type_k,
        type_v=rctx.type_v,
        traces=tuple(traces),
        shapes=tuple(shapes),
        block_tokens=B,
        bytes_per_token_layer=bpt,
        windows=windows.astype(np.int64),
        kind_of_layer=kind_of.astype(np.int64).reshape(-1),
        capacity_bytes=caps,
        host_only=bool(rctx.host_only),
        notes=tuple(notes),
        _replay_ctx=rctx,
    )
    if spec.server.prefill_cost == "measured":
        if not ctx.host_only or rctx.target.what_if:
            raise WorkloadError(
                f"{spec.source}: server.prefill_cost: \"measured\" uses the traces' prefill times, measured on "
                f"the tracing host with the traced model; {prof.name} / {rctx.target.label} is another machine or "
                "model: use \"model\""
            )
    fast = caps[1] if ctx.host_only else caps[0]
    if seq_bytes > caps.sum():
        raise WorkloadError(
            f"{spec.source}: server.slot_context_tokens: one sequence of {spec.server.slot_context_tokens} tokens "
            f"holds {format_bytes(seq_bytes)} of KV, more than all tiers together ({format_bytes(caps.sum())})"
        )
    if fast <= 0:
        raise WorkloadError(f"{spec.source}: {prof.name} leaves no room for KV in its fastest tier beside the weights")
    return ctx


def _label(t: Trace, i: int) -> str:
    return Path(t.path).name if t.path is not None else f"trace{i}"
