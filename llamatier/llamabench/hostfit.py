"""Fit and check the host (CPU) step-time model on llama-bench rows of the user's machine.

A llama-bench test is a sequence of llama_decode steps whose times add up:

- ``ppN @ dD``: the prompt in ubatches of ``n_ubatch`` tokens, the first attending
  ``D + n_ubatch`` cells, the last producing one row of logits;
- ``tgN @ dD``: N single-token steps attending ``D + 1`` ... ``D + N`` cells.

llama-bench runs stock llama.cpp: flash attention as ``-fa`` says (``auto``, the
default, turns it on on the CPU backend), and no ``--swa-full``, so sliding-window
layers keep only their window. The host model's work counts are those of each step
(:mod:`llamatier.hardware.hostmodel`), summed over the test, so a row's predicted time
is linear in the coefficients and the fit is the same relative non-negative least
squares as on traces.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from llamatier.calibrate import nnls
from llamatier.errors import LlamatierError
from llamatier.hardware.hostmodel import HostComputeModel, attended_cells, design_matrix
from llamatier.llamabench.reader import RowsFit, format_test

PAD = 256  # llama.cpp pads attended cells to 256 (llama-kv-cache.cpp get_n_kv)


@dataclass(frozen=True)
class HostRow:
    """One CPU llama-bench row: its test, settings and measured time."""

    model_type: str
    test: str
    n_prompt: int
    n_gen: int
    n_depth: int
    n_threads: int
    n_ubatch: int
    type_k: str
    type_v: str
    flash_attn: bool
    measured_s: float
    build: str  # "commit (number)"
    cpu_info: str
    backends: str


def _flash_attn_cpu(value: int | None) -> bool:
    """llama-bench's flash_attn field on the CPU backend: -1 (auto) and 1 are on, 0 off."""
    return value is None or value != 0


def host_rows(df: pl.DataFrame) -> list[HostRow]:
    """The CPU rows of ``df`` (backends CPU, or no layer offloaded); LlamatierError if there are none."""
    out = []
    for r in df.iter_rows(named=True):
        backends = str(r.get("backends") or "CPU")
        cpu = "CPU" in backends.split(",") or backends == "BLAS" or (r.get("n_gpu_layers") == 0)
        if not cpu:
            continue
        if not r.get("n_threads"):
            raise LlamatierError(
                f"llama-bench row {r['model_type']} {format_test(r['n_prompt'], r['n_gen'], r['n_depth'] or 0)} has no "
                "n_threads: the host model needs it (use -o jsonl or -o csv, which record it)"
            )
        out.append(HostRow(
            model_type=r["model_type"], test=format_test(r["n_prompt"], r["n_gen"], r["n_depth"] or 0),
            n_prompt=int(r["n_prompt"]), n_gen=int(r["n_gen"]), n_depth=int(r["n_depth"] or 0),
            n_threads=int(r["n_threads"]), n_ubatch=int(r.get("n_ubatch") or 512),
            type_k=str(r.get("type_k") or "f16"), type_v=str(r.get("type_v") or "f16"),
            flash_attn=_flash_attn_cpu(r.get("flash_attn")),
            measured_s=(r["n_prompt"] + r["n_gen"]) / r["avg_ts"],
            build=f"{r.get('build_commit') or '?'} ({r.get('build_number') or '?'})",
            cpu_info=str(r.get("cpu_info") or ""), backends=backends,
        ))
    if not out:
        raise LlamatierError("no CPU llama-bench rows (backends CPU): run llama-bench from a CPU build, or -ngl 0")
    return out


