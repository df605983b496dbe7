"""The serving engine: requests arrive, wait, are admitted by the policy, and run in batched steps.

Each step batches every decoding sequence (one token each) and then prefill
chunks, first come first served, up to ``max_batch_tokens`` tokens (continuous
batching with chunked prefill, as llama-server and vLLM do). The policy makes
room for the step's new KV and says where each sequence's KV lives; the step's
reads, writes and the policy's copies become one row of
:class:`llamatier.cost.StepTraffic`, and the replay's cost model turns rows into
step times. A request's first token comes at the end of its last prefill step,
then one token per decode step; when it finishes, its user's next turn
(or next session) arrives after the think time.

Steps are costed in chunks (the cost model is vectorised over steps): a chunk
ends before the next known arrival is likely due (half the time left at the
last chunk's slowest step rate), at a finish when requests wait, and at a
preemption. An arrival that lands inside a chunk anyway is admitted at the
chunk's end; how often and by how much is reported (``late_admissions``).
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from llamatier.errors import LlamatierError
from llamatier.hardware.hostmodel import BASE_TERMS
from llamatier.serving.context import ServingContext
from llamatier.serving.plan import Plan
from llamatier.serving.policies.base import ServingPolicy
from llamatier.serving.requests import DECODE, DONE, PREFILL, WAITING, Request
from llamatier.serving.traffic import TrafficBuffer, TrafficCounter
from llamatier.serving.ubatch import Segment, ubatch_counts

MAX_CHUNK_STEPS = 16
CHUNK_SAFETY = 0.5


@dataclass(frozen=True)
class ServeRecord:
    """Raw outcome of one serving run (the result module summarises it)."""

    requests: list[Request]
    step_start_s: np.ndarray  # [S]
    step_s: np.ndarray  # [S]
    step_seqs: np.ndarray  # int64 [S]: sequences in the batch
    step_tokens: np.ndarray  # int64 [S]: tokens in the batch
    step_decode: np.ndarray  # int64 [S]: decode tokens (output tokens) in the step
    occupancy_bytes: np.ndarray  # [S, 4]
    link_bytes: np.ndarray  # [S, 3, 2]: per link and direction (up, down)
    time_split_s: dict[str, np.ndarray]  # compute, hbm, host_attention, link, host_layers per step
    energy_j: np.ndarray  # [S]
    token_rid: np.ndarray  # int64 [T]: request of each decode token
    token_step: np.ndarray  # int64 [T]: step that produced it
    late_admissions: int
    late_admission_s: float  # summed extra wait of late admissions
    policy_verdict: str
    notes: tuple[str, ...]
    wall_s: float

    def step_end_s(self) -> np.ndarray:
        return self.step_start_s + self.step_s


class _Chunk:
    """Per-step records of one chunk, before costing."""

    def __init__(self, k: int, n_layers: int, measured: bool) -> None:
        self.buf = TrafficBuffer.empty(k, n_layers)
        self.dec_buf = TrafficBuffer.empty(k, n_layers) if measured else None
        self.has_decode = np.zeros(k, dtype=bool)
        self.measured_prefill_s = np.zeros(k)
        self.occ = np.zeros((k, 4))
        self.seqs = np.zeros(k, dtype=np.int64)
        self.decode = np.zeros(k, dtype=np.int64)
        self.first_rids: list[tuple[int, int]] = []
        self.token_rids: list[np.ndarray] = []
        self.token_rows: list[np.ndarray] = []
        self.finished: list[tuple[Request, int]] = []
        self.host_counts = np.zeros((k, len(BASE_TERMS)))  # host-model work counts per step (ubatches summed)
        self.host_copy_bytes = np.zeros(k)  # synchronous state copies in host memory (prompt cache, checkpoints)


def simulate(ctx: ServingContext, policy: ServingPolicy, plan: Plan, *, check: bool = False) -> ServeRecord:
    """Play ``plan`` on ``ctx`` under ``policy``; ``check`` verifies the policy's invariants every step."""
    t_wall = time.perf_counter()
    sv = ctx.spec.server
    verdict = policy.start(ctx, plan)
    model, cost_notes = ctx.cost_model(policy.dram_reads)
    counter = TrafficCounter(ctx.bytes_per_token_layer, ctx.windows, ctx.kind_of_layer, ctx.block_tokens)
    measured = sv.prefill_cost == "measured"
    host_model = ctx.profile.compute.host_model if model.host_model_args is not None else None
    layout = ctx.kv_layout()
    if measured:  # measured prefill: each trace's own time, scaled by how the model's cost grows with context
        def alone(c0: int, k: int, out: bool) -> float:
            return _prefill_alone_s(ctx, model, counter, host_model, layout, c0, k, out)
        prefill_scale = np.array([_measured_scale(t, sh.prefill_s, alone) for t, sh in zip(ctx.traces, ctx.shapes,
                                                                                             strict=True)])
    reqs = [
        Request(i, int(plan.req_session[i]), int(plan.req_turn[i]), int(plan.req_trace[i]),
                int(plan.req_history_tokens[i] + plan.req_new_tokens[i]), int(plan.req_decode_steps[i]))
        for i in range(plan.n_requests)
    ]
    computed = np.zeros(plan.n_sessions, dtype=np.int64)  # tokens of each session's context ever computed
    prefix_done = False
    heap: list[tuple[float, int]] = []
    for u in range(plan.n_users):
        if plan.user_first[u] >= 0:
            r = reqs[int(plan.user_first[u])]
            r.arrival_s = float(plan.user_start_s[u])
            heapq.heappush(heap, (r.arrival_s, r.rid))
    waiting: deque[Request] = deque()
    running: list[Request] = []
    t = 0.0
    n_done, step = 0, 0
    est_step_s: float | None = None
    late, late_s = 0, 0.0
    out_steps: list[dict[str, np.ndarray]] = []
    tok_rid: list[np.ndarray] = []
    tok_step: list[np.ndarray] = []
    R = plan.n_requests

    while n_done < R:
        while heap and heap[0][0] <= t:
            r = reqs[heapq.heappop(heap)[1]]
            waiting.append(r)
            policy.arrived(r, t)
        policy.tick(t)
        policy.order_waiting(waiting)
        while waiting and len(running) < sv.max_batch_seqs:
            r = waiting[0]
            known = max(int(computed[r.session]), plan.prefix_tokens if prefix_done else 0)
            r.known_tokens = min(known, r.prompt_tokens)
            got = policy.admit(r, t)
            if got is None:
                break
            waiting.popleft()
            got = int(got)
            r.reused_tokens += got
            r.known_total += r.known_tokens
            r.recomputed_tokens += max(0, r.known_tokens - got)
            r.ctx = got
            r.prefill_left = r.prompt_tokens - got
            r.phase = PREFILL
            r.admissions += 1
            sid = policy.seq_id(r)
            r.slot = -1 if sid is None else int(sid)
            if r.admit_step < 0:
                r.admit_step = step
            running.append(r)
        if not running:
            if heap:
                t = max(t, heap[0][0])
                continue
            raise LlamatierError(
                f"policy {policy.name!r} admits none of {len(waiting)} waiting requests with nothing running: "
                "a bug in the policy (or a request larger than every tier)"
            )
        if heap and est_step_s:
            k_max = int(np.clip(CHUNK_SAFETY * (heap[0][0] - t) / est_step_s, 1, MAX_CHUNK_STEPS))
        elif heap:
            k_max = 1
        else:
            k_max = MAX_CHUNK_STEPS
        if heap and any(r.phase == PREFILL for r in running):
            k_max = 1  # a prefill step can be far slower than the last chunk's: cost it before going on
        ch = _Chunk(k_max, ctx.n_layers, measured)
        rows = 0
        for _ in range(k_max):
            batch, n = policy.form_batch(running, sv.max_batch_tokens)
            if not batch:
                break
            preempted = policy.make_room(batch, n)
            if preempted:
                gone = {v.rid for v in preempted}
                for v in preempted:
                    running.remove(v)
                    computed[v.session] = max(computed[v.session], v.ctx)
                    if v.first_token_step >= 0:  # its prompt and the tokens generated so far are restored
                        v.prompt_tokens = v.ctx
                    v.phase, v.preemptions = WAITING, v.preemptions + 1
                    v.ctx = 0
                    waiting.appendleft(v)
                keep = [i for i, r in enumerate(batch) if r.rid not in gone]
                batch, n = [batch[i] for i in keep], n[keep]
                if not batch:
                    break
            c = np.fromiter((r.ctx for r in batch), dtype=np.int64, count=len(batch))
            is_dec = np.fromiter((r.phase == DECODE for r in batch), dtype=bool, count=len(batch))
            if host_model is not None:  # measured prefill: the host model prices the decode part only
                part = is_dec if measured else np.ones(len(batch), dtype=bool)
                _host_counts(ch, rows, policy, layout, [r for r, p in zip(batch, part, strict=True) if p],
                             c[part], n[part])
            seg_end, seg_tier = policy.layout(batch, c, n)
            counter.fill(ch.buf, rows, c, n, seg_end, seg_tier)
            mb, mc = policy.take_moves()
            ch.buf.move_bytes[rows], ch.buf.move_count[rows] = mb, mc
            if measured:
                ch.has_decode[rows] = bool(is_dec.any())
                if is_dec.any():
                    counter.fill(ch.dec_buf, rows, c[is_dec], n[is_dec], seg_end[is_dec], seg_tier[is_dec])
                ch.dec_buf.move_bytes[rows], ch.dec_buf.move_count[rows] = mb, mc
                ch.measured_prefill_s[rows] = sum(
                    prefill_scale[r.trace] * alone(int(ci), int(ni), ni == r.prefill_left)
                    for r, ci, ni, d in zip(batch, c, n, is_dec, strict=True) if not d
                )
            ch.occ[rows] = policy.occupancy_bytes()
            ch.seqs[rows] = len(batch)
            ch.decode[rows] = int(is_dec.sum())
            if is_dec.any():
                ch.token_rids.append(np.fromiter((r.rid for r, d in zip(batch, is_dec, strict=True) if d), dtype=np.int64))
                ch.token_rows.append(np.full(int(is_dec.sum()), rows, dtype=np.int64))
            finished: list[Request] = []
            for r, nn, d in zip(batch, n.tolist(), is_dec.tolist(), strict=True):
                r.ctx += nn
                if d:
                    r.decode_left -= 1
                    if r.decode_left == 0:
                        finished.append(r)
                else:
                    r.prefill_left -= nn
                    if r.prefill_left == 0:
                        if r.first_token_step < 0:
                            r.first_token_step = step
                        r.phase = DECODE
                        if r.decode_left == 0:
                            finished.append(r)
            if not prefix_done and plan.prefix_tokens and bool((c + n >= plan.prefix_tokens).any()):
                prefix_done = True
            policy.commit(batch, c, n)
            for r in finished:
                r.phase, r.finish_step = DONE, step
                running.remove(r)
                computed[r.session] = max(computed[r.session], r.ctx)
                policy.release(r)
                n_done += 1
                ch.finished.append((r, rows))
            if check:
                policy.check()
                _check_capacity(ctx, policy, ch.occ[rows], step)
            step += 1
            rows += 1
            if preempted or (finished and waiting) or not running:
                break
            if finished and est_step_s is not None and any(
                _next_think(plan, r) is not None and _next_think(plan, r) < est_step_s * (k_max - rows) for r in finished
            ):
                break
        if rows == 0:
            continue
        # -- cost the chunk ---------------------------------------------------------------
        costs = model.evaluate(ch.buf.traffic(rows))
        step_s = costs.step_s
        host_s = None
        if host_model is not None:  # the host model per ubatch, each sequence with its own cells
            dram = ctx.profile.tier("dram")
            counts = dict(zip(BASE_TERMS, ch.host_counts[:rows].T, strict=True))
            copy_term = "copy_bytes" in host_model.terms  # else: a plain copy at DRAM bandwidth
            if copy_term:
                counts["copy_bytes"] = ch.host_copy_bytes[:rows]
            host_s = host_model.predict_counts_s(counts, **_host_types(model.host_model_args)) + (
                0.0 if copy_term else ch.host_copy_bytes[:rows] * (1.0 / dram.read_bytes_per_s + 1.0 / dram.write_bytes_per_s)
            )
        if measured:
            dc = model.evaluate(ch.dec_buf.traffic(rows))
            dec_s = dc.step_s if host_s is None else dc.step_s - dc.compute_s + host_s
            step_s = np.where(ch.has_decode[:rows], dec_s, 0.0) + ch.measured_prefill_s[:rows]
        elif host_s is not None:
            step_s = step_s - costs.compute_s + host_s
        starts = t + np.concatenate([[0.0], np.cumsum(step_s)[:-1]])
        ends = starts + step_s
        first_step = step - rows
        for r, row in ch.finished:
            nxt = int(plan.req_next[r.rid])
            if nxt >= 0:
                reqs[nxt].arrival_s = float(ends[row] + plan.req_think_s[nxt])
                heapq.heappush(heap, (reqs[nxt].arrival_s, nxt))
        if heap and heap[0][0] < starts[-1]:
            for ta, _ in sorted(heap):
                if ta >= starts[-1]:
                    break
                first_ok = starts[np.searchsorted(starts, ta)] if ta > t else t
                late += 1
                late_s += float(ends[-1] - first_ok)
        out_steps.append({
            "start": starts, "step": step_s, "seqs": ch.seqs[:rows].copy(), "tokens": ch.buf.n_tokens[:rows].copy(),
            "decode": ch.decode[:rows].copy(), "occ": ch.occ[:rows].copy(), "link": costs.link_bytes,
            "compute": costs.compute_s, "hbm": costs.hbm_s, "host_attention": costs.host_attention_s,
            "link_s": costs.link_s, "host_layers": costs.host_layers_s, "energy": costs.energy_j,
        })
        if ch.token_rids:
            tok_rid.append(np.concatenate(ch.token_rids))
            tok_step.append(np.concatenate(ch.token_rows) + first_step)
        t = float(ends[-1])
        est_step_s = float(step_s.max())
        policy.observe(step_s, ch.seqs[:rows])

    def cat(key: str, shape: tuple[int, ...] = ()) -> np.ndarray:
        return np.concatenate([o[key] for o in out_steps]) if out_steps else np.zeros((0, *shape))

    return ServeRecord(
        requests=reqs,
        step_start_s=cat("start"),
        step_s=cat("step"),
        step_seqs=cat("seqs").astype(np.int64),
        step_tokens=cat("tokens").astype(np.int64),
        step_decode=cat("decode").astype(np.int64),
        occupancy_bytes=cat("occ", (4,)),
        link_bytes=cat("link", (3, 2)),
        time_split_s={k: cat(k) for k in ("compute", "hbm", "host_attention", "link_s", "host_layers")},
        energy_j=cat("energy"),
        token_rid=np.concatenate(tok_rid) if tok_rid else np.zeros(0, dtype=np.int64),
        token_step=np.concatenate(tok_step) if tok_step else np.zeros(0, dtype=np.int64),
        late_admissions=late,
        late_admission_s=late_s,
        policy_verdict=verdict,
        notes=tuple(ctx.notes) + tuple(cost_notes),
        wall_s=time.perf_counter() - t_wall,
    )


