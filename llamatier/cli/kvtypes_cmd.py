"""`llamatier kvtypes`: the KV cache types llama.cpp accepts, with exact storage figures."""

from __future__ import annotations

import typer
from rich.table import Table

from llamatier.cli.app import app, cli_errors, console, print_json
from llamatier.kvtypes import KV_TYPES


@app.command()
@cli_errors
def kvtypes(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List KV cache types (-ctk/-ctv) with ggml block layout and bytes saved against f16."""
    f16 = KV_TYPES["f16"]
    rows = [
        {
            "name": t.name,
            "ggml_type": t.ggml_id,
            "block_elements": t.block_elements,
            "block_bytes": t.block_bytes,
            "bits_per_element": t.bits_per_element,
            "saving_vs_f16": t.saving_vs(f16),
            "needs_flash_attn_as_v": t.quantized,
        }
        for t in KV_TYPES.values()
    ]
    if json_out:
        print_json(rows)
        return
    tab = Table(title="KV cache types (ggml block layouts)", title_justify="left")
    for col in ("type", "elements/block", "bytes/block", "bits/element", "vs f16", "as V cache"):
        tab.add_column(col, justify="left" if col == "type" else "right")
    for r in rows:
        tab.add_row(
            r["name"], str(r["block_elements"]), str(r["block_bytes"]), f"{r['bits_per_element']:.3f}",
            f"{(r['bits_per_element'] / 16 - 1) * 100:+.2f}%", "flash attn only" if r["needs_flash_attn_as_v"] else "any",
        )
    console.print(tab)
