"""Synthetic traces for tests and benchmarks: the trace format, made-up attention.

These are *not* measurements. The attention mass is drawn to look like real
decode attention (an attention sink on position 0, a recency bump, a few heavy
hitters, a random tail) so that policies have something to learn, and shapes
can be far larger than what this machine can trace (e.g. 32K contexts).
Results on them measure the replay engine, never a model.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import polars as pl

from llamatier.model import KVGeometry, ModelInfo
from llamatier.trace import Trace
from llamatier.trace.chunks import ArrayMassSource, MassSource, RowBatch, concat_batches
from llamatier.trace.format import FORMAT_NAME, FORMAT_VERSION, STEP_SCHEMA


class SyntheticMassSource(MassSource):
    """Made-up attention generated step by step on demand (each step seeded on its own), so that
    shapes far larger than memory or disk (1M tokens x 80 layers) can be replayed."""

    def __init__(
        self, steps: list[tuple[str, int, int]], *, n_layers: int, block_tokens: int, window: np.ndarray,
        seed: int, steps_per_batch: int = 4,
    ) -> None:
        self.rows_of_steps = steps
        self.n_steps, self.n_layers = len(steps), n_layers
        self.block_tokens = block_tokens
        final = steps[-1][1] + steps[-1][2] if steps else 0
        self.n_blocks = -(-final // block_tokens)
        self.window = window  # int64 [n_layers]: sliding window in tokens, 0 for global layers
        self.seed = seed
        self.steps_per_batch = steps_per_batch
        self.heavy = np.random.default_rng(seed).integers(0, max(self.n_blocks, 1), size=(n_layers, 4))

    def step_mass(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """(first visible block per layer, float32 [n_layers, blocks up to the step's context])."""
        _, nt, p0 = self.rows_of_steps[s]
        B, L = self.block_tokens, self.n_layers
        b1 = -(-(p0 + nt) // B)
        lo = np.where(self.window > 0, np.maximum(0, p0 - self.window + 1), 0) // B
        rng = np.random.default_rng([self.seed, s])
        m = rng.gamma(0.3, size=(L, b1)).astype(np.float32) * np.float32(0.2) + np.float32(1e-6)
        m[:, b1 - 1] += 1.0  # recency
        m[lo == 0, 0] += 1.0  # attention sink on the first block
        hl, hb = np.nonzero(self.heavy < b1)
        m[hl, self.heavy[hl, hb]] += 0.5  # heavy hitters
        m[np.arange(b1)[None, :] < lo[:, None]] = 0.0
        m /= m.sum(axis=1, keepdims=True)
        return lo, m

    dense_steps = True

    def step_dense(self, s: int) -> np.ndarray:
        return self.step_mass(s)[1]

    def batches(self, *, reverse: bool = False) -> Iterator[RowBatch]:
        starts = range(0, self.n_steps, self.steps_per_batch)
        for s0 in reversed(starts) if reverse else starts:
            parts = []
            group = range(s0, min(s0 + self.steps_per_batch, self.n_steps))
            for s in reversed(group) if reverse else group:
                _, m = self.step_mass(s)
                layer, block = np.nonzero(m)
                parts.append(RowBatch(np.full(layer.size, s, dtype=np.int64), layer, block, m[layer, block]))
            yield concat_batches(parts)


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
    lazy: bool = False,
) -> Trace:
    """A Trace with made-up attention mass (see the module docstring); deterministic per seed.

    ``lazy``: generate each step's mass when it is read (nothing is kept), instead of one dense array.
    """
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
    window = np.array([sliding_window if w else 0 for w in swa], dtype=np.int64)
    src: MassSource = SyntheticMassSource(rows, n_layers=n_layers, block_tokens=block_tokens, window=window, seed=seed)
    if not lazy:
        src = ArrayMassSource(src.dense())
    steps = pl.DataFrame(
        {
            "step": list(range(S)),
            "phase": [r[0] for r in rows],
            "n_tokens": [r[1] for r in rows],
            "pos0": [r[2] for r in rows],
            "n_kv": [r[1] + r[2] for r in rows],
            "token_in": [1] * S,
            # like a real trace: a token is sampled after the prompt's last batch and every decode step
            "token_out": [-1 if r[0] == "prefill" and r[1] + r[2] < n_prompt else 1 for r in rows],
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
        "context": {
            "n_ctx": int(n_ctx or pos), "type_k": "f16", "type_v": "f16", "n_threads": 2, "n_ubatch": 512,
            "n_batch": max(chunk, 1), "n_predict": n_decode, "n_prompt_tokens": n_prompt,
        },
        "capture": {"enabled": True, "backend": "synthetic", "positions": False},
    }
    return Trace(meta=meta, model=model, steps=steps, source=src, block_tokens=block_tokens)
