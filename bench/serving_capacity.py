"""How many concurrent chat users each serving policy serves within a p99 TPOT target.

Workload: examples/workloads/chat-llama3-8b-a100.toml (Llama 3 8B KV geometry as a
what-if over the committed Gemma 3 270M trace's lengths, f16 KV, a100-40g, 1-4 turns
per session, 10 s mean think time, 512-token shared system prompt). For each policy
the user count is searched (doubling, then bisection) for the largest count whose
run completes every request with p99 TPOT <= --slo-tpot-ms; a second search also
requires p99 TTFT <= --slo-ttft-ms. Variants: host DRAM for KV cut to --small-dram
(lower tiers matter), and llama-server with a fixed number of slots.

    .venv/bin/python bench/serving_capacity.py [--slo-tpot-ms 100] [--slo-ttft-ms 5000] [--json out.json]

Numbers are model outputs (the replay's cost model on a datasheet profile), not
measurements of a GPU; docs/serving.md explains what they rest on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llamatier.serving import (  # noqa: E402
    DEFAULT_SERVING_POLICIES,
    build_context,
    find_max_users,
    load_workload,
)
from llamatier.units import parse_size_bytes  # noqa: E402

WORKLOAD = REPO / "examples" / "workloads" / "chat-llama3-8b-a100.toml"


def search(spec, policy: str, tpot: float, ttft: float | None, max_users: int) -> dict:  # noqa: ANN001
    t0 = time.perf_counter()
    r = find_max_users(spec, policy, slo_tpot_s=tpot, slo_ttft_s=ttft, max_search=max_users, context=build_context(spec))
    at = r.best.summary() if r.best is not None else {}
    lat = at.get("latency", {})
    return {
        "policy": policy,
        "max_users": r.max_users,
        "capped": r.capped,
        "tpot_p99_ms": (lat.get("tpot_p99_s") or float("nan")) * 1e3,
        "ttft_p50_s": lat.get("ttft_p50_s", float("nan")),
        "ttft_p99_s": lat.get("ttft_p99_s", float("nan")),
        "out_tok_s": at.get("throughput", {}).get("output_tokens_per_s", float("nan")),
        "recomputed_tokens": at.get("kv_reuse", {}).get("recomputed_tokens"),
        "reused_by_tier": at.get("kv_reuse", {}).get("reused_tokens_by_tier"),
        "trials": [(t["users"], t["meets"]) for t in r.trials],
        "search_s": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", type=Path, default=WORKLOAD)
    ap.add_argument("--slo-tpot-ms", type=float, default=100.0)
    ap.add_argument("--slo-ttft-ms", type=float, default=5000.0)
    ap.add_argument("--small-dram", default="16GiB", help="host DRAM for KV in the constrained variant")
    ap.add_argument("--slots", type=int, default=32, help="llama-server slots in the fixed-slots variant")
    ap.add_argument("--max-users", type=int, default=512)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--policy", action="append", default=None, help="only these policies (repeat)")
    args = ap.parse_args()
    base = load_workload(args.workload)
    small = dataclasses.replace(
        base, server=dataclasses.replace(base.server, budgets_bytes=(None, parse_size_bytes(args.small_dram), None, None))
    )
    fixed = dataclasses.replace(base, server=dataclasses.replace(base.server, n_parallel=args.slots))
    variants = [
        ("default (128 GiB DRAM)", base, list(DEFAULT_SERVING_POLICIES)),
        (f"DRAM for KV {args.small_dram}", small, [p for p in DEFAULT_SERVING_POLICIES if p != "llamacpp-server"]),
        (f"llama-server -np {args.slots}", fixed, ["llamacpp-server"]),
    ]
    if args.policy:
        variants = [(label, spec, [p for p in pols if p in args.policy]) for label, spec, pols in variants]
    tpot, ttft = args.slo_tpot_ms / 1e3, args.slo_ttft_ms / 1e3
    rows = []
    for label, spec, policies in variants:
        for p in policies:
            a = search(spec, p, tpot, None, args.max_users)
            b = search(spec, p, tpot, ttft, args.max_users)
            rows.append({"variant": label, "tpot_only": a, "tpot_and_ttft": b})
            print(f"  {label:24s} {p:16s} done in {a['search_s'] + b['search_s']:.0f} s", file=sys.stderr)

    print(f"\nworkload {base.name}: {base.profile}, {base.geometry}, KV {base.kv_type}; SLO p99 TPOT <= {args.slo_tpot_ms:g} ms")
    hdr = (f"| variant | policy | users (TPOT) | TPOT p99 ms | TTFT p50 s | TTFT p99 s | out tok/s "
           f"| users (TPOT + TTFT p99 <= {args.slo_ttft_ms / 1e3:g} s) |")
    print(hdr)
    print("|" + "---|" * 8)
    for row in rows:
        a, b = row["tpot_only"], row["tpot_and_ttft"]
        cap = lambda r: (">= " if r["capped"] else "") + str(r["max_users"])  # noqa: E731
        print(f"| {row['variant']} | {a['policy']} | {cap(a)} | {a['tpot_p99_ms']:.1f} | {a['ttft_p50_s']:.2f} | "
              f"{a['ttft_p99_s']:.2f} | {a['out_tok_s']:,.0f} | {cap(b)} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
