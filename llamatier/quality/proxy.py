"""Is the attention mass a policy drops a good proxy for what dropping costs? Rank correlations.

The replay reports "attention mass dropped" from the trace; ``llamatier quality
--evict`` measures KL against the full cache in llama.cpp. Spearman's rank
correlation between the two, over (policy, block budget, text) points, says how
far the cheap proxy can be trusted to order choices: across everything, within
one budget (does it rank the policies right?), and step by step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from llamatier.errors import LlamatierError


def spearman(x: np.ndarray | list[float], y: np.ndarray | list[float]) -> float:
    """Spearman's rank correlation (ties get their average rank); NaN for fewer than 3 points or a constant."""
    a = pl.Series(np.asarray(x, dtype=np.float64)).rank("average").to_numpy()
    b = pl.Series(np.asarray(y, dtype=np.float64)).rank("average").to_numpy()
    if a.size < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def proxy_correlation(rows: pl.DataFrame, positions: pl.DataFrame | None = None) -> dict[str, Any]:
    """Rank correlations between dropped mass and measured accuracy loss.

    ``rows``: eviction rows of one or more traces (``load_eviction_rows`` of each,
    concatenated; column ``trace`` tells them apart); only points that dropped
    something count. ``positions``: their per-step rows (with a ``trace`` column),
    for the step-level correlation.
    """
    need = ("trace", "policy", "keep_blocks", "mass_dropped_mean", "mean_kl", "top1_agreement")
    missing = [c for c in need if c not in rows.columns]
    if missing:
        raise LlamatierError(f"eviction rows lack columns {missing}: give rows written by `llamatier quality --evict`")
    pts = rows.filter(pl.col("mass_dropped_mean") > 0)
    if pts.height < 3:
        raise LlamatierError("fewer than 3 eviction points dropped anything: measure more policies or smaller budgets")

    def rho(d: pl.DataFrame, y: str = "mean_kl") -> float:
        return spearman(d["mass_dropped_mean"].to_numpy(), d[y].to_numpy())

    out: dict[str, Any] = {
        "n_points": pts.height,
        "n_traces": pts["trace"].n_unique(),
        "n_policies": pts["policy"].n_unique(),
        "n_budgets": pts["keep_blocks"].n_unique(),
        "rho_mass_vs_kl": rho(pts),
        "rho_mass_vs_top1_loss": spearman(pts["mass_dropped_mean"].to_numpy(), -pts["top1_agreement"].to_numpy()),
        "per_trace": {t: rho(g) for (t,), g in pts.group_by(["trace"], maintain_order=True)},
        "per_policy": {p: rho(g) for (p,), g in pts.group_by(["policy"], maintain_order=True)},
        # within one text and one budget: does the proxy order the policies as KL does?
        "within_budget": [
            {"trace": t, "keep_blocks": int(k), "n": g.height, "rho": rho(g)}
            for (t, k), g in pts.group_by(["trace", "keep_blocks"], maintain_order=True)
            if g.height >= 3
        ],
    }
    wb = [w["rho"] for w in out["within_budget"] if w["rho"] == w["rho"]]
    out["within_budget_mean_rho"] = float(np.mean(wb)) if wb else float("nan")
    if positions is not None:
        st = positions.filter(pl.col("mass_dropped") > 0)
        out["steps"] = {"n": st.height, "rho_mass_vs_kl": spearman(st["mass_dropped"].to_numpy(), st["kl"].to_numpy())}
    return out
