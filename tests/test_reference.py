"""The vectorised engine agrees with the plain-Python reference engine, and LRU with libCacheSim."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llamatier.policies import CapacityExhausted
from llamatier.policies.lru_reference import ReferenceLRU
from llamatier.replay import ReplayOptions, replay
from llamatier.replay.reference import replay_reference
from llamatier.replay.synthetic import synthetic_trace
from tests.strategies import assert_same, profile, replay_case, slow_settings


def run_both(trace, prof, policy, opts, reference_policy=None):  # noqa: ANN001, ANN201
    try:
        fast = replay(trace, prof, policy, opts)
    except CapacityExhausted:
        with pytest.raises(CapacityExhausted):
            replay_reference(trace, prof, reference_policy or policy, opts)
        return None, None
    return fast, replay_reference(trace, prof, reference_policy or policy, opts)


@slow_settings(150)
@given(case=replay_case(), policy=st.sampled_from(["static", "adaptive", "oracle"]))
def test_vectorised_engine_matches_reference(case: tuple, policy: str) -> None:
    trace, prof, opts = case
    fast, slow = run_both(trace, prof, policy, opts)
    if fast is not None:
        assert slow.record.engine == ("reference" if slow.runs else "none")
        assert_same(fast, slow)


@slow_settings(150)
@given(case=replay_case())
def test_vectorised_lru_matches_per_access_reference(case: tuple) -> None:
    """The vectorised LRU (fast path and its sparse fallback) equals LRU simulated access by access."""
    trace, prof, opts = case
    fast, slow = run_both(trace, prof, "lru", opts, reference_policy=ReferenceLRU())
    if fast is not None:
        assert_same(fast, slow)


def test_reference_engine_sees_a_wrong_placement() -> None:
    """The cross-check can fail: a reference run with other budgets gives other numbers."""
    trace = synthetic_trace(n_layers=2, n_prompt=60, n_decode=10, block_tokens=8)
    prof = profile("a100-40g")
    a = replay(trace, prof, "adaptive", ReplayOptions(hbm_budget_bytes=4096))
    b = replay_reference(trace, prof, "adaptive", ReplayOptions(hbm_budget_bytes=1 << 30))
    assert not np.allclose(a.costs.step_s, b.costs.step_s)


def lru_request_stream(trace, opts: ReplayOptions):  # noqa: ANN001, ANN201
    """The (layer, block) accesses our LRU sees, in order, as flat ids (lossless: every visible block)."""
    from llamatier.replay import prepare

    ctx = prepare(trace, profile("a100-40g"), opts)
    ids = []
    for s in range(ctx.n_steps):
        ids.append(np.flatnonzero(ctx.visible_mask(s).ravel()))
    return np.concatenate(ids), ctx


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.7, 1.2])
def test_lru_hits_equal_libcachesim_lru(fraction: float) -> None:
    """Same request stream, same capacity: our HBM misses equal libCacheSim LRU's misses exactly."""
    import libcachesim as lcs

    trace = synthetic_trace(n_layers=3, n_prompt=200, n_decode=60, block_tokens=8, seed=3)
    block_bytes = 3 * 8 * 2 * 2 * 64 * 2 // 3  # one layer's block: 8 tokens x 512 B
    probe_opts = ReplayOptions()
    ids, ctx = lru_request_stream(trace, probe_opts)
    assert (ctx.block_bytes == block_bytes).all()
    cap = int(fraction * ctx.block_bytes.sum() * ctx.n_blocks) // block_bytes * block_bytes
    opts = ReplayOptions(hbm_budget_bytes=cap)
    res = replay(trace, profile("a100-40g"), "lru", opts)
    tr = res.record.traffic
    fetched = tr.move_count[:, 0, 1:, 0].sum()  # lower tier -> HBM at an access
    new_blocks = (res.record.alloc_bytes.sum(axis=1) / block_bytes).sum()  # first touches: compulsory misses
    ours = fetched + new_blocks
    cache = lcs.LRU(cap)
    misses = 0
    for i in ids:
        misses += not cache.get(lcs.Request(obj_size=block_bytes, obj_id=int(i) + 1))
    assert ours == misses
    assert 0 < misses <= ids.size
