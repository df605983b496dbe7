"""Replay at scale: peak memory and speed of each policy on long-context, many-layer shapes.

Each (shape, policy) runs in a fresh child process, so its peak RSS (ru_maxrss)
is that of one whole replay: building or opening the trace, the replay, the cost
model. The trace is synthetic (llamatier.replay.synthetic: the engine's speed
and memory depend on the shape, not on what the mass says): ``--layers`` layers
of a 70B-class KV geometry (8 KV heads x 128), a prompt of ``--prompt`` tokens
prefilled in 512-token batches, then ``--decode`` decode steps, blocks of 16
tokens, the HBM budget at half of the final KV. Rates are block accesses per
CPU second of the replay in the child (one core). Each row also prints a
digest of the replay's counts and costs, to check that two engines agree.

    .venv/bin/python bench/bench_scale.py --layers 80 --prompt 131072 --decode 256 \
        [--policies static,lru,adaptive,oracle] [--json out.json]
    .venv/bin/python bench/bench_scale.py --table 8192,32768,131072,262144,1048576 --layers 80
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _digest(r) -> str:  # noqa: ANN001 - ReplayResult
    """sha256 over every per-step count and cost of a replay (first 16 hex digits)."""
    h = hashlib.sha256()
    rec = r.record
    tr = rec.traffic
    arrays = [tr.read_bytes, tr.read_blocks, tr.read_tokens, tr.write_bytes, tr.write_blocks, tr.move_bytes,
              tr.move_count, rec.occupancy_bytes, rec.stored_bytes, rec.alloc_bytes, rec.freed_bytes,
              rec.dropped_mass, rec.visible_blocks]
    if r.costs is not None:
        arrays.append(r.costs.step_s)
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a, dtype=np.float64)).tobytes())
    return h.hexdigest()[:16]


def shape_trace(layers: int, prompt: int, decode: int, seed: int = 1, *, lazy: bool = True):  # noqa: ANN201
    """The synthetic trace of a shape: lazy (each step's mass made when read) or one dense array."""
    from llamatier.replay.synthetic import synthetic_trace

    return synthetic_trace(
        n_layers=layers, n_prompt=prompt, n_decode=decode, block_tokens=16, n_head=32, n_head_kv=8,
        head_dim=128, prefill_chunk=512, weight_bytes=4_920_000_000, n_params=8_030_261_248, seed=seed, lazy=lazy,
    )


def child(args: argparse.Namespace) -> None:
    from llamatier.hardware import load_profile
    from llamatier.replay import ReplayOptions, prepare, replay

    w0 = time.perf_counter()
    trace = shape_trace(args.layers, args.prompt, args.decode, lazy=not args.dense)
    build_s = time.perf_counter() - w0
    prof = load_profile("a100-40g")
    ctx = prepare(trace, prof, ReplayOptions())
    block = int(ctx.block_bytes[0])
    kv_final = float(ctx.block_bytes.sum() * ctx.n_blocks)
    cap = int(0.5 * kv_final) // block * block
    del ctx
    opts = ReplayOptions(hbm_budget_bytes=cap, mode="sparse" if args.sparse_budget else "lossless",
                         block_budget=args.sparse_budget)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    c0, w0 = time.process_time(), time.perf_counter()
    r = replay(trace, prof, args.policy, opts)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    out = {
        "policy": args.policy, "layers": args.layers, "prompt": args.prompt, "decode": args.decode,
        "steps": trace.n_steps, "blocks": trace.n_blocks, "accesses": r.block_accesses,
        "cpu_s": cpu, "wall_s": wall, "rate_per_cpu_s": r.block_accesses / cpu if cpu > 0 else float("nan"),
        "build_s": build_s, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before_replay_bytes": rss_before, "decision_s": r.record.decision_s,
        "p99_s": r.summary().get("latency", {}).get("p99_s"), "digest": _digest(r), "trace": "dense" if args.dense else "lazy",
        "mode": opts.mode, "runs": bool(r.runs), "verdict": r.verdict,
    }
    print(json.dumps(out))


def run_one(layers: int, prompt: int, decode: int, policy: str, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", "--layers", str(layers), "--prompt", str(prompt),
           "--decode", str(decode), "--policy", policy, *extra]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"policy": policy, "layers": layers, "prompt": prompt, "decode": decode, "error": tail}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--prompt", type=int, default=131072)
    ap.add_argument("--decode", type=int, default=256)
    ap.add_argument("--policies", default="static,lru,adaptive,oracle")
    ap.add_argument("--policy", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dense", action="store_true", help="hold the synthetic mass as one dense array (as before streaming)")
    ap.add_argument("--sparse-budget", type=int, default=None, help="sparse mode with this block budget")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--table", default=None, help="comma-separated prompt lengths: one row per length and policy")
    ap.add_argument("--json", dest="json_out", type=Path, default=None)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    prompts = [int(x) for x in args.table.split(",")] if args.table else [args.prompt]
    rows = []
    print(f"{'prompt':>8} {'steps':>6} {'policy':<9} {'accesses':>14} {'cpu s':>8} {'M acc/s':>8} "
          f"{'peak RSS':>10} {'build s':>8} digest", flush=True)
    for n in prompts:
        for pol in args.policies.split(","):
            extra = (["--dense"] if args.dense else []) + (
                ["--sparse-budget", str(args.sparse_budget)] if args.sparse_budget else [])
            r = run_one(args.layers, n, args.decode, pol, extra)
            rows.append(r)
            if "error" in r:
                print(f"{n:>8} {'':>6} {pol:<9} error: {r['error']}", flush=True)
                continue
            print(f"{n:>8} {r['steps']:>6} {pol:<9} {r['accesses']:>14,} {r['cpu_s']:>8.2f} "
                  f"{r['rate_per_cpu_s'] / 1e6:>8.1f} {r['peak_rss_bytes'] / 2**30:>8.2f} G {r['build_s']:>8.1f} "
                  f"{r['digest']}", flush=True)
            if not r["runs"]:
                print(f"{'':>16} {r['verdict']}", flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps({"bench": "scale", "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
