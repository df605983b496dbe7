"""Per-step KV traffic of a batch of sequences, vectorised over sequences and placement segments.

A batch step runs ``m`` sequences; sequence ``i`` has ``c[i]`` tokens of KV and
adds ``n[i]`` (1 when decoding, a chunk when prefilling). Its KV is laid out in
``G`` contiguous segments of token positions (``seg_end[i, g]`` cumulative, the
last ending at ``c + n``), segment ``g`` in tier ``seg_tier[i, g]``; segment
boundaries fall on block boundaries. Counting follows the single-trace replay
exactly, so that one sequence gives the replay's numbers:

- a layer with sliding window ``w`` reads positions ``[max(0, c - w + 1), c + n)``
  (``w = 0``: from 0), every visible position, every step (lossless);
- bytes read = visible tokens x the layer's K+V bytes per token; transfers = the
  blocks those tokens touch, partial edge blocks included;
- new K/V (``n`` tokens) is written into the tiers of the segments holding positions ``[c, c + n)``.

Batched attention FLOPs: the cost model charges ``n_tokens * read_tokens``; for
a batch the row carries ``read_tokens = sum_i n_i r_i / sum_i n_i`` so that the
product is the batch's true ``sum_i n_i r_i`` (each sequence attends only its own KV).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llamatier.cost import StepTraffic
from llamatier.tiers import N_TIERS, N_TIMINGS


@dataclass
class TrafficBuffer:
    """Rows of per-step traffic, filled step by step and costed together."""

    read_bytes: np.ndarray  # [K, L, 4]
    read_blocks: np.ndarray
    read_tokens: np.ndarray  # [K, L]
    write_bytes: np.ndarray
    write_blocks: np.ndarray
    move_bytes: np.ndarray  # [K, 3, 4, 4]
    move_count: np.ndarray
    n_tokens: np.ndarray  # int64 [K]
    ctx_tokens: np.ndarray  # int64 [K]

    @staticmethod
    def empty(k: int, n_layers: int) -> TrafficBuffer:
        z = np.zeros((k, n_layers, N_TIERS))
        return TrafficBuffer(
            read_bytes=z,
            read_blocks=z.copy(),
            read_tokens=np.zeros((k, n_layers)),
            write_bytes=z.copy(),
            write_blocks=z.copy(),
            move_bytes=np.zeros((k, N_TIMINGS, N_TIERS, N_TIERS)),
            move_count=np.zeros((k, N_TIMINGS, N_TIERS, N_TIERS)),
            n_tokens=np.zeros(k, dtype=np.int64),
            ctx_tokens=np.zeros(k, dtype=np.int64),
        )

    def traffic(self, rows: int) -> StepTraffic:
        """The first ``rows`` rows as the cost model's input."""
        return StepTraffic(
            read_bytes=self.read_bytes[:rows],
            read_blocks=self.read_blocks[:rows],
            read_tokens=self.read_tokens[:rows],
            write_bytes=self.write_bytes[:rows],
            write_blocks=self.write_blocks[:rows],
            move_bytes=self.move_bytes[:rows],
            move_count=self.move_count[:rows],
            n_tokens=self.n_tokens[:rows],
            ctx_tokens=self.ctx_tokens[:rows],
        )


class TrafficCounter:
    """Counts one step's reads and writes for a model's layers (see the module docstring)."""

    def __init__(self, bytes_per_token_layer: np.ndarray, windows: np.ndarray, kind_of_layer: np.ndarray, block_tokens: int) -> None:
        self.bpt = np.asarray(bytes_per_token_layer, dtype=np.float64)
        self.windows = np.asarray(windows, dtype=np.int64)
        self.kind = np.asarray(kind_of_layer, dtype=np.int64)
        self.B = int(block_tokens)
        self.K = int(self.windows.shape[0])

    def fill(
        self,
        buf: TrafficBuffer,
        row: int,
        c: np.ndarray,
        n: np.ndarray,
        seg_end: np.ndarray,
        seg_tier: np.ndarray,
    ) -> None:
        """Write one step's read/write counts into ``buf`` row ``row``."""
        B, K = self.B, self.K
        c = np.asarray(c, dtype=np.int64)
        n = np.asarray(n, dtype=np.int64)
        hi = c + n  # [m]
        w = self.windows
        lo = np.where(w[None, :] > 0, np.maximum(0, c[:, None] - w[None, :] + 1), 0)  # [m, K]
        seg_end = np.asarray(seg_end, dtype=np.int64)
        seg_start = np.concatenate([np.zeros((seg_end.shape[0], 1), dtype=np.int64), seg_end[:, :-1]], axis=1)
        s0 = np.maximum(seg_start[:, None, :], lo[:, :, None])  # [m, K, G]
        s1 = np.minimum(seg_end[:, None, :], hi[:, None, None])
        tok = np.maximum(0, s1 - s0)
        blocks = np.where(tok > 0, -(-s1 // B) - s0 // B, 0)
        tiers = np.broadcast_to(np.asarray(seg_tier, dtype=np.int64)[:, None, :], tok.shape)
        keys = (np.arange(K)[None, :, None] * N_TIERS + tiers).ravel()
        tok_kt = np.bincount(keys, weights=tok.ravel().astype(np.float64), minlength=K * N_TIERS).reshape(K, N_TIERS)
        blk_kt = np.bincount(keys, weights=blocks.ravel().astype(np.float64), minlength=K * N_TIERS).reshape(K, N_TIERS)
        buf.read_bytes[row] = tok_kt[self.kind] * self.bpt[:, None]
        buf.read_blocks[row] = blk_kt[self.kind]
        n_total = float(n.sum())
        r = (hi[:, None] - lo).astype(np.float64)  # [m, K] visible tokens
        eff = (n[:, None] * r).sum(axis=0) / n_total if n_total > 0 else np.zeros(K)
        buf.read_tokens[row] = eff[self.kind]
        w0 = np.maximum(seg_start, c[:, None])  # [m, G]: new tokens falling in each segment
        w1 = np.minimum(seg_end, hi[:, None])
        wtok = np.maximum(0, w1 - w0)
        wblk = np.where(wtok > 0, -(-w1 // B) - w0 // B, 0)
        wt = np.asarray(seg_tier, dtype=np.int64).ravel()
        wtok_t = np.bincount(wt, weights=wtok.ravel().astype(np.float64), minlength=N_TIERS)
        wblk_t = np.bincount(wt, weights=wblk.ravel().astype(np.float64), minlength=N_TIERS)
        buf.write_bytes[row] = wtok_t[None, :] * self.bpt[:, None]
        buf.write_blocks[row] = np.broadcast_to(wblk_t[None, :], (self.bpt.shape[0], N_TIERS))
        buf.n_tokens[row] = int(n.sum())
        buf.ctx_tokens[row] = int(hi.sum())
