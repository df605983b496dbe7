"""`llamatier sweep TRACE`: every profile x KV type x policy x HBM budget, in parallel, to one Parquet file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from llamatier.cli.app import app, cli_errors, console, err_console, print_json, release_at_exit
from llamatier.cli.options import replay_options
from llamatier.errors import LlamatierError
from llamatier.registry import EXECUTORS, POLICIES
from llamatier.replay import DEFAULT_POLICIES, ReplayOptions

if TYPE_CHECKING:
    import polars as pl

    from llamatier.sweep import SweepCell


@app.command()
@cli_errors
@replay_options(axes=False)
def sweep(
    trace: Path = typer.Argument(..., help="Trace directory written by `llamatier trace`."),
    policies: str = typer.Option(
        ",".join(DEFAULT_POLICIES), "--policies", help=f"Comma-separated placement policies, of: {POLICIES.help_names()}."
    ),
    hbm_budget: str = typer.Option(
        "10%..100%", "--hbm-budget",
        help="HBM budgets for KV: % of the trace's peak KV bytes or sizes; lists and ranges, e.g. 10%..100%, 1GiB,2GiB, auto.",
    ),
    steps: int = typer.Option(10, "--steps", help="Points per budget range A..B (ends included)."),
    kv_types: str = typer.Option(None, "--kv-types", help="Comma-separated GGUF KV types, K/V or one type (default: the trace's)."),
    profiles: str = typer.Option("a100-40g", "--profiles", help="Comma-separated hardware profiles (names or TOML paths)."),
    mode: str = typer.Option("lossless", "--mode", help="lossless (every visible block read) or sparse (--block-budget)."),
    block_budget: str = typer.Option(
        None, "--block-budget",
        help="Sparse mode: blocks read (kept) per layer per decode step; a list sweeps them, e.g. 4,8,16.",
    ),
    quality: Path = typer.Option(
        None, "--quality",
        help="Sparse mode: add the accuracy `llamatier quality --evict --out DIR` measured on this trace (DIR) to each "
        "policy and block budget; the table and plot become the latency-accuracy frontier.",
    ),
    policy_param: list[str] = typer.Option(
        None, "--policy-param",
        help="Policy parameter values to sweep, repeatable: POLICY.KEY=V1,V2,... or KEY=V1,V2 (every policy that "
        "takes KEY), e.g. adaptive.decay=0.5,0.8,0.95; each combination is a series of cells.",
    ),
    jobs: int = typer.Option(None, "--jobs", "-j", help="Worker processes (default: usable cores)."),
    executor: str = typer.Option(
        "processes", "--executor",
        help=f"Where the cells run: {EXECUTORS.help_names()}, local (= processes); dask:tcp://HOST:8786 uses a running Dask scheduler.",
    ),
    out: Path = typer.Option(Path("sweep.parquet"), "--out", "-o", help="Parquet file for the rows (one per cell)."),
    plot: Path = typer.Option(
        None, "--plot", help="Also draw p99 latency vs HBM budget (with --quality: vs measured KL) to FILE.png or FILE.svg."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the rows as JSON instead of tables."),
    force: bool = typer.Option(False, "--force", help="Replace an existing sweep result at --out."),
    *,
    options: ReplayOptions,
) -> None:
    """Replay every combination of profile, KV type, policy and HBM budget; write one Parquet row per cell."""
    from llamatier.replay.options import parse_policy_params
    from llamatier.sweep import (
        check_jobs,
        check_out_path,
        claim_out_file,
        make_cells,
        parse_block_budgets,
        parse_budgets,
        write_results,
    )
    from llamatier.sweep.executors import executor_spec

    check_out_path(out, overwrite=force)
    check_jobs(jobs)
    measured = None
    if quality is not None:
        from llamatier.quality import load_eviction_rows

        if mode != "sparse":
            raise LlamatierError("--quality adds measured eviction accuracy to sparse cells: add --mode sparse --block-budget N,...")
        measured = load_eviction_rows(quality)
    executor_spec(executor)  # a typo fails here, listing the valid names
    if plot is not None:
        from llamatier.plots import check_plot_path

        check_plot_path(plot)
    release_at_exit(claim_out_file(out, overwrite=force).release)  # a second sweep to this --out stops here
    pols = [p.strip() for p in policies.split(",") if p.strip()]
    params = parse_policy_params(policy_param, pols, lists=True) if policy_param else None
    cells = make_cells(
        trace, policies=pols, budgets=parse_budgets(hbm_budget, steps=steps), profiles=profiles,
        kv_types=kv_types, policy_params=params, options=options, mode=mode,
        block_budgets=parse_block_budgets(block_budget),
    )
    df = _run_with_progress(cells, executor, jobs, out)
    errors = df.filter(df["error"].is_not_null())
    if errors.height == df.height:
        raise LlamatierError(f"no sweep cell could be replayed: {errors['error'][0]}")
    if measured is not None:
        from llamatier.sweep import join_measured
        from llamatier.sweep.cells import cached_trace

        df = join_measured(df, measured, cached_trace(str(trace)))
    write_results(df, out)
    if plot is not None:
        from llamatier.plots import plot_frontier, plot_sweep, save_figure

        save_figure(plot_frontier(df) if measured is not None else plot_sweep(df), plot)
    _report(df, errors, out, plot, frontier=measured is not None, json_out=json_out)


def _run_with_progress(cells: list[SweepCell], executor: str, jobs: int | None, out: Path) -> pl.DataFrame:
    """Run the cells under a progress bar; on Ctrl-C or a failed pool, keep the finished rows in ``out``."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from llamatier.sweep import SweepInterrupted, rows_frame, run_cells, write_results

    with Progress(
        TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(), TextColumn("cells"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=True,
        disable=not err_console.is_terminal,
    ) as bar:
        task = bar.add_task("sweep", total=len(cells))
        try:
            rows = run_cells(cells, executor=executor, jobs=jobs, progress=lambda done, total: bar.update(task, completed=done, total=total))
        except SweepInterrupted as exc:
            kept = f"the {len(exc.rows)} finished rows are in {write_results(rows_frame(exc.rows), out)}" if exc.rows else "no cell had finished"
            raise LlamatierError(f"{exc}: {kept}; run the sweep again for the rest", exit_code=130) from None
    return rows_frame(rows)


def _report(df: pl.DataFrame, errors: pl.DataFrame, out: Path, plot: Path | None, *, frontier: bool, json_out: bool) -> None:
    """Warn about cells that failed, then print the rows (JSON, or tables: the frontier with measured accuracy)."""
    if errors.height:
        err_console.print(
            f"[yellow]warning:[/] {errors.height} of {df.height} cells could not be replayed "
            f"(see the error column), e.g. {errors['profile'][0]}: {errors['error'][0]}",
            highlight=False, soft_wrap=True,
        )
    if json_out:
        print_json({"out": str(out), "plot": str(plot) if plot else None, "rows": df.to_dicts()})
        return
    if frontier:
        _print_frontier(df)
    else:
        _print_tables(df)
    for note in df["notes"].drop_nulls().unique(maintain_order=True):
        console.print(f"[dim]note: {note}[/]", highlight=False, soft_wrap=True)
    console.print(f"[green]wrote[/] {df.height} rows to [bold]{out}[/]" + (f"; plot [bold]{plot}[/]" if plot else ""))


def _print_tables(df: pl.DataFrame) -> None:
    from rich.table import Table

    from llamatier.sweep import facet_tables
    from llamatier.units import format_bytes

    for t in facet_tables(df, metric="p99_s"):
        console.print(f"[bold]{t['profile']}, KV {t['kv_type']}[/]: p99 per-token latency (ms)", highlight=False)
        table = Table()
        table.add_column("HBM budget")
        table.add_column("bytes", justify="right")
        for p in t["policies"]:
            table.add_column(p, justify="right")
        for label, nbytes, cells in t["rows"]:
            shown = [
                "" if v is None else f"[red]{v}[/]" if isinstance(v, str) else f"{v * 1e3:.3f}" for v in cells
            ]
            table.add_row(label, format_bytes(nbytes) if nbytes is not None else "", *shown)
        console.print(table)


def _print_frontier(df: pl.DataFrame) -> None:
    import polars as pl
    from rich.table import Table

    from llamatier.sweep import frontier_table

    ft = frontier_table(df)
    unmeasured = pl.col("measured_mean_kl").is_null() & pl.col("error").is_null()
    missing = df.filter(unmeasured).select("policy", "block_budget").unique().rows()
    for (prof, kv, hbm), g in ft.group_by(["profile", "kv_type", "hbm_budget"], maintain_order=True):
        console.print(
            f"[bold]{prof}, KV {kv}, HBM budget {hbm}[/]: modelled p99 latency beside accuracy measured in llama.cpp",
            highlight=False,
        )
        table = Table()
        for col in ("policy", "blocks kept", "p99 (ms)", "mass dropped", "mean KL", "p99 KL", "top-1", "ΔPPL"):
            table.add_column(col, justify="left" if col == "policy" else "right")
        for r in g.iter_rows(named=True):
            table.add_row(
                r["policy"], str(r["block_budget"]), f"{r['p99_s'] * 1e3:.3f}", f"{r['dropped_mass_mean']:.3f}",
                f"{r['measured_mean_kl']:.3g}", f"{r['measured_p99_kl']:.3g}", f"{100 * r['measured_top1']:.1f}%",
                f"{r['measured_ppl_change_pct']:+.1f}%",
            )
        console.print(table)
    if missing:
        shown = ", ".join(f"{p} k={b}" for p, b in sorted(missing)[:6])
        err_console.print(f"[yellow]note:[/] no measured accuracy for {len(missing)} cells ({shown}); "
                          "measure them with `llamatier quality --evict`", highlight=False, soft_wrap=True)
