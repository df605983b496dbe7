"""Fit the host step-time model (HostComputeModel) from measured llama_decode times.

``fit_host_model(traces)`` gathers every step of the traces (batch size,
cells attended, KV types, threads, measured ``decode_s``), drops each trace's
warm-up steps, and solves a non-negative least-squares problem on *relative*
residuals (so 30 ms decode steps weigh as much as 3 s prefill steps). It then
trims outliers (steps slowed by other processes on the machine) by a robust
scale (median absolute deviation) and refits until the kept set is stable.
``calibrate_profile`` wraps the fitted model into a Profile for ``replay``.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llamatier.engines.llamacpp.repack import repack_state
from llamatier.errors import LlamatierError
from llamatier.hardware import (
    HostComputeModel,
    Profile,
    load_profile,
    pad_kv_cells,
    profile_to_toml,
)
from llamatier.hardware.hostmodel import DEFAULT_KV_PAD_CELLS, attended_cells, design_matrix
from llamatier.trace import Trace, load_trace

_PAD_CANDIDATES = (256, 128, 64, 32, 16, 1)


@dataclass(frozen=True)
class StepData:
    """Every step of one or more traces as flat arrays (one entry per llama_decode)."""

    trace_index: np.ndarray  # int, which trace the step came from
    step: np.ndarray  # int, step index within its trace
    is_decode: np.ndarray  # bool
    n_tokens: np.ndarray  # int
    n_kv: np.ndarray  # int, cells visible after the step (pos0 + n_tokens), unpadded
    n_kv_measured: np.ndarray  # int, cells llama.cpp attended (padded), 0 if not captured
    n_outputs: np.ndarray  # int, logits rows computed (1 if the step sampled a token, else 0)
    n_ctx: np.ndarray  # int
    n_threads: np.ndarray  # int
    n_ubatch: np.ndarray  # int
    type_k: np.ndarray  # object (str)
    type_v: np.ndarray  # object (str)
    decode_s: np.ndarray  # float, measured
    trace_names: tuple[str, ...] = ()
    model_names: tuple[str, ...] = ()
    model_weight_bytes: tuple[int, ...] = ()
    weight_repack: str = ""  # "on" / "off": llama.cpp's CPU weight repacking in every trace (never mixed)
    flash_attn: np.ndarray | None = None  # bool per step; None: all off (how llamatier traces)
    swa_full: np.ndarray | None = None  # bool per step; None: all on (how llamatier traces)
    swa_layer_fraction: float = 0.0  # the model's share of sliding-window layers
    swa_window: int = 0

    @property
    def n(self) -> int:
        return int(self.decode_s.shape[0])

    def fa(self) -> np.ndarray:
        return np.zeros(self.n, dtype=bool) if self.flash_attn is None else self.flash_attn

    def swa(self) -> np.ndarray:
        return np.ones(self.n, dtype=bool) if self.swa_full is None else self.swa_full

    def attended(self, pad: int) -> np.ndarray:
        """Layer-average attended cells per step (sliding windows when a trace ran without --swa-full)."""
        return attended_cells(self.n_kv, pad, self.n_ctx, swa_full=self.swa(),
                              swa_layer_fraction=self.swa_layer_fraction, swa_window=self.swa_window,
                              n_ubatch=np.where(self.n_ubatch > 0, self.n_ubatch, 512))


def steps_from_traces(traces: Sequence[Trace]) -> StepData:
    """Flatten the step tables of ``traces`` (and their context settings) into arrays."""
    if not traces:
        raise LlamatierError("no traces given: pass at least one trace directory")
    repack = one_repack_setting(traces)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in StepData.__dataclass_fields__ if k not in (
        "trace_names", "model_names", "model_weight_bytes", "weight_repack",
        "swa_layer_fraction", "swa_window")}
    names, models, weights = [], [], []
    for i, tr in enumerate(traces):
        ctx = tr.context
        name = str(tr.path) if tr.path is not None else f"trace{i}"
        missing = [k for k in ("n_threads", "type_k", "type_v") if k not in ctx]
        if missing:
            raise LlamatierError(
                f"trace {name} lacks context {', '.join(missing)} in meta.json: re-record it with `llamatier trace`"
            )
        s = tr.steps
        n = s.height
        nt = s["n_tokens"].to_numpy().astype(np.int64)
        pos0 = s["pos0"].to_numpy().astype(np.int64)
        cols["trace_index"].append(np.full(n, i, dtype=np.int64))
        cols["step"].append(s["step"].to_numpy().astype(np.int64))
        cols["is_decode"].append((s["phase"] == "decode").to_numpy())
        cols["n_tokens"].append(nt)
        cols["n_kv"].append(pos0 + nt)
        cols["n_kv_measured"].append(s["n_kv"].to_numpy().astype(np.int64))
        cols["n_outputs"].append((s["token_out"].to_numpy() >= 0).astype(np.int64))
        cols["n_ctx"].append(np.full(n, int(ctx.get("n_ctx", tr.n_ctx)), dtype=np.int64))
        cols["n_threads"].append(np.full(n, int(ctx["n_threads"]), dtype=np.int64))
        cols["n_ubatch"].append(np.full(n, int(ctx.get("n_ubatch", ctx.get("n_batch", 0)) or 0), dtype=np.int64))
        cols["type_k"].append(np.full(n, str(ctx["type_k"]), dtype=object))
        cols["type_v"].append(np.full(n, str(ctx["type_v"]), dtype=object))
        cols["decode_s"].append(s["decode_s"].to_numpy().astype(np.float64))
        cols["flash_attn"].append(np.full(n, bool(ctx.get("flash_attn", False))))
        cols["swa_full"].append(np.full(n, bool(ctx.get("swa_full", True))))
        names.append(name)
        models.append(tr.model.name)
        weights.append(int(tr.model.weight_bytes))
    g = traces[0].model.geometry
    return StepData(
        **{k: np.concatenate(v) for k, v in cols.items()},
        trace_names=tuple(names),
        model_names=tuple(models),
        model_weight_bytes=tuple(weights),
        weight_repack="on" if repack else "off",
        swa_layer_fraction=float(np.mean(g.swa_layers)) if g.n_layers else 0.0,
        swa_window=int(max(g.sliding_window)) if g.n_layers else 0,
    )


def one_repack_setting(traces: Sequence[Trace]) -> bool:
    """The weight-repacking setting all ``traces`` share; a one-line error when they mix both.

    Traces that did not record it ran with llama.cpp's default (repacking on).
    """
    states = [repack_state(tr.meta) for tr in traces]
    if len(set(states)) > 1:
        def names(on: bool) -> str:
            picked = [str(tr.path or f"trace{i}") for i, (tr, s) in enumerate(zip(traces, states, strict=True))
                      if s == on]
            return ", ".join(picked[:3]) + (f" and {len(picked) - 3} more" if len(picked) > 3 else "")

        raise LlamatierError(
            f"the traces mix llama.cpp runs with CPU weight repacking on ({names(True)}) and off ({names(False)}): "
            "repacked weights change step times, so one host model cannot describe both; calibrate each "
            "group separately (`llamatier inspect TRACE` shows a trace's setting)"
        )
    return states[0] if states else True


def infer_kv_pad_cells(data: StepData) -> tuple[int, float]:
    """The padding that explains the captured ``n_kv`` column: (pad, fraction of steps it matches).

    Falls back to llama.cpp's 256 when no step captured ``n_kv``.
    """
    have = data.n_kv_measured > 0
    if not have.any():
        return DEFAULT_KV_PAD_CELLS, float("nan")
    best = (DEFAULT_KV_PAD_CELLS, -1.0)
    for pad in _PAD_CANDIDATES:
        pred = pad_kv_cells(data.n_kv[have], pad, data.n_ctx[have])
        frac = float(np.mean(pred == data.n_kv_measured[have]))
        if frac > best[1] + 1e-12:
            best = (pad, frac)
    return best


def nnls(a: np.ndarray, b: np.ndarray, *, max_iter: int | None = None) -> np.ndarray:
    """Non-negative least squares, min ||a x - b|| with x >= 0 (Lawson-Hanson active set)."""
    m, n = a.shape
    max_iter = max_iter or 3 * n + 30
    passive = np.zeros(n, dtype=bool)
    x = np.zeros(n)
    tol = 10 * np.finfo(float).eps * max(m, n) * max(1.0, float(np.abs(a).sum(axis=0).max()))
    w = a.T @ (b - a @ x)
    for _ in range(max_iter):
        if passive.all() or w[~passive].max() <= tol:
            break
        j = int(np.argmax(np.where(passive, -np.inf, w)))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > tol).all():
                break
            neg = passive & (z <= tol)
            alpha = float(np.min(x[neg] / (x[neg] - z[neg])))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
        x = z
        w = a.T @ (b - a @ x)
    return x


def default_terms(data: StepData, mask: np.ndarray | None = None) -> tuple[str, ...]:
    """Terms the data can identify: fixed + per-token, and per-cell costs per K (and extra V) type."""
    m = np.ones(data.n, dtype=bool) if mask is None else mask
    batched = data.n_tokens[m] > 1
    terms = ["step"]
    outs = data.n_outputs[m]
    if outs.min() != outs.max():  # batches without logits (early prefill chunks) separate this cost
        terms.append("output")
    if batched.any():
        terms.append("token")
    for tk in sorted(set(data.type_k[m].tolist())):
        terms.append(f"kv@k={tk}")
        if (batched & (data.type_k[m] == tk)).any():
            terms.append(f"token_kv@k={tk}")
    v_types = sorted(set(data.type_v[m].tolist()))
    for tv in v_types[1:]:  # the first V type is the reference, folded into the K terms
        terms.append(f"kv@v={tv}")
        if (batched & (data.type_v[m] == tv)).any():
            terms.append(f"token_kv@v={tv}")
    fas = sorted(set(data.fa()[m].tolist()))
    if len(fas) > 1:  # per-cell costs differ with flash attention: one set of attention terms per setting
        attn = [t for t in terms if t.startswith(("kv", "token_kv"))]
        terms = [t for t in terms if t not in attn] + [f"{t}@fa={'on' if fa else 'off'}" for fa in fas for t in attn]
    return tuple(terms)


def _ape_stats(rel: np.ndarray) -> dict[str, float]:
    if rel.size == 0:
        return {"n": 0, "median_ape": float("nan"), "p95_ape": float("nan"), "max_ape": float("nan"),
                "bias": float("nan")}
    a = np.abs(rel)
    return {
        "n": int(rel.size),
        "median_ape": float(np.median(a)),
        "p95_ape": float(np.percentile(a, 95)),
        "max_ape": float(a.max()),
        "bias": float(np.median(rel)),
    }


@dataclass(frozen=True)
class CalibrationFit:
    """A fitted host model and how well it explains the steps it was fitted on."""

    model: HostComputeModel
    data: StepData
    predicted_s: np.ndarray  # for every step
    used: np.ndarray  # bool: steps the final fit used
    warmup: np.ndarray  # bool: steps dropped as warm-up
    outliers: np.ndarray  # bool: steps dropped as outliers
    iterations: int
    kv_pad_match: float  # fraction of captured n_kv values the padding rule reproduces
    stats: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> stats on used steps

    @property
    def rel_error(self) -> np.ndarray:
        return (self.predicted_s - self.data.decode_s) / self.data.decode_s


def fit_host_model(
    traces: Sequence[Trace] | StepData,
    *,
    warmup_steps: int = 1,
    warmup_decode_steps: int = 1,
    outlier_sigmas: float = 4.0,
    min_outlier_ape: float = 0.02,
    max_iterations: int = 20,
    terms: tuple[str, ...] | None = None,
) -> CalibrationFit:
    """Fit a HostComputeModel to measured step times (see module docstring).

    Warm-up: the first ``warmup_steps`` steps of each trace (context creation,
    first graph allocation) and the first ``warmup_decode_steps`` decode steps
    (the graph changes shape after prefill) are not fitted. Outliers: steps whose
    relative residual lies more than ``outlier_sigmas`` robust standard deviations
    (1.4826 * MAD) from the median, and more than ``min_outlier_ape`` away, are
    dropped and the fit repeated until the kept set no longer changes.
    """
    data = traces if isinstance(traces, StepData) else steps_from_traces(traces)
    if np.any(data.decode_s <= 0) or not np.all(np.isfinite(data.decode_s)):
        raise LlamatierError("a trace has non-positive or non-finite decode_s; re-record it")
    pad, pad_match = infer_kv_pad_cells(data)
    warm = data.step < warmup_steps
    if warmup_decode_steps > 0:
        for ti in np.unique(data.trace_index):
            idx = np.flatnonzero((data.trace_index == ti) & data.is_decode)
            warm[idx[:warmup_decode_steps]] = True
    candidates = ~warm
    if candidates.sum() < 3:
        raise LlamatierError(
            f"only {int(candidates.sum())} steps left after dropping warm-up steps: record longer traces "
            "(more --n-predict) before calibrating"
        )
    terms = tuple(terms) if terms is not None else default_terms(data, candidates)
    thread_counts = tuple(sorted(set(data.n_threads[candidates].tolist())))
    padded = data.attended(pad)
    x = design_matrix(terms, n_tokens=data.n_tokens, n_kv_padded=padded, type_k=data.type_k, type_v=data.type_v,
                      n_outputs=data.n_outputs, flash_attn=data.fa())
    both = len(thread_counts) > 1
    full = np.hstack([x, x / data.n_threads[:, None]]) if both else x
    n_free = full.shape[1]
    a_all = full / data.decode_s[:, None]  # relative residuals: (pred - t) / t = a @ c - 1
    keep = candidates.copy()
    prev_keep = keep
    it = 0
    for _ in range(max_iterations):
        it += 1
        a = a_all[keep]
        scale = np.linalg.norm(a, axis=0)
        scale[scale == 0] = 1.0
        rank = np.linalg.matrix_rank(a / scale)
        if keep.sum() < n_free + 2 or rank < n_free:
            if it == 1 and keep.sum() < n_free + 2:
                raise LlamatierError(
                    f"{int(keep.sum())} usable steps for {n_free} parameters: calibrate on more or longer traces"
                )
            if it == 1:
                raise LlamatierError(
                    f"the traces cannot separate the model's {n_free} parameters (rank {rank}): add traces with "
                    "other context lengths, prompt lengths, KV types or thread counts"
                )
            keep = prev_keep  # trimming removed what identifies a parameter: keep the last identifiable set
            break
        coef = nnls(a / scale, np.ones(int(keep.sum()))) / scale
        rel = a_all @ coef - 1.0
        new_keep = candidates.copy()
        for phase_mask in (data.is_decode, ~data.is_decode):  # robust scale per phase: few prefill steps
            group = keep & phase_mask
            if not group.any():
                continue
            center = float(np.median(rel[group]))
            sigma = 1.4826 * float(np.median(np.abs(rel[group] - center)))
            limit = max(outlier_sigmas * sigma, min_outlier_ape)
            new_keep &= ~phase_mask | (np.abs(rel - center) <= limit)
        if np.array_equal(new_keep, keep):
            break
        prev_keep, keep = keep, new_keep
    a = a_all[keep]
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    coef = nnls(a / scale, np.ones(int(keep.sum()))) / scale
    predicted = full @ coef
    rel = predicted / data.decode_s - 1.0
    serial = coef[: len(terms)]
    parallel = coef[len(terms):] if both else np.zeros(len(terms))
    stats = {
        "decode": _ape_stats(rel[keep & data.is_decode]),
        "prefill": _ape_stats(rel[keep & ~data.is_decode]),
        "all": _ape_stats(rel[keep]),
    }
    ub = sorted(set(data.n_ubatch.tolist()))
    model = HostComputeModel(
        terms=terms,
        serial_s=tuple(float(v) for v in serial),
        parallel_s=tuple(float(v) for v in parallel),
        kv_pad_cells=int(pad),
        k_types=tuple(sorted(set(data.type_k[candidates].tolist()))),
        v_types=tuple(sorted(set(data.type_v[candidates].tolist()))),
        thread_counts=thread_counts,
        n_ubatch=int(ub[0]) if len(ub) == 1 else 0,
        flash_attn=tuple(sorted(set(data.fa()[candidates].tolist()))) if data.fa()[candidates].any() else (),
        swa_layer_fraction=data.swa_layer_fraction if not data.swa()[candidates].all() else 0.0,
        swa_window=data.swa_window if not data.swa()[candidates].all() else 0,
        model_name=", ".join(sorted(set(data.model_names))),
        model_weight_bytes=int(max(data.model_weight_bytes)) if data.model_weight_bytes else 0,
        fit_steps=int(keep.sum()),
        fit_dropped_steps=int(data.n - keep.sum()),
        fit_median_ape=stats["all"]["median_ape"],
        fit_p95_ape=stats["all"]["p95_ape"],
        traces=tuple(data.trace_names),
        weight_repack=data.weight_repack,
        notes=(
            f"fitted {_dt.datetime.now(_dt.UTC).isoformat(timespec='seconds')}: "
            f"{int(warm.sum())} warm-up and {int((candidates & ~keep).sum())} outlier steps dropped; "
            f"relative least squares, non-negative, {it} iterations"
        ),
    )
    return CalibrationFit(
        model=model,
        data=data,
        predicted_s=predicted,
        used=keep,
        warmup=warm,
        outliers=candidates & ~keep,
        iterations=it,
        kv_pad_match=pad_match,
        stats=stats,
    )


def calibrate_profile(
    trace_paths: Sequence[str | Path],
    *,
    base: str = "cpu-host",
    name: str | None = None,
    **fit_options: float,
) -> tuple[Profile, CalibrationFit]:
    """Load traces, fit the host model, and return ``base`` carrying it (plus the fit)."""
    traces = [load_trace(p) for p in trace_paths]
    models = {tr.model.name for tr in traces}
    if len(models) > 1:
        raise LlamatierError(
            f"traces come from different models ({', '.join(sorted(models))}): a host model is per model; "
            "calibrate on traces of one model"
        )
    fit = fit_host_model(traces, **fit_options)  # type: ignore[arg-type]
    base_profile = load_profile(base)
    profile = base_profile.with_host_model(fit.model, name=name or f"{base_profile.name}-calibrated")
    return profile, fit


TRACES_FIT_NOTE = (
    "[compute.host_model] is fitted from measured llama_decode times of the traces it lists: "
    "t = sum_j x_j * (serial_s_j + parallel_s_j / n_threads)."
)


def write_calibrated_profile(
    profile: Profile, path: str | Path, *, base_source: str = "", kind: str = "host", fit_note: str = TRACES_FIT_NOTE
) -> Path:
    """Write a calibrated profile TOML (readable by ``load_profile`` and ``replay --profile``).

    ``kind`` ("host" or "GPU") and ``fit_note`` say in the header what was fitted and from what data.
    """
    hm = profile.compute.host_model
    header = (
        f"Calibrated {kind} profile written by `llamatier calibrate` "
        f"({_dt.datetime.now(_dt.UTC).date().isoformat()}).\n"
        f"Tiers, links and compute rates are copied from the base profile {base_source or profile.source}:\n"
        "see that file for the source of every number.\n"
        f"{fit_note}\n"
    )
    if hm is not None:
        header += (
            f"Fit: {hm.fit_steps} steps, median abs error {hm.fit_median_ape:.2%}, p95 {hm.fit_p95_ape:.2%} "
            "(on fitted steps; run `llamatier validate` on held-out traces for the honest figure)."
        )
    out = Path(path)
    if out.exists() and out.is_dir():
        raise LlamatierError(f"--out {out} is a directory: give a file name such as my-host.toml")
    if not out.parent.exists():
        raise LlamatierError(f"directory {out.parent} does not exist: create it or choose another --out")
    out.write_text(profile_to_toml(profile, header=header))
    return out
