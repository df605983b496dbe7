"""Replay invariants, checked with hypothesis on small synthetic traces (both tiers of every kind)."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from llamatier.policies import CapacityExhausted
from llamatier.replay import replay
from tests.strategies import profile, replay_case, slow_settings

SETTINGS = slow_settings(80)
POLICIES = ["static", "lru", "adaptive", "oracle"]


def _replay(trace, prof, policy, opts):  # noqa: ANN001, ANN201
    try:
        return replay(trace, prof, policy, opts)
    except CapacityExhausted:
        return None


@SETTINGS
@given(case=replay_case(), policy=st.sampled_from(POLICIES))
def test_no_tier_over_its_budget(case: tuple, policy: str) -> None:
    trace, prof, opts = case
    r = _replay(trace, prof, policy, opts)
    if r is None or not r.runs:
        return
    assert (r.record.occupancy_bytes <= r.capacity_bytes[None, :] + 1e-6).all()
    assert (r.record.stored_bytes >= 0).all()


@SETTINGS
@given(case=replay_case(), policy=st.sampled_from(POLICIES))
def test_lossless_reads_every_visible_block_once_per_step(case: tuple, policy: str) -> None:
    trace, prof, opts = case
    from dataclasses import replace

    opts = replace(opts, mode="lossless", block_budget=None)
    r = _replay(trace, prof, policy, opts)
    if r is None or not r.runs:
        return
    from llamatier.replay import prepare

    ctx = prepare(trace, prof, opts)
    visible = (ctx.hi_block[:, None] - ctx.lo_visible).sum(axis=1)
    reads = r.record.traffic.read_blocks.sum(axis=(1, 2))
    np.testing.assert_array_equal(reads, visible)
    # and every visible position is read: tokens read == visible tokens per layer
    vis_tokens = ctx.ctx_tokens[:, None] - ctx.lo_visible_pos
    np.testing.assert_array_equal(r.record.traffic.read_tokens, vis_tokens)
    assert r.summary()["attention_mass_dropped"]["mean"] == 0.0


@SETTINGS
@given(case=replay_case(), policy=st.sampled_from(POLICIES))
def test_bytes_are_conserved_across_moves(case: tuple, policy: str) -> None:
    """Per tier and step: stored = stored before + written blocks - freed blocks + moved in - moved out."""
    trace, prof, opts = case
    r = _replay(trace, prof, policy, opts)
    if r is None or not r.runs:
        return
    rec = r.record
    moves = rec.traffic.move_bytes.sum(axis=1)  # [S, src, dst]
    moved_in, moved_out = moves.sum(axis=1), moves.sum(axis=2)
    before = np.vstack([np.zeros((1, 4)), rec.stored_bytes[:-1]])
    np.testing.assert_allclose(rec.stored_bytes, before + rec.alloc_bytes - rec.freed_bytes + moved_in - moved_out, atol=1e-6)


@SETTINGS
@given(case=replay_case(), policy=st.sampled_from(POLICIES))
def test_same_inputs_same_result(case: tuple, policy: str) -> None:
    trace, prof, opts = case
    a, b = _replay(trace, prof, policy, opts), _replay(trace, prof, policy, opts)
    if a is None:
        assert b is None
        return
    assert a.runs == b.runs and a.verdict == b.verdict
    if a.runs:
        np.testing.assert_array_equal(a.costs.step_s, b.costs.step_s)
        np.testing.assert_array_equal(a.record.traffic.move_count, b.record.traffic.move_count)
        sa, sb = a.summary(), b.summary()
        for s in (sa, sb):
            s.pop("replay"), s.pop("policy_decision")  # wall-clock measurements
        assert json.dumps(sa, sort_keys=True, default=str) == json.dumps(sb, sort_keys=True, default=str)


@SETTINGS
@given(case=replay_case(), policy=st.sampled_from(["static", "oracle"]), more=st.sampled_from([1.3, 2.0, 10.0]))
def test_more_hbm_never_makes_static_or_oracle_slower(case: tuple, policy: str, more: float) -> None:
    trace, prof, opts = case
    from dataclasses import replace

    if prof.is_host_only:
        prof = profile("a100-40g")
    small = replace(opts, hbm_budget_bytes=int(opts.hbm_budget_bytes or 0))
    big = replace(opts, hbm_budget_bytes=int((opts.hbm_budget_bytes or 1000) * more) + 1)
    a, b = _replay(trace, prof, policy, small), _replay(trace, prof, policy, big)
    if a is None or not a.runs:
        return  # the smaller budget does not run: anything is no slower
    assert b is not None and b.runs
    assert (b.costs.step_s <= a.costs.step_s * (1 + 1e-12) + 1e-15).all()


@SETTINGS
@given(case=replay_case())
def test_with_everything_in_hbm_static_and_oracle_agree(case: tuple) -> None:
    trace, prof, opts = case
    from dataclasses import replace

    if prof.is_host_only:
        prof = profile("a100-40g")
    opts = replace(opts, hbm_budget_bytes=1 << 40, mode="lossless", block_budget=None)
    s, o = replay(trace, prof, "static", opts), replay(trace, prof, "oracle", opts)
    assert s.runs and o.runs and s.verdict.startswith("all KV in HBM")
    np.testing.assert_allclose(s.costs.step_s, o.costs.step_s, rtol=1e-12)
    assert o.record.traffic.read_bytes[:, :, 1:].sum() == 0
    assert o.record.traffic.move_bytes.sum() == 0
