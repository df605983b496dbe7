"""`llamatier serve-replay WORKLOAD`: play a serving workload under serving-level KV policies.

Named serve-replay, not serve: it replays traces as requests through the cost
model (like `llamatier replay`), it does not start a server (as `vllm serve`
and `llama-server` do).
"""

from __future__ import annotations

from pathlib import Path

import typer

from llamatier.cli.app import app, cli_errors, console, print_json
from llamatier.registry import SERVING_POLICIES
from llamatier.serving import (
    DEFAULT_SERVING_POLICIES,
    build_context,
    find_max_users,
    load_workload,
    serve,
)
from llamatier.serving.plan import check_run_fits
from llamatier.serving.report import capacity_table, results_table
from llamatier.serving.workload import check_overrides
from llamatier.units import format_bytes


@app.command("serve-replay")
@cli_errors
def serve_replay(
    workload: Path = typer.Argument(..., help="Workload TOML (see docs/serving.md and examples/workloads/)."),
    policy: list[str] = typer.Option(
        list(DEFAULT_SERVING_POLICIES), "--policy", "-p",
        help=f"Serving policy (repeat for several): {SERVING_POLICIES.help_names()}.",
    ),
    profile: str = typer.Option(None, "--profile", help="Hardware profile (overrides the workload's)."),
    users: int = typer.Option(None, "--users", help="Concurrent users (overrides users.count)."),
    seed: int = typer.Option(None, "--seed", help="Random seed (overrides workload.seed)."),
    slo_tpot_ms: float = typer.Option(
        None, "--slo-tpot-ms", help="p99 TPOT target: search the largest user count meeting it, per policy."
    ),
    slo_ttft_ms: float = typer.Option(None, "--slo-ttft-ms", help="Also require p99 TTFT <= this in the search."),
    max_users: int = typer.Option(1024, "--max-users", help="Upper bound of the user-count search."),
    json_out: bool = typer.Option(False, "--json", help="Print the summaries as JSON."),
) -> None:
    """Replay a serving workload (users, multi-turn sessions, shared prefix) through the four tiers."""
    check_overrides(users=users, seed=seed, slo_tpot_ms=slo_tpot_ms, slo_ttft_ms=slo_ttft_ms, max_users=max_users)
    spec = load_workload(workload)
    if profile:
        spec = spec.with_overrides(profile=profile)
    if seed is not None:
        spec = spec.with_overrides(seed=seed)
    if users is not None:
        spec = spec.with_users(users)
    tpot = slo_tpot_ms / 1e3 if slo_tpot_ms is not None else None
    ttft = slo_ttft_ms / 1e3 if slo_ttft_ms is not None else None
    spec = spec.with_overrides(slo_tpot_s=tpot, slo_ttft_s=ttft)
    ctx = build_context(spec)
    if tpot is not None:
        if spec.closed_loop:  # the search's largest trial, one policy at a time
            check_run_fits(spec.with_users(max_users), list(ctx.shapes))
        found = [
            find_max_users(spec, p, slo_tpot_s=tpot, slo_ttft_s=ttft, max_search=max_users, context=ctx).summary()
            for p in policy
        ]
        if json_out:
            print_json({"workload": spec.name, "profile": ctx.profile.name, "search": found})
            return
        slo = f"p99 TPOT <= {slo_tpot_ms:g} ms" + (f", p99 TTFT <= {slo_ttft_ms:g} ms" if ttft else "")
        console.print(capacity_table(found, title=f"{spec.name} on {ctx.profile.name} ({ctx.target.label}): users within {slo}"))
        return
    check_run_fits(spec, list(ctx.shapes), runs=len(policy))  # every policy's run is kept until printed
    results = [serve(spec, p, context=ctx) for p in policy]
    sums = [r.summary() for r in results]
    if json_out:
        print_json({"workload": spec.name, "profile": ctx.profile.name, "results": sums})
        return
    who = f"{spec.users} users" if spec.closed_loop else f"{spec.arrival_rate_per_s:g} sessions/s"
    console.print(results_table(sums, title=f"{spec.name}: {who} on {ctx.profile.name}, {ctx.target.label}, KV {results[0].kv_type}"))
    budgets = ", ".join(f"{t} {format_bytes(b)}" for t, b in sums[0]["budget_bytes"].items())
    console.print(f"KV budgets: {budgets}", highlight=False)
    for s in sums:
        console.print(f"[bold]{s['policy']}[/]: {s['verdict']}", highlight=False)
    for note in dict.fromkeys(n for s in sums for n in s["notes"]):
        console.print(f"note: {note}", highlight=False)
