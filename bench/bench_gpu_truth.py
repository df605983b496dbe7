"""GPU step model against llama.cpp's published measurements: in-sample fit and leave-one-GPU-out.

    .venv/bin/python bench/bench_gpu_truth.py [--json out.json] [--markdown]

Reads the committed ground-truth set (llamatier/data/llama_bench_published.csv), fits the GPU
step model on every usable row (what the built-in profiles carry), then for each GPU refits
without that GPU's rows and predicts them. Goal: every held-out tg128 and pp512 row
within 15% and the -nkvo / all-on-GPU decode ratio within 20%. Prints one table per view and
the goal count; no timing is measured here (the rows are published measurements).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llamatier.cli.llamabench_view import GOAL_GPU_ROW_APE, GOAL_NKVO_RATIO_APE, format_gpu_coef  # noqa: E402
from llamatier.llamabench.calibrate import published_gpu_rows  # noqa: E402
from llamatier.llamabench.gpufit import (  # noqa: E402
    fit_gpu_model,
    leave_one_gpu_out,
    nkvo_ratios,
    predict_rows,
)


def _row(p) -> dict:  # noqa: ANN001
    ok = p.predicted_s == p.predicted_s
    return {"gpu": p.gpu, "model": p.model_type, "test": p.test, "nkvo": int(p.no_kv_offload),
            "measured_ts": round(p.measured_ts, 2), "predicted_ts": round(p.predicted_ts, 2) if ok else None,
            "error": round(p.rel_error, 4) if ok else None, "note": p.note}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write every figure to this JSON file")
    ap.add_argument("--markdown", action="store_true", help="print the tables as markdown (for docs/accuracy.md)")
    args = ap.parse_args(argv)

    rows, skipped = published_gpu_rows()
    fit = fit_gpu_model(rows, partial=True)
    insample = predict_rows(fit.model, rows)
    logo = leave_one_gpu_out(rows)
    core = [p for p in logo.predictions if p.test in ("tg128", "pp512") and not p.no_kv_offload]
    within = [p for p in core if p.predicted_s == p.predicted_s and abs(p.rel_error) <= GOAL_GPU_ROW_APE]
    ratios = nkvo_ratios(logo.predictions)
    out = {
        "rows_used": len(rows), "rows_skipped": [s.__dict__ for s in skipped],
        "gpus": sorted({r.gpu for r in rows}),
        "coefficients": {t: format_gpu_coef(t, c) for t, c in fit.model.coef.items()},
        "unfitted": list(fit.model.unfitted), "tied": list(fit.model.tied),
        "in_sample": [_row(p) for p in insample],
        "leave_one_gpu_out": [_row(p) for p in logo.predictions],
        "goal": {"row_ape": GOAL_GPU_ROW_APE, "nkvo_ratio_ape": GOAL_NKVO_RATIO_APE,
                 "tg128_pp512_rows": len(core), "within": len(within),
                 "not_predicted": sum(1 for p in core if p.predicted_s != p.predicted_s)},
        "nkvo_ratios": [{"gpu": g, "model": m, "test": t, "measured": round(a, 4),
                         "predicted": None if b != b else round(b, 4)} for g, m, t, a, b in ratios],
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    md = args.markdown
    sep = " | " if md else "  "

    def line(*cells: object) -> str:
        text = sep.join(str(c) for c in cells)
        return f"| {text} |" if md else text

    print(f"{len(rows)} published rows of {len(out['gpus'])} GPUs used ({len(skipped)} skipped: no model_size)")
    print("fitted coefficients: " + ", ".join(f"{t} {v}" for t, v in out["coefficients"].items())
          + (f"; unfitted: {', '.join(fit.model.unfitted)}" if fit.model.unfitted else ""))
    print()
    print(line("GPU", "model", "test", "nkvo", "measured t/s", "in-sample", "error", "leave-one-GPU-out", "error",
               "note"))
    if md:
        print("|" + "---|" * 10)
    for a, b in zip(out["in_sample"], out["leave_one_gpu_out"], strict=True):
        pred = "-" if b["predicted_ts"] is None else f"{b['predicted_ts']:.2f}"
        err = "-" if b["error"] is None else f"{b['error']:+.1%}"
        print(line(a["gpu"], a["model"], a["test"], a["nkvo"], f"{a['measured_ts']:.2f}", f"{a['predicted_ts']:.2f}",
                   f"{a['error']:+.1%}", pred, err, b["note"]))
    print()
    g = out["goal"]
    print(f"leave-one-GPU-out: {g['within']} of {g['tg128_pp512_rows']} tg128/pp512 rows within "
          f"{GOAL_GPU_ROW_APE:.0%} ({g['not_predicted']} not predictable)")
    for r in out["nkvo_ratios"]:
        pred = "not predictable (no other GPU has -nkvo rows)" if r["predicted"] is None else (
            f"predicted {r['predicted']:.3f} ({r['predicted'] / r['measured'] - 1:+.1%})")
        print(f"-nkvo / all-on-GPU t/s, {r['gpu']} {r['model']} {r['test']}: measured {r['measured']:.3f}, {pred}")
    errs = [abs(p["error"]) for p in out["leave_one_gpu_out"] if p["error"] is not None]
    if errs:
        errs.sort()
        print(f"leave-one-GPU-out |error| over {len(errs)} predicted rows: median {errs[len(errs) // 2]:.1%}, "
              f"max {errs[-1]:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
