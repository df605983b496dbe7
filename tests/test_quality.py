"""KV type accuracy measured in real llama.cpp runs (tiny GGUF), the saved format, the CLI,
and the committed Gemma 3 270M results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from llamatier.errors import LlamatierError
from llamatier.kvtypes import KV_TYPES, kv_type
from llamatier.quality import (
    LOOKUP_KEYS,
    default_text,
    load_quality_rows,
    lookup_quality,
    measure_quality,
    save_quality,
)
from tests.conftest import REPO, assert_one_line_error, run_cli

COMMITTED = REPO / "results" / "quality"
TEXT = default_text()
CTX = 160  # tokens of the built-in text the tiny-model tests evaluate
PAIRS = "f16,q8_0,q4_0,q4_0/f16,f16/q4_0"


@pytest.fixture(scope="module")
def tiny_result(tiny_model_hd32: Path):
    # one thread: deterministic and fastest on a busy 2-core machine
    return measure_quality(tiny_model_hd32, PAIRS, ctx=CTX, batch_tokens=48, n_threads=1)


def test_f16_against_itself_is_identical(tiny_result) -> None:
    row = tiny_result.row("f16", "f16")
    assert row.mean_kl == 0.0 and row.max_kl == 0.0 and row.p99_kl == 0.0
    assert row.top1_agreement == 1.0
    assert row.ppl == row.ppl_ref and row.ppl_change_pct == 0.0
    assert row.bits_per_element == 16 and row.saving_vs_f16 == 0.0


def test_quantized_kv_changes_the_distribution(tiny_result) -> None:
    q8, q4 = tiny_result.row("q8_0", "q8_0"), tiny_result.row("q4_0", "q4_0")
    assert 0 < q8.mean_kl < q4.mean_kl
    assert q4.top1_agreement < 1.0
    assert q4.bits_per_element == 4.5 and q4.saving_vs_f16 == 0.71875
    mixed = tiny_result.row("q4_0", "f16")
    assert mixed.bits_per_element == (4.5 + 16) / 2  # K and V rows have the same size here
    assert 0 < mixed.mean_kl


def test_summary_matches_per_position_rows(tiny_result) -> None:
    pos = tiny_result.positions
    assert tiny_result.n_tokens == CTX and tiny_result.n_positions == CTX - 1
    assert pos.height == (CTX - 1) * len(tiny_result.rows)
    for row in tiny_result.rows:
        p = pos.filter(pl.col("pair") == row.pair)
        kl = p["kl"].to_numpy()
        assert p["pos"].to_list() == list(range(CTX - 1))
        assert row.mean_kl == pytest.approx(kl.mean(), abs=1e-15)
        assert row.p99_kl == pytest.approx(np.percentile(kl, 99))
        assert row.top1_agreement == pytest.approx(p["top1_agree"].mean())
        assert row.ppl == pytest.approx(np.exp(p["nll"].mean()))
        delta = (p["nll"] - p["nll_ref"]).to_numpy()
        assert row.ppl_change_pct_stderr == pytest.approx(
            100 * row.ppl / row.ppl_ref * delta.std(ddof=1) / np.sqrt(delta.size))
        assert (kl >= -1e-9).all()  # KL is never negative beyond rounding


def test_statistics_match_an_independent_full_logits_run(tiny_model_hd32: Path, tiny_result) -> None:
    """llama-cpp-python's high-level Llama (all logits at once, float64 numpy) gives the same numbers."""
    from llama_cpp import Llama

    def all_logits(type_k: str, type_v: str) -> np.ndarray:
        llm = Llama(str(tiny_model_hd32), n_ctx=CTX, n_batch=48, n_ubatch=48, n_threads=1,
                    n_threads_batch=1, logits_all=True, flash_attn=True, verbose=False,
                    type_k=kv_type(type_k).ggml_id, type_v=kv_type(type_v).ggml_id)
        tokens = llm.tokenize(TEXT.encode(), add_bos=True)[:CTX]
        llm.eval(tokens)
        scores = np.array(llm.scores[: CTX - 1], dtype=np.float64)
        llm.close()
        return scores

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    ref = log_softmax(all_logits("f16", "f16"))
    test = log_softmax(all_logits("q4_0", "q4_0"))
    kl = (np.exp(ref) * (ref - test)).sum(axis=1)
    mine = tiny_result.positions.filter(pl.col("pair") == "q4_0/q4_0")["kl"].to_numpy()
    np.testing.assert_allclose(mine, kl, rtol=1e-5, atol=1e-7)
    agree = (ref.argmax(axis=1) == test.argmax(axis=1)).mean()
    assert tiny_result.row("q4_0", "q4_0").top1_agreement == pytest.approx(agree)


