"""How llama.cpp runs one batch of several sequences: ubatches, attended cells and work counts.

A llama-server step is one ``llama_decode`` of a batch holding, in order, one
token per generating slot and then prompt chunks (tools/server/server-context.cpp,
``server_context_impl::pre_decode``). With one KV stream per slot (``-np N``
without ``--kv-unified``, the default) llama.cpp splits that batch into ubatches
with ``llama_batch_allocr::split_equal(n_ubatch, sequential=true)``
(src/llama-batch.cpp; chosen by ``llama_kv_cache_iswa::init_batch`` and
``llama_kv_cache::init_batch``): a ubatch takes the first unused token of each
sequence in batch order whose id is one more than the previous one taken,
then the same number of tokens from each of those sequences, at most
``n_ubatch`` in all. Each ubatch is one graph computation: the weights
stream once per ubatch, whatever its size.

Attended cells (src/llama-kv-cache.cpp ``llama_kv_cache::get_n_kv``): each
layer's K/V view spans ``n_kv`` cells, the largest over the ubatch's streams of
``min(cache cells, max(256, pad256(cells used)))``. Global layers cache
``n_ctx_seq`` cells per stream; sliding-window layers, unless ``--swa-full``,
``pad256(min(n_ctx_seq, window + n_ubatch))`` (src/llama-kv-cache-iswa.cpp).
With flash attention off the scores cover all ``n_kv`` cells of the view; with
flash attention on, the CPU kernel skips masked cells, so each token's work is
the cells it sees: its own sequence's positions, within the window on
sliding-window layers.

Matrix kernels (ggml/src/ggml-cpu/repack.cpp ``forward_mul_mat_one_chunk``;
which types are repacked: ``ggml_repack_get_optimal_repack_type``, on x86 with
AVX2 Q4_0, Q4_K, Q6_K, Q8_0, IQ4_NL...): a repacked matrix multiplies four rows
or more with a GEMM over groups of four rows, and the remaining ``rows % 4``
one at a time with a GEMV; each kernel used streams the weights once more. The
transformer's matrices see ``n_tokens`` rows; the output matrix (the
vocabulary projection, the largest of a small model) only the logits rows
(``output``), which is why a decode step of five slots costs far more than one
of four.

:func:`ubatch_counts` turns a batch into the host model's work counts per
ubatch (``step``, ``output``, ``token``, ``kv``, ``token_kv``; ``gemm`` and
``gemv``: the kernels used on the transformer's matrices, ``gemv_rows``: rows
through the GEMV; ``logits_gemm``, ``logits_gemv``, ``logits_gemv_rows``: the
same for the output matrix;
``kv`` and ``token_kv`` averaged over layers, which is exact for terms linear
in the cells); :func:`llamatier.hardware.HostComputeModel.predict_counts_s`
prices them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llamatier.hardware.hostmodel import kernel_counts

KV_PAD_CELLS = 256  # llama_kv_cache::get_n_kv pads to max(n_pad, 256)
COUNT_TERMS = ("step", "output", "token", "kv", "token_kv", "gemm", "gemv", "gemv_rows",
               "logits_gemm", "logits_gemv", "logits_gemv_rows")


@dataclass(frozen=True)
class Segment:
    """One sequence's tokens in a batch: ``n`` new tokens after ``ctx`` cached ones; ``out``: logits for the last."""

    seq: int
    ctx: int
    n: int
    out: bool


@dataclass(frozen=True)
class KVLayout:
    """What decides attended cells: each layer's window (0 = global), the caches' sizes, flash attention."""

    windows: tuple[int, ...]  # per layer
    n_ctx_seq: int  # cells per stream of the global cache (the slot's context)
    n_ubatch: int = 512
    swa_full: bool = False
    flash_attn: bool = True

    @property
    def swa_cells(self) -> int:
        """Cells per stream of the sliding-window cache."""
        w = max(self.windows) if self.windows else 0
        if self.swa_full or w == 0:
            return self.n_ctx_seq
        return _pad(min(self.n_ctx_seq, w + self.n_ubatch))


