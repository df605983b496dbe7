"""What turning llama.cpp's CPU weight repacking off costs in decode speed.

llamatier loads a model without repacking (``use_extra_bufts = False``, llama.cpp's
``--no-repack``) when a probe crashed with it. This bench measures the price:

1. llama-cpp-python as installed (the build llamatier runs): two models, one loaded
   with extra buffer types and one without, each with its own context (flash attention
   off, as traced). Both prefill the same prompt, then decode alternately in rounds of
   ``--round`` tokens so that load from other processes hits both alike. Reports tok/s
   from the median per-token ``llama_decode`` time.
2. Optionally stock llama.cpp: every ``--llama-bench PATH`` (e.g. a native build and a
   ``-DGGML_NATIVE=OFF`` build) runs ``-p P -n N -d DEPTH -fa off -t THREADS`` with
   ``--repack 1`` and ``--repack 0``, alternating, ``--rounds`` times each.

    python bench/bench_repack.py [--model GGUF] [--n-predict 128] [--llama-bench PATH]... [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from llamatier.demo import builtin_prompt, demo_model_path
from llamatier.engines.llamacpp.session import (
    ContextSettings,
    LlamaContext,
    LlamaModel,
    system_info,
)


class Decoder:
    """One model (repacked or not) with one context, decoding greedily."""

    def __init__(self, path: Path, repack: bool, threads: int) -> None:
        self.model = LlamaModel(path, repack=repack, n_threads=threads)
        st = ContextSettings(n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=threads, flash_attn=False)
        self.ctx = LlamaContext(self.model, st)
        self.pos, self.token = 0, -1
        self.step_s: list[float] = []

    def prefill(self, tokens: list[int]) -> None:
        for i in range(0, len(tokens), 512):
            chunk = tokens[i : i + 512]
            self.ctx.decode(chunk, self.pos)
            self.pos += len(chunk)
        self.token = self.ctx.sample()

    def decode(self, n: int) -> None:
        for _ in range(n):
            t = time.perf_counter()
            self.ctx.decode([self.token], self.pos)
            self.step_s.append(time.perf_counter() - t)
            self.pos += 1
            self.token = self.ctx.sample()

    def close(self) -> None:
        self.ctx.close()
        self.model.close()


def bench_python(path: Path, a: argparse.Namespace) -> dict:
    on, off = Decoder(path, True, a.threads), Decoder(path, False, a.threads)
    tokens = on.model.tokenize(builtin_prompt()[: a.prompt_chars])
    on.prefill(tokens)  # prefill speed: see llama-bench's pp test (one cold prefill each is no measurement)
    off.prefill(tokens)
    done, i = 0, 0
    while done < a.n_predict:
        n = min(a.round, a.n_predict - done)
        for d in ((on, off) if i % 2 == 0 else (off, on)):
            d.decode(n)
        done, i = done + n, i + 1
    res = {
        "prompt_tokens": len(tokens),
        "repack_on_tok_s": 1.0 / float(np.median(on.step_s)),
        "repack_off_tok_s": 1.0 / float(np.median(off.step_s)),
        "repack_on_buffers_mib": on.model.model_buffers_mib,
        "repack_off_buffers_mib": off.model.model_buffers_mib,
        "system_info": system_info(),
    }
    res["off_over_on"] = res["repack_off_tok_s"] / res["repack_on_tok_s"]
    on.close()
    off.close()
    return res


def _llama_bench_once(exe: str, path: Path, flag: int, a: argparse.Namespace) -> dict[str, dict]:
    cmd = [exe, "-m", str(path), "-p", str(a.n_prompt), "-n", str(a.n_predict), "-d", str(a.depth), "-fa", "off",
           "-t", str(a.threads), "-r", str(a.reps), "--repack", str(flag), "-o", "jsonl"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["?"])[-1])
    rows = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return {("tg" if r["n_gen"] else "pp"): r for r in rows}


def bench_llama_bench(exe: str, path: Path, a: argparse.Namespace) -> dict:
    """``--repack 1`` and ``0`` alternately, ``--rounds`` times each; mean of the runs' avg tok/s per test."""
    runs: dict[int, list[dict[str, dict]]] = {1: [], 0: []}
    try:
        for i in range(a.rounds):
            for flag in ((1, 0) if i % 2 == 0 else (0, 1)):
                runs[flag].append(_llama_bench_once(exe, path, flag, a))
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return {"llama_bench": exe, "error": str(exc)}
    out: dict = {"llama_bench": exe, "cpu_info": runs[1][0]["tg"].get("cpu_info"), "n_depth": a.depth}
    for test in ("pp", "tg"):
        if test not in runs[1][0]:
            continue
        on = [r[test]["avg_ts"] for r in runs[1]]
        off = [r[test]["avg_ts"] for r in runs[0]]
        out[test] = {"n": runs[1][0][test]["n_prompt"] or runs[1][0][test]["n_gen"], "repack_on_ts": on,
                     "repack_off_ts": off, "off_over_on": float(np.mean(off) / np.mean(on))}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: Gemma 3 270M demo model)")
    ap.add_argument("--n-predict", type=int, default=128)
    ap.add_argument("--round", type=int, default=8, help="tokens per model before switching")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-chars", type=int, default=4000, help="prompt: this many characters of the built-in text")
    ap.add_argument("--llama-bench", action="append", default=[], help="a llama-bench binary to run too (repeatable)")
    ap.add_argument("--depth", type=int, default=1024, help="llama-bench: KV depth before decoding")
    ap.add_argument("--reps", type=int, default=3, help="llama-bench: repetitions per run")
    ap.add_argument("--rounds", type=int, default=2, help="llama-bench: runs per setting, alternating the order")
    ap.add_argument("--n-prompt", type=int, default=512, help="llama-bench: prompt-processing test size (0: none)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    path = a.model or demo_model_path()
    result = {"bench": "repack_cost", "model": str(path), "threads": a.threads, "n_predict": a.n_predict,
              "date": time.strftime("%Y-%m-%d"), "llama_cpp_python": bench_python(path, a),
              "llama_bench": [bench_llama_bench(exe, path, a) for exe in a.llama_bench]}
    print(json.dumps(result, indent=2))
    py = result["llama_cpp_python"]
    print(f"llama-cpp-python: repack on {py['repack_on_tok_s']:.1f} tok/s, off {py['repack_off_tok_s']:.1f} tok/s "
          f"(off/on {py['off_over_on']:.3f})", file=sys.stderr)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
