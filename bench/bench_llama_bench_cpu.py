"""Host model vs stock llama-bench on this CPU: fit on some depths, predict the held-out depths.

    .venv/bin/python bench/bench_llama_bench_cpu.py bench/results/llama-bench-cpu/avx2.jsonl [--json out.json]

Reads rows measured by bench/llama_bench_cpu.py (its manifest names the fit and held-out
depths), fits the host step-time model on the fit depths with the model's real geometry
(Gemma 3 270M: 15 of 18 layers windowed to 512 tokens), predicts every held-out row, and
prints measured vs predicted t/s with the median and p95 |error|. Goal: median
<= 5%, p95 <= 10% on the held-out rows. No timing is measured here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llamatier.llamabench.hostfit import fit_host_from_bench, host_rows, predict_bench_rows  # noqa: E402
from llamatier.llamabench.reader import read_llama_bench  # noqa: E402
from llamatier.model import read_model_info  # noqa: E402

GOAL_MEDIAN, GOAL_P95 = 0.05, 0.10


def evaluate(path: Path, model_path: str | None = None) -> dict:
    manifest = json.loads(path.with_suffix(".manifest.json").read_text())
    rows = host_rows(read_llama_bench(path))
    fit_d, held_d = set(manifest["fit_depths"]), set(manifest["heldout_depths"])
    fit_rows = [r for r in rows if r.n_depth in fit_d]
    held_rows = [r for r in rows if r.n_depth in held_d]
    info = read_model_info(model_path or manifest["model"])
    g = info.geometry
    fit = fit_host_from_bench(fit_rows, model_name=info.name, weight_bytes=info.weight_bytes,
                              swa_layer_fraction=float(np.mean(g.swa_layers)), swa_window=max(g.sliding_window))
    pred = predict_bench_rows(fit.model, held_rows)
    err = np.array([r.measured_s / p - 1 for r, p in zip(held_rows, pred, strict=True)])  # error of predicted t/s
    ae = np.abs(err)
    return {
        "file": str(path), "build": rows[0].build, "cpu": rows[0].cpu_info, "backends": rows[0].backends,
        "configuration": fit.model.configuration(swa_full=False),
        "fit_rows": len(fit_rows), "heldout_rows": len(held_rows),
        "fit_in_sample_median": float(np.median(np.abs(fit.rel_error))),
        "heldout_median_ape": float(np.median(ae)), "heldout_p95_ape": float(np.percentile(ae, 95)),
        "heldout_max_ape": float(ae.max()),
        "meets_goal": bool(np.median(ae) <= GOAL_MEDIAN and np.percentile(ae, 95) <= GOAL_P95),
        "model": {"terms": fit.model.terms, "serial_s": fit.model.serial_s, "parallel_s": fit.model.parallel_s},
        "rows": [{"test": r.test, "threads": r.n_threads, "measured_ts": round((r.n_prompt + r.n_gen) / r.measured_s, 2),
                  "predicted_ts": round((r.n_prompt + r.n_gen) / p, 2), "error": round(float(e), 4)}
                 for r, p, e in zip(held_rows, pred, err, strict=True)],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path, help="jsonl files written by bench/llama_bench_cpu.py")
    ap.add_argument("--model", help="the GGUF the rows ran (default: the manifest's)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    results = [evaluate(f, args.model) for f in args.files]
    for res in results:
        print(f"{res['file']}: build {res['build']}, {res['backends']}, {res['cpu']}")
        print(f"  predicts: {res['configuration']}")
        print(f"  fit on {res['fit_rows']} rows (in-sample median {res['fit_in_sample_median']:.1%}); "
              f"{res['heldout_rows']} held-out rows:")
        for r in res["rows"]:
            print(f"    {r['test']:15s} t={r['threads']}  measured {r['measured_ts']:8.2f}  predicted "
                  f"{r['predicted_ts']:8.2f}  {r['error']:+.1%}")
        print(f"  held-out |error|: median {res['heldout_median_ape']:.1%}, p95 {res['heldout_p95_ape']:.1%}, "
              f"max {res['heldout_max_ape']:.1%} (goal: median <= {GOAL_MEDIAN:.0%}, p95 <= {GOAL_P95:.0%}: "
              f"{'met' if res['meets_goal'] else 'missed'})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
