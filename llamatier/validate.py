"""Predict every step of held-out traces with a profile's host model and report the error.

The error of a step is ``|predicted - measured| / measured`` (absolute percentage
error, APE). Reported per phase (prefill, decode) and per trace: median, p95,
max, and the median signed error (bias: > 0 means the model predicts too slow).

Alongside, the *noise floor*: the error of an oracle that predicts each decode
step by the median measured time of its own trace's steps with the same padded
KV size. No model of step time can do much better on those steps; the gap
between the model's error and the noise floor is what the model itself adds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llamatier.calibrate import StepData, steps_from_traces
from llamatier.engines.llamacpp.repack import repack_state
from llamatier.errors import LlamatierError
from llamatier.hardware import Profile, load_profile, pad_kv_cells
from llamatier.trace import load_trace

PHASES = ("prefill", "decode")
GOAL_DECODE_MEDIAN_APE = 0.03  # the fidelity goal: median <= 3% on held-out decode steps
GOAL_DECODE_P95_APE = 0.10  # and p95 <= 10%


@dataclass(frozen=True)
class ErrorStats:
    """Error of predicted step times over a set of steps."""

    n_steps: int
    median_ape: float
    p95_ape: float
    max_ape: float
    bias: float  # median signed relative error
    measured_s: float  # total measured time of these steps
    predicted_s: float  # total predicted time

    @staticmethod
    def of(measured_s: np.ndarray, predicted_s: np.ndarray) -> ErrorStats:
        if measured_s.size == 0:
            nan = float("nan")
            return ErrorStats(0, nan, nan, nan, nan, 0.0, 0.0)
        rel = predicted_s / measured_s - 1.0
        a = np.abs(rel)
        return ErrorStats(
            n_steps=int(rel.size),
            median_ape=float(np.median(a)),
            p95_ape=float(np.percentile(a, 95)),
            max_ape=float(a.max()),
            bias=float(np.median(rel)),
            measured_s=float(measured_s.sum()),
            predicted_s=float(predicted_s.sum()),
        )


@dataclass(frozen=True)
class TraceValidation:
    """Errors on one trace, per phase."""

    trace: str
    type_k: str
    type_v: str
    n_threads: int
    n_prompt_tokens: int
    n_ctx: int
    phases: dict[str, ErrorStats]
    decode_noise_floor: ErrorStats


@dataclass(frozen=True)
class ValidationReport:
    """Errors over all held-out traces, per phase, plus each trace's own."""

    profile: str
    phases: dict[str, ErrorStats]
    decode_noise_floor: ErrorStats  # error of the per-trace, per-KV-size median oracle
    traces: tuple[TraceValidation, ...]
    skipped_warmup_steps: int
    overlap: tuple[str, ...]  # traces that the profile's fit also used (not held out)

    @property
    def meets_goal(self) -> bool:
        d = self.phases["decode"]
        return d.n_steps > 0 and d.median_ape <= GOAL_DECODE_MEDIAN_APE and d.p95_ape <= GOAL_DECODE_P95_APE

    def to_dict(self) -> dict:
        from dataclasses import asdict

        d = asdict(self)
        d["meets_goal"] = self.meets_goal
        d["goal"] = {"decode_median_ape": GOAL_DECODE_MEDIAN_APE, "decode_p95_ape": GOAL_DECODE_P95_APE}
        return d


def predict_steps(profile: Profile, data: StepData) -> np.ndarray:
    """Predicted llama_decode time [s] of every step in ``data`` from the profile's host model."""
    hm = profile.compute.host_model
    if hm is None:
        raise LlamatierError(
            f"profile {profile.name} has no calibrated host model: run `llamatier calibrate TRACE... "
            f"--base {profile.name} --out my-host.toml` and validate with --profile my-host.toml"
        )
    return hm.predict_step_s(
        n_tokens=data.n_tokens,
        n_kv=data.n_kv,
        type_k=data.type_k,
        type_v=data.type_v,
        n_threads=data.n_threads,
        n_ctx=data.n_ctx,
        n_outputs=data.n_outputs,
        flash_attn=data.fa(),
        swa_full=data.swa(),
    )


