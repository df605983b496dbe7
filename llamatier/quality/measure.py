"""Measure what a KV cache type costs in accuracy, in real llama.cpp runs.

For every K/V type pair, llama.cpp reads the same text teacher-forced (each
position sees the true previous tokens) and gives logits for every position.
Those are compared with a reference run whose KV cache is f16/f16:

- KL(ref || test) per position, over the whole vocabulary (natural log, nats);
  reported as mean, median, p99 and max.
- top-1 agreement: the share of positions where both runs rank the same token first.
- perplexity of the text under each run, and its change relative to the reference.

Logits are never held for the whole text (Gemma's vocabulary has 262,144
entries): all contexts decode the same batch in lockstep, and the batch's
rows are reduced to per-position statistics a few rows at a time.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from llamatier.engines.llamacpp.session import ContextSettings, LlamaContext, LlamaModel
from llamatier.errors import LlamatierError
from llamatier.kvtypes import KV_TYPES, KVType, kv_type, parse_kv_pair
from llamatier.model import KVGeometry, read_model_info

DEFAULT_TEXT_NAME = "quality_text.txt"
REFERENCE_PAIR = ("f16", "f16")
_ROWS_PER_REDUCTION = 8  # logits rows reduced at once: 8 x 262k x 4 B = 8 MB for Gemma

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class QualityRow:
    """Accuracy and storage of one K/V type pair against the f16/f16 reference."""

    pair: str  # "K/V", e.g. "q8_0/f16"
    type_k: str
    type_v: str
    bits_per_element: float  # KV bits per stored element over the whole model (K and V weighted)
    saving_vs_f16: float  # fraction of KV bytes saved relative to f16/f16 (0.71875 for q4_0)
    kv_bytes_per_token: int  # K+V bytes one token takes across all layers
    mean_kl: float  # mean over positions of KL(ref || test), nats
    mean_kl_stderr: float  # standard error of that mean
    median_kl: float
    p99_kl: float
    max_kl: float
    top1_agreement: float  # share of positions with the same argmax token
    top1_agreement_stderr: float
    ppl: float  # perplexity of the text under this pair
    ppl_ref: float  # perplexity under the f16/f16 reference
    ppl_change_pct: float  # 100 * (ppl / ppl_ref - 1)
    ppl_change_pct_stderr: float  # from the paired per-position NLL differences (delta method)
    decode_s: float  # wall time of this pair's llama_decode calls (information only)


@dataclass(frozen=True)
class QualityResult:
    """A quality measurement: how it was run, one row per pair, and per-position detail."""

    model: str  # general.name from the GGUF
    model_file: str  # file name (not the full path: results get committed and shared)
    model_file_bytes: int
    architecture: str
    n_vocab: int
    n_tokens: int  # tokens of text evaluated (with BOS)
    n_positions: int  # scored positions: n_tokens - 1
    n_ctx: int
    batch_tokens: int
    n_threads: int
    flash_attn: bool  # flash attention of the runs under test
    reference_flash_attn: bool  # flash attention of the f16/f16 reference (normally the same)
    reference: str  # "f16/f16"
    text_source: str
    text_sha256: str
    llama_cpp_python_version: str
    ppl_ref: float  # perplexity of the text under the f16/f16 reference
    reference_decode_s: float
    rows: tuple[QualityRow, ...]
    # one row per (pair, scored position): pair, type_k, type_v, pos, target, kl, top1_agree, nll, nll_ref
    positions: pl.DataFrame | None = field(default=None, repr=False, compare=False)
    # llama.cpp's CPU weight repacking (use_extra_bufts) and why (None: not recorded)
    repack: dict[str, Any] | None = field(default=None, compare=False)

    def row(self, type_k: str, type_v: str) -> QualityRow | None:
        """The row for a K/V pair (names checked against the KV type table), or None."""
        k, v = kv_type(type_k).name, kv_type(type_v).name
        for r in self.rows:
            if r.type_k == k and r.type_v == v:
                return r
        return None

    def meta(self) -> dict[str, Any]:
        """Everything but the rows and per-position arrays (JSON-ready)."""
        return {k: v for k, v in asdict(self).items() if k not in ("rows", "positions")}


def default_text() -> str:
    """The built-in evaluation text shipped with llamatier (varied English, ~1,000 tokens)."""
    return resources.files("llamatier").joinpath("data", DEFAULT_TEXT_NAME).read_text("utf-8")


def read_text_file(path: str | Path) -> str:
    """Read the user's evaluation text; a clear error when it is missing or unreadable."""
    p = Path(path)
    if not p.exists():
        raise LlamatierError(f"text file not found: {p} (give a UTF-8 text file to --text-file)")
    if p.is_dir():
        raise LlamatierError(f"--text-file {p} is a directory; give a UTF-8 text file")
    try:
        return p.read_text("utf-8")
    except UnicodeDecodeError:
        raise LlamatierError(f"{p} is not UTF-8 text; convert it to UTF-8 first") from None
    except OSError as exc:
        raise LlamatierError(f"cannot read --text-file {p}: {exc.strerror or exc}") from None


