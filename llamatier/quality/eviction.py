"""Measure in real llama.cpp what dropping KV blocks costs in accuracy.

A trace's tokens are read again, teacher-forced: the prompt is prefilled as the
trace did, then each decode step reads the trace's token. A reference run keeps
every position; each run under test first removes from llama.cpp's KV cache
the positions its :class:`~llamatier.quality.plan.EvictionPlan` drops at that
step, then decodes. The logits of every decode step are compared with the
reference's (KL(ref || test), top-1 agreement, perplexity), beside the attention
mass the replay says the policy dropped.

How positions are removed (``mechanism``):

- ``view`` (default; permanent eviction and per-step selection): the context
  holds two sequences in one unified KV cache. Sequence 0 keeps every token;
  before each step sequence 1 becomes a copy of it (cells are tagged, no data
  moves) minus the dropped ranges (``llama_memory_seq_rm``), the token is
  decoded in sequence 1 and its cell added to sequence 0. Every run lays its
  cells out exactly as the reference does, so removing nothing gives the
  reference's logits bit for bit, and a difference is the policy's alone.
  Needs ``swa_full`` (the sliding-window cache cannot recycle cells two
  sequences share), which quality runs always use.
- ``evict`` (permanent plans only): the dropped ranges are removed from the one
  sequence for good and llama.cpp reuses the freed cells for new tokens. That
  reorders cells, hence floating-point sums: on Gemma 3 270M this alone moves
  logits by up to ~0.01 nats of KL per token, as much as flash attention on/off.

Kept positions keep their original positions (their keys were rotated when
written); nothing is re-positioned (StreamingLLM's cache-relative positions are
not reproduced).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from llamatier.engines.llamacpp.session import ContextSettings, LlamaContext, LlamaModel
from llamatier.errors import LlamatierError
from llamatier.model import read_model_info
from llamatier.quality.inputs import trace_prompt_text
from llamatier.quality.plan import EvictionPlan, plan_eviction
from llamatier.quality.stats import PositionStats, accuracy_summary, reduce_rows
from llamatier.trace import Trace, load_trace

MECHANISMS = ("view", "evict")
_VIEW_SEQ = 1

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class EvictionRow:
    """Accuracy of one (policy, block budget) against the full KV cache."""

    policy: str
    keep_blocks: int
    params: str  # the policy's parameters, "k=v, ..."
    kind: str  # "eviction" (dropped blocks are discarded) or "selection" (re-chosen every step)
    permanent: bool  # no dropped block came back in this run
    mechanism: str  # "view" or "evict"
    kept_fraction: float  # blocks kept / blocks held, mean over scored steps
    mass_dropped_mean: float  # attention mass on dropped blocks (trace, mean over layers and steps)
    mass_dropped_p99_step: float
    mean_kl: float
    mean_kl_stderr: float
    median_kl: float
    p99_kl: float
    max_kl: float
    top1_agreement: float
    top1_agreement_stderr: float
    ppl: float
    ppl_ref: float
    ppl_change_pct: float
    ppl_change_pct_stderr: float
    decode_s: float  # wall time of this run's llama_decode calls (information only)


@dataclass(frozen=True)
class EvictionResult:
    """An eviction measurement: how it was run, one row per (policy, budget), per-step detail."""

    model: str
    model_file: str
    architecture: str
    n_vocab: int
    trace: str  # the trace directory as given
    trace_prompt_sha256: str
    trace_created_utc: str
    block_tokens: int
    n_prompt_tokens: int
    n_steps: int  # scored decode steps
    flash_attn: bool
    n_threads: int
    mechanism: str
    llama_cpp_python_version: str
    ppl_ref: float
    reference_decode_s: float
    rows: tuple[EvictionRow, ...]
    # one row per (policy, keep_blocks, scored step): step, pos, target, kl, top1_agree, nll, nll_ref,
    # mass_dropped, blocks_kept, blocks_held
    positions: pl.DataFrame | None = field(default=None, repr=False, compare=False)
    # llama.cpp's CPU weight repacking (use_extra_bufts) and why
    repack: dict[str, Any] | None = field(default=None, compare=False)

    def row(self, policy: str, keep_blocks: int) -> EvictionRow | None:
        for r in self.rows:
            if r.policy == policy and r.keep_blocks == int(keep_blocks):
                return r
        return None

    def meta(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("rows", "positions")}


def _check_model(model_path: str | Path, trace: Trace) -> Any:
    info = read_model_info(model_path)
    tm = trace.model
    mine = (info.architecture, info.geometry.n_layers, info.n_params)
    theirs = (tm.architecture, tm.geometry.n_layers, tm.n_params)
    if mine != theirs:
        raise LlamatierError(
            f"{Path(model_path).name} ({info.name}, {info.architecture}, {info.geometry.n_layers} layers) is not the "
            f"model the trace was recorded with ({tm.name}, {tm.architecture}, {tm.geometry.n_layers} layers): "
            "give the trace's model"
        )
    return info


def _trace_layout(trace: Trace, steps: int | None) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Prefill chunks (pos0, n_tokens) and the decode steps to score."""
    st = trace.steps
    phase = st["phase"].to_list()
    first = phase.index("decode")
    if "prefill" in phase[first:]:
        raise LlamatierError("the trace reads more prompt after decoding began; eviction runs need the prompt first")
    pos0 = st["pos0"].to_list()
    n = st["n_tokens"].to_list()
    prefill = [(int(pos0[i]), int(n[i])) for i in range(first)]
    dec = np.arange(first, trace.n_steps, dtype=np.int64)
    if steps is not None:
        if steps < 1:
            raise LlamatierError(f"--steps must be at least 1, got {steps}")
        dec = dec[:steps]
    return prefill, dec


