"""`llamatier quality MODEL --kv-types f16,q8_0,q4_0/f16`: accuracy cost of KV cache types."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from llamatier.cli.app import RepackOpt, app, cli_errors, console, err_console, print_json

DEFAULT_KV_TYPES = "f16,q8_0,q5_0,q4_0,iq4_nl"


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover
        return max(1, os.cpu_count() or 1)


@app.command()
@cli_errors
def quality(
    model: Path = typer.Argument(..., help="GGUF model file."),
    kv_types: str = typer.Option(
        DEFAULT_KV_TYPES,
        "--kv-types",
        "-k",
        help="Comma-separated KV types, each for both K and V (q8_0) or a K/V pair (q8_0/f16).",
    ),
    text_file: Path = typer.Option(None, "--text-file", help="UTF-8 text to evaluate (default: built-in ~1,100-token text)."),
    ctx: int = typer.Option(None, "--ctx", "-c", help="Evaluate at most this many tokens of the text (default: all)."),
    batch: int = typer.Option(64, "--batch", "-b", help="Tokens per llama_decode (n_batch = n_ubatch)."),
    threads: int = typer.Option(None, "--threads", "-t", help="CPU threads (default: usable cores)."),
    flash_attn: bool = typer.Option(
        True,
        "--flash-attn/--no-flash-attn",
        help="Flash attention for every run, the f16/f16 reference included (quantized V needs it).",
    ),
    reference_flash_attn: bool = typer.Option(
        None,
        "--reference-flash-attn/--no-reference-flash-attn",
        help="Flash attention for the f16/f16 reference only (default: same as the runs under test).",
    ),
    out: Path = typer.Option(None, "--out", "-o", help="Directory for quality.json + quality.parquet (+ per-position Parquet)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    repack: RepackOpt = None,
) -> None:
    """Measure what each KV cache type costs in accuracy against f16/f16 (teacher-forced, real llama.cpp)."""
    from llamatier.quality import (
        measure_quality,
        parse_kv_pairs,
        read_text_file,
        result_to_dict,
        save_quality,
    )

    pairs = parse_kv_pairs(kv_types)  # bad names fail here, before the model loads
    text = read_text_file(text_file) if text_file is not None else None
    if out is not None:
        from llamatier.outpaths import make_output_dir

        make_output_dir(out, "--out")  # a bad --out fails now, not after the runs
    with Progress(
        TextColumn("teacher-forced runs"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    ) as bar:
        task = bar.add_task("quality", total=None)
        result = measure_quality(
            model,
            pairs,
            text=text,
            text_source=f"file:{text_file}" if text_file is not None else None,
            ctx=ctx,
            batch_tokens=batch,
            n_threads=threads if threads is not None else _default_threads(),
            flash_attn=flash_attn,
            reference_flash_attn=reference_flash_attn,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            repack=repack,
        )
    written = save_quality(result, out) if out is not None else []
    if json_out:
        doc = result_to_dict(result)
        doc["files"] = [str(p) for p in written]
        print_json(doc)
        return
    fa = "on" if result.flash_attn else "off"
    if result.reference_flash_attn != result.flash_attn:
        fa += f" (reference: {'on' if result.reference_flash_attn else 'off'})"
    else:
        fa += " for every run"
    console.print(
        f"[bold]{result.model}[/] ({result.model_file}): {result.n_tokens} tokens of {result.text_source}, "
        f"{result.n_positions} scored positions, flash attention {fa}, threads {result.n_threads}; "
        f"reference {result.reference} perplexity {result.ppl_ref:.4g}",
        highlight=False,
    )
    table = Table(title="KV cache type vs f16/f16 (KL(ref || test) per position, nats)", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("K/V", "bits", "saved", "mean KL", "p99 KL", "top-1", "PPL", "ΔPPL"):
        table.add_column(col, justify="left" if col == "K/V" else "right", no_wrap=True)
    for r in result.rows:
        table.add_row(
            r.pair,
            f"{r.bits_per_element:.4g}",
            f"{100 * r.saving_vs_f16:.2f}%",
            f"{r.mean_kl:.3g}",
            f"{r.p99_kl:.3g}",
            f"{100 * r.top1_agreement:.2f}%",
            f"{r.ppl:.4g}",
            f"{r.ppl_change_pct:+.2f}%",
        )
    console.print(table)
    for p in written:
        console.print(f"wrote {p}", highlight=False)
