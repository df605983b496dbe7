"""Serving workloads: equivalence with the single-trace replay, conservation, determinism, policies, search.

Every run replays real llama.cpp traces of the tiny random-weight model (two
traces of different lengths) through the serving engine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamatier.errors import LlamatierError
from llamatier.hardware import HostComputeModel, load_profile
from llamatier.replay import ReplayOptions, replay
from llamatier.serving import (
    DEFAULT_SERVING_POLICIES,
    build_context,
    find_max_users,
    make_plan,
    make_serving_policy,
    serve,
    serving_policy_names,
    workload_from_dict,
)
from llamatier.serving.policies.caches import BlockARC, BlockLRU
from llamatier.target import geometry_preset
from llamatier.tiers import TIER_NAMES
from llamatier.trace import load_trace

from .conftest import trace_model

POLICIES = list(DEFAULT_SERVING_POLICIES)


@pytest.fixture(scope="module")
def short_trace_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny trace: shorter prompt, fewer decode steps."""
    out = tmp_path_factory.mktemp("traces") / "tiny-short"
    trace_model(tiny_model, out, prompt="keep the hot blocks close " * 8, n_predict=12, seed=2)
    return out


def spec_of(traces: list[Path], **sections: dict) -> object:
    data = {
        "workload": {"traces": [str(t) for t in traces], "profile": "a100-40g", "seed": 5},
        "users": {"count": 1},
        "sessions": {"turns": 1, "think_time_s": 0.0},
        "server": {"slot_context_tokens": 2048, "max_batch_tokens": 256},
    }
    for name, body in sections.items():
        data.setdefault(name, {}).update(body)
    return workload_from_dict(data)


# -- one user, one turn == replay ------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("geometry", [None, "llama3-8b"])
def test_one_user_one_turn_matches_replay(tiny_trace_dir: Path, tiny_trace, policy: str, geometry: str | None) -> None:
    w = {"geometry": geometry} if geometry else {}
    spec = spec_of([tiny_trace_dir], workload=w)
    r = serve(spec, policy)
    opts = ReplayOptions(target=geometry_preset(geometry) if geometry else None)
    rp = replay(tiny_trace, load_profile("a100-40g"), "static", opts)
    itl = r.token_latencies_s(0)
    assert itl.size == rp.decode_step_s.size == int(tiny_trace.is_decode.sum())
    np.testing.assert_allclose(itl, rp.decode_step_s, rtol=1e-12, atol=0)
    df = r.requests_frame()
    assert df["ttft_s"][0] == pytest.approx(rp.summary()["latency"]["ttft_s"], rel=1e-12)


@pytest.mark.parametrize("policy", ["llamacpp-server", "session-tiering"])
def test_one_user_one_turn_matches_replay_on_cpu_host(tiny_trace_dir: Path, tiny_trace, policy: str) -> None:
    spec = spec_of([tiny_trace_dir], workload={"profile": "cpu-host"})
    r = serve(spec, policy)
    rp = replay(tiny_trace, load_profile("cpu-host"), "static")
    np.testing.assert_allclose(r.token_latencies_s(0), rp.decode_step_s, rtol=1e-12, atol=0)


def _tiny_host_profile(trace):  # noqa: ANN001, ANN202
    """cpu-host with a host model for the tiny model, with every term (batch terms included)."""
    terms = ("step", "output", "token", "kv", "token_kv", "logits_gemv", "gemm", "gemv", "gemv_rows", "logits_gemm",
             "logits_gemv_rows")
    hm = HostComputeModel(terms=terms, serial_s=(1e-3, 4e-3, 5e-4, 1e-6, 2e-7, 3e-3, 2e-3, 1e-3, 5e-4, 6e-3, 1e-4),
                          parallel_s=(0.0,) * len(terms), k_types=(trace.context["type_k"],),
                          v_types=(trace.context["type_v"],), n_ubatch=int(trace.context["n_ubatch"]),
                          model_name=trace.model.name)
    return load_profile("cpu-host").with_host_model(hm, name="tiny-host")