KVPairSpec = str | Sequence[str | tuple[KVType, KVType]]


def parse_kv_pairs(spec: KVPairSpec) -> list[tuple[KVType, KVType]]:
    """Parse 'f16,q8_0,q8_0/f16' (or a list of entries or (K, V) tuples) into unique pairs, in order."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    pairs: list[tuple[KVType, KVType]] = []
    for item in items:
        if isinstance(item, tuple):
            pair = (kv_type(item[0].name if isinstance(item[0], KVType) else item[0]),
                    kv_type(item[1].name if isinstance(item[1], KVType) else item[1]))
        elif not str(item).strip():
            continue
        else:
            pair = parse_kv_pair(str(item).strip())
        if pair not in pairs:
            pairs.append(pair)
    if not pairs:
        raise LlamatierError(
            f"no KV types given: list types or K/V pairs, e.g. f16,q8_0,q4_0/f16 (valid types: {', '.join(KV_TYPES)})"
        )
    return pairs


def pair_name(type_k: KVType, type_v: KVType) -> str:
    return f"{type_k.name}/{type_v.name}"


def check_pair_fits(geometry: KVGeometry, type_k: KVType, type_v: KVType, *, flash_attn: bool) -> None:
    """Raise a one-line error if llama.cpp cannot store this model's KV in this pair."""
    for what, t, dims in (("K", type_k, geometry.head_dim_k), ("V", type_v, geometry.head_dim_v)):
        bad = sorted({d for d in dims if d % t.block_elements})
        if bad:
            raise LlamatierError(
                f"{what} cache type {t.name} stores blocks of {t.block_elements} elements but this "
                f"model's {what} head dim is {bad[0]}, not a multiple of {t.block_elements}: "
                f"use f16, bf16 or f32 for {what} on this model"
            )
    if type_v.quantized and not flash_attn:
        raise LlamatierError(
            f"quantized V cache ({type_v.name}) needs flash attention in llama.cpp: run with flash "
            "attention on (drop --no-flash-attn), or use f16 for V"
        )


def pair_storage(geometry: KVGeometry, type_k: KVType, type_v: KVType) -> tuple[float, float, int]:
    """(bits per element, saving vs f16/f16, bytes per token) for a pair on this geometry."""
    f16 = KV_TYPES["f16"]
    n_elements = sum(
        geometry.k_elements_per_token(i) + geometry.v_elements_per_token(i)
        for i in range(geometry.n_layers)
    )
    nbytes = geometry.bytes_per_token(type_k, type_v)
    ref_bytes = geometry.bytes_per_token(f16, f16)
    return 8.0 * nbytes / n_elements, 1.0 - nbytes / ref_bytes, nbytes


def _logsumexp_rows(logits: np.ndarray, buf: np.ndarray) -> np.ndarray:
    """log(sum(exp(row))) per row, float64; leaves exp(row - max) in ``buf``."""
    row_max = logits.max(axis=1, keepdims=True)
    np.subtract(logits, row_max, out=buf)
    np.exp(buf, out=buf)
    return row_max[:, 0].astype(np.float64) + np.log(buf.sum(axis=1, dtype=np.float64))


class _PairStats:
    """Per-position statistics of one test context against the reference."""

    def __init__(self, n_positions: int) -> None:
        self.kl = np.zeros(n_positions, dtype=np.float64)
        self.top1_agree = np.zeros(n_positions, dtype=bool)
        self.nll = np.zeros(n_positions, dtype=np.float64)
        self.decode_s = 0.0


