"""Serving results: per-request and per-token latencies, throughput, tiers and links, as plain data.

Definitions (as vLLM's benchmarks use them):

- TTFT: first output token's time minus the request's arrival (queueing, KV
  loads and prefill included);
- TPOT: (last token's time - first token's time) / (output tokens - 1), per
  request; p50/p99 are over requests;
- ITL: time between consecutive output tokens of a request, over all tokens;
- throughput: output tokens / (last step's end - first arrival).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from llamatier.serving.engine import ServeRecord
from llamatier.serving.plan import Plan
from llamatier.tiers import LINK_NAMES, TIER_NAMES


def _pct(x: np.ndarray, q: float) -> float:
    x = x[np.isfinite(x)]
    return float(np.percentile(x, q)) if x.size else float("nan")


@dataclass(frozen=True, eq=False)
class ServeResult:
    """One policy serving one workload on one profile."""

    policy: str
    policy_params: dict[str, Any]
    runs: bool
    verdict: str
    workload: str
    profile: str
    model: str
    what_if: bool
    kv_type: str
    users: int | None
    arrival_rate_per_s: float | None
    capacity_bytes: np.ndarray  # [4] KV budget per tier
    slo_tpot_s: float | None
    slo_ttft_s: float | None
    plan: Plan
    record: ServeRecord | None  # None when the policy cannot run
    notes: tuple[str, ...] = field(default=())

    # -- per request --------------------------------------------------------------------
    def requests_frame(self) -> pl.DataFrame:
        """One row per request (seconds, tokens); NaN times for a policy that does not run."""
        p = self.plan
        R = p.n_requests
        cols: dict[str, Any] = {
            "request": np.arange(R),
            "session": p.req_session,
            "turn": p.req_turn,
            "trace": p.req_trace,
            "prompt_tokens": p.req_prompt_tokens,
            "output_tokens": p.req_decode_steps + 1,
        }
        rec = self.record
        if rec is None:
            return pl.DataFrame(cols)
        ends = rec.step_end_s()
        reqs = rec.requests
        arr = np.array([r.arrival_s for r in reqs])
        first = np.array([ends[r.first_token_step] if r.first_token_step >= 0 else np.nan for r in reqs])
        fin = np.array([ends[r.finish_step] if r.finish_step >= 0 else np.nan for r in reqs])
        dec = p.req_decode_steps.astype(np.float64)
        by_tier = np.array([r.reused_by_tier for r in reqs]).reshape(R, 4)
        cols.update(
            arrival_s=arr,
            first_token_s=first,
            finish_s=fin,
            ttft_s=first - arr,
            tpot_s=np.where(dec > 0, (fin - first) / np.maximum(dec, 1), np.nan),
            reused_tokens=np.array([r.reused_tokens for r in reqs]),
            **{f"reused_{t}_tokens": by_tier[:, i] for i, t in enumerate(TIER_NAMES)},
            recomputed_tokens=np.array([r.recomputed_tokens for r in reqs]),
            known_tokens=np.array([r.known_total for r in reqs]),
            admissions=np.array([r.admissions for r in reqs]),
            slot=np.array([r.slot for r in reqs]),
            preemptions=np.array([r.preemptions for r in reqs]),
            completed=np.array([r.finish_step >= 0 for r in reqs]),
        )
        return pl.DataFrame(cols)

    def token_latencies_s(self, request: int) -> np.ndarray:
        """Inter-token latencies of one request's output tokens after the first (seconds)."""
        rec = self.record
        if rec is None:
            return np.zeros(0)
        ends = rec.step_end_s()
        r = rec.requests[request]
        times = ends[np.sort(rec.token_step[rec.token_rid == request])]
        return np.diff(np.concatenate([[ends[r.first_token_step]], times])) if times.size else np.zeros(0)

    def itl_s(self) -> np.ndarray:
        """Inter-token latencies of every output token after each request's first."""
        rec = self.record
        if rec is None or rec.token_rid.size == 0:
            return np.zeros(0)
        ends = rec.step_end_s()
        order = np.lexsort((rec.token_step, rec.token_rid))
        rid, st = rec.token_rid[order], rec.token_step[order]
        first = np.array([r.first_token_step for r in rec.requests])
        prev_step = np.where(np.r_[True, rid[1:] != rid[:-1]], first[rid], np.r_[st[:1], st[:-1]])
        return ends[st] - ends[prev_step]

    # -- summary ------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Every reported figure as a JSON-ready dict (seconds, bytes, tokens)."""
        return summarize(self)

    def meets_slo(self, slo_tpot_s: float | None = None, slo_ttft_s: float | None = None) -> bool:
        """True when the run completes every request within the p99 TPOT (and TTFT) targets."""
        tpot = slo_tpot_s if slo_tpot_s is not None else self.slo_tpot_s
        ttft = slo_ttft_s if slo_ttft_s is not None else self.slo_ttft_s
        if not self.runs or self.record is None:
            return False
        df = self.requests_frame()
        if not bool(df["completed"].all()):
            return False
        ok = True
        if tpot is not None:
            ok &= _pct(df["tpot_s"].to_numpy(), 99) <= tpot if df["tpot_s"].is_not_nan().any() else True
        if ttft is not None:
            ok &= _pct(df["ttft_s"].to_numpy(), 99) <= ttft
        return bool(ok)


