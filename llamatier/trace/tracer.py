"""Record a trace from a real llama.cpp run through llama-cpp-python.

Flash attention is forced off (otherwise ``kq_soft_max`` never exists) and
``swa_full`` on (so KV cell index == token position on every layer). The
prompt is decoded in batches of ``n_batch`` tokens (one prefill step each),
then ``n_predict`` single-token decode steps follow.

Attribution: a step's mass per KV block is the mean over heads and over the
step's query tokens of the softmax probability summed over the block's
positions. For a decode step that is the one new token; for a prefill batch
every query token weighs equally (each row sums to 1, so the mean does too).
"""

from __future__ import annotations

import hashlib
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llamatier.errors import LlamatierError
from llamatier.kvtypes import KVType, kv_type
from llamatier.model import ModelInfo, read_model_info
from llamatier.trace.writer import TraceWriter, check_out_dir

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


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


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
    ):
        if v < lo:
            raise LlamatierError(f"{name} must be >= {lo}, got {v}")
    for layer in range(info.n_layers):
        info.geometry.layer_bytes_per_token(layer, tk, tv)  # raises if rows do not fit the block size
    if not cfg.prompt:
        raise LlamatierError("the prompt is empty: give --prompt TEXT or --prompt-file PATH")
    check_out_dir(cfg.out_dir, overwrite=cfg.overwrite)
    return info, tk, tv


def run_trace(cfg: TraceConfig, progress: ProgressFn | None = None) -> TraceSummary:
    """Run llama.cpp on the prompt, record every step into ``cfg.out_dir`` and return a summary."""
    import llama_cpp

    from llamatier.llama_session import ContextSettings, LlamaContext, LlamaModel, system_info
    from llamatier.machine import machine_info
    from llamatier.trace.capture import AttentionCapture

    info, tk, tv = validate_config(cfg)
    model = LlamaModel(cfg.model_path)
    try:
        prompt_tokens = model.tokenize(cfg.prompt, add_bos=True)
        n_prompt = len(prompt_tokens)
        need = n_prompt + cfg.n_predict
        if need > cfg.n_ctx:
            raise LlamatierError(
                f"the prompt is {n_prompt} tokens and --n-predict {cfg.n_predict} needs {need} positions, "
                f"but --ctx is {cfg.n_ctx}; raise --ctx to at least {need} or shorten the prompt"
            )
        capture = None
        if cfg.capture:
            capture = AttentionCapture(info.n_layers, _pad(cfg.n_ctx, 256) + 256, backend=cfg.capture_backend)
        settings = ContextSettings(
            n_ctx=cfg.n_ctx,
            n_batch=cfg.n_batch,
            n_ubatch=cfg.n_batch,
            n_threads=cfg.n_threads,
            type_k=tk,
            type_v=tv,
            flash_attn=False,
            swa_full=True,
            seed=cfg.seed,
        )
        ctx = LlamaContext(
            model,
            settings,
            cb_eval=capture.callback if capture else None,
            cb_user_data=capture.user_data if capture else None,
        )
        try:
            return _record(cfg, info, tk, tv, model, ctx, capture, prompt_tokens, progress, system_info(),
                           machine_info(), llama_cpp.__version__)
        finally:
            ctx.close()
    finally:
        model.close()


