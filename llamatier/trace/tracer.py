"""Record a trace: drive a trace engine step by step and write every step as it completes.

The step loop is engine-neutral (:class:`~llamatier.engines.TraceEngine`; the
built-in engine is llama.cpp, :mod:`llamatier.engines.llamacpp`). The prompt is
decoded in batches of ``n_batch`` tokens (one prefill step each), then
``n_predict`` single-token decode steps follow.

Attribution: a step's mass per KV block is the mean over heads and over the
step's query tokens of the softmax probability summed over the block's
positions. For a decode step that is the one new token; for a prefill batch
every query token weighs equally (each row sums to 1, so the mean does too).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llamatier import crashlog
from llamatier.engines import (
    DEFAULT_ENGINE,
    EngineDescription,
    EngineSettings,
    TraceEngine,
    block_mass,
    get_engine,
)
from llamatier.errors import LlamatierError
from llamatier.kvtypes import KVType, kv_type
from llamatier.model import ModelInfo, read_model_info
from llamatier.trace.writer import TraceWriter, check_out_dir, claim_trace_dir

PREFILL_ATTRIBUTION = "mean over heads and over the batch's query tokens (each query row weighs equally)"


class TraceInterrupted(LlamatierError):
    """The run was stopped (Ctrl-C / SIGTERM); completed chunks are kept."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=130)


@dataclass
class TraceConfig:
    """Everything that defines a tracing run."""

    model_path: Path
    out_dir: Path
    prompt: str
    prompt_source: str = "argument"
    n_predict: int = 128
    n_ctx: int = 2048
    n_batch: int = 512
    n_threads: int = 2
    type_k: str = "f16"
    type_v: str = "f16"
    block_tokens: int = 16
    seed: int = 42
    temperature: float = 0.8
    top_k: int = 40
    capture: bool = True
    capture_backend: str = "auto"
    positions: bool = False
    chunk_steps: int = 64
    stop_at_eos: bool = False
    overwrite: bool = False
    command: str = ""
    extra_meta: dict[str, Any] = field(default_factory=dict)
    engine: str = DEFAULT_ENGINE
    engine_options: dict[str, Any] = field(default_factory=dict)  # the engine's own settings


@dataclass(frozen=True)
class TraceSummary:
    out_dir: Path
    n_steps: int
    n_prompt_tokens: int
    n_decode_steps: int
    prefill_s: float
    decode_s: float
    decode_wall_s: float  # whole decode loop: llama_decode + capture post-processing + sampling + writing
    capture_backend: str

    @property
    def decode_tok_per_s(self) -> float:
        return self.n_decode_steps / self.decode_s if self.decode_s > 0 else 0.0


ProgressFn = Callable[[str, int, int], None]  # (phase, tokens done, tokens total)


def _validate_types(type_k: str, type_v: str) -> tuple[KVType, KVType]:
    tk, tv = kv_type(type_k), kv_type(type_v)
    if tv.quantized:
        raise LlamatierError(
            f"--type-v {tv.name}: llama.cpp stores a quantized V cache only with flash attention, and "
            "with flash attention the attention probabilities (kq_soft_max) are never materialised, so "
            f"they cannot be captured; trace with --type-v f16 and re-cost with `llamatier replay "
            f"--kv-type {tk.name}/{tv.name}`"
        )
    return tk, tv


def validate_config(cfg: TraceConfig) -> tuple[ModelInfo, KVType, KVType]:
    """Check everything that can be checked before loading the model."""
    info = read_model_info(cfg.model_path)
    tk, tv = _validate_types(cfg.type_k, cfg.type_v)
    for name, v, lo in (
        ("--n-predict", cfg.n_predict, 0),
        ("--ctx", cfg.n_ctx, 1),
        ("--batch", cfg.n_batch, 1),
        ("--threads", cfg.n_threads, 1),
        ("--block-tokens", cfg.block_tokens, 1),
        ("--chunk-steps", cfg.chunk_steps, 1),
    ):
        if v < lo:
            raise LlamatierError(f"{name} must be >= {lo}, got {v}")
    if not math.isfinite(cfg.temperature) or not 0 <= cfg.temperature <= 1e6:
        raise LlamatierError(f"--temp must be a finite number >= 0 (got {cfg.temperature}); 0 samples greedily")
    for layer in range(info.n_layers):
        info.geometry.layer_bytes_per_token(layer, tk, tv)  # raises if rows do not fit the block size
    if not cfg.prompt:
        raise LlamatierError("the prompt is empty: give --prompt TEXT or --prompt-file PATH")
    check_options = getattr(get_engine(cfg.engine), "check_options", None)
    if check_options is not None:  # an engine may check its own options before anything runs
        check_options(cfg.engine_options)
    check_out_dir(cfg.out_dir, overwrite=cfg.overwrite)
    return info, tk, tv


