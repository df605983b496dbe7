"""Sweep throughput: the local process pool against Dask (a LocalCluster of the same number of workers).

A 1,000-cell sweep of the committed Gemma trace (4 policies x 25 HBM budgets x 5
profiles x 2 KV types) runs on each executor; the time includes starting the workers
(pool or cluster) and collecting every row. The rows must be identical except for
the wall-clock columns (cell_wall_s, replay_wall_s, decision_s).

    .venv/bin/python bench/bench_dask.py [--workers 2] [--trace traces/gemma3-270m-1k] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

TIMINGS = ["cell_wall_s", "replay_wall_s", "decision_s"]


def main() -> None:
    from llamatier.sweep import make_cells, parse_budgets, rows_frame, run_cells

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--trace", default="traces/gemma3-270m-1k")
    ap.add_argument("--json", dest="json_out", type=Path, default=None)
    args = ap.parse_args()
    cells = make_cells(args.trace, budgets=parse_budgets("4%..100%", steps=25),
                       profiles="a100-40g,a100-80g,h100-sxm,l4,t4", kv_types="f16,q8_0")
    print(f"{len(cells)} cells of {args.trace}, {args.workers} workers", flush=True)
    frames, seconds = {}, {}
    for name in ("processes", "dask"):
        t0 = time.perf_counter()
        frames[name] = rows_frame(run_cells(cells, executor=name, jobs=args.workers))
        seconds[name] = time.perf_counter() - t0
        print(f"{name:<10} {seconds[name]:7.1f} s  {len(cells) / seconds[name]:6.1f} cells/s", flush=True)
    same = frames["dask"].drop(TIMINGS).equals(frames["processes"].drop(TIMINGS))
    ratio = seconds["processes"] / seconds["dask"]
    print(f"rows identical (wall-clock columns aside): {same}; Dask throughput = {ratio:.2f} x the process pool's")
    if args.json_out:
        args.json_out.write_text(json.dumps({
            "bench": "dask", "cells": len(cells), "workers": args.workers, "seconds": seconds,
            "cells_per_s": {k: len(cells) / v for k, v in seconds.items()}, "rows_identical": same,
            "dask_over_processes": ratio,
        }, indent=2))


if __name__ == "__main__":
    main()