@pytest.mark.parametrize("policy", POLICIES)
def test_one_user_one_turn_matches_replay_with_a_host_model(tiny_trace_dir: Path, tiny_trace, policy: str) -> None:
    """Steps priced per llama.cpp ubatch (each sequence with its own cells) still give the replay's latencies."""
    prof = _tiny_host_profile(tiny_trace)
    spec = spec_of([tiny_trace_dir], workload={"profile": "cpu-host"}, server={"flash_attn": "off", "swa_full": True})
    r = serve(spec, policy, profile=prof)
    rp = replay(tiny_trace, prof, "static")
    assert any("calibrated host model" in n for n in r.notes)
    np.testing.assert_allclose(r.token_latencies_s(0), rp.decode_step_s, rtol=1e-12, atol=0)
    assert r.requests_frame()["ttft_s"][0] == pytest.approx(rp.summary()["latency"]["ttft_s"], rel=1e-12)


def test_llamacpp_server_over_vram_runs_like_static_nkvo(tiny_trace_dir: Path, tiny_trace) -> None:
    """KV reserved for n_ctx over the HBM budget: both go -nkvo (all KV on the host, attention there)."""
    budget = 100 * 2**20
    spec = spec_of([tiny_trace_dir], workload={"geometry": "llama3-8b"}, server={"hbm_budget": budget})
    r = serve(spec, "llamacpp-server")
    assert "-nkvo" in r.verdict
    rp = replay(tiny_trace, load_profile("a100-40g"), "static",
                ReplayOptions(target=geometry_preset("llama3-8b"), hbm_budget_bytes=budget))
    assert "-nkvo" in rp.verdict
    np.testing.assert_allclose(r.token_latencies_s(0), rp.decode_step_s, rtol=1e-12, atol=0)
    assert r.summary()["peak_occupancy_bytes"]["dram"] == 2048 * build_context(spec).bytes_per_token  # n_ctx reserved


# -- conservation ----------------------------------------------------------------------------


def busy_spec(traces: list[Path], users: int = 12, **server: object) -> object:
    """Small tier budgets (the tiny model's KV is 256 B/token): HBM and DRAM evict, SSD catches the rest."""
    sv = {"slot_context_tokens": 2000, "max_batch_tokens": 512, "hbm_budget": "1MiB", "dram_budget": "1MiB",
          "ssd_budget": "64MiB", "cache_ram": "512KiB", "n_parallel": 2}
    sv.update(server)
    return spec_of(
        traces,
        workload={"seed": 11},
        users={"count": users, "ramp_s": 0.02},
        sessions={"turns": [1, 4], "think_time_s": 0.01},
        prefix={"shared_tokens": 100},
        server=sv,
    )


def assert_conserved(r) -> None:  # noqa: ANN001
    rec = r.record
    df = r.requests_frame()
    plan = r.plan
    # every request completes exactly once, with exactly its output tokens
    assert df["completed"].all()
    finish = np.array([q.finish_step for q in rec.requests])
    assert (finish >= 0).all()
    counts = np.bincount(rec.token_rid, minlength=plan.n_requests)
    np.testing.assert_array_equal(counts, plan.req_decode_steps)
    assert np.isfinite(df["first_token_s"].to_numpy()).all()
    # each user's requests (turns, then sessions) run in order, one after the other
    nxt = plan.req_next
    has = nxt >= 0
    fin, arr = df["finish_s"].to_numpy(), df["arrival_s"].to_numpy()
    np.testing.assert_allclose(arr[nxt[has]], fin[has] + plan.req_think_s[nxt[has]], rtol=1e-12)
    # every token computed before was either found in some tier or counted as recomputed
    known, reused, recomputed = (df[c].to_numpy() for c in ("known_tokens", "reused_tokens", "recomputed_tokens"))
    np.testing.assert_array_equal(reused + recomputed, known)
    by_tier = sum(df[f"reused_{t}_tokens"].to_numpy() for t in TIER_NAMES)
    assert (by_tier <= reused).all()  # (a preempted request's earlier admissions add to reused only)
    # each admission reuses at most the request's own tokens (a preempted request re-admitted can reuse its
    # cached prefix again: the sum over admissions may exceed prompt + output)
    own = df["prompt_tokens"].to_numpy() + plan.req_decode_steps
    assert (reused <= own * df["admissions"].to_numpy()).all()
    # no tier over its budget at any step
    assert (rec.occupancy_bytes <= r.capacity_bytes[None, :] * (1 + 1e-9) + 1).all()