def _reduce_batch(
    ref_logits: np.ndarray,
    tests: list[tuple[np.ndarray, _PairStats]],
    targets: np.ndarray,
    pos0: int,
    nll_ref: np.ndarray,
) -> None:
    """Turn one batch of logits rows (ref and each test) into per-position statistics.

    With x the reference logits, y a test run's and p = softmax(x):
    KL(p || softmax(y)) = sum_j p_j (x_j - y_j) - logsumexp(x) + logsumexp(y).
    Element-wise work stays in float32 (one pass each), row sums accumulate in
    float64: about 1e-8 nats of error, where a float64 log-softmax is 10x slower.
    """
    n_rows = ref_logits.shape[0]
    for r0 in range(0, n_rows, _ROWS_PER_REDUCTION):
        r1 = min(n_rows, r0 + _ROWS_PER_REDUCTION)
        rows = np.arange(r1 - r0)
        tgt = targets[r0:r1]
        sl = slice(pos0 + r0, pos0 + r1)
        x = ref_logits[r0:r1]
        buf = np.empty_like(x)
        lse_x = _logsumexp_rows(x, buf)
        p_ref = buf / buf.sum(axis=1, keepdims=True, dtype=np.float64).astype(np.float32)
        top_ref = x.argmax(axis=1)
        nll_ref[sl] = lse_x - x[rows, tgt]
        for logits, st in tests:
            y = logits[r0:r1]
            lse_y = _logsumexp_rows(y, buf)
            np.subtract(x, y, out=buf)
            buf *= p_ref
            st.kl[sl] = buf.sum(axis=1, dtype=np.float64) - lse_x + lse_y
            st.top1_agree[sl] = y.argmax(axis=1) == top_ref
            st.nll[sl] = lse_y - y[rows, tgt]


