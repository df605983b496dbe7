"""Chunked trace writer: every completed chunk survives Ctrl-C or a crash."""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from llamatier.errors import LlamatierError
from llamatier.outpaths import make_output_dir
from llamatier.trace.format import (
    ATTN_SCHEMA,
    FORMAT_NAME,
    FORMAT_VERSION,
    META_FILE,
    POSITION_SCHEMA,
    STEP_SCHEMA,
    chunk_name,
)


def _utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _atomic_write_parquet(df: pl.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    df.write_parquet(tmp, compression="zstd", statistics=False)
    os.replace(tmp, path)


def check_out_dir(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """A trace directory we may write: not a file, and empty unless ``overwrite`` (checked before a run)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LlamatierError(f"--out {out} is a file; give a directory for the trace")
    if out.exists() and not overwrite and any(out.iterdir()):
        raise LlamatierError(f"output directory {out} is not empty; choose another --out or pass --force")
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise LlamatierError(f"cannot create --out directory {out}: {existing} is a file, not a folder")
    return out


class TraceWriter:
    """Writes a trace directory chunk by chunk.

    ``meta.json`` is written immediately with ``complete: false``; each chunk of
    ``chunk_steps`` steps is written as Parquet files (attention first, steps
    last, so a chunk exists once its steps file does). ``close()`` marks the
    trace complete or records why it stopped.
    """

    def __init__(
        self,
        out_dir: str | Path,
        meta: dict[str, Any],
        *,
        n_layers: int,
        block_tokens: int,
        chunk_steps: int = 64,
        positions: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.out = check_out_dir(out_dir, overwrite=overwrite)
        if overwrite and self.out.is_dir():
            # remove only what a trace consists of; anything else in the directory stays
            for f in self.out.iterdir():
                if f.is_file() and (
                    f.name == META_FILE
                    or f.name.endswith(".tmp")
                    or (f.suffix == ".parquet" and f.name.split("-")[0] in ("steps", "attn", "positions"))
                ):
                    f.unlink()
        make_output_dir(self.out, "--out")
        if chunk_steps < 1:
            raise ValueError("chunk_steps must be >= 1")
        self.n_layers = n_layers
        self.block_tokens = block_tokens
        self.chunk_steps = chunk_steps
        self.positions = positions
        self.meta = dict(meta)
        self.meta.update(
            format=FORMAT_NAME,
            version=FORMAT_VERSION,
            complete=False,
            interrupted=False,
            error=None,
            created_utc=_utc_now(),
            block_tokens=block_tokens,
            n_steps=0,
            n_chunks=0,
            chunk_steps=chunk_steps,
        )
        self._rows: list[dict[str, Any]] = []
        self._attn: list[tuple[int, np.ndarray]] = []
        self._pos: list[tuple[int, np.ndarray]] = []
        self.n_steps = 0
        self.n_chunks = 0
        self._write_meta()

    # -- public -----------------------------------------------------------------
    def add_step(
        self,
        row: dict[str, Any],
        block_mass: np.ndarray,
        position_mass: np.ndarray | None = None,
    ) -> None:
        """Append one step. ``block_mass`` is float32 [n_layers, n_visible_blocks]."""
        row = dict(row)
        row["step"] = self.n_steps
        self._rows.append(row)
        self._attn.append((self.n_steps, np.asarray(block_mass, dtype=np.float32)))
        if self.positions and position_mass is not None:
            self._pos.append((self.n_steps, np.asarray(position_mass, dtype=np.float32)))
        self.n_steps += 1
        if len(self._rows) >= self.chunk_steps:
            self.flush()

    def flush(self) -> None:
        """Write buffered steps as a new chunk (no-op when empty)."""
        if not self._rows:
            return
        idx = self.n_chunks
        _atomic_write_parquet(self._long_table(self._attn, ATTN_SCHEMA, "block"), self.out / chunk_name("attn", idx))
        if self.positions:
            _atomic_write_parquet(
                self._long_table(self._pos, POSITION_SCHEMA, "pos"), self.out / chunk_name("positions", idx)
            )
        steps = pl.DataFrame(
            {k: [r.get(k) for r in self._rows] for k in STEP_SCHEMA}, schema=STEP_SCHEMA
        )
        _atomic_write_parquet(steps, self.out / chunk_name("steps", idx))
        self.n_chunks += 1
        self._rows, self._attn, self._pos = [], [], []
        self.meta["n_steps"] = self.n_steps
        self.meta["n_chunks"] = self.n_chunks
        self._write_meta()

    def close(self, *, complete: bool, interrupted: bool = False, error: str | None = None) -> None:
        """Flush what is buffered and record how the run ended."""
        self.flush()
        self.meta.update(
            complete=bool(complete),
            interrupted=bool(interrupted),
            error=error,
            finished_utc=_utc_now(),
            n_steps=self.n_steps,
            n_chunks=self.n_chunks,
        )
        self._write_meta()

    def update_meta(self, **kw: Any) -> None:
        self.meta.update(kw)
        self._write_meta()

    # -- internals --------------------------------------------------------------
    def _long_table(
        self, items: list[tuple[int, np.ndarray]], schema: dict[str, pl.DataType], col: str
    ) -> pl.DataFrame:
        steps, layers, idx, mass = [], [], [], []
        for step, arr in items:
            nl, nb = arr.shape
            steps.append(np.full(nl * nb, step, dtype=np.uint32))
            layers.append(np.repeat(np.arange(nl, dtype=np.uint16), nb))
            idx.append(np.tile(np.arange(nb, dtype=np.uint32), nl))
            mass.append(arr.reshape(-1))
        def cat(xs: list[np.ndarray], dt: type) -> np.ndarray:
            return np.concatenate(xs) if xs else np.zeros(0, dtype=dt)

        cols = {
            "step": cat(steps, np.uint32),
            "layer": cat(layers, np.uint16),
            col: cat(idx, np.uint32),
            "mass": cat(mass, np.float32),
        }
        if col == "block":
            # a block without attention (outside a sliding window) is no row: readers fill in 0
            keep = cols["mass"] != 0.0
            cols = {k: v[keep] for k, v in cols.items()}
        return pl.DataFrame(cols, schema=schema)

    def _write_meta(self) -> None:
        _atomic_write_bytes(self.out / META_FILE, json.dumps(self.meta, indent=2, default=str).encode())
