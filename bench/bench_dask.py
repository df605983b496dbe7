"""Sweep throughput: the local process pool against Dask (a LocalCluster of the same number of workers).

A 1,000-cell sweep of the committed Gemma trace (4 policies x 25 HBM budgets x 5
profiles x 2 KV types) runs on each executor, each run in a fresh child process (as
`llamatier sweep` runs: neither executor finds workers or a forkserver left by the
other), the two executors alternating first. The time includes starting the
workers (pool or cluster), every cell, collecting every row and stopping the
workers. The rows must be identical except for the wall-clock columns
(cell_wall_s, replay_wall_s, decision_s).

    .venv/bin/python bench/bench_dask.py [--workers 2] [--repeat 3] [--trace traces/gemma3-270m-1k] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIMINGS = ["cell_wall_s", "replay_wall_s", "decision_s"]
EXECUTORS = ("processes", "dask")


def _cells(trace: str) -> list:
    from llamatier.sweep import make_cells, parse_budgets

    return make_cells(trace, budgets=parse_budgets("4%..100%", steps=25),
                      profiles="a100-40g,a100-80g,h100-sxm,l4,t4", kv_types="f16,q8_0")


def child(args: argparse.Namespace) -> None:
    """One sweep on one executor: its rows to --rows-out, its seconds on stdout."""
    from llamatier.sweep import rows_frame, run_cells

    cells = _cells(args.trace)
    t0 = time.perf_counter()
    frame = rows_frame(run_cells(cells, executor=args.executor, jobs=args.workers))
    seconds = time.perf_counter() - t0
    frame.write_parquet(args.rows_out)
    print(json.dumps({"executor": args.executor, "cells": len(cells), "seconds": seconds}))


def run_child(args: argparse.Namespace, executor: str, rows_out: Path) -> float:
    cmd = [sys.executable, __file__, "--child", "--executor", executor, "--rows-out", str(rows_out),
           "--workers", str(args.workers), "--trace", args.trace]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{executor} sweep failed: {(p.stderr.strip().splitlines() or ['(no output)'])[-1]}")
    return float(json.loads(p.stdout.strip().splitlines()[-1])["seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each executor (alternating which goes first)")
    ap.add_argument("--trace", default="traces/gemma3-270m-1k")
    ap.add_argument("--json", dest="json_out", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--executor", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rows-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    import polars as pl

    n_cells = len(_cells(args.trace))
    print(f"{n_cells} cells of {args.trace}, {args.workers} workers, {args.repeat} runs of each", flush=True)
    seconds: dict[str, list[float]] = {e: [] for e in EXECUTORS}
    same = True
    with tempfile.TemporaryDirectory() as td:
        for run in range(args.repeat):
            order = EXECUTORS if run % 2 == 0 else EXECUTORS[::-1]
            for name in order:
                seconds[name].append(run_child(args, name, Path(td) / f"{name}.parquet"))
            frames = {e: pl.read_parquet(Path(td) / f"{e}.parquet").drop(TIMINGS) for e in EXECUTORS}
            same = same and frames["dask"].equals(frames["processes"])
            ratio = seconds["processes"][-1] / seconds["dask"][-1]
            print(f"run {run + 1}: processes {seconds['processes'][-1]:6.1f} s, dask {seconds['dask'][-1]:6.1f} s, "
                  f"Dask throughput = {ratio:.2f} x the process pool's", flush=True)
    med = {e: statistics.median(v) for e, v in seconds.items()}
    ratio = med["processes"] / med["dask"]
    print(f"median: processes {med['processes']:.1f} s ({n_cells / med['processes']:.1f} cells/s), dask "
          f"{med['dask']:.1f} s ({n_cells / med['dask']:.1f} cells/s); rows identical (wall-clock columns aside): "
          f"{same}; Dask throughput = {ratio:.2f} x the process pool's")
    if args.json_out:
        args.json_out.write_text(json.dumps({
            "bench": "dask", "cells": n_cells, "workers": args.workers, "seconds": seconds, "median_s": med,
            "cells_per_s": {k: n_cells / v for k, v in med.items()}, "rows_identical": same,
            "dask_over_processes": ratio,
        }, indent=2))


if __name__ == "__main__":
    main()
