"""GPU step model: the fit recovers known terms, refuses rows that cannot separate them, labels extrapolations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from llamatier.errors import LlamatierError
from llamatier.hardware import load_profile
from llamatier.hardware.gpumodel import GpuStepModel, llama_cpp_paths, parse_date
from llamatier.llamabench.calibrate import (
    calibrate_from_llama_bench,
    published_gpu_rows,
    validate_llama_bench,
)
from llamatier.llamabench.gpufit import fit_gpu_model, gpu_rows, leave_one_gpu_out, predict_rows
from llamatier.llamabench.reader import FIELDS, format_test, read_llama_bench
from tests.conftest import assert_one_line_error, run_cli

REPO = Path(__file__).resolve().parents[1]

TRUE = GpuStepModel(coef={
    "layer": 120e-6, "layer_graph": 40e-6, "weights": 1.15, "dequant": 0.8, "matmul": 2.5, "matmul_mmq": 3.5,
    "attention": 9.0, "split": 250e-6, "host_kv": 1 / 25e9, "host_flops": 1 / 80e9,
})

# (gpu_info, date): a GPU without CUDA graphs and with cuBLAS prefill, and two with graphs and MMQ
GPUS = (("NVIDIA GeForce RTX 3090", "2024-02-01"), ("NVIDIA GeForce RTX 4090", "2025-06-01"),
        ("Tesla V100-PCIE-16GB", "2025-03-06"))
MODELS = (("llama 7B F16", 13_476_839_424, 6_738_415_616), ("llama 7B Q4_0", 3_825_065_984, 6_738_415_616),
          ("qwen2 7B Q4_K - Medium", 4_677_120_000, 7_615_616_512))


def bench_frame(rows: list[dict]) -> pl.DataFrame:
    schema = {k: v for k, v in FIELDS.items()}
    return pl.DataFrame([{k: r.get(k) for k in schema} for r in rows], schema=schema)


def synthetic_bench(model: GpuStepModel = TRUE, gpus=GPUS, models=MODELS, depths=(0, 4096), nkvo=(False, True),
                    noise: float = 0.0, seed: int = 0) -> pl.DataFrame:
    """llama-bench rows (its field names) whose avg_ts the model itself gives."""
    rng = np.random.default_rng(seed)
    rows = []
    for gpu, date in gpus:
        for mt, size, params in models:
            for d in depths:
                for kv_off in nkvo:
                    for p, g in ((512, 0), (0, 128)):
                        rows.append(dict(gpu_info=gpu, backends="CUDA", model_type=mt, model_size=size,
                                         model_n_params=params, n_gpu_layers=99, no_kv_offload=kv_off, flash_attn=0,
                                         n_prompt=p, n_gen=g, n_depth=d, test_time=date, avg_ts=1.0))
    df = bench_frame(rows)
    work_rows, skipped = gpu_rows(df)
    assert not skipped
    ts = [(row["n_prompt"] + row["n_gen"]) / model.predict_s(r.work) * (1 + noise * rng.standard_normal())
          for r, row in zip(work_rows, df.iter_rows(named=True), strict=True)]
    return df.with_columns(pl.Series("avg_ts", ts))


def test_kernel_paths_follow_llama_cpp_history():
    before, after = parse_date("2024-01"), parse_date("2025-04-24T11:58:50Z")
    assert llama_cpp_paths(8.6, True, before).cuda_graphs is False
    assert llama_cpp_paths(8.6, True, after).cuda_graphs is True
    assert llama_cpp_paths(7.0, True, after).cuda_graphs is False  # Volta/Turing: only in 2026 builds
    assert llama_cpp_paths(7.5, True, None).cuda_graphs is True  # a current build
    assert llama_cpp_paths(8.9, True, after).quant_prefill == "mmq_int8"
    assert llama_cpp_paths(8.6, True, before).quant_prefill == "cublas_dequant"
    assert llama_cpp_paths(7.0, True, after).quant_prefill == "cublas_dequant"
    assert llama_cpp_paths(6.1, False, before).quant_prefill == "dp4a"


def test_fit_recovers_the_terms_of_rows_the_model_generated():
    rows, _ = gpu_rows(synthetic_bench())
    fit = fit_gpu_model(rows)
    assert set(fit.model.coef) == set(TRUE.coef)
    for term, value in TRUE.coef.items():
        assert fit.model.coef[term] == pytest.approx(value, rel=1e-6), term
    assert np.abs(fit.rel_error).max() < 1e-9
    assert fit.model.fitted_on == ("RTX 3090", "RTX 4090", "V100 PCIe")
    assert fit.model.fitted_models == ("llama 7B", "qwen2 7B")


def test_fit_recovers_terms_within_noise():
    rows, _ = gpu_rows(synthetic_bench(noise=0.01, seed=3))
    fit = fit_gpu_model(rows)
    for term in ("layer", "layer_graph", "weights", "matmul", "split"):
        assert fit.model.coef[term] == pytest.approx(TRUE.coef[term], rel=0.15), term


def test_one_gpu_one_model_decode_rows_cannot_separate_launches_from_bandwidth():
    df = synthetic_bench(gpus=GPUS[:1], models=MODELS[1:2], depths=(0,), nkvo=(False,)).filter(pl.col("n_gen") > 0)
    df = pl.concat([df, df.with_columns(pl.lit(64, dtype=pl.Int64).alias("n_gen"))])  # tg128 and tg64
    rows, _ = gpu_rows(df)
    with pytest.raises(LlamatierError) as exc:
        fit_gpu_model(rows)
    msg = str(exc.value)
    assert "\n" not in msg and "cannot" in msg and "add" in msg
    assert "layer" in msg and "weights" in msg and "another GPU" in msg


def test_nkvo_rows_at_one_depth_cannot_separate_the_split_from_host_attention():
    # one GPU, one model, one depth: every -nkvo step splits as many layers as it attends the same cells
    rows, _ = gpu_rows(synthetic_bench(gpus=GPUS[1:2], models=MODELS[1:2], depths=(0,)))
    with pytest.raises(LlamatierError, match=r"cannot separate the GPU terms") as exc:
        fit_gpu_model(rows)
    msg = str(exc.value)
    assert "split" in msg and "host_kv" in msg and "add" in msg and "\n" not in msg
    # --partial fits what the rows do identify and says which term it left out
    fit = fit_gpu_model(rows, partial=True)
    assert {"host_kv", "host_flops"} & set(fit.model.unfitted) and "split" in fit.model.coef


def test_a_profile_fitted_on_some_gpus_labels_predictions_for_a_gpu_or_model_it_never_saw(tmp_path):
    df = synthetic_bench()
    seen = df.filter((pl.col("gpu_info") != "Tesla V100-PCIE-16GB") & (pl.col("model_type") != "qwen2 7B Q4_K - Medium"))
    unseen = df.filter((pl.col("gpu_info") == "Tesla V100-PCIE-16GB") | (pl.col("model_type") == "qwen2 7B Q4_K - Medium"))
    fit_file, check_file = tmp_path / "fit.csv", tmp_path / "check.csv"
    seen.write_csv(fit_file)
    unseen.write_csv(check_file)
    profile, cal = calibrate_from_llama_bench([fit_file], base="a100-40g", partial=True)
    assert cal.kind == "gpu" and profile.compute.gpu_model.fitted_on == ("RTX 3090", "RTX 4090")
    rep = validate_llama_bench(profile, [check_file])
    assert len(rep.labels) == unseen.height
    for p, label in zip(rep.predictions, rep.labels, strict=True):
        assert label, p
        if p.gpu == "V100 PCIe":
            assert "GPU not in the fit (V100 PCIe)" in label
        if p.model_type.startswith("qwen2"):
            assert "model not in the fit (qwen2 7B)" in label


def test_calibrate_and_validate_on_the_command_line(tmp_path):
    bench = tmp_path / "bench.jsonl"
    df = synthetic_bench(gpus=GPUS[1:2], noise=0.0)
    bench.write_text("\n".join(json.dumps(r) for r in df.to_dicts()) + "\n")
    out = tmp_path / "rtx4090.toml"
    res = run_cli("calibrate", "--llama-bench", str(bench), "--base", "a100-40g", "--partial", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout and out.exists()
    prof = load_profile(out)
    assert prof.compute.gpu_model.fitted_on == ("RTX 4090",)
    header = out.read_text().split("\n[", 1)[0]
    assert "Calibrated GPU profile" in header and "llama-bench rows of RTX 4090" in header
    assert "traces it lists" not in header
    res = run_cli("validate", "--llama-bench", str(bench), "--profile", str(out), "--json")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["kind"] == "gpu" and len(rep["rows"]) == df.height
    errs = [abs(r["error"]) for r in rep["rows"] if r["error"] is not None]
    assert errs and max(errs) < 1e-6
    # a GPU profile without a base and rows of a GPU that has no built-in profile: one line naming the fix
    assert_one_line_error(run_cli("calibrate", "--llama-bench", str(bench), "--out", str(tmp_path / "x.toml")),
                          "--base")


def test_leave_one_gpu_out_predicts_every_gpu_from_the_others():
    rows, _ = gpu_rows(synthetic_bench())
    lo = leave_one_gpu_out(rows)
    assert {p.gpu for p in lo.predictions} == {"RTX 3090", "RTX 4090", "V100 PCIe"}
    assert len(lo.predictions) == len(rows)
    got = [p for p in lo.predictions if p.predicted_s == p.predicted_s]
    # rows generated by one model: any GPU the others' kernel paths cover is predicted exactly
    assert got and all(abs(p.rel_error) < 1e-6 for p in got if not p.note)


def test_the_built_in_gpu_profiles_carry_the_fit_of_the_published_set():
    rows, _ = published_gpu_rows()
    fit = fit_gpu_model(rows, partial=True)
    for name in ("a100-40g", "a100-80g", "h100-sxm", "l4", "t4"):
        gm = load_profile(name).compute.gpu_model
        assert gm is not None and gm.fitted_on == fit.model.fitted_on
        assert set(gm.coef) == set(fit.model.coef) and gm.unfitted == fit.model.unfitted
        for term, value in fit.model.coef.items():
            assert gm.coef[term] == pytest.approx(value, rel=1e-5), (name, term)
    res = subprocess.run([sys.executable, str(REPO / "bench" / "fit_gpu_profiles.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_predictions_that_borrow_a_term_say_so():
    rows, _ = gpu_rows(synthetic_bench(gpus=GPUS[:1], depths=(0, 4096)))
    fit = fit_gpu_model([r for r in rows if r.gpu == "RTX 3090"], partial=True)
    assert "matmul_mmq" not in fit.model.coef  # the 3090 (2024) runs quantized prefill on cuBLAS
    rows_4090, _ = gpu_rows(synthetic_bench(gpus=GPUS[1:2], depths=(0,), nkvo=(False,)))
    preds = predict_rows(fit.model, rows_4090)
    pp_q = [p for p in preds if p.test == format_test(512, 0, 0) and "Q4" in p.model_type]
    assert pp_q and all("borrowed matmul_mmq<-matmul" in p.note for p in pp_q)
    strict = predict_rows(fit.model, rows_4090, borrow=False)
    assert all(p.predicted_s != p.predicted_s and "not fitted: matmul_mmq" in p.note for p in strict
               if p.test == "pp512" and "Q4" in p.model_type)


def test_the_published_ground_truth_reads_as_llama_bench_csv():
    df = read_llama_bench(REPO / "llamatier" / "data" / "llama_bench_published.csv")
    assert df.height >= 40
    assert df["source_url"].null_count() == 0 and df["source_ref"].null_count() == 0
    assert df["test_time"].null_count() == 0  # the date decides llama.cpp's kernel paths
    rows, skipped = published_gpu_rows()
    assert len(rows) + len(skipped) == df.height
    assert all("model_size" in s.reason for s in skipped)  # the only reason a published row is not usable


def test_trace_records_the_gpu_placement_it_was_asked_for(tiny_model, tmp_path):
    out = tmp_path / "t"
    res = run_cli("trace", str(tiny_model), "--prompt", "the tier keeps hot blocks", "--n-predict", "4",
                  "--ctx", "256", "--threads", "1", "--n-gpu-layers", "99", "--no-offload-kqv", "--out", str(out))
    assert res.returncode == 0, res.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["context"]["n_gpu_layers"] == 99 and meta["context"]["offload_kqv"] is False
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():  # this CPU build: the run says the flags changed nothing
        assert "no GPU backend" in res.stdout
    assert_one_line_error(run_cli("trace", str(tiny_model), "--n-gpu-layers", "-1", "--out", str(tmp_path / "u")),
                          "--n-gpu-layers must be >= 0")


@pytest.mark.parametrize(("gpu_info", "name"), [
    ("NVIDIA GeForce RTX 3090 Ti", "RTX 3090 Ti"), ("NVIDIA GeForce RTX 3090", "RTX 3090"),
    ("Tesla V100-PCIE-16GB", "V100 PCIe"), ("NVIDIA A100-SXM4-80GB", "A100 80GB"),
    ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe"), ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA L4", "L4"),
    ("NVIDIA L40S", None), ("NVIDIA GeForce RTX 4080 SUPER", None), ("", None),
])
def test_gpu_names_match_their_datasheet_entry_and_no_other(gpu_info, name):
    from llamatier.llamabench.models import find_gpu_spec

    spec = find_gpu_spec(gpu_info)
    assert (spec.name if spec else None) == name
