"""Frozen replay results and their summaries (plain dicts, SI units) for reports and JSON."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llamatier.cost import StepCosts
from llamatier.replay.engine import EngineRecord
from llamatier.tiers import LINK_NAMES, TIER_NAMES


@dataclass(frozen=True, eq=False)
class ReplayResult:
    """One policy replayed over one trace on one profile."""

    policy: str
    policy_params: dict[str, Any]
    is_bound: bool  # the oracle: a bound, not a policy
    profile: str
    trace: str
    model: str  # the costed model (target)
    what_if: bool
    type_k: str
    type_v: str
    mode: str
    block_budget: int | None
    block_tokens: int
    capacity_bytes: np.ndarray  # [4] KV budget per tier
    runs: bool
    verdict: str
    is_decode: np.ndarray  # [S]
    costs: StepCosts | None  # None when the placement does not run
    record: EngineRecord
    replay_wall_s: float  # wall time of the replay itself (engine + cost model)
    notes: tuple[str, ...] = field(default=())

    @property
    def n_steps(self) -> int:
        return int(self.is_decode.shape[0])

    @property
    def block_accesses(self) -> int:
        """(layer, block) reads the replay accounted."""
        return int(self.record.traffic.read_blocks.sum())

    @property
    def decode_step_s(self) -> np.ndarray:
        if self.costs is None:
            return np.zeros(0)
        return self.costs.step_s[self.is_decode]

    def summary(self) -> dict[str, Any]:
        """Every reported figure as a JSON-ready dict (seconds, bytes, joules)."""
        return summarize(self)

    def digest(self) -> str:
        """sha256 (hex) over the verdict and every per-step count and cost: equal digests, equal replays."""
        h = hashlib.sha256(f"{self.runs}|{self.verdict}".encode())
        rec, tr = self.record, self.record.traffic
        arrays = [tr.read_bytes, tr.read_blocks, tr.read_tokens, tr.write_bytes, tr.write_blocks, tr.move_bytes,
                  tr.move_count, rec.occupancy_bytes, rec.stored_bytes, rec.alloc_bytes, rec.freed_bytes,
                  rec.dropped_mass, rec.visible_blocks]
        if self.costs is not None:
            c = self.costs
            arrays += [c.step_s, c.compute_s, c.host_layers_s, c.hbm_s, c.host_attention_s, c.link_s, c.link_busy_s,
                       c.link_bytes, c.fetched_layers, c.energy_weights_j, c.energy_kv_j, c.energy_transfer_j,
                       c.energy_compute_j]
        for a in arrays:
            h.update(np.ascontiguousarray(np.asarray(a, dtype=np.float64)).tobytes())
        return h.hexdigest()


def _pct(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q)) if x.size else float("nan")


def summarize(r: ReplayResult) -> dict[str, Any]:
    head: dict[str, Any] = {
        "policy": r.policy,
        "policy_params": dict(r.policy_params),
        "bound": r.is_bound,
        "profile": r.profile,
        "trace": r.trace,
        "model": r.model,
        "what_if": r.what_if,
        "kv_type": f"{r.type_k}/{r.type_v}",
        "mode": r.mode,
        "block_budget": r.block_budget,
        "block_tokens": r.block_tokens,
        "budget_bytes": dict(zip(TIER_NAMES, r.capacity_bytes.tolist(), strict=False)),
        "runs": r.runs,
        "verdict": r.verdict,
        "notes": list(r.notes),
    }
    rec = r.record
    tr = rec.traffic
    dec = r.is_decode
    head["replay"] = {
        "wall_s": r.replay_wall_s,
        "block_accesses": r.block_accesses,
        "block_accesses_per_s": r.block_accesses / r.replay_wall_s if r.replay_wall_s > 0 else float("nan"),
        "engine": rec.engine,
    }
    n_steps = max(r.n_steps, 1)
    head["policy_decision"] = {"total_s": rec.decision_s, "per_step_s": rec.decision_s / n_steps}
    if not r.runs or r.costs is None:
        return head
    c = r.costs
    d = c.step_s[dec]
    n_dec = int(dec.sum())
    head["latency"] = {
        "decode_steps": n_dec,
        "p50_s": _pct(d, 50),
        "p90_s": _pct(d, 90),
        "p99_s": _pct(d, 99),
        "max_s": float(d.max()) if d.size else float("nan"),
        "mean_s": float(d.mean()) if d.size else float("nan"),
        "ttft_s": float(c.step_s[~dec].sum()),
        "tok_per_s": n_dec / float(d.sum()) if d.size and d.sum() > 0 else float("nan"),
        "total_s": float(c.step_s.sum()),
    }
    head["decode_time_split_s"] = {
        "compute": float(c.compute_s[dec].sum()),
        "host_layers": float(c.host_layers_s[dec].sum()),
        "hbm": float(c.hbm_s[dec].sum()),
        "host_attention": float(c.host_attention_s[dec].sum()),
        "link": float(c.link_s[dec].sum()),
    }
    head["bytes_read"] = dict(zip(TIER_NAMES, tr.read_bytes.sum(axis=(0, 1)).tolist(), strict=False))
    head["bytes_written"] = dict(zip(TIER_NAMES, tr.write_bytes.sum(axis=(0, 1)).tolist(), strict=False))
    lb = c.link_bytes.sum(axis=0)  # [3, 2]
    head["bytes_per_link"] = {
        name: {"up": float(lb[i, 0]), "down": float(lb[i, 1]), "total": float(lb[i].sum())}
        for i, name in enumerate(LINK_NAMES)
    }
    mb = tr.move_bytes.sum(axis=1)  # [S, 4, 4]
    mc = tr.move_count.sum(axis=1)
    head["migrations"] = {
        "blocks": float(mc.sum()),
        "bytes": float(mb.sum()),
        "prefetched_blocks": float(tr.move_count[:, 1].sum()),
        "by_pair_blocks": {
            f"{TIER_NAMES[a]}->{TIER_NAMES[b]}": float(mc[:, a, b].sum())
            for a in range(4)
            for b in range(4)
            if a != b and mc[:, a, b].sum() > 0
        },
    }
    head["peak_occupancy_bytes"] = dict(zip(TIER_NAMES, rec.occupancy_bytes.max(axis=0).tolist(), strict=False))
    dm = rec.dropped_mass[dec] if n_dec else np.zeros((0, tr.read_bytes.shape[1]))
    per_step = dm.mean(axis=1) if dm.size else np.zeros(0)
    head["attention_mass_dropped"] = {
        "mean": float(per_step.mean()) if per_step.size else 0.0,
        "p99_step": _pct(per_step, 99) if per_step.size else 0.0,
        "max_layer_step": float(dm.max()) if dm.size else 0.0,
    }
    e_kv = c.energy_kv_j.sum(axis=0)
    total_j = float(c.energy_j.sum())
    head["energy_j"] = {
        "weights": float(c.energy_weights_j.sum()),
        "kv": dict(zip(TIER_NAMES, e_kv.tolist(), strict=False)),
        "transfers": float(c.energy_transfer_j.sum()),
        "compute": float(c.energy_compute_j.sum()),
        "total": total_j,
        "per_decode_token": float(c.energy_j[dec].sum()) / n_dec if n_dec else float("nan"),
    }
    return head


@dataclass(frozen=True, eq=False)
class Comparison:
    """Several policies replayed on the same trace, profile and options."""

    results: tuple[ReplayResult, ...]
    baseline: str = "static"

    def result(self, policy: str) -> ReplayResult:
        for r in self.results:
            if r.policy == policy:
                return r
        raise KeyError(policy)

    def summary(self) -> dict[str, Any]:
        """Per-policy summaries plus ratios of each against the baseline (static when present)."""
        sums = [r.summary() for r in self.results]
        base = next((s for s in sums if s["policy"] == self.baseline), None)
        for s in sums:
            s["vs_baseline"] = _ratios(s, base) if base is not None else None
        return {"baseline": self.baseline if base is not None else None, "policies": sums}


def _ratios(s: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    """policy / baseline for latency and energy (None where either does not run)."""

    def get(d: dict[str, Any], *path: str) -> float | None:
        for p in path:
            if not isinstance(d, dict) or p not in d:
                return None
            d = d[p]
        return float(d) if d is not None else None

    out: dict[str, float | None] = {}
    for key, path in (
        ("p50", ("latency", "p50_s")),
        ("p99", ("latency", "p99_s")),
        ("ttft", ("latency", "ttft_s")),
        ("tok_per_s", ("latency", "tok_per_s")),
        ("energy_per_token", ("energy_j", "per_decode_token")),
    ):
        a, b = get(s, *path), get(base, *path)
        out[key] = a / b if a is not None and b not in (None, 0.0) else None
    return out