def _summarise(
    pk: KVType, pv: KVType, st: _PairStats, nll_ref: np.ndarray, geometry: KVGeometry
) -> QualityRow:
    n = st.kl.size
    bits, saving, nbytes = pair_storage(geometry, pk, pv)
    ppl = float(np.exp(st.nll.mean()))
    ppl_ref = float(np.exp(nll_ref.mean()))
    nll_delta = st.nll - nll_ref  # paired: the same positions under both runs
    nll_delta_stderr = float(nll_delta.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    agree = float(st.top1_agree.mean())
    return QualityRow(
        pair=pair_name(pk, pv),
        type_k=pk.name,
        type_v=pv.name,
        bits_per_element=bits,
        saving_vs_f16=saving,
        kv_bytes_per_token=nbytes,
        mean_kl=float(st.kl.mean()),
        mean_kl_stderr=float(st.kl.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
        median_kl=float(np.median(st.kl)),
        p99_kl=float(np.percentile(st.kl, 99)),
        max_kl=float(st.kl.max()),
        top1_agreement=agree,
        top1_agreement_stderr=float(np.sqrt(agree * (1 - agree) / n)),
        ppl=ppl,
        ppl_ref=ppl_ref,
        ppl_change_pct=100.0 * (ppl / ppl_ref - 1.0),
        ppl_change_pct_stderr=100.0 * (ppl / ppl_ref) * nll_delta_stderr,
        decode_s=st.decode_s,
    )


def measure_quality(
    model_path: str | Path,
    kv_pairs: KVPairSpec = "f16,q8_0,q4_0",
    *,
    text: str | None = None,
    text_source: str | None = None,
    ctx: int | None = None,
    batch_tokens: int = 64,
    n_threads: int | None = None,
    flash_attn: bool = True,
    reference_flash_attn: bool | None = None,
    progress: ProgressFn | None = None,
    repack: bool | None = None,
) -> QualityResult:
    """Run llama.cpp teacher-forced over ``text`` once per K/V pair and compare with f16/f16.

    ``kv_pairs``: 'f16,q8_0,q4_0/f16' or a list of entries or (KVType, KVType) tuples.
    ``text``: defaults to the built-in text. ``ctx``: evaluate at most this many tokens
    (default: the whole text). Every run, the f16/f16 reference included, uses the same
    flash-attention setting, so differences come from the KV types alone; give
    ``reference_flash_attn`` to measure what flash attention itself changes instead.
    ``repack`` forces llama.cpp's CPU weight repacking on or off (None: decided safely).
    """
    pairs = parse_kv_pairs(kv_pairs)
    if batch_tokens < 1:
        raise LlamatierError(f"batch size must be at least 1 token, got {batch_tokens}")
    n_threads = int(n_threads if n_threads is not None else max(1, min(8, os.cpu_count() or 1)))
    if n_threads < 1:
        raise LlamatierError(f"threads must be at least 1, got {n_threads}")

    info = read_model_info(model_path)  # clear errors for missing / non-GGUF files
    f16 = KV_TYPES["f16"]
    ref_fa = flash_attn if reference_flash_attn is None else bool(reference_flash_attn)
    check_pair_fits(info.geometry, f16, f16, flash_attn=ref_fa)
    for pk, pv in pairs:
        check_pair_fits(info.geometry, pk, pv, flash_attn=flash_attn)

    if text is None:
        text, text_source = default_text(), text_source or f"built-in {DEFAULT_TEXT_NAME}"
    text_source = text_source or "given text"

    model = LlamaModel(model_path, repack=repack, n_threads=n_threads)
    contexts: list[LlamaContext] = []
    try:
        tokens = np.asarray(model.tokenize(text, add_bos=True), dtype=np.int32)
        if ctx is not None:
            if ctx < 2:
                raise LlamatierError(f"--ctx must be at least 2 tokens, got {ctx}")
            if info.n_ctx_train and ctx > info.n_ctx_train:
                raise LlamatierError(
                    f"--ctx {ctx} exceeds the model's training context of {info.n_ctx_train} tokens"
                )
            tokens = tokens[:ctx]
        if tokens.size < 2:
            raise LlamatierError(
                f"the text gives {tokens.size} token(s); at least 2 are needed to score a prediction"
            )
        n_tokens = int(tokens.size)
        n_positions = n_tokens - 1
        batch_tokens = min(batch_tokens, n_tokens)

        def settings(type_k: KVType, type_v: KVType, fa: bool) -> ContextSettings:
            return ContextSettings(n_ctx=n_tokens, n_batch=batch_tokens, n_ubatch=batch_tokens,
                                   n_threads=n_threads, type_k=type_k, type_v=type_v, flash_attn=fa)

        contexts.append(LlamaContext(model, settings(f16, f16, ref_fa)))
        for pk, pv in pairs:
            contexts.append(LlamaContext(model, settings(pk, pv, flash_attn)))
        stats = [_PairStats(n_positions) for _ in pairs]
        ref_decode_s = 0.0
        nll_ref = np.zeros(n_positions, dtype=np.float64)
        targets_all = tokens[1:].astype(np.int64)
        for pos0 in range(0, n_tokens, batch_tokens):
            chunk = tokens[pos0 : pos0 + batch_tokens]
            n_out = max(0, min(len(chunk), n_positions - pos0))  # the text's last token predicts nothing we score
            t0 = time.perf_counter()
            contexts[0].decode(chunk, pos0, logits_first=n_out)
            ref_decode_s += time.perf_counter() - t0
            for c, st in zip(contexts[1:], stats, strict=True):
                t0 = time.perf_counter()
                c.decode(chunk, pos0, logits_first=n_out)
                st.decode_s += time.perf_counter() - t0
            if n_out:
                _reduce_batch(
                    contexts[0].logits_rows(n_out),
                    [(c.logits_rows(n_out), st) for c, st in zip(contexts[1:], stats, strict=True)],
                    targets_all[pos0 : pos0 + n_out],
                    pos0,
                    nll_ref,
                )
            if progress is not None:
                progress(min(n_tokens, pos0 + batch_tokens), n_tokens)
    finally:
        for c in contexts:
            c.close()
        model.close()

    rows = tuple(
        _summarise(pk, pv, st, nll_ref, info.geometry) for (pk, pv), st in zip(pairs, stats, strict=True)
    )
    positions = _positions_frame(pairs, stats, targets_all, nll_ref)
    import llama_cpp

    return QualityResult(
        model=info.name,
        model_file=Path(model_path).name,
        model_file_bytes=Path(model_path).stat().st_size,
        architecture=info.architecture,
        n_vocab=model.n_vocab,
        n_tokens=n_tokens,
        n_positions=n_positions,
        n_ctx=n_tokens,
        batch_tokens=batch_tokens,
        n_threads=n_threads,
        flash_attn=flash_attn,
        reference_flash_attn=ref_fa,
        reference=pair_name(f16, f16),
        text_source=text_source,
        text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        llama_cpp_python_version=str(getattr(llama_cpp, "__version__", "unknown")),
        ppl_ref=float(np.exp(nll_ref.mean())),
        reference_decode_s=ref_decode_s,
        rows=rows,
        positions=positions,
        repack=model.repack.to_meta(model.model_buffers_mib),
    )


def _positions_frame(
    pairs: list[tuple[KVType, KVType]], stats: list[_PairStats], targets: np.ndarray, nll_ref: np.ndarray
) -> pl.DataFrame:
    n = targets.size
    frames = [
        pl.DataFrame(
            {
                "pair": [pair_name(pk, pv)] * n,
                "type_k": [pk.name] * n,
                "type_v": [pv.name] * n,
                "pos": np.arange(n, dtype=np.uint32),
                "target": targets.astype(np.int32),
                "kl": st.kl,
                "top1_agree": st.top1_agree,
                "nll": st.nll,
                "nll_ref": nll_ref,
            }
        )
        for (pk, pv), st in zip(pairs, stats, strict=True)
    ]
    return pl.concat(frames)
