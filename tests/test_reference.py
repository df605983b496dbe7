"""The vectorised engine agrees with the plain-Python reference engine, and LRU with libCacheSim."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamatier.hardware import load_profile
from llamatier.policies import CapacityExhausted
from llamatier.policies.lru_reference import ReferenceLRU
from llamatier.replay import ReplayOptions, replay
from llamatier.replay.reference import replay_reference
from llamatier.replay.synthetic import synthetic_trace

PROFILES = ("a100-40g", "t4", "cpu-host")


@cache
def profile(name: str):  # noqa: ANN201
    return load_profile(name)


@st.composite
def replay_case(draw: st.DrawFn) -> tuple:
    n_layers = draw(st.integers(1, 3))
    block_tokens = draw(st.sampled_from([4, 8, 16]))
    n_prompt = draw(st.integers(1, 70))
    n_decode = draw(st.integers(0, 12))
    window = draw(st.sampled_from([0, 0, 8, 20, 33]))
    trace = synthetic_trace(
        n_layers=n_layers,
        n_prompt=n_prompt,
        n_decode=n_decode,
        block_tokens=block_tokens,
        sliding_window=window,
        swa_pattern=draw(st.sampled_from([0, 2])),
        prefill_chunk=draw(st.sampled_from([None, 16, 25])),
        n_ctx=n_prompt + n_decode + draw(st.sampled_from([0, 0, 40])),
        seed=draw(st.integers(0, 10_000)),
    )
    kv_token = 2 * 2 * 64 * 2 * n_layers  # K+V, 2 KV heads, head dim 64, f16 bytes, all layers
    total = kv_token * (n_prompt + n_decode)
    sparse = draw(st.sampled_from([False, False, True]))
    opts = ReplayOptions(
        hbm_budget_bytes=int(draw(st.sampled_from([0.0, 0.1, 0.3, 0.6, 1.0, 3.0])) * total),
        dram_budget_bytes=draw(st.sampled_from([None, None, int(0.2 * total)])),
        mode="sparse" if sparse else "lossless",
        block_budget=draw(st.integers(1, 4)) if sparse else None,
        swa_full=draw(st.booleans()),
        kv_type=draw(st.sampled_from([None, "q8_0", "q4_0/f16"])),
        static_mode=draw(st.sampled_from(["nkvo", "layers"])),
        dram_reads=draw(st.sampled_from(["auto", "host", "fetch"])),
        prefetch=draw(st.booleans()),
    )
    return trace, profile(draw(st.sampled_from(PROFILES))), opts


def assert_same(fast, slow) -> None:  # noqa: ANN001
    assert fast.runs == slow.runs and fast.verdict == slow.verdict
    if not fast.runs:
        return
    a, b = fast.record, slow.record
    for name in ("read_bytes", "read_blocks", "read_tokens", "write_bytes", "write_blocks", "move_bytes", "move_count"):
        np.testing.assert_allclose(getattr(a.traffic, name), getattr(b.traffic, name), rtol=1e-12, atol=1e-6, err_msg=name)
    for name in ("occupancy_bytes", "stored_bytes", "alloc_bytes", "freed_bytes", "dropped_mass", "visible_blocks"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-6, atol=1e-6, err_msg=name)
    for name in ("step_s", "compute_s", "host_layers_s", "hbm_s", "host_attention_s", "link_s", "link_bytes",
                 "energy_weights_j", "energy_kv_j", "energy_transfer_j", "energy_compute_j"):
        np.testing.assert_allclose(getattr(fast.costs, name), getattr(slow.costs, name), rtol=1e-9, atol=1e-15, err_msg=name)


def run_both(trace, prof, policy, opts, reference_policy=None):  # noqa: ANN001, ANN201
    try:
        fast = replay(trace, prof, policy, opts)
    except CapacityExhausted:
        with pytest.raises(CapacityExhausted):
            replay_reference(trace, prof, reference_policy or policy, opts)
        return None, None
    return fast, replay_reference(trace, prof, reference_policy or policy, opts)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=replay_case(), policy=st.sampled_from(["static", "adaptive", "oracle"]))
def test_vectorised_engine_matches_reference(case: tuple, policy: str) -> None:
    trace, prof, opts = case
    fast, slow = run_both(trace, prof, policy, opts)
    if fast is not None:
        assert slow.record.engine == ("reference" if slow.runs else "none")
        assert_same(fast, slow)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