def test_reference_flash_attention_can_differ(tiny_model_hd32: Path, tiny_result) -> None:
    result = measure_quality(tiny_model_hd32, "f16,q8_0/f16", ctx=CTX, batch_tokens=48, n_threads=1,
                             flash_attn=False, reference_flash_attn=True)
    assert result.reference_flash_attn and not result.flash_attn
    assert result.ppl_ref == tiny_result.ppl_ref  # the same f16/f16 flash-attention-on reference run
    assert result.row("f16", "f16").mean_kl >= 0
    with pytest.raises(LlamatierError, match="needs flash attention"):
        measure_quality(tiny_model_hd32, "q8_0", flash_attn=False, reference_flash_attn=True)


def test_every_table_type_runs_in_llama_cpp(tiny_model_hd32: Path) -> None:
    result = measure_quality(tiny_model_hd32, list(KV_TYPES), ctx=40, batch_tokens=40, n_threads=1)
    assert [r.type_k for r in result.rows] == list(KV_TYPES)
    assert all(np.isfinite(r.mean_kl) for r in result.rows)


def test_save_and_lookup_round_trip(tiny_result, tmp_path: Path) -> None:
    paths = save_quality(tiny_result, tmp_path / "q")
    assert {p.name for p in paths} == {"quality.json", "quality.parquet", "quality_positions.parquet"}
    for src in (tmp_path / "q", paths[0], paths[1]):
        got = lookup_quality(src, "q4_0", "q4_0")
        assert set(got) == set(LOOKUP_KEYS)
        row = tiny_result.row("q4_0", "q4_0")
        assert got["mean_kl"] == row.mean_kl and got["p99_kl"] == row.p99_kl
        assert got["saving_vs_f16"] == 0.71875 and got["model"] == "llamatier-tiny-llama"
        assert lookup_quality(src, "Q4_0", "f16")["pair"] == "q4_0/f16"
        assert lookup_quality(src, "q5_1", "q5_1") is None
    with pytest.raises(LlamatierError, match="valid types are"):
        lookup_quality(paths[0], "q7_0", "f16")


def test_lookup_rejects_foreign_and_missing_files(tmp_path: Path) -> None:
    foreign = tmp_path / "other.json"
    foreign.write_text(json.dumps({"rows": []}))
    with pytest.raises(LlamatierError, match="not a llamatier quality result"):
        load_quality_rows(foreign)
    with pytest.raises(LlamatierError, match="not found"):
        lookup_quality(tmp_path / "missing.parquet", "f16", "f16")
    with pytest.raises(LlamatierError, match="no quality.parquet or quality.json"):
        lookup_quality(tmp_path, "f16", "f16")


def test_library_errors_name_the_problem(tiny_model: Path, tiny_model_hd32: Path, tmp_path: Path) -> None:
    with pytest.raises(LlamatierError) as err:
        measure_quality(tiny_model_hd32, "f16,q7_0")
    assert "q7_0" in str(err.value) and all(n in str(err.value) for n in KV_TYPES)
    with pytest.raises(LlamatierError, match="head dim is 16, not a multiple of 32"):
        measure_quality(tiny_model, "q8_0")  # the default tiny model has head dim 16
    with pytest.raises(LlamatierError, match="needs flash attention"):
        measure_quality(tiny_model_hd32, "f16/q8_0", flash_attn=False)
    with pytest.raises(LlamatierError, match="at least 2"):
        measure_quality(tiny_model_hd32, "f16", text="")