def measure_eviction(
    model_path: str | Path,
    trace: Trace | str | Path,
    policies: str | Sequence[str],
    keep_blocks: int | Sequence[int],
    *,
    prompt_file: str | Path | None = None,
    steps: int | None = None,
    n_threads: int | None = None,
    flash_attn: bool = False,
    mechanism: str = "view",
    policy_params: dict[str, dict[str, Any]] | None = None,
    progress: ProgressFn | None = None,
    repack: bool | None = None,
) -> EvictionResult:
    """Teacher-force the trace's tokens in llama.cpp once per (policy, budget), dropping what the policy drops.

    ``policies``: names ("h2o,streaming" or a list); ``keep_blocks``: budgets in blocks
    per layer. ``steps``: score only the first N decode steps. ``flash_attn`` applies
    to every run (off by default, as the trace was recorded). ``repack`` forces llama.cpp's
    CPU weight repacking on or off (None: decided safely).
    """
    if mechanism not in MECHANISMS:
        raise LlamatierError(f"unknown mechanism {mechanism!r}: use view or evict")
    tr = trace if isinstance(trace, Trace) else load_trace(trace)
    pols = [p.strip() for p in (policies.split(",") if isinstance(policies, str) else policies) if p.strip()]
    keeps = [int(k) for k in ([keep_blocks] if isinstance(keep_blocks, int) else keep_blocks)]
    if not pols or not keeps:
        raise LlamatierError("give eviction policies and block budgets, e.g. --evict h2o,streaming --keep 8,16")
    info = _check_model(model_path, tr)
    prefill, dec_steps = _trace_layout(tr, steps)
    params = policy_params or {}
    plans = [plan_eviction(tr, p, k, policy_params=params.get(p)) for p in pols for k in keeps]
    if mechanism == "evict" and (bad := [p for p in plans if not p.permanent]):
        raise LlamatierError(
            f"policy {bad[0].policy!r} selects blocks per step (a dropped block comes back later): the evict "
            "mechanism frees dropped cells for good; use --mechanism view"
        )
    text = trace_prompt_text(tr, prompt_file)
    n_threads = int(n_threads if n_threads is not None else max(1, min(8, os.cpu_count() or 1)))
    D = int(dec_steps.size)
    tok_in = tr.steps["token_in"].to_numpy().astype(np.int64)[dec_steps]
    targets = tr.steps["token_out"].to_numpy().astype(np.int64)[dec_steps]
    pos = tr.steps["pos0"].to_numpy().astype(np.int64)[dec_steps]
    n_ctx = int(pos[-1]) + 1
    n_batch = max(n for _, n in prefill)

    model = LlamaModel(model_path, repack=repack, n_threads=n_threads)
    try:
        prompt = np.asarray(model.tokenize(text, add_bos=True), dtype=np.int32)
        n_prompt = prefill[-1][0] + prefill[-1][1]
        if prompt.size != n_prompt:
            raise LlamatierError(
                f"the prompt tokenizes to {prompt.size} tokens here, the trace has {n_prompt}: "
                "use the llama-cpp-python and model the trace was recorded with"
            )
        settings = ContextSettings(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=n_threads,
                                   flash_attn=flash_attn, swa_full=True, n_seq_max=2, kv_unified=True)
        ref_logits, state, ref_s = _reference(model, settings, prompt, prefill, tok_in, pos)
        nll_ref = np.zeros(D, dtype=np.float64)
        rows, frames = [], []
        total, done = D * (len(plans) + 1), D
        if progress is not None:
            progress(done, total)
        for plan in plans:
            st = PositionStats(D)
            _run_plan(model, settings, state, plan, dec_steps, tok_in, pos, mechanism, ref_logits, targets, nll_ref, st)
            done += D
            if progress is not None:
                progress(done, total)
            rows.append(_row(plan, dec_steps, st, nll_ref, mechanism))
            frames.append(_positions(plan, dec_steps, pos, targets, st, nll_ref))
    finally:
        model.close()
    import llama_cpp

    return EvictionResult(
        model=info.name,
        model_file=Path(model_path).name,
        architecture=info.architecture,
        n_vocab=model.n_vocab,
        trace=str(tr.path) if tr.path else "",
        trace_prompt_sha256=str((tr.meta.get("prompt") or {}).get("sha256", "")),
        trace_created_utc=str(tr.meta.get("created_utc", "")),
        block_tokens=int(tr.block_tokens),
        n_prompt_tokens=int(n_prompt),
        n_steps=D,
        flash_attn=bool(flash_attn),
        n_threads=n_threads,
        mechanism=mechanism,
        llama_cpp_python_version=str(getattr(llama_cpp, "__version__", "unknown")),
        ppl_ref=float(np.exp(nll_ref.mean())),
        reference_decode_s=ref_s,
        rows=tuple(rows),
        positions=pl.concat(frames),
        repack=model.repack.to_meta(model.model_buffers_mib),
    )


