"""Per-step latency and tier occupancy over a replayed run (one result or a comparison)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from llamatier.errors import LlamatierError
from llamatier.plots.common import (
    TIER_COLORS,
    bytes_unit,
    log_y,
    new_figure,
    policy_color,
    policy_label,
    wants_log,
)
from llamatier.tiers import TIER_NAMES


def _results(what: Any) -> list[Any]:
    if hasattr(what, "results"):  # a Comparison
        return list(what.results)
    if isinstance(what, Sequence):
        return list(what)
    return [what]


def plot_replay(what: Any, *, title: str | None = None) -> Figure:
    """Top: modelled latency of each decode step (ms), one line per policy; below: one panel per
    policy with its KV bytes in each tier after every step (stacked) and its HBM budget.

    ``what`` is a ReplayResult, a Comparison, or a sequence of ReplayResults
    replayed on the same trace. A placement that does not run gets a panel
    saying so instead of data.
    """
    results = _results(what)
    if not results:
        raise LlamatierError("nothing to plot: give at least one replay result")
    n = len(results)
    fig = new_figure(10.0, 2.9 + 1.9 * n)
    axes = fig.subplots(n + 1, 1, sharex=True, height_ratios=[1.6] + [1.0] * n)
    ax_lat = axes[0]
    first = results[0]
    steps = np.arange(first.n_steps)
    prefill = ~np.asarray(first.is_decode, dtype=bool)
    ys: list[float] = []
    for k, r in enumerate(results):
        label = policy_label(r.policy, r.is_bound)
        color = policy_color(r.policy, k)
        if not r.runs or r.costs is None:
            ax_lat.plot([], [], color=color, label=f"{label}: does not run")
            continue
        dec = np.asarray(r.is_decode, dtype=bool)
        y = np.where(dec, r.costs.step_s * 1e3, np.nan)
        ax_lat.plot(np.arange(r.n_steps), y, lw=1.3, color=color, ls="--" if r.is_bound else "-", label=label)
        ys += [float(v) for v in y[dec]]
    if wants_log(ys):
        log_y(ax_lat)
    _shade_prefill(ax_lat, steps, prefill)
    ax_lat.set_ylabel("decode step latency (ms)")
    ax_lat.set_title("Modelled per-token latency (prefill steps shaded, not drawn)", fontsize=10)
    ax_lat.legend(fontsize=8, loc="best")
    ax_lat.grid(True, which="both", alpha=0.3)

    peak = max(
        [float(r.record.occupancy_bytes.max()) if r.runs else 0.0 for r in results]
        + [float(r.capacity_bytes[0]) for r in results if r.runs]
    )
    div, unit = bytes_unit(peak)
    for k, r in enumerate(results):
        ax = axes[k + 1]
        label = policy_label(r.policy, r.is_bound)
        if not r.runs:
            ax.text(0.5, 0.5, f"{label}: does not run\n{r.verdict}", ha="center", va="center", fontsize=8,
                    wrap=True, transform=ax.transAxes)
            ax.set_yticks([])
        else:
            occ = np.asarray(r.record.occupancy_bytes, dtype=float) / div  # [S, 4]
            ax.stackplot(np.arange(r.n_steps), occ.T, labels=list(TIER_NAMES),
                         colors=[TIER_COLORS[t] for t in TIER_NAMES], alpha=0.85)
            ax.axhline(float(r.capacity_bytes[0]) / div, color="k", ls="--", lw=1, label="HBM budget")
            ax.set_ylabel(f"KV held ({unit})")
            ax.grid(True, alpha=0.3)
            if k == 0:
                ax.legend(fontsize=7, loc="upper left", ncol=5)
        _shade_prefill(ax, steps, prefill)
        ax.set_title(f"{label}: KV bytes per tier after each step", fontsize=9)
    axes[-1].set_xlabel("step (llama_decode call)")
    fig.suptitle(title or _title(first), fontsize=11)
    return fig


def _shade_prefill(ax: Any, steps: np.ndarray, prefill: np.ndarray) -> None:
    if prefill.any():
        idx = steps[prefill]
        ax.axvspan(idx.min() - 0.5, idx.max() + 0.5, color="0.85", alpha=0.5, lw=0)


def _title(r: Any) -> str:
    text = f"{r.model} on {r.profile}, KV {r.type_k}/{r.type_v}, {r.mode}"
    if r.what_if:
        text += " (what-if geometry)"
    return text