@pytest.mark.parametrize("policy", POLICIES)
def test_conservation_under_pressure(tiny_trace_dir: Path, short_trace_dir: Path, policy: str) -> None:
    r = serve(busy_spec([tiny_trace_dir, short_trace_dir]), policy, check=True)
    assert r.runs, r.verdict
    assert r.plan.n_requests >= 16
    assert_conserved(r)


def test_pressure_forces_tier_traffic(tiny_trace_dir: Path, short_trace_dir: Path) -> None:
    """Small HBM and DRAM budgets: the paged policies evict, reload or recompute (and say so)."""
    spec = busy_spec([tiny_trace_dir, short_trace_dir])
    lru = serve(spec, "vllm-lru", check=True).summary()
    assert lru["bytes_per_link"]["hbm_dram"]["down"] > 0  # write-through
    assert lru["bytes_per_link"]["dram_ssd"]["down"] > 0  # DRAM evictions cascade to SSD
    assert lru["kv_reuse"]["reused_tokens_by_tier"]["dram"] + lru["kv_reuse"]["reused_tokens_by_tier"]["ssd"] > 0
    roomy = serve(busy_spec([tiny_trace_dir, short_trace_dir], hbm_budget="1GiB"), "vllm-lru").summary()
    B = 16
    assert roomy["kv_reuse"]["recomputed_tokens"] < B * roomy["requests"]  # only partial last blocks recomputed
    assert roomy["kv_reuse"]["preemptions"] == 0


def test_dropping_kv_is_counted_as_recompute(tiny_trace_dir: Path, short_trace_dir: Path) -> None:
    """Without lower tiers, evicted KV is gone: a returning session recomputes it."""
    spec = busy_spec([tiny_trace_dir, short_trace_dir])
    ctx = build_context(spec)
    no_tiers = serve(spec, make_serving_policy("vllm-lru", tiers=()), context=ctx, check=True)
    tiers = serve(spec, "vllm-lru", context=ctx, check=True)
    assert_conserved(no_tiers)
    a, b = no_tiers.summary()["kv_reuse"], tiers.summary()["kv_reuse"]
    assert a["recomputed_tokens"] > b["recomputed_tokens"]
    assert a["reused_tokens_by_tier"]["dram"] == a["reused_tokens_by_tier"]["ssd"] == 0


def test_shared_prefix_is_stored_once_by_paged_policies(tiny_trace_dir: Path) -> None:
    """Staggered sessions: lru computes the shared prefix once; llama-server computes it once per slot.

    llama-server never shares cells between slots: a request finds the prefix only by taking over an idle
    slot that holds another session (by prompt similarity), else it computes the prefix in its own slot.
    """
    P = 160
    spec = spec_of([tiny_trace_dir], users={"count": 8, "ramp_s": 0.05}, prefix={"shared_tokens": P})
    lru = serve(spec, "vllm-lru", check=True).requests_frame().sort("arrival_s")
    full = (P // 16) * 16
    assert lru["reused_hbm_tokens"][0] == 0
    assert (lru["reused_hbm_tokens"].to_numpy()[1:] >= full).all()  # the prefix blocks, stored once, found by all
    assert (lru["recomputed_tokens"].to_numpy() < 16).all()
    served = serve(spec, "llamacpp-server")
    slots = served.requests_frame().sort("arrival_s")
    reused = slots["reused_tokens"].to_numpy()
    assert set(reused.tolist()) <= {0, P} and reused[0] == 0
    # every slot that served a request computed the prefix once: requests that found it took over a used slot
    assert (reused == 0).sum() == slots["slot"].n_unique()
    np.testing.assert_array_equal(slots["recomputed_tokens"].to_numpy() + reused, [0] + [P] * 7)


# -- determinism -------------------------------------------------------------------------------


def test_seeded_runs_are_identical(tiny_trace_dir: Path, short_trace_dir: Path) -> None:
    spec = busy_spec([tiny_trace_dir, short_trace_dir])
    for policy in ("vllm-arc", "session-tiering"):
        a, b = serve(spec, policy), serve(spec, policy)
        assert a.requests_frame().equals(b.requests_frame(), null_equal=True)
        np.testing.assert_array_equal(a.record.step_s, b.record.step_s)
        np.testing.assert_array_equal(a.record.occupancy_bytes, b.record.occupancy_bytes)
    other = serve(spec.with_overrides(seed=12), "vllm-arc")
    assert not np.array_equal(other.plan.req_trace, a.plan.req_trace) or not np.array_equal(
        other.plan.session_turns, a.plan.session_turns
    )


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**16),
    users=st.integers(1, 6),
    turns=st.integers(1, 3),
    prefix=st.sampled_from([0, 40, 100]),
    policy=st.sampled_from(POLICIES),
)
def test_random_workloads_conserve(tiny_trace_dir: Path, short_trace_dir: Path, seed: int, users: int, turns: int,
                                   prefix: int, policy: str) -> None:
    spec = busy_spec([tiny_trace_dir, short_trace_dir], users=users)
    spec = spec.with_overrides(seed=seed, turns=(1, turns), prefix_tokens=prefix)
    r = serve(spec, policy, check=True)
    if not r.runs:  # llama.cpp's up-front reservation may exceed the small budgets: a verdict, not a crash
        assert policy == "llamacpp-server" and "does not start" in r.verdict
        return
    assert_conserved(r)
    again = serve(spec, policy)
    np.testing.assert_array_equal(r.record.step_s, again.record.step_s)


