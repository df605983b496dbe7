"""Tracer overhead: decode tok/s with and without attention capture, alternating runs, one process.

Each pair runs the same prompt and seed through llama.cpp twice, once with
capture (C cb_eval helper, per-block reduction, Parquet writing) and once with
no cb_eval at all; the order alternates between pairs. Reports the median of
per-pair ratios traced/untraced, for llama_decode time alone and for the whole
decode loop (llama_decode + reduction + sampling + writing). Goal: >= 0.95.

    python bench/bench_tracer.py [--model GGUF] [--pairs 6] [--n-predict 128] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from llamatier.trace.tracer import TraceConfig, run_trace
from llamatier.workloads import builtin_workload, demo_model_path


def one_run(model: Path, out: Path, capture: bool, n_predict: int, threads: int, prompt: str, backend: str) -> dict:
    s = run_trace(
        TraceConfig(
            model_path=model, out_dir=out, prompt=prompt, n_predict=n_predict, n_ctx=2048, n_batch=512,
            n_threads=threads, capture=capture, capture_backend=backend, overwrite=True, seed=7,
        )
    )
    return {
        "decode_tok_s": s.n_decode_steps / s.decode_s,
        "loop_tok_s": s.n_decode_steps / s.decode_wall_s,
        "prefill_s": s.prefill_s,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: Gemma 3 270M demo model)")
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--n-predict", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-chars", type=int, default=4000, help="prompt length in characters of the built-in text")
    ap.add_argument("--capture", default="c", help="capture backend to measure: c or python")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    model = a.model or demo_model_path()
    prompt = builtin_workload()[: a.prompt_chars]
    ratios_dec, ratios_loop, rows = [], [], []
    with tempfile.TemporaryDirectory() as td:
        one_run(model, Path(td) / "warm", False, 16, a.threads, prompt, a.capture)  # warm caches
        for i in range(a.pairs):
            order = (True, False) if i % 2 == 0 else (False, True)
            res = {}
            for cap in order:
                res[cap] = one_run(model, Path(td) / f"r{i}{cap}", cap, a.n_predict, a.threads, prompt, a.capture)
            ratios_dec.append(res[True]["decode_tok_s"] / res[False]["decode_tok_s"])
            ratios_loop.append(res[True]["loop_tok_s"] / res[False]["loop_tok_s"])
            rows.append({"pair": i, "traced": res[True], "untraced": res[False]})
            print(f"pair {i}: untraced {res[False]['decode_tok_s']:.1f} tok/s, traced {res[True]['decode_tok_s']:.1f} tok/s, "
                  f"ratio {ratios_dec[-1]:.3f} (whole loop {ratios_loop[-1]:.3f})", file=sys.stderr)
    result = {
        "bench": "tracer_overhead",
        "model": str(model),
        "capture_backend": a.capture,
        "pairs": a.pairs,
        "n_predict": a.n_predict,
        "threads": a.threads,
        "median_ratio_llama_decode": statistics.median(ratios_dec),
        "median_ratio_decode_loop": statistics.median(ratios_loop),
        "untraced_tok_s_median": statistics.median(r["untraced"]["decode_tok_s"] for r in rows),
        "traced_tok_s_median": statistics.median(r["traced"]["decode_tok_s"] for r in rows),
        "goal": ">= 0.95",
        "date": time.strftime("%Y-%m-%d"),
        "runs": rows,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