def make_engine(cfg: TraceConfig, type_k: KVType, type_v: KVType) -> TraceEngine:
    """The engine ``cfg`` names, built with the run's settings and its own options."""
    settings = EngineSettings(
        n_ctx=cfg.n_ctx, n_batch=cfg.n_batch, n_threads=cfg.n_threads, type_k=type_k, type_v=type_v,
        seed=cfg.seed, temperature=cfg.temperature, top_k=cfg.top_k, capture=cfg.capture,
        capture_backend=cfg.capture_backend,
    )
    cls = get_engine(cfg.engine)
    try:
        return cls(settings, **cfg.engine_options)
    except TypeError as exc:
        raise LlamatierError(f"bad options for engine {cfg.engine!r}: {exc}") from None


def run_trace(cfg: TraceConfig, progress: ProgressFn | None = None) -> TraceSummary:
    """Run the engine on the prompt, record every step into ``cfg.out_dir`` and return a summary."""
    info, tk, tv = validate_config(cfg)
    created = not Path(cfg.out_dir).exists()
    claim = claim_trace_dir(cfg.out_dir)  # a second trace into the same --out stops here, before the model loads
    writer = None
    try:
        engine = make_engine(cfg, tk, tv)
        try:
            engine.load(cfg.model_path, info)
            prompt_tokens = engine.tokenize(cfg.prompt)
            _check_fits(cfg, len(prompt_tokens))
            engine.start()
            meta = trace_meta(cfg, info, tk, tv, len(prompt_tokens), engine.name, engine.describe())
            writer = TraceWriter(cfg.out_dir, meta, n_layers=info.n_layers, block_tokens=cfg.block_tokens,
                                 chunk_steps=cfg.chunk_steps, positions=cfg.positions, overwrite=cfg.overwrite,
                                 claim=claim)
            crashlog.note(trace_dir=str(cfg.out_dir))
            return _record(cfg, engine, writer, prompt_tokens, progress)
        finally:
            engine.close()
    finally:
        claim.release()
        if writer is None and created:  # nothing was written: leave no empty --out behind
            with contextlib.suppress(OSError):
                Path(cfg.out_dir).rmdir()


def _check_fits(cfg: TraceConfig, n_prompt: int) -> None:
    need = n_prompt + cfg.n_predict
    if need > cfg.n_ctx:
        raise LlamatierError(
            f"the prompt is {n_prompt} tokens and --n-predict {cfg.n_predict} needs {need} positions, "
            f"but --ctx is {cfg.n_ctx}; raise --ctx to at least {need} or shorten the prompt"
        )


def trace_meta(cfg: TraceConfig, info: ModelInfo, tk: KVType, tv: KVType, n_prompt: int, engine_name: str,
               desc: EngineDescription) -> dict[str, Any]:
    """The trace's meta.json content at the start of the run."""
    from llamatier.machine import machine_info

    geom = info.geometry
    return {
        "command": cfg.command,
        "model": info.to_dict(),
        "context": {
            "n_ctx": desc.n_ctx,
            "n_ctx_requested": cfg.n_ctx,
            "n_batch": cfg.n_batch,
            "n_ubatch": cfg.n_batch,
            "n_threads": cfg.n_threads,
            "type_k": tk.name,
            "type_v": tv.name,
            **desc.context,
            "seed": cfg.seed,
            "temperature": cfg.temperature,
            "top_k": cfg.top_k,
            "n_predict": cfg.n_predict,
            "n_prompt_tokens": n_prompt,
            "stop_at_eos": cfg.stop_at_eos,
            "kv_bytes_per_token": geom.bytes_per_token(tk, tv),
            "kv_cache_bytes": geom.bytes_per_token(tk, tv) * desc.n_ctx,
        },
        "capture": {
            "enabled": cfg.capture,
            **desc.capture,
            "reduction": "attention probability summed per KV block; " + PREFILL_ATTRIBUTION,
            "positions": cfg.positions,
        },
        "prompt": {
            "source": cfg.prompt_source,
            "sha256": hashlib.sha256(cfg.prompt.encode()).hexdigest(),
            "n_tokens": n_prompt,
            "preview": cfg.prompt[:160],
        },
        **desc.top,
        "engine": {"name": engine_name, **desc.engine},
        "machine": machine_info(),
        **cfg.extra_meta,
    }


@dataclass
class StepRecord:
    """One measured step: its row of the steps table and its attention per block (and per position)."""

    row: dict[str, Any]
    blocks: np.ndarray  # float32 [n_layers, n_visible_blocks]
    positions: np.ndarray | None  # float32 [n_layers, n_ctx_tokens] when kept


