"""Streaming a trace's attention step by step equals reading it whole, however its rows are split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamatier.errors import TraceFormatError
from llamatier.replay.synthetic import synthetic_trace
from llamatier.trace import TraceWriter, load_trace
from llamatier.trace.chunks import ArrayMassSource, ParquetMassSource, iter_step_mass
from tests.corruption import reseal


def write_trace(tr, out: Path, chunk_steps: int) -> Path:  # noqa: ANN001 - Trace
    """Write a Trace (e.g. a synthetic one) through the real writer, as the tracer does."""
    meta = {k: v for k, v in tr.meta.items() if k in ("model", "context", "capture")}
    w = TraceWriter(out, meta, n_layers=tr.n_layers, block_tokens=tr.block_tokens, chunk_steps=chunk_steps)
    vb = tr.visible_blocks
    for row, (s, m) in zip(tr.steps.drop("step").iter_rows(named=True), tr.iter_mass(), strict=True):
        w.add_step(row, m[:, : vb[s]])
    w.close(complete=True)
    return out


def resplit(src: ParquetMassSource, batch_rows: int) -> ParquetMassSource:
    return ParquetMassSource(src.chunks, n_steps=src.n_steps, n_layers=src.n_layers, n_blocks=src.n_blocks,
                             batch_rows=batch_rows)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    chunk_steps=st.integers(1, 9),
    batch_rows=st.integers(1, 400),
    window=st.sampled_from([0, 40]),
    prefill_chunk=st.sampled_from([16, 37, 200]),
    seed=st.integers(0, 3),
)
def test_streamed_mass_equals_the_whole_array(tmp_path_factory, chunk_steps, batch_rows, window, prefill_chunk, seed):
    tr = synthetic_trace(n_layers=3, n_prompt=150, n_decode=9, sliding_window=window, swa_pattern=2,
                         prefill_chunk=prefill_chunk, seed=seed)
    d = write_trace(tr, tmp_path_factory.mktemp("t") / "tr", chunk_steps)
    back = load_trace(d)
    np.testing.assert_array_equal(back.mass, tr.mass)
    src = resplit(back.source, batch_rows)  # batches end at arbitrary rows, mid-step
    for reverse in (False, True):
        got = list(iter_step_mass(src, reverse=reverse))
        order = [s for s, _ in got]
        assert order == sorted(order, reverse=reverse) and len(order) == tr.n_steps
        for s, m in got:
            np.testing.assert_array_equal(m, tr.mass[s])
    coarse, coarse_back = tr.with_block_tokens(48), back.with_block_tokens(48)
    np.testing.assert_array_equal(coarse_back.mass, coarse.mass)
    np.testing.assert_allclose(coarse.mass.sum(axis=2), 1.0, atol=1e-5)
    layers = np.array([2, 0, 0])
    for s, m in back.iter_mass(layers=layers):
        np.testing.assert_array_equal(m, tr.mass[s][layers])


def test_writer_leaves_out_blocks_without_attention(tmp_path):
    tr = synthetic_trace(n_layers=2, n_prompt=300, n_decode=4, sliding_window=32, swa_pattern=2, prefill_chunk=64)
    back = load_trace(write_trace(tr, tmp_path / "tr", 4))
    rows = sum(n for _, n, _, _ in back.source.chunks)
    assert rows == np.count_nonzero(tr.mass) < tr.n_layers * int(tr.visible_blocks.sum())


class RowsOnly(ArrayMassSource):
    """The same array, read as rows (as a trace directory is) instead of whole steps."""

    dense_steps = False


@pytest.mark.parametrize("source", [ArrayMassSource, RowsOnly])
def test_dense_source_steps_without_rows_are_zero(source):
    mass = np.zeros((5, 2, 3), dtype=np.float32)
    mass[1, 0, 2] = mass[3, 1, 0] = 1.0
    mass[2, 1, 1] = -0.0
    for reverse in (False, True):
        got = dict(iter_step_mass(source(mass, steps_per_batch=2), reverse=reverse))
        assert sorted(got) == list(range(5))
        for s in range(5):
            np.testing.assert_array_equal(got[s], mass[s])
        assert not np.signbit(got[2]).any()  # a cell without a row is 0.0 on both paths


@pytest.mark.parametrize("lazy", [False, True])
def test_whole_steps_equal_rows_bit_for_bit(lazy):
    tr = synthetic_trace(n_layers=3, n_prompt=150, n_decode=9, sliding_window=40, swa_pattern=2, prefill_chunk=37,
                         lazy=lazy)  # tr.mass: gathered from the source's rows
    layers = np.array([2, 0, 0, 1])
    for group in (1, 3):
        for reverse in (False, True):
            whole = iter_step_mass(tr.source, reverse=reverse, layers=layers, group=group)
            rows = iter_step_mass(RowsOnly(tr.mass, steps_per_batch=4), reverse=reverse, layers=layers, group=group)
            for (s, a), (t, b) in zip(whole, rows, strict=True):
                assert s == t and a.dtype == b.dtype == np.float32
                np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def test_rows_out_of_step_order_are_one_error(tmp_path):
    import polars as pl

    tr = synthetic_trace(n_layers=2, n_prompt=64, n_decode=4)
    d = write_trace(tr, tmp_path / "tr", 100)
    f = d / "attn-00000.parquet"
    pl.read_parquet(f).reverse().write_parquet(f)
    with pytest.raises(TraceFormatError, match="checksum"):
        load_trace(d)
    reseal(d)  # checksums recomputed, as a writer that stored rows out of order would leave them
    with pytest.raises(TraceFormatError, match="ordered by step"):
        load_trace(d).mass  # noqa: B018 - reading is the test
