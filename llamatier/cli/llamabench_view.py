"""Printing for ``calibrate --llama-bench`` and ``validate --llama-bench`` (the library does the work)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from rich.table import Table

from llamatier.cli.app import console, print_json
from llamatier.hardware.gpumodel import GpuStepModel
from llamatier.llamabench.calibrate import (
    BenchValidation,
    calibrate_from_llama_bench,
    validate_llama_bench,
)
from llamatier.llamabench.gpufit import nkvo_ratios, tokens_in_test

GOAL_GPU_ROW_APE = 0.15  # held-out tg128 and pp512 rows, leave-one-GPU-out
GOAL_NKVO_RATIO_APE = 0.20  # -nkvo / all-on-GPU decode ratio

_GPU_TERM_TEXT = {  # term -> (what it means, how to show the coefficient)
    "layer": ("per GPU layer of a step without CUDA graphs", "us"),
    "layer_graph": ("per GPU layer of a decode step replayed as a CUDA graph", "us"),
    "weights": ("decode streams weights and KV at this share of datasheet bandwidth", "share"),
    "dequant": ("f16 copy of quantized weights (cuBLAS prefill) at this share of bandwidth", "share"),
    "matmul": ("prefill matmuls at this share of the FP16 tensor peak", "share"),
    "matmul_mmq": ("quantized prefill (MMQ) at this share of the INT8 tensor peak", "share"),
    "matmul_dp4a": ("prefill on GPUs without tensor cores at this share of the DP4A peak", "share"),
    "attention": ("prefill attention FLOPs at this share of the FP16 tensor peak", "share"),
    "split": ("per layer whose attention runs on the host (-nkvo)", "us"),
    "host_kv": ("host attention over KV in decode (-nkvo)", "gb_s"),
    "host_flops": ("host attention FLOPs in prefill (-nkvo)", "gflops"),
    "host_weights": ("weights of layers kept on the host (-ngl split)", "gb_s"),
}


def _pct(v: float) -> str:
    return "-" if v != v else f"{v:+.1%}"


def _abs_pct(v: float) -> str:
    return "-" if v != v else f"{v:.1%}"


def format_gpu_coef(term: str, coef: float) -> str:
    kind = _GPU_TERM_TEXT[term][1]
    if kind == "us":
        return f"{coef * 1e6:.1f} us"
    if kind == "share":
        return f"{1 / coef:.0%}" if coef > 0 else "unbounded"
    if kind == "gb_s":
        return f"{1 / coef / 1e9:.1f} GB/s" if coef > 0 else "unbounded"
    return f"{1 / coef / 1e9:.1f} GFLOP/s" if coef > 0 else "unbounded"


def print_gpu_model(gm: GpuStepModel, title: str) -> None:
    table = Table(title=title)
    for col in ("term", "fitted value", "meaning"):
        table.add_column(col)
    for term, coef in gm.coef.items():
        table.add_row(term, format_gpu_coef(term, coef), _GPU_TERM_TEXT[term][0])
    for term in gm.unfitted:
        table.add_row(term, "not fitted", "the rows cannot separate it from another term")
    console.print(table)


def run_calibrate(paths: Sequence[Path], out: Path, *, base: str | None, name: str | None, gpu: str | None,
                  geometry: str | None, model: str | None, partial: bool, json_out: bool) -> None:
    """Fit, write the profile, print the fit."""
    from llamatier.calibrate import write_calibrated_profile

    profile, cal = calibrate_from_llama_bench(paths, base=base, name=name, gpu=gpu, geometry=geometry,
                                              model=model, partial=partial)
    if cal.kind == "gpu":
        gm = cal.gpu_fit.model
        kind, note = "GPU", (f"[compute.gpu_model] is fitted on {gm.n_rows} llama-bench rows of "
                             f"{', '.join(gm.fitted_on)} (GPU step model, relative NNLS).")
    else:
        kind, note = "host", (f"[compute.host_model] is fitted on {len(cal.host_fit.rows)} llama-bench rows "
                              "(a test = the sum of its llama_decode steps): "
                              "t = sum_j x_j * (serial_s_j + parallel_s_j / n_threads).")
    # the profile keeps its base's source path
    path = write_calibrated_profile(profile, out, kind=kind, fit_note=note)
    if cal.kind == "gpu":
        fit = cal.gpu_fit
        if json_out:
            print_json({"profile": str(path), "kind": "gpu", "coef": fit.model.coef, "unfitted": fit.model.unfitted,
                        "fitted_on": fit.model.fitted_on,
                        "rows": [{"gpu": r.gpu, "model": r.model_type, "test": r.test, "nkvo": r.no_kv_offload,
                                  "measured_s": r.measured_s, "predicted_s": float(p)}
                                 for r, p in zip(fit.rows, fit.predicted_s, strict=True)],
                        "skipped": [s.__dict__ for s in cal.skipped]})
            return
        print_gpu_model(fit.model, f"GPU step model fitted on {fit.model.n_rows} llama-bench rows of "
                                   f"{', '.join(fit.model.fitted_on)}")
        res = Table(title="fitted rows (in-sample: not a held-out error)")
        for col in ("GPU", "model", "test", "nkvo", "measured t/s", "predicted t/s", "error"):
            res.add_column(col)
        for r, p in zip(fit.rows, fit.predicted_s, strict=True):
            n = tokens_in_test(r.test)
            res.add_row(r.gpu, r.model_type, r.test, "1" if r.no_kv_offload else "0", f"{n / r.measured_s:.2f}",
                        f"{n / p:.2f}", _pct(r.measured_s / p - 1))
        console.print(res)
        if cal.skipped:
            console.print(f"{len(cal.skipped)} rows not used: " + "; ".join(
                f"{s.gpu} {s.model_type} {s.test}: {s.reason}" for s in cal.skipped[:6])
                + (" ..." if len(cal.skipped) > 6 else ""), highlight=False)
    else:
        fit = cal.host_fit
        hm = fit.model
        if json_out:
            print_json({"profile": str(path), "kind": "host", "model": hm.to_dict(), "configuration": cal.configuration,
                        "rows": [{"test": r.test, "threads": r.n_threads, "measured_s": r.measured_s,
                                  "predicted_s": float(p)} for r, p in zip(fit.rows, fit.predicted_s, strict=True)]})
            return
        from llamatier.cli.calibrate_cmd import _TERM_UNITS
        from llamatier.hardware.hostmodel import term_conditions

        table = Table(title=f"host step-time model for {hm.model_name} from {len(fit.rows)} llama-bench rows")
        for col in ("term", "serial", "parallel (1 thread)"):
            table.add_column(col)
        for term, s_, p_ in zip(hm.terms, hm.serial_s, hm.parallel_s, strict=True):
            _, scale, unit = _TERM_UNITS[term_conditions(term)[0]]
            table.add_row(term, f"{s_ * scale:.4g} {unit}", f"{p_ * scale:.4g} {unit}")
        console.print(table)
        console.print(f"predicts: {cal.configuration}; in-sample median error {hm.fit_median_ape:.1%}, "
                      f"p95 {hm.fit_p95_ape:.1%}", highlight=False)
    console.print(f"wrote {path} (check it on rows the fit never saw: llamatier validate --profile {path} "
                  "--llama-bench FILE)", highlight=False)


def run_validate(paths: Sequence[Path], profile: str | None, *, gpu: str | None, geometry: str | None,
                 leave_one_gpu_out: bool, json_out: bool) -> None:
    rep = validate_llama_bench(profile, paths, gpu=gpu, geometry=geometry, leave_one_gpu_out_=leave_one_gpu_out)
    if json_out:
        print_json(validation_dict(rep))
        return
    print_validation(rep)


def validation_dict(rep: BenchValidation) -> dict:
    rows = []
    for i, p in enumerate(rep.predictions):
        rows.append({"gpu": p.gpu, "model": p.model_type, "test": p.test, "nkvo": p.no_kv_offload,
                     "threads": rep.threads[i] if rep.threads else None,
                     "measured_ts": p.measured_ts, "predicted_ts": None if math.isnan(p.predicted_s) else p.predicted_ts,
                     "error": None if math.isnan(p.predicted_s) else p.rel_error, "label": rep.labels[i],
                     "note": p.note})
    out = {"kind": rep.kind, "profile": rep.profile, "configuration": rep.configuration, "stats": rep.stats,
           "rows": rows}
    if rep.kind.startswith("gpu"):
        out["nkvo_ratios"] = [{"gpu": g, "model": m, "test": t, "measured": a, "predicted": b}
                              for g, m, t, a, b in nkvo_ratios(rep.predictions)]
        out["goal"] = {"row_ape": GOAL_GPU_ROW_APE, "nkvo_ratio_ape": GOAL_NKVO_RATIO_APE}
    return out


def print_validation(rep: BenchValidation) -> None:
    title = {"gpu": f"{rep.profile} on llama-bench rows", "gpu-logo": "leave-one-GPU-out: each GPU predicted by "
             "a fit on the other GPUs", "host": f"{rep.profile} on llama-bench rows"}[rep.kind]
    table = Table(title=title)
    cols = ["GPU", "model", "test", "nkvo"] if rep.kind != "host" else ["model", "test", "threads"]
    for col in cols + ["measured t/s", "predicted t/s", "error", "note"]:
        table.add_column(col)
    for i, p in enumerate(rep.predictions):
        pred = "-" if math.isnan(p.predicted_s) else f"{p.predicted_ts:.2f}"
        note = "; ".join(x for x in (rep.labels[i], p.note) if x)
        lead = ([p.gpu, p.model_type, p.test, "1" if p.no_kv_offload else "0"] if rep.kind != "host"
                else [p.model_type, p.test, str(rep.threads[i])])
        table.add_row(*lead, f"{p.measured_ts:.2f}", pred, _pct(p.rel_error), note)
    console.print(table)
    st = rep.stats
    console.print(f"{st['predicted']} of {st['n']} rows predicted: median |error| {_abs_pct(st['median_ape'])}, "
                  f"p95 {_abs_pct(st['p95_ape'])}, max {_abs_pct(st['max_ape'])}", highlight=False)
    if rep.configuration:
        console.print(f"predicts: {rep.configuration}", highlight=False)
    if rep.kind.startswith("gpu"):
        core = [p for p in rep.predictions if p.test in ("tg128", "pp512") and not p.no_kv_offload]
        ok = [p for p in core if not math.isnan(p.predicted_s) and abs(p.rel_error) <= GOAL_GPU_ROW_APE]
        console.print(f"tg128/pp512 rows within {GOAL_GPU_ROW_APE:.0%}: {len(ok)} of {len(core)}", highlight=False)
        for g, m, t, meas, pred in nkvo_ratios(rep.predictions):
            err = pred / meas - 1 if pred == pred else float("nan")
            console.print(f"-nkvo / all-on-GPU throughput, {g} {m} {t}: measured {meas:.2f}, predicted "
                          f"{'-' if pred != pred else f'{pred:.2f}'} ({_pct(err)})", highlight=False)
