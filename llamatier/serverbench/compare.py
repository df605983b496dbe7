"""Measured (a real llama-server) against predicted (``serve-replay``) per request and per percentile.

Per request: TTFT (client wall clock from sending to the first token, queueing
included, as ``serve-replay`` defines it), TPOT ((last - first token) / (tokens - 1)),
prompt tokens evaluated and tokens reused from the slot's cache (the server's
``prompt_n`` and ``cache_n``). Errors are relative: ``predicted / measured - 1``.

The goal checked (:data:`GOAL`): across requests, the median absolute error of
TTFT and TPOT within 10% and its 95th percentile within 20%; each run's p99 TTFT
and p99 TPOT within 15% of the measured p99.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from llamatier.serverbench.sessions import PlayedRequest
from llamatier.serving.result import ServeResult

GOAL = {"median_abs_err": 0.10, "p95_abs_err": 0.20, "p99_err": 0.15}
METRICS = ("ttft_s", "tpot_s")


def request_table(played: Sequence[PlayedRequest], predicted: ServeResult) -> pl.DataFrame:
    """One row per planned request: measured and predicted times and token counts."""
    pf = predicted.requests_frame()
    rows: list[dict[str, Any]] = []
    for p in played:
        c = p.completion
        ok = c is not None and c.ok and len(c.tokens) == p.n_predict
        pr = pf.row(p.rid, named=True)
        reused = int(pr.get("reused_tokens", 0) or 0)
        rows.append({
            "rid": p.rid,
            "user": p.user,
            "session": p.session,
            "turn": p.turn,
            "prompt_tokens": p.prompt_tokens,
            "output_tokens": p.n_predict,
            "ok": ok,
            "arrival_s": p.arrival_s,
            "pred_arrival_s": float(pr.get("arrival_s", np.nan)),
            "ttft_s": c.ttft_s if ok else np.nan,
            "server_ttft_s": c.server_ttft_s() if ok else np.nan,
            "pred_ttft_s": float(pr.get("ttft_s", np.nan)),
            "tpot_s": c.tpot_s if ok else np.nan,
            "server_tpot_s": c.server_tpot_s() if ok else np.nan,
            "pred_tpot_s": float(pr.get("tpot_s", np.nan)),
            "cache_n": int(c.timings.get("cache_n", -1)) if ok else -1,
            "pred_cache_n": reused,
            "prompt_n": int(c.timings.get("prompt_n", -1)) if ok else -1,
            "pred_prompt_n": p.prompt_tokens - reused,
            "id_slot": c.id_slot if ok else -1,
            "pred_slot": int(pr.get("slot", -1)),
            "error": (c.error if c is not None else p.skipped) if not ok else None,
        })
    return pl.DataFrame(rows, infer_schema_length=None)


def _q(x: np.ndarray, q: float) -> float:
    x = x[np.isfinite(x)]
    return float(np.quantile(x, q)) if x.size else float("nan")


def summarize(table: pl.DataFrame) -> dict[str, Any]:
    """Per metric: measured and predicted p50/p95/p99, per-request error quantiles, and the goal's verdict."""
    ok = table.filter(pl.col("ok"))
    out: dict[str, Any] = {"requests": table.height, "measured": ok.height}
    verdicts = []
    for m in METRICS:
        meas = ok[m].to_numpy().astype(float)
        pred = ok[f"pred_{m}"].to_numpy().astype(float)
        err = pred / meas - 1.0
        d: dict[str, float] = {}
        for q in (0.5, 0.95, 0.99):
            d[f"measured_p{int(q * 100)}"] = _q(meas, q)
            d[f"predicted_p{int(q * 100)}"] = _q(pred, q)
        d["p99_err"] = d["predicted_p99"] / d["measured_p99"] - 1.0 if d["measured_p99"] else float("nan")
        d["median_err"] = _q(err, 0.5)
        d["median_abs_err"] = _q(np.abs(err), 0.5)
        d["p95_abs_err"] = _q(np.abs(err), 0.95)
        meets = (
            d["median_abs_err"] <= GOAL["median_abs_err"]
            and d["p95_abs_err"] <= GOAL["p95_abs_err"]
            and abs(d["p99_err"]) <= GOAL["p99_err"]
        )
        d["meets_goal"] = bool(meets)
        verdicts.append(meets)
        out[m] = d
    same = ok.filter((pl.col("cache_n") == pl.col("pred_cache_n")) & (pl.col("prompt_n") == pl.col("pred_prompt_n")))
    out["cache_match"] = {"requests": ok.height, "identical": same.height,
                          "same_slot": ok.filter(pl.col("id_slot") == pl.col("pred_slot")).height}
    out["meets_goal"] = bool(all(verdicts)) and ok.height == table.height and ok.height > 0
    return out


def pooled(tables: Sequence[pl.DataFrame]) -> dict[str, Any]:
    """The per-request error quantiles over several runs' requests together (p99s stay per run)."""
    return summarize(pl.concat([t for t in tables if t.height], how="vertical_relaxed")) if tables else {}