def _next_think(plan: Plan, r: Request) -> float | None:
    nxt = int(plan.req_next[r.rid])
    return float(plan.req_think_s[nxt]) if nxt >= 0 else None


def _host_counts(ch: _Chunk, row: int, policy: ServingPolicy, layout, batch: list[Request],  # noqa: ANN001
                 c: np.ndarray, n: np.ndarray) -> None:
    """One step's host-model work counts: llama.cpp's ubatches of the batch, each sequence with its own cells."""
    segs = []
    outs = 0
    for i, (r, ci, ni) in enumerate(zip(batch, c.tolist(), n.tolist(), strict=True)):
        out = r.phase == DECODE or ni == r.prefill_left  # a decode token, or the prompt's last chunk
        outs += out
        seq = policy.seq_id(r)
        segs.append(Segment(seq=i if seq is None else seq, ctx=int(ci), n=int(ni), out=out))
    counts = ubatch_counts(segs, layout)
    for j, term in enumerate(BASE_TERMS):
        if term in counts:
            ch.host_counts[row, j] = float(counts[term].sum())
    ch.host_counts[row, BASE_TERMS.index("sample")] = outs  # the server samples each output after the step
    ch.host_copy_bytes[row] = policy.take_host_copy_bytes()


def _prefill_alone_s(ctx: ServingContext, model, counter: TrafficCounter, host_model, layout,  # noqa: ANN001
                     c0: int, k: int, out: bool) -> float:
    """The model's time for one sequence's prompt chunk of ``k`` tokens after ``c0``, alone in a step."""
    if host_model is not None:
        counts = ubatch_counts([Segment(seq=0, ctx=c0, n=k, out=out)], layout)
        return float(host_model.predict_counts_s({t: v.sum(keepdims=True) for t, v in counts.items()},
                                                 **_host_types(model.host_model_args))[0])
    buf = TrafficBuffer.empty(1, ctx.n_layers)
    fast = 1 if ctx.host_only else 0
    end = np.full((1, 3), c0 + k, dtype=np.int64)
    counter.fill(buf, 0, np.array([c0]), np.array([k]), end, np.full((1, 3), fast, dtype=np.int64))
    return float(model.evaluate(buf.traffic(1)).step_s[0])


def _measured_scale(trace, measured_s: float, alone) -> float:  # noqa: ANN001
    """A trace's measured prefill time over the model's time for the same prompt chunks."""
    dec = trace.is_decode
    pos0 = trace.steps["pos0"].to_numpy()[~dec]
    nt = trace.steps["n_tokens"].to_numpy()[~dec]
    out = (trace.steps["token_out"].to_numpy() >= 0)[~dec]
    model_s = sum(alone(int(p), int(k), bool(o)) for p, k, o in zip(pos0, nt, out, strict=True))
    return measured_s / model_s if model_s > 0 else 0.0


def _host_types(args: dict) -> dict:
    return {"type_k": args["type_k"], "type_v": args["type_v"], "n_threads": args["n_threads"]}


def _check_capacity(ctx: ServingContext, policy: ServingPolicy, occ: np.ndarray, step: int) -> None:
    over = occ > ctx.capacity_bytes * (1 + 1e-9) + 1.0
    if over.any():
        raise AssertionError(f"policy {policy.name} over a tier's budget at step {step}: {occ} > {ctx.capacity_bytes}")
