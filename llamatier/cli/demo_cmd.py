"""`llamatier demo`: trace Gemma 3 270M on the built-in workload, then inspect, sweep and compare."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from llamatier.cli.app import RepackOpt, app, cli_errors, console
from llamatier.errors import LlamatierError

DEMO_POLICIES = ("static", "lru", "adaptive", "oracle")
DEMO_BUDGETS = "100%,50%,25%,10%"


@app.command()
@cli_errors
def demo(
    out: Path = typer.Option(None, "--out", "-o", help="Where to write the demo trace (default: ./llamatier-demo/<time>)."),
    n_predict: int = typer.Option(256, "--n-predict", "-n", help="Decode steps after the ~1,300-token prompt."),
    threads: int = typer.Option(None, "--threads", "-t", help="CPU threads (default: usable cores)."),
    profile: str = typer.Option("a100-40g", "--profile", help="Hardware profile for the replay."),
    geometry: str = typer.Option("llama3-8b", "--geometry", help="What-if KV geometry for the replay (a preset or a GGUF)."),
    budget: str = typer.Option("25%", "--hbm-budget", help="HBM budget for the side-by-side comparison (share of the KV, or a size)."),
    repack: RepackOpt = None,
) -> None:
    """Trace Gemma 3 270M (from the `demo` extra) on a built-in workload and print every report."""
    from llamatier.cli.sweep_cmd import _print_tables
    from llamatier.cli.trace_cmd import run_with_progress
    from llamatier.demo import builtin_prompt, demo_model_path
    from llamatier.hardware import load_profile
    from llamatier.machine import usable_cores
    from llamatier.replay import ReplayOptions, compare
    from llamatier.replay.report import compare_renderables, print_renderables
    from llamatier.sweep import make_cells, parse_budgets, rows_frame, run_cells
    from llamatier.target import resolve_geometry
    from llamatier.trace import load_trace
    from llamatier.trace.summary import inspect_trace, render_inspection
    from llamatier.trace.tracer import TraceConfig, validate_config

    t0 = time.perf_counter()
    # Bad options fail now, not after the trace has run.
    prof = load_profile(profile)
    resolve_geometry(geometry)
    points = parse_budgets(budget)
    if len(points) != 1:
        raise LlamatierError(f"--hbm-budget {budget!r} gives {len(points)} budgets; the demo compares at one, e.g. 25%")
    (point,) = points
    model = demo_model_path()
    out = out or Path("llamatier-demo") / time.strftime("%Y%m%d-%H%M%S")
    cfg = TraceConfig(
        model_path=model, out_dir=out, prompt=builtin_prompt(), prompt_source="builtin:workload.txt",
        n_predict=n_predict, n_ctx=2048, n_batch=512,
        n_threads=threads if threads is not None else usable_cores(),
        command=f"llamatier demo --out {out}",
        engine_options={} if repack is None else {"repack": repack},
    )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LlamatierError(f"--out {out} exists and is not an empty directory; give a new directory for the demo trace")
    validate_config(cfg)
    console.rule("[bold]1. trace: Gemma 3 270M on llama.cpp, attention captured per KV block")
    summary = run_with_progress(cfg)
    console.print(f"trace: [bold]{summary.out_dir}[/] ({summary.n_steps} steps, decode {summary.decode_tok_per_s:.1f} tok/s)")

    console.rule("[bold]2. inspect: where the attention went")
    tr = load_trace(out)
    render_inspection(inspect_trace(tr), console)

    console.rule(f"[bold]3. sweep: p99 per-token latency vs HBM budget ({geometry} what-if on {profile})")
    cells = make_cells(out, policies=DEMO_POLICIES, budgets=parse_budgets(DEMO_BUDGETS), profiles=[profile],
                       geometry=geometry)
    df = rows_frame(run_cells(cells, jobs=1))
    _print_tables(df)

    console.rule(f"[bold]4. compare: policies side by side at an HBM budget of {budget}")
    options = ReplayOptions(target=resolve_geometry(geometry)).with_hbm_budget(point)  # % of this replay's peak KV
    comparison = compare(tr, prof, list(DEMO_POLICIES), options)
    print_renderables(console, compare_renderables(comparison.summary()))
    console.print(f"[dim]demo finished in {time.perf_counter() - t0:.0f} s; replay the trace yourself: "
                  f"llamatier compare {out} --geometry {geometry} --profile {profile}[/]")
