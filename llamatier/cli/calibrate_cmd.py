"""`llamatier calibrate` (fit the host step-time model) and `llamatier validate` (held-out error)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from llamatier.calibrate import CalibrationFit, calibrate_profile, write_calibrated_profile
from llamatier.cli.app import app, cli_errors, console, print_json
from llamatier.hardware import load_profile
from llamatier.hardware.hostmodel import parse_term
from llamatier.validate import (
    GOAL_DECODE_MEDIAN_APE,
    GOAL_DECODE_P95_APE,
    PHASES,
    ValidationReport,
    validate_profile,
)

_TERM_UNITS = {  # base term -> (unit of x, display scale, display unit)
    "step": ("step", 1e3, "ms"),
    "output": ("logits row", 1e3, "ms"),
    "token": ("batch token", 1e6, "us"),
    "kv": ("KV cell", 1e9, "ns"),
    "token_kv": ("token x KV cell", 1e9, "ns"),
}


def _pct(v: float) -> str:
    return "-" if v != v else f"{v:.2%}"  # NaN -> "-"


def _print_fit(fit: CalibrationFit, outlier_sigmas: float = 4.0) -> None:
    hm = fit.model
    table = Table(title=f"host step-time model for {hm.model_name}: t = sum x * (serial + parallel / threads)")
    for col in ("term", "x counts", "serial", "parallel (1 thread)"):
        table.add_column(col)
    for term, s, p in zip(hm.terms, hm.serial_s, hm.parallel_s, strict=True):
        base, which, typ = parse_term(term)
        unit, scale, dunit = _TERM_UNITS[base]
        what = f"per {unit}" + (f" ({which.upper()} cache {typ})" if which else "")
        table.add_row(term, what, f"{s * scale:.4g} {dunit}", f"{p * scale:.4g} {dunit}")
    console.print(table)
    res = Table(title="residuals on the fitted steps (|predicted - measured| / measured)")
    for col in ("phase", "steps", "median", "p95", "max", "bias"):
        res.add_column(col)
    for phase in ("prefill", "decode", "all"):
        st = fit.stats[phase]
        res.add_row(phase, str(st["n"]), _pct(st["median_ape"]), _pct(st["p95_ape"]), _pct(st["max_ape"]),
                    _pct(st["bias"]))
    console.print(res)
    pad_note = "no captured n_kv to check" if fit.kv_pad_match != fit.kv_pad_match else (
        f"reproduces {fit.kv_pad_match:.0%} of the captured n_kv values")
    console.print(
        f"steps: {fit.data.n} in {len(fit.data.trace_names)} traces; dropped {int(fit.warmup.sum())} warm-up and "
        f"{int(fit.outliers.sum())} outliers (> {outlier_sigmas:g} robust sigmas); {fit.iterations} fit iterations. "
        f"KV padding {hm.kv_pad_cells} cells: {pad_note}. Threads seen: "
        f"{', '.join(map(str, hm.thread_counts))}; K types: {', '.join(hm.k_types)}; V types: {', '.join(hm.v_types)}; "
        f"llama.cpp CPU weight repacking {hm.weight_repack or 'not recorded'} in every trace.",
        highlight=False,
    )


@app.command()
@cli_errors
def calibrate(
    traces: list[Path] = typer.Argument(None, help="Trace directories whose measured step times to fit."),
    out: Path = typer.Option(..., "--out", "-o", help="Profile TOML to write (usable by replay --profile)."),
    llama_bench: list[Path] = typer.Option(None, "--llama-bench", help="llama-bench output (json, jsonl, csv or md) to fit instead of traces; repeat for several files."),
    base: str = typer.Option("", "--base", help="Profile whose tiers and links the result keeps (default: cpu-host; for GPU rows the GPU's built-in profile)."),
    name: str = typer.Option("", "--name", help="Name of the written profile (default: BASE-calibrated)."),
    gpu: str = typer.Option("", "--gpu", help="GPU of llama-bench rows that do not name it (markdown output), e.g. 'RTX 4090'."),
    geometry: str = typer.Option("", "--geometry", help="Geometry preset or GGUF of the llama-bench rows' model, if llamatier cannot tell it from model_type."),
    model: str = typer.Option("", "--model", help="GGUF the CPU llama-bench rows ran (its sliding windows and name)."),
    partial: bool = typer.Option(False, "--partial", help="Fit the GPU terms the rows identify and leave the others out (default: refuse)."),
    warmup_steps: int = typer.Option(1, "--warmup-steps", help="Leading steps of each trace not fitted."),
    outlier_sigmas: float = typer.Option(4.0, "--outlier-sigmas", help="Drop steps this many robust sigmas off."),
    json_out: bool = typer.Option(False, "--json", help="Print the fit as JSON."),
) -> None:
    """Fit the host or GPU step-time model from traces or llama-bench rows and write a calibrated profile."""
    from llamatier.errors import LlamatierError
    from llamatier.outpaths import check_output_file

    if outlier_sigmas <= 0:
        raise LlamatierError(f"--outlier-sigmas must be > 0 (got {outlier_sigmas})")
    if warmup_steps < 0:
        raise LlamatierError(f"--warmup-steps must be >= 0 (got {warmup_steps})")
    check_output_file(out, "--out", "host.toml")  # before the fit, not after it
    if llama_bench:
        if traces:
            raise LlamatierError("give trace directories or --llama-bench files, not both")
        from llamatier.cli.llamabench_view import run_calibrate

        run_calibrate(llama_bench, out, base=base or None, name=name or None, gpu=gpu or None,
                      geometry=geometry or None, model=model or None, partial=partial, json_out=json_out)
        return
    if not traces:
        raise LlamatierError("nothing to fit: give trace directories or --llama-bench FILE")
    base = base or "cpu-host"
    base_profile = load_profile(base)
    profile, fit = calibrate_profile(
        traces, base=base, name=name or None, warmup_steps=warmup_steps, outlier_sigmas=outlier_sigmas
    )
    path = write_calibrated_profile(profile, out, base_source=base_profile.source)
    if json_out:
        print_json({"profile": str(path), "model": fit.model.to_dict(), "residuals": fit.stats,
                    "warmup_steps_dropped": int(fit.warmup.sum()), "outliers_dropped": int(fit.outliers.sum()),
                    "kv_pad_match": fit.kv_pad_match})
        return
    _print_fit(fit, outlier_sigmas)
    console.print(f"wrote {path} (validate it on other traces: llamatier validate --profile {path} TRACE...)",
                  highlight=False)


def _print_validation(rep: ValidationReport) -> None:
    table = Table(title=f"prediction error of {rep.profile} on held-out traces")
    for col in ("phase", "steps", "median", "p95", "max", "bias", "measured", "predicted"):
        table.add_column(col)
    for phase in PHASES:
        st = rep.phases[phase]
        table.add_row(phase, str(st.n_steps), _pct(st.median_ape), _pct(st.p95_ape), _pct(st.max_ape),
                      _pct(st.bias), f"{st.measured_s:.3f} s", f"{st.predicted_s:.3f} s")
    nf = rep.decode_noise_floor
    table.add_row("[dim]decode noise floor[/]", str(nf.n_steps), _pct(nf.median_ape), _pct(nf.p95_ape),
                  _pct(nf.max_ape), "-", "-", "-")
    console.print(table)
    console.print("noise floor: error of predicting each decode step by the median of its own trace's steps "
                  "of the same KV size (measurement jitter no model can remove)", highlight=False)
    per = Table(title="per trace (decode / prefill median error)")
    for col in ("trace", "K/V", "threads", "prompt", "decode med", "decode p95", "bias", "floor med/p95",
                "prefill med"):
        per.add_column(col)
    for tv in rep.traces:
        dec, nf = tv.phases["decode"], tv.decode_noise_floor
        per.add_row(Path(tv.trace).name, f"{tv.type_k}/{tv.type_v}", str(tv.n_threads), str(tv.n_prompt_tokens),
                    _pct(dec.median_ape), _pct(dec.p95_ape), _pct(dec.bias),
                    f"{_pct(nf.median_ape)} / {_pct(nf.p95_ape)}", _pct(tv.phases["prefill"].median_ape))
    console.print(per)
    verdict = "meets" if rep.meets_goal else "misses"
    console.print(
        f"decode goal (median <= {GOAL_DECODE_MEDIAN_APE:.0%}, p95 <= {GOAL_DECODE_P95_APE:.0%}): {verdict} it",
        highlight=False,
    )
    if rep.overlap:
        console.print(f"[yellow]warning:[/] {len(rep.overlap)} of these traces were used to fit the profile: "
                      "their error is not a held-out error", highlight=False)


@app.command()
@cli_errors
def validate(
    traces: list[Path] = typer.Argument(None, help="Held-out trace directories to predict."),
    profile: str = typer.Option("", "--profile", "-p", help="Calibrated profile (name or TOML path)."),
    llama_bench: list[Path] = typer.Option(None, "--llama-bench", help="llama-bench output (json, jsonl, csv or md) to predict instead of traces."),
    leave_one_gpu_out: bool = typer.Option(False, "--leave-one-gpu-out", help="With GPU rows: refit without each GPU and predict its rows (no --profile needed)."),
    gpu: str = typer.Option("", "--gpu", help="GPU of llama-bench rows that do not name it (markdown output)."),
    geometry: str = typer.Option("", "--geometry", help="Geometry preset or GGUF of the llama-bench rows' model."),
    skip_warmup: int = typer.Option(0, "--skip-warmup", help="Leave out each trace's first N steps."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Predict held-out traces or llama-bench rows; report the error per phase or per row."""
    from llamatier.errors import LlamatierError

    if llama_bench:
        if traces:
            raise LlamatierError("give trace directories or --llama-bench files, not both")
        from llamatier.cli.llamabench_view import run_validate

        run_validate(llama_bench, profile or None, gpu=gpu or None, geometry=geometry or None,
                     leave_one_gpu_out=leave_one_gpu_out, json_out=json_out)
        return
    if not traces:
        raise LlamatierError("nothing to validate: give trace directories or --llama-bench FILE")
    if not profile:
        raise LlamatierError("--profile is required to validate traces (a profile with a calibrated host model)")
    rep = validate_profile(profile, traces, skip_warmup_steps=skip_warmup)
    if json_out:
        print_json(rep.to_dict())
        return
    _print_validation(rep)
