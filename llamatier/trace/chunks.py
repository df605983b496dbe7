"""Attention mass step by step, without ever holding a whole trace.

A trace's attention is a long table of (step, layer, block, mass) rows, one
per block that received attention (a block without a row received none). A
:class:`MassSource` hands it out in batches of rows (:class:`RowBatch`) that
cover consecutive steps, forwards or backwards; :func:`iter_step_mass` turns
those batches into one dense ``float32 [layers, blocks]`` array per step. A
step's rows may be split across batches at any row (a chunk file read in
slices, say): rows of a step are gathered until the step is complete. So the
memory a reader needs is one batch plus one step, whatever the trace's length.

Sources: :class:`ParquetMassSource` (a trace directory's ``attn-*.parquet``
chunks, read in row slices), :class:`ArrayMassSource` (a dense array already in
memory), and the on-the-fly synthetic source in :mod:`llamatier.replay.synthetic`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from llamatier.errors import TraceFormatError

DEFAULT_BATCH_ROWS = 1 << 22  # rows read at once from a chunk file (~56 MB of columns)


@dataclass(frozen=True)
class RowBatch:
    """Attention rows of consecutive steps, ordered by step (then in any order)."""

    step: np.ndarray  # int64 [n]
    layer: np.ndarray  # int64 [n]
    block: np.ndarray  # int64 [n]
    mass: np.ndarray  # float32 [n]

    @property
    def n_rows(self) -> int:
        return int(self.step.size)

    def take(self, sel: slice | np.ndarray) -> RowBatch:
        return RowBatch(self.step[sel], self.layer[sel], self.block[sel], self.mass[sel])


def concat_batches(parts: Sequence[RowBatch]) -> RowBatch:
    if len(parts) == 1:
        return parts[0]
    return RowBatch(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("step", "layer", "block", "mass")))


class MassSource(ABC):
    """Where a trace's attention mass comes from: batches of rows, forwards or backwards."""

    n_steps: int
    n_layers: int
    n_blocks: int

    @abstractmethod
    def batches(self, *, reverse: bool = False) -> Iterator[RowBatch]:
        """Row batches covering every step in step order (``reverse``: from the last step back).

        Within a batch rows are ordered by step in the same direction; a step may
        continue in the next batch.
        """

    dense_steps: bool = False  # True: step_dense gives each step whole, and iter_step_mass skips the rows

    def step_dense(self, s: int) -> np.ndarray:
        """Step s's mass as float32 [layers, leading blocks] (sources whose ``dense_steps`` is True)."""
        raise NotImplementedError

    def dense(self) -> np.ndarray:
        """The whole mass as float32 [steps, layers, blocks] (small traces only)."""
        out = np.zeros((self.n_steps, self.n_layers, self.n_blocks), dtype=np.float32)
        for b in self.batches():
            out[b.step, b.layer, b.block] = b.mass
        return out


class ArrayMassSource(MassSource):
    """A dense float32 [steps, layers, blocks] array in memory, handed out ``steps_per_batch`` steps at a time."""

    def __init__(self, mass: np.ndarray, *, steps_per_batch: int = 16) -> None:
        self.mass = mass
        self.n_steps, self.n_layers, self.n_blocks = (int(x) for x in mass.shape)
        self.steps_per_batch = max(1, int(steps_per_batch))

    def batches(self, *, reverse: bool = False) -> Iterator[RowBatch]:
        starts = range(0, self.n_steps, self.steps_per_batch)
        for s0 in reversed(starts) if reverse else starts:
            part = self.mass[s0 : s0 + self.steps_per_batch]
            s, layer, b = np.nonzero(part)
            if reverse:
                s, layer, b = s[::-1], layer[::-1], b[::-1]
            yield RowBatch(s + s0, layer, b, part[s, layer, b])

    dense_steps = True

    def step_dense(self, s: int) -> np.ndarray:
        return self.mass[s]

    def dense(self) -> np.ndarray:
        return self.mass


def read_attn_rows(path: Path, offset: int = 0, n_rows: int | None = None) -> RowBatch:
    """Rows ``offset .. offset + n_rows`` of one ``attn-*.parquet`` chunk (one-line error when unreadable)."""
    try:
        lf = pl.scan_parquet(path).select("step", "layer", "block", "mass")
        df = (lf.slice(offset, n_rows) if (offset or n_rows is not None) else lf).collect()
    except Exception as exc:
        raise TraceFormatError(
            f"corrupt trace chunk {path}: {str(exc).splitlines()[0][:120]} (delete the chunk and "
            "later ones, or re-record the trace)"
        ) from None
    try:
        return RowBatch(
            df["step"].to_numpy().astype(np.int64),
            df["layer"].to_numpy().astype(np.int64),
            df["block"].to_numpy().astype(np.int64),
            df["mass"].cast(pl.Float32, strict=True).to_numpy(),
        )
    except Exception:
        raise TraceFormatError(f"trace chunk {path} has columns of the wrong type; re-record the trace") from None


