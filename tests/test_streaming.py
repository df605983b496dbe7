"""Streaming replay: a trace read from disk chunk by chunk, split anywhere, replays exactly as the
same trace held in memory (and agrees with the reference engine); memory stays bounded."""

from __future__ import annotations

import tracemalloc
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamatier.hardware import load_profile
from llamatier.policies import CapacityExhausted
from llamatier.replay import ReplayOptions, replay
from llamatier.replay.reference import replay_reference
from llamatier.replay.synthetic import synthetic_trace
from llamatier.target import geometry_preset
from llamatier.trace import load_trace
from tests.strategies import KV_TOKEN_BYTES_PER_LAYER, assert_same, synthetic_traces
from tests.test_trace_chunks import resplit, write_trace

POLICIES = ("static", "lru", "adaptive", "oracle")


@st.composite
def streamed_case(draw: st.DrawFn) -> tuple:
    trace = draw(synthetic_traces(max_prompt=90, decode=(0, 14), windows=(0, 0, 12, 33), ctx_slack=(0,)))
    total = KV_TOKEN_BYTES_PER_LAYER * trace.n_layers * int(trace.context_tokens[-1])
    sparse = draw(st.booleans())
    what_if = draw(st.sampled_from([False, False, True]))
    opts = ReplayOptions(
        hbm_budget_bytes=int(draw(st.sampled_from([0.0, 0.2, 0.5, 1.0])) * total * (16 if what_if else 1)),
        mode="sparse" if sparse else "lossless", block_budget=draw(st.integers(1, 4)) if sparse else None,
        swa_full=draw(st.booleans()), prefetch=draw(st.booleans()),
        target=geometry_preset("llama3-8b") if what_if else None,
        block_tokens=trace.block_tokens * 2 if draw(st.booleans()) else None,
    )
    # how the trace is stored and read: steps per chunk file, rows per read (mid-step cuts)
    return trace, opts, draw(st.integers(1, 7)), draw(st.integers(1, 300))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=streamed_case())
def test_trace_streamed_from_disk_replays_like_the_trace_in_memory(tmp_path_factory, case) -> None:
    trace, opts, chunk_steps, batch_rows = case
    disk = load_trace(write_trace(trace, tmp_path_factory.mktemp("s") / "tr", chunk_steps))
    disk = replace(disk, source=resplit(disk.source, batch_rows))
    prof = load_profile("a100-40g")
    for policy in POLICIES:
        try:
            want = replay(trace, prof, policy, opts)
        except CapacityExhausted:
            with pytest.raises(CapacityExhausted):
                replay(disk, prof, policy, opts)
            continue
        got = replay(disk, prof, policy, opts)
        assert got.digest() == want.digest(), policy
        assert_same(got, replay_reference(trace, prof, policy, opts))


def _peak_bytes(trace, policy: str, opts: ReplayOptions) -> tuple[int, int]:  # noqa: ANN001
    """(peak bytes numpy and Python allocated during one replay, bytes of its [steps, ...] outputs)."""
    prof = load_profile("a100-40g")
    replay(synthetic_trace(n_layers=1, n_prompt=32, n_decode=2), prof, policy,
           replace(opts, hbm_budget_bytes=None))  # warm-up: imports and caches are not the replay's
    tracemalloc.start()
    r = replay(trace, prof, policy, opts)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    tr, rec = r.record.traffic, r.record
    outputs = sum(a.nbytes for a in (tr.read_bytes, tr.read_blocks, tr.read_tokens, tr.write_bytes, tr.write_blocks,
                                     tr.move_bytes, tr.move_count, rec.occupancy_bytes, rec.stored_bytes,
                                     rec.alloc_bytes, rec.freed_bytes, rec.dropped_mass))
    return peak, outputs


@pytest.fixture(scope="module")
def long_trace(tmp_path_factory):  # noqa: ANN201
    """A trace on disk whose dense attention array (6 MB) is several times what a replay may hold."""
    tr = synthetic_trace(n_layers=4, n_prompt=16384, n_decode=300, prefill_chunk=256, seed=3)
    disk = load_trace(write_trace(tr, tmp_path_factory.mktemp("long") / "t", 64))
    return replace(disk, source=resplit(disk.source, 10_000))  # read 10,000 rows at a time


@pytest.mark.parametrize("mode", ["lossless", "sparse"])
def test_replay_memory_is_bounded_by_the_working_set_not_the_trace(long_trace, mode: str) -> None:
    """Each policy's peak allocation stays within a fixed multiple of layers x blocks (plus its
    [steps, layers] outputs and, in sparse mode, one batch of rows read), far below the dense
    [steps, layers, blocks] array the whole-array engine held (the oracle held two more)."""
    L, NB, S = long_trace.n_layers, long_trace.n_blocks, long_trace.n_steps
    dense_bytes = S * L * NB * 4
    working_set = L * NB * 200  # bytes per (layer, block): masks, placements, priorities, temporaries
    read_batch = 10_000 * 28 if mode == "sparse" else 0  # step, layer, block (int64) and mass (float32)
    kv = 2 * 2 * 64 * 2 * L * 16684
    opts = ReplayOptions(hbm_budget_bytes=kv // 2, mode=mode, block_budget=3 if mode == "sparse" else None)
    for policy in POLICIES:
        peak, outputs = _peak_bytes(long_trace, policy, opts)
        bound = working_set + outputs + 3 * read_batch
        assert peak < bound < dense_bytes / 2, (policy, peak, bound, dense_bytes)