def summarize(r: ServeResult) -> dict[str, Any]:
    p = r.plan
    head: dict[str, Any] = {
        "policy": r.policy,
        "policy_params": dict(r.policy_params),
        "runs": r.runs,
        "verdict": r.verdict,
        "workload": r.workload,
        "profile": r.profile,
        "model": r.model,
        "what_if": r.what_if,
        "kv_type": r.kv_type,
        "users": r.users,
        "arrival_rate_per_s": r.arrival_rate_per_s,
        "sessions": p.n_sessions,
        "requests": p.n_requests,
        "dropped_turns": p.dropped_turns,
        "budget_bytes": dict(zip(TIER_NAMES, r.capacity_bytes.tolist(), strict=True)),
        "notes": list(r.notes),
    }
    rec = r.record
    if rec is None:
        return head
    df = r.requests_frame()
    ttft = df["ttft_s"].to_numpy()
    tpot = df["tpot_s"].to_numpy()
    itl = r.itl_s()
    out_tokens = int(rec.step_decode.sum() + (df["first_token_s"].is_not_nan()).sum())
    t0 = float(np.nanmin(df["arrival_s"].to_numpy())) if p.n_requests else 0.0
    t1 = float(rec.step_end_s().max()) if rec.step_s.size else t0
    span = max(t1 - t0, 0.0)
    head["completed"] = int(df["completed"].sum())
    head["latency"] = {
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p99_s": _pct(ttft, 99),
        "ttft_mean_s": float(np.nanmean(ttft)) if np.isfinite(ttft).any() else float("nan"),
        "tpot_p50_s": _pct(tpot, 50),
        "tpot_p99_s": _pct(tpot, 99),
        "tpot_mean_s": float(np.nanmean(tpot)) if np.isfinite(tpot).any() else float("nan"),
        "itl_p50_s": _pct(itl, 50),
        "itl_p99_s": _pct(itl, 99),
    }
    head["throughput"] = {
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / span if span > 0 else float("nan"),
        "requests_per_s": head["completed"] / span if span > 0 else float("nan"),
        "makespan_s": span,
        "steps": int(rec.step_s.size),
        "mean_batch_seqs": float(rec.step_seqs.mean()) if rec.step_seqs.size else 0.0,
        "max_batch_seqs": int(rec.step_seqs.max()) if rec.step_seqs.size else 0,
    }
    busy = float(rec.step_s.sum()) or 1.0
    head["step_time_split"] = {k.removesuffix("_s"): float(v.sum()) / busy for k, v in rec.time_split_s.items()}
    occ = rec.occupancy_bytes.max(axis=0) if rec.occupancy_bytes.size else np.zeros(4)
    head["peak_occupancy_bytes"] = dict(zip(TIER_NAMES, occ.tolist(), strict=True))
    lb = rec.link_bytes.sum(axis=0) if rec.link_bytes.size else np.zeros((3, 2))
    head["bytes_per_link"] = {
        name: {"up": float(lb[i, 0]), "down": float(lb[i, 1]), "total": float(lb[i].sum())}
        for i, name in enumerate(LINK_NAMES)
    }
    reused = {t: int(df[f"reused_{t}_tokens"].sum()) for t in TIER_NAMES}
    head["kv_reuse"] = {
        "prompt_tokens": int(p.req_prompt_tokens.sum()),
        "reused_tokens": int(df["reused_tokens"].sum()),
        "reused_tokens_by_tier": reused,
        "recomputed_tokens": int(df["recomputed_tokens"].sum()),
        "preemptions": int(df["preemptions"].sum()),
    }
    head["energy_j"] = {
        "total": float(rec.energy_j.sum()),
        "per_output_token": float(rec.energy_j.sum()) / out_tokens if out_tokens else float("nan"),
    }
    head["slo"] = {
        "tpot_s": r.slo_tpot_s,
        "ttft_s": r.slo_ttft_s,
        "meets": r.meets_slo() if (r.slo_tpot_s is not None or r.slo_ttft_s is not None) else None,
    }
    head["simulation"] = {
        "wall_s": rec.wall_s,
        "steps_per_s": rec.step_s.size / rec.wall_s if rec.wall_s > 0 else float("nan"),
        "late_admissions": rec.late_admissions,
        "late_admission_s": rec.late_admission_s,
        "policy_verdict": rec.policy_verdict,
    }
    return head
