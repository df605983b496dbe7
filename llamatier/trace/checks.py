"""Integrity of a trace's chunks: checksums, column types and value rules, one chunk at a time.

For each chunk, in order: :func:`verify_file` (size and SHA-256 against
``meta.json``, read in blocks) and :func:`check_table_layout` (exact column
names and types, the recorded row count) for each file; then
:meth:`ChunkChecker.check_steps` on the steps table (the checker carries what
the rules need from the previous chunk: the next position, the last sampled
token, the clocks) and a :class:`MassCheck` fed the attention rows in batches of
any size. :meth:`ChunkChecker.finish` checks whole-trace rules at the end.
:meth:`ChunkChecker.check_chunk` does a whole chunk held in memory.

Value rules (each violation is a one-line :class:`TraceFormatError`):

* steps: step numbers continue the previous chunk; ``phase`` is prefill or
  decode, prefill before decode; ``n_tokens`` >= 1 (1 for decode); each batch
  starts where the previous ended (``pos0``) and stays inside ``n_ctx``; a decode
  step's input token is the previous step's sampled token; token ids are in the
  vocabulary; times and llama.cpp's cumulative counters are finite, >= 0 and
  never go back; a step starts after the previous one finished.
* attention (and positions): rows ordered by (step, layer, block), each once
  (a block without a row holds 0); steps of this chunk, layers of the model,
  blocks inside the step's context; each (step, layer) has rows for one
  unbroken range of blocks from the oldest block the step's first query sees
  (0, or the block of ``pos0 - sliding_window + 1`` on a sliding-window layer)
  to the step's last visible block (the newest token attends to itself), so
  ``block_tokens`` covers the positions and no row can go missing unnoticed; positions tables hold every position from 0; mass
  finite in [0, 1]; each (step, layer) sums to 1 within
  :data:`MASS_SUM_TOLERANCE` (softmax rows sum to 1; float32 rounding stays
  below 1e-6 in recorded traces).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from llamatier.errors import TraceFormatError
from llamatier.trace.format import ATTN_SCHEMA, POSITION_SCHEMA, STEP_SCHEMA
from llamatier.trace.schema import ChunkRecord, FileRecord, TraceMeta

MASS_SUM_TOLERANCE = 1e-4
_TIME_SLACK_S = 1e-6
PHASES = ("prefill", "decode")
TABLE_SCHEMAS = {"steps": STEP_SCHEMA, "attn": ATTN_SCHEMA, "positions": POSITION_SCHEMA}


def file_record(name: str, data: bytes, rows: int) -> dict[str, object]:
    """The ``meta.json`` record of one chunk file written as ``data``."""
    return {"name": name, "rows": int(rows), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


_FIX = "restore the trace from a copy or re-record it"
_HASH_BLOCK = 1 << 22


def _chunk_path(trace_dir: Path, rec: FileRecord) -> Path:
    path = trace_dir / rec.name
    if not path.exists():
        raise TraceFormatError(f"trace {trace_dir} is truncated: {rec.name}, listed in its meta.json, is missing; {_FIX}")
    if path.is_dir() or not os.access(path, os.R_OK):
        what = "is a directory" if path.is_dir() else "is not readable (check its permissions)"
        raise TraceFormatError(f"trace chunk {path} {what}; {_FIX}")
    return path


def verify_file(trace_dir: Path, rec: FileRecord) -> Path:
    """Check one chunk file's size and SHA-256 against its record (read in blocks); returns its path."""
    path = _chunk_path(trace_dir, rec)
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as fh:
            while block := fh.read(_HASH_BLOCK):
                digest.update(block)
                size += len(block)
    except OSError as exc:
        raise TraceFormatError(f"cannot read trace chunk {path}: {exc.strerror or exc}; {_FIX}") from None
    if size != rec.bytes or digest.hexdigest() != rec.sha256:
        raise TraceFormatError(
            f"corrupt trace chunk {path}: it does not match the checksum in meta.json ({size} bytes, "
            f"{rec.bytes} recorded), so it was damaged or replaced; {_FIX}"
        )
    return path


