"""`llamatier quality MODEL --kv-types f16,q8_0,q4_0/f16`: accuracy cost of KV cache types;
`llamatier quality MODEL --trace TRACE --evict h2o,streaming --keep 8,16`: accuracy cost of dropping KV blocks."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from llamatier.cli.app import RepackOpt, app, cli_errors, console, err_console, print_json
from llamatier.errors import LlamatierError
from llamatier.policies import layer_uniform_policies

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
        None,
        "--kv-types",
        "-k",
        help=f"Comma-separated KV types, each for both K and V (q8_0) or a K/V pair (q8_0/f16) [default: {DEFAULT_KV_TYPES}].",
    ),
    evict: str = typer.Option(
        None, "--evict",
        help=f"Measure KV eviction instead: comma-separated layer-uniform policies ({', '.join(layer_uniform_policies())}).",
    ),
    keep: str = typer.Option(None, "--keep", help="With --evict: block budgets, blocks kept per layer, e.g. 4,8,16,32."),
    trace: Path = typer.Option(None, "--trace", help="With --evict: the trace whose tokens are read and whose attention decides."),
    prompt_file: Path = typer.Option(
        None, "--prompt-file", help="With --evict: the trace's prompt text when the trace cannot find it (checked by sha256)."
    ),
    steps: int = typer.Option(None, "--steps", help="With --evict: score only the first N decode steps (default: all)."),
    mechanism: str = typer.Option(
        "view", "--mechanism",
        help="With --evict: view (a per-step copy of the sequence minus the dropped positions) or evict (freed for good).",
    ),
    text_file: Path = typer.Option(None, "--text-file", help="UTF-8 text to evaluate (default: built-in ~1,100-token text)."),
    ctx: int = typer.Option(None, "--ctx", "-c", help="Evaluate at most this many tokens of the text (default: all)."),
    batch: int = typer.Option(64, "--batch", "-b", help="Tokens per llama_decode (n_batch = n_ubatch)."),
    threads: int = typer.Option(None, "--threads", "-t", help="CPU threads (default: usable cores)."),
    flash_attn: bool = typer.Option(
        None,
        "--flash-attn/--no-flash-attn",
        help="Flash attention for every run, the reference included (quantized V needs it) [default: on; off with --evict].",
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
    """Measure what each KV cache type, or dropping KV blocks, costs in accuracy (teacher-forced, real llama.cpp)."""
    if evict is not None or keep is not None or trace is not None:
        if kv_types is not None or text_file is not None or ctx is not None or reference_flash_attn is not None:
            raise LlamatierError(
                "--evict measures dropped KV blocks on a trace's tokens: leave out --kv-types, --text-file, --ctx "
                "and --reference-flash-attn (they apply to KV type runs)"
            )
        _evict(model, evict=evict, keep=keep, trace=trace, prompt_file=prompt_file, steps=steps, mechanism=mechanism,
               threads=threads, flash_attn=bool(flash_attn), out=out, json_out=json_out, repack=repack)
        return
    if prompt_file is not None or steps is not None:
        raise LlamatierError("--prompt-file and --steps apply to eviction runs: add --trace TRACE --evict POLICIES --keep N")
    kv_types = kv_types or DEFAULT_KV_TYPES
    flash_attn = True if flash_attn is None else flash_attn
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
    with _progress("tokens") as bar:
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


def _progress(unit: str) -> Progress:
    return Progress(
        TextColumn("teacher-forced runs"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    )


def _evict(
    model: Path, *, evict: str | None, keep: str | None, trace: Path | None, prompt_file: Path | None,
    steps: int | None, mechanism: str, threads: int | None, flash_attn: bool, out: Path | None, json_out: bool,
    repack: bool | None,
) -> None:
    from llamatier.quality import eviction_to_dict, measure_eviction, save_eviction
    from llamatier.trace import load_trace

    if not evict or not keep or trace is None:
        raise LlamatierError(
            "an eviction run needs --trace TRACE, --evict POLICIES and --keep BLOCKS, "
            "e.g. --trace traces/gemma3-270m-1k --evict h2o,streaming --keep 8,16"
        )
    try:
        keeps = [int(k) for k in keep.split(",") if k.strip()]
    except ValueError:
        raise LlamatierError(f"--keep {keep!r}: give whole numbers of blocks, e.g. 4,8,16") from None
    tr = load_trace(trace)
    if out is not None:
        from llamatier.outpaths import make_output_dir

        make_output_dir(out, "--out")
    with _progress("steps") as bar:
        task = bar.add_task("evict", total=None)
        result = measure_eviction(
            model, tr, evict, keeps, prompt_file=prompt_file, steps=steps,
            n_threads=threads if threads is not None else _default_threads(), flash_attn=flash_attn,
            mechanism=mechanism, progress=lambda done, total: bar.update(task, completed=done, total=total),
            repack=repack,
        )
    written = save_eviction(result, out) if out is not None else []
    if json_out:
        doc = eviction_to_dict(result)
        doc["files"] = [str(p) for p in written]
        print_json(doc)
        return
    console.print(
        f"[bold]{result.model}[/] ({result.model_file}) on {result.trace}: {result.n_prompt_tokens} prompt tokens, "
        f"{result.n_steps} scored decode steps, blocks of {result.block_tokens} tokens, flash attention "
        f"{'on' if result.flash_attn else 'off'}, threads {result.n_threads}, mechanism {result.mechanism}; "
        f"full-cache perplexity {result.ppl_ref:.4g}",
        highlight=False,
    )
    table = Table(
        title="dropped KV blocks vs the full cache (KL(full || evicted) per decode step, nats)",
        box=box.SIMPLE_HEAD, pad_edge=False,
    )
    for col in ("policy", "keep", "kept", "mass dropped", "mean KL", "p99 KL", "top-1", "ΔPPL", "kind"):
        table.add_column(col, justify="left" if col in ("policy", "kind") else "right", no_wrap=True)
    for r in result.rows:
        table.add_row(
            r.policy, str(r.keep_blocks), f"{100 * r.kept_fraction:.1f}%", f"{r.mass_dropped_mean:.3f}",
            f"{r.mean_kl:.3g}", f"{r.p99_kl:.3g}", f"{100 * r.top1_agreement:.1f}%", f"{r.ppl_change_pct:+.2f}%",
            r.kind,
        )
    console.print(table)
    for p in written:
        console.print(f"wrote {p}", highlight=False)
