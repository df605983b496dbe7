"""One sweep cell: a frozen, picklable spec of one replay, and the pure function that runs it.

``run_cell(cell) -> row`` loads the trace and profile by name, resolves the
cell's HBM budget against its KV bytes, replays, and flattens the summary into
one flat dict with a fixed set of columns (:data:`ROW_SCHEMA`). Nothing in it
depends on the process it runs in, so any executor (local processes today, a
cluster later) can run cells and get the same rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import numpy as np
import polars as pl

from llamatier.errors import LlamatierError
from llamatier.hardware import Profile, load_profile
from llamatier.replay.budgets import BudgetPoint
from llamatier.replay.options import ReplayOptions, column_values, option_columns, params_label
from llamatier.sweep.shipping import resolve_trace
from llamatier.tiers import LINK_NAMES, TIER_NAMES
from llamatier.trace import Trace, load_trace


@dataclass(frozen=True)
class SweepCell:
    """Every input of one replay in a sweep: picklable and hashable.

    ``options`` holds every replay option but the HBM budget, which is
    ``hbm_budget`` (a percentage resolves against this cell's own peak KV).
    """

    trace_path: str
    profile: str  # profile name or TOML path
    policy: str
    hbm_budget: BudgetPoint = field(default_factory=BudgetPoint)
    options: ReplayOptions = field(default_factory=ReplayOptions)
    trace_digest: str | None = None  # content hash: a worker elsewhere reads this very trace, or says it cannot

    def replay_options(self, hbm_budget_bytes: int | None = None) -> ReplayOptions:
        """This cell's options with the HBM budget given in bytes (None: the profile's)."""
        return replace(self.options, hbm_budget_bytes=hbm_budget_bytes, hbm_budget_fraction=None)


# -- per-process caches: a worker loads each trace, profile and geometry once ---------------


@lru_cache(maxsize=4)
def cached_trace(path: str) -> Trace:
    return load_trace(path)


@lru_cache(maxsize=16)
def cached_profile(name: str) -> Profile:
    return load_profile(name)


@lru_cache(maxsize=16)
def cached_geometry(name: str) -> Any:
    from llamatier.target import resolve_geometry

    return resolve_geometry(name)


# -- the row: a fixed, typed set of columns --------------------------------------------------

_F, _I, _S, _B = pl.Float64, pl.Int64, pl.Utf8, pl.Boolean

# (column, dtype, path into ReplayResult.summary())
_OUTPUTS: list[tuple[str, Any, tuple[str, ...]]] = [
    ("runs", _B, ("runs",)),
    ("verdict", _S, ("verdict",)),
    ("bound", _B, ("bound",)),
    ("target_model", _S, ("model",)),
    ("what_if", _B, ("what_if",)),
    *[(f"budget_{t}_bytes", _F, ("budget_bytes", t)) for t in TIER_NAMES],
    ("decode_steps", _I, ("latency", "decode_steps")),
    *[(f"{k}_s", _F, ("latency", f"{k}_s")) for k in ("p50", "p90", "p99", "max", "mean", "ttft", "total")],
    ("tok_per_s", _F, ("latency", "tok_per_s")),
    *[
        (f"decode_{k}_s", _F, ("decode_time_split_s", k))
        for k in ("compute", "host_layers", "hbm", "host_attention", "link")
    ],
    *[(f"read_{t}_bytes", _F, ("bytes_read", t)) for t in TIER_NAMES],
    *[(f"written_{t}_bytes", _F, ("bytes_written", t)) for t in TIER_NAMES],
    *[(f"link_{n}_{d}_bytes", _F, ("bytes_per_link", n, d)) for n in LINK_NAMES for d in ("up", "down")],
    ("migrated_blocks", _F, ("migrations", "blocks")),
    ("migrated_bytes", _F, ("migrations", "bytes")),
    ("prefetched_blocks", _F, ("migrations", "prefetched_blocks")),
    *[(f"peak_{t}_bytes", _F, ("peak_occupancy_bytes", t)) for t in TIER_NAMES],
    ("dropped_mass_mean", _F, ("attention_mass_dropped", "mean")),
    ("dropped_mass_p99_step", _F, ("attention_mass_dropped", "p99_step")),
    ("energy_total_j", _F, ("energy_j", "total")),
    ("energy_per_token_j", _F, ("energy_j", "per_decode_token")),
    ("energy_weights_j", _F, ("energy_j", "weights")),
    ("energy_transfers_j", _F, ("energy_j", "transfers")),
    ("energy_compute_j", _F, ("energy_j", "compute")),
    *[(f"energy_kv_{t}_j", _F, ("energy_j", "kv", t)) for t in TIER_NAMES],
    ("block_accesses", _I, ("replay", "block_accesses")),
    ("replay_wall_s", _F, ("replay", "wall_s")),
    ("decision_s", _F, ("policy_decision", "total_s")),
]

_INPUTS: list[tuple[str, Any]] = [
    ("trace", _S),
    ("traced_model", _S),
    ("profile", _S),
    ("policy", _S),
    ("policy_params", _S),  # the cell's --policy-param values ("decay=0.5"), None: the policy's defaults
    *[(name, {str: _S, int: _I, bool: _B}[typ]) for name, typ in option_columns()],  # kv_type, geometry, mode, ...
    ("hbm_budget", _S),  # as given: "25%", "1.00 GiB", "auto"
    ("hbm_budget_fraction", _F),  # of kv_peak_bytes (None when given as a size or auto)
    ("hbm_budget_bytes", _F),  # the HBM budget the replay used
    ("kv_peak_bytes", _F),  # most KV bytes the trace stores at once (the 100% of the axis)
    ("kv_n_ctx_bytes", _F),  # KV llama.cpp reserves for n_ctx (what static needs in HBM)
]

_EXTRA: list[tuple[str, Any]] = [("error", _S), ("notes", _S), ("cell_wall_s", _F)]

ROW_SCHEMA: dict[str, Any] = {
    "cell": _I,
    **dict(_INPUTS),
    **{name: dtype for name, dtype, _ in _OUTPUTS},
    **dict(_EXTRA),
}


def _get(d: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _cast(value: Any, dtype: Any) -> Any:
    if value is None:
        return None
    if dtype == _F:
        v = float(value)
        return None if np.isnan(v) else v
    if dtype == _I:
        return int(value)
    if dtype == _B:
        return bool(value)
    return str(value)


def summary_row(summary: dict[str, Any]) -> dict[str, Any]:
    """The output columns of a row from ``ReplayResult.summary()`` (None where a figure is absent)."""
    out = {name: _cast(_get(summary, path), dtype) for name, dtype, path in _OUTPUTS}
    out["notes"] = "; ".join(summary.get("notes", [])) or None
    return out


def run_cell(cell: SweepCell) -> dict[str, Any]:
    """Replay one cell; returns its row (every column of :data:`ROW_SCHEMA` except ``cell``).

    Input errors of this one cell (e.g. weights that do not fit the profile's
    HBM) land in the row's ``error`` column, so one impossible combination does
    not stop a sweep; the caller decides what to do with them.
    """
    from llamatier.replay import prepare, replay_prepared

    t0 = time.perf_counter()
    row: dict[str, Any] = {name: None for name in ROW_SCHEMA if name != "cell"}
    o = cell.options
    row.update(
        trace=cell.trace_path,
        profile=cell.profile,
        policy=cell.policy,
        policy_params=params_label(o.policy_params.get(cell.policy)),
        **column_values(o),
        hbm_budget=cell.hbm_budget.label,
        hbm_budget_fraction=cell.hbm_budget.fraction,
        runs=False,
    )
    try:
        trace = cached_trace(resolve_trace(cell.trace_path, cell.trace_digest))
        row["traced_model"] = trace.model.name
        profile = cached_profile(cell.profile)
        # prepare resolves a percentage against this cell's own peak KV (its KV type, geometry, blocks)
        t_replay = time.perf_counter()
        ctx = prepare(trace, profile, o.with_hbm_budget(cell.hbm_budget))
        row["kv_type"] = f"{ctx.type_k.name}/{ctx.type_v.name}"
        row["block_tokens"] = ctx.block_tokens
        row["kv_peak_bytes"] = ctx.peak_kv_bytes()
        row["kv_n_ctx_bytes"] = float(ctx.reserved_bytes_per_layer().sum())
        result = replay_prepared(ctx, cell.policy, t_start=t_replay)
        row.update(summary_row(result.summary()))
        row["hbm_budget_bytes"] = row["budget_hbm_bytes"]
    except LlamatierError as exc:
        row["error"] = str(exc)
    row["cell_wall_s"] = time.perf_counter() - t0
    return row


