"""Tracer overhead: decode speed with and without attention capture, measured in one run.

Two llama.cpp engines load the same model: one with the capture hook
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

from llamatier.demo import builtin_prompt, demo_model_path
from llamatier.engines import EngineSettings
from llamatier.engines.llamacpp import LlamaCppEngine
from llamatier.kvtypes import kv_type
from llamatier.model import read_model_info
from llamatier.trace.tracer import measure_step
from llamatier.trace.writer import TraceWriter


class Runner:
    """One engine (model + context) decoding with (or without) the tracer's per-step work."""

    def __init__(self, model_path: Path, capture: bool, out: Path, args: argparse.Namespace) -> None:
        info = read_model_info(model_path)
        st = EngineSettings(n_ctx=2048, n_batch=512, n_threads=args.threads, type_k=kv_type("f16"),
                            type_v=kv_type("f16"), seed=7, temperature=0.8, top_k=40, capture=capture,
                            capture_backend=args.capture)
        self.engine = LlamaCppEngine(st)
        self.engine.load(model_path, info)
        self.engine.start()
        self.backend = self.engine.describe().capture["backend"] or "off"
        self.n_layers = info.n_layers
        self.writer = TraceWriter(out, {}, n_layers=info.n_layers, block_tokens=16, chunk_steps=64)
        self.pos = 0
        self.token = -1
        self.decode_s: list[float] = []
        self.loop_s: list[float] = []
        self.t0 = time.perf_counter()

    def _step(self, tokens: list[int], phase: str, sample: bool = True) -> float:
        rec = measure_step(self.engine, tokens, self.pos, phase, logits=True, n_layers=self.n_layers,
                           block_tokens=16, t0=self.t0)
        self.pos += len(tokens)
        if sample:
            self.token = self.engine.sample()
            rec.row["token_out"] = self.token
        self.writer.add_step(rec.row, rec.blocks, rec.positions)
        return rec.row["decode_s"]

    def prefill(self, tokens: list[int]) -> None:
        for i in range(0, len(tokens), 512):
            self._step(tokens[i : i + 512], "prefill", sample=i + 512 >= len(tokens))

    def decode(self, n: int) -> None:
        for _ in range(n):
            t = time.perf_counter()
            dt = self._step([self.token], "decode")
            self.loop_s.append(time.perf_counter() - t)
            self.decode_s.append(dt)

    def close(self) -> None:
        self.writer.close(complete=True)
        self.engine.close()


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
    prompt = builtin_prompt()[: a.prompt_chars]
    with tempfile.TemporaryDirectory() as td:
        traced = Runner(model_path, True, Path(td) / "traced", a)
        plain = Runner(model_path, False, Path(td) / "plain", a)
        tokens = traced.engine.tokenize(prompt)
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
        "capture_backend": traced.backend,
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
