"""Tracer overhead: decode speed with and without attention capture, measured in one run.

Two llama.cpp contexts share one loaded model: one with the capture hook
(C cb_eval helper, per-block reduction, chunked Parquet writing: exactly the
tracer's per-step code) and one with no cb_eval at all (still timing and
writing steps). Both prefill the same prompt, then decode alternately in
rounds of ``--round`` tokens, so that load from other processes hits both
alike. Reports traced/untraced tok/s from the median per-token time, for
``llama_decode`` alone and for the whole per-token loop. Goal: >= 0.95.

    python bench/bench_tracer.py [--model GGUF] [--n-predict 256] [--round 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from llamatier.kvtypes import kv_type
from llamatier.llama_session import ContextSettings, LlamaContext, LlamaModel
from llamatier.model import read_model_info
from llamatier.trace.capture import AttentionCapture
from llamatier.trace.tracer import _pending, _step
from llamatier.trace.writer import TraceWriter
from llamatier.workloads import builtin_workload, demo_model_path


class Runner:
    """One context decoding with (or without) the tracer's per-step work."""

    def __init__(self, model: LlamaModel, n_layers: int, capture: bool, out: Path, args: argparse.Namespace) -> None:
        self.cap = AttentionCapture(n_layers, 2048 + 256, backend=args.capture) if capture else None
        st = ContextSettings(n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=args.threads,
                             type_k=kv_type("f16"), type_v=kv_type("f16"))
        self.ctx = LlamaContext(model, st, cb_eval=self.cap.callback if self.cap else None,
                                cb_user_data=self.cap.user_data if self.cap else None)
        self.ctx.set_sampler(temperature=0.8, top_k=40, seed=7)
        self.writer = TraceWriter(out, {}, n_layers=n_layers, block_tokens=16, chunk_steps=64)
        self.pos = 0
        self.token = -1
        self.decode_s: list[float] = []
        self.loop_s: list[float] = []
        self.t0 = time.perf_counter()

    def prefill(self, tokens: list[int]) -> None:
        for i in range(0, len(tokens), 512):
            chunk = tokens[i : i + 512]
            _, row = _step(self.ctx, self.cap, self.writer, chunk, self.pos, "prefill", True, 16, self.t0, False)
            self.pos += len(chunk)
            self.writer.add_step(row, *_pending(row))
        self.token = self.ctx.sample()

    def decode(self, n: int) -> None:
        for _ in range(n):
            t = time.perf_counter()
            dt, row = _step(self.ctx, self.cap, self.writer, [self.token], self.pos, "decode", True, 16, self.t0, False)
            self.pos += 1
            self.token = self.ctx.sample()
            row["token_out"] = self.token
            self.writer.add_step(row, *_pending(row))
            self.loop_s.append(time.perf_counter() - t)
            self.decode_s.append(dt)

    def close(self) -> None:
        self.writer.close(complete=True)
        self.ctx.close()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: Gemma 3 270M demo model)")
    ap.add_argument("--n-predict", type=int, default=256)
    ap.add_argument("--round", type=int, default=8, help="tokens per context before switching")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-chars", type=int, default=4000, help="prompt length in characters of the built-in text")
    ap.add_argument("--capture", default="c", help="capture backend to measure: c or python")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    model_path = a.model or demo_model_path()
    info = read_model_info(model_path)
    prompt = builtin_workload()[: a.prompt_chars]
    with tempfile.TemporaryDirectory() as td, LlamaModel(model_path) as model:
        tokens = model.tokenize(prompt)
        traced = Runner(model, info.n_layers, True, Path(td) / "traced", a)
        plain = Runner(model, info.n_layers, False, Path(td) / "plain", a)
        traced.prefill(tokens)
        plain.prefill(tokens)
        done, i = 0, 0
        while done < a.n_predict:
            n = min(a.round, a.n_predict - done)
            first, second = (traced, plain) if i % 2 == 0 else (plain, traced)
            first.decode(n)
            second.decode(n)
            done += n
            i += 1
        traced.close()
        plain.close()
    med = {k: float(np.median(getattr(r, k))) for r in (traced,) for k in ("decode_s", "loop_s")}
    med_plain = {k: float(np.median(getattr(plain, k))) for k in ("decode_s", "loop_s")}
    result = {
        "bench": "tracer_overhead",
        "model": str(model_path),
        "capture_backend": traced.cap.backend,
        "prompt_tokens": len(tokens),
        "n_predict": a.n_predict,
        "threads": a.threads,
        "untraced_tok_s": 1.0 / med_plain["loop_s"],
        "traced_tok_s": 1.0 / med["loop_s"],
        "ratio_llama_decode": med_plain["decode_s"] / med["decode_s"],
        "ratio_decode_loop": med_plain["loop_s"] / med["loop_s"],
        "mean_ratio_decode_loop": float(np.mean(plain.loop_s) / np.mean(traced.loop_s)),
        "goal": ">= 0.95",
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result, indent=2))
    print(f"traced/untraced decode tok/s: {result['ratio_decode_loop']:.3f} (llama_decode alone "
          f"{result['ratio_llama_decode']:.3f}); untraced {result['untraced_tok_s']:.1f} tok/s", file=sys.stderr)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