def check_table_layout(path: Path, table: str, rec: FileRecord) -> None:
    """Exactly the declared columns, in order, with exactly their types, and the recorded row count."""
    try:
        got = dict(pl.read_parquet_schema(path))
        rows = int(pl.scan_parquet(path).select(pl.len()).collect().item())
    except Exception as exc:
        first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise TraceFormatError(f"trace chunk {path} is not readable Parquet ({first}); {_FIX}") from None
    schema = TABLE_SCHEMAS[table]
    if list(got) != list(schema):
        raise TraceFormatError(
            f"trace chunk {path} has columns {list(got)}, not {list(schema)}: it is not a llamatier {table} table; {_FIX}"
        )
    for col, dtype in schema.items():
        if got[col] != dtype:
            raise TraceFormatError(f"trace chunk {path}: column {col} is {got[col]}, not {dtype}; {_FIX}")
    if rows != rec.rows:
        raise TraceFormatError(f"trace chunk {path} holds {rows} rows, {rec.rows} recorded in meta.json; {_FIX}")


def read_chunk_table(trace_dir: Path, table: str, rec: FileRecord) -> pl.DataFrame:
    """Read a whole chunk file after :func:`verify_file` and :func:`check_table_layout`."""
    path = verify_file(trace_dir, rec)
    check_table_layout(path, table, rec)
    try:
        return pl.read_parquet(path)
    except Exception as exc:
        raise TraceFormatError(f"trace chunk {path} is not readable Parquet ({str(exc)[:120]}); {_FIX}") from None


def iter_row_slices(path: Path, n_rows: int, batch_rows: int = 1 << 22) -> Iterator[pl.DataFrame]:
    """A chunk file's rows, ``batch_rows`` at a time (bounded memory for long contexts)."""
    for off in range(0, n_rows, batch_rows):
        try:
            yield pl.scan_parquet(path).slice(off, batch_rows).collect()
        except Exception as exc:
            raise TraceFormatError(f"trace chunk {path} is not readable Parquet ({str(exc)[:120]}); {_FIX}") from None


@dataclass
class _Carry:
    next_step: int = 0
    next_pos: int = 0
    seen_decode: bool = False
    last_token_out: int = -1
    t_end_s: float = 0.0
    perf: tuple[float, float, int, int] = (0.0, 0.0, 0, 0)
    prefill_tokens: int = 0
    decode_steps: int = 0


