"""`llamatier profiles` (list) and `llamatier profiles show NAME`."""

from __future__ import annotations

import typer
from rich.table import Table

from llamatier.cli.app import app, cli_errors, console, print_json
from llamatier.hardware import Profile, list_profiles, load_profile
from llamatier.tiers import LINK_NAMES, TIER_NAMES
from llamatier.units import format_bytes, format_seconds

profiles_app = typer.Typer(
    help="List the hardware profiles, or show one (`llamatier profiles show a100-40g`).",
    no_args_is_help=False,
)
app.add_typer(profiles_app, name="profiles")


def _gb_s(bytes_per_s: float) -> str:
    v = bytes_per_s / 1e9
    return f"{v:,.0f} GB/s" if v >= 100 else f"{v:.3g} GB/s"


def _pj(j: float) -> str:
    v = j * 1e12
    return f"{v:,.0f} pJ" if v >= 100 else f"{v:.3g} pJ"


@profiles_app.callback(invoke_without_command=True)
@cli_errors
def profiles(
    ctx: typer.Context,
    json_out: bool = typer.Option(False, "--json", help="Print the list as JSON."),
) -> None:
    """List the built-in hardware profiles."""
    if ctx.invoked_subcommand is not None:
        return
    loaded = [load_profile(name) for name in list_profiles()]
    if json_out:
        print_json([p.to_dict() for p in loaded])
        return
    table = Table(title="Hardware profiles (llamatier profiles show NAME for sources)")
    table.add_column("name", no_wrap=True)
    for col in ("device", "HBM", "HBM read", "DRAM", "HBM<->DRAM link", "SSD read", "remote"):
        table.add_column(col, overflow="fold")
    for p in loaded:
        hbm, dram, link = p.tier("hbm"), p.tier("dram"), p.link("hbm_dram")
        table.add_row(
            p.name,
            p.compute.device,
            format_bytes(hbm.capacity_bytes) if hbm.capacity_bytes else "none",
            _gb_s(hbm.read_bytes_per_s) if hbm.capacity_bytes else "-",
            format_bytes(dram.capacity_bytes),
            f"{link.kind} {_gb_s(link.bytes_per_s)}" if hbm.capacity_bytes else "-",
            _gb_s(p.tier("ssd").read_bytes_per_s),
            _gb_s(p.tier("remote").read_bytes_per_s),
        )
    console.print(table)


@profiles_app.command("show")
@cli_errors
def show(
    name: str = typer.Argument(..., help="Built-in profile name or path to a profile TOML."),
    json_out: bool = typer.Option(False, "--json", help="Print the profile as JSON (SI units)."),
) -> None:
    """Show one profile: tiers, links, compute (and a calibrated host model if it has one)."""
    p = load_profile(name)
    if json_out:
        print_json(p.to_dict())
        return
    _print_profile(p)


def _print_profile(p: Profile) -> None:
    console.print(f"[bold]{p.name}[/]: {p.description}", highlight=False)
    console.print(f"source: {p.source} (each number's origin is in a comment there)", highlight=False)
    tiers = Table(title="tiers")
    tiers.add_column("tier", no_wrap=True)
    for col in ("capacity", "read", "write", "latency", "overhead/request", "energy/byte"):
        tiers.add_column(col)
    for tname in TIER_NAMES:
        t = p.tier(tname)
        tiers.add_row(
            tname,
            format_bytes(t.capacity_bytes),
            _gb_s(t.read_bytes_per_s),
            _gb_s(t.write_bytes_per_s),
            format_seconds(t.latency_s),
            format_seconds(t.transfer_overhead_s),
            _pj(t.energy_j_per_byte),
        )
    console.print(tiers)
    links = Table(title="links")
    for col in ("link", "kind", "bandwidth/dir", "latency", "overhead/transfer", "energy/byte"):
        links.add_column(col)
    for lname in LINK_NAMES:
        lk = p.link(lname)
        links.add_row(
            f"{lk.upper}<->{lk.lower}",
            lk.kind,
            _gb_s(lk.bytes_per_s),
            format_seconds(lk.latency_s),
            format_seconds(lk.transfer_overhead_s),
            _pj(lk.energy_j_per_byte),
        )
    console.print(links)
    c = p.compute
    comp = Table(title="compute", show_header=False)
    comp.add_column("field")
    comp.add_column("value")
    comp.add_row("device", c.device)
    comp.add_row("matmul peak", f"{c.matmul_flops_per_s / 1e12:,.4g} TFLOP/s x efficiency {c.matmul_efficiency:g}")
    comp.add_row("step overhead", format_seconds(c.step_overhead_s))
    comp.add_row("energy/MAC", _pj(c.energy_j_per_mac))
    comp.add_row("host attention", _gb_s(c.host_attention_bytes_per_s))
    comp.add_row("host round trip/layer", format_seconds(c.host_roundtrip_s))
    hm = c.host_model
    comp.add_row(
        "host model",
        "none (datasheet profile)"
        if hm is None
        else f"calibrated on {hm.model_name or 'unknown model'}: {len(hm.terms)} terms, fit median "
        f"{hm.fit_median_ape:.1%} / p95 {hm.fit_p95_ape:.1%} on {hm.fit_steps} steps",
    )
    console.print(comp)
