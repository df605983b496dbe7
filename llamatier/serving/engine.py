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
from llamatier.serving.context import ServingContext
from llamatier.serving.plan import Plan
from llamatier.serving.policies.base import ServingPolicy
from llamatier.serving.requests import DECODE, DONE, PREFILL, WAITING, Request
from llamatier.serving.traffic import TrafficBuffer, TrafficCounter

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


def simulate(ctx: ServingContext, policy: ServingPolicy, plan: Plan, *, check: bool = False) -> ServeRecord:
    """Play ``plan`` on ``ctx`` under ``policy``; ``check`` verifies the policy's invariants every step."""
    t_wall = time.perf_counter()
    sv = ctx.spec.server
    verdict = policy.start(ctx, plan)
    model, cost_notes = ctx.cost_model(policy.dram_reads)
    counter = TrafficCounter(ctx.bytes_per_token_layer, ctx.windows, ctx.kind_of_layer, ctx.block_tokens)
    measured = sv.prefill_cost == "measured"
    per_token_prefill_s = np.array([s.prefill_s_per_token for s in ctx.shapes])
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
            batch, n = _form_batch(running, sv.max_batch_tokens)
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
            seg_end, seg_tier = policy.layout(batch, c, n)
            counter.fill(ch.buf, rows, c, n, seg_end, seg_tier)
            mb, mc = policy.take_moves()
            ch.buf.move_bytes[rows], ch.buf.move_count[rows] = mb, mc
            is_dec = np.fromiter((r.phase == DECODE for r in batch), dtype=bool, count=len(batch))
            if measured:
                ch.has_decode[rows] = bool(is_dec.any())
                if is_dec.any():
                    counter.fill(ch.dec_buf, rows, c[is_dec], n[is_dec], seg_end[is_dec], seg_tier[is_dec])
                ch.dec_buf.move_bytes[rows], ch.dec_buf.move_count[rows] = mb, mc
                pre = ~is_dec
                ch.measured_prefill_s[rows] = float(
                    (n[pre] * per_token_prefill_s[[r.trace for r, p in zip(batch, pre, strict=True) if p]]).sum()
                ) if pre.any() else 0.0
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
        if measured:
            dc = model.evaluate(ch.dec_buf.traffic(rows))
            step_s = np.where(ch.has_decode[:rows], dc.step_s, 0.0) + ch.measured_prefill_s[:rows]
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


def _form_batch(running: list[Request], max_tokens: int) -> tuple[list[Request], np.ndarray]:
    """Decoding sequences first (one token each), then prefill chunks in admission order."""
    batch: list[Request] = []
    n: list[int] = []
    budget = max_tokens
    for r in running:
        if r.phase == DECODE and budget > 0:
            batch.append(r)
            n.append(1)
            budget -= 1
    for r in running:
        if budget <= 0:
            break
        if r.phase == PREFILL:
            k = min(r.prefill_left, budget)
            batch.append(r)
            n.append(k)
            budget -= k
    return batch, np.asarray(n, dtype=np.int64)


def _check_capacity(ctx: ServingContext, policy: ServingPolicy, occ: np.ndarray, step: int) -> None:
    over = occ > ctx.capacity_bytes * (1 + 1e-9) + 1.0
    if over.any():
        raise AssertionError(f"policy {policy.name} over a tier's budget at step {step}: {occ} > {ctx.capacity_bytes}")
