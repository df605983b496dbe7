"""Sweep rows regrouped for reading: one table per profile x KV type, budgets down, policies across."""

from __future__ import annotations

from typing import Any

import polars as pl

_POLICY_ORDER = ("static", "lru", "adaptive", "oracle")


def with_series(results: pl.DataFrame) -> pl.DataFrame:
    """The rows with a ``series`` column: the policy, with its swept parameters when it has some, and its
    block budget when a sparse sweep crosses several ("h2o k=8")."""
    if "policy_params" not in results.columns:
        series = pl.col("policy")
    else:
        series = (
            pl.when(pl.col("policy_params").is_null())
            .then(pl.col("policy"))
            .otherwise(pl.concat_str([pl.col("policy"), pl.lit(" ("), pl.col("policy_params"), pl.lit(")")]))
        )
    if "block_budget" in results.columns and results["block_budget"].drop_nulls().n_unique() > 1:
        series = pl.concat_str([series, pl.lit(" k="), pl.col("block_budget").cast(pl.Utf8)])
    return results.with_columns(series.alias("series"))


def facet_tables(results: pl.DataFrame, *, metric: str = "p99_s") -> list[dict[str, Any]]:
    """Per (profile, KV type): ``policies`` and ``rows`` of (budget label, budget bytes, one cell per policy).

    A policy swept over parameter values is one column per combination ("adaptive (decay=0.5)"),
    over several block budgets one column per budget ("h2o k=8").

    A cell is the metric's value (seconds), ``"does not run"``, ``"error"``, or
    None when the sweep had no such cell.
    """
    out: list[dict[str, Any]] = []
    results = with_series(results)
    pols = results["series"].unique(maintain_order=True).to_list()
    pols = [p for p in _POLICY_ORDER if p in pols] + [p for p in pols if p not in _POLICY_ORDER]
    for (prof, kv), g in results.group_by(["profile", "kv_type"], maintain_order=True):
        budgets = (
            g.select("hbm_budget", "hbm_budget_fraction", "hbm_budget_bytes")
            .group_by("hbm_budget", maintain_order=True)
            .agg(pl.col("hbm_budget_fraction").first(), pl.col("hbm_budget_bytes").max())
            .sort(["hbm_budget_fraction", "hbm_budget_bytes"], nulls_last=True)
        )
        rows = []
        for label, _frac, nbytes in budgets.iter_rows():
            cells: list[Any] = []
            for p in pols:
                d = g.filter((pl.col("series") == p) & (pl.col("hbm_budget") == label))
                if d.height == 0:
                    cells.append(None)
                elif d["error"][0] is not None:
                    cells.append("error")
                elif not d["runs"][0]:
                    cells.append("does not run")
                else:
                    cells.append(d[metric][0])
            rows.append((label, nbytes, cells))
        out.append({"profile": prof, "kv_type": kv, "policies": pols, "rows": rows})
    return out
