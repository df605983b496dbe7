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
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from llamatier.cost import CostModel, StepCosts
from llamatier.errors import LlamatierError
from llamatier.hardware.hostmodel import BASE_TERMS
from llamatier.serving.context import ServingContext
from llamatier.serving.plan import Plan
from llamatier.serving.policies.base import ServingPolicy
from llamatier.serving.requests import DECODE, DONE, PREFILL, WAITING, Request
from llamatier.serving.traffic import TrafficBuffer, TrafficCounter
from llamatier.serving.ubatch import KVLayout, Segment, ubatch_counts
from llamatier.tiers import N_LINKS, N_TIERS

if TYPE_CHECKING:
    from llamatier.hardware.hostmodel import HostComputeModel
    from llamatier.trace import Trace

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
        self.occ = np.zeros((k, N_TIERS))
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
    return _Simulation(ctx, policy, plan, check).run()


class _Simulation:
    """One serving run: arrivals, admission, batched steps (with preemption), costing in chunks."""

    def __init__(self, ctx: ServingContext, policy: ServingPolicy, plan: Plan, check: bool) -> None:
        self.t_wall = time.perf_counter()
        self.ctx, self.policy, self.plan, self.check = ctx, policy, plan, check
        self.sv = ctx.spec.server
        self.verdict = policy.start(ctx, plan)
        self.model, self.cost_notes = ctx.cost_model(policy.dram_reads)
        self.counter = TrafficCounter(ctx.bytes_per_token_layer, ctx.windows, ctx.kind_of_layer, ctx.block_tokens)
        self.measured = self.sv.prefill_cost == "measured"
        self.host_model = ctx.profile.compute.host_model if self.model.host_model_args is not None else None
        self.layout = ctx.kv_layout()
        if self.measured:  # measured prefill: each trace's own time, scaled by how the model's cost grows with context
            self.prefill_scale = np.array([_measured_scale(t, sh.prefill_s, self._prefill_alone_s)
                                           for t, sh in zip(ctx.traces, ctx.shapes, strict=True)])
        self.reqs = [
            Request(i, int(plan.req_session[i]), int(plan.req_turn[i]), int(plan.req_trace[i]),
                    int(plan.req_history_tokens[i] + plan.req_new_tokens[i]), int(plan.req_decode_steps[i]))
            for i in range(plan.n_requests)
        ]
        self.computed = np.zeros(plan.n_sessions, dtype=np.int64)  # tokens of each session's context ever computed
        self.prefix_done = False
        self.heap: list[tuple[float, int]] = []  # (arrival time, request) of requests known to come
        for u in range(plan.n_users):
            if plan.user_first[u] >= 0:
                r = self.reqs[int(plan.user_first[u])]
                r.arrival_s = float(plan.user_start_s[u])
                heapq.heappush(self.heap, (r.arrival_s, r.rid))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.t = 0.0
        self.n_done, self.step = 0, 0
        self.est_step_s: float | None = None  # slowest step of the last chunk
        self.late, self.late_s = 0, 0.0
        self.out_steps: list[dict[str, np.ndarray]] = []
        self.tok_rid: list[np.ndarray] = []
        self.tok_step: list[np.ndarray] = []

    def _prefill_alone_s(self, c0: int, k: int, out: bool) -> float:
        return _prefill_alone_s(self.ctx, self.model, self.counter, self.host_model, self.layout, c0, k, out)

    def run(self) -> ServeRecord:
        while self.n_done < self.plan.n_requests:
            self._arrivals()
            self.policy.tick(self.t)
            self.policy.order_waiting(self.waiting)
            self._admit()
            if not self.running:
                if self.heap:
                    self.t = max(self.t, self.heap[0][0])
                    continue
                raise LlamatierError(
                    f"policy {self.policy.name!r} admits none of {len(self.waiting)} waiting requests with nothing "
                    "running: a bug in the policy (or a request larger than every tier)"
                )
            k_max = self._chunk_steps()
            ch = _Chunk(k_max, self.ctx.n_layers, self.measured)
            rows = self._run_chunk(ch, k_max)
            if rows:
                self._cost_chunk(ch, rows)
        return self._record()

    # -- arrivals and admission -------------------------------------------------------------
    def _arrivals(self) -> None:
        """Requests due by now join the waiting queue."""
        while self.heap and self.heap[0][0] <= self.t:
            r = self.reqs[heapq.heappop(self.heap)[1]]
            self.waiting.append(r)
            self.policy.arrived(r, self.t)

    def _admit(self) -> None:
        """Admit waiting requests in order while the policy takes them and the batch has room."""
        while self.waiting and len(self.running) < self.sv.max_batch_seqs:
            r = self.waiting[0]
            known = max(int(self.computed[r.session]), self.plan.prefix_tokens if self.prefix_done else 0)
            r.known_tokens = min(known, r.prompt_tokens)
            got = self.policy.admit(r, self.t)
            if got is None:
                break
            self.waiting.popleft()
            got = int(got)
            r.reused_tokens += got
            r.known_total += r.known_tokens
            r.recomputed_tokens += max(0, r.known_tokens - got)
            r.ctx = got
            r.prefill_left = r.prompt_tokens - got
            r.phase = PREFILL
            r.admissions += 1
            sid = self.policy.seq_id(r)
            r.slot = -1 if sid is None else int(sid)
            if r.admit_step < 0:
                r.admit_step = self.step
            self.running.append(r)

    def _chunk_steps(self) -> int:
        """Steps to run before costing: end before the next known arrival is likely due."""
        heap, est = self.heap, self.est_step_s
        if heap and est:
            k_max = int(np.clip(CHUNK_SAFETY * (heap[0][0] - self.t) / est, 1, MAX_CHUNK_STEPS))
        elif heap:
            k_max = 1
        else:
            k_max = MAX_CHUNK_STEPS
        if heap and any(r.phase == PREFILL for r in self.running):
            k_max = 1  # a prefill step can be far slower than the last chunk's: cost it before going on
        return k_max

    # -- batched steps ----------------------------------------------------------------------
    def _run_chunk(self, ch: _Chunk, k_max: int) -> int:
        """Run up to ``k_max`` steps, recording their traffic in ``ch``; returns the steps run."""
        rows = 0
        for _ in range(k_max):
            batch, n = self.policy.form_batch(self.running, self.sv.max_batch_tokens)
            if not batch:
                break
            preempted = self.policy.make_room(batch, n)
            if preempted:
                batch, n = self._preempt(preempted, batch, n)
                if not batch:
                    break
            c = np.fromiter((r.ctx for r in batch), dtype=np.int64, count=len(batch))
            is_dec = np.fromiter((r.phase == DECODE for r in batch), dtype=bool, count=len(batch))
            self._record_step(ch, rows, batch, c, n, is_dec)
            finished = self._advance(batch, c, n, is_dec)
            for r in finished:
                ch.finished.append((r, rows))
            if self.check:
                self.policy.check()
                _check_capacity(self.ctx, self.policy, ch.occ[rows], self.step)
            self.step += 1
            rows += 1
            if preempted or (finished and self.waiting) or not self.running:
                break
            est = self.est_step_s
            if finished and est is not None and any(
                _next_think(self.plan, r) is not None and _next_think(self.plan, r) < est * (k_max - rows)
                for r in finished
            ):
                break
        return rows

    def _preempt(self, preempted: list[Request], batch: list[Request], n: np.ndarray) -> tuple[list[Request], np.ndarray]:
        """Preempted requests go back to the head of the queue; the rest of the batch runs."""
        gone = {v.rid for v in preempted}
        for v in preempted:
            self.running.remove(v)
            self.computed[v.session] = max(self.computed[v.session], v.ctx)
            if v.first_token_step >= 0:  # its prompt and the tokens generated so far are restored
                v.prompt_tokens = v.ctx
            v.phase, v.preemptions = WAITING, v.preemptions + 1
            v.ctx = 0
            self.waiting.appendleft(v)
        keep = [i for i, r in enumerate(batch) if r.rid not in gone]
        return [batch[i] for i in keep], n[keep]

    def _record_step(self, ch: _Chunk, row: int, batch: list[Request], c: np.ndarray, n: np.ndarray,
                     is_dec: np.ndarray) -> None:
        """The step's work into ``ch``: host-model counts, reads, writes and copies, measured prefill."""
        if self.host_model is not None:  # measured prefill: the host model prices the decode part only
            part = is_dec if self.measured else np.ones(len(batch), dtype=bool)
            _host_counts(ch, row, self.policy, self.layout, [r for r, p in zip(batch, part, strict=True) if p],
                         c[part], n[part])
        seg_end, seg_tier = self.policy.layout(batch, c, n)
        self.counter.fill(ch.buf, row, c, n, seg_end, seg_tier)
        mb, mc = self.policy.take_moves()
        ch.buf.move_bytes[row], ch.buf.move_count[row] = mb, mc
        if self.measured:
            ch.has_decode[row] = bool(is_dec.any())
            if is_dec.any():
                self.counter.fill(ch.dec_buf, row, c[is_dec], n[is_dec], seg_end[is_dec], seg_tier[is_dec])
            ch.dec_buf.move_bytes[row], ch.dec_buf.move_count[row] = mb, mc
            ch.measured_prefill_s[row] = sum(
                self.prefill_scale[r.trace] * self._prefill_alone_s(int(ci), int(ni), ni == r.prefill_left)
                for r, ci, ni, d in zip(batch, c, n, is_dec, strict=True) if not d
            )
        ch.occ[row] = self.policy.occupancy_bytes()
        ch.seqs[row] = len(batch)
        ch.decode[row] = int(is_dec.sum())
        if is_dec.any():
            ch.token_rids.append(np.fromiter((r.rid for r, d in zip(batch, is_dec, strict=True) if d), dtype=np.int64))
            ch.token_rows.append(np.full(int(is_dec.sum()), row, dtype=np.int64))

    def _advance(self, batch: list[Request], c: np.ndarray, n: np.ndarray, is_dec: np.ndarray) -> list[Request]:
        """Requests move on by the step's tokens; returns those that finished (released to the policy)."""
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
                        r.first_token_step = self.step
                    r.phase = DECODE
                    if r.decode_left == 0:
                        finished.append(r)
        plan = self.plan
        if not self.prefix_done and plan.prefix_tokens and bool((c + n >= plan.prefix_tokens).any()):
            self.prefix_done = True
        self.policy.commit(batch, c, n)
        for r in finished:
            r.phase, r.finish_step = DONE, self.step
            self.running.remove(r)
            self.computed[r.session] = max(self.computed[r.session], r.ctx)
            self.policy.release(r)
            self.n_done += 1
        return finished

    # -- costing ----------------------------------------------------------------------------
    def _step_times(self, ch: _Chunk, rows: int) -> tuple[np.ndarray, StepCosts]:
        """The chunk's step times (and the cost model's split): traffic costs, the host model, measured prefill."""
        model, host_model = self.model, self.host_model
        costs = model.evaluate(ch.buf.traffic(rows))
        step_s = costs.step_s
        host_s = None
        if host_model is not None:  # the host model per ubatch, each sequence with its own cells
            dram = self.ctx.profile.tier("dram")
            counts = dict(zip(BASE_TERMS, ch.host_counts[:rows].T, strict=True))
            copy_term = "copy_bytes" in host_model.terms  # else: a plain copy at DRAM bandwidth
            if copy_term:
                counts["copy_bytes"] = ch.host_copy_bytes[:rows]
            host_s = host_model.predict_counts_s(counts, **_host_types(model.host_model_args)) + (
                0.0 if copy_term else ch.host_copy_bytes[:rows] * (1.0 / dram.read_bytes_per_s + 1.0 / dram.write_bytes_per_s)
            )
        if self.measured:
            dc = model.evaluate(ch.dec_buf.traffic(rows))
            dec_s = dc.step_s if host_s is None else dc.step_s - dc.compute_s + host_s
            step_s = np.where(ch.has_decode[:rows], dec_s, 0.0) + ch.measured_prefill_s[:rows]
        elif host_s is not None:
            step_s = step_s - costs.compute_s + host_s
        return step_s, costs

    def _cost_chunk(self, ch: _Chunk, rows: int) -> None:
        """Costs the chunk's steps, schedules the next turns of finished requests, counts late admissions."""
        t, plan = self.t, self.plan
        step_s, costs = self._step_times(ch, rows)
        starts = t + np.concatenate([[0.0], np.cumsum(step_s)[:-1]])
        ends = starts + step_s
        first_step = self.step - rows
        for r, row in ch.finished:
            nxt = int(plan.req_next[r.rid])
            if nxt >= 0:
                self.reqs[nxt].arrival_s = float(ends[row] + plan.req_think_s[nxt])
                heapq.heappush(self.heap, (self.reqs[nxt].arrival_s, nxt))
        if self.heap and self.heap[0][0] < starts[-1]:
            for ta, _ in sorted(self.heap):
                if ta >= starts[-1]:
                    break
                first_ok = starts[np.searchsorted(starts, ta)] if ta > t else t
                self.late += 1
                self.late_s += float(ends[-1] - first_ok)
        self.out_steps.append({
            "start": starts, "step": step_s, "seqs": ch.seqs[:rows].copy(), "tokens": ch.buf.n_tokens[:rows].copy(),
            "decode": ch.decode[:rows].copy(), "occ": ch.occ[:rows].copy(), "link": costs.link_bytes,
            "compute": costs.compute_s, "hbm": costs.hbm_s, "host_attention": costs.host_attention_s,
            "link_s": costs.link_s, "host_layers": costs.host_layers_s, "energy": costs.energy_j,
        })
        if ch.token_rids:
            self.tok_rid.append(np.concatenate(ch.token_rids))
            self.tok_step.append(np.concatenate(ch.token_rows) + first_step)
        self.t = float(ends[-1])
        self.est_step_s = float(step_s.max())
        self.policy.observe(step_s, ch.seqs[:rows])

    def _record(self) -> ServeRecord:
        out = self.out_steps

        def cat(key: str, shape: tuple[int, ...] = ()) -> np.ndarray:
            return np.concatenate([o[key] for o in out]) if out else np.zeros((0, *shape))

        return ServeRecord(
            requests=self.reqs,
            step_start_s=cat("start"),
            step_s=cat("step"),
            step_seqs=cat("seqs").astype(np.int64),
            step_tokens=cat("tokens").astype(np.int64),
            step_decode=cat("decode").astype(np.int64),
            occupancy_bytes=cat("occ", (N_TIERS,)),
            link_bytes=cat("link", (N_LINKS, 2)),
            time_split_s={k: cat(k) for k in ("compute", "hbm", "host_attention", "link_s", "host_layers")},
            energy_j=cat("energy"),
            token_rid=np.concatenate(self.tok_rid) if self.tok_rid else np.zeros(0, dtype=np.int64),
            token_step=np.concatenate(self.tok_step) if self.tok_step else np.zeros(0, dtype=np.int64),
            late_admissions=self.late,
            late_admission_s=self.late_s,
            policy_verdict=self.verdict,
            notes=tuple(self.ctx.notes) + tuple(self.cost_notes),
            wall_s=time.perf_counter() - self.t_wall,
        )


def _next_think(plan: Plan, r: Request) -> float | None:
    nxt = int(plan.req_next[r.rid])
    return float(plan.req_think_s[nxt]) if nxt >= 0 else None


def _host_counts(ch: _Chunk, row: int, policy: ServingPolicy, layout: KVLayout, batch: list[Request],
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


def _prefill_alone_s(ctx: ServingContext, model: CostModel, counter: TrafficCounter,
                     host_model: HostComputeModel | None, layout: KVLayout, c0: int, k: int, out: bool) -> float:
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


def _measured_scale(trace: Trace, measured_s: float, alone: Callable[[int, int, bool], float]) -> float:
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
