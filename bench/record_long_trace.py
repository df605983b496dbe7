"""Record a real long-context trace: Gemma 3 270M on ~30K tokens of Python's own standard library.

The prompt is text that ships with every Python: the source of standard-library
modules (argparse.py first, then more modules until the token target is met),
read locally, cut at a token count, followed by a question about it. The run
then decodes 256 tokens. The script reports how long the recording took (prefill,
decode, whole run), the peak RSS and the trace's size on disk.

    .venv/bin/python bench/record_long_trace.py --out traces/gemma3-270m-32k \
        [--tokens 30000] [--n-predict 256] [--ctx 32768] [--json figures.json]

The standard library's source differs between Python versions, so the prompt's
sha256 and file list are recorded in the trace's meta.json ("long_prompt").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import sys
import sysconfig
import time
from pathlib import Path

DEFAULT_FILES = ("argparse.py", "textwrap.py", "heapq.py", "bisect.py", "functools.py", "dataclasses.py")
QUESTION = (
    "\n\nQuestion: in the argparse source above, what does ArgumentParser.parse_known_args do, "
    "and how does it treat arguments it does not recognise? Answer:"
)


def stdlib_text(files: tuple[str, ...]) -> tuple[str, list[str]]:
    """The named standard-library sources, each under a '# Lib/NAME' header."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    parts, used = [], []
    for name in files:
        p = lib / name
        if p.is_file():
            parts.append(f"# Lib/{name}\n{p.read_text(encoding='utf-8')}\n")
            used.append(name)
    if not parts:
        raise SystemExit(f"none of {files} found under {lib}: this Python ships no standard-library source")
    return "".join(parts), used


def cut_to_tokens(model, text: str, n_tokens: int) -> str:  # noqa: ANN001 - LlamaModel
    """The longest prefix of ``text`` (cut at a line end) that tokenizes to at most ``n_tokens`` with BOS."""
    if len(model.tokenize(text, add_bos=True)) <= n_tokens:
        return text
    lo, hi = 0, len(text)
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if len(model.tokenize(text[:mid], add_bos=True)) <= n_tokens:
            lo = mid
        else:
            hi = mid
    end = text.rfind("\n", 0, lo)
    return text[: end + 1 if end > 0 else lo]


def main() -> None:
    from llamatier.demo import demo_model_path
    from llamatier.engines.llamacpp.session import LlamaModel
    from llamatier.trace.tracer import TraceConfig, run_trace

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=30000, help="prompt tokens (BOS and question included)")
    ap.add_argument("--n-predict", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk-steps", type=int, default=64)
    ap.add_argument("--files", default=",".join(DEFAULT_FILES), help="standard-library files, in order")
    ap.add_argument("--force", action="store_true", help="replace an existing trace at --out")
    ap.add_argument("--json", dest="json_out", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    model_path = demo_model_path()
    text, used = stdlib_text(tuple(f.strip() for f in args.files.split(",") if f.strip()))
    with LlamaModel(model_path) as m:
        q_tokens = len(m.tokenize(QUESTION, add_bos=False))
        doc = cut_to_tokens(m, text, args.tokens - q_tokens)
        used = [name for name in used if f"# Lib/{name}\n" in doc]
        prompt = doc + QUESTION
        n_prompt = len(m.tokenize(prompt, add_bos=True))
    print(f"prompt: {n_prompt} tokens from Lib/{', Lib/'.join(used)} (Python {sys.version.split()[0]}), "
          f"{args.n_predict} decode steps, n_ctx {args.ctx}", flush=True)

    last = [0.0]

    def progress(phase: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 30 or done == total:
            last[0] = now
            print(f"  {phase}: {done}/{total} tokens, {now - t0:.0f} s", flush=True)


    cfg = TraceConfig(
        model_path=model_path, out_dir=args.out, prompt=prompt, prompt_source="python-stdlib",
        n_predict=args.n_predict, n_ctx=args.ctx, n_batch=512, n_threads=args.threads, block_tokens=16,
        seed=42, chunk_steps=args.chunk_steps, overwrite=args.force,
        command="bench/record_long_trace.py " + " ".join(sys.argv[1:]),
        extra_meta={"long_prompt": {"python": sys.version.split()[0], "files": used,
                                    "sha256": hashlib.sha256(prompt.encode()).hexdigest()}},
    )
    t0 = time.perf_counter()
    summary = run_trace(cfg, progress)
    wall_s = time.perf_counter() - t0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    figures = {
        "prompt_tokens": summary.n_prompt_tokens,
        "decode_steps": summary.n_decode_steps,
        "steps": summary.n_steps,
        "record_wall_s": round(wall_s, 1),
        "prefill_s": round(summary.prefill_s, 1),
        "decode_s": round(summary.decode_s, 1),
        "decode_tok_per_s": round(summary.decode_tok_per_s, 2),
        "peak_rss_bytes": peak_rss,
        "trace_bytes": size,
        "capture": summary.capture_backend,
    }
    print(f"recorded {summary.n_steps} steps ({summary.n_prompt_tokens} prompt tokens, "
          f"{summary.n_decode_steps} decode) in {wall_s:.0f} s: prefill {summary.prefill_s:.0f} s, "
          f"decode {summary.decode_s:.1f} s ({summary.decode_tok_per_s:.1f} tok/s); peak RSS "
          f"{peak_rss / 2**30:.2f} GiB; trace {size / 2**20:.1f} MiB in {args.out}")
    if args.json_out:
        args.json_out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