def _pad(x: np.ndarray | int, pad: int = KV_PAD_CELLS) -> np.ndarray:
    return -(-np.asarray(x, dtype=np.int64) // pad) * pad


def split_equal(segments: list[Segment], n_ubatch: int) -> list[list[tuple[int, int, int]]]:
    """llama.cpp's sequential equal split: ubatches as lists of (segment index, first token, tokens).

    Each sequence appears in at most one segment of a batch (as in llama-server's batches).
    """
    left = [s.n for s in segments]
    used = [0] * len(segments)
    out: list[list[tuple[int, int, int]]] = []
    for _ in range(sum(left) + 1):
        take: list[int] = []
        last = -1
        for i, s in enumerate(segments):
            if left[i] > 0 and (not take or s.seq == last + 1):
                take.append(i)
                last = s.seq
        if not take:
            break
        k = min(min(left[i] for i in take), max(1, n_ubatch // len(take)))
        out.append([(i, used[i], k) for i in take])
        for i in take:
            used[i] += k
            left[i] -= k
    return out


def _visible_sum(p0: np.ndarray, k: np.ndarray, w: int) -> np.ndarray:
    """Sum over positions p in [p0, p0 + k) of the cells position p sees: p + 1, capped at w when w > 0."""
    p0 = p0.astype(np.float64)
    k = k.astype(np.float64)
    full = k * p0 + k * (k + 1) / 2  # sum of (p + 1)
    if w <= 0:
        return full
    # positions with p + 1 >= w see exactly w cells
    first_capped = np.clip(w - 1 - p0, 0, k)  # positions before the cap
    below = first_capped * p0 + first_capped * (first_capped + 1) / 2
    return below + (k - first_capped) * w


def ubatch_counts(segments: list[Segment], layout: KVLayout) -> dict[str, np.ndarray]:
    """Work counts per ubatch of one batch, keyed by the host model's base terms."""
    ubs = split_equal(segments, layout.n_ubatch)
    U = len(ubs)
    win = np.asarray(layout.windows, dtype=np.int64)
    kinds, n_layers_of = np.unique(win, return_counts=True)
    share = n_layers_of / win.size
    swa_cells = layout.swa_cells
    c = {k: np.zeros(U) for k in COUNT_TERMS}
    for u, parts in enumerate(ubs):
        seg = [segments[i] for i, _, _ in parts]
        p0 = np.array([s.ctx + j for s, (_, j, _) in zip(seg, parts, strict=True)], dtype=np.int64)
        k = np.array([kk for _, _, kk in parts], dtype=np.int64)
        outs = sum(1 for s, (_, j, kk) in zip(seg, parts, strict=True) if s.out and j + kk == s.n)
        used_after = p0 + k  # cells each stream holds once this ubatch is in
        n_tok = int(k.sum())
        kv = 0.0
        tkv = 0.0
        for w, sh in zip(kinds.tolist(), share.tolist(), strict=True):
            cells = layout.n_ctx_seq if (w == 0 or layout.swa_full) else swa_cells
            n_kv = int(np.max(np.minimum(cells, np.maximum(KV_PAD_CELLS, _pad(np.minimum(used_after, cells))))))
            kv += sh * n_kv
            if layout.flash_attn:
                tkv += sh * float(_visible_sum(p0, k, w).sum())  # the mask keeps the window, swa_full or not
            else:
                tkv += sh * n_tok * n_kv
        c["step"][u] = 1.0
        c["output"][u] = outs
        c["token"][u] = n_tok
        c["kv"][u] = kv
        c["token_kv"][u] = tkv
    c.update(kernel_counts(c["token"], c["output"]))  # the output matrix multiplies the logits rows only
    return c
