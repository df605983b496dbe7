"""Replay speed: block accesses per second for each policy, beside libCacheSim's LRU on the same stream.

One run, one core. The trace shape is a 7B-class decode at long context
(32 layers, 16K-token prompt, 256 decode steps, 16-token blocks) with
synthetic attention mass (llamatier.replay.synthetic): the engine's speed does
not depend on what the mass says, only on the shape. libCacheSim replays the
exact (layer, block) request stream our LRU sees, from an oracleGeneral file,
with the same capacity; the hit counts are compared too.

    .venv/bin/python bench/bench_replay.py [--layers 32] [--prompt 16384] [--decode 256]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from llamatier.hardware import load_profile
from llamatier.replay import ReplayOptions, prepare, replay
from llamatier.replay.synthetic import synthetic_trace


def request_stream(ctx) -> np.ndarray:  # noqa: ANN001
    """Flat (layer, block) ids in access order: every visible block of every step, layer-major."""
    out = []
    for s in range(ctx.n_steps):
        out.append(np.flatnonzero(ctx.visible_mask(s).ravel()))
    return np.concatenate(out)


def libcachesim_lru(ids: np.ndarray, obj_bytes: int, cap_bytes: int) -> tuple[float, float, int]:
    """CPU and wall seconds libCacheSim's LRU takes over ``ids`` (C reader + C loop), and its miss count."""
    import libcachesim as lcs

    rec = np.dtype([("t", "<u4"), ("id", "<u8"), ("size", "<u4"), ("next", "<i8")])
    arr = np.zeros(ids.size, dtype=rec)
    arr["t"] = np.arange(ids.size, dtype=np.uint32)
    arr["id"] = ids.astype(np.uint64) + 1
    arr["size"] = obj_bytes
    arr["next"] = -1
    fd, path = tempfile.mkstemp(suffix=".oracleGeneral")
    os.close(fd)
    try:
        arr.tofile(path)
        reader = lcs.TraceReader(path, lcs.TraceType.ORACLE_GENERAL_TRACE)
        cache = lcs.LRU(cap_bytes)
        c0, w0 = time.process_time(), time.perf_counter()
        miss_ratio, _ = cache.process_trace(reader)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    finally:
        os.unlink(path)
    return cpu, wall, int(round(miss_ratio * ids.size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16384)
    ap.add_argument("--decode", type=int, default=256)
    ap.add_argument("--block-tokens", type=int, default=16)
    ap.add_argument("--hbm-fraction", type=float, default=0.5, help="HBM budget as a fraction of the final KV")
    ap.add_argument("--sparse-budget", type=int, default=None, help="replay in sparse mode with this block budget")
    ap.add_argument("--quick", action="store_true",
                    help="accepted for bench/run_all.py; the default run already takes about 10 s")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()

    t0 = time.perf_counter()
    trace = synthetic_trace(
        n_layers=args.layers, n_prompt=args.prompt, n_decode=args.decode, block_tokens=args.block_tokens,
        n_head=32, n_head_kv=8, head_dim=128, prefill_chunk=512, weight_bytes=4_920_000_000,
        n_params=8_030_261_248, seed=1,
    )
    print(f"synthetic trace: {trace.n_steps} steps x {trace.n_layers} layers x {trace.n_blocks} blocks "
          f"(built in {time.perf_counter() - t0:.1f} s)")
    prof = load_profile("a100-40g")
    ctx = prepare(trace, prof, ReplayOptions())
    kv_final = float(ctx.block_bytes.sum() * ctx.n_blocks)
    block = int(ctx.block_bytes[0])
    cap = int(args.hbm_fraction * kv_final) // block * block
    opts = ReplayOptions(
        hbm_budget_bytes=cap,
        mode="sparse" if args.sparse_budget else "lossless",
        block_budget=args.sparse_budget,
    )
    rows = []
    small = synthetic_trace(n_layers=2, n_prompt=64, n_decode=8)
    for policy in ("static", "lru", "adaptive", "oracle"):
        replay(small, prof, policy)  # warm-up: imports and first-call costs, not the measurement
        c0, w0 = time.process_time(), time.perf_counter()
        r = replay(trace, prof, policy, opts)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        rows.append((policy, r.block_accesses, cpu, wall, r.block_accesses / cpu, r.record.decision_s))
        if policy == "lru":
            tr = r.record.traffic
            ours_misses = int(tr.move_count[:, 0, 1:, 0].sum() + (r.record.alloc_bytes.sum(axis=1) / block).sum())
    ids = request_stream(ctx)
    lcs_cpu, lcs_wall, lcs_misses = libcachesim_lru(ids, block, cap)
    lcs_rate = ids.size / lcs_cpu
    print(f"HBM budget {cap / 2**30:.2f} GiB = {args.hbm_fraction:.0%} of the final KV ({kv_final / 2**30:.2f} GiB); "
          "rates are per CPU second of this process (one core)")
    print(f"{'engine':<22} {'accesses':>12} {'cpu s':>7} {'wall s':>7} {'M acc/s':>8} {'vs libCacheSim':>15} {'policy s':>9}")
    for policy, n, cpu, wall, rate, dec in rows:
        print(f"llamatier {policy:<12} {n:>12,} {cpu:>7.3f} {wall:>7.3f} {rate / 1e6:>8.1f} {rate / lcs_rate:>14.1f}x {dec:>9.3f}")
    print(f"{'libCacheSim LRU':<22} {ids.size:>12,} {lcs_cpu:>7.3f} {lcs_wall:>7.3f} {lcs_rate / 1e6:>8.1f} {1.0:>14.1f}x")
    if args.sparse_budget:
        print("(sparse mode: libCacheSim replays the lossless stream, so it is a reference for scale only)")
    else:
        print(f"LRU misses: llamatier {ours_misses:,}, libCacheSim {lcs_misses:,} "
              f"({'equal' if ours_misses == lcs_misses else 'DIFFERENT'})")
    if args.json_out:
        goals = {"static": 100e6, "lru": 100e6, "adaptive": 100e6, "oracle": 20e6}
        shape = f"{trace.n_layers} layers x {trace.n_blocks} blocks x {trace.n_steps} steps"
        figures = [
            {"name": f"replay {p}: block accesses per CPU second ({shape})", "value": round(rate / 1e6, 1),
             "unit": "M/s", "goal": f">= {goals[p] / 1e6:.0f} M/s"}
            for p, _n, _cpu, _wall, rate, _dec in rows
        ]
        figures.append({"name": "replay: libCacheSim LRU on the same stream", "value": round(lcs_rate / 1e6, 2),
                        "unit": "M/s", "goal": ""})
        lru_rate = next(r[4] for r in rows if r[0] == "lru")
        figures.append({"name": "replay: llamatier LRU / libCacheSim LRU", "value": round(lru_rate / lcs_rate, 1),
                        "unit": "x", "goal": ""})
        if not args.sparse_budget:
            figures.append({"name": "replay: LRU misses equal libCacheSim's", "value": ours_misses == lcs_misses,
                            "unit": "", "goal": "True"})
        Path(args.json_out).write_text(json.dumps({"bench": "replay", "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
