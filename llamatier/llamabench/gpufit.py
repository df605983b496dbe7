"""Fit the GPU step model to llama-bench rows, and check it leave-one-GPU-out.

Each row becomes work counts (:func:`llamatier.hardware.gpumodel.work_of_test`, from the
row's test, its model's geometry and its GPU's datasheet numbers) and a measured time,
``(n_prompt + n_gen) / avg_ts`` seconds. The coefficients are fitted by non-negative
least squares on relative residuals, so a 0.07 s pp512 row weighs as much as a 2 s tg128
row. A coefficient with a physical floor (:data:`~llamatier.hardware.gpumodel.LOWER_BOUNDS`:
nothing streams faster than the datasheet bandwidth) is fitted as floor + a non-negative
excess. A term is fitted only if some row exercises it; terms the rows cannot tell apart
make the fit refuse, naming the rows to add (or, with ``partial``, fold into a related
term or stay out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from llamatier.calibrate import nnls
from llamatier.errors import LlamatierError
from llamatier.hardware.gpumodel import (
    GPU_TERMS,
    LOWER_BOUNDS,
    TIES,
    GpuDevice,
    GpuStepModel,
    ModelShape,
    llama_cpp_paths,
    parse_date,
    term_hint,
    work_of_test,
)
from llamatier.kvtypes import kv_type
from llamatier.llamabench.models import find_gpu_spec, row_model, weight_class
from llamatier.llamabench.reader import RowsFit, format_test
from llamatier.target import TargetModel


@dataclass(frozen=True)
class GpuRow:
    """One llama-bench row ready to fit or predict."""

    gpu: str  # GPU table name (gpu_specs.toml)
    model_type: str
    test: str  # llama-bench's test name, e.g. "tg128 @ d4096"
    no_kv_offload: bool
    n_gpu_layers: int | None
    measured_s: float
    work: dict[str, float]
    source: str


@dataclass(frozen=True)
class SkippedRow:
    gpu: str
    model_type: str
    test: str
    reason: str


def model_shape(target: TargetModel, model_size: int, n_params: int, model_type: str,
                type_k: str = "f16", type_v: str = "f16") -> ModelShape:
    """A :class:`ModelShape` from a geometry preset and the row's own size and parameter count."""
    g = target.geometry
    tk, tv = kv_type(type_k or "f16"), kv_type(type_v or "f16")
    kb = np.array([g.layer_bytes_per_token(i, tk, tv) for i in range(g.n_layers)], dtype=np.float64)
    qk = np.asarray(g.head_dim_k, dtype=np.float64) + np.asarray(g.head_dim_v, dtype=np.float64)
    win = np.asarray(g.sliding_window, dtype=np.float64)
    return ModelShape(
        weight_bytes=float(model_size), n_params=float(n_params), weight_class=weight_class(model_type),
        n_head=int(target.n_head), kv_bytes_per_cell=kb, qk_dims=qk, window_cells=win,
    )


def _fill_sizes(df: pl.DataFrame) -> pl.DataFrame:
    """Rows without model_size / model_n_params take them from a row of the same model_type that has them."""
    known = (
        df.filter(pl.col("model_size").is_not_null() & pl.col("model_n_params").is_not_null())
        .group_by("model_type")
        .agg(pl.col("model_size").first().alias("_size"), pl.col("model_n_params").first().alias("_params"))
    )
    out = df.join(known, on="model_type", how="left")
    return out.with_columns(
        pl.coalesce("model_size", "_size").alias("model_size"),
        pl.coalesce("model_n_params", "_params").alias("model_n_params"),
    ).drop("_size", "_params")


