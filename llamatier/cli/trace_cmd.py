"""`llamatier trace` and `llamatier inspect`."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from llamatier.cli.app import RepackOpt, app, cli_errors, console, print_json
from llamatier.engines import ENGINES
from llamatier.errors import LlamatierError
from llamatier.machine import usable_cores

if TYPE_CHECKING:
    from llamatier.trace.tracer import TraceConfig, TraceSummary


def run_with_progress(cfg: TraceConfig) -> TraceSummary:
    """Run the tracer under a rich progress bar showing tokens and tok/s."""
    from llamatier.trace.tracer import run_trace

    with Progress(
        TextColumn("[bold]{task.fields[phase]:<7}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        TextColumn("[cyan]{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task("trace", total=None, phase="load", rate="")
        state = {"phase": "", "t": time.perf_counter(), "n": 0}

        def progress(phase: str, done: int, total: int) -> None:
            now = time.perf_counter()
            if phase != state["phase"]:
                state.update(phase=phase, t=now, n=done)
            dt = now - state["t"]
            rate = f"{(done - state['n']) / dt:,.1f} tok/s" if dt > 0 and done > state["n"] else ""
            bar.update(task, completed=done, total=total, phase=phase, rate=rate)

        return run_trace(cfg, progress)


@app.command()
@cli_errors
def trace(
    model: Path = typer.Argument(..., help="GGUF model file."),
    prompt: str = typer.Option(None, "--prompt", help="Prompt text."),
    prompt_file: Path = typer.Option(None, "--prompt-file", help="Read the prompt from a UTF-8 file."),
    n_predict: int = typer.Option(128, "--n-predict", "-n", help="Decode steps after the prompt."),
    ctx: int = typer.Option(4096, "--ctx", "-c", help="Context size (n_ctx)."),
    batch: int = typer.Option(512, "--batch", "-b", help="Prompt tokens per llama_decode (n_batch = n_ubatch)."),
    threads: int = typer.Option(None, "--threads", "-t", help="CPU threads (default: usable cores)."),
    type_k: str = typer.Option("f16", "--type-k", "-ctk", help="K cache type (any; see `llamatier kvtypes`)."),
    type_v: str = typer.Option("f16", "--type-v", "-ctv", help="V cache type (f16/bf16/f32 only: capture needs flash attention off)."),
    block_tokens: int = typer.Option(16, "--block-tokens", help="KV positions per block in the trace."),
    seed: int = typer.Option(42, "--seed", help="Sampling seed."),
    temp: float = typer.Option(0.8, "--temp", help="Sampling temperature (0 = greedy)."),
    out: Path = typer.Option(None, "--out", "-o", help="Trace directory to write (default: ./traces/<model>-<time>)."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty --out directory."),
    positions: bool = typer.Option(False, "--positions", help="Also store per-position mass (large; for checks)."),
    chunk_steps: int = typer.Option(64, "--chunk-steps", help="Steps per Parquet chunk (what a crash can lose at most)."),
    capture: str = typer.Option("auto", "--capture", help="Capture backend: auto, c, python, off."),
    stop_at_eos: bool = typer.Option(False, "--stop-at-eos", help="Stop decoding at end-of-generation tokens."),
    repack: RepackOpt = None,
    engine: str = typer.Option("llama.cpp", "--engine", help=f"Trace engine: {ENGINES.help_names()}."),
    n_gpu_layers: int = typer.Option(0, "--n-gpu-layers", "-ngl", help="Layers on the GPU (llama-cpp-python built with CUDA; 99 = all)."),
    no_offload_kqv: bool = typer.Option(False, "--no-offload-kqv", "-nkvo", help="Keep the KV cache and attention on the host (llama.cpp -nkvo)."),
) -> None:
    """Run MODEL through llama.cpp and record per-step KV attention and timings."""
    from llamatier.demo import builtin_prompt, read_prompt_file
    from llamatier.trace.tracer import TraceConfig, validate_config

    if prompt is not None and prompt_file is not None:
        raise LlamatierError("give either --prompt or --prompt-file, not both")
    if prompt_file is not None:
        text, source = read_prompt_file(prompt_file), f"file:{prompt_file}"
    elif prompt is not None:
        text, source = prompt, "argument"
    else:
        text, source = builtin_prompt(), "builtin:workload.txt"
    if capture not in ("auto", "c", "python", "off"):
        raise LlamatierError(f"unknown --capture {capture!r}: use auto, c, python or off")
    if n_gpu_layers < 0:
        raise LlamatierError(f"--n-gpu-layers must be >= 0 (got {n_gpu_layers}); 99 puts every layer on the GPU")
    engine_options: dict = {} if repack is None else {"repack": repack}
    if n_gpu_layers or no_offload_kqv:
        if engine != "llama.cpp":
            raise LlamatierError(f"--n-gpu-layers and --no-offload-kqv are llama.cpp engine options, not {engine}'s")
        engine_options.update(n_gpu_layers=n_gpu_layers, offload_kqv=not no_offload_kqv)
    if out is None:
        out = Path("traces") / f"{model.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = TraceConfig(
        model_path=model,
        out_dir=out,
        prompt=text,
        prompt_source=source,
        n_predict=n_predict,
        n_ctx=ctx,
        n_batch=batch,
        n_threads=threads if threads is not None else usable_cores(),
        type_k=type_k,
        type_v=type_v,
        block_tokens=block_tokens,
        seed=seed,
        temperature=temp,
        capture=capture != "off",
        capture_backend=capture if capture != "off" else "auto",
        positions=positions,
        chunk_steps=chunk_steps,
        stop_at_eos=stop_at_eos,
        overwrite=force,
        command="llamatier " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        engine=engine,
        engine_options=engine_options,
    )
    validate_config(cfg)  # fail fast, before the progress bar
    if n_gpu_layers > 0 or no_offload_kqv:
        import llama_cpp

        if not llama_cpp.llama_supports_gpu_offload():
            console.print("[yellow]note:[/] this llama-cpp-python has no GPU backend, so --n-gpu-layers and "
                          "--no-offload-kqv change nothing (install it with CMAKE_ARGS=-DGGML_CUDA=on, or point "
                          "LLAMA_CPP_LIB_PATH at a CUDA build of llama.cpp)", highlight=False)
    summary = run_with_progress(cfg)
    console.print(
        f"[green]trace written[/] to [bold]{summary.out_dir}[/]: {summary.n_steps} steps "
        f"({summary.n_prompt_tokens} prompt tokens, {summary.n_decode_steps} decode steps); "
        f"prefill {summary.prefill_s:.2f} s, decode {summary.decode_tok_per_s:.1f} tok/s; "
        f"capture: {summary.capture_backend}"
    )


@app.command()
@cli_errors
def inspect(
    trace_dir: Path = typer.Argument(..., metavar="TRACE", help="Trace directory."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    plot: Path = typer.Option(None, "--plot", help="Draw an attention heat map to FILE.png or FILE.svg (layers x KV blocks)."),
    layer: int = typer.Option(None, "--layer", help="With --plot: steps x KV blocks of this one layer instead."),
) -> None:
    """Summarise a trace: model, steps, context, KV bytes per token, attention concentration."""
    from llamatier.trace import load_trace
    from llamatier.trace.summary import inspect_trace, render_inspection

    if plot is not None:
        from llamatier.plots import check_plot_path

        check_plot_path(plot)
    elif layer is not None:
        raise LlamatierError("--layer only applies with --plot FILE.png")
    tr = load_trace(trace_dir)
    report = inspect_trace(tr)
    if plot is not None:
        from llamatier.plots import plot_attention, save_figure

        save_figure(plot_attention(tr, layer=layer), plot)
    if json_out:
        print_json(report)
    else:
        render_inspection(report, console)
