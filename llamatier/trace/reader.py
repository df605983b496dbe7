"""Load and validate a trace directory into a :class:`Trace`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from llamatier.errors import TraceFormatError
from llamatier.kvtypes import KV_TYPES
from llamatier.model import ModelInfo
from llamatier.trace.chunks import MassSource, ParquetMassSource, iter_step_mass
from llamatier.trace.format import (
    ATTN_SCHEMA,
    FORMAT_NAME,
    FORMAT_VERSION,
    META_FILE,
    POSITION_SCHEMA,
    STEP_SCHEMA,
    chunk_name,
)


@dataclass(frozen=True, eq=False)
class Trace:
    """A recorded run: the step table, and the attention mass per (step, layer, block) as a stream.

    ``mass[s, l, b]`` is the attention probability that step ``s``'s queries in
    layer ``l`` put on KV positions ``[b*block_tokens, (b+1)*block_tokens)``,
    averaged over heads (and over the batch's query tokens for prefill steps).
    Blocks beyond a step's context hold 0. Each (step, layer) sums to ~1.

    The mass is read from ``source`` step by step (:meth:`iter_mass`); the
    :attr:`mass` property gathers it into one dense array, for small traces.
    ``block_group`` source blocks make one block of ``block_tokens`` tokens
    (see :meth:`with_block_tokens`).
    """

    meta: dict[str, Any]
    model: ModelInfo
    steps: pl.DataFrame
    source: MassSource
    block_tokens: int
    path: Path | None = None
    positions: pl.DataFrame | None = field(default=None, compare=False)
    block_group: int = 1

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete", False))

    @property
    def n_steps(self) -> int:
        return int(self.steps.height)

    @property
    def n_layers(self) -> int:
        return int(self.source.n_layers)

    @property
    def n_blocks(self) -> int:
        return int(-(-int(self.context_tokens.max()) // self.block_tokens)) if self.n_steps else 0

    @property
    def context(self) -> dict[str, Any]:
        return dict(self.meta.get("context", {}))

    @property
    def n_ctx(self) -> int:
        return int(self.context.get("n_ctx", self.n_blocks * self.block_tokens))

    @property
    def is_decode(self) -> np.ndarray:
        return (self.steps["phase"] == "decode").to_numpy()

    @property
    def context_tokens(self) -> np.ndarray:
        """Tokens in the KV cache after each step (= visible positions), int64 [n_steps]."""
        return (self.steps["pos0"].cast(pl.Int64) + self.steps["n_tokens"].cast(pl.Int64)).to_numpy()

    @property
    def visible_blocks(self) -> np.ndarray:
        """Blocks holding at least one visible position after each step, int64 [n_steps]."""
        return -(-self.context_tokens // self.block_tokens)

    def iter_mass(
        self, *, reverse: bool = False, layers: np.ndarray | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(step, float32 [layers, n_blocks])`` for every step, read chunk by chunk (``reverse``: last first).

        ``layers`` picks (and may repeat) traced layers, e.g. a what-if model's layer map.
        """
        return iter_step_mass(
            self.source, reverse=reverse, layers=layers, n_blocks=self.n_blocks, group=self.block_group
        )

    @cached_property
    def mass(self) -> np.ndarray:
        """All of the mass as float32 [n_steps, n_layers, n_blocks] (memory: 4 bytes per cell)."""
        if self.block_group == 1 and self.source.n_blocks == self.n_blocks:
            return self.source.dense()
        out = np.zeros((self.n_steps, self.n_layers, self.n_blocks), dtype=np.float32)
        for s, m in self.iter_mass():
            out[s] = m
        return out

    def with_block_tokens(self, block_tokens: int) -> Trace:
        """Re-aggregate to coarser blocks (a whole multiple of the recorded block size)."""
        if block_tokens == self.block_tokens:
            return self
        if block_tokens <= 0 or block_tokens % self.block_tokens:
            raise TraceFormatError(
                f"--block-tokens {block_tokens} must be a multiple of the trace's recorded block size "
                f"{self.block_tokens}; re-trace with --block-tokens {block_tokens} for finer blocks"
            )
        k = block_tokens // self.block_tokens
        return replace(self, block_tokens=block_tokens, block_group=self.block_group * k)


def _read_table(path: Path, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    if path.is_dir() or not os.access(path, os.R_OK):
        what = "is a directory" if path.is_dir() else "is not readable (check its permissions)"
        raise TraceFormatError(f"trace chunk {path} {what}; restore the file or re-record the trace")
    try:
        df = pl.read_parquet(path)
    except Exception as exc:
        raise TraceFormatError(
            f"corrupt trace chunk {path}: {str(exc).splitlines()[0][:120]} (delete the chunk and "
            "later ones, or re-record the trace)"
        ) from None
    missing = [c for c in schema if c not in df.columns]
    if missing:
        raise TraceFormatError(
            f"trace chunk {path} lacks columns {missing}: it is not a v{FORMAT_VERSION} llamatier trace"
        )
    try:
        return df.select([pl.col(c).cast(t, strict=True) for c, t in schema.items()])
    except Exception:
        raise TraceFormatError(f"trace chunk {path} has columns of the wrong type; re-record the trace") from None


def attn_row_count(path: Path) -> int:
    """Rows of an ``attn-*.parquet`` chunk, from its footer; checks the file is readable and has the
    attention columns (the rows themselves are read, and checked, when the mass is streamed)."""
    if path.is_dir() or not os.access(path, os.R_OK):
        what = "is a directory" if path.is_dir() else "is not readable (check its permissions)"
        raise TraceFormatError(f"trace chunk {path} {what}; restore the file or re-record the trace")
    try:
        schema = pl.read_parquet_schema(path)
        n = int(pl.scan_parquet(path).select(pl.len()).collect().item())
    except Exception as exc:
        raise TraceFormatError(
            f"corrupt trace chunk {path}: {str(exc).splitlines()[0][:120]} (delete the chunk and "
            "later ones, or re-record the trace)"
        ) from None
    missing = [c for c in ATTN_SCHEMA if c not in schema]
    if missing:
        raise TraceFormatError(
            f"trace chunk {path} lacks columns {missing}: it is not a v{FORMAT_VERSION} llamatier trace"
        )
    return n


def read_meta(path: str | Path) -> dict[str, Any]:
    """Read and validate ``meta.json`` of a trace directory."""
    p = Path(path)
    if not p.exists():
        raise TraceFormatError(f"trace not found: {p} (record one with `llamatier trace MODEL.gguf --out {p}`)")
    if not p.is_dir():
        raise TraceFormatError(f"{p} is a file, not a trace directory (give the directory `llamatier trace` wrote)")
    mp = p / META_FILE
    if not mp.exists():
        raise TraceFormatError(f"{p} is not a llamatier trace: {META_FILE} is missing (record one with `llamatier trace`)")
    try:
        text = mp.read_text()
    except OSError as exc:
        raise TraceFormatError(f"cannot read {mp}: {exc.strerror or exc} (check its permissions)") from None
    try:
        meta = json.loads(text)
    except Exception:
        raise TraceFormatError(f"{mp} is not valid JSON: the trace metadata is corrupt; re-record the trace") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise TraceFormatError(f"{p} is not a llamatier trace ({META_FILE} has no format '{FORMAT_NAME}')")
    if meta.get("version") != FORMAT_VERSION:
        raise TraceFormatError(
            f"{p} is trace format v{meta.get('version')}; this llamatier reads v{FORMAT_VERSION} "
            "(upgrade llamatier or re-record the trace)"
        )
    for key in ("model", "context", "block_tokens"):
        if key not in meta:
            raise TraceFormatError(f"{mp} lacks '{key}': the trace metadata is truncated; re-record the trace")
    bt = meta["block_tokens"]
    if not isinstance(bt, int) or isinstance(bt, bool) or bt < 1:
        raise TraceFormatError(f"{mp} has block_tokens {bt!r}, not a whole number >= 1: the metadata is corrupt; re-record the trace")
    ctx = meta["context"]
    if not isinstance(ctx, dict):
        raise TraceFormatError(f"{mp} has a malformed 'context' entry; re-record the trace")
    for key in ("type_k", "type_v"):
        if key in ctx and str(ctx[key]).strip().lower() not in KV_TYPES:
            raise TraceFormatError(
                f"{mp} records context {key} {ctx[key]!r}, not a KV type this llamatier knows "
                f"({', '.join(KV_TYPES)}): upgrade llamatier or re-record the trace"
            )
    return meta


def load_trace(path: str | Path, *, positions: bool = False) -> Trace:
    """Load a trace directory, validating version and schema.

    An incomplete trace (Ctrl-C, crash) loads with every completed chunk and
    ``trace.complete == False``.
    """
    p = Path(path)
    meta = read_meta(p)
    try:
        model = ModelInfo.from_dict(meta["model"])
    except Exception:
        raise TraceFormatError(f"{p / META_FILE} has a malformed 'model' entry; re-record the trace") from None
    block_tokens = int(meta["block_tokens"])
    step_frames, attn_chunks, pos_frames = [], [], []
    i = n_steps = 0
    while (p / chunk_name("steps", i)).exists():
        attn_path = p / chunk_name("attn", i)
        if not attn_path.exists():
            raise TraceFormatError(f"trace {p} is truncated: {attn_path.name} is missing; re-record the trace")
        frame = _read_table(p / chunk_name("steps", i), STEP_SCHEMA)
        step_frames.append(frame)
        attn_chunks.append((attn_path, attn_row_count(attn_path), n_steps, n_steps + frame.height))
        n_steps += frame.height
        if positions and (p / chunk_name("positions", i)).exists():
            pos_frames.append(_read_table(p / chunk_name("positions", i), POSITION_SCHEMA))
        i += 1
    if i == 0:
        if meta.get("complete"):
            raise TraceFormatError(f"trace {p} is marked complete but has no chunks: files were removed")
        raise TraceFormatError(
            f"trace {p} holds no completed chunk (the run stopped before the first chunk was written)"
        )
    steps = pl.concat(step_frames)
    if not np.array_equal(steps["step"].to_numpy(), np.arange(n_steps)):
        raise TraceFormatError(f"trace {p} has non-contiguous step numbers; its chunks are mixed up")
    if meta.get("complete") and int(meta.get("n_steps", n_steps)) != n_steps:
        raise TraceFormatError(
            f"trace {p} is marked complete with {meta.get('n_steps')} steps but holds {n_steps}; it is truncated"
        )
    ctx = (steps["pos0"].cast(pl.Int64) + steps["n_tokens"].cast(pl.Int64)).to_numpy()
    n_blocks = int(-(-int(ctx.max()) // block_tokens)) if n_steps else 0
    source = ParquetMassSource(attn_chunks, n_steps=n_steps, n_layers=model.n_layers, n_blocks=n_blocks)
    pos_df = pl.concat(pos_frames) if pos_frames else None
    return Trace(meta=meta, model=model, steps=steps, source=source, block_tokens=block_tokens, path=p, positions=pos_df)
