"""The latency-accuracy frontier: modelled p99 latency against KL measured in llama.cpp, per eviction policy."""

from __future__ import annotations

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from llamatier.errors import LlamatierError
from llamatier.plots.common import log_y, new_figure, policy_color, wants_log


def plot_frontier(rows: pl.DataFrame, *, title: str | None = None) -> Figure:
    """p99 per-token latency (x) against measured mean KL (y) from sweep rows joined with eviction results.

    One line per policy through its block budgets (each point labelled with its
    budget in blocks), one facet per profile x KV type x HBM budget. Down and to
    the left is better.
    """
    from llamatier.sweep.frontier import frontier_table

    df = frontier_table(rows)
    if df.height == 0:
        raise LlamatierError("no sweep cell has a measured accuracy: check that --quality matches the sweep's policies and budgets")
    facets = df.select("profile", "kv_type", "hbm_budget").unique(maintain_order=True).rows()
    nc = min(len(facets), 3)
    nr = -(-len(facets) // nc)
    fig = new_figure(5.6 * nc + 0.4, 4.2 * nr + 0.6)
    axes = np.atleast_1d(fig.subplots(nr, nc, squeeze=False)).ravel()
    policies = df["policy"].unique(maintain_order=True).to_list()
    for ax, (prof, kv, hbm) in zip(axes, facets, strict=False):
        d = df.filter((pl.col("profile") == prof) & (pl.col("kv_type") == kv) & (pl.col("hbm_budget") == hbm))
        ys: list[float] = []
        for k, pol in enumerate(policies):
            p = d.filter(pl.col("policy") == pol).sort("block_budget")
            if p.height == 0:
                continue
            x = p["p99_s"].to_numpy() * 1e3
            y = p["measured_mean_kl"].to_numpy()
            ax.plot(x, y, marker="o", ms=4, lw=1.6, color=policy_color(pol, k), label=pol)
            for xi, yi, b in zip(x, y, p["block_budget"].to_list(), strict=True):
                ax.annotate(str(b), (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7,
                            color=policy_color(pol, k))
            ys += [float(v) for v in y]
        if wants_log(ys, 10.0):
            log_y(ax)
        ax.set_title(f"{prof} · KV {kv} · HBM budget {hbm}", fontsize=10)
        ax.set_xlabel("p99 per-token latency, modelled (ms)")
        ax.set_ylabel("mean KL vs full cache, measured (nats)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[len(facets):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8, loc="best", title="policy (labels: blocks kept)", title_fontsize=8)
    model = df_model(rows)
    fig.suptitle(title or f"latency-accuracy frontier: {model}", fontsize=11)
    return fig


def df_model(rows: pl.DataFrame) -> str:
    """'MODEL' or 'TARGET (attention of TRACED)' for a title."""
    target = rows["target_model"].drop_nulls() if "target_model" in rows.columns else pl.Series([])
    traced = rows["traced_model"].drop_nulls() if "traced_model" in rows.columns else pl.Series([])
    name = target[0] if len(target) else (traced[0] if len(traced) else "?")
    if "what_if" in rows.columns and bool(rows["what_if"].drop_nulls().any()) and len(traced):
        return f"{name} what-if latency, accuracy measured on {traced[0]}"
    return str(name)
