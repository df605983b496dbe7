"""Calibration and validation: the fit recovers known parameters; calibrate -> validate end to end."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from llamatier.calibrate import StepData, fit_host_model, infer_kv_pad_cells, nnls
from llamatier.errors import LlamatierError
from llamatier.hardware import HostComputeModel, load_profile, pad_kv_cells
from tests.conftest import assert_one_line_error, run_cli, trace_model

TRUE = HostComputeModel(
    terms=("step", "output", "token", "kv@k=f16", "token_kv@k=f16", "kv@k=q8_0", "token_kv@k=q8_0"),
    serial_s=(2e-3, 1e-3, 1e-5, 2e-7, 1e-9, 1.5e-7, 2e-9),
    parallel_s=(20e-3, 8e-3, 4e-4, 3e-6, 2e-8, 2e-6, 3e-8),
    k_types=("f16", "q8_0"),
    v_types=("f16",),
    thread_counts=(1, 2),
)


def synthetic_steps(model: HostComputeModel = TRUE, *, noise: float = 0.0, outlier_frac: float = 0.0,
                    threads=(1, 2), k_types=("f16", "q8_0"), n_predict: int = 48, seed: int = 0) -> StepData:
    """Step tables shaped like real traces (prefill in 512-token batches, then decode), timed by ``model``."""
    rng = np.random.default_rng(seed)
    rows = []
    for ti, (prompt, tk, th) in enumerate(itertools.product((200, 700, 1500, 3000, 4100), k_types, threads)):
        n_ctx = prompt + n_predict + 64
        steps, pos = [], 0
        while pos < prompt:
            n = min(512, prompt - pos)
            steps.append((n, pos))
            pos += n
        steps += [(1, prompt + i) for i in range(n_predict)]
        for i, (n, p) in enumerate(steps):
            rows.append((ti, i, n == 1 and p >= prompt, n, p + n, n_ctx, th, int(p + n >= prompt), tk))
    ti, step, dec, nt, nkv, nctx, th, outs = (np.array([r[j] for r in rows]) for j in range(8))
    tk = np.array([r[8] for r in rows], dtype=object)
    tv = np.full(len(rows), "f16", dtype=object)
    t = model.predict_step_s(n_tokens=nt, n_kv=nkv, type_k=tk, type_v=tv, n_threads=th, n_ctx=nctx,
                             n_outputs=outs)
    factor = 1 + noise * rng.standard_normal(t.size)
    outliers = rng.random(t.size) < outlier_frac
    factor[outliers] *= 1.6
    return StepData(
        trace_index=ti, step=step, is_decode=dec.astype(bool), n_tokens=nt, n_kv=nkv,
        n_kv_measured=pad_kv_cells(nkv, 256, nctx), n_outputs=outs, n_ctx=nctx, n_threads=th, n_ubatch=np.full(t.size, 512),
        type_k=tk, type_v=tv, decode_s=t * factor, trace_names=tuple(f"t{i}" for i in range(ti.max() + 1)),
        model_names=("synthetic",), model_weight_bytes=(1,),
    ), outliers


def test_nnls_matches_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(30):
        a = rng.standard_normal((12, 4))
        b = rng.standard_normal(12)
        x = nnls(a, b)
        assert (x >= 0).all()
        best = np.inf
        for k in range(5):  # every support set: unconstrained lstsq, keep feasible ones
            for sup in itertools.combinations(range(4), k):
                z = np.zeros(4)
                if sup:
                    z[list(sup)] = np.linalg.lstsq(a[:, list(sup)], b, rcond=None)[0]
                if (z >= -1e-12).all():
                    best = min(best, float(np.sum((a @ z - b) ** 2)))
        assert np.sum((a @ x - b) ** 2) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_fit_recovers_known_parameters_exactly_without_noise():
    data, _ = synthetic_steps()
    fit = fit_host_model(data)
    assert fit.model.terms == TRUE.terms
    np.testing.assert_allclose(fit.model.serial_s, TRUE.serial_s, rtol=1e-6)
    np.testing.assert_allclose(fit.model.parallel_s, TRUE.parallel_s, rtol=1e-6)
    assert fit.outliers.sum() == 0
    assert fit.stats["decode"]["p95_ape"] < 1e-8
    assert fit.kv_pad_match == 1.0 and fit.model.kv_pad_cells == 256
    assert fit.model.thread_counts == (1, 2) and fit.model.k_types == ("f16", "q8_0")


def test_fit_is_robust_to_noise_and_outliers():
    data, injected = synthetic_steps(noise=0.01, outlier_frac=0.03, seed=5)
    fit = fit_host_model(data)
    # the outliers (60% slower steps, as when another process steals a core) are found and dropped
    assert fit.outliers[injected & ~fit.warmup].mean() > 0.95
    assert (fit.outliers & ~injected).sum() < 0.01 * data.n
    # the terms that carry most of the time come back within a few percent (1% noise leaves the small
    # serial parts loosely determined; step and output are told apart by a few prefill steps only)
    par = dict(zip(fit.model.terms, fit.model.parallel_s, strict=True))
    true = dict(zip(TRUE.terms, TRUE.parallel_s, strict=True))
    assert par["step"] + par["output"] == pytest.approx(true["step"] + true["output"], rel=0.05)
    for term in ("token", "kv@k=f16", "kv@k=q8_0"):
        assert par[term] == pytest.approx(true[term], rel=0.05), term
    # predictions on fresh noise-free steps stay close
    clean, _ = synthetic_steps(seed=9)
    pred = fit.model.predict_step_s(n_tokens=clean.n_tokens, n_kv=clean.n_kv, type_k=clean.type_k,
                                    type_v=clean.type_v, n_threads=clean.n_threads, n_ctx=clean.n_ctx,
                                    n_outputs=clean.n_outputs)
    rel = np.abs(pred / clean.decode_s - 1)
    assert np.median(rel[clean.is_decode]) < 0.01 and np.percentile(rel[clean.is_decode], 95) < 0.02


def test_single_thread_count_and_unseen_types_are_refused():
    data, _ = synthetic_steps(threads=(2,), k_types=("f16",))
    fit = fit_host_model(data)
    assert fit.model.thread_counts == (2,) and all(p == 0 for p in fit.model.parallel_s)
    with pytest.raises(LlamatierError, match="calibrated at n_threads=2 only"):
        fit.model.predict_step_s(n_tokens=[1], n_kv=[100], type_k="f16", type_v="f16", n_threads=4)
    with pytest.raises(LlamatierError, match="K cache types f16, not q4_0.*--type-k q4_0"):
        fit.model.predict_step_s(n_tokens=[1], n_kv=[100], type_k="q4_0", type_v="f16", n_threads=2)


def test_rank_deficient_data_is_a_clear_error():
    data, _ = synthetic_steps(threads=(2,), k_types=("f16",))
    # keep only decode steps that all attend the same padded n_kv: step and kv cannot be told apart
    m = data.is_decode & (pad_kv_cells(data.n_kv, 256) == 768)
    sub = StepData(**{k: (getattr(data, k)[m] if isinstance(getattr(data, k), np.ndarray) else getattr(data, k))
                      for k in StepData.__dataclass_fields__})
    with pytest.raises(LlamatierError, match="cannot separate"):
        fit_host_model(sub, warmup_steps=0, warmup_decode_steps=0)


def test_padding_and_ubatch_split():
    assert pad_kv_cells(np.array([1, 256, 257, 4000]), 256, 4096).tolist() == [256, 256, 512, 4096]
    data, _ = synthetic_steps()
    assert infer_kv_pad_cells(data) == (256, 1.0)
    # a 1,024-token batch with n_ubatch 512 costs the same as its two ubatches (logits from the last one)
    whole = TRUE.predict_step_s(n_tokens=[1024], n_kv=[1024], type_k="f16", type_v="f16", n_threads=2,
                                n_ubatch=512)
    parts = TRUE.predict_step_s(n_tokens=[512, 512], n_kv=[512, 1024], type_k="f16", type_v="f16", n_threads=2,
                                n_outputs=[0, 1])
    assert whole[0] == pytest.approx(parts.sum())


# ---- end to end on real tiny-model traces ----------------------------------------------------


@pytest.fixture(scope="module")
def two_tiny_traces(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("calib")
    a, b = base / "fit", base / "heldout"
    trace_model(tiny_model, a, n_predict=300, n_batch=64, n_threads=2, positions=False, chunk_steps=64)
    trace_model(tiny_model, b, prompt="cold blocks move to the slow tier " * 20, n_predict=200, n_batch=64,
                n_threads=2, positions=False, chunk_steps=64, seed=3)
    return a, b


def test_calibrate_then_validate_end_to_end(two_tiny_traces, tmp_path):
    fit_dir, held_dir = two_tiny_traces
    out = tmp_path / "tiny-host.toml"
    proc = run_cli("calibrate", str(fit_dir), "--out", str(out), "--base", "cpu-host", "--name", "tiny-host")
    assert proc.returncode == 0, proc.stderr
    assert "residuals" in proc.stdout and "wrote" in proc.stdout
    prof = load_profile(str(out))
    hm = prof.compute.host_model
    assert prof.name == "tiny-host" and hm is not None
    assert hm.k_types == ("f16",) and hm.thread_counts == (2,) and hm.kv_pad_cells == 256
    assert prof.tiers == load_profile("cpu-host").tiers  # tiers and links come from the base
    proc = run_cli("validate", "--profile", str(out), str(held_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["phases"]["decode"]["n_steps"] == 200
    assert rep["phases"]["prefill"]["n_steps"] >= 5
    for phase in ("decode", "prefill"):
        st = rep["phases"][phase]
        assert np.isfinite(st["median_ape"]) and st["median_ape"] <= st["p95_ape"] <= st["max_ape"]
        assert st["predicted_s"] > 0
    assert rep["overlap"] == [] and len(rep["traces"]) == 1
    floor = rep["decode_noise_floor"]  # per-trace median oracle: same steps, its own error
    assert floor["n_steps"] == 200 and 0 <= floor["median_ape"] <= floor["p95_ape"]
    # validating on the fitted trace itself is flagged as not held out
    proc = run_cli("validate", "--profile", str(out), str(fit_dir))
    assert proc.returncode == 0 and "not a held-out error" in proc.stdout


def test_validate_needs_a_calibrated_profile(two_tiny_traces):
    proc = run_cli("validate", "--profile", "a100-40g", str(two_tiny_traces[1]))
    assert_one_line_error(proc, "no calibrated host model", "llamatier calibrate")


def test_calibrate_errors_are_one_line(two_tiny_traces, tmp_path):
    proc = run_cli("calibrate", str(tmp_path / "missing"), "--out", str(tmp_path / "x.toml"))
    assert_one_line_error(proc, "trace not found")
    proc = run_cli("calibrate", str(two_tiny_traces[0]), "--out", str(tmp_path / "no" / "x.toml"))
    assert_one_line_error(proc, "does not exist")
    proc = run_cli("calibrate", str(two_tiny_traces[0]), "--out", str(tmp_path / "x.toml"), "--base", "z80")
    assert_one_line_error(proc, "unknown profile 'z80'")


def test_committed_calibration_set_fits_and_validates():
    """The committed Gemma trace set and calibrated profile load, and held-out traces are really held out."""
    from llamatier.calibrate import calibrate_profile
    from llamatier.validate import validate_profile

    calib = Path(__file__).resolve().parents[1] / "traces" / "calib"
    manifest = json.loads((calib / "manifest.json").read_text())["traces"]
    fit = sorted(calib / n for n, e in manifest.items() if e["split"] == "fit")
    held = sorted(calib / n for n, e in manifest.items() if e["split"] == "heldout")
    assert len(fit) >= 8 and len(held) >= 6
    assert {e["type_k"] for e in manifest.values()} >= {"f16", "q8_0"}
    assert {e["threads"] for e in manifest.values()} == {1, 2}
    assert max(e["prompt_tokens"] for e in manifest.values()) >= 4096
    committed = load_profile(str(calib / "cpu-host-calibrated.toml"))
    assert {Path(t).name for t in committed.compute.host_model.traces} == {p.name for p in fit}
    profile, result = calibrate_profile([str(p) for p in fit])
    assert result.kv_pad_match == 1.0  # llama.cpp's padding rule explains every captured n_kv
    np.testing.assert_allclose(profile.compute.host_model.serial_s, committed.compute.host_model.serial_s, rtol=1e-6)
    rep = validate_profile(profile, [str(p) for p in held])
    assert rep.overlap == () and rep.phases["decode"].n_steps == 64 * len(held)
    assert np.isfinite(rep.phases["decode"].median_ape) and np.isfinite(rep.decode_noise_floor.p95_ape)