def measure_step(engine: TraceEngine, tokens: list[int], pos0: int, phase: str, *, logits: bool,
                 n_layers: int, block_tokens: int, t0: float, keep_positions: bool = False) -> StepRecord:
    """One decode call, timed, with its attention reduced to blocks (``t0``: the run's start)."""
    t_start = time.perf_counter()
    timing = engine.decode(tokens, pos0, logits=logits)
    t_cap0 = time.perf_counter()
    n_ctx_tokens = pos0 + len(tokens)
    attn = engine.attention(n_ctx_tokens)
    n_kv, blocks, positions = 0, np.zeros((n_layers, 0), dtype=np.float32), None
    if attn is not None:
        n_kv = attn.n_kv
        blocks = block_mass(attn.mass, block_tokens)
        if keep_positions:
            positions = attn.mass.astype(np.float32)
    row = {
        "phase": phase,
        "n_tokens": len(tokens),
        "pos0": pos0,
        "n_kv": n_kv,
        "token_in": int(tokens[0]),
        "token_out": -1,
        "t_start_s": t_start - t0,
        "decode_s": timing.wall_s,
        "capture_s": time.perf_counter() - t_cap0,
        "perf_t_p_eval_ms": timing.perf_t_p_eval_ms,
        "perf_t_eval_ms": timing.perf_t_eval_ms,
        "perf_n_p_eval": timing.perf_n_p_eval,
        "perf_n_eval": timing.perf_n_eval,
    }
    return StepRecord(row, blocks, positions)


class _StepLoop:
    """Prefill then decode, each step measured, sampled and handed to the writer."""

    def __init__(self, cfg: TraceConfig, engine: TraceEngine, writer: TraceWriter,
                 progress: ProgressFn | None, total_tokens: int) -> None:
        self.cfg, self.engine, self.writer = cfg, engine, writer
        self.progress, self.total = progress, total_tokens
        self.t0 = time.perf_counter()
        self.pos = 0
        self.token = -1
        self.prefill_s = self.decode_s = 0.0
        self.n_decode = 0

    def _step(self, tokens: list[int], phase: str, *, sample: bool) -> float:
        rec = measure_step(self.engine, tokens, self.pos, phase, logits=sample, n_layers=self.writer.n_layers,
                           block_tokens=self.cfg.block_tokens, t0=self.t0, keep_positions=self.cfg.positions)
        self.pos += len(tokens)
        if sample:
            self.token = self.engine.sample()
            rec.row["token_out"] = self.token
        self.writer.add_step(rec.row, rec.blocks, rec.positions)
        if self.progress:
            self.progress(phase, self.pos, self.total)
        return rec.row["decode_s"]

    def prefill(self, prompt_tokens: list[int]) -> None:
        """One step per ``n_batch`` prompt tokens; the last samples the first generated token."""
        n_prompt = len(prompt_tokens)
        while self.pos < n_prompt:
            chunk = prompt_tokens[self.pos : self.pos + self.cfg.n_batch]
            self.prefill_s += self._step(chunk, "prefill", sample=self.pos + len(chunk) >= n_prompt)

    def decode(self) -> None:
        """Up to ``n_predict`` single-token steps (fewer with ``stop_at_eos``)."""
        for _ in range(self.cfg.n_predict):
            if self.cfg.stop_at_eos and self.engine.is_eog(self.token):
                break
            self.decode_s += self._step([self.token], "decode", sample=True)
            self.n_decode += 1


def _record(cfg: TraceConfig, engine: TraceEngine, writer: TraceWriter, prompt_tokens: list[int],
            progress: ProgressFn | None) -> TraceSummary:
    """Run the step loop; on Ctrl-C, SIGTERM or an error close the trace saying why."""
    loop = _StepLoop(cfg, engine, writer, progress, len(prompt_tokens) + cfg.n_predict)
    old_term = _sigterm_as_interrupt()
    try:
        loop.prefill(prompt_tokens)
        t_dec0 = time.perf_counter()
        loop.decode()
    except KeyboardInterrupt:
        # One Ctrl-C can raise twice: polars checks signals inside write_parquet and raises
        # there, and Python raises the same SIGINT again at the next call it makes (seen in 1
        # to 3 runs in 10 interrupted during a chunk write). No call before the try: the trace
        # is always closed and marked interrupted.
        closed = False
        while not closed:
            try:
                writer.close(complete=False, interrupted=True)
                closed = True
            except KeyboardInterrupt:
                pass
        raise TraceInterrupted(
            f"interrupted after {writer.n_steps} steps; the trace in {cfg.out_dir} keeps every completed "
            "step and is marked incomplete"
        ) from None
    except LlamatierError as exc:
        writer.close(complete=False, error=str(exc))
        raise
    except RuntimeError as exc:
        writer.close(complete=False, error=str(exc))
        raise LlamatierError(
            f"attention capture failed: {exc}; the {writer.n_steps} steps before it are kept in {cfg.out_dir}"
        ) from None
    finally:
        _restore_sigterm(old_term)
    decode_wall_s = time.perf_counter() - t_dec0
    writer.update_meta(**engine.run_stats())
    writer.close(complete=True)
    return TraceSummary(
        out_dir=Path(cfg.out_dir),
        n_steps=writer.n_steps,
        n_prompt_tokens=len(prompt_tokens),
        n_decode_steps=loop.n_decode,
        prefill_s=loop.prefill_s,
        decode_s=loop.decode_s,
        decode_wall_s=decode_wall_s,
        capture_backend=writer.meta["capture"].get("backend") or "off",
    )


def _sigterm_as_interrupt() -> Any:
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread
        return None


def _restore_sigterm(old: Any) -> None:
    if old is not None:
        try:
            signal.signal(signal.SIGTERM, old)
        except ValueError:
            pass
