"""`llamatier replay TRACE --policy P` and `llamatier compare TRACE`: parse, call the library, print."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from llamatier.cli.app import app, cli_errors, console, print_json
from llamatier.errors import LlamatierError
from llamatier.registry import POLICIES
from llamatier.replay import DEFAULT_POLICIES

PROFILE_HELP = "Hardware profile: a built-in name (llamatier profiles) or a path to a profile TOML."
GEOMETRY_HELP = (
    "What-if model: a geometry preset (llama2-7b, llama3-8b, mistral-7b, qwen2.5-7b, llama3-70b, gemma3-27b) "
    "or a .gguf whose header gives layers, KV heads and head dims."
)


def _options(
    *,
    hbm_budget: str | None,
    dram_budget: str | None,
    kv_type: str | None,
    geometry: str | None,
    block_tokens: int | None,
    mode: str,
    block_budget: int | None,
    static_mode: str,
    dram_reads: str,
    prefetch: bool,
    swa_full: bool,
) -> Any:
    from llamatier.replay import ReplayOptions
    from llamatier.target import resolve_geometry
    from llamatier.units import parse_size_bytes

    return ReplayOptions(
        mode=mode,
        block_budget=block_budget,
        hbm_budget_bytes=parse_size_bytes(hbm_budget, what="--hbm-budget") if hbm_budget is not None else None,
        dram_budget_bytes=parse_size_bytes(dram_budget, what="--dram-budget") if dram_budget is not None else None,
        kv_type=kv_type,
        target=resolve_geometry(geometry) if geometry else None,
        block_tokens=block_tokens,
        static_mode=static_mode,
        dram_reads=dram_reads,
        prefetch=prefetch,
        swa_full=swa_full,
    )


def _quality(path: Path | None, kv: str) -> tuple[dict | None, str | None]:
    """Look up the measured accuracy of the K/V pair in a file written by `llamatier quality`, if asked."""
    if path is None:
        return None, None
    if not path.exists():
        raise LlamatierError(f"--quality file not found: {path} (write one with `llamatier quality MODEL --out FILE`)")
    try:
        from llamatier.quality import lookup_quality
    except ImportError:
        raise LlamatierError("--quality needs llamatier.quality, which this installation lacks") from None
    k, _, v = kv.partition("/")
    return lookup_quality(path, k, v or k), str(path)


def _load(trace: Path, profile: str) -> tuple[Any, Any]:
    from llamatier.hardware import load_profile
    from llamatier.trace import load_trace

    return load_trace(trace), load_profile(profile)


def _check_report_paths(plot: Path | None, timeline: Path | None) -> None:
    """Fail on a bad --plot / --timeline before the replay runs, not after."""
    if plot is not None:
        from llamatier.plots import check_plot_path

        check_plot_path(plot)
    if timeline is not None:
        from llamatier.outpaths import check_output_file

        check_output_file(timeline, "--timeline", "run.json")


def _write_reports(what: Any, *, plot: Path | None, timeline: Path | None) -> None:
    """--plot / --timeline: figures and trace-event JSON from llamatier.plots / llamatier.timeline."""
    if plot is not None:
        from llamatier.plots import plot_replay, save_figure

        save_figure(plot_replay(what), plot)
    if timeline is not None:
        from llamatier.timeline import write_timeline

        write_timeline(what, timeline)


# Shared option declarations: one Annotated alias per option, used by replay and compare.
TraceArg = Annotated[Path, typer.Argument(metavar="TRACE", help="Trace directory written by `llamatier trace`.")]
ProfileOpt = Annotated[str, typer.Option("--profile", help=PROFILE_HELP)]
HbmBudgetOpt = Annotated[str | None, typer.Option("--hbm-budget", help="KV bytes allowed in HBM, e.g. 2GiB (default: HBM minus weights).")]
DramBudgetOpt = Annotated[str | None, typer.Option("--dram-budget", help="KV bytes allowed in DRAM, e.g. 64GiB (default: DRAM capacity).")]
KvTypeOpt = Annotated[str | None, typer.Option("--kv-type", help="Re-cost with GGUF KV types: K/V (q8_0/f16) or one type (q4_0).")]
GeometryOpt = Annotated[str | None, typer.Option("--geometry", help=GEOMETRY_HELP)]
BlockTokensOpt = Annotated[int | None, typer.Option("--block-tokens", help="Re-aggregate to coarser blocks (a multiple of the trace's).")]
ModeOpt = Annotated[str, typer.Option("--mode", help="lossless (every visible block read) or sparse (--block-budget).")]
BlockBudgetOpt = Annotated[int | None, typer.Option("--block-budget", help="Sparse mode: blocks read per layer per decode step.")]
StaticModeOpt = Annotated[str, typer.Option("--static-mode", help="static when KV does not fit HBM: nkvo (all on host) or layers (-ngl split).")]
DramReadsOpt = Annotated[str, typer.Option("--dram-reads", help="adaptive/oracle: DRAM KV attended on the host, fetched, or auto per layer.")]
PrefetchOpt = Annotated[bool, typer.Option("--prefetch/--no-prefetch", help="adaptive: migrations may hide in idle link time during compute.")]
SwaFullOpt = Annotated[bool, typer.Option("--swa-full", help="Keep every cell of sliding-window layers (llama.cpp --swa-full).")]
QualityOpt = Annotated[Path | None, typer.Option("--quality", help="Quality file from `llamatier quality`: show measured accuracy beside the byte saving.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON (SI units).")]
PlotOpt = Annotated[Path | None, typer.Option("--plot", help="Draw per-step latency and tier occupancy to FILE.png or FILE.svg.")]
TimelineOpt = Annotated[Path | None, typer.Option("--timeline", help="Write the run(s) as Chrome/Perfetto trace-event JSON (ui.perfetto.dev).")]


@app.command()
@cli_errors
def replay(
    trace: TraceArg,
    policy: str = typer.Option("adaptive", "--policy", "-p", help=f"Placement policy: {POLICIES.help_names()}."),
    profile: ProfileOpt = "a100-40g",
    hbm_budget: HbmBudgetOpt = None,
    dram_budget: DramBudgetOpt = None,
    kv_type: KvTypeOpt = None,
    geometry: GeometryOpt = None,
    block_tokens: BlockTokensOpt = None,
    mode: ModeOpt = "lossless",
    block_budget: BlockBudgetOpt = None,
    static_mode: StaticModeOpt = "nkvo",
    dram_reads: DramReadsOpt = "auto",
    prefetch: PrefetchOpt = False,
    swa_full: SwaFullOpt = False,
    quality: QualityOpt = None,
    json_out: JsonOpt = False,
    plot: PlotOpt = None,
    timeline: TimelineOpt = None,
) -> None:
    """Replay a trace under one placement policy and report latency, bytes, tiers and energy."""
    from llamatier.replay import replay as run_replay
    from llamatier.replay import report

    opts = _options(hbm_budget=hbm_budget, dram_budget=dram_budget, kv_type=kv_type, geometry=geometry,
                    block_tokens=block_tokens, mode=mode, block_budget=block_budget, static_mode=static_mode,
                    dram_reads=dram_reads, prefetch=prefetch, swa_full=swa_full)
    _check_report_paths(plot, timeline)
    tr, prof = _load(trace, profile)
    result = run_replay(tr, prof, policy, opts)
    summary = result.summary()
    _write_reports(result, plot=plot, timeline=timeline)
    q, qsrc = _quality(quality, summary["kv_type"])
    if json_out:
        summary["quality"] = q
        print_json(summary)
        return
    report.print_renderables(
        console, report.replay_renderables(summary, quality_line=report.quality_text(q, summary["kv_type"], qsrc))
    )


@app.command()
@cli_errors
def compare(
    trace: TraceArg,
    policies: str = typer.Option(
        ",".join(DEFAULT_POLICIES), "--policies", help=f"Comma-separated policies to compare, of: {POLICIES.help_names()}."
    ),
    profile: ProfileOpt = "a100-40g",
    hbm_budget: HbmBudgetOpt = None,
    dram_budget: DramBudgetOpt = None,
    kv_type: KvTypeOpt = None,
    geometry: GeometryOpt = None,
    block_tokens: BlockTokensOpt = None,
    mode: ModeOpt = "lossless",
    block_budget: BlockBudgetOpt = None,
    static_mode: StaticModeOpt = "nkvo",
    dram_reads: DramReadsOpt = "auto",
    prefetch: PrefetchOpt = False,
    swa_full: SwaFullOpt = False,
    quality: QualityOpt = None,
    json_out: JsonOpt = False,
    plot: PlotOpt = None,
    timeline: TimelineOpt = None,
) -> None:
    """Compare placement policies side by side on one trace, with ratios against llama.cpp's static placement."""
    from llamatier.replay import compare as run_compare
    from llamatier.replay import report

    names = [p.strip() for p in policies.split(",") if p.strip()]
    if not names:
        raise LlamatierError("--policies is empty: give a comma-separated list, e.g. static,adaptive")
    from llamatier.policies import get_policy

    for n in names:
        get_policy(n)  # fail fast on a typo, listing the valid names
    opts = _options(hbm_budget=hbm_budget, dram_budget=dram_budget, kv_type=kv_type, geometry=geometry,
                    block_tokens=block_tokens, mode=mode, block_budget=block_budget, static_mode=static_mode,
                    dram_reads=dram_reads, prefetch=prefetch, swa_full=swa_full)
    _check_report_paths(plot, timeline)
    tr, prof = _load(trace, profile)
    comparison = run_compare(tr, prof, names, opts)
    summary = comparison.summary()
    _write_reports(comparison, plot=plot, timeline=timeline)
    kv = summary["policies"][0]["kv_type"]
    q, qsrc = _quality(quality, kv)
    if json_out:
        summary["quality"] = q
        print_json(summary)
        return
    report.print_renderables(
        console, report.compare_renderables(summary, quality_line=report.quality_text(q, kv, qsrc))
    )
