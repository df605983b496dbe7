"""llama.cpp's ubatch split and attended-cell counts for batches of several sequences.

The run-length implementation in llamatier.serving.ubatch is checked against a
token-by-token transcription of ``llama_batch_allocr::split_equal(n_ubatch,
sequential=true)`` (src/llama-batch.cpp) and against counting every token's
visible cells one by one.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from llamatier.serving.ubatch import KVLayout, Segment, split_equal, ubatch_counts


def _split_equal_tokens(seq_of_token: list[int], n_ubatch: int) -> list[list[int]]:
    """Token-level transcription of split_equal (sequential, one sequence per token)."""
    used = [False] * len(seq_of_token)
    out = []
    while not all(used):
        cur: list[int] = []
        last = -1
        for i, s in enumerate(seq_of_token):
            if used[i] or s in cur:
                continue
            if not cur or s == last + 1:
                cur.append(s)
                last = s
        idx = {s: [i for i, q in enumerate(seq_of_token) if q == s and not used[i]] for s in cur}
        taken: dict[int, list[int]] = {s: [] for s in cur}
        while all(len(taken[s]) < len(idx[s]) for s in cur):
            for s in cur:
                i = idx[s][len(taken[s])]
                taken[s].append(i)
                used[i] = True
            if (len(taken[cur[0]]) + 1) * len(cur) > n_ubatch:
                break
        out.append([i for s in cur for i in taken[s]])
    return out


segments_st = st.lists(
    st.tuples(st.integers(0, 600), st.integers(1, 200), st.booleans()), min_size=1, max_size=5
).flatmap(lambda rows: st.permutations(list(range(len(rows)))).map(
    lambda perm: [Segment(seq=perm[i], ctx=c, n=n, out=o) for i, (c, n, o) in enumerate(rows)]))


@settings(max_examples=60, deadline=None)
@given(segs=segments_st, n_ubatch=st.sampled_from([1, 7, 64, 150]))
def test_split_equal_matches_the_token_level_transcription(segs: list[Segment], n_ubatch: int) -> None:
    tokens = [s.seq for s in segs for _ in range(s.n)]
    want = _split_equal_tokens(tokens, n_ubatch)
    got = split_equal(segs, n_ubatch)
    start = np.cumsum([0] + [s.n for s in segs])
    as_tokens = [[int(start[i]) + j + t for i, j, k in ub for t in range(k)] for ub in got]
    assert as_tokens == want


@settings(max_examples=60, deadline=None)
@given(segs=segments_st, flash=st.booleans(), swa_full=st.booleans())
def test_counts_equal_per_token_counting(segs: list[Segment], flash: bool, swa_full: bool) -> None:
    windows = (512, 512, 0, 128)
    lay = KVLayout(windows=windows, n_ctx_seq=2048, n_ubatch=512, swa_full=swa_full, flash_attn=flash)
    c = ubatch_counts(segs, lay)
    ubs = split_equal(segs, lay.n_ubatch)
    assert np.array_equal(c["token"], [sum(k for _, _, k in ub) for ub in ubs])
    for u, ub in enumerate(ubs):
        kv, tkv = 0.0, 0.0
        for w in windows:
            cells = 2048 if (w == 0 or swa_full) else lay.swa_cells
            used = [min(segs[i].ctx + j + k, cells) for i, j, k in ub]
            n_kv = max(min(cells, max(256, -(-x // 256) * 256)) for x in used)
            kv += n_kv / len(windows)
            for i, j, k in ub:
                for t in range(k):
                    p = segs[i].ctx + j + t
                    vis = p + 1 if w == 0 else min(p + 1, w)
                    tkv += (vis if flash else n_kv) / len(windows)
        assert c["kv"][u] == np.float64(kv) or abs(c["kv"][u] - kv) < 1e-9
        assert abs(c["token_kv"][u] - tkv) < 1e-6 * max(1.0, tkv)
        outs = sum(1 for i, j, k in ub if segs[i].out and j + k == segs[i].n)
        assert c["output"][u] == outs and c["logits_gemv_rows"][u] == outs % 4
        assert c["logits_gemm"][u] == (outs >= 4) and c["gemv_rows"][u] == sum(k for _, _, k in ub) % 4


def test_server_batch_with_gaps_in_slot_ids_runs_several_ubatches() -> None:
    # slots 0, 2, 3 generate, slot 1 starts a prompt: {0,1} one token each, {2,3}, then slot 1's prompt
    segs = [Segment(0, 300, 1, True), Segment(2, 500, 1, True), Segment(3, 700, 1, True), Segment(1, 0, 512, False)]
    ubs = split_equal(segs, 512)
    assert [[(segs[i].seq, k) for i, _, k in ub] for ub in ubs] == [[(0, 1), (1, 1)], [(2, 1), (3, 1)], [(1, 511)]]
    # one sequence: ubatches of n_ubatch tokens, as llama_decode splits a long prompt
    assert [k for ((_, _, k),) in split_equal([Segment(0, 0, 1100, True)], 512)] == [512, 512, 76]


def _host_model():
    from llamatier.hardware import HostComputeModel

    terms = ("step", "logits_gemv", "output", "token", "kv", "token_kv", "sample", "logits_gemm", "gemv")
    return HostComputeModel(terms=terms, serial_s=(2.8e-3, 1.2e-2, 3.8e-3, 1.6e-3, 1.3e-6, 7.5e-7, 5e-4, 1.4e-2, 1e-3),
                            parallel_s=(0.0,) * len(terms), k_types=("f16",), v_types=("f16",), thread_counts=(2,))


prefill_st = st.lists(st.tuples(st.integers(0, 3000), st.integers(1, 600)), min_size=1, max_size=5)


@settings(max_examples=80, deadline=None)
@given(rows=prefill_st)
def test_a_prefill_batch_costs_what_its_sequences_cost_with_their_own_contexts(rows: list[tuple[int, int]]) -> None:
    """Batched prefill: every token attends its own sequence's cells, never the batch's summed context."""
    lay = KVLayout(windows=(512, 512, 512, 512, 512, 0), n_ctx_seq=4096, flash_attn=True)
    hm = _host_model()

    def cost(segs: list[Segment]) -> float:
        c = ubatch_counts(segs, lay)
        return float(hm.predict_counts_s({k: v.sum(keepdims=True) for k, v in c.items()},
                                         type_k="f16", type_v="f16", n_threads=2)[0])

    together = [Segment(seq=i, ctx=c, n=n, out=False) for i, (c, n) in enumerate(rows)]
    alone = [[Segment(seq=0, ctx=c, n=n, out=False)] for c, n in rows]
    cb = ubatch_counts(together, lay)
    ca = [ubatch_counts(a, lay) for a in alone]
    # attention work and tokens add up exactly: each sequence with its own context
    assert abs(cb["token_kv"].sum() - sum(c["token_kv"].sum() for c in ca)) <= 1e-9 * cb["token_kv"].sum()
    assert cb["token"].sum() == sum(n for _, n in rows)
    assert cost(together) >= max(cost(a) for a in alone) - 1e-12
    # sequences llama.cpp runs in separate ubatches (ids not consecutive) cost exactly what they cost alone
    apart = [Segment(seq=2 * i, ctx=c, n=n, out=False) for i, (c, n) in enumerate(rows)]
    assert abs(cost(apart) - sum(cost(a) for a in alone)) <= 1e-9 * cost(apart)