def gpu_rows(df: pl.DataFrame, *, geometry: str | None = None,
             gpu: str | None = None) -> tuple[list[GpuRow], list[SkippedRow]]:
    """Work counts and measured times of every GPU row of ``df``; rows that cannot be used, with why.

    ``gpu`` names the GPU for rows without gpu_info (markdown output does not carry it).
    """
    rows: list[GpuRow] = []
    skipped: list[SkippedRow] = []
    df = _fill_sizes(df)
    for r in df.iter_rows(named=True):
        info = r.get("gpu_info") or gpu
        test = format_test(r["n_prompt"], r["n_gen"], r["n_depth"] or 0)
        name = info or "?"
        spec = find_gpu_spec(info)
        if spec is None:
            why = "no gpu_info (give --gpu NAME)" if not info else f"GPU {info!r} not in gpu_specs.toml"
            skipped.append(SkippedRow(name, r["model_type"], test, why))
            continue
        if not r.get("model_size") or not r.get("model_n_params"):
            skipped.append(SkippedRow(spec.name, r["model_type"], test, "no model_size: no row of this model shows it"))
            continue
        try:
            target = row_model(r["model_type"], r["model_n_params"], geometry)
            date = parse_date(r.get("test_time"))
        except LlamatierError as exc:
            skipped.append(SkippedRow(spec.name, r["model_type"], test, str(exc)))
            continue
        shape = model_shape(target, r["model_size"], r["model_n_params"], r["model_type"], r.get("type_k"),
                            r.get("type_v"))
        dev = GpuDevice(spec.mem_bytes_per_s, spec.fp16_tensor_flops_per_s, spec.int8_ops_per_s,
                        llama_cpp_paths(spec.compute_capability, spec.has_tensor_cores, date,
                                        None if r.get("flash_attn") is None else r["flash_attn"] != 0))
        work = work_of_test(shape, dev, n_prompt=r["n_prompt"], n_gen=r["n_gen"], n_depth=r["n_depth"] or 0,
                         n_ubatch=r.get("n_ubatch") or 512, no_kv_offload=bool(r.get("no_kv_offload")),
                         n_gpu_layers=r.get("n_gpu_layers"))
        measured = (r["n_prompt"] + r["n_gen"]) / r["avg_ts"]
        src = " ".join(str(r.get(k)) for k in ("source_ref", "source_file") if r.get(k))
        rows.append(GpuRow(spec.name, r["model_type"], test, bool(r.get("no_kv_offload")), r.get("n_gpu_layers"),
                           measured, work, src))
    return rows, skipped


@dataclass(frozen=True)
class GpuFit(RowsFit):
    rows: tuple[GpuRow, ...]
    model: GpuStepModel


def _design(rows: Sequence[GpuRow], terms: Sequence[str]) -> np.ndarray:
    return np.array([[r.work.get(t, 0.0) for t in terms] for r in rows], dtype=np.float64)


def identifiable_terms(rows: Sequence[GpuRow]) -> list[str]:
    """Terms some row exercises."""
    return [t for t in GPU_TERMS if any(r.work.get(t, 0.0) > 0 for r in rows)]


# When rows cannot tell terms apart, a partial fit gives up these first (the later ones carry more time).
_DROP_ORDER = ("host_weights", "host_kv", "host_flops", "attention", "dequant", "matmul_dp4a", "matmul_mmq", "split",
               "layer", "layer_graph", "matmul", "weights")


