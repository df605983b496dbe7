"""The repacking probe's child process: load a model with extra buffer types and decode a little.

    python -m llamatier.engines.llamacpp.probe MODEL.gguf --threads N [--n-gpu-layers G]

Exits 0 and prints one JSON line (the weight buffers llama.cpp made) when the
decodes work. A crash in llama.cpp kills this process with a signal, which is
the verdict :func:`llamatier.engines.llamacpp.repack.run_probe` looks for.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import sys

PROMPT = "The quick brown fox jumps over the lazy dog while the cache keeps every block. " * 8
BATCH_TOKENS = 40  # more than one 16-row AMX tile, so the batched (tile) kernels run too


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    a = ap.parse_args(argv)
    faulthandler.enable()  # the parent keeps stderr: a crash leaves its traceback there
    from llamatier.engines.llamacpp.session import ContextSettings, LlamaContext, LlamaModel

    with LlamaModel(a.model, repack=True, n_gpu_layers=a.n_gpu_layers) as model:
        tokens = model.tokenize(PROMPT)[:BATCH_TOKENS]
        settings = ContextSettings(n_ctx=128, n_batch=64, n_ubatch=64, n_threads=a.threads, flash_attn=False)
        with LlamaContext(model, settings) as ctx:
            ctx.decode(tokens, 0)
            pos = len(tokens)
            for _ in range(2):
                ctx.decode([ctx.sample()], pos)
                pos += 1
        print(json.dumps({"ok": True, "model_buffers_mib": model.model_buffers_mib}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
