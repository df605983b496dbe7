"""``llamatier calibrate --llama-bench`` and ``validate --llama-bench``: profiles from llama-bench rows.

GPU rows (a CUDA backend) fit the GPU step model (:mod:`llamatier.llamabench.gpufit`) and
attach it to a GPU profile; CPU rows fit the host step-time model
(:mod:`llamatier.llamabench.hostfit`) and attach it to a host profile. Validation predicts
rows the fit never saw and labels every prediction that reaches beyond what the fit saw
(another GPU, another model, another build).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl

from llamatier.errors import LlamatierError
from llamatier.hardware import Profile, load_profile
from llamatier.hardware.gpumodel import llama_cpp_paths
from llamatier.llamabench.gpufit import (
    GpuFit,
    RowPrediction,
    fit_gpu_model,
    gpu_rows,
    leave_one_gpu_out,
    model_family,
    predict_rows,
)
from llamatier.llamabench.hostfit import (
    BenchHostFit,
    fit_host_from_bench,
    host_rows,
    predict_bench_rows,
)
from llamatier.llamabench.models import gpu_spec_by_name
from llamatier.llamabench.reader import read_llama_bench
from llamatier.model import read_model_info


def is_gpu_frame(df: pl.DataFrame) -> np.ndarray:
    """Per row: True for GPU rows (a non-CPU backend with layers offloaded)."""
    backends = df["backends"].fill_null("").to_list()
    ngl = df["n_gpu_layers"].to_list()
    return np.array([bool(b) and b not in ("CPU", "BLAS") and (n is None or n != 0)
                     for b, n in zip(backends, ngl, strict=True)])


@dataclass(frozen=True)
class LlamaBenchCalibration:
    """What ``calibrate --llama-bench`` fitted: a GPU fit or a host fit, and the rows it skipped."""

    kind: str  # "gpu" or "host"
    gpu_fit: GpuFit | None = None
    host_fit: BenchHostFit | None = None
    skipped: tuple = ()
    configuration: str = ""  # the llama.cpp configuration the host model predicts


def _host_model_shape(model: str | None, model_type: str, n_params: int | None) -> tuple[str, int, float, int]:
    """(model name, weight bytes, sliding-window layer fraction, window) from --model or the preset table."""
    if model:
        info = read_model_info(model)
        g = info.geometry
        win = max(g.sliding_window) if g.sliding_window else 0
        return info.name, int(info.weight_bytes), float(np.mean(g.swa_layers)), int(win)
    from llamatier.llamabench.models import row_model

    t = row_model(model_type, n_params)
    g = t.geometry
    return t.label, int(t.weight_bytes), float(np.mean(g.swa_layers)), int(max(g.sliding_window or (0,)))


def calibrate_from_llama_bench(
    paths: Sequence[str | Path], *, base: str | None = None, name: str | None = None, gpu: str | None = None,
    geometry: str | None = None, model: str | None = None, partial: bool = False,
) -> tuple[Profile, LlamaBenchCalibration]:
    """Fit a profile's GPU or host model on llama-bench rows; returns the profile and the fit."""
    df = read_llama_bench(list(paths))
    on_gpu = is_gpu_frame(df)
    if on_gpu.any() and (~on_gpu).any():
        raise LlamatierError("the llama-bench files mix GPU rows and CPU rows: calibrate each kind on its own")
    if on_gpu.any():
        rows, skipped = gpu_rows(df, geometry=geometry, gpu=gpu)
        if not rows:
            why = skipped[0].reason if skipped else "no rows"
            raise LlamatierError(f"no usable GPU llama-bench row ({why})")
        fit = fit_gpu_model(rows, partial=partial)
        gpus = sorted({r.gpu for r in rows})
        spec = gpu_spec_by_name(gpus[0]) if len(gpus) == 1 else None
        base_name = base or (spec.profile if spec is not None and spec.profile else None)
        if base_name is None:
            raise LlamatierError(
                f"rows of {', '.join(gpus)}: give --base PROFILE, the profile whose tiers and links the result keeps"
            )
        base_profile = load_profile(base_name)
        if base_profile.is_host_only:
            raise LlamatierError(f"--base {base_name} is a CPU-only profile: a GPU fit needs a GPU profile")
        dev = spec or _profile_gpu_spec(base_profile)
        gm = fit.model.for_device(llama_cpp_paths(dev.compute_capability, dev.has_tensor_cores, None),
                                  dev.int8_ops_per_s)
        profile = replace(base_profile, name=name or f"{base_profile.name}-llama-bench",
                          compute=replace(base_profile.compute, gpu_model=gm))
        return profile, LlamaBenchCalibration("gpu", gpu_fit=fit, skipped=tuple(skipped))
    rows_h = host_rows(df)
    first = df.row(0, named=True)
    mname, wbytes, frac, win = _host_model_shape(model, first["model_type"], first.get("model_n_params"))
    hfit = fit_host_from_bench(rows_h, model_name=mname, weight_bytes=wbytes, swa_layer_fraction=frac,
                               swa_window=win)
    base_profile = load_profile(base or "cpu-host")
    profile = base_profile.with_host_model(hfit.model, name=name or f"{base_profile.name}-llama-bench")
    return profile, LlamaBenchCalibration("host", host_fit=hfit,
                                          configuration=hfit.model.configuration(swa_full=False))


