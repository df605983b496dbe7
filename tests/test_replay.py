"""replay/compare on real llama.cpp traces, the cost model's terms, what-if geometry, and the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from llamatier.errors import LlamatierError
from llamatier.hardware import HostComputeModel, load_profile
from llamatier.kvtypes import kv_type
from llamatier.policies.lru_reference import ReferenceLRU
from llamatier.replay import ReplayOptions, compare, prepare, replay
from llamatier.replay.reference import replay_reference
from llamatier.replay.synthetic import synthetic_trace
from llamatier.target import (
    geometry_preset,
    list_geometry_presets,
    map_layers,
    resolve_geometry,
)
from tests.conftest import assert_one_line_error, run_cli, trace_model
from tests.strategies import assert_same

A100 = load_profile("a100-40g")
POLICIES = ("static", "lru", "adaptive", "oracle")


@pytest.fixture(scope="module")
def tiny_gemma_trace(tiny_gemma_model: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A real llama.cpp trace of the tiny gemma3 model: layer 0 has a 64-token window."""
    from llamatier.trace import load_trace

    out = tmp_path_factory.mktemp("traces") / "tiny-gemma"
    trace_model(tiny_gemma_model, out, positions=False)
    return load_trace(out)


# -- real traces ------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_real_tiny_trace_both_engines_agree(tiny_trace, policy: str) -> None:  # noqa: ANN001
    kv = tiny_trace.model.geometry.bytes_per_token(kv_type("f16"), kv_type("f16")) * int(tiny_trace.context_tokens[-1])
    opts = ReplayOptions(hbm_budget_bytes=kv // 3)
    fast = replay(tiny_trace, A100, policy, opts)
    slow = replay_reference(tiny_trace, A100, ReferenceLRU() if policy == "lru" else policy, opts)
    assert fast.runs
    assert_same(fast, slow)


def test_real_sliding_window_trace_frees_blocks_outside_the_window(tiny_gemma_trace) -> None:  # noqa: ANN001
    t = tiny_gemma_trace
    assert t.model.geometry.sliding_window[0] == 64 and t.model.geometry.sliding_window[1] == 0
    ctx = prepare(t, A100, ReplayOptions())
    last = ctx.n_steps - 1
    assert ctx.lo_visible[last, 0] > 0 and ctx.lo_visible[last, 1] == 0
    # the traced attention of the window layer never reaches before its window
    for s in range(ctx.n_steps):
        assert t.mass[s, 0, : ctx.lo_visible[s, 0]].sum() == 0
    r = replay(t, A100, "adaptive", ReplayOptions())
    assert r.record.freed_bytes.sum() > 0
    full = replay(t, A100, "adaptive", ReplayOptions(swa_full=True))
    assert full.record.freed_bytes.sum() == 0
    assert full.record.stored_bytes[-1].sum() > r.record.stored_bytes[-1].sum()
    # reads are the same either way: only the window is visible
    np.testing.assert_array_equal(full.record.traffic.read_blocks, r.record.traffic.read_blocks)
    for policy in POLICIES:
        fast = replay(t, A100, policy, ReplayOptions(hbm_budget_bytes=20_000))
        slow = replay_reference(t, A100, ReferenceLRU() if policy == "lru" else policy, ReplayOptions(hbm_budget_bytes=20_000))
        assert_same(fast, slow)


@pytest.mark.gemma
def test_gemma_trace_with_a_7b_geometry_shows_statics_cliff(gemma_trace) -> None:  # noqa: ANN001
    """Llama 2 7B what-if on A100-40GB: static is fine while n_ctx fits, then jumps to -nkvo;
    adaptive degrades gradually and stays well below static's cliff."""
    target = geometry_preset("llama2-7b")
    base = ReplayOptions(target=target)
    ctx = prepare(gemma_trace, A100, base)
    reserve = float(ctx.reserved_bytes_per_layer().sum())
    p99 = {}
    for frac in (1.0, 0.9, 0.5, 0.1):
        res = compare(gemma_trace, A100, ["static", "adaptive"], replace(base, hbm_budget_bytes=int(frac * reserve)))
        p99[frac] = {r.policy: r.summary()["latency"]["p99_s"] for r in res.results}
        assert all(r.what_if for r in res.results)
    assert p99[1.0]["static"] == pytest.approx(p99[1.0]["adaptive"])
    assert p99[0.9]["static"] > 3 * p99[1.0]["static"]  # the cliff: all KV to the host
    assert p99[0.9]["adaptive"] == pytest.approx(p99[1.0]["adaptive"])  # the tokens used still fit
    assert p99[1.0]["adaptive"] < p99[0.5]["adaptive"] < p99[0.1]["adaptive"] < p99[0.1]["static"]


@pytest.mark.gemma
def test_gemma_layers_map_by_kind(gemma_trace) -> None:  # noqa: ANN001
    src = gemma_trace.model.geometry
    assert sum(src.swa_layers) == 15 and src.n_layers == 18
    m = map_layers(src, geometry_preset("llama2-7b").geometry)
    assert m.size == 32 and all(not src.swa_layers[i] for i in m)  # global layers replay global layers
    assert sorted(set(m.tolist())) == [i for i in range(18) if not src.swa_layers[i]]
    g27 = geometry_preset("gemma3-27b").geometry
    m27 = map_layers(src, g27)
    assert all(src.swa_layers[m27[i]] == g27.swa_layers[i] for i in range(g27.n_layers))


# -- the cost model ---------------------------------------------------------------------------


def test_kv_type_recosts_bytes_with_gguf_block_sizes() -> None:
    trace = synthetic_trace(n_layers=2, n_prompt=96, n_decode=8)
    f16 = replay(trace, A100, "static")
    q4 = replay(trace, A100, "static", ReplayOptions(kv_type="q4_0"))
    mixed = replay(trace, A100, "static", ReplayOptions(kv_type="q8_0/f16"))
    rb = lambda r: r.record.traffic.read_bytes.sum()  # noqa: E731
    assert rb(q4) / rb(f16) == pytest.approx(18 / 64)  # q4_0: 18 bytes per 32 elements = 4.5 bits
    assert rb(mixed) / rb(f16) == pytest.approx((34 / 32 + 2) / 4)
    assert q4.summary()["kv_type"] == "q4_0/q4_0"
    with pytest.raises(LlamatierError, match="unknown KV type"):
        ReplayOptions(kv_type="q3_k")


def test_small_transfers_are_slow() -> None:
    """Same bytes over the link in 4x as many transfers cost more: per-transfer overhead is charged."""
    trace = synthetic_trace(n_layers=2, n_prompt=512, n_decode=8, block_tokens=16)
    opts = ReplayOptions(hbm_budget_bytes=0, dram_reads="fetch")
    fine = replay(trace, A100, "adaptive", opts)
    coarse = replay(trace, A100, "adaptive", replace(opts, block_tokens=64))
    dec = fine.is_decode
    fb, cb = fine.costs.link_bytes[dec].sum(), coarse.costs.link_bytes[dec].sum()
    assert cb >= fb  # coarse blocks read whole (padding of the last block) ...
    assert fine.costs.link_s[dec].sum() > coarse.costs.link_s[dec].sum()  # ... yet take less time


def test_auto_picks_the_cheaper_of_host_attention_and_fetch() -> None:
    trace = synthetic_trace(n_layers=2, n_prompt=300, n_decode=8)
    opts = ReplayOptions(hbm_budget_bytes=0)
    t = {m: replay(trace, A100, "adaptive", replace(opts, dram_reads=m)).costs.step_s for m in ("host", "fetch", "auto")}
    np.testing.assert_allclose(t["auto"], np.minimum(t["host"], t["fetch"]), rtol=1e-12)


def test_energy_parts_add_up() -> None:
    trace = synthetic_trace(n_layers=2, n_prompt=200, n_decode=20)
    r = replay(trace, A100, "lru", ReplayOptions(hbm_budget_bytes=20_000))
    e = r.summary()["energy_j"]
    assert e["total"] == pytest.approx(e["weights"] + sum(e["kv"].values()) + e["transfers"] + e["compute"])
    assert e["transfers"] > 0 and e["kv"]["dram"] > 0


def test_a_calibrated_host_model_sets_host_compute() -> None:
    trace = synthetic_trace(n_layers=2, n_prompt=200, n_decode=20)
    hm = HostComputeModel(terms=("step", "token", "kv"), serial_s=(1e-3, 2e-4, 1e-6), parallel_s=(0.0, 0.0, 0.0),
                          k_types=("f16",), v_types=("f16",), thread_counts=(2,), model_name="synthetic")
    prof = load_profile("cpu-host").with_host_model(hm)
    r = replay(trace, prof, "static")
    want = hm.predict_step_s(n_tokens=trace.steps["n_tokens"].to_numpy(), n_kv=trace.context_tokens,
                             type_k="f16", type_v="f16", n_threads=2, n_ctx=trace.n_ctx)
    np.testing.assert_allclose(r.costs.compute_s, want)
    assert any("calibrated host model" in n for n in r.notes)
    what_if = replay(trace, prof, "static", ReplayOptions(target=geometry_preset("llama2-7b")))
    assert any("not used" in n for n in what_if.notes)


def test_presets_are_data_with_the_right_kv_size() -> None:
    assert {"llama2-7b", "llama3-8b", "mistral-7b", "qwen2.5-7b"} <= set(list_geometry_presets())
    f16 = kv_type("f16")
    assert geometry_preset("llama2-7b").geometry.bytes_per_token(f16, f16) == 512 * 1024
    assert geometry_preset("llama3-8b").geometry.bytes_per_token(f16, f16) == 128 * 1024
    assert geometry_preset("qwen2.5-7b").geometry.bytes_per_token(f16, f16) == 56 * 1024
    with pytest.raises(LlamatierError, match="valid presets are"):
        resolve_geometry("llama9-1b")


def test_geometry_from_a_gguf_header(tiny_model: Path) -> None:
    target = resolve_geometry(str(tiny_model))
    assert target.what_if and target.geometry.n_layers == 2
    trace = synthetic_trace(n_layers=3, n_prompt=64, n_decode=4)
    r = replay(trace, A100, "static", ReplayOptions(target=target))
    assert r.what_if and r.record.traffic.read_bytes.shape[1] == 2


def test_option_errors_name_the_fix() -> None:
    with pytest.raises(LlamatierError, match="--block-budget"):
        ReplayOptions(mode="sparse")
    with pytest.raises(LlamatierError, match="only applies with --mode sparse"):
        ReplayOptions(block_budget=4)
    with pytest.raises(LlamatierError, match="nkvo or layers"):
        ReplayOptions(static_mode="split")
    big = synthetic_trace(n_layers=2, n_prompt=64, n_decode=4, weight_bytes=10**12)
    with pytest.raises(LlamatierError, match="do not fit in a100-40g's HBM"):
        replay(big, A100, "static")


# -- CLI --------------------------------------------------------------------------------------


def test_cli_replay_json(tiny_trace_dir: Path) -> None:
    p = run_cli("replay", str(tiny_trace_dir), "--policy", "adaptive", "--hbm-budget", "64KiB", "--json")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    for key in ("latency", "bytes_read", "bytes_per_link", "migrations", "peak_occupancy_bytes",
                "attention_mass_dropped", "energy_j", "policy_decision"):
        assert key in s
    assert s["latency"]["p99_s"] >= s["latency"]["p50_s"] > 0 and s["budget_bytes"]["hbm"] == 65536


def test_cli_compare_table(tiny_trace_dir: Path) -> None:
    p = run_cli("compare", str(tiny_trace_dir), "--hbm-budget", "32KiB", "--geometry", "llama3-8b")
    assert p.returncode == 0, p.stderr
    for word in ("static", "lru", "adaptive", "oracle (bound)", "p99 per token", "what-if", "ratio against static"):
        assert word in p.stdout
    j = json.loads(run_cli("compare", str(tiny_trace_dir), "--policies", "static,adaptive", "--json").stdout)
    assert [s["policy"] for s in j["policies"]] == ["static", "adaptive"]
    assert j["policies"][1]["vs_baseline"]["p99"] == pytest.approx(1.0)


def test_cli_sparse_and_kv_type(tiny_trace_dir: Path) -> None:
    p = run_cli("replay", str(tiny_trace_dir), "--policy", "oracle", "--mode", "sparse", "--block-budget", "2",
                "--kv-type", "q8_0/f16", "--json")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["kv_type"] == "q8_0/f16" and s["attention_mass_dropped"]["mean"] > 0


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--policy", "adaptiv"), ("unknown policy", "adaptive, adaptive-select, h2o, lru, oracle")),
        (("--hbm-budget", "2XB"), ("--hbm-budget", "unknown unit")),
        (("--geometry", "llama9"), ("unknown geometry preset",)),
        (("--mode", "sparse"), ("--block-budget",)),
        (("--kv-type", "q9_0"), ("unknown KV type",)),
        (("--profile", "a200"), ("a200",)),
        (("--quality", "/nonexistent/q.json"), ("--quality file not found",)),
    ],
)
def test_cli_errors_are_one_line(tiny_trace_dir: Path, args: tuple[str, ...], needles: tuple[str, ...]) -> None:
    assert_one_line_error(run_cli("replay", str(tiny_trace_dir), *args), *needles)


