"""Calibrate the host model for a server's batches: several sequences per llama_decode, and sampling.

A traced run has one sequence: a step has at most one logits row, and the
sampler runs outside the timed ``llama_decode``. A server step batches several
sequences (one KV stream each), computes one logits row per generating slot,
and samples each (tools/server/server-context.cpp ``post_decode``:
``common_sampler_sample`` per slot, one after the other). This module times
exactly that with llama-cpp-python (the same llama.cpp source and build flags
as a native llama-server build), in the server's configuration: ``n_seq_max``
streams, flash attention ``auto``, sliding-window caches (not ``--swa-full``),
``n_batch`` 2048 and ``n_ubatch`` 512. The program of batches mirrors what the
server forms: prompts split as the server splits them (before the last
``n_ubatch + 4`` and the last 4 tokens, for context checkpoints), decode steps
of 1-8 slots (consecutive and not), decode steps with a prompt chunk.

The sampler chain is llama-server's default (common/common.h
``common_params_sampling``: penalties, DRY (off), top-n-sigma (off), top-k 40,
typical (off), top-p 0.95, min-p 0.05, XTC (off), temperature 0.8, dist).

:func:`fit_server_host_model` fits the host model's terms (``step``,
``logits``, ``output``, ``token``, ``kv``, ``token_kv``; counts from
:func:`llamatier.serving.ubatch.ubatch_counts`) on the median time of each
batch over repeats, by non-negative least squares on relative residuals, and
``sample`` from the sampler timings.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llamatier.calibrate import nnls
from llamatier.errors import LlamatierError
from llamatier.hardware import HostComputeModel
from llamatier.serving.slots import prompt_chunk
from llamatier.serving.ubatch import COUNT_TERMS, KVLayout, Segment, ubatch_counts

TERMS = COUNT_TERMS
OVERHEAD_PROMPT = 64  # the one-slot server run: prompt tokens ...
OVERHEAD_OUTPUT = 129  # ... and output tokens (the recorder times the same decode steps)


@dataclass(frozen=True)
class BatchSettings:
    """The server-side context the batches run in."""

    n_threads: int = 2
    n_seq: int = 8
    n_ctx_seq: int = 4096
    n_batch: int = 2048
    n_ubatch: int = 512
    flash_attn: str = "auto"  # "auto" (llama-server's default), "on", "off"
    swa_full: bool = False


def default_program(s: BatchSettings) -> list[list[tuple[int, int, bool]]]:
    """Batches as lists of (sequence, new tokens, logits for the last): what a server forms.

    An entry ``[(seq, 0, False)]`` is not a batch: it clears that sequence (a slot taking a new prompt).
    Prompts are chunked as the server chunks them; when several slots start prompts
    together, their chunks share a batch up to ``n_batch`` tokens (in slot order).
    """
    n = s.n_seq
    ckpt = not s.swa_full
    prog: list[list[tuple[int, int, bool]]] = []

    def prompts_together(seqs: list[int], n_new: list[int], decoders: list[int] = ()) -> None:  # type: ignore[assignment]
        left = dict(zip(seqs, n_new, strict=True))
        while any(left.values()):
            batch = [(q, 1, True) for q in decoders]
            used = len(batch)
            for q in seqs:
                if left[q] == 0 or used >= s.n_batch:
                    continue
                k = prompt_chunk(left[q], s.n_batch - used, n_batch=s.n_batch, n_ubatch=s.n_ubatch, checkpoints=ckpt)
                batch.append((q, k, k == left[q]))
                left[q] -= k
                used += k
            prog.append(batch)

    first = [556, 300, 832, 200, 1152, 420, 700, 1024][:n]
    for q, m in enumerate(first):  # every slot's first prompt, alone
        prompts_together([q], [m])
    for m in range(1, n + 1):  # decode steps of 1..n consecutive slots
        prog.extend([[(q, 1, True) for q in range(m)] for _ in range(4)])
    for g in ([0, 2, 5], [1, 3, 4, 6]):  # slots with gaps in their ids: several ubatches
        g = [q for q in g if q < n]
        prog.extend([[(q, 1, True) for q in g] for _ in range(4)])
    half = max(1, n // 2)
    for dec in (list(range(half)), [0]):  # decode steps with another slot's prompt chunks
        q = min(max(dec) + 1, n - 1)
        prog.append([(q, 0, False)])
        prompts_together([q], [556], [d for d in dec if d != q])
    # one slot decoding from a short context, as the one-slot server run that measures the server's own work
    q = n - 1
    prog.append([(q, 0, False)])
    prompts_together([q], [OVERHEAD_PROMPT])
    prog.extend([[(q, 1, True)] for _ in range(OVERHEAD_OUTPUT - 1)])
    # several slots starting prompts together (a server after a burst of arrivals), then decoding
    group = list(range(min(4, n)))
    for q in group:
        prog.append([(q, 0, False)])
    prompts_together(group, [512] * len(group))
    prog.extend([[(q, 1, True) for q in group] for _ in range(4)])
    prompts_together(group[:-1], [256] * (len(group) - 1), group[-1:])  # turns continuing, one slot decoding
    late = list(range(max(0, n - 4), n))  # decoding at longer contexts
    prog.extend([[(q, 1, True) for q in late] for _ in range(4)])
    prog.extend([[(late[0], 1, True)] for _ in range(4)])
    for k in (5, 8, 13, 21):  # short prompt chunks
        prog.append([(late[0], k, k == 21)])
    return prog


def _sampler_chain(llama_cpp: Any, vocab: Any, n_vocab: int, seed: int) -> Any:
    sp = llama_cpp.llama_sampler_chain_default_params()
    chain = llama_cpp.llama_sampler_chain_init(sp)
    add = llama_cpp.llama_sampler_chain_add
    add(chain, llama_cpp.llama_sampler_init_penalties(n_vocab, 64, 1.0, 0.0, 0.0))
    breakers = [b"\n", b":", b'"', b"*"]
    arr = (ctypes.c_char_p * len(breakers))(*breakers)
    add(chain, llama_cpp.llama_sampler_init_dry(vocab, 0.0, 1.75, 2, 64, arr, len(breakers)))
    add(chain, llama_cpp.llama_sampler_init_top_n_sigma(-1.0))
    add(chain, llama_cpp.llama_sampler_init_top_k(40))
    add(chain, llama_cpp.llama_sampler_init_typical(1.0, 0))
    add(chain, llama_cpp.llama_sampler_init_top_p(0.95, 0))
    add(chain, llama_cpp.llama_sampler_init_min_p(0.05, 0))
    add(chain, llama_cpp.llama_sampler_init_xtc(0.0, 0.1, 0, seed))
    add(chain, llama_cpp.llama_sampler_init_temp_ext(0.8, 0.0, 1.0))
    add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain


def record_batches(
    model_path: str | Path,
    settings: BatchSettings | None = None,
    *,
    repeats: int = 3,
    sample_rows: int = 64,
    seed: int = 1,
) -> dict[str, Any]:
    """Time every batch of :func:`default_program` ``repeats`` times, and the sampler ``sample_rows`` times."""
    import llama_cpp

    from llamatier.engines.llamacpp.session import (
        LlamaModel,
        _install_logger,
        last_log_error,
        system_info,
    )
    from llamatier.model import read_model_info

    s = settings or BatchSettings()
    info = read_model_info(model_path)
    rng = np.random.default_rng(seed)
    program = default_program(s)
    times: list[list[float]] = [[] for _ in program]
    segs_of: list[list[tuple[int, int, int, bool]] | None] = [None] * len(program)
    sample_s: list[float] = []
    state_s: list[dict[str, float]] = []
    with LlamaModel(model_path) as model:
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = s.n_seq * s.n_ctx_seq
        cp.n_batch, cp.n_ubatch, cp.n_seq_max = s.n_batch, s.n_ubatch, s.n_seq
        cp.n_threads = cp.n_threads_batch = s.n_threads
        cp.flash_attn_type = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                              "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}[s.flash_attn]
        cp.swa_full = s.swa_full
        cp.kv_unified = False
        cp.no_perf = True
        mark = _install_logger()
        ctx = llama_cpp.llama_init_from_model(model.ptr, cp)
        if not ctx:
            raise LlamatierError(f"llama.cpp could not create the batch context: {last_log_error(mark) or 'unknown'}")
        batch = llama_cpp.llama_batch_init(max(s.n_batch, s.n_seq), 0, 1)
        chain = _sampler_chain(llama_cpp, model.vocab, model.n_vocab, seed)
        mem = llama_cpp.llama_get_memory(ctx)
        try:
            for _ in range(repeats):
                llama_cpp.llama_memory_clear(mem, True)
                ctx_of = [0] * s.n_seq
                for bi, items in enumerate(program):
                    if len(items) == 1 and items[0][1] == 0:
                        q = items[0][0]
                        llama_cpp.llama_memory_seq_rm(mem, q, -1, -1)
                        ctx_of[q] = 0
                        continue
                    b, i = batch, 0
                    segs = []
                    for q, k, out in items:
                        segs.append((q, ctx_of[q], k, out))
                        for j in range(k):
                            b.token[i] = int(rng.integers(1000, 200000))
                            b.pos[i] = ctx_of[q] + j
                            b.n_seq_id[i] = 1
                            b.seq_id[i][0] = q
                            b.logits[i] = 1 if (out and j == k - 1) else 0
                            i += 1
                    b.n_tokens = i
                    t0 = time.perf_counter()
                    rc = llama_cpp.llama_decode(ctx, b)
                    llama_cpp.llama_synchronize(ctx)
                    dt = time.perf_counter() - t0
                    if rc != 0:
                        raise LlamatierError(f"llama_decode failed ({rc}) on batch {bi}: {last_log_error(mark)}")
                    times[bi].append(dt)
                    segs_of[bi] = segs
                    for q, k, _ in items:
                        ctx_of[q] += k
                    if len(items) > 1 and all(k == 1 for _, k, _ in items) and len(sample_s) < sample_rows:
                        for row in range(len(items)):  # the server samples each slot after the step
                            t0 = time.perf_counter()
                            tok = llama_cpp.llama_sampler_sample(chain, ctx, row)
                            sample_s.append(time.perf_counter() - t0)
                            llama_cpp.llama_sampler_accept(chain, tok)
                state_s.extend(_time_state_copies(llama_cpp, ctx, ctx_of))
        finally:
            llama_cpp.llama_sampler_free(chain)
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_free(ctx)
    rows = [{"segments": [list(x) for x in segs], "s": ts} for segs, ts in zip(segs_of, times, strict=True) if segs]
    return {
        "settings": asdict(s),
        "model": info.name,
        "model_path": str(model_path),
        "windows": list(info.geometry.sliding_window),
        "weight_bytes": info.weight_bytes,
        "system_info": system_info(),
        "llama_cpp_python": llama_cpp.__version__,
        "recorded_unix": time.time(),
        "batches": rows,
        "sample_s": sample_s,
        "state_copies": state_s,
    }


def _time_state_copies(llama_cpp: Any, ctx: Any, ctx_of: list[int]) -> list[dict[str, float]]:
    """Time what llama-server does with sequence states: save to and load from the prompt cache, checkpoints.

    server-context.cpp ``prompt_save`` sizes the state, allocates a buffer and copies the state out
    (``llama_state_seq_get_data_ext``); ``prompt_load`` copies it back (``..._set_data_ext``);
    ``create_checkpoint`` copies the sliding-window part (``LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY``).
    """
    rows = []
    for q, n in enumerate(ctx_of):
        if n <= 0:
            continue
        for kind, flags in (("save", 0), ("checkpoint", llama_cpp.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY)):
            t0 = time.perf_counter()
            size = int(llama_cpp.llama_state_seq_get_size_ext(ctx, q, flags))
            buf = (ctypes.c_uint8 * size)()
            got = int(llama_cpp.llama_state_seq_get_data_ext(ctx, buf, size, q, flags))
            t1 = time.perf_counter()
            rows.append({"kind": kind, "n_tokens": n, "bytes": got, "s": t1 - t0})
            if kind == "save":
                t0 = time.perf_counter()
                llama_cpp.llama_state_seq_set_data_ext(ctx, buf, size, q, flags)
                rows.append({"kind": "load", "n_tokens": n, "bytes": size, "s": time.perf_counter() - t0})
    return rows


def batch_counts(rec: dict[str, Any]) -> dict[str, np.ndarray]:
    """Work counts of each recorded batch (its ubatches summed)."""
    s = BatchSettings(**rec["settings"])
    flash = s.flash_attn != "off"  # auto resolves to on for the CPU backend
    layout = KVLayout(windows=tuple(rec["windows"]), n_ctx_seq=s.n_ctx_seq, n_ubatch=s.n_ubatch,
                      swa_full=s.swa_full, flash_attn=flash)
    cols: dict[str, list[float]] = {t: [] for t in TERMS}
    for row in rec["batches"]:
        segs = [Segment(int(q), int(c), int(k), bool(o)) for q, c, k, o in row["segments"]]
        c = ubatch_counts(segs, layout)
        for t in TERMS:
            cols[t].append(float(c[t].sum()))
    return {t: np.asarray(v) for t, v in cols.items()}


@dataclass(frozen=True)
class BatchFit:
    model: HostComputeModel
    measured_s: np.ndarray
    predicted_s: np.ndarray

    @property
    def rel_error(self) -> np.ndarray:
        return self.predicted_s / self.measured_s - 1.0


def fit_server_host_model(rec: dict[str, Any], *, type_k: str = "f16", type_v: str = "f16") -> BatchFit:
    """Fit the host model's terms on the recorded batches (median over repeats) and the sampler's cost."""
    t = np.array([statistics.median(r["s"]) for r in rec["batches"]])
    counts = batch_counts(rec)
    x = np.stack([counts[k] for k in TERMS], axis=1)
    a = x / t[:, None]
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    if np.linalg.matrix_rank(a / scale) < len(TERMS):
        raise LlamatierError("the recorded batches cannot separate the host model's terms: record the default program")
    coef = nnls(a / scale, np.ones(t.size)) / scale
    sample = float(np.median(rec["sample_s"])) if rec.get("sample_s") else 0.0
    copies = rec.get("state_copies") or []
    copy = (sum(c["s"] for c in copies) / sum(c["bytes"] for c in copies)) if copies else 0.0
    s = rec["settings"]
    terms = (*TERMS, "sample", "copy_bytes")
    serial = (*(float(v) for v in coef), sample, float(copy))
    model = HostComputeModel(
        terms=terms,
        serial_s=serial,
        parallel_s=(0.0,) * len(terms),
        kv_pad_cells=256,
        k_types=(type_k,),
        v_types=(type_v,),
        thread_counts=(int(s["n_threads"]),),
        n_ubatch=int(s["n_ubatch"]),
        model_name=str(rec["model"]),
        model_weight_bytes=int(rec.get("weight_bytes", 0)),
        fit_steps=int(t.size),
        fit_median_ape=float(np.median(np.abs(x @ coef / t - 1))),
        fit_p95_ape=float(np.quantile(np.abs(x @ coef / t - 1), 0.95)),
        notes=(f"fitted from {t.size} server-shaped batches (median of {len(rec['batches'][0]['s'])} runs) at "
               f"n_threads={s['n_threads']}, flash_attn={s['flash_attn']}, swa_full={s['swa_full']}, "
               f"{s['n_seq']} KV streams; sample = median of {len(rec.get('sample_s', []))} sampler calls; "
               f"copy_bytes = {len(copies)} timed state saves, loads and checkpoints"),
    )
    return BatchFit(model=model, measured_s=t, predicted_s=x @ coef)


def measure_server_overhead(
    binary: Path,
    model_path: Path,
    rec: dict[str, Any],
    *,
    log: Path,
    runs: int = 6,
    seed: int = 7,
) -> dict[str, float]:
    """One-slot llama-server runs: the server's work per output token beyond the step and the sampler.

    Each run is one request of :data:`OVERHEAD_PROMPT` fresh tokens and
    :data:`OVERHEAD_OUTPUT` outputs on a one-slot server. The recorder timed the
    same one-sequence decode steps (same contexts) with llama-cpp-python; the
    server's generation time per token after the first (its own
    ``predicted_ms``) minus that step and the sampler is the work the server adds
    per output token (result objects, text pieces, handing tokens to the HTTP
    thread). Client TTFT minus the server's prompt time is the HTTP overhead.
    """
    from llamatier.serverbench.client import stream_completion
    from llamatier.serverbench.server import HOST, LlamaServer

    s = BatchSettings(**rec["settings"])
    rng = np.random.default_rng(seed)
    args = ["-np", "1", "-c", str(s.n_ctx_seq), "-b", str(s.n_batch), "-ub", str(s.n_ubatch),
            "-t", str(s.n_threads), "-tb", str(s.n_threads)]
    tpot, http = [], []
    with LlamaServer(binary, model_path, args, log) as srv:
        for _ in range(runs):
            prompt = rng.integers(1000, 200000, OVERHEAD_PROMPT).tolist()
            c = stream_completion(HOST, srv.port, prompt, OVERHEAD_OUTPUT, timeout_s=120, options={"seed": seed})
            if not c.ok:
                raise LlamatierError(f"server overhead run failed: {c.error}")
            tpot.append(c.server_tpot_s())
            http.append(c.ttft_s - c.server_ttft_s())
    steps = [statistics.median(r["s"]) for r in rec["batches"]
             if len(r["segments"]) == 1 and r["segments"][0][2] == 1
             and OVERHEAD_PROMPT <= r["segments"][0][1] < OVERHEAD_PROMPT + OVERHEAD_OUTPUT]
    if not steps:
        raise LlamatierError("the recorded batches lack the one-slot decode steps: record the default program")
    step = float(np.mean(steps))
    sampler = float(np.median(rec["sample_s"])) if rec.get("sample_s") else 0.0
    server_step = float(np.median(tpot))
    return {
        "server_tpot_s": server_step,
        "recorded_step_s": step,
        "sampler_s": sampler,
        "per_token_s": max(0.0, server_step - step - sampler),
        "http_s": float(np.median(http)),
        "runs": float(runs),
    }


def with_server_overhead(model: HostComputeModel, overhead: dict[str, float]) -> HostComputeModel:
    """The host model with the server's per-output work added to ``sample``."""
    from dataclasses import replace

    j = model.terms.index("sample")
    serial = list(model.serial_s)
    sampler = serial[j]
    serial[j] = sampler + overhead["per_token_s"]
    return replace(model, serial_s=tuple(serial), notes=(
        f"{model.notes}; sample = sampler {sampler * 1e3:.3f} ms + llama-server's own work per output token "
        f"{overhead['per_token_s'] * 1e3:.3f} ms (one-slot server: {overhead['server_tpot_s'] * 1e3:.2f} ms per "
        f"token; the same decode steps timed alone: {overhead['recorded_step_s'] * 1e3:.2f} ms)"))
