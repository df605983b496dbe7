"""Per-position accuracy of a run against a reference run: KL divergence, top-1 agreement, NLL.

Logits are never held for a whole text (Gemma's vocabulary has 262,144 entries):
callers hand over the rows of one llama_decode at a time and keep only
per-position statistics.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_ROWS_PER_REDUCTION = 8  # logits rows reduced at once: 8 x 262k x 4 B = 8 MB for Gemma


class PositionStats:
    """Per-position statistics of one run under test against the reference."""

    def __init__(self, n_positions: int) -> None:
        self.kl = np.zeros(n_positions, dtype=np.float64)
        self.top1_agree = np.zeros(n_positions, dtype=bool)
        self.nll = np.zeros(n_positions, dtype=np.float64)
        self.decode_s = 0.0


def _logsumexp_rows(logits: np.ndarray, buf: np.ndarray) -> np.ndarray:
    """log(sum(exp(row))) per row, float64; leaves exp(row - max) in ``buf``."""
    row_max = logits.max(axis=1, keepdims=True)
    np.subtract(logits, row_max, out=buf)
    np.exp(buf, out=buf)
    return row_max[:, 0].astype(np.float64) + np.log(buf.sum(axis=1, dtype=np.float64))


def reduce_rows(
    ref_logits: np.ndarray,
    tests: list[tuple[np.ndarray, PositionStats]],
    targets: np.ndarray,
    pos0: int,
    nll_ref: np.ndarray,
) -> None:
    """Turn rows of logits (reference and each test run) for positions pos0.. into per-position statistics.

    With x the reference logits, y a test run's and p = softmax(x):
    KL(p || softmax(y)) = sum_j p_j (x_j - y_j) - logsumexp(x) + logsumexp(y).
    Element-wise work stays in float32 (one pass each), row sums accumulate in
    float64: about 1e-8 nats of error, where a float64 log-softmax is 10x slower.
    Identical rows give exactly 0.
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


def accuracy_summary(st: PositionStats, nll_ref: np.ndarray) -> dict[str, Any]:
    """KL mean (with standard error), median, p99, max; top-1 agreement; perplexity and its change.

    The perplexity change's standard error comes from the paired per-position NLL
    differences (delta method).
    """
    n = st.kl.size
    ppl = float(np.exp(st.nll.mean()))
    ppl_ref = float(np.exp(nll_ref.mean()))
    nll_delta = st.nll - nll_ref  # paired: the same positions under both runs
    nll_delta_stderr = float(nll_delta.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    agree = float(st.top1_agree.mean())
    return {
        "mean_kl": float(st.kl.mean()),
        "mean_kl_stderr": float(st.kl.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
        "median_kl": float(np.median(st.kl)),
        "p99_kl": float(np.percentile(st.kl, 99)),
        "max_kl": float(st.kl.max()),
        "top1_agreement": agree,
        "top1_agreement_stderr": float(np.sqrt(agree * (1 - agree) / n)),
        "ppl": ppl,
        "ppl_ref": ppl_ref,
        "ppl_change_pct": 100.0 * (ppl / ppl_ref - 1.0),
        "ppl_change_pct_stderr": 100.0 * (ppl / ppl_ref) * nll_delta_stderr,
    }