def test_user_draws_do_not_depend_on_the_user_count(tiny_trace_dir: Path, short_trace_dir: Path) -> None:
    spec = busy_spec([tiny_trace_dir, short_trace_dir], users=3)
    ctx = build_context(spec)
    small = make_plan(spec, list(ctx.shapes))
    big = make_plan(spec.with_users(9), list(ctx.shapes))
    n = small.n_requests
    np.testing.assert_array_equal(small.req_trace, big.req_trace[:n])
    np.testing.assert_array_equal(small.user_start_s, big.user_start_s[:3])


# -- policies ---------------------------------------------------------------------------------


def test_unknown_policy_lists_the_valid_ones(tiny_trace_dir: Path) -> None:
    with pytest.raises(LlamatierError, match="valid serving policies are llamacpp-server, session-tiering, vllm-arc, vllm-lru"):
        serve(spec_of([tiny_trace_dir]), "lfu")
    assert serving_policy_names() == sorted(POLICIES)


def test_llamacpp_server_reserves_slots_and_refuses_beyond_ram(tiny_trace_dir: Path) -> None:
    spec = spec_of([tiny_trace_dir], users={"count": 3}, workload={"geometry": "llama3-8b"})
    r = serve(spec, "llamacpp-server")
    slot_bytes = 2048 * build_context(spec).bytes_per_token
    assert r.record.occupancy_bytes[:, 0].min() == 3 * slot_bytes  # reserved up front, whatever is used
    big = spec_of([tiny_trace_dir], users={"count": 3}, workload={"geometry": "llama3-8b"},
                  server={"hbm_budget": "1MiB", "dram_budget": "1MiB"})
    r = serve(big, "llamacpp-server")
    assert not r.runs and "does not start" in r.verdict
    assert "latency" not in r.summary()


def test_lru_and_arc_caches() -> None:
    lru = BlockLRU(3)
    assert lru.store([1, 2, 3]) == []
    lru.touch([1])
    assert lru.store([4]) == [2]  # 2 is the least recently used
    arc = BlockARC(3)
    arc.store([1, 2, 3])
    arc.touch([1])  # seen twice: moves to T2
    assert 1 in arc.t2 and 2 in arc.t1
    assert arc.store([4]) == [2]  # T1 is evicted first while |T1| >= p
    arc.touch([2])  # a ghost hit in B1 grows T1's target
    assert arc.p >= 1.0
    assert len(arc) == 3 and len(arc.b1) <= 3


def test_adaptive_spills_instead_of_preempting(tiny_trace_dir: Path, short_trace_dir: Path) -> None:
    """HBM smaller than the running set: adaptive reads part of it from DRAM; lru preempts."""
    spec = busy_spec([tiny_trace_dir, short_trace_dir], hbm_budget="512KiB", dram_budget="64MiB")
    lru = serve(spec, "vllm-lru", check=True)
    ad = serve(spec, make_serving_policy("session-tiering", spill_budget_ms=1000.0), check=True)
    assert_conserved(ad)
    assert ad.summary()["kv_reuse"]["preemptions"] < lru.summary()["kv_reuse"]["preemptions"]
    assert ad.summary()["step_time_split"]["host_attention"] + ad.summary()["bytes_per_link"]["hbm_dram"]["up"] > 0


