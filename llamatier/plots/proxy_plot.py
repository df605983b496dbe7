"""Dropped attention mass (the replay's proxy) against KL measured in llama.cpp, one point per policy x budget x text."""

from __future__ import annotations

import polars as pl
from matplotlib.figure import Figure

from llamatier.plots.common import log_y, new_figure, policy_color

_MARKERS = ("o", "s", "^", "D", "v", "P")


def plot_proxy(rows: pl.DataFrame, *, title: str | None = None) -> Figure:
    """Scatter of mean dropped mass (x) against measured mean KL (y, log), coloured by policy, marked by text.

    Lines join one policy's budgets on one text; the title carries Spearman's rho
    over every point that dropped something.
    """
    from llamatier.quality.proxy import proxy_correlation

    stats = proxy_correlation(rows)
    pts = rows.filter(pl.col("mass_dropped_mean") > 0)
    traces = pts["trace"].unique(maintain_order=True).to_list()
    policies = pts["policy"].unique(maintain_order=True).to_list()
    fig = new_figure(7.2, 5.0)
    ax = fig.subplots()
    for k, pol in enumerate(policies):
        for t_i, tr in enumerate(traces):
            d = pts.filter((pl.col("policy") == pol) & (pl.col("trace") == tr)).sort("keep_blocks")
            if d.height == 0:
                continue
            ax.plot(d["mass_dropped_mean"].to_numpy(), d["mean_kl"].to_numpy(), color=policy_color(pol, k),
                    marker=_MARKERS[t_i % len(_MARKERS)], ms=5, lw=1.0, alpha=0.85,
                    label=pol if t_i == 0 else None)
    for t_i, tr in enumerate(traces):
        ax.plot([], [], ls="none", color="0.3", marker=_MARKERS[t_i % len(_MARKERS)], label=_short(tr))
    if (pts["mean_kl"] > 0).all():
        log_y(ax)
    ax.set_xlabel("attention mass dropped per step (replay, mean over layers and steps)")
    ax.set_ylabel("mean KL vs full cache, measured in llama.cpp (nats)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    rho = stats["rho_mass_vs_kl"]
    fig.suptitle(
        title or f"Is dropped mass a good proxy? Spearman rho = {rho:.2f} over {stats['n_points']} points "
        f"({stats['n_policies']} policies x {stats['n_budgets']} budgets x {stats['n_traces']} texts)",
        fontsize=10,
    )
    return fig


def _short(trace: str) -> str:
    parts = [p for p in str(trace).replace("\\", "/").split("/") if p]
    return parts[-1] if parts else str(trace)
