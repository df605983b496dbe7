"""`llamatier replay TRACE --policy P` and `llamatier compare TRACE`: parse, call the library, print."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from llamatier.cli.app import app, cli_errors, console, print_json
from llamatier.cli.options import PolicyParamOpt, replay_options
from llamatier.errors import LlamatierError
from llamatier.registry import POLICIES
from llamatier.replay import DEFAULT_POLICIES, ReplayOptions

PROFILE_HELP = "Hardware profile: a built-in name (llamatier profiles) or a path to a profile TOML."


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


# Options replay and compare share beyond the replay options (those come from ReplayOptions).
TraceArg = Annotated[Path, typer.Argument(metavar="TRACE", help="Trace directory written by `llamatier trace`.")]
ProfileOpt = Annotated[str, typer.Option("--profile", help=PROFILE_HELP)]
QualityOpt = Annotated[Path | None, typer.Option("--quality", help="Quality file from `llamatier quality`: show measured accuracy beside the byte saving.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON (SI units).")]
PlotOpt = Annotated[Path | None, typer.Option("--plot", help="Draw per-step latency and tier occupancy to FILE.png or FILE.svg.")]
TimelineOpt = Annotated[Path | None, typer.Option("--timeline", help="Write the run(s) as Chrome/Perfetto trace-event JSON (ui.perfetto.dev).")]


@app.command()
@cli_errors
@replay_options()
def replay(
    trace: TraceArg,
    policy: str = typer.Option("adaptive", "--policy", "-p", help=f"Placement policy: {POLICIES.help_names()}."),
    profile: ProfileOpt = "a100-40g",
    policy_param: PolicyParamOpt = None,
    quality: QualityOpt = None,
    json_out: JsonOpt = False,
    plot: PlotOpt = None,
    timeline: TimelineOpt = None,
    *,
    options: ReplayOptions,
) -> None:
    """Replay a trace under one placement policy and report latency, bytes, tiers and energy."""
    from llamatier.replay import replay as run_replay
    from llamatier.replay import report

    options = _with_policy_params(options, policy_param, [policy])
    _check_report_paths(plot, timeline)
    tr, prof = _load(trace, profile)
    result = run_replay(tr, prof, policy, options)
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
@replay_options()
def compare(
    trace: TraceArg,
    policies: str = typer.Option(
        ",".join(DEFAULT_POLICIES), "--policies", help=f"Comma-separated policies to compare, of: {POLICIES.help_names()}."
    ),
    profile: ProfileOpt = "a100-40g",
    policy_param: PolicyParamOpt = None,
    quality: QualityOpt = None,
    json_out: JsonOpt = False,
    plot: PlotOpt = None,
    timeline: TimelineOpt = None,
    *,
    options: ReplayOptions,
) -> None:
    """Compare placement policies side by side on one trace, with ratios against llama.cpp's static placement."""
    from llamatier.replay import compare as run_compare
    from llamatier.replay import report

    names = [p.strip() for p in policies.split(",") if p.strip()]
    if not names:
        raise LlamatierError("--policies is empty: give a comma-separated list, e.g. static,adaptive")
    for n in names:
        POLICIES.get(n)  # fail fast on a typo, listing the valid names
    options = _with_policy_params(options, policy_param, names)
    _check_report_paths(plot, timeline)
    tr, prof = _load(trace, profile)
    comparison = run_compare(tr, prof, names, options)
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


def _with_policy_params(options: ReplayOptions, texts: list[str] | None, policies: list[str]) -> ReplayOptions:
    """``--policy-param`` values added to the options (checked against the policies' parameters)."""
    if not texts:
        return options
    from dataclasses import replace

    from llamatier.replay.options import parse_policy_params

    return replace(options, policy_params=parse_policy_params(texts, policies))
