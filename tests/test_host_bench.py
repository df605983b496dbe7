"""Host model from llama-bench rows of the user's CPU: stock settings (flash attention, sliding windows)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from llamatier.errors import LlamatierError
from llamatier.hardware import HostComputeModel, load_profile
from llamatier.hardware.hostmodel import attended_cells
from llamatier.llamabench.calibrate import calibrate_from_llama_bench, validate_llama_bench
from llamatier.llamabench.hostfit import fit_host_from_bench, host_rows, predict_bench_rows
from llamatier.llamabench.reader import FIELDS
from tests.conftest import assert_one_line_error, run_cli

REPO = Path(__file__).resolve().parents[1]
GEMMA = dict(model_type="gemma3 270M Q4_K - Medium", model_size=246_587_904, model_n_params=268_098_176)
SWA = dict(swa_layer_fraction=15 / 18, swa_window=512)  # Gemma 3 270M: 15 of 18 layers windowed to 512

TRUE = HostComputeModel(
    terms=("step", "token", "kv@fa=on", "token_kv@fa=on"),
    serial_s=(3e-3, 2e-5, 4e-7, 3e-9),
    parallel_s=(12e-3, 9e-4, 2e-6, 4e-8),
    k_types=("f16",), v_types=("f16",), thread_counts=(1, 2), n_ubatch=512, flash_attn=(True,), **SWA,
)


def cpu_bench(model: HostComputeModel = TRUE, depths=(0, 512, 1024, 2048, 3072), threads=(1, 2),
              noise: float = 0.0, seed: int = 0) -> pl.DataFrame:
    """CPU llama-bench rows (its field names) timed by ``model``."""
    rng = np.random.default_rng(seed)
    rows = []
    for d in depths:
        for t in threads:
            for p, g in ((512, 0), (0, 64)):
                rows.append(dict(GEMMA, build_commit="0c1e570", build_number=1, cpu_info="Test CPU", gpu_info="",
                                 backends="CPU", n_batch=2048, n_ubatch=512, n_threads=t, type_k="f16",
                                 type_v="f16", n_gpu_layers=-1, no_kv_offload=False, flash_attn=-1, n_prompt=p,
                                 n_gen=g, n_depth=d, avg_ts=1.0))
    df = pl.DataFrame([{k: r.get(k) for k in FIELDS} for r in rows], schema=FIELDS)
    secs = predict_bench_rows(model, host_rows(df))
    tokens = (df["n_prompt"] + df["n_gen"]).to_numpy()
    return df.with_columns(pl.Series("avg_ts", tokens / secs * (1 + noise * rng.standard_normal(len(secs)))))


def test_stock_sliding_window_layers_attend_only_their_window():
    n_kv = np.array([100, 600, 1500, 4000])
    traced = attended_cells(n_kv, 256, swa_full=True, swa_layer_fraction=15 / 18, swa_window=512)
    stock = attended_cells(n_kv, 256, swa_full=False, swa_layer_fraction=15 / 18, swa_window=512, n_ubatch=512)
    assert traced.tolist() == [256, 768, 1536, 4096]
    # windowed layers keep pad(512 + 512) = 1024 cells: beyond that only the 3 global layers grow
    assert stock.tolist() == pytest.approx([256, 768, (3 * 1536 + 15 * 1024) / 18, (3 * 4096 + 15 * 1024) / 18])


def test_fit_recovers_a_stock_host_model_from_llama_bench_rows():
    rows = host_rows(cpu_bench())
    assert all(r.flash_attn for r in rows)  # -fa auto is on on the CPU backend
    fit = fit_host_from_bench(rows, model_name="Gemma 3 270m", **SWA)
    assert fit.model.terms == TRUE.terms
    np.testing.assert_allclose(fit.model.serial_s, TRUE.serial_s, rtol=1e-6)
    np.testing.assert_allclose(fit.model.parallel_s, TRUE.parallel_s, rtol=1e-6)
    assert fit.model.flash_attn == (True,) and fit.model.thread_counts == (1, 2)
    assert np.abs(fit.rel_error).max() < 1e-9
    assert "flash attention on" in fit.model.configuration(swa_full=False)
    assert "hold only their window (512 tokens" in fit.model.configuration(swa_full=False)


def test_rows_at_one_depth_and_one_thread_count_are_refused_naming_what_to_add():
    rows = host_rows(cpu_bench(depths=(1024,), threads=(2,)))
    with pytest.raises(LlamatierError, match=r"other depths .*-t 1,2") as exc:
        fit_host_from_bench(rows, model_name="Gemma 3 270m", **SWA)
    assert "\n" not in str(exc.value)


def test_a_model_fitted_with_flash_attention_on_refuses_to_predict_it_off():
    fit = fit_host_from_bench(host_rows(cpu_bench()), model_name="Gemma 3 270m", **SWA)
    with pytest.raises(LlamatierError, match="flash attention on only, not off"):
        fit.model.predict_step_s(n_tokens=np.array([1]), n_kv=np.array([100]), type_k="f16", type_v="f16",
                                 n_threads=2, flash_attn=False)


def test_calibrate_and_validate_cpu_rows_on_the_command_line(tmp_path):
    df = cpu_bench(noise=0.01, seed=2)
    fit_rows = df.filter(pl.col("n_depth").is_in([0, 1024, 3072]))
    held = df.filter(pl.col("n_depth").is_in([512, 2048]))
    fit_file, held_file = tmp_path / "fit.jsonl", tmp_path / "held.jsonl"
    fit_file.write_text("\n".join(json.dumps(r) for r in fit_rows.to_dicts()) + "\n")
    held_file.write_text("\n".join(json.dumps(r) for r in held.to_dicts()) + "\n")
    out = tmp_path / "host.toml"
    res = run_cli("calibrate", "--llama-bench", str(fit_file), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "predicts: flash attention on" in res.stdout
    hm = load_profile(out).compute.host_model
    header = out.read_text().split("\n[", 1)[0]
    assert f"fitted on {fit_rows.height} llama-bench rows" in header and "traces it lists" not in header
    assert hm.flash_attn == (True,) and hm.swa_window == 512 and hm.model_name == "Gemma 3 270M"
    res = run_cli("validate", "--llama-bench", str(held_file), "--profile", str(out), "--json")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["kind"] == "host" and len(rep["rows"]) == held.height
    assert "hold only their window" in rep["configuration"]
    assert rep["stats"]["median_ape"] < 0.05  # 1% noise on the rows: the held-out rows come back close
    # a trace-calibrated profile cannot predict stock rows with flash attention on: one line naming the fix
    calib = REPO / "traces" / "calib" / "cpu-host-calibrated.toml"
    assert_one_line_error(run_cli("validate", "--llama-bench", str(held_file), "--profile", str(calib)),
                          "flash attention")


def test_gpu_and_cpu_rows_are_calibrated_apart(tmp_path):
    cpu = cpu_bench(depths=(0, 1024), threads=(1, 2))
    mixed = cpu.with_columns(pl.when(pl.col("n_depth") == 0).then(pl.lit("CUDA")).otherwise(pl.col("backends"))
                             .alias("backends"))
    f = tmp_path / "mixed.csv"
    mixed.write_csv(f)
    with pytest.raises(LlamatierError, match="mix GPU rows and CPU rows"):
        calibrate_from_llama_bench([f])


def test_rows_of_another_build_are_labelled(tmp_path):
    df = cpu_bench()
    f1, f2 = tmp_path / "a.csv", tmp_path / "b.csv"
    df.write_csv(f1)
    df.with_columns(pl.lit("deadbee").alias("build_commit")).write_csv(f2)
    profile, _ = calibrate_from_llama_bench([f1])
    rep = validate_llama_bench(profile, [f2])
    assert all(label == "other build than the fit" for label in rep.labels)