def _reference(
    model: LlamaModel, settings: ContextSettings, prompt: np.ndarray, prefill: list[tuple[int, int]],
    tok_in: np.ndarray, pos: np.ndarray,
) -> tuple[np.ndarray, bytes, float]:
    """Prefill as the trace did, save the prompt's KV, then decode every step: (logits [D, V], state, decode s)."""
    with LlamaContext(model, settings) as ctx:
        for p0, n in prefill:
            ctx.decode(prompt[p0 : p0 + n], p0, logits_last=False)
        state = ctx.sequence_state(0)
        out = np.empty((pos.size, model.n_vocab), dtype=np.float32)
        t0 = time.perf_counter()
        for i in range(pos.size):
            ctx.decode([int(tok_in[i])], int(pos[i]))
            out[i] = ctx.logits(-1)
        return out, state, time.perf_counter() - t0


def _run_plan(
    model: LlamaModel, settings: ContextSettings, state: bytes, plan: EvictionPlan, dec_steps: np.ndarray,
    tok_in: np.ndarray, pos: np.ndarray, mechanism: str, ref_logits: np.ndarray, targets: np.ndarray,
    nll_ref: np.ndarray, st: PositionStats,
) -> None:
    """Decode the trace's tokens with the plan's positions removed; per-step statistics into ``st``."""
    index = {int(s): i for i, s in enumerate(plan.steps)}
    with LlamaContext(model, settings) as ctx:
        ctx.load_sequence_state(state, 0)
        for i in range(pos.size):
            j = index[int(dec_steps[i])]
            p = int(pos[i])
            ranges = plan.dropped_ranges(j)
            t0 = time.perf_counter()
            if mechanism == "view":
                ctx.remove_positions(_VIEW_SEQ, -1, -1)
                ctx.copy_positions(0, _VIEW_SEQ)
                for a, b in ranges:
                    ctx.remove_positions(_VIEW_SEQ, a, b)
                ctx.decode([int(tok_in[i])], p, seq_id=_VIEW_SEQ)
                ctx.copy_positions(_VIEW_SEQ, 0, p, p + 1)
            else:  # removing a range again is a no-op
                for a, b in ranges:
                    ctx.remove_positions(0, a, b)
                ctx.decode([int(tok_in[i])], p)
            st.decode_s += time.perf_counter() - t0
            reduce_rows(ref_logits[i : i + 1], [(ctx.logits(-1)[None, :], st)], targets[i : i + 1], i, nll_ref)


def _row(plan: EvictionPlan, dec_steps: np.ndarray, st: PositionStats, nll_ref: np.ndarray, mechanism: str) -> EvictionRow:
    idx = np.searchsorted(plan.steps, dec_steps)
    md = plan.mass_dropped_per_step[idx]
    return EvictionRow(
        policy=plan.policy,
        keep_blocks=plan.keep_blocks,
        params=", ".join(f"{k}={v}" for k, v in plan.params.items()),
        kind=plan.kind,
        permanent=plan.permanent,
        mechanism=mechanism,
        kept_fraction=float((plan.kept[idx].sum(axis=1) / plan.held[idx]).mean()),
        mass_dropped_mean=float(md.mean()),
        mass_dropped_p99_step=float(np.percentile(md, 99)),
        **accuracy_summary(st, nll_ref),
        decode_s=st.decode_s,
    )


def _positions(
    plan: EvictionPlan, dec_steps: np.ndarray, pos: np.ndarray, targets: np.ndarray, st: PositionStats,
    nll_ref: np.ndarray,
) -> pl.DataFrame:
    idx = np.searchsorted(plan.steps, dec_steps)
    n = dec_steps.size
    return pl.DataFrame(
        {
            "policy": [plan.policy] * n,
            "keep_blocks": np.full(n, plan.keep_blocks, dtype=np.int32),
            "step": dec_steps.astype(np.int32),
            "pos": pos.astype(np.int32),
            "target": targets.astype(np.int32),
            "kl": st.kl,
            "top1_agree": st.top1_agree,
            "nll": st.nll,
            "nll_ref": nll_ref,
            "mass_dropped": plan.mass_dropped_per_step[idx],
            "blocks_kept": plan.kept[idx].sum(axis=1).astype(np.int32),
            "blocks_held": plan.held[idx].astype(np.int32),
        }
    )
