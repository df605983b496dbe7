"""`llamatier upgrade-trace`: give v1 traces (no checksums) the v2 records, after checking every value."""

from __future__ import annotations

from pathlib import Path

import typer

from llamatier.cli.app import app, cli_errors, console


@app.command("upgrade-trace")
@cli_errors
def upgrade_trace_cmd(
    traces: list[Path] = typer.Argument(..., metavar="TRACE...", help="v1 trace directories to upgrade in place."),
) -> None:
    """Upgrade v1 traces to format v2: check every value, then record per-chunk checksums in meta.json."""
    from llamatier.trace.upgrade import upgrade_trace

    for t in traces:
        n = upgrade_trace(t)
        what = f"upgraded to v2 ({n} chunks checked and recorded)" if n else "already v2"
        console.print(f"{t}: {what}", highlight=False, soft_wrap=True)