def fit_gpu_model(rows: Sequence[GpuRow], *, terms: Sequence[str] | None = None, partial: bool = False) -> GpuFit:
    """Fit the GPU step model (see module docstring).

    Rows that cannot separate two terms make the fit refuse with a LlamatierError naming the rows to
    add; with ``partial`` it leaves such terms out instead (they are listed in
    ``model.unfitted`` and the model cannot predict rows that need them).
    """
    rows = list(rows)
    if not rows:
        raise LlamatierError("no usable llama-bench GPU rows to fit: give rows with gpu_info, model_size and a test")
    terms = list(terms) if terms is not None else identifiable_terms(rows)
    y = np.array([r.measured_s for r in rows])
    dropped: list[str] = []
    merged: dict[str, list[str]] = {}  # partner -> terms folded into its coefficient
    while True:
        x = _design(rows, terms)
        for partner, folded in merged.items():
            x[:, terms.index(partner)] += _design(rows, folded).sum(axis=1)
        a = x / y[:, None]
        scale = np.linalg.norm(a, axis=0)
        scale[scale == 0] = 1.0
        an = a / scale
        rank = _rank(an) if terms else 0
        if rank == len(terms):
            break
        if not partial:
            raise LlamatierError(_collinear_message(an, terms, rows))
        involved = _collinear_terms(an, terms)
        drop = next(t for t in _DROP_ORDER if t in involved)
        partner = TIES.get(drop)
        if partner in terms:  # fit the two as one coefficient
            merged[partner] = merged.get(partner, []) + [drop] + merged.pop(drop, [])
        else:
            dropped.append(drop)
        terms.remove(drop)
        if not terms:
            raise LlamatierError("no GPU term can be fitted from these llama-bench rows: add rows of more tests")
    # coefficients with a physical floor are fitted as floor + a non-negative excess
    floor = np.array([LOWER_BOUNDS.get(t, 0.0) for t in terms])
    coef = nnls(an, np.ones(len(rows)) - a @ floor) / scale + floor
    pred = x @ coef
    gpus = tuple(sorted({r.gpu for r in rows}))
    rel = y / pred - 1
    model = GpuStepModel(
        coef={t: float(c) for t, c in zip(terms, coef, strict=True)},
        fitted_on=gpus, fitted_models=tuple(sorted({model_family(r.model_type) for r in rows})), n_rows=len(rows), fit_median_ape=float(np.median(np.abs(rel))),
        unfitted=tuple(dropped),
        tied=tuple(f"{t}={p}" for p, folded in merged.items() for t in folded),
        notes=f"relative non-negative least squares on {len(rows)} llama-bench rows of {len(gpus)} GPUs",
    )
    return GpuFit(model=model, rows=tuple(rows), predicted_s=pred)


# Rows that tell two terms apart only within a few percent (smallest singular value of the column-normalised
# relative design below this share of the largest) cannot separate them through 1-2% measurement noise.
RANK_TOL = 0.02


def _rank(an: np.ndarray) -> int:
    sv = np.linalg.svd(an, compute_uv=False)
    return int((sv > RANK_TOL * sv[0]).sum()) if sv.size and sv[0] > 0 else 0


def _collinear_terms(an: np.ndarray, terms: Sequence[str]) -> list[str]:
    """Terms in the directions the rows cannot see, the most involved first."""
    _, sv, vt = np.linalg.svd(an, full_matrices=True)
    rank = int((sv > RANK_TOL * sv[0]).sum()) if sv.size and sv[0] > 0 else 0
    null = vt[rank:]
    weight = np.sqrt((null ** 2).sum(axis=0))
    return [terms[j] for j in np.argsort(-weight) if weight[j] > 0.1]


def _collinear_message(an: np.ndarray, terms: Sequence[str], rows: Sequence[GpuRow]) -> str:
    """Which terms the rows cannot tell apart, and what rows would separate them."""
    involved = _collinear_terms(an, terms)
    gpus = sorted({r.gpu for r in rows})
    hints = list(dict.fromkeys(term_hint(t) for t in involved))[:3]
    return (
        f"the llama-bench rows ({len(rows)} rows, {len(gpus)} GPU{'s' if len(gpus) != 1 else ''}) cannot separate "
        f"the GPU terms {', '.join(involved)}: add " + "; or ".join(hints)
        + (" (or rows of another GPU)" if len(gpus) == 1 else "")
    )


