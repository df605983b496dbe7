"""Chunked trace writer: every completed chunk survives Ctrl-C or a crash."""

from __future__ import annotations

import datetime as _dt
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from llamatier.errors import LlamatierError
from llamatier.outpaths import OutputClaim, atomic_write_bytes, claim_output, make_output_dir
from llamatier.trace.checks import file_record
from llamatier.trace.format import (
    ATTN_SCHEMA,
    FORMAT_NAME,
    FORMAT_VERSION,
    META_FILE,
    POSITION_SCHEMA,
    STEP_SCHEMA,
    chunk_name,
)
from llamatier.trace.schema import seal

CLAIM_FILE = ".llamatier-writer.lock"


def _utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def parquet_bytes(df: pl.DataFrame) -> bytes:
    """A table as the Parquet bytes a trace stores (zstd, no statistics)."""
    buf = io.BytesIO()
    df.write_parquet(buf, compression="zstd", statistics=False)
    return buf.getvalue()


def meta_json_bytes(meta: dict[str, Any]) -> bytes:
    """``meta`` sealed with its checksum, as the JSON text a trace stores (NaN/Infinity refused)."""
    try:
        return json.dumps(seal(meta), indent=2, default=str, allow_nan=False).encode()
    except ValueError:
        bad = [k for k, v in finite_json_paths(meta)]
        raise LlamatierError(
            f"trace metadata holds a number that is not finite ({', '.join(bad[:3]) or 'NaN or Infinity'}): "
            "JSON cannot store it; give finite values"
        ) from None


def finite_json_paths(obj: Any, path: str = "") -> list[tuple[str, float]]:
    """(field, value) for every non-finite float in ``obj``."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [(path or "(value)", obj)]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in finite_json_paths(v, f"{path}.{k}" if path else str(k))]
    if isinstance(obj, list | tuple):
        return [p for i, v in enumerate(obj) for p in finite_json_paths(v, f"{path}[{i}]")]
    return []


def _is_trace_file(name: str) -> bool:
    return (
        name == META_FILE
        or (name.startswith(".") and name.endswith(".tmp"))
        or name.endswith(".parquet.tmp")
        or name == META_FILE + ".tmp"
        or (name.endswith(".parquet") and name.split("-")[0] in ("steps", "attn", "positions"))
    )


def check_out_dir(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """A trace directory we may write: not a file, and empty unless ``overwrite`` (checked before a run)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LlamatierError(f"--out {out} is a file; give a directory for the trace")
    if out.exists() and not overwrite and any(f.name != CLAIM_FILE for f in out.iterdir()):
        raise LlamatierError(f"output directory {out} is not empty; choose another --out or pass --force")
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise LlamatierError(f"cannot create --out directory {out}: {existing} is a file, not a folder")
    return out


def claim_trace_dir(out_dir: str | Path) -> OutputClaim:
    """Create ``out_dir`` and claim it for one trace writer (a second writer gets a one-line error)."""
    out = make_output_dir(out_dir, "--out")
    return claim_output(out / CLAIM_FILE, out, "--out", "trace")


class TraceWriter:
    """Writes a trace directory chunk by chunk.

    The output directory is claimed first (a second writer gets a one-line
    error). ``meta.json`` is written immediately with ``complete: false``; each
    chunk of ``chunk_steps`` steps is written as Parquet files, then recorded in
    ``meta.json`` with its step range, row counts and checksums: a chunk exists
    once ``meta.json`` lists it. ``close()`` marks the trace complete or records
    why it stopped, and releases the claim.
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
        claim: OutputClaim | None = None,
    ) -> None:
        if isinstance(chunk_steps, bool) or not isinstance(chunk_steps, int) or chunk_steps < 1:
            raise LlamatierError(f"--chunk-steps must be a whole number >= 1 (got {chunk_steps!r})")
        if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
            raise LlamatierError(f"--block-tokens must be a whole number >= 1 (got {block_tokens!r})")
        self.out = check_out_dir(out_dir, overwrite=overwrite)
        self._claim = claim if claim is not None else claim_trace_dir(self.out)
        try:
            check_out_dir(self.out, overwrite=overwrite)  # again, now that no other writer can start
            if overwrite:
                # remove only what a trace consists of; anything else in the directory stays
                for f in self.out.iterdir():
                    if f.is_file() and _is_trace_file(f.name):
                        f.unlink()
        except BaseException:
            self._claim.release()
            raise
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
            chunks=[],
        )
        self._rows: list[dict[str, Any]] = []
        self._attn: list[tuple[int, np.ndarray]] = []
        self._pos: list[tuple[int, np.ndarray]] = []
        self.n_steps = 0
        self.n_chunks = 0
        try:
            self._write_meta()
        except BaseException:
            self._claim.release()
            raise

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
        tables = {"attn": self._long_table(self._attn, ATTN_SCHEMA, "block")}
        if self.positions:
            tables["positions"] = self._long_table(self._pos, POSITION_SCHEMA, "pos")
        tables["steps"] = pl.DataFrame({k: [r.get(k) for r in self._rows] for k in STEP_SCHEMA}, schema=STEP_SCHEMA)
        files = {}
        for table, df in tables.items():
            name = chunk_name(table, idx)
            data = parquet_bytes(df)
            atomic_write_bytes(self.out / name, data)
            files[table] = file_record(name, data, df.height)
        first = self.n_steps - len(self._rows)
        self.meta["chunks"] = [
            *self.meta["chunks"],
            {"index": idx, "first_step": first, "n_steps": len(self._rows), "files": files},
        ]
        self.n_chunks += 1
        self._rows, self._attn, self._pos = [], [], []
        self.meta["n_steps"] = self.n_steps
        self.meta["n_chunks"] = self.n_chunks
        self._write_meta()  # the chunk counts from here on

    def close(self, *, complete: bool, interrupted: bool = False, error: str | None = None) -> None:
        """Flush what is buffered, record how the run ended, and release the output directory.

        If writing fails (or Ctrl-C lands here) the claim is kept, so that the caller may call
        ``close`` again; the process's end releases it in any case.
        """
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
        self._claim.release()

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
        atomic_write_bytes(self.out / META_FILE, meta_json_bytes(self.meta))