class ChunkChecker:
    """Checks the chunks of one trace in order; see the module docstring for the rules."""

    def __init__(self, meta: TraceMeta, trace_dir: Path) -> None:
        self.meta = meta
        self.where = str(trace_dir)
        self.carry = _Carry()
        self.step_pos0: tuple[int, np.ndarray] | None = None

    def fail(self, chunk: ChunkRecord, table: str, rule: str) -> TraceFormatError:
        name = chunk.files[table].name if table in chunk.files else f"chunk {chunk.index}"
        return TraceFormatError(f"trace {self.where}: {name}: {rule}; the trace is corrupt: re-record it")

    def check_chunk(
        self,
        chunk: ChunkRecord,
        steps: pl.DataFrame,
        attn: pl.DataFrame,
        positions: pl.DataFrame | None = None,
    ) -> None:
        """All value rules for chunk ``chunk.index`` (call in chunk order)."""
        ctx = self.check_steps(chunk, steps)
        for table, df in (("attn", attn), ("positions", positions)):
            if df is not None:
                check = self.mass_check(chunk, table, ctx)
                check.feed(df)
                check.close()

    def finish(self) -> None:
        """Whole-trace rules, once every chunk was checked."""
        c, m = self.carry, self.meta
        if c.next_step != m.n_steps:
            raise TraceFormatError(f"trace {self.where}: the chunks hold {c.next_step} steps, meta.json says {m.n_steps}")
        if not m.complete:
            return
        ctx = m.context
        if c.prefill_tokens != ctx.n_prompt_tokens:
            raise TraceFormatError(
                f"trace {self.where} is marked complete but its prefill steps hold {c.prefill_tokens} of "
                f"{ctx.n_prompt_tokens} prompt tokens; the trace is corrupt: re-record it"
            )
        if c.decode_steps > ctx.n_predict or (c.decode_steps < ctx.n_predict and not ctx.stop_at_eos):
            raise TraceFormatError(
                f"trace {self.where} is marked complete with {c.decode_steps} decode steps of --n-predict "
                f"{ctx.n_predict}; the trace is corrupt: re-record it"
            )

    # -- steps ------------------------------------------------------------------------------
    def check_steps(self, chunk: ChunkRecord, df: pl.DataFrame) -> np.ndarray:
        """Check the steps table of one chunk; returns the context length after each step (int64)."""
        c, m, ctxm = self.carry, self.meta, self.meta.context

        def fail(rule: str, rows: np.ndarray) -> TraceFormatError:
            i = int(np.flatnonzero(rows)[0])
            return self.fail(chunk, "steps", f"step {chunk.first_step + i}: {rule}")

        n = df.height
        col = {k: df[k].to_numpy() for k in STEP_SCHEMA}
        step = col["step"].astype(np.int64)
        bad = step != chunk.first_step + np.arange(n)
        if bad.any():
            raise fail(f"step number {int(step[bad][0])} out of sequence (the chunk covers steps from {chunk.first_step})", bad)
        phase = df["phase"]
        bad = ~phase.is_in(PHASES).to_numpy()
        if bad.any():
            raise fail(f"phase {phase.to_list()[int(np.flatnonzero(bad)[0])]!r} is not one of {', '.join(PHASES)}", bad)
        dec = (phase == "decode").to_numpy()
        seen = np.maximum.accumulate(dec) | c.seen_decode
        bad = seen & ~dec
        if bad.any():
            raise fail("a prefill step after decode steps", bad)
        n_tok = col["n_tokens"].astype(np.int64)
        pos0 = col["pos0"].astype(np.int64)
        for rule, rows in (
            ("n_tokens must be >= 1", n_tok < 1),
            ("a decode step must hold 1 token", dec & (n_tok != 1)),
            (f"a prefill batch holds more than n_batch {ctxm.n_batch} tokens", ~dec & (n_tok > ctxm.n_batch)),
        ):
            if rows.any():
                raise fail(rule, rows)
        expect = np.concatenate([[c.next_pos], (pos0 + n_tok)[:-1]])
        bad = pos0 != expect
        if bad.any():
            raise fail(f"pos0 {int(pos0[bad][0])} does not continue the previous batch (expected {int(expect[bad][0])})", bad)
        ctx = pos0 + n_tok
        limits = (
            (f"the batch ends past n_ctx {ctxm.n_ctx}", ctx > ctxm.n_ctx),
            (f"a prefill batch ends past the prompt's {ctxm.n_prompt_tokens} tokens", ~dec & (ctx > ctxm.n_prompt_tokens)),
            (f"a decode step before the prompt's {ctxm.n_prompt_tokens} tokens were read", dec & (pos0 < ctxm.n_prompt_tokens)),
            (
                f"more decode steps than --n-predict {ctxm.n_predict}",
                dec & (ctx > ctxm.n_prompt_tokens + ctxm.n_predict),
            ),
        )
        for rule, rows in limits:
            if rows.any():
                raise fail(rule, rows)
        n_kv = col["n_kv"].astype(np.int64)
        bad = (n_kv < ctx) | (n_kv > ctxm.n_ctx) if m.capture.enabled else n_kv != 0
        if bad.any():
            rule = "n_kv must cover the context and stay within n_ctx" if m.capture.enabled else "n_kv must be 0 without capture"
            raise fail(f"{rule} (got {int(n_kv[bad][0])})", bad)
        self._check_tokens(fail, col, dec, ctx)
        self._check_clocks(fail, col)
        c.next_step += n
        c.next_pos = int(ctx[-1]) if n else c.next_pos
        c.seen_decode = bool(seen[-1]) if n else c.seen_decode
        c.prefill_tokens += int(n_tok[~dec].sum())
        c.decode_steps += int(dec.sum())
        self.step_pos0 = (chunk.index, pos0.astype(np.int64))  # for the mass checks of this chunk
        return ctx

    def _check_tokens(self, fail, col, dec: np.ndarray, ctx: np.ndarray) -> None:  # noqa: ANN001
        c, ctxm, n_vocab = self.carry, self.meta.context, self.meta.model.n_vocab
        tin = col["token_in"].astype(np.int64)
        tout = col["token_out"].astype(np.int64)
        top = n_vocab if n_vocab > 0 else np.iinfo(np.int32).max
        for rule, rows in (
            (f"token_in outside the vocabulary [0, {top})", (tin < 0) | (tin >= top)),
            (f"token_out outside the vocabulary [0, {top}) and not -1", (tout < -1) | (tout >= top)),
            ("a decode step without a sampled token", dec & (tout < 0)),
            ("a prefill step sampled a token before the prompt's end", ~dec & (tout >= 0) & (ctx != ctxm.n_prompt_tokens)),
        ):
            if rows.any():
                raise fail(rule, rows)
        prev = np.concatenate([[c.last_token_out], tout[:-1]])
        bad = dec & (tin != prev)
        if bad.any():
            raise fail(f"a decode step's input token {int(tin[bad][0])} is not the token sampled before ({int(prev[bad][0])})", bad)
        if len(tout):
            c.last_token_out = int(tout[-1])

    def _check_clocks(self, fail, col) -> None:  # noqa: ANN001
        c = self.carry
        t = col["t_start_s"]
        d = col["decode_s"]
        for name, rule, rows in (
            ("t_start_s", "must be finite and >= 0", ~np.isfinite(t) | (t < 0)),
            ("decode_s", "must be finite and >= 0", ~np.isfinite(d) | (d < 0)),
            ("capture_s", "must be finite and >= 0", ~np.isfinite(col["capture_s"]) | (col["capture_s"] < 0)),
        ):
            if rows.any():
                raise fail(f"{name} {rule} (got {col[name][rows][0]!r})", rows)
        prev_end = np.concatenate([[c.t_end_s], (t + d)[:-1]])
        bad = t < prev_end - _TIME_SLACK_S
        if bad.any():
            raise fail("t_start_s is before the previous step ended", bad)
        perf_cols = ("perf_t_p_eval_ms", "perf_t_eval_ms", "perf_n_p_eval", "perf_n_eval")
        for k, name in enumerate(perf_cols):
            v = col[name].astype(np.float64)
            bad = ~np.isfinite(v) | (v < 0)
            if bad.any():
                raise fail(f"{name} must be finite and >= 0 (got {v[bad][0]!r})", bad)
            prev = np.concatenate([[c.perf[k]], v[:-1]])
            bad = v < prev
            if bad.any():
                raise fail(f"{name} went back (llama.cpp's counters are cumulative)", bad)
        if len(t):
            c.t_end_s = float(t[-1] + d[-1])
            c.perf = tuple(col[name][-1].item() for name in perf_cols)  # type: ignore[assignment]

    def mass_check(self, chunk: ChunkRecord, table: str, ctx: np.ndarray) -> MassCheck:
        """A checker for the rows of ``table`` (attn or positions) of ``chunk``, fed in row batches."""
        unit, width = ("block", self.meta.block_tokens) if table == "attn" else ("pos", 1)
        return MassCheck(self, chunk, table, unit, ctx, width)


