"""Rich tables for serving results and user-count searches (built from the JSON-ready summaries)."""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table

from llamatier.tiers import LINK_NAMES, TIER_NAMES
from llamatier.units import format_bytes


def _ms(s: Any) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    v = float(s) * 1e3
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _tok(n: Any) -> str:
    return f"{int(n):,}" if n is not None else "-"


def _peak(tier: str) -> Any:
    return lambda s: format_bytes(s["peak_occupancy_bytes"][tier])


def _link(link: str) -> Any:
    return lambda s: f"{format_bytes(s['bytes_per_link'][link]['up'])} / {format_bytes(s['bytes_per_link'][link]['down'])}"


_ROWS: list[tuple[str, Any]] = [
    ("requests done", lambda s: f"{s['completed']}/{s['requests']}"),
    ("TTFT p50 / p99 ms", lambda s: f"{_ms(s['latency']['ttft_p50_s'])} / {_ms(s['latency']['ttft_p99_s'])}"),
    ("TPOT p50 / p99 ms", lambda s: f"{_ms(s['latency']['tpot_p50_s'])} / {_ms(s['latency']['tpot_p99_s'])}"),
    ("ITL p50 / p99 ms", lambda s: f"{_ms(s['latency']['itl_p50_s'])} / {_ms(s['latency']['itl_p99_s'])}"),
    ("output tok/s", lambda s: f"{s['throughput']['output_tokens_per_s']:,.0f}"),
    ("mean / max batch", lambda s: f"{s['throughput']['mean_batch_seqs']:.1f} / {s['throughput']['max_batch_seqs']}"),
    *[(f"peak {n}", _peak(n)) for n in TIER_NAMES],
    *[(f"{n} up / down", _link(n)) for n in LINK_NAMES],
    ("prompt tokens reused", lambda s: _tok(s["kv_reuse"]["reused_tokens"])),
    ("  from hbm / dram / ssd", lambda s: " / ".join(_tok(s["kv_reuse"]["reused_tokens_by_tier"][t]) for t in TIER_NAMES[:3])),
    ("recomputed tokens", lambda s: _tok(s["kv_reuse"]["recomputed_tokens"])),
    ("preemptions", lambda s: str(s["kv_reuse"]["preemptions"])),
    ("meets SLO", lambda s: "-" if s["slo"]["meets"] is None else ("yes" if s["slo"]["meets"] else "no")),
]


def results_table(summaries: list[dict[str, Any]], title: str = "") -> Table:
    """Metrics as rows, one column per policy: latency, throughput, tiers, links, KV reuse."""
    t = Table(title=title or None)
    t.add_column("", no_wrap=True)
    for s in summaries:
        t.add_column(s["policy"], justify="right")
    for label, get in _ROWS:
        t.add_row(label, *(get(s) if s.get("runs", True) and "latency" in s else "does not run" for s in summaries))
    return t


def capacity_table(results: list[dict[str, Any]], title: str = "") -> Table:
    """One row per policy: largest user count within the SLO, and its latencies."""
    t = Table(title=title or None)
    for c in ("policy", "max users", "TPOT p99 ms", "TTFT p50 ms", "TTFT p99 ms", "out tok/s", "trials (users+ meets, - misses)"):
        t.add_column(c, no_wrap=c == "policy")
    for r in results:
        at = r.get("at_max") or {}
        lat = at.get("latency", {})
        thr = at.get("throughput", {})
        n = f">= {r['max_users']}" if r["capped"] else str(r["max_users"])
        t.add_row(
            r["policy"],
            n,
            _ms(lat.get("tpot_p99_s")),
            _ms(lat.get("ttft_p50_s")),
            _ms(lat.get("ttft_p99_s")),
            f"{thr['output_tokens_per_s']:,.0f}" if thr else "-",
            " ".join(f"{x['users']}{'+' if x['meets'] else '-'}" for x in r["trials"]),
        )
    return t
