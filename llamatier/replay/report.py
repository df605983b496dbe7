"""Render replay summaries: rich tables for people, plain dicts for JSON.

Everything here takes the dicts :meth:`ReplayResult.summary` and
:meth:`Comparison.summary` produce (SI units), so other commands (sweeps,
serving studies) can reuse the same tables. Human units appear only here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from llamatier.kvtypes import kv_type
from llamatier.tiers import LINK_NAMES, TIER_NAMES
from llamatier.units import format_bytes, format_seconds


def _num(x: Any) -> float | None:
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def fmt_s(x: Any) -> str:
    v = _num(x)
    return "-" if v is None else format_seconds(v)


def fmt_bytes(x: Any) -> str:
    v = _num(x)
    return "-" if v is None else format_bytes(v)


def fmt_j(x: Any) -> str:
    v = _num(x)
    if v is None:
        return "-"
    if v == 0:
        return "0 J"
    for unit, scale in (("J", 1.0), ("mJ", 1e-3), ("uJ", 1e-6), ("nJ", 1e-9)):
        if abs(v) >= scale or unit == "nJ":
            return f"{v / scale:.3g} {unit}"
    return f"{v:.3g} J"  # pragma: no cover


def fmt_ratio(x: Any) -> str:
    v = _num(x)
    return "" if v is None else f"x{v:.2f}"


def fmt_count(x: Any) -> str:
    v = _num(x)
    return "-" if v is None else f"{v:,.0f}"


def title_line(s: dict[str, Any]) -> str:
    """One line naming what was replayed."""
    what = f"{s['model']} (what-if)" if s.get("what_if") else s["model"]
    mode = s["mode"] if s["mode"] == "lossless" else f"sparse, {s['block_budget']} blocks/layer"
    return f"{s['trace']} on {s['profile']}: {what}, KV {s['kv_type']}, {mode}, {s['block_tokens']}-token blocks"


def quality_text(quality: dict[str, Any] | None, kv: str, source: str | None) -> str | None:
    """Byte saving of the K/V pair beside its measured accuracy (if a quality file has it)."""
    k, _, v = kv.partition("/")
    tk, tv = kv_type(k), kv_type(v or k)
    f16 = kv_type("f16")
    saving = 1.0 - (tk.bits_per_element + tv.bits_per_element) / (2 * f16.bits_per_element)
    head = f"KV {tk.name}/{tv.name}: {saving * 100:.1f}% fewer bytes than f16/f16"
    if source is None:
        return head if saving else None
    if quality is None:
        return f"{head}; {source} has no measurement for this pair (run `llamatier quality` with it)"
    parts = []
    for key, label, fmt in (
        ("mean_kl", "mean KL", "{:.4g}"),
        ("p99_kl", "p99 KL", "{:.4g}"),
        ("top1_agreement", "top-1 agreement", "{:.1%}"),
        ("ppl_change_pct", "PPL change", "{:+.2f}%"),
    ):
        if _num(quality.get(key)) is not None:
            parts.append(f"{label} {fmt.format(float(quality[key]))}")
    model = f" on {quality['model']}" if quality.get("model") else ""
    return f"{head}; measured{model}: " + ", ".join(parts)


def replay_renderables(s: dict[str, Any], *, quality_line: str | None = None) -> list[RenderableType]:
    """Tables and lines for one replay summary."""
    out: list[RenderableType] = [Text(f"{s['policy']}{' (bound)' if s.get('bound') else ''}: {title_line(s)}", style="bold")]
    out.append(Text(("" if s["runs"] else "DOES NOT RUN: ") + s["verdict"]))
    for n in s.get("notes", []):
        out.append(Text(f"note: {n}", style="dim"))
    if quality_line:
        out.append(Text(quality_line))
    if not s["runs"]:
        return out
    lat = s["latency"]
    t = Table(title="per-token latency (decode)")
    for col in ("p50", "p90", "p99", "max", "time to first token", "tok/s", "decode steps"):
        t.add_column(col, justify="right")
    t.add_row(
        fmt_s(lat["p50_s"]), fmt_s(lat["p90_s"]), fmt_s(lat["p99_s"]), fmt_s(lat["max_s"]), fmt_s(lat["ttft_s"]),
        f"{lat['tok_per_s']:.1f}" if _num(lat["tok_per_s"]) else "-", str(lat["decode_steps"]),
    )
    out.append(t)
    split = s["decode_time_split_s"]
    total = sum(split.values()) or 1.0
    parts = ", ".join(f"{k} {v / total:.0%}" for k, v in split.items() if v > 0)
    out.append(Text("decode time: " + (parts or "no decode steps"), style="dim"))
    tiers = Table(title="tiers")
    for col in ("tier", "KV budget", "peak occupancy", "read", "written", "KV energy"):
        tiers.add_column(col, justify="right" if col != "tier" else "left")
    for name in TIER_NAMES:
        tiers.add_row(
            name, fmt_bytes(s["budget_bytes"][name]), fmt_bytes(s["peak_occupancy_bytes"][name]),
            fmt_bytes(s["bytes_read"][name]), fmt_bytes(s["bytes_written"][name]), fmt_j(s["energy_j"]["kv"][name]),
        )
    out.append(tiers)
    links = Table(title="links")
    for col in ("link", "up", "down"):
        links.add_column(col, justify="right" if col != "link" else "left")
    for name in LINK_NAMES:
        b = s["bytes_per_link"][name]
        links.add_row(name, fmt_bytes(b["up"]), fmt_bytes(b["down"]))
    out.append(links)
    mig = s["migrations"]
    pairs = ", ".join(f"{k} {v:,.0f}" for k, v in mig["by_pair_blocks"].items())
    out.append(Text(f"migrations: {fmt_count(mig['blocks'])} blocks ({fmt_bytes(mig['bytes'])})" + (f": {pairs}" if pairs else "")))
    dm = s["attention_mass_dropped"]
    out.append(Text(
        f"attention mass dropped: mean {dm['mean']:.4f} per step and layer, p99 step {dm['p99_step']:.4f}, "
        f"worst layer-step {dm['max_layer_step']:.4f}"
    ))
    e = s["energy_j"]
    out.append(Text(
        f"energy: {fmt_j(e['total'])} total, {fmt_j(e['per_decode_token'])} per decode token "
        f"(weights {fmt_j(e['weights'])}, KV {fmt_j(sum(e['kv'].values()))}, transfers {fmt_j(e['transfers'])}, "
        f"compute {fmt_j(e['compute'])})"
    ))
    out.append(Text(_footer(s), style="dim"))
    return out


def _footer(s: dict[str, Any]) -> str:
    d, r = s["policy_decision"], s["replay"]
    rate = _num(r["block_accesses_per_s"])
    return (
        f"policy decision time {fmt_s(d['total_s'])} ({fmt_s(d['per_step_s'])} per step); replay "
        f"{fmt_s(r['wall_s'])} for {r['block_accesses']:,} block reads"
        + (f" ({rate / 1e6:.1f}M/s, {r['engine']} engine)" if rate else "")
    )


_COMPARE_ROWS: tuple[tuple[str, tuple[str, ...], Any, str | None], ...] = (
    ("p50 per token", ("latency", "p50_s"), fmt_s, "p50"),
    ("p90 per token", ("latency", "p90_s"), fmt_s, None),
    ("p99 per token", ("latency", "p99_s"), fmt_s, "p99"),
    ("max per token", ("latency", "max_s"), fmt_s, None),
    ("time to first token", ("latency", "ttft_s"), fmt_s, "ttft"),
    ("tok/s", ("latency", "tok_per_s"), lambda v: f"{v:.1f}" if _num(v) else "-", "tok_per_s"),
    ("peak HBM", ("peak_occupancy_bytes", "hbm"), fmt_bytes, None),
    ("peak DRAM", ("peak_occupancy_bytes", "dram"), fmt_bytes, None),
    ("peak SSD", ("peak_occupancy_bytes", "ssd"), fmt_bytes, None),
    ("read from HBM", ("bytes_read", "hbm"), fmt_bytes, None),
    ("read below HBM", None, fmt_bytes, None),
    ("hbm<->dram link", ("bytes_per_link", "hbm_dram", "total"), fmt_bytes, None),
    ("migrations (blocks)", ("migrations", "blocks"), fmt_count, None),
    ("mass dropped (mean)", ("attention_mass_dropped", "mean"), lambda v: f"{v:.4f}", None),
    ("energy / token", ("energy_j", "per_decode_token"), fmt_j, "energy_per_token"),
    ("decision time / step", ("policy_decision", "per_step_s"), fmt_s, None),
)


def _get(d: dict[str, Any], path: Sequence[str]) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def compare_table(c: dict[str, Any]) -> Table:
    """Policies side by side; ratios against the baseline (static) where both run."""
    pols = c["policies"]
    base = c.get("baseline")
    t = Table(title=title_line(pols[0]) if pols else "compare")
    t.add_column("", no_wrap=True)
    for s in pols:
        t.add_column(s["policy"] + (" (bound)" if s.get("bound") else ""), justify="right")
    t.add_row("verdict", *[("runs" if s["runs"] else "does not run") for s in pols])
    for label, path, fmt, ratio_key in _COMPARE_ROWS:
        cells = []
        for s in pols:
            if not s["runs"]:
                cells.append("-")
                continue
            v = sum(_get(s, ("bytes_read", n)) or 0.0 for n in TIER_NAMES[1:]) if path is None else _get(s, path)
            cell = fmt(v) if _num(v) is not None else "-"
            if ratio_key and base and s["policy"] != base and s.get("vs_baseline"):
                ratio = fmt_ratio(s["vs_baseline"].get(ratio_key))
                if ratio:
                    cell += f" ({ratio})"
            cells.append(cell)
        t.add_row(label, *cells)
    return t


def compare_renderables(c: dict[str, Any], *, quality_line: str | None = None) -> list[RenderableType]:
    out: list[RenderableType] = [compare_table(c)]
    for s in c["policies"]:
        out.append(Text(f"{s['policy']}: {s['verdict']}", style="dim"))
    notes = sorted({n for s in c["policies"] for n in s.get("notes", [])})
    out += [Text(f"note: {n}", style="dim") for n in notes]
    if quality_line:
        out.append(Text(quality_line))
    if c.get("baseline"):
        out.append(Text(f"(xN) = ratio against {c['baseline']}; the oracle is a bound, not a runnable policy", style="dim"))
    return out


def print_renderables(console: Console, items: list[RenderableType]) -> None:
    console.print(Group(*items), highlight=False)
