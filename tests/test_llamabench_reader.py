"""The llama-bench reader on samples of every output format (tools/llama-bench/README.md, "Output formats")."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamatier.errors import LlamatierError
from llamatier.llamabench import format_test, parse_llama_bench, parse_test_name, read_llama_bench

DATA = Path(__file__).parent / "data" / "llama_bench"


def test_json_jsonl_and_csv_give_the_same_fields():
    rows = {fmt: read_llama_bench(DATA / f"readme.{fmt}") for fmt in ("json", "jsonl", "csv")}
    for fmt, df in rows.items():
        assert df.height == 2, fmt
        r = df.row(0, named=True)
        assert r["source_format"] == fmt
        assert r["gpu_info"] == "NVIDIA GeForce RTX 4080" and r["backends"] == "CUDA"
        assert r["model_type"] == "qwen2 7B Q4_K - Medium"
        assert r["model_size"] == 4677120000 and r["model_n_params"] == 7615616512
        assert (r["n_prompt"], r["n_gen"], r["n_depth"]) == (512, 0, 0)
        assert r["flash_attn"] == -1 and r["no_kv_offload"] is False and r["n_gpu_layers"] == -1
        assert r["build_commit"] == "8cf427ff" and r["build_number"] == 5163
        assert r["test_time"].startswith("2025-04-24")
    # the csv sample carries the json example's rows, so the measurements agree exactly
    assert rows["csv"]["avg_ts"].to_list() == rows["json"]["avg_ts"].to_list() == [7100.002165, 118.881588]
    assert rows["jsonl"]["avg_ts"].to_list() == [7263.609157, 119.844681]
    assert rows["jsonl"]["stddev_ts"].to_list() == [90.940578, 0.699739]


def test_markdown_console_paste_and_the_old_test_names():
    df = read_llama_bench(DATA / "readme.md")
    new, old = df.head(4), df.tail(16)
    assert new["gpu_info"].to_list() == ["NVIDIA GeForce RTX 4080"] * 4  # from the "Device 0:" line
    assert new["build_commit"].to_list() == ["8cf427ff"] * 4 and new["build_number"].to_list() == [5163] * 4
    assert [format_test(*t) for t in new.select("n_prompt", "n_gen", "n_depth").rows()] == [
        "pp512", "tg128", "pp512 @ d512", "tg128 @ d512"]
    assert new["avg_ts"].to_list() == [7340.20, 120.60, 6425.91, 116.71]
    assert new["stddev_ts"].to_list() == [23.45, 0.59, 18.88, 0.60]
    assert new["model_size"][0] == round(4.36 * 2**30)  # "4.36 GiB"
    assert new["model_n_params"][0] == 7_620_000_000  # "7.62 B"
    # the older table: "pp 512" test names, ngl column, no footer or device line after it
    assert old["n_gpu_layers"].to_list()[:4] == [10, 10, 20, 20]
    assert old["n_prompt"].to_list()[:2] == [512, 0] and old["n_gen"].to_list()[:2] == [0, 128]
    assert old["gpu_info"].null_count() == 16 and old["build_number"].null_count() == 16


def test_the_readme_csv_example_whose_rows_miss_a_value_is_refused():
    # header 42 fields, rows 41 values: reading it would shift every later value into the wrong field
    with pytest.raises(LlamatierError, match=r"row 1 has 41 values for 42 header fields"):
        read_llama_bench(DATA / "readme-misaligned.csv")


@pytest.mark.parametrize("text", ["pp512", "tg128", "pp512+tg128", "pp 512", "tg128 @ d4096", "pp512 @ d512"])
def test_test_names_round_trip(text):
    p, g, d = parse_test_name(text)
    assert format_test(p, g, d).replace(" ", "") == text.replace(" ", "")


@pytest.mark.parametrize(
    ("text", "fmt", "message"),
    [
        ("[{\"model_type\": \"x\"}]", "json", "lacks n_prompt, n_gen, avg_ts"),
        ("{\"model_type\": \"x\", \"n_prompt\": 1, \"n_gen\": 0, \"avg_ts\": 0}", "jsonl", "must be > 0"),
        ("not json", "json", "not valid JSON"),
        ("a,b\n1,2\n", "csv", "header row"),
        ("| model | test |\n| --- | --- |\n| x | pp1 |\n", "md", "no llama-bench table"),
        ("| model | test | t/s |\n| --- | --- | ---: |\n| x | banana | 1 ± 0 |\n", "md", "not a llama-bench test"),
        ("{\"model_type\": \"x\", \"n_prompt\": \"many\", \"n_gen\": 0, \"avg_ts\": 1}", "jsonl", "n_prompt"),
    ],
)
def test_bad_input_is_one_line_naming_the_file(text, fmt, message):
    with pytest.raises(LlamatierError, match=message) as exc:
        parse_llama_bench(text, path="bench.out", fmt=fmt)
    assert "\n" not in str(exc.value) and "bench.out" in str(exc.value)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(LlamatierError, match="not found"):
        read_llama_bench(tmp_path / "nope.jsonl")
    odd = tmp_path / "odd.txt"
    odd.write_text("hello\n")
    with pytest.raises(LlamatierError, match="cannot tell its format"):
        read_llama_bench(odd)
