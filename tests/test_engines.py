"""The trace-engine seam: engines are looked up by name and plug into the step loop unchanged."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from llamatier.engines import (
    EngineSettings,
    TraceEngine,
    block_mass,
    engine_names,
    get_engine,
    register_engine,
)
from llamatier.engines.llamacpp import LlamaCppEngine
from llamatier.errors import LlamatierError
from llamatier.trace import load_trace
from tests.conftest import trace_model


class CountingEngine(LlamaCppEngine):
    """A plug-in engine: llama.cpp underneath, counting the calls the step loop makes."""

    name = "counting-llama.cpp"
    calls: dict[str, int] = {}

    def decode(self, tokens, pos0, *, logits):  # noqa: ANN001, ANN201
        CountingEngine.calls["decode"] = CountingEngine.calls.get("decode", 0) + 1
        return super().decode(tokens, pos0, logits=logits)

    def attention(self, n_ctx_tokens):  # noqa: ANN001, ANN201
        CountingEngine.calls["attention"] = CountingEngine.calls.get("attention", 0) + 1
        return super().attention(n_ctx_tokens)


def test_builtin_engine_is_llama_cpp_and_satisfies_the_protocol() -> None:
    assert "llama.cpp" in engine_names()
    cls = get_engine("llama.cpp")
    assert cls is LlamaCppEngine
    from llamatier.kvtypes import kv_type

    eng = cls(EngineSettings(n_ctx=64, n_batch=16, n_threads=1, type_k=kv_type("f16"), type_v=kv_type("f16")))
    assert isinstance(eng, TraceEngine)
    eng.close()  # closing an engine that never loaded is fine


def test_unknown_engine_lists_the_valid_names(tiny_model, tmp_path) -> None:
    with pytest.raises(LlamatierError, match=r"unknown engine 'nope': valid engines are .*llama\.cpp"):
        trace_model(tiny_model, tmp_path / "t", engine="nope")
    assert not (tmp_path / "t").exists()  # rejected before anything was written


def test_bad_engine_option_is_one_clear_error(tiny_model, tmp_path) -> None:
    with pytest.raises(LlamatierError, match="unknown llama.cpp engine option.s. n_gpu_layer: known are"):
        trace_model(tiny_model, tmp_path / "t", engine_options={"n_gpu_layer": 3})


def test_a_registered_engine_plugs_into_the_unchanged_step_loop(tiny_model, tiny_trace_dir, tmp_path) -> None:
    register_engine(CountingEngine, replace=True)
    CountingEngine.calls.clear()
    out = tmp_path / "plug"
    trace_model(tiny_model, out, engine="counting-llama.cpp")
    tr, ref = load_trace(out, positions=True), load_trace(tiny_trace_dir, positions=True)
    assert tr.meta["engine"]["name"] == "counting-llama.cpp" and ref.meta["engine"]["name"] == "llama.cpp"
    assert CountingEngine.calls == {"decode": tr.n_steps, "attention": tr.n_steps}
    same = ["step", "phase", "n_tokens", "pos0", "n_kv", "token_in", "token_out"]
    assert tr.steps.select(same).equals(ref.steps.select(same))  # same seed, same engine underneath
    np.testing.assert_array_equal(tr.mass, ref.mass)
    assert tr.positions.sort(["step", "layer", "pos"]).equals(ref.positions.sort(["step", "layer", "pos"]))


def test_block_mass_sums_positions_into_blocks() -> None:
    pos = np.arange(2 * 5, dtype=np.float64).reshape(2, 5)
    np.testing.assert_array_equal(block_mass(pos, 2), np.array([[1, 5, 4], [11, 15, 9]], dtype=np.float32))
    assert block_mass(pos, 8).shape == (2, 1)
    assert pl.Series(block_mass(pos, 1).ravel()).to_list() == pos.ravel().tolist()
