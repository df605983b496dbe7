"""Calibrated host step-time model: predicts llama_decode wall time on a CPU host.

The model is linear in a few work counts, each split Amdahl-style into a part
that does not shrink with threads and a part that does::

    t(step) = sum_j x_j(step) * (serial_j + parallel_j / n_threads)

Work counts ("terms") for a batch of ``n_tokens`` attending ``n_kv`` cells
(``n_kv`` padded the way llama.cpp pads it, to a multiple of ``kv_pad_cells``):

- ``step``      1 per llama_decode ubatch (graph launch, thread sync)
- ``output``    rows of logits computed (1 for a decode step, 1 for the last prefill batch, else 0):
                the output projection over the whole vocabulary
- ``token``     n_tokens (weight matmuls, norms, per-token work)
- ``kv``        n_kv (reading the K/V cache once per ubatch)
- ``token_kv``  n_tokens * n_kv (Q·K scores, softmax, weighted V)
- ``sample``    tokens sampled after the step (a server's sampler chain over the vocabulary)
- ``gemm``, ``gemv``, ``gemv_rows``  CPU-repacked matrix kernels a ubatch uses (a GEMM over groups of
                four rows when it has four or more, a GEMV for each of the ``n_tokens % 4`` rows left)
- ``logits_gemm``, ``logits_gemv``, ``logits_gemv_rows``  the same for the output matrix, on the logits rows
- ``copy_bytes``  bytes of sequence state a server copies in the step (prompt-cache saves and loads,
                context checkpoints: sized, allocated and serialised, not a plain memcpy)

``sample`` and the kernel terms are absent from single-sequence trace
fits (a traced step has at most one output row, sampling is not inside
llama_decode, and its ubatches are one token or a multiple of four); a
fit from batches of several sequences (``llamatier.serverbench.batchcal``)
separates them from ``output``. :meth:`HostComputeModel.predict_counts_s`
prices work counts given per ubatch (as :mod:`llamatier.serving.ubatch`
computes them for a batch of sequences).

A term may be restricted to one cache type with ``@k=TYPE`` or ``@v=TYPE``
(``kv@k=q8_0`` counts only steps whose K cache is q8_0), so each KV type gets
its own per-cell cost, and to one attention configuration with ``@fa=on`` or
``@fa=off`` (flash attention on or off); qualifiers chain (``kv@k=f16@fa=on``).

Attended cells. With ``swa_full`` (how llamatier traces) every layer attends all
cells in use, padded to ``kv_pad_cells``. A stock llama.cpp run keeps a
sliding-window layer's cache at ``pad(window + n_ubatch)`` cells, so that layer
attends at most that many: ``kv`` then counts the layer-average of attended
cells, ``(1 - f) * pad(n_kv) + f * min(pad(n_kv), swa_cache)`` with ``f`` the
fraction of windowed layers (``swa_layer_fraction``). Coefficients come from
``llamatier calibrate``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from llamatier.errors import LlamatierError

BASE_TERMS = ("step", "output", "token", "kv", "token_kv", "sample", "gemm", "gemv", "gemv_rows",
              "logits_gemm", "logits_gemv", "logits_gemv_rows", "copy_bytes")
DEFAULT_KV_PAD_CELLS = 256  # llama.cpp pads attended KV cells to 256 with flash attention off


def term_conditions(term: str) -> tuple[str, dict[str, str]]:
    """Split ``"kv@k=q8_0@fa=on"`` into (base, {"k": "q8_0", "fa": "on"})."""
    base, *quals = term.split("@")
    if base not in BASE_TERMS:
        raise LlamatierError(f"unknown host-model term {term!r}: base terms are {', '.join(BASE_TERMS)}")
    conds: dict[str, str] = {}
    for qual in quals:
        key, eq, value = qual.partition("=")
        if key not in ("k", "v", "fa") or not eq or not value or key in conds or (
                key == "fa" and value not in ("on", "off")):
            raise LlamatierError(
                f"malformed host-model term {term!r}: qualify with @k=TYPE, @v=TYPE or @fa=on|off, each at most once"
            )
        conds[key] = value
    return base, conds


def parse_term(term: str) -> tuple[str, str | None, str | None]:
    """Split ``"kv@k=q8_0"`` into (base, cache "k"/"v" or None, type or None) (the first cache qualifier)."""
    base, conds = term_conditions(term)
    for which in ("k", "v"):
        if which in conds:
            return base, which, conds[which]
    return base, None, None


def pad_kv_cells(n_kv: np.ndarray, pad_cells: int, n_ctx: np.ndarray | int | None = None) -> np.ndarray:
    """Round attended cells up to llama.cpp's padding (capped at the cache size when known)."""
    n_kv = np.asarray(n_kv, dtype=np.int64)
    padded = -(-n_kv // pad_cells) * pad_cells
    if n_ctx is not None:
        padded = np.minimum(padded, np.asarray(n_ctx, dtype=np.int64))
    return np.maximum(padded, n_kv)


def _as_str_array(value: str | np.ndarray, n: int) -> np.ndarray:
    if isinstance(value, str):
        return np.full(n, value, dtype=object)
    arr = np.asarray(value, dtype=object)
    if arr.shape != (n,):
        raise ValueError(f"type array has shape {arr.shape}, expected ({n},)")
    return arr


def attended_cells(n_kv: np.ndarray, pad_cells: int, n_ctx: np.ndarray | int | None = None, *,
                   swa_full: np.ndarray | bool = True, swa_layer_fraction: float = 0.0, swa_window: int = 0,
                   n_ubatch: np.ndarray | int = 512) -> np.ndarray:
    """Layer-average of the cells llama.cpp attends (see module docstring), float64."""
    padded = pad_kv_cells(n_kv, pad_cells, n_ctx).astype(np.float64)
    if swa_layer_fraction <= 0 or swa_window <= 0:
        return padded
    cache = np.maximum(pad_cells, -(-(swa_window + np.asarray(n_ubatch, dtype=np.int64)) // 256) * 256)
    if n_ctx is not None:
        cache = np.minimum(cache, np.asarray(n_ctx, dtype=np.int64))
    windowed = np.minimum(padded, cache)
    mixed = (1.0 - swa_layer_fraction) * padded + swa_layer_fraction * windowed
    return np.where(np.asarray(swa_full, dtype=bool), padded, mixed)


def kernel_counts(n_tokens: np.ndarray, n_outputs: np.ndarray) -> dict[str, np.ndarray]:
    """Counts of the CPU-repacked matrix kernels (see module docstring) for rows of ``n_tokens`` and logits rows."""
    nt = np.asarray(n_tokens, dtype=np.float64)
    out = np.asarray(n_outputs, dtype=np.float64)
    return {"gemm": (nt >= 4).astype(np.float64), "gemv": (nt % 4 > 0).astype(np.float64), "gemv_rows": nt % 4,
            "logits_gemm": (out >= 4).astype(np.float64), "logits_gemv": (out % 4 > 0).astype(np.float64),
            "logits_gemv_rows": out % 4}


def design_matrix(
    terms: tuple[str, ...],
    *,
    n_tokens: np.ndarray,
    n_kv_padded: np.ndarray,
    type_k: str | np.ndarray,
    type_v: str | np.ndarray,
    n_outputs: np.ndarray | None = None,
    flash_attn: np.ndarray | bool | None = None,
) -> np.ndarray:
    """Work counts ``X[step, term]`` for already-padded (attended) ``n_kv`` (float64); outputs default to 1.

    ``flash_attn`` None: terms qualified with ``@fa`` count nothing (the configuration is unknown).
    """
    nt = np.asarray(n_tokens, dtype=np.float64)
    nkv = np.asarray(n_kv_padded, dtype=np.float64)
    n = nt.shape[0]
    out = np.ones(n) if n_outputs is None else np.asarray(n_outputs, dtype=np.float64)
    counts = {"step": np.ones(n), "output": out, "token": nt, "kv": nkv, "token_kv": nt * nkv,
              "sample": np.zeros(n), **kernel_counts(nt, out)}
    return design_from_counts(terms, counts, type_k=type_k, type_v=type_v, flash_attn=flash_attn)


def design_from_counts(
    terms: tuple[str, ...],
    counts: Mapping[str, np.ndarray],
    *,
    type_k: str | np.ndarray,
    type_v: str | np.ndarray,
    flash_attn: np.ndarray | bool | None = None,
) -> np.ndarray:
    """Work counts ``X[row, term]`` from per-row counts of the base terms (missing base terms count 0).

    ``flash_attn`` None: terms qualified with ``@fa`` count nothing (the configuration is unknown).
    """
    n = int(next(iter(counts.values())).shape[0]) if counts else 0
    cols = {"k": _as_str_array(type_k, n), "v": _as_str_array(type_v, n)}
    fa = None if flash_attn is None else np.broadcast_to(np.asarray(flash_attn, dtype=bool), (n,))
    base_values = {b: np.asarray(counts[b], dtype=np.float64) if b in counts else np.zeros(n) for b in BASE_TERMS}
    x = np.empty((n, len(terms)), dtype=np.float64)
    for j, term in enumerate(terms):
        base, conds = term_conditions(term)
        col = base_values[base]
        for key, value in conds.items():
            if key == "fa":
                col = col * (np.zeros(n, dtype=bool) if fa is None else (fa == (value == "on")))
            else:
                col = col * (cols[key] == value)
        x[:, j] = col
    return x


@dataclass(frozen=True)
class HostComputeModel:
    """Fitted host step-time model (see module docstring); frozen, vectorised."""

    terms: tuple[str, ...]
    serial_s: tuple[float, ...]  # seconds per unit of each term, independent of threads
    parallel_s: tuple[float, ...]  # seconds per unit of each term at one thread, divided by n_threads
    kv_pad_cells: int = DEFAULT_KV_PAD_CELLS
    k_types: tuple[str, ...] = ()  # K cache types the fit saw
    v_types: tuple[str, ...] = ()
    thread_counts: tuple[int, ...] = ()  # thread counts the fit saw
    n_ubatch: int = 0  # llama.cpp splits batches larger than this; 0 = never split
    flash_attn: tuple[bool, ...] = ()  # flash-attention settings the fit saw (() = not recorded: traced, off)
    swa_layer_fraction: float = 0.0  # fraction of the model's layers with a sliding window
    swa_window: int = 0  # their window (tokens); 0 = no sliding-window layers
    model_name: str = ""  # the model the fit is for (coefficients are per model)
    model_weight_bytes: int = 0
    fit_steps: int = 0
    fit_dropped_steps: int = 0
    fit_median_ape: float = float("nan")  # on the fitted steps (not held out)
    fit_p95_ape: float = float("nan")
    traces: tuple[str, ...] = ()
    notes: str = ""
    # llama.cpp's CPU weight repacking (extra buffer types) in the fitted runs: "on", "off", "" = not recorded.
    # Repacked weights change step times, so a model predicts runs with the same setting.
    weight_repack: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not (len(self.terms) == len(self.serial_s) == len(self.parallel_s)):
            raise LlamatierError(
                f"host model has {len(self.terms)} terms but {len(self.serial_s)} serial and "
                f"{len(self.parallel_s)} parallel coefficients: give one of each per term"
            )
        for t in self.terms:
            term_conditions(t)
        if self.kv_pad_cells < 1:
            raise LlamatierError(f"host model kv_pad_cells must be >= 1 (got {self.kv_pad_cells})")

    def check_inputs(self, type_k: str | np.ndarray, type_v: str | np.ndarray, n_threads: np.ndarray | int) -> None:
        """Raise LlamatierError when asked for a KV type or thread count the fit cannot speak for."""
        for which, types, seen in (("K", type_k, self.k_types), ("V", type_v, self.v_types)):
            asked = {types} if isinstance(types, str) else set(np.asarray(types, dtype=object).tolist())
            unseen = sorted(asked - set(seen)) if seen else []
            if unseen:
                raise LlamatierError(
                    f"host model was calibrated for {which} cache types {', '.join(seen)}, not "
                    f"{', '.join(unseen)}: run `llamatier calibrate` on traces recorded with "
                    f"--type-{which.lower()} {unseen[0]}"
                )
        threads = set(np.atleast_1d(np.asarray(n_threads)).astype(int).tolist())
        if len(self.thread_counts) == 1 and threads - set(self.thread_counts):
            raise LlamatierError(
                f"host model was calibrated at n_threads={self.thread_counts[0]} only, so it cannot "
                f"predict n_threads={sorted(threads - set(self.thread_counts))[0]}: calibrate on traces "
                "recorded with at least two thread counts"
            )

    def configuration(self, flash_attn: bool | None = None, swa_full: bool | None = None) -> str:
        """Which llama.cpp configuration predictions describe, in words."""
        fa = self.default_flash_attn() if flash_attn is None else flash_attn
        fa_txt = "on or off (say which)" if fa is None else ("on" if fa else "off")
        if self.swa_window <= 0:
            swa_txt = "no sliding-window layers"
        elif swa_full is None or swa_full:
            swa_txt = "sliding-window layers attend every cell (--swa-full, as traced)"
        else:
            swa_txt = f"sliding-window layers hold only their window ({self.swa_window} tokens, stock llama.cpp)"
        return f"flash attention {fa_txt}; {swa_txt}"

    def seen_flash_attn(self) -> tuple[bool, ...]:
        """Flash-attention settings the fit saw (a model without the record was fitted on traces: off)."""
        return self.flash_attn or (False,)

    def default_flash_attn(self) -> bool | None:
        """The flash-attention setting to predict when none is given: the one the fit saw, if only one."""
        seen = self.seen_flash_attn()
        return seen[0] if len(seen) == 1 else None

    def flash_attn_for(self, flash_attn: np.ndarray | bool | None, n: int) -> np.ndarray:
        """Per-row flash-attention setting to predict; LlamatierError for a setting the fit never saw."""
        fa_in = self.default_flash_attn() if flash_attn is None else flash_attn
        if fa_in is None:
            raise LlamatierError(
                "host model was fitted with flash attention both on and off: say which to predict (flash_attn)"
            )
        fa_arr = np.broadcast_to(np.asarray(fa_in, dtype=bool), (n,))
        seen = set(self.seen_flash_attn())
        unseen = set(fa_arr.tolist()) - seen
        if unseen:
            want = "on" if True in unseen else "off"
            have = "/".join("on" if v else "off" for v in sorted(seen))
            how = " (traced runs: llamatier traces with it off)" if not self.flash_attn else ""
            raise LlamatierError(
                f"host model was calibrated with flash attention {have} only{how}, not {want}: calibrate on "
                f"llama-bench rows (-fa {want}) or traces recorded with flash attention {want}"
            )
        return fa_arr

    def predict_step_s(
        self,
        *,
        n_tokens: np.ndarray,
        n_kv: np.ndarray,
        type_k: str | np.ndarray,
        type_v: str | np.ndarray,
        n_threads: np.ndarray | int,
        n_ctx: np.ndarray | int | None = None,
        n_ubatch: int | None = None,
        n_outputs: np.ndarray | int | None = None,
        flash_attn: np.ndarray | bool | None = None,
        swa_full: np.ndarray | bool = True,
    ) -> np.ndarray:
        """Predicted llama_decode wall time [s] per step.

        ``n_kv`` is the number of cells visible after the batch (pos0 + n_tokens,
        unpadded); the model pads it as llama.cpp does. Batches larger than
        ``n_ubatch`` (default: the value seen in calibration) are split into
        ubatches like llama.cpp does, each attending the cells filled so far.
        ``n_outputs`` is the number of logits rows per step (default 1, as in decode;
        prefill batches before the last compute none). ``flash_attn`` None: the setting the
        fit saw; ``swa_full`` False: sliding-window layers attend only their window (stock).
        """
        nt = np.atleast_1d(np.asarray(n_tokens, dtype=np.int64))
        nkv = np.atleast_1d(np.asarray(n_kv, dtype=np.int64))
        if nt.shape != nkv.shape:
            raise ValueError("n_tokens and n_kv must have the same shape")
        self.check_inputs(type_k, type_v, n_threads)
        n = nt.shape[0]
        fa_arr = self.flash_attn_for(flash_attn, n)
        thr = np.broadcast_to(np.asarray(n_threads, dtype=np.float64), (n,))
        tk = _as_str_array(type_k, n)
        tv = _as_str_array(type_v, n)
        outs = np.broadcast_to(np.asarray(1 if n_outputs is None else n_outputs, dtype=np.float64), (n,))
        ctx = None if n_ctx is None else np.broadcast_to(np.asarray(n_ctx, dtype=np.int64), (n,))
        swa = np.broadcast_to(np.asarray(swa_full, dtype=bool), (n,))
        ub = self.n_ubatch if n_ubatch is None else int(n_ubatch)
        owner = np.arange(n)
        if ub > 0 and n and nt.max() > ub:
            # split each step into ubatches of at most `ub` tokens, each attending cells filled so far
            n_ub = np.maximum(1, -(-nt // ub))
            owner = np.repeat(np.arange(n), n_ub)
            first = np.repeat(np.cumsum(n_ub) - n_ub, n_ub)
            j = np.arange(owner.size) - first
            pos0 = (nkv - nt)[owner]
            ub_tokens = np.minimum(ub, nt[owner] - j * ub)
            nt_u, nkv_u = ub_tokens, pos0 + j * ub + ub_tokens
            last = np.append(owner[1:] != owner[:-1], True)  # logits come from a step's last ubatch
            outs_u = np.where(last, outs[owner], 0.0)
        else:
            nt_u, nkv_u, outs_u = nt, nkv, outs
        attended = attended_cells(
            nkv_u, self.kv_pad_cells, None if ctx is None else ctx[owner], swa_full=swa[owner],
            swa_layer_fraction=self.swa_layer_fraction, swa_window=self.swa_window, n_ubatch=ub or 512,
        )
        x = design_matrix(
            self.terms, n_tokens=nt_u, n_kv_padded=attended, type_k=tk[owner], type_v=tv[owner], n_outputs=outs_u,
            flash_attn=fa_arr[owner],
        )
        per_ub = x @ np.asarray(self.serial_s) + (x / thr[owner][:, None]) @ np.asarray(self.parallel_s)
        return np.bincount(owner, weights=per_ub, minlength=n)

    def predict_counts_s(
        self,
        counts: Mapping[str, np.ndarray],
        *,
        type_k: str | np.ndarray,
        type_v: str | np.ndarray,
        n_threads: np.ndarray | int,
        flash_attn: np.ndarray | bool | None = None,
    ) -> np.ndarray:
        """Predicted wall time [s] of rows given as work counts of the base terms (no padding, no splitting).

        A row is whatever the counts describe: one ubatch, or a whole batch with
        its ubatches' counts summed (the model is linear in them).
        """
        n = int(next(iter(counts.values())).shape[0]) if counts else 0
        x = design_from_counts(self.terms, counts, type_k=type_k, type_v=type_v,
                               flash_attn=self.flash_attn_for(flash_attn, n))
        self.check_inputs(type_k, type_v, n_threads)
        thr = np.broadcast_to(np.asarray(n_threads, dtype=np.float64), (n,))
        return x @ np.asarray(self.serial_s) + (x / thr[:, None]) @ np.asarray(self.parallel_s)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra", None)
        return d