def row_steps(row: HostRow) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n_tokens, n_kv after the step, n_outputs) of every llama_decode step of a llama-bench test."""
    nt, nkv, outs = [], [], []
    pos = row.n_depth
    left = row.n_prompt
    while left > 0:
        n = min(row.n_ubatch, left)
        pos += n
        left -= n
        nt.append(n)
        nkv.append(pos)
        outs.append(1 if left == 0 else 0)
    for _ in range(row.n_gen):
        pos += 1
        nt.append(1)
        nkv.append(pos)
        outs.append(1)
    return np.array(nt, dtype=np.int64), np.array(nkv, dtype=np.int64), np.array(outs, dtype=np.int64)


def _n_ctx(row: HostRow) -> int:
    n = row.n_prompt + row.n_gen + row.n_depth  # llama-bench's cparams.n_ctx
    return -(-n // PAD) * PAD


def row_design(row: HostRow, terms: Sequence[str], *, swa_layer_fraction: float, swa_window: int) -> np.ndarray:
    """Work counts of a whole test: the sum over its steps (one value per term)."""
    nt, nkv, outs = row_steps(row)
    att = attended_cells(nkv, PAD, _n_ctx(row), swa_full=False, swa_layer_fraction=swa_layer_fraction,
                         swa_window=swa_window, n_ubatch=row.n_ubatch)
    x = design_matrix(tuple(terms), n_tokens=nt, n_kv_padded=att, type_k=row.type_k, type_v=row.type_v,
                      n_outputs=outs, flash_attn=row.flash_attn)
    return x.sum(axis=0)


def default_bench_terms(rows: Sequence[HostRow]) -> tuple[str, ...]:
    """Terms llama-bench rows identify: fixed and per-token costs, per-cell costs per flash-attention setting."""
    terms = ["step", "token"]
    fas = sorted({r.flash_attn for r in rows})
    ks = sorted({r.type_k for r in rows})
    for fa in fas:
        tag = "on" if fa else "off"
        for k in ks:
            qual = f"@k={k}" if len(ks) > 1 else ""
            terms += [f"kv{qual}@fa={tag}", f"token_kv{qual}@fa={tag}"]
    return tuple(terms)


@dataclass(frozen=True)
class BenchHostFit(RowsFit):
    rows: tuple[HostRow, ...]
    model: HostComputeModel


def fit_host_from_bench(rows: Sequence[HostRow], *, model_name: str, weight_bytes: int = 0,
                        swa_layer_fraction: float = 0.0, swa_window: int = 0,
                        terms: Sequence[str] | None = None) -> BenchHostFit:
    """Fit a HostComputeModel to llama-bench rows of one model on one machine and build."""
    rows = list(rows)
    models = {r.model_type for r in rows}
    builds = {r.build for r in rows}
    if len(models) > 1:
        raise LlamatierError(f"llama-bench rows of several models ({', '.join(sorted(models))}): a host model is per "
                             "model; calibrate on rows of one model")
    if len(builds) > 1:
        raise LlamatierError(f"llama-bench rows of several builds ({', '.join(sorted(builds))}): a host model "
                             "predicts the build it was fitted on; calibrate on rows of one build")
    terms = tuple(terms) if terms is not None else default_bench_terms(rows)
    threads = sorted({r.n_threads for r in rows})
    x = np.array([row_design(r, terms, swa_layer_fraction=swa_layer_fraction, swa_window=swa_window) for r in rows])
    th = np.array([r.n_threads for r in rows], dtype=np.float64)
    full = np.hstack([x, x / th[:, None]]) if len(threads) > 1 else x
    y = np.array([r.measured_s for r in rows])
    a = full / y[:, None]
    scale = np.linalg.norm(a, axis=0)
    if (scale == 0).any():
        idle = [t for t, s in zip(terms * (2 if len(threads) > 1 else 1), scale, strict=True) if s == 0]
        raise LlamatierError(f"no llama-bench row exercises the host term {idle[0]}: add rows that do")
    rank = np.linalg.matrix_rank(a / scale, tol=1e-7)
    n_free = a.shape[1]
    if len(rows) < n_free + 1 or rank < n_free:
        depths = sorted({r.n_depth for r in rows})
        raise LlamatierError(
            f"{len(rows)} llama-bench rows cannot separate the host model's {n_free} parameters (rank {rank}; "
            f"depths {depths}, threads {threads}): add rows at other depths (-d 0,1024,3072), both -p and -n tests, "
            "and two thread counts (-t 1,2)"
        )
    coef = nnls(a / scale, np.ones(len(rows))) / scale
    pred = full @ coef
    rel = y / pred - 1  # error of the predicted throughput
    k = len(terms)
    model = HostComputeModel(
        terms=terms,
        serial_s=tuple(float(v) for v in coef[:k]),
        parallel_s=tuple(float(v) for v in (coef[k:] if len(threads) > 1 else np.zeros(k))),
        kv_pad_cells=PAD,
        k_types=tuple(sorted({r.type_k for r in rows})),
        v_types=tuple(sorted({r.type_v for r in rows})),
        thread_counts=tuple(threads),
        n_ubatch=int(sorted({r.n_ubatch for r in rows})[0]),
        flash_attn=tuple(sorted({r.flash_attn for r in rows})),
        swa_layer_fraction=float(swa_layer_fraction),
        swa_window=int(swa_window),
        model_name=model_name,
        model_weight_bytes=int(weight_bytes),
        fit_steps=len(rows),
        fit_median_ape=float(np.median(np.abs(rel))),
        fit_p95_ape=float(np.percentile(np.abs(rel), 95)),
        traces=(),
        notes=(f"fitted {_dt.datetime.now(_dt.UTC).isoformat(timespec='seconds')} on {len(rows)} llama-bench rows "
               f"({next(iter(builds))}; {rows[0].backends}; {rows[0].cpu_info}); llama-bench model {rows[0].model_type}"),
    )
    return BenchHostFit(model=model, rows=tuple(rows), predicted_s=pred)


def predict_bench_rows(model: HostComputeModel, rows: Sequence[HostRow]) -> np.ndarray:
    """Predicted seconds of each llama-bench row (stock settings: no --swa-full)."""
    out = []
    for r in rows:
        nt, nkv, outs = row_steps(r)
        t = model.predict_step_s(n_tokens=nt, n_kv=nkv, type_k=r.type_k, type_v=r.type_v, n_threads=r.n_threads,
                                 n_ctx=_n_ctx(r), n_ubatch=r.n_ubatch, n_outputs=outs, flash_attn=r.flash_attn,
                                 swa_full=False)
        out.append(float(t.sum()))
    return np.array(out)