class MassCheck:
    """Value rules for one chunk's attention rows, fed as consecutive row batches (:meth:`feed`).

    Memory: one batch plus per-(step, layer) sums of this chunk.
    """

    def __init__(self, owner: ChunkChecker, chunk: ChunkRecord, table: str, unit: str, ctx: np.ndarray, width: int) -> None:
        self.owner, self.chunk, self.table, self.unit = owner, chunk, table, unit
        self.L = owner.meta.model.n_layers
        self.n = chunk.n_steps
        self.first = chunk.first_step
        self.ctx = ctx
        self.width = width
        self.hi = -(-ctx // width)  # visible blocks (positions) after each step
        self.sums = np.zeros(self.n * self.L, dtype=np.float64)
        self.seen = np.zeros(self.n * self.L, dtype=bool)
        self.first_idx = np.full(self.n * self.L, -1, dtype=np.int64)  # first and last row of each (step, layer)
        self.last_idx = np.full(self.n * self.L, -1, dtype=np.int64)
        self.prev: tuple[int, int, int] | None = None
        self.rows = 0

    def fail(self, rule: str) -> TraceFormatError:
        return self.owner.fail(self.chunk, self.table, rule)

    def feed(self, df: pl.DataFrame) -> None:
        """Check the next rows of the chunk (columns step, layer, block/pos, mass)."""
        if not self.owner.meta.capture.enabled:
            if df.height:
                raise self.fail(f"{df.height} attention rows, but capture.enabled is false")
            return
        s = df["step"].to_numpy().astype(np.int64) - self.first
        layer = df["layer"].to_numpy().astype(np.int64)
        idx = df[self.unit].to_numpy().astype(np.int64)
        mass = df["mass"].to_numpy()
        row0 = self.rows
        self.rows += df.height

        def fail(rule: str, rows: np.ndarray) -> TraceFormatError:
            i = int(np.flatnonzero(rows)[0])
            where = f"row {row0 + i} (step {int(s[i]) + self.first}, layer {int(layer[i])}, {self.unit} {int(idx[i])})"
            return self.fail(f"{where}: {rule}")

        if not df.height:
            return
        bad = (s < 0) | (s >= self.n)
        if bad.any():
            raise fail(f"step outside the chunk's steps {self.first}..{self.first + self.n - 1}", bad)
        bad = layer >= self.L
        if bad.any():
            raise fail(f"layer outside the model's {self.L} layers", bad)
        bad = idx >= self.hi[s]
        if bad.any():
            raise fail(f"{self.unit} outside the step's context of {int(self.ctx[s[bad][0]])} tokens", bad)
        ps, pl_, pi = self.prev if self.prev is not None else (-1, 0, 0)
        a_s, a_l, a_i = np.concatenate([[ps], s]), np.concatenate([[pl_], layer]), np.concatenate([[pi], idx])
        ds, dl, di = np.diff(a_s), np.diff(a_l), np.diff(a_i)
        bad = ~((ds > 0) | ((ds == 0) & ((dl > 0) | ((dl == 0) & (di > 0)))))
        if bad.any():
            raise fail(f"rows must be ordered by step, layer, {self.unit}, each once (duplicate or out of order)", bad)
        bad = ~np.isfinite(mass) | (mass < 0) | (mass > 1 + MASS_SUM_TOLERANCE)
        if bad.any():
            raise fail(f"mass {float(mass[bad][0])!r} is not a probability in [0, 1]", bad)
        bad = (ds == 0) & (dl == 0) & (di != 1)
        if bad.any():
            raise fail(f"a gap before this row: a (step, layer) holds one unbroken range of {self.unit}s "
                       "(rows inside it are missing)", bad)
        group = s * self.L + layer
        self.sums += np.bincount(group, weights=mass.astype(np.float64), minlength=self.n * self.L)
        start = np.concatenate([[True], group[1:] != group[:-1]])
        end = np.concatenate([group[1:] != group[:-1], [True]])
        fresh = start & ~self.seen[group]  # a group continued from the previous batch keeps its first row
        self.first_idx[group[fresh]] = idx[fresh]
        self.last_idx[group[end]] = idx[end]
        self.seen[group] = True
        self.prev = (int(s[-1]), int(layer[-1]), int(idx[-1]))

    def close(self) -> None:
        """Rules over the whole chunk: every (step, layer) sums to 1; the last block of each step holds mass."""
        if not self.owner.meta.capture.enabled:
            return
        first, L = self.first, self.L
        if not self.seen.all():
            g = int(np.flatnonzero(~self.seen)[0])
            raise self.fail(f"step {first + g // L}, layer {g % L} has no attention rows (they sum to 0, not 1)")
        bad = np.abs(self.sums - 1.0) > MASS_SUM_TOLERANCE
        if bad.any():
            g = int(np.flatnonzero(bad)[0])
            raise self.fail(
                f"step {first + g // L}, layer {g % L}: mass sums to {self.sums[g]:.6g}, not 1 "
                f"(tolerance {MASS_SUM_TOLERANCE:g})"
            )
        last = np.repeat(self.hi - 1, L)
        bad = self.last_idx != last
        if bad.any():
            g = int(np.flatnonzero(bad)[0])
            raise self.fail(
                f"step {first + g // L}, layer {g % L}: rows end at {self.unit} {int(self.last_idx[g])}, not at the "
                f"step's last visible {self.unit} ({int(last[g])}): rows are missing, or block_tokens does not "
                "cover the positions"
            )
        if self.unit == "pos":
            bad = self.first_idx != 0
            if bad.any():
                g = int(np.flatnonzero(bad)[0])
                raise self.fail(f"step {first + g // L}, layer {g % L}: rows start at pos {int(self.first_idx[g])}, "
                                "not 0 (a positions table holds every position)")
            return
        pos0 = self.owner.step_pos0
        if pos0 is None or pos0[0] != self.chunk.index:
            return
        window = np.asarray(self.owner.meta.model.geometry.sliding_window, dtype=np.int64)
        # the first query sees back to pos0 - window + 1 on a sliding-window layer, to 0 on the others
        oldest = np.where(window[None, :] > 0, np.maximum(pos0[1][:, None] - window[None, :] + 1, 0), 0)
        start = (oldest // self.width).reshape(-1)
        bad = self.first_idx > start
        if bad.any():
            g = int(np.flatnonzero(bad)[0])
            raise self.fail(
                f"step {first + g // L}, layer {g % L}: rows start at block {int(self.first_idx[g])}, after the "
                f"oldest block the step attends to ({int(start[g])}): rows are missing"
            )