def test_cli_missing_trace_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("compare", str(tmp_path / "nope")), "trace not found")


def test_cli_shows_measured_quality_beside_the_saving(tiny_trace_dir: Path, tmp_path: Path) -> None:
    from llamatier.quality.store import FORMAT_NAME, FORMAT_VERSION

    row = {"type_k": "q4_0", "type_v": "q4_0", "pair": "q4_0/q4_0", "mean_kl": 0.0123, "p99_kl": 0.2,
           "top1_agreement": 0.93, "ppl": 10.5, "ppl_ref": 10.0, "ppl_change_pct": 5.0,
           "bits_per_element": 4.5, "saving_vs_f16": 0.71875, "n_tokens": 100}
    q = tmp_path / "quality.json"
    q.write_text(json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, "meta": {"model": "tiny"},
                             "rows": [row]}))
    p = run_cli("replay", str(tiny_trace_dir), "--kv-type", "q4_0", "--quality", str(q))
    assert p.returncode == 0, p.stderr
    assert "71.9% fewer bytes than f16/f16" in p.stdout and "mean KL 0.0123" in p.stdout and "93.0%" in p.stdout
    s = json.loads(run_cli("replay", str(tiny_trace_dir), "--kv-type", "q4_0", "--quality", str(q), "--json").stdout)
    assert s["quality"]["top1_agreement"] == pytest.approx(0.93)
    other = run_cli("replay", str(tiny_trace_dir), "--kv-type", "q8_0", "--quality", str(q))
    assert other.returncode == 0 and "has no measurement for this pair" in other.stdout
