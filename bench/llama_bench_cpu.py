"""Measure stock llama-bench rows on this CPU for the host-model fit and its held-out check.

Runs llama.cpp's own llama-bench on Gemma 3 270M (or --model) once per depth, alternating
the depths the fit uses with the held-out ones so that slow drift of the machine's speed
hits both sets alike, and appends every row (llama-bench -o jsonl) to one file:

    .venv/bin/python bench/llama_bench_cpu.py --llama-bench PATH/llama-bench \\
        --out bench/results/llama-bench-cpu/avx2.jsonl

Each call of llama-bench: -p 512 -n 64 -d DEPTH -t 1,2 -r 3 (stock settings: flash attention
auto, no --swa-full). Fit depths 0, 1024, 3072; held-out depths 512, 2048 (interleaved in that
order: 0, 512, 1024, 2048, 3072). `bench/bench_llama_bench_cpu.py` fits and validates.
About four minutes on 2 idle cores; run it on an idle machine (nothing else using the cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

FIT_DEPTHS = (0, 1024, 3072)
HELDOUT_DEPTHS = (512, 2048)


def _loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-bench", required=True, help="path of the llama-bench binary to measure")
    ap.add_argument("--model", default=None, help="GGUF to run (default: the Gemma 3 270M demo model)")
    ap.add_argument("--out", required=True, type=Path, help="jsonl file to append rows to (created)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=64)
    args = ap.parse_args(argv)

    exe = shutil.which(args.llama_bench) or args.llama_bench
    if not Path(exe).is_file():
        print(f"error: llama-bench not found: {args.llama_bench} (build llama.cpp's tools or pass its path)",
              file=sys.stderr)
        return 2
    model = args.model
    if model is None:
        from llamatier.demo import demo_model_path

        model = str(demo_model_path())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.exists():
        print(f"error: {args.out} exists: measured rows are never overwritten; choose another --out",
              file=sys.stderr)
        return 2
    depths = [d for pair in zip(FIT_DEPTHS, HELDOUT_DEPTHS + (None,), strict=True) for d in pair if d is not None]
    manifest = {"llama_bench": str(Path(exe).resolve()), "model": model, "threads": args.threads,
                "reps": args.reps, "n_prompt": args.n_prompt, "n_gen": args.n_gen,
                "fit_depths": list(FIT_DEPTHS), "heldout_depths": list(HELDOUT_DEPTHS), "runs": []}
    t0 = time.time()
    for depth in depths:
        cmd = [exe, "-m", model, "-p", str(args.n_prompt), "-n", str(args.n_gen), "-d", str(depth),
               "-t", args.threads, "-r", str(args.reps), "-o", "jsonl"]
        load_before = _loadavg()
        start = time.time()
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
        if res.returncode != 0:
            print(f"error: llama-bench failed at depth {depth}: {res.stderr.strip().splitlines()[-1:]}",
                  file=sys.stderr)
            return 1
        rows = [json.loads(line) for line in res.stdout.splitlines() if line.strip().startswith("{")]
        with args.out.open("a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        manifest["runs"].append({"depth": depth, "command": " ".join(cmd), "seconds": round(time.time() - start, 1),
                                 "loadavg_before": load_before, "loadavg_after": _loadavg(), "rows": len(rows)})
        print(f"depth {depth}: {len(rows)} rows in {time.time() - start:.0f} s (load {load_before:.2f})", flush=True)
    manifest["seconds"] = round(time.time() - t0, 1)
    args.out.with_suffix(".manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {args.out} ({manifest['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