@dataclass(frozen=True)
class RowPrediction:
    gpu: str
    model_type: str
    test: str
    no_kv_offload: bool
    measured_s: float
    predicted_s: float  # nan when the model cannot predict the row
    note: str = ""  # why no prediction, or what the prediction borrowed

    @property
    def rel_error(self) -> float:
        """Error of the predicted throughput (t/s): predicted / measured - 1."""
        return self.measured_s / self.predicted_s - 1.0

    @property
    def measured_ts(self) -> float:
        return tokens_in_test(self.test) / self.measured_s

    @property
    def predicted_ts(self) -> float:
        return tokens_in_test(self.test) / self.predicted_s


def tokens_in_test(test: str) -> int:
    """Tokens a llama-bench test processes (prompt + generated)."""
    from llamatier.llamabench.reader import parse_test_name

    p, g, _ = parse_test_name(test)
    return p + g


def predict_rows(model: GpuStepModel, rows: Sequence[GpuRow], *, borrow: bool = True) -> list[RowPrediction]:
    """Predicted time of every row; rows needing a term the model lacks get nan and a note.

    ``borrow``: a term the fit never saw takes its related term's coefficient (noted on the row).
    """
    out = []
    for r in rows:
        miss = model.missing(r.work, borrow=borrow)
        if miss:
            out.append(RowPrediction(r.gpu, r.model_type, r.test, r.no_kv_offload, r.measured_s, float("nan"),
                                     f"not fitted: {', '.join(miss)}"))
            continue
        lent = model.borrowed(r.work) if borrow else []
        note = "; ".join(lent)
        out.append(RowPrediction(r.gpu, r.model_type, r.test, r.no_kv_offload, r.measured_s,
                                 model.predict_s(r.work, borrow=borrow), note))
    return out


@dataclass(frozen=True)
class LeaveOneGpuOut:
    """Every row predicted by a model fitted without its GPU."""

    predictions: tuple[RowPrediction, ...]
    models: dict[str, GpuStepModel] = field(default_factory=dict)  # held-out GPU -> model fitted without it


def leave_one_gpu_out(rows: Sequence[GpuRow], *, partial: bool = True) -> LeaveOneGpuOut:
    """For each GPU: fit on the other GPUs' rows, predict this GPU's rows."""
    gpus = sorted({r.gpu for r in rows})
    if len(gpus) < 2:
        raise LlamatierError("leave-one-GPU-out needs rows of at least two GPUs")
    by_row: dict[int, RowPrediction] = {}
    models = {}
    for g in gpus:
        train = [r for r in rows if r.gpu != g]
        idx = [i for i, r in enumerate(rows) if r.gpu == g]
        try:
            fit = fit_gpu_model(train, partial=partial)
        except LlamatierError as exc:
            for i in idx:
                r = rows[i]
                by_row[i] = RowPrediction(r.gpu, r.model_type, r.test, r.no_kv_offload, r.measured_s, float("nan"),
                                          f"no fit without {g}: {exc}")
            continue
        models[g] = fit.model
        for i, p in zip(idx, predict_rows(fit.model, [rows[i] for i in idx]), strict=True):
            by_row[i] = p
    preds = [by_row[i] for i in range(len(rows))]
    return LeaveOneGpuOut(tuple(preds), models)


def nkvo_ratios(preds: Sequence[RowPrediction]) -> list[tuple[str, str, str, float, float]]:
    """(gpu, model, test, measured, predicted) ratio of -nkvo 1 to all-on-GPU throughput, per pair of rows."""
    by = {(p.gpu, p.model_type, p.test, p.no_kv_offload): p for p in preds}
    out = []
    for (g, m, t, nkvo), p in by.items():
        base = by.get((g, m, t, False))
        if nkvo and base is not None:
            out.append((g, m, t, base.measured_s / p.measured_s, base.predicted_s / p.predicted_s))
    return out


def model_family(model_type: str) -> str:
    """``"llama 7B Q4_0"`` -> ``"llama 7B"`` (architecture and size: the geometry)."""
    return " ".join(str(model_type).split()[:2])
