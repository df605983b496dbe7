"""p99 per-token latency against HBM budget, one line per policy, one facet per profile x KV type."""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from llamatier.errors import LlamatierError
from llamatier.plots.common import (
    bytes_unit,
    log_y,
    new_figure,
    policy_color,
    policy_label,
    wants_log,
)
from llamatier.sweep.tables import with_series

_NEEDED = ("policy", "profile", "kv_type", "hbm_budget_bytes", "hbm_budget_fraction", "p99_s", "runs")
_GIB = 1024.0**3


def _order(values: list[str], preferred: tuple[str, ...] = ()) -> list[str]:
    first = [v for v in preferred if v in values]
    return first + [v for v in values if v not in first]


def plot_sweep(results: pl.DataFrame, *, metric: str = "p99_s", title: str | None = None) -> Figure:
    """Latency (``metric``, seconds; default p99) against HBM budget from a sweep's rows.

    x is the budget as a percentage of the trace's peak KV bytes when every
    cell was given one, else in bytes (GiB/MiB). Cells that do not run (e.g.
    llama.cpp's static placement beyond DRAM) are marked with an x on the top
    edge. Dotted lines mark the KV llama.cpp reserves for n_ctx (what static
    needs in HBM) and the trace's peak KV (100%).
    """
    missing = [c for c in (*_NEEDED, metric) if c not in results.columns]
    if missing:
        raise LlamatierError(f"sweep results lack columns {missing}: re-run `llamatier sweep`")
    df = results.filter(pl.col("error").is_null()) if "error" in results.columns else results
    df = with_series(df)  # a policy swept over parameter values: one line per combination
    if df.height == 0:
        raise LlamatierError("no sweep cell ran without an error: nothing to plot (see the error column)")
    as_pct = df["hbm_budget_fraction"].null_count() == 0
    profiles = _order(df["profile"].unique(maintain_order=True).to_list())
    kvs = _order(df["kv_type"].unique(maintain_order=True).to_list(), ("f16/f16", "q8_0/q8_0", "q4_0/q4_0"))
    policies = _order(df["series"].unique(maintain_order=True).to_list(), ("static", "lru", "adaptive", "oracle"))
    div, unit = (1.0, "%") if as_pct else bytes_unit(float(df["hbm_budget_bytes"].max() or 0))

    nr, nc = len(profiles), len(kvs)
    fig = new_figure(min(5.2 * nc, 18.0) + 0.4, min(3.8 * nr, 16.0) + 0.6)
    axes = np.atleast_2d(fig.subplots(nr, nc, squeeze=False, sharex=as_pct))
    ms = 1e3  # seconds -> ms
    any_fail = False
    for i, prof in enumerate(profiles):
        for j, kv in enumerate(kvs):
            ax = axes[i, j]
            cell = df.filter((pl.col("profile") == prof) & (pl.col("kv_type") == kv))
            ys_all: list[float] = []
            for k, pol in enumerate(policies):
                d = cell.filter(pl.col("series") == pol)
                if d.height == 0:
                    continue
                x = (d["hbm_budget_fraction"].to_numpy() * 100.0) if as_pct else d["hbm_budget_bytes"].to_numpy() / div
                y = d[metric].to_numpy().astype(float) * ms
                runs = d["runs"].to_numpy().astype(bool)
                o = np.argsort(x, kind="stable")
                x, y, runs = x[o], y[o], runs[o]
                bound = bool(d["bound"][0]) if "bound" in d.columns and d["bound"][0] is not None else pol == "oracle"
                color = policy_color(pol, k)
                ax.plot(
                    x, np.where(runs, y, np.nan), marker="o", ms=3.5, lw=1.8, color=color,
                    ls="--" if bound else "-", label=policy_label(pol, bound),
                )
                ys_all += [v for v in y[runs] if np.isfinite(v)]
                if (~runs).any():
                    any_fail = True
                    ax.plot(x[~runs], np.full((~runs).sum(), 1.0), ls="none", marker="x", ms=7, mew=2,
                            color=color, transform=ax.get_xaxis_transform(), clip_on=False)
            _mark_kv_sizes(ax, cell, as_pct, div, unit)
            if wants_log(ys_all, 10.0):
                log_y(ax)
            ax.set_title(f"{prof} · KV {kv}", fontsize=10)
            if i == nr - 1 or not as_pct:
                ax.set_xlabel(
                    "HBM budget for KV (% of the trace's peak KV bytes)" if as_pct else f"HBM budget for KV ({unit})"
                )
            ax.set_ylabel(f"{_metric_name(metric)} per-token latency (ms)")
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    extra = [Line2D([], [], color="0.4", ls=":", lw=1)]
    extra_labels = ["llama.cpp n_ctx KV / peak KV"]
    if any_fail:
        extra.append(Line2D([], [], color="0.3", ls="none", marker="x", mew=2))
        extra_labels.append("does not run")
    axes[0, 0].legend(handles + extra, labels + extra_labels, fontsize=8, loc="best")
    fig.suptitle(title or _title(df, metric), fontsize=11)
    return fig


def _metric_name(metric: str) -> str:
    return metric.removesuffix("_s")


def _title(df: pl.DataFrame, metric: str) -> str:
    target = df["target_model"].drop_nulls() if "target_model" in df.columns else pl.Series([])
    traced = df["traced_model"].drop_nulls() if "traced_model" in df.columns else pl.Series([])
    what_if = bool(df["what_if"].drop_nulls().any()) if "what_if" in df.columns else False
    model = target[0] if len(target) else "?"
    text = f"{_metric_name(metric)} per-token decode latency vs HBM budget: {model}"
    if what_if and len(traced):
        text += f" (what-if: attention traced on {traced[0]})"
    return text


def _mark_kv_sizes(ax: Any, cell: pl.DataFrame, as_pct: bool, div: float, unit: str) -> None:
    """Dotted verticals at llama.cpp's n_ctx reservation and at the trace's peak KV."""
    for col, text in (("kv_n_ctx_bytes", "n_ctx KV"), ("kv_peak_bytes", "peak KV")):
        if col not in cell.columns or cell[col].drop_nulls().len() == 0:
            continue
        v = float(cell[col].drop_nulls()[0])
        peak = float(cell["kv_peak_bytes"].drop_nulls()[0]) if "kv_peak_bytes" in cell.columns else 0.0
        x = (v / peak * 100.0) if as_pct and peak > 0 else (None if as_pct else v / div)
        if x is None:
            continue
        ax.axvline(x, color="0.4", ls=":", lw=1)
        ax.text(x, 0.98, f"{text} ", rotation=90, va="top", ha="right", fontsize=7, color="0.35",
                transform=ax.get_xaxis_transform())
