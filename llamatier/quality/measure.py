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
rows are reduced to per-position statistics a few rows at a time
(:mod:`llamatier.quality.stats`). Input parsing lives in :mod:`llamatier.quality.inputs`.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from llamatier.engines.llamacpp.session import ContextSettings, LlamaContext, LlamaModel
from llamatier.errors import LlamatierError
from llamatier.kvtypes import KV_TYPES, KVType, kv_type
from llamatier.model import KVGeometry, read_model_info
from llamatier.quality.inputs import (
    DEFAULT_TEXT_NAME,
    KVPairSpec,
    check_pair_fits,
    default_text,
    pair_name,
    pair_storage,
    parse_kv_pairs,
)
from llamatier.quality.stats import PositionStats, accuracy_summary, reduce_rows

REFERENCE_PAIR = ("f16", "f16")

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


def _summarise(
    pk: KVType, pv: KVType, st: PositionStats, nll_ref: np.ndarray, geometry: KVGeometry
) -> QualityRow:
    bits, saving, nbytes = pair_storage(geometry, pk, pv)
    return QualityRow(
        pair=pair_name(pk, pv),
        type_k=pk.name,
        type_v=pv.name,
        bits_per_element=bits,
        saving_vs_f16=saving,
        kv_bytes_per_token=nbytes,
        **accuracy_summary(st, nll_ref),
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
        stats = [PositionStats(n_positions) for _ in pairs]
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
                reduce_rows(
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
    pairs: list[tuple[KVType, KVType]], stats: list[PositionStats], targets: np.ndarray, nll_ref: np.ndarray
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