def noise_floor_predictions(data: StepData, kv_pad_cells: int) -> np.ndarray:
    """Each decode step's 'prediction' by the median of its trace's decode steps with the same padded n_kv."""
    out = np.full(data.n, np.nan)
    key_kv = pad_kv_cells(data.n_kv, kv_pad_cells, data.n_ctx)
    dec = np.flatnonzero(data.is_decode)
    groups: dict[tuple[int, int], list[int]] = {}
    for i in dec:
        groups.setdefault((int(data.trace_index[i]), int(key_kv[i])), []).append(int(i))
    for idx in groups.values():
        out[idx] = np.median(data.decode_s[idx])
    return out


def validate_profile(
    profile: Profile | str, trace_paths: Sequence[str | Path], *, skip_warmup_steps: int = 0
) -> ValidationReport:
    """Predict every step of ``trace_paths`` and report the error per phase and per trace.

    ``skip_warmup_steps`` leaves out each trace's first steps (default 0: every step counts).
    """
    if skip_warmup_steps < 0:
        raise LlamatierError(f"--skip-warmup must be >= 0 steps (got {skip_warmup_steps})")
    prof = load_profile(profile) if isinstance(profile, str | Path) else profile
    traces = [load_trace(p) for p in trace_paths]
    hm = prof.compute.host_model
    if hm is not None:
        for p, tr in zip(trace_paths, traces, strict=True):
            if hm.model_name and tr.model.name != hm.model_name:
                raise LlamatierError(
                    f"{prof.name}'s host model was fitted on {hm.model_name}, but trace {p} is of "
                    f"{tr.model.name}: a host model predicts the model it was fitted on (calibrate on "
                    "traces of this model)"
                )
            on = repack_state(tr.meta)
            if hm.weight_repack and hm.weight_repack != ("on" if on else "off"):
                raise LlamatierError(
                    f"{prof.name}'s host model was fitted on runs with llama.cpp's CPU weight repacking "
                    f"{hm.weight_repack}, but trace {p} ran with it {'on' if on else 'off'}: repacked weights "
                    "change step times; validate on traces recorded the same way, or calibrate on these"
                )
    data = steps_from_traces(traces)
    predicted = predict_steps(prof, data)
    keep = data.step >= skip_warmup_steps
    if not keep.any():
        raise LlamatierError(
            f"--skip-warmup {skip_warmup_steps} leaves no step to validate (the longest trace has "
            f"{int(data.step.max()) + 1 if len(data.step) else 0} steps); use a smaller value"
        )
    oracle = noise_floor_predictions(data, prof.compute.host_model.kv_pad_cells)  # type: ignore[union-attr]
    dkeep = keep & data.is_decode
    phases = {}
    for phase in PHASES:
        m = keep & (data.is_decode if phase == "decode" else ~data.is_decode)
        phases[phase] = ErrorStats.of(data.decode_s[m], predicted[m])
    per_trace = []
    for i, tr in enumerate(traces):
        in_trace = keep & (data.trace_index == i)
        ctx = tr.context
        per_trace.append(
            TraceValidation(
                trace=data.trace_names[i],
                type_k=str(ctx["type_k"]),
                type_v=str(ctx["type_v"]),
                n_threads=int(ctx["n_threads"]),
                n_prompt_tokens=int(ctx.get("n_prompt_tokens", 0)),
                n_ctx=int(ctx.get("n_ctx", tr.n_ctx)),
                phases={
                    ph: ErrorStats.of(
                        data.decode_s[in_trace & (data.is_decode if ph == "decode" else ~data.is_decode)],
                        predicted[in_trace & (data.is_decode if ph == "decode" else ~data.is_decode)],
                    )
                    for ph in PHASES
                },
                decode_noise_floor=ErrorStats.of(data.decode_s[in_trace & dkeep], oracle[in_trace & dkeep]),
            )
        )
    fitted_on = {str(Path(t).resolve()) for t in (prof.compute.host_model.traces if prof.compute.host_model else ())}
    overlap = tuple(n for n in data.trace_names if str(Path(n).resolve()) in fitted_on)
    return ValidationReport(
        profile=prof.name,
        phases=phases,
        decode_noise_floor=ErrorStats.of(data.decode_s[dkeep], oracle[dkeep]),
        traces=tuple(per_trace),
        skipped_warmup_steps=int((~keep).sum()),
        overlap=overlap,
    )