def check_attn_rows(path: Path, rows: RowBatch, steps: tuple[int, int], n_layers: int, n_blocks: int) -> None:
    """Rows of chunk ``path`` lie within the chunk's steps ``[lo, hi)``, the model's layers and the context."""
    if rows.n_rows == 0:
        return
    lo, hi = steps
    if (
        rows.step.min() < lo or rows.step.max() >= hi or rows.layer.min() < 0 or rows.layer.max() >= n_layers
        or rows.block.min() < 0 or rows.block.max() >= n_blocks
    ):
        raise TraceFormatError(f"trace {path.parent} has attention rows outside its steps, layers or blocks")


class ParquetMassSource(MassSource):
    """The ``attn-*.parquet`` chunks of a trace directory, read ``batch_rows`` rows at a time."""

    def __init__(
        self,
        chunks: Sequence[tuple[Path, int, int, int]],
        *,
        n_steps: int,
        n_layers: int,
        n_blocks: int,
        batch_rows: int = DEFAULT_BATCH_ROWS,
    ) -> None:
        """``chunks``: (file, its row count, first step, one past its last step), in step order."""
        self.chunks = list(chunks)
        self.n_steps, self.n_layers, self.n_blocks = n_steps, n_layers, n_blocks
        self.batch_rows = max(1, int(batch_rows))

    def batches(self, *, reverse: bool = False) -> Iterator[RowBatch]:
        order = reversed(self.chunks) if reverse else self.chunks
        for path, n_rows, s0, s1 in order:
            offsets = list(range(0, n_rows, self.batch_rows))
            last_step = s1 if reverse else s0 - 1
            for off in reversed(offsets) if reverse else offsets:
                rows = read_attn_rows(path, off, min(self.batch_rows, n_rows - off))
                check_attn_rows(path, rows, (s0, s1), self.n_layers, self.n_blocks)
                edge = int(rows.step[-1] if reverse else rows.step[0]) if rows.n_rows else last_step
                if (rows.n_rows and np.any(rows.step[1:] < rows.step[:-1])) or (
                    edge > last_step if reverse else edge < last_step
                ):
                    raise TraceFormatError(
                        f"trace chunk {path} holds attention rows out of step order: it was not written by "
                        "llamatier; re-record the trace"
                    )
                if rows.n_rows:
                    last_step = int(rows.step[0] if reverse else rows.step[-1])
                    yield rows.take(slice(None, None, -1)) if reverse else rows


def iter_step_mass(
    source: MassSource,
    *,
    reverse: bool = False,
    layers: np.ndarray | None = None,
    n_blocks: int | None = None,
    group: int = 1,
) -> Iterator[tuple[int, np.ndarray]]:
    """``(step, float32 [layers, blocks])`` for every step, in order (or backwards).

    ``layers`` picks (and may repeat) source layers, e.g. a what-if model's map
    onto traced layers; ``n_blocks`` sets the width (default the source's);
    ``group`` sums each run of ``group`` blocks into one (coarser blocks). Every
    step gets a fresh array, so callers may keep it.
    """
    S, L, NB = source.n_steps, source.n_layers, source.n_blocks
    width = -(-NB // group) if n_blocks is None else int(n_blocks)
    pending: list[RowBatch] = []
    steps = range(S - 1, -1, -1) if reverse else range(S)
    it = iter(steps)
    nxt = next(it, None)

    fine_width = max(width * group, NB)

    def emit(rows: RowBatch | None, s: int, step: np.ndarray | None = None) -> tuple[int, np.ndarray]:
        dense = np.zeros((L, fine_width), dtype=np.float32)
        if step is not None:  # + 0 turns -0.0 into the 0.0 that a cell without a row holds
            np.add(step, np.float32(0.0), out=dense[:, : step.shape[1]])
        elif rows is not None and rows.n_rows:
            dense[rows.layer, rows.block] = rows.mass
        if group > 1:  # coarser blocks: the same float32 sums as a reshape of the whole array
            dense = dense[:, : width * group].reshape(L, width, group).sum(axis=2)
        elif fine_width != width:
            dense = dense[:, :width]
        return s, (dense if layers is None else dense[layers])

    if source.dense_steps:
        for s in steps:
            yield emit(None, s, source.step_dense(s))
        return
    for batch in source.batches(reverse=reverse):
        if batch.n_rows == 0:
            continue
        if pending:
            batch = concat_batches([*pending, batch])
            pending = []
        st = batch.step
        # boundaries between steps in this batch; the last step may continue in the next batch
        cut = np.flatnonzero(st[1:] != st[:-1]) + 1
        starts = np.concatenate([[0], cut])
        ends = np.concatenate([cut, [st.size]])
        for a, e in zip(starts[:-1], ends[:-1], strict=True):
            s = int(st[a])
            while nxt is not None and nxt != s:
                yield emit(None, nxt)  # a step without rows holds no attention
                nxt = next(it, None)
            yield emit(batch.take(slice(a, e)), s)
            nxt = next(it, None)
        pending = [batch.take(slice(int(starts[-1]), int(ends[-1])))]
    if pending:
        last = pending[0]
        s = int(last.step[0])
        while nxt is not None and nxt != s:
            yield emit(None, nxt)
            nxt = next(it, None)
        yield emit(last, s)
        nxt = next(it, None)
    while nxt is not None:
        yield emit(None, nxt)
        nxt = next(it, None)