def _profile_gpu_spec(profile: Profile):  # noqa: ANN202
    """The datasheet entry of a built-in GPU profile (gpu_specs.toml names it)."""
    try:
        return gpu_spec_by_name(profile.name)
    except LlamatierError:
        raise LlamatierError(
            f"profile {profile.name} names no GPU of gpu_specs.toml: calibrate with --base set to a built-in GPU "
            "profile, or add the GPU to llamatier/data/gpu_specs.toml with profile = NAME"
        ) from None


@dataclass(frozen=True)
class BenchValidation:
    """Predicted vs measured for every llama-bench row, with labels where the fit did not see a row's kind."""

    kind: str  # "gpu", "gpu-logo" (leave one GPU out) or "host"
    profile: str
    predictions: tuple[RowPrediction, ...]
    labels: tuple[str, ...]  # per prediction: "" or e.g. "GPU not in the fit (RTX 4080)"
    configuration: str = ""
    threads: tuple[int, ...] = ()  # host rows: n_threads per prediction
    skipped: tuple = ()
    stats: dict = field(default_factory=dict)


def _stats(preds: Sequence[RowPrediction]) -> dict:
    err = np.array([abs(p.rel_error) for p in preds if np.isfinite(p.predicted_s)])
    n_all = len(preds)
    if err.size == 0:
        return {"n": n_all, "predicted": 0, "median_ape": float("nan"), "p95_ape": float("nan"),
                "max_ape": float("nan")}
    return {"n": n_all, "predicted": int(err.size), "median_ape": float(np.median(err)),
            "p95_ape": float(np.percentile(err, 95)), "max_ape": float(err.max())}


def validate_llama_bench(
    profile: Profile | str | None, paths: Sequence[str | Path], *, gpu: str | None = None,
    geometry: str | None = None, leave_one_gpu_out_: bool = False,
) -> BenchValidation:
    """Predict every row of ``paths`` with ``profile`` (or leave-one-GPU-out refits); see BenchValidation."""
    df = read_llama_bench(list(paths))
    on_gpu = is_gpu_frame(df)
    if on_gpu.any():
        rows, skipped = gpu_rows(df.filter(pl.Series(on_gpu)), geometry=geometry, gpu=gpu)
        if leave_one_gpu_out_:
            lo = leave_one_gpu_out(rows)
            preds = lo.predictions
            labels = tuple("" for _ in preds)
            return BenchValidation("gpu-logo", "leave-one-GPU-out refits", preds, labels, skipped=tuple(skipped),
                                   stats=_stats(preds))
        prof = load_profile(profile) if isinstance(profile, str | Path) else profile
        if prof is None or prof.compute.gpu_model is None:
            raise LlamatierError(
                f"profile {getattr(prof, 'name', None)} has no GPU step model: run `llamatier calibrate "
                "--llama-bench FILE... --out gpu.toml` first, or use --leave-one-gpu-out"
            )
        gm = prof.compute.gpu_model
        preds = predict_rows(gm, rows)
        labels = []
        for r in rows:
            why = []
            if gm.fitted_on and r.gpu not in gm.fitted_on:
                why.append(f"GPU not in the fit ({r.gpu})")
            if gm.fitted_models and model_family(r.model_type) not in gm.fitted_models:
                why.append(f"model not in the fit ({model_family(r.model_type)})")
            labels.append("; ".join(why))
        return BenchValidation("gpu", prof.name, tuple(preds), tuple(labels), skipped=tuple(skipped),
                               stats=_stats(preds))
    prof = load_profile(profile) if isinstance(profile, str | Path) else profile
    hm = None if prof is None else prof.compute.host_model
    if hm is None:
        raise LlamatierError(
            f"profile {getattr(prof, 'name', None)} has no host model: run `llamatier calibrate --llama-bench "
            "FILE... --out host.toml` on CPU rows first"
        )
    hrows = host_rows(df)
    pred = predict_bench_rows(hm, hrows)
    preds = tuple(RowPrediction("CPU", r.model_type, r.test, False, r.measured_s, float(p)) for r, p in
                  zip(hrows, pred, strict=True))
    build_note = hm.notes
    labels = tuple(("other build than the fit" if r.build not in build_note else "") for r in hrows)
    return BenchValidation("host", prof.name, preds, labels, configuration=hm.configuration(swa_full=False),
                           threads=tuple(r.n_threads for r in hrows), stats=_stats(preds))


def published_gpu_rows():  # noqa: ANN201
    """The committed ground-truth set (llamatier/data/llama_bench_published.csv) as GPU rows."""
    path = Path(__file__).resolve().parent.parent / "data" / "llama_bench_published.csv"
    return gpu_rows(read_llama_bench(path))
