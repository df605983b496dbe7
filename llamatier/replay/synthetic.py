"""Synthetic traces for tests and benchmarks: the trace format, made-up attention.

These are *not* measurements. The attention mass is drawn to look like real
decode attention (an attention sink on position 0, a recency bump, a few heavy
hitters, a random tail) so that policies have something to learn, and shapes
can be far larger than what this machine can trace (e.g. 32K contexts).
Results on them measure the replay engine, never a model.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from llamatier.model import KVGeometry, ModelInfo
from llamatier.trace import Trace
from llamatier.trace.format import FORMAT_NAME, FORMAT_VERSION, STEP_SCHEMA


def synthetic_trace(
    *,
    n_layers: int = 2,
    n_prompt: int = 64,
    n_decode: int = 16,
    block_tokens: int = 16,
    n_head: int = 4,
    n_head_kv: int = 2,
    head_dim: int = 64,
    sliding_window: int = 0,
    swa_pattern: int = 0,
    prefill_chunk: int | None = None,
    n_ctx: int | None = None,
    weight_bytes: int = 1_000_000,
    n_params: int = 500_000,
    seed: int = 0,
) -> Trace:
    """A Trace with made-up attention mass (see the module docstring); deterministic per seed."""
    rng = np.random.default_rng(seed)
    swa = tuple(
        sliding_window > 0 and (swa_pattern == 0 or i % swa_pattern < swa_pattern - 1) for i in range(n_layers)
    )
    geom = KVGeometry.uniform(
        n_layers, n_head_kv, head_dim, sliding_window=sliding_window, swa_layers=swa, label="synthetic"
    )
    model = ModelInfo(
        path="synthetic.gguf", name="synthetic", architecture="llama", file_type="F16", n_layers=n_layers,
        n_embd=n_head * head_dim, n_head=n_head, n_ff=4 * n_head * head_dim, n_vocab=512, n_ctx_train=1 << 20,
        weight_bytes=int(weight_bytes), n_params=int(n_params), geometry=geom,
    )
    chunk = prefill_chunk or max(n_prompt, 1)
    rows: list[tuple[str, int, int]] = []
    pos = 0
    while pos < n_prompt:
        nt = min(chunk, n_prompt - pos)
        rows.append(("prefill", nt, pos))
        pos += nt
    for _ in range(n_decode):
        rows.append(("decode", 1, pos))
        pos += 1
    S = len(rows)
    nb = -(-pos // block_tokens)
    mass = np.zeros((S, n_layers, nb), dtype=np.float32)
    heavy = rng.integers(0, max(nb, 1), size=(n_layers, 4))
    for s, (_, nt, p0) in enumerate(rows):
        ctx = p0 + nt
        b1 = -(-ctx // block_tokens)
        for layer in range(n_layers):
            lo = max(0, p0 - sliding_window + 1) if swa[layer] else 0
            b0 = lo // block_tokens
            m = rng.gamma(0.3, size=b1 - b0).astype(np.float32) * 0.2 + 1e-6
            m[-1] += 1.0  # recency
            m[0] += 1.0 if b0 == 0 else 0.0  # sink
            hh = heavy[layer][(heavy[layer] >= b0) & (heavy[layer] < b1)] - b0
            m[hh] += 0.5
            mass[s, layer, b0:b1] = m / m.sum()
    steps = pl.DataFrame(
        {
            "step": list(range(S)),
            "phase": [r[0] for r in rows],
            "n_tokens": [r[1] for r in rows],
            "pos0": [r[2] for r in rows],
            "n_kv": [r[1] + r[2] for r in rows],
            "token_in": [1] * S,
            "token_out": [1] * S,
            "t_start_s": [0.0] * S,
            "decode_s": [0.0] * S,
            "capture_s": [0.0] * S,
            "perf_t_p_eval_ms": [0.0] * S,
            "perf_t_eval_ms": [0.0] * S,
            "perf_n_p_eval": [0] * S,
            "perf_n_eval": [0] * S,
        },
        schema=STEP_SCHEMA,
    )
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "complete": True,
        "synthetic": True,
        "block_tokens": block_tokens,
        "n_steps": S,
        "model": model.to_dict(),
        "context": {"n_ctx": int(n_ctx or pos), "type_k": "f16", "type_v": "f16", "n_threads": 2, "n_ubatch": 512},
    }
    return Trace(meta=meta, model=model, steps=steps, mass=mass, block_tokens=block_tokens)
