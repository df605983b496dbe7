"""The latency-accuracy frontier: a sparse sweep's modelled latency beside accuracy measured in llama.cpp.

``join_measured(rows, eviction_rows, trace)`` adds to each sweep row (a policy at a
block budget) what ``llamatier quality --evict`` measured for the same policy and
budget on the same trace: KL against the full cache, top-1 agreement and the
perplexity change. ``frontier_table`` lists the points a user picks a budget from.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from llamatier.errors import LlamatierError
from llamatier.trace import Trace

MEASURED_COLUMNS: dict[str, Any] = {
    "measured_mean_kl": pl.Float64,
    "measured_p99_kl": pl.Float64,
    "measured_top1": pl.Float64,
    "measured_ppl_change_pct": pl.Float64,
    "measured_mass_dropped": pl.Float64,
    "measured_steps": pl.Int64,
}
_FROM = {
    "measured_mean_kl": "mean_kl",
    "measured_p99_kl": "p99_kl",
    "measured_top1": "top1_agreement",
    "measured_ppl_change_pct": "ppl_change_pct",
    "measured_mass_dropped": "mass_dropped_mean",
    "measured_steps": "n_steps",
}


def same_trace(eviction_rows: pl.DataFrame, trace: Trace) -> pl.DataFrame:
    """The eviction rows measured on ``trace`` (same prompt and recording); an error when there are none."""
    sha = str((trace.meta.get("prompt") or {}).get("sha256", ""))
    created = str(trace.meta.get("created_utc", ""))
    mine = eviction_rows.filter(
        (pl.col("trace_prompt_sha256") == sha) & (pl.col("trace_created_utc") == created)
        & (pl.col("block_tokens") == int(trace.block_tokens))
    )
    if mine.height == 0:
        where = eviction_rows["trace"][0] if eviction_rows.height else "?"
        raise LlamatierError(
            f"the eviction results were measured on another trace ({where}): run `llamatier quality MODEL "
            f"--trace {trace.path} --evict ... --out DIR` and give that DIR to --quality"
        )
    return mine


def join_measured(rows: pl.DataFrame, eviction_rows: pl.DataFrame, trace: Trace) -> pl.DataFrame:
    """Sweep rows with the measured accuracy of their (policy, block budget) added (null where not measured,
    and for cells that sweep a policy's parameters: measurements use its defaults)."""
    if "block_budget" not in rows.columns or rows["block_budget"].drop_nulls().len() == 0:
        raise LlamatierError(
            "--quality joins eviction measurements to sparse cells: sweep with --mode sparse --block-budget N,..."
        )
    measured = (
        same_trace(eviction_rows, trace)
        .select(
            pl.col("policy"),
            pl.col("keep_blocks").cast(pl.Int64).alias("block_budget"),
            *[pl.col(src).cast(MEASURED_COLUMNS[dst]).alias(dst) for dst, src in _FROM.items()],
        )
        .unique(subset=["policy", "block_budget"], keep="last", maintain_order=True)
    )
    out = rows.drop([c for c in MEASURED_COLUMNS if c in rows.columns])
    out = out.with_columns(pl.col("block_budget").cast(pl.Int64))
    out = out.join(measured, on=["policy", "block_budget"], how="left", maintain_order="left")
    if "policy_params" in out.columns:  # measurements ran the policies' default parameters
        swept = pl.col("policy_params").is_not_null()
        out = out.with_columns([pl.when(swept).then(None).otherwise(pl.col(c)).alias(c) for c in MEASURED_COLUMNS])
    return out


def frontier_table(rows: pl.DataFrame) -> pl.DataFrame:
    """One row per measured (profile, KV type, HBM budget, policy, block budget), fastest first in each facet."""
    if "measured_mean_kl" not in rows.columns:
        raise LlamatierError("no measured accuracy in these sweep rows: give --quality DIR to `llamatier sweep`")
    ok = rows.filter(pl.col("error").is_null() & pl.col("runs") & pl.col("measured_mean_kl").is_not_null())
    return ok.select(
        "profile", "kv_type", "hbm_budget", "policy", "block_budget", "p99_s", "dropped_mass_mean",
        *MEASURED_COLUMNS,
        "hbm_budget_bytes",
    ).sort(["profile", "kv_type", "hbm_budget_bytes", "p99_s", "measured_mean_kl"], maintain_order=True)
