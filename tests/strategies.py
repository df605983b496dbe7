"""Hypothesis strategies the tests share, and the check that two replays agree.

Small synthetic traces (:func:`synthetic_traces`) with every layer kind, block
size, prefill split and context slack; replay cases over them
(:func:`replay_case`: a trace, a profile, options covering every replay
option); eviction cases (:func:`eviction_case`). ``slow_settings(n)`` is the
hypothesis settings every replay property uses.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from llamatier.hardware import Profile, load_profile
from llamatier.replay import ReplayOptions
from llamatier.replay.synthetic import synthetic_trace
from llamatier.trace import Trace

PROFILES = ("a100-40g", "t4", "cpu-host")
KV_TOKEN_BYTES_PER_LAYER = 2 * 2 * 64 * 2  # K+V, 2 KV heads, head dim 64, f16: synthetic_trace's geometry


def slow_settings(max_examples: int) -> Any:
    """Settings for properties that replay whole traces: no deadline, many examples."""
    return settings(max_examples=max_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@cache
def profile(name: str) -> Profile:
    return load_profile(name)


@st.composite
def synthetic_traces(
    draw: st.DrawFn, *, max_prompt: int = 70, decode: tuple[int, int] = (0, 12),
    windows: tuple[int, ...] = (0, 0, 8, 20, 33), ctx_slack: tuple[int, ...] = (0, 0, 40),
) -> Trace:
    """A small synthetic trace: 1-3 layers, global and sliding-window layers, chunked or whole prefill."""
    n_prompt = draw(st.integers(1, max_prompt))
    n_decode = draw(st.integers(*decode))
    window = draw(st.sampled_from(windows))
    return synthetic_trace(
        n_layers=draw(st.integers(1, 3)),
        n_prompt=n_prompt,
        n_decode=n_decode,
        block_tokens=draw(st.sampled_from([4, 8, 16])),
        sliding_window=window,
        swa_pattern=draw(st.sampled_from([0, 2])) if window else 0,
        prefill_chunk=draw(st.sampled_from([None, 16, 25])),
        n_ctx=n_prompt + n_decode + draw(st.sampled_from(ctx_slack)),
        seed=draw(st.integers(0, 10_000)),
    )


@st.composite
def replay_case(draw: st.DrawFn) -> tuple[Trace, Profile, ReplayOptions]:
    """A trace, a profile and replay options: budgets from none to 3x the KV, every mode and switch."""
    trace = draw(synthetic_traces())
    total = KV_TOKEN_BYTES_PER_LAYER * trace.n_layers * int(trace.context_tokens[-1])
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


@st.composite
def eviction_case(draw: st.DrawFn, policies: list[str]) -> tuple[Trace, str, int]:
    """A trace with at least two decode steps, an eviction policy and its block budget."""
    trace = draw(synthetic_traces(max_prompt=90, decode=(2, 24), windows=(0, 16, 40), ctx_slack=(0,)))
    return trace, draw(st.sampled_from(policies)), draw(st.integers(2, 9))


def assert_same(fast: Any, slow: Any) -> None:
    """Two ReplayResults agree: every count to 1e-12 relative, every cost to 1e-9."""
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