def test_cli_table_json_and_out(tiny_model_hd32: Path, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text(TEXT[:600])
    proc = run_cli("quality", str(tiny_model_hd32), "--kv-types", "f16,q8_0/f16", "--text-file", str(text),
                   "--threads", "1", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "q8_0/f16" in proc.stdout and "mean KL" in proc.stdout
    assert lookup_quality(tmp_path / "out", "q8_0", "f16")["bits_per_element"] == 12.25
    proc = run_cli("quality", str(tiny_model_hd32), "-k", "q4_0", "--ctx", "64", "-t", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["meta"]["n_tokens"] == 64 and doc["meta"]["flash_attn"] is True
    assert [r["pair"] for r in doc["rows"]] == ["q4_0/q4_0"]


def test_cli_errors_are_one_line(tiny_model: Path, tiny_model_hd32: Path, tmp_path: Path) -> None:
    err = assert_one_line_error(run_cli("quality", str(tiny_model_hd32), "--kv-types", "f16,q7_0"),
                                "q7_0", "valid types are")
    assert all(n in err for n in KV_TYPES)
    assert_one_line_error(run_cli("quality", str(tiny_model), "-k", "q4_0"), "head dim is 16")
    assert_one_line_error(run_cli("quality", str(tiny_model_hd32), "--text-file", str(tmp_path / "no.txt")),
                          "text file not found")
    assert_one_line_error(run_cli("quality", str(tmp_path / "no.gguf")), "model file not found")
    not_gguf = tmp_path / "bad.gguf"
    not_gguf.write_bytes(b"not a model at all")
    assert_one_line_error(run_cli("quality", str(not_gguf)), "not a GGUF file")


def test_model_llama_cpp_refuses_is_one_line(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "unknown-arch.gguf"
    w = gguf.GGUFWriter(str(path), "notanarch")
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_head_count(2)
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    err = assert_one_line_error(run_cli("quality", str(path), "-k", "f16"), "could not load")
    assert "notanarch" in err  # llama.cpp's own reason is quoted


# --- the committed Gemma 3 270M measurement (bench/measure_quality_gemma.py) ---

COARSER_THAN_Q8_0 = ("q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")


@pytest.fixture(scope="module")
def gemma_rows() -> dict[str, dict]:
    rows = load_quality_rows(COMMITTED / "quality.parquet")
    return {r["pair"]: r for r in rows}


def test_committed_gemma_results_cover_the_issue_types(gemma_rows) -> None:
    for name in ("f16", "q8_0", "q5_0", "q4_0", "iq4_nl"):
        assert f"{name}/{name}" in gemma_rows
    assert {r["model"] for r in gemma_rows.values()} == {"Gemma 3 270m"}
    assert all(r["n_tokens"] >= 500 for r in gemma_rows.values())


def test_coarser_types_never_beat_q8_0_in_gemma_results(gemma_rows) -> None:
    q8 = gemma_rows["q8_0/q8_0"]["mean_kl"]
    assert q8 > 0
    for name in COARSER_THAN_Q8_0:
        assert gemma_rows[f"{name}/{name}"]["mean_kl"] >= q8, name


def test_gemma_results_agree_with_the_type_table(gemma_rows) -> None:
    ref = gemma_rows["f16/f16"]
    assert ref["mean_kl"] == 0 and ref["top1_agreement"] == 1
    for r in gemma_rows.values():
        tk, tv = kv_type(r["type_k"]), kv_type(r["type_v"])
        assert r["bits_per_element"] == pytest.approx((tk.bits_per_element + tv.bits_per_element) / 2)


@pytest.mark.gemma
def test_gemma_runs_teacher_forced(gemma_model: Path) -> None:
    result = measure_quality(gemma_model, "f16,q4_0", ctx=48, batch_tokens=48, n_threads=1)
    assert result.n_vocab == 262144
    assert result.row("f16", "f16").mean_kl == 0
    assert result.row("q4_0", "q4_0").mean_kl > 0
