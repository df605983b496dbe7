"""HBM budget sweep on the committed Gemma 3 270M trace with a 7B-class KV geometry (what-if).

From "all fits" (static's n_ctx reservation fits the budget) down to 10% of it:
static's cliff (llama.cpp falls to -nkvo, or to a -ngl layer split), LRU,
adaptive, and the oracle bound, as p99 (and p50) per-token decode latency.
Prints a Markdown table (for docs/replay.md) and, with --json, every summary.

    .venv/bin/python bench/sweep_budget.py [--geometry llama2-7b] [--profile a100-40g]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from llamatier.hardware import load_profile
from llamatier.replay import ReplayOptions, compare, prepare
from llamatier.target import resolve_geometry
from llamatier.trace import load_trace
from llamatier.units import format_bytes

REPO = Path(__file__).resolve().parents[1]
FRACTIONS = (1.0, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
COLUMNS = (("static", "nkvo"), ("static", "layers"), ("lru", None), ("adaptive", None), ("oracle", None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(REPO / "traces" / "gemma3-270m-1k"))
    ap.add_argument("--geometry", default="llama2-7b")
    ap.add_argument("--profile", default="a100-40g")
    ap.add_argument("--kv-type", default=None)
    ap.add_argument("--json", dest="json_out", default=None, help="write every summary to this file")
    args = ap.parse_args()

    trace = load_trace(args.trace)
    prof = load_profile(args.profile)
    base = ReplayOptions(target=resolve_geometry(args.geometry), kv_type=args.kv_type)
    ctx = prepare(trace, prof, base)
    reserve = float(ctx.reserved_bytes_per_layer().sum())
    used = float(ctx.block_bytes.sum() * ctx.hi_block.max())
    print(f"trace {args.trace}: {trace.model.name}, {trace.n_steps} steps ({int(ctx.is_decode.sum())} decode), "
          f"final context {int(ctx.ctx_tokens[-1])} tokens, n_ctx {ctx.n_ctx}")
    print(f"what-if geometry {ctx.target.label} ({args.geometry}), KV {ctx.type_k.name}/{ctx.type_v.name}, "
          f"profile {prof.name}; llama.cpp reserves {format_bytes(reserve)} for n_ctx, the run uses "
          f"{format_bytes(used)} (in {ctx.block_tokens}-token blocks)")
    rows, dump = [], []
    t0 = time.perf_counter()
    for frac in FRACTIONS:
        budget = int(frac * reserve)
        cells = {}
        for policy, mode in COLUMNS:
            opts = replace(base, hbm_budget_bytes=budget, static_mode=mode or "nkvo")
            res = compare(trace, prof, [policy], opts).results[0]
            s = res.summary()
            s["hbm_budget_fraction"] = frac
            dump.append(s)
            cells[(policy, mode)] = s
        rows.append((frac, budget, cells))
    elapsed = time.perf_counter() - t0

    def cell(s: dict) -> str:
        if not s["runs"]:
            return "does not run"
        lat = s["latency"]
        return f"{lat['p99_s'] * 1e3:.2f} ({lat['p50_s'] * 1e3:.2f})"

    heads = ["HBM budget (of n_ctx KV)"] + [f"{p}{' ' + m if m else ''}" for p, m in COLUMNS]
    print()
    print("p99 (p50) per-token decode latency, ms")
    print("| " + " | ".join(heads) + " |")
    print("|" + "---|" * len(heads))
    for frac, budget, cells in rows:
        print(f"| {format_bytes(budget)} ({frac:.0%}) | " + " | ".join(cell(cells[c]) for c in COLUMNS) + " |")
    print()
    print("static verdicts:")
    for frac, _budget, cells in rows:
        print(f"  {frac:>4.0%} nkvo: {cells[('static', 'nkvo')]['verdict']}")
        print(f"  {frac:>4.0%} layers: {cells[('static', 'layers')]['verdict']}")
    print(f"\n{len(rows) * len(COLUMNS)} replays in {elapsed:.1f} s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(dump, indent=1, default=float))
        print(f"summaries written to {args.json_out}", file=sys.stderr)


if __name__ == "__main__":
    main()