def _record(cfg, info, tk, tv, model, ctx, capture, prompt_tokens, progress, sysinfo, machine, lcp_version):  # noqa: ANN001
    n_prompt = len(prompt_tokens)
    geom = info.geometry
    meta = {
        "command": cfg.command,
        "model": info.to_dict(),
        "context": {
            "n_ctx": ctx.n_ctx(),
            "n_ctx_requested": cfg.n_ctx,
            "n_batch": cfg.n_batch,
            "n_ubatch": cfg.n_batch,
            "n_threads": cfg.n_threads,
            "type_k": tk.name,
            "type_v": tv.name,
            "flash_attn": False,
            "swa_full": True,
            "offload_kqv": True,
            "n_gpu_layers": 0,
            "seed": cfg.seed,
            "temperature": cfg.temperature,
            "top_k": cfg.top_k,
            "n_predict": cfg.n_predict,
            "n_prompt_tokens": n_prompt,
            "stop_at_eos": cfg.stop_at_eos,
            "kv_bytes_per_token": geom.bytes_per_token(tk, tv),
            "kv_cache_bytes": geom.bytes_per_token(tk, tv) * ctx.n_ctx(),
        },
        "capture": {
            "enabled": capture is not None,
            "backend": capture.backend if capture else None,
            "node": "kq_soft_max-<layer>",
            "reduction": "attention probability summed per KV block; " + PREFILL_ATTRIBUTION,
            "positions": cfg.positions,
        },
        "prompt": {
            "source": cfg.prompt_source,
            "sha256": hashlib.sha256(cfg.prompt.encode()).hexdigest(),
            "n_tokens": n_prompt,
            "preview": cfg.prompt[:160],
        },
        "system_info": sysinfo,
        "llama_cpp_python_version": lcp_version,
        "machine": machine,
        **cfg.extra_meta,
    }
    writer = TraceWriter(
        cfg.out_dir,
        meta,
        n_layers=info.n_layers,
        block_tokens=cfg.block_tokens,
        chunk_steps=cfg.chunk_steps,
        positions=cfg.positions,
        overwrite=cfg.overwrite,
    )
    ctx.set_sampler(temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed)
    total = n_prompt + cfg.n_predict
    B = cfg.block_tokens
    t0 = time.perf_counter()
    prefill_s = decode_s = 0.0
    n_decode = 0
    old_term = _sigterm_as_interrupt()
    try:
        pos = 0
        token = -1
        # -- prefill: one step per n_batch tokens --------------------------------------
        while pos < n_prompt:
            chunk = prompt_tokens[pos : pos + cfg.n_batch]
            last = pos + len(chunk) >= n_prompt
            dt, row = _step(ctx, capture, writer, chunk, pos, "prefill", last, B, t0, cfg.positions)
            prefill_s += dt
            pos += len(chunk)
            if last:
                token = ctx.sample()
                row["token_out"] = token
            writer.add_step(row, *_pending(row))
            if progress:
                progress("prefill", pos, total)
        # -- decode --------------------------------------------------------------------
        t_dec0 = time.perf_counter()
        for _ in range(cfg.n_predict):
            if cfg.stop_at_eos and model.is_eog(token):
                break
            dt, row = _step(ctx, capture, writer, [token], pos, "decode", True, B, t0, cfg.positions)
            decode_s += dt
            n_decode += 1
            pos += 1
            token = ctx.sample()
            row["token_out"] = token
            writer.add_step(row, *_pending(row))
            if progress:
                progress("decode", pos, total)
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
    extra = {"capture_reduce_s": capture.reduce_s if capture else 0.0}
    writer.update_meta(**extra)
    writer.close(complete=True)
    return TraceSummary(
        out_dir=Path(cfg.out_dir),
        n_steps=writer.n_steps,
        n_prompt_tokens=n_prompt,
        n_decode_steps=n_decode,
        prefill_s=prefill_s,
        decode_s=decode_s,
        decode_wall_s=decode_wall_s,
        capture_backend=capture.backend if capture else "off",
    )


def _step(ctx, capture, writer, tokens, pos0, phase, logits, B, t0, want_positions):  # noqa: ANN001
    """One llama_decode, timed, with its attention reduced to blocks."""
    t_start = time.perf_counter()
    ctx.decode(tokens, pos0, logits_last=logits)
    t_end = time.perf_counter()
    n_ctx_tokens = pos0 + len(tokens)
    n_kv = 0
    blocks = np.zeros((writer.n_layers, 0), dtype=np.float32)
    positions = None
    if capture is not None:
        pos_mass, n_kv = capture.take(n_ctx_tokens)
        nb = -(-n_ctx_tokens // B)
        padded = np.zeros((pos_mass.shape[0], nb * B), dtype=np.float64)
        padded[:, :n_ctx_tokens] = pos_mass
        blocks = padded.reshape(pos_mass.shape[0], nb, B).sum(axis=2).astype(np.float32)
        if want_positions:
            positions = pos_mass.astype(np.float32)
    t_cap = time.perf_counter() - t_end
    perf = ctx.perf()
    row = {
        "phase": phase,
        "n_tokens": len(tokens),
        "pos0": pos0,
        "n_kv": n_kv,
        "token_in": int(tokens[0]),
        "token_out": -1,
        "t_start_s": t_start - t0,
        "decode_s": t_end - t_start,
        "capture_s": t_cap,
        "perf_t_p_eval_ms": perf["t_p_eval_ms"],
        "perf_t_eval_ms": perf["t_eval_ms"],
        "perf_n_p_eval": perf["n_p_eval"],
        "perf_n_eval": perf["n_eval"],
        "_blocks": blocks,
        "_positions": positions,
    }
    return t_end - t_start, row


def _pending(row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    return row.pop("_blocks"), row.pop("_positions")


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
