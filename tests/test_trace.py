"""The tracer on real llama.cpp runs of tiny generated models (and Gemma for sliding windows)."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from llamatier.trace import load_trace
from llamatier.trace.format import FORMAT_VERSION, STEP_SCHEMA
from tests.conftest import trace_model


def test_trace_has_prefill_then_decode_steps(tiny_trace) -> None:
    st = tiny_trace.steps
    assert tiny_trace.complete
    assert set(st.columns) >= set(STEP_SCHEMA)
    phases = st["phase"].to_list()
    n_pre = phases.count("prefill")
    assert n_pre >= 2 and phases[n_pre:] == ["decode"] * 32
    # positions are contiguous: each step starts where the previous one ended
    pos0 = st["pos0"].to_numpy().astype(int)
    n = st["n_tokens"].to_numpy().astype(int)
    assert pos0[0] == 0 and np.array_equal(pos0[1:], (pos0 + n)[:-1])
    assert (st["decode_s"].to_numpy() > 0).all()
    # llama.cpp pads the attended cells to a multiple of 256
    n_kv = st["n_kv"].to_numpy().astype(int)
    assert (n_kv % 256 == 0).all() and (n_kv >= pos0 + n).all()
    # perf counters are cumulative and count every decode token
    assert st["perf_n_eval"].to_numpy()[-1] >= 31
    assert tiny_trace.meta["context"]["n_prompt_tokens"] == int(n[:n_pre].sum())


def test_mass_sums_to_one_per_step_and_layer(tiny_trace) -> None:
    sums = tiny_trace.mass.sum(axis=2)
    assert sums.shape == (tiny_trace.n_steps, tiny_trace.n_layers)
    np.testing.assert_allclose(sums, 1.0, atol=1e-4)


def test_no_mass_beyond_current_position(tiny_trace) -> None:
    # blocks past the context hold nothing
    vb = tiny_trace.visible_blocks
    for s in range(tiny_trace.n_steps):
        assert not tiny_trace.mass[s, :, vb[s]:].any()
    # per position: a decode query at position q puts nothing on positions > q
    pos = tiny_trace.positions.join(tiny_trace.steps.select("step", "phase", "pos0"), on="step")
    dec = pos.filter(pl.col("phase") == "decode")
    future = dec.filter(pl.col("pos") > pl.col("pos0"))
    assert future.height == 0 or float(future["mass"].abs().max()) == 0.0
    assert dec.filter(pl.col("pos") <= pl.col("pos0"))["mass"].sum() > 0


def test_block_sums_agree_with_positions(tiny_trace) -> None:
    B = tiny_trace.block_tokens
    S, L, NB = tiny_trace.mass.shape
    pos = tiny_trace.positions
    dense = np.zeros((S, L, NB * B))
    dense[pos["step"].to_numpy(), pos["layer"].to_numpy(), pos["pos"].to_numpy()] = pos["mass"].to_numpy()
    np.testing.assert_allclose(dense.reshape(S, L, NB, B).sum(axis=3), tiny_trace.mass, atol=1e-5)


def test_attention_is_not_uniform(tiny_trace) -> None:
    # a real model's softmax is not the uniform 1/n the capture would produce if it read garbage
    last = tiny_trace.mass[-1]
    vb = int(tiny_trace.visible_blocks[-1])
    assert last[:, :vb].std() > 1e-3


def test_sliding_window_layers_see_only_their_window(tiny_gemma_model, tmp_path) -> None:
    trace_model(tiny_gemma_model, tmp_path / "g", n_predict=16)
    tr = load_trace(tmp_path / "g", positions=True)
    assert tr.model.geometry.sliding_window == (64, 0)
    pos = tr.positions.join(tr.steps.select("step", "phase", "pos0"), on="step")
    dec = pos.filter(pl.col("phase") == "decode")
    outside = dec.filter(pl.col("pos0") - pl.col("pos") >= 64)
    assert outside.height > 0
    windowed = outside.filter(pl.col("layer") == 0)["mass"]
    glob = outside.filter(pl.col("layer") == 1)["mass"]
    assert float(windowed.abs().max()) == 0.0
    assert float(glob.sum()) > 0.0  # the global layer does look back further
    # the stored attention table leaves out the window layer's empty blocks; reading fills in 0
    attn = pl.concat([pl.read_parquet(f) for f in sorted((tmp_path / "g").glob("attn-*.parquet"))])
    assert attn.height == int(np.count_nonzero(tr.mass)) and float(attn["mass"].abs().min()) > 0.0
    vb = tr.visible_blocks
    assert attn.height < tr.n_layers * int(vb.sum())
    np.testing.assert_allclose(tr.mass.sum(axis=2), 1.0, atol=1e-4)


@pytest.mark.gemma
def test_gemma_sliding_window_layers_get_no_mass_outside_window(gemma_model, tmp_path) -> None:
    from llamatier.demo import builtin_prompt

    text = builtin_prompt()[:3200]  # ~700 tokens: past Gemma's 512-token window
    trace_model(gemma_model, tmp_path / "gemma", prompt=text, n_predict=6, n_batch=512, positions=True)
    tr = load_trace(tmp_path / "gemma", positions=True)
    g = tr.model.geometry
    assert g.sliding_window.count(512) == 15 and g.sliding_window.count(0) == 3
    pos = tr.positions.join(tr.steps.select("step", "phase", "pos0"), on="step")
    dec = pos.filter(pl.col("phase") == "decode")
    swa_layers = [i for i, w in enumerate(g.sliding_window) if w]
    glob_layers = [i for i, w in enumerate(g.sliding_window) if not w]
    outside = dec.filter(pl.col("pos0") - pl.col("pos") >= 512)
    assert outside.height > 0
    assert float(outside.filter(pl.col("layer").is_in(swa_layers))["mass"].abs().max()) == 0.0
    assert float(outside.filter(pl.col("layer").is_in(glob_layers))["mass"].sum()) > 0.0
    np.testing.assert_allclose(tr.mass.sum(axis=2), 1.0, atol=1e-4)


def test_same_seed_same_tokens(tiny_model, tmp_path) -> None:
    a = trace_model(tiny_model, tmp_path / "a", n_predict=12, positions=False)
    b = trace_model(tiny_model, tmp_path / "b", n_predict=12, positions=False)
    ta, tb = load_trace(a.out_dir), load_trace(b.out_dir)
    assert ta.steps["token_out"].to_list() == tb.steps["token_out"].to_list()
    np.testing.assert_allclose(ta.mass, tb.mass, atol=1e-6)


def test_quantized_k_traces_with_flash_attention_off(tiny_model_hd32, tmp_path) -> None:
    trace_model(tiny_model_hd32, tmp_path / "q", n_predict=8, type_k="q8_0", positions=False)
    tr = load_trace(tmp_path / "q")
    assert tr.context["type_k"] == "q8_0" and tr.context["flash_attn"] is False
    np.testing.assert_allclose(tr.mass.sum(axis=2), 1.0, atol=1e-4)


def test_python_capture_backend_matches_c(tiny_model, tmp_path) -> None:
    trace_model(tiny_model, tmp_path / "c", n_predict=8, capture_backend="c", positions=False)
    trace_model(tiny_model, tmp_path / "py", n_predict=8, capture_backend="python", positions=False)
    c, py = load_trace(tmp_path / "c"), load_trace(tmp_path / "py")
    assert c.meta["capture"]["backend"] == "c" and py.meta["capture"]["backend"] == "python"
    np.testing.assert_allclose(c.mass, py.mass, atol=1e-5)


def test_meta_records_model_context_and_machine(tiny_trace) -> None:
    m = tiny_trace.meta
    assert m["format"] == "llamatier-trace" and m["version"] == FORMAT_VERSION
    assert m["model"]["architecture"] == "llama" and m["model"]["n_layers"] == 2
    assert m["model"]["geometry"]["head_dim_k"] == [16, 16]
    assert m["model"]["weight_bytes"] > 0
    assert m["context"]["flash_attn"] is False and m["context"]["swa_full"] is True
    assert "CPU" in m["system_info"] or "AVX" in m["system_info"] or m["system_info"]
    assert m["machine"]["cores_usable"] >= 1
    json.dumps(m)  # round-trips as JSON


def test_block_tokens_reaggregation(tiny_trace) -> None:
    coarse = tiny_trace.with_block_tokens(64)
    np.testing.assert_allclose(coarse.mass.sum(axis=2), tiny_trace.mass.sum(axis=2), atol=1e-5)
    np.testing.assert_allclose(coarse.mass[:, :, 0], tiny_trace.mass[:, :, :4].sum(axis=2), atol=1e-6)
