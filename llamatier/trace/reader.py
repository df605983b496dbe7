"""Load and validate a trace directory into a :class:`Trace`."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from llamatier.errors import TraceFormatError
from llamatier.model import ModelInfo
from llamatier.schema import loads_strict_json, validate
from llamatier.trace.checks import (
    ChunkChecker,
    check_table_layout,
    iter_row_slices,
    read_chunk_table,
    verify_file,
)
from llamatier.trace.chunks import MassSource, ParquetMassSource, iter_step_mass
from llamatier.trace.format import FORMAT_NAME, FORMAT_VERSION, META_FILE, POSITION_SCHEMA
from llamatier.trace.schema import TraceMeta, meta_digest

_CHUNK_RE = re.compile(r"^(steps|attn|positions)-(\d{5,})\.parquet$")


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
    unrecorded: tuple[str, ...] = field(default=(), compare=False)  # chunk files the run never recorded

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


def _meta_error(mp: Path, what: str) -> TraceFormatError:
    return TraceFormatError(f"{mp} {what}: the trace metadata is corrupt; restore it or re-record the trace")


def read_trace_meta(path: str | Path) -> tuple[dict[str, Any], TraceMeta]:
    """Read ``meta.json`` of a trace directory: the raw dict and its validated schema object.

    Checks, in order: UTF-8, JSON (NaN/Infinity refused), the format name and version, the
    declared schema (:class:`~llamatier.trace.schema.TraceMeta`), then ``meta_sha256``.
    """
    p = Path(path)
    if not p.exists():
        raise TraceFormatError(f"trace not found: {p} (record one with `llamatier trace MODEL.gguf --out {p}`)")
    if not p.is_dir():
        raise TraceFormatError(f"{p} is a file, not a trace directory (give the directory `llamatier trace` wrote)")
    mp = p / META_FILE
    if not mp.exists():
        raise TraceFormatError(f"{p} is not a llamatier trace: {META_FILE} is missing (record one with `llamatier trace`)")
    if mp.is_dir():
        raise TraceFormatError(f"{mp} is a directory, not the trace metadata; restore it or re-record the trace")
    try:
        data = mp.read_bytes()
    except OSError as exc:
        raise TraceFormatError(f"cannot read {mp}: {exc.strerror or exc} (check its permissions)") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _meta_error(mp, "is not UTF-8 text") from None
    try:
        meta = loads_strict_json(text)
    except ValueError as exc:
        what = str(exc) if "not JSON" in str(exc) else "is not valid JSON"
        raise _meta_error(mp, what) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise TraceFormatError(f"{p} is not a llamatier trace ({META_FILE} has no format '{FORMAT_NAME}')")
    version = meta.get("version")
    if version == 1:
        raise TraceFormatError(
            f"{p} is trace format v1, which has no checksums: upgrade it with `llamatier upgrade-trace {p}` "
            "(checks every value, then records checksums) or re-record the trace"
        )
    if version != FORMAT_VERSION:
        raise TraceFormatError(
            f"{p} is trace format v{version}; this llamatier reads v{FORMAT_VERSION} "
            "(upgrade llamatier or re-record the trace)"
        )
    tm = validate(TraceMeta, meta, source=str(mp), error=TraceFormatError,
                  fix="the trace metadata is corrupt; restore it or re-record the trace")
    if meta_digest(meta) != tm.meta_sha256:
        raise TraceFormatError(
            f"{mp} does not match its meta_sha256: it was changed after the trace was written; "
            "restore it or re-record the trace"
        )
    return meta, tm


def read_meta(path: str | Path) -> dict[str, Any]:
    """Read and validate ``meta.json`` of a trace directory (schema and checksum); the raw dict."""
    return read_trace_meta(path)[0]


def unrecorded_chunks(path: Path, n_chunks: int) -> list[str]:
    """Chunk files in ``path`` with an index that ``meta.json`` does not list, sorted."""
    out = []
    for f in path.iterdir():
        m = _CHUNK_RE.match(f.name)
        if m and int(m.group(2)) >= n_chunks:
            out.append(f.name)
    return sorted(out)


def load_trace(path: str | Path, *, positions: bool = False) -> Trace:
    """Load a trace directory, verifying the metadata, every chunk's checksum and every value rule.

    Every chunk file is hashed and its rows checked once, here, a row slice at a
    time (memory: one slice plus one chunk's steps); replays then stream the
    attention from the verified files. An incomplete trace (Ctrl-C, crash) loads
    with every recorded chunk and ``trace.complete == False``; chunk files the run
    wrote but never recorded (it stopped in between) are left out and named in
    ``trace.unrecorded``.
    """
    p = Path(path)
    meta, tm = read_trace_meta(p)
    model = tm.model.to_model_info()
    extra = unrecorded_chunks(p, tm.n_chunks)
    if extra and tm.complete:
        raise TraceFormatError(
            f"trace {p} is marked complete but holds chunk files meta.json does not list ({', '.join(extra[:3])}): "
            "they come from another trace; remove them or re-record the trace"
        )
    if not tm.chunks:
        raise TraceFormatError(
            f"trace {p} holds no completed chunk (the run stopped before the first chunk was written)"
        )
    checker = ChunkChecker(tm, p)
    step_frames, attn_chunks, pos_frames = [], [], []
    for rec in tm.chunks:
        for f in rec.files.values():
            verify_file(p, f)
        steps = read_chunk_table(p, "steps", rec.files["steps"])
        ctx = checker.check_steps(rec, steps)
        step_frames.append(steps)
        tables = ["attn", "positions"] if positions and "positions" in rec.files else ["attn"]
        for table in tables:
            f = rec.files[table]
            path = p / f.name
            check_table_layout(path, table, f)
            check = checker.mass_check(rec, table, ctx)
            frames = []
            for rows in iter_row_slices(path, f.rows):
                check.feed(rows)
                if table == "positions":
                    frames.append(rows)
            check.close()
            if table == "positions":
                pos_frames.append(pl.concat(frames) if frames else pl.DataFrame(schema=POSITION_SCHEMA))
        attn = rec.files["attn"]
        attn_chunks.append((p / attn.name, attn.rows, rec.first_step, rec.first_step + rec.n_steps))
    checker.finish()
    steps = pl.concat(step_frames)
    n_steps = steps.height
    ctx = (steps["pos0"].cast(pl.Int64) + steps["n_tokens"].cast(pl.Int64)).to_numpy()
    n_blocks = int(-(-int(ctx.max()) // tm.block_tokens))
    source = ParquetMassSource(attn_chunks, n_steps=n_steps, n_layers=model.n_layers, n_blocks=n_blocks)
    pos_df = pl.concat(pos_frames) if pos_frames else None
    return Trace(meta=meta, model=model, steps=steps, source=source, block_tokens=tm.block_tokens, path=p,
                 positions=pos_df, unrecorded=tuple(extra))