# -- capacity search -----------------------------------------------------------------------------


def test_capacity_search_bounds(tiny_trace_dir: Path) -> None:
    spec = spec_of([tiny_trace_dir], sessions={"turns": 2, "think_time_s": 0.001})
    loose = find_max_users(spec, "vllm-lru", slo_tpot_s=10.0, max_search=4)
    assert loose.capped and loose.max_users == 4
    assert [t["users"] for t in loose.trials] == [1, 2, 4]
    impossible = find_max_users(spec, "vllm-lru", slo_tpot_s=1e-9, max_search=4)
    assert impossible.max_users == 0 and not impossible.capped and impossible.best is None
    # a target between two runs' p99 TPOTs splits them
    t = {x["users"]: x["tpot_p99_s"] for x in loose.trials}
    if t[4] > t[1]:
        mid = find_max_users(spec, "vllm-lru", slo_tpot_s=(t[1] + t[4]) / 2, max_search=4)
        assert 1 <= mid.max_users < 4
        assert all(x["meets"] == (x["tpot_p99_s"] <= (t[1] + t[4]) / 2) for x in mid.trials)


def test_open_loop_workload_runs_and_rejects_user_search(tiny_trace_dir: Path) -> None:
    spec = spec_of([tiny_trace_dir], users={"count": None, "arrival_rate_per_s": 50.0, "sessions": 6})
    r = serve(spec, "vllm-arc", check=True)
    assert_conserved(r)
    arrivals = np.sort(r.plan.user_start_s)
    assert arrivals[0] == 0.0 and (np.diff(arrivals) >= 0).all()
    with pytest.raises(LlamatierError, match="closed-loop"):
        find_max_users(spec, "vllm-arc", slo_tpot_s=0.1)


def test_measured_prefill_needs_the_traced_model_on_a_host(tiny_trace_dir: Path) -> None:
    spec = spec_of([tiny_trace_dir], server={"prefill_cost": "measured"})
    with pytest.raises(LlamatierError, match=r"server\.prefill_cost"):
        serve(spec, "vllm-lru")
    host = spec_of([tiny_trace_dir], workload={"profile": "cpu-host"}, server={"prefill_cost": "measured"})
    r = serve(host, "llamacpp-server")
    tr = load_trace(tiny_trace_dir)
    measured = float(tr.steps["decode_s"].to_numpy()[~tr.is_decode].sum())
    assert r.requests_frame()["ttft_s"][0] == pytest.approx(measured, rel=1e-9)



def test_measured_prefill_grows_with_context(tiny_trace_dir: Path, tiny_trace) -> None:
    """A later turn's prompt sits on a longer context: its measured-per-token prefill costs more per token."""
    spec = spec_of([tiny_trace_dir], workload={"profile": "cpu-host"}, sessions={"turns": 2},
                   server={"prefill_cost": "measured"})
    df = serve(spec, "llamacpp-server").requests_frame()
    per_token = float(tiny_trace.steps["decode_s"].to_numpy()[~tiny_trace.is_decode].sum()) / df["prompt_tokens"][0]
    second = df.filter(pl.col("turn") == 1)
    new = int(second["prompt_tokens"][0] - second["reused_tokens"][0])
    assert second["ttft_s"][0] > 1.02 * per_token * new  # flat per-token cost would give exactly per_token * new

def test_users_run_sessions_back_to_back(tiny_trace_dir: Path, short_trace_dir: Path) -> None:
    spec = busy_spec([tiny_trace_dir, short_trace_dir], users=3)
    spec = spec.with_overrides(sessions_per_user=3, turns=(1, 2))
    r = serve(spec, "session-tiering", check=True)
    assert_conserved(r)
    p = r.plan
    assert p.n_sessions == 9 and p.n_users == 3
    assert (p.req_history_tokens[p.req_turn == 0] == 0).all()  # a new session starts a new conversation
    for u in range(3):
        mine = np.flatnonzero(p.req_user == u)
        assert len(set(p.req_session[mine])) == 3
        np.testing.assert_array_equal(p.req_next[mine[:-1]], mine[1:])  # one chain per user
        assert p.req_next[mine[-1]] == -1
