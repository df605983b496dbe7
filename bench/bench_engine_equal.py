"""Old engine against this one at one shape: equal counts, peak RSS and speed of each.

The old engine is another checkout of llamatier (``--old-src DIR``: a repository
root, e.g. ``git archive 56f1d8c | tar -x -C /tmp/llamatier-old``, the last commit
before the streaming engine). Each (engine, policy) replays the shape of
bench/bench_scale.py in a fresh child process with that checkout first on
sys.path; the old engine gets the synthetic trace as one dense array (as it
was run then), this one a lazy trace. A row prints the sha256 of every per-step
count of the replay (reads, writes, moves, occupancy, allocations, dropped mass:
costs left out, because the GPU profiles' step model changed since) and the
runs flag; equal digests mean the engines placed and counted identically.

    .venv/bin/python bench/bench_engine_equal.py --old-src /tmp/llamatier-old \
        --layers 80 --prompt 131072 --decode 256 [--policies static,lru,adaptive,oracle] [--sparse-budget N] \
        [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def counts_digest(r) -> str:  # noqa: ANN001 - ReplayResult of either engine
    """sha256 over the runs flag and every per-step count of a replay (no costs)."""
    h = hashlib.sha256(str(bool(r.runs)).encode())
    rec, tr = r.record, r.record.traffic
    for a in (tr.read_bytes, tr.read_blocks, tr.read_tokens, tr.write_bytes, tr.write_blocks, tr.move_bytes,
              tr.move_count, rec.occupancy_bytes, rec.stored_bytes, rec.alloc_bytes, rec.freed_bytes,
              rec.dropped_mass, rec.visible_blocks):
        h.update(np.ascontiguousarray(np.asarray(a, dtype=np.float64)).tobytes())
    return h.hexdigest()[:16]


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(args.src).resolve()))
    import llamatier
    from llamatier.hardware import load_profile
    from llamatier.replay import ReplayOptions, prepare, replay
    from llamatier.replay.synthetic import synthetic_trace

    kw = dict(n_layers=args.layers, n_prompt=args.prompt, n_decode=args.decode, block_tokens=16, n_head=32,
              n_head_kv=8, head_dim=128, prefill_chunk=512, weight_bytes=4_920_000_000, n_params=8_030_261_248, seed=1)
    if "lazy" in inspect.signature(synthetic_trace).parameters:
        kw["lazy"] = not args.dense
    trace = synthetic_trace(**kw)
    prof = load_profile("a100-40g")
    ctx = prepare(trace, prof, ReplayOptions())
    block = int(ctx.block_bytes[0])
    cap = int(0.5 * float(ctx.block_bytes.sum() * ctx.n_blocks)) // block * block
    del ctx
    c0 = time.process_time()
    mode = "sparse" if args.sparse_budget else "lossless"
    r = replay(trace, prof, args.policy, ReplayOptions(hbm_budget_bytes=cap, mode=mode, block_budget=args.sparse_budget))
    cpu = time.process_time() - c0
    print(json.dumps({
        "src": str(Path(llamatier.__file__).resolve().parent.parent), "policy": args.policy,
        "accesses": r.block_accesses, "cpu_s": cpu, "rate_per_cpu_s": r.block_accesses / cpu if cpu > 0 else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "runs": bool(r.runs),
        "counts_digest": counts_digest(r), "trace": "lazy" if kw.get("lazy") else "dense",
    }))


def run_one(src: Path, policy: str, args: argparse.Namespace, dense: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", "--src", str(src), "--policy", policy, "--layers", str(args.layers),
           "--prompt", str(args.prompt), "--decode", str(args.decode), *(["--dense"] if dense else []),
           *(["--sparse-budget", str(args.sparse_budget)] if args.sparse_budget else [])]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"policy": policy, "error": (p.stderr.strip().splitlines() or ["(no output)"])[-1]}
    row = json.loads(p.stdout.strip().splitlines()[-1])
    if Path(row["src"]) != src.resolve():
        raise SystemExit(f"the child imported llamatier from {row['src']}, not {src}: check --old-src")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-src", type=Path, help="repository root of the older llamatier checkout")
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--prompt", type=int, default=131072)
    ap.add_argument("--decode", type=int, default=256)
    ap.add_argument("--policies", default="static,lru,adaptive,oracle")
    ap.add_argument("--sparse-budget", type=int, default=None, help="sparse mode with this block budget")
    ap.add_argument("--json", dest="json_out", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--src", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--policy", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if args.old_src is None or not (args.old_src / "llamatier" / "__init__.py").is_file():
        raise SystemExit("--old-src must name a repository root holding llamatier/ (e.g. a git archive of an older commit)")
    print(f"{args.layers} layers x {args.prompt} prompt + {args.decode} decode; old engine: {args.old_src}", flush=True)
    print(f"{'policy':<9} {'old digest':<17} {'new digest':<17} {'equal':<6} {'old M/s':>8} {'new M/s':>8} "
          f"{'old RSS':>8} {'new RSS':>8}", flush=True)
    rows = []
    for pol in args.policies.split(","):
        old = run_one(args.old_src, pol, args, dense=True)
        new = run_one(HERE.parent, pol, args, dense=False)
        if "error" in old or "error" in new:
            print(f"{pol:<9} error: old {old.get('error', 'ok')}; new {new.get('error', 'ok')}", flush=True)
            rows.append({"policy": pol, "old": old, "new": new, "equal": None})
            continue
        equal = old["counts_digest"] == new["counts_digest"] and old["accesses"] == new["accesses"]
        rows.append({"policy": pol, "old": old, "new": new, "equal": equal})
        rate = [f"{x['rate_per_cpu_s'] / 1e6:8.1f}" if x["rate_per_cpu_s"] else f"{'-':>8}" for x in (old, new)]
        print(f"{pol:<9} {old['counts_digest']:<17} {new['counts_digest']:<17} {str(equal):<6} {rate[0]} {rate[1]} "
              f"{old['peak_rss_bytes'] / 2**30:>6.2f} G {new['peak_rss_bytes'] / 2**30:>6.2f} G", flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps({"bench": "engine_equal", "layers": args.layers, "prompt": args.prompt,
                                             "decode": args.decode, "sparse_budget": args.sparse_budget,
                                             "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
