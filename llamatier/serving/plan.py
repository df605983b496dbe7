"""Seeded generation of sessions and requests from a workload and its traces.

Each user draws (from its own random stream, so adding users never changes
the draws of existing ones) its sessions: a number of turns, and per turn a trace; the turn's
new prompt tokens and output length are that trace's prompt length and decode
steps. The first turn also carries the shared system-prompt prefix. A turn's
prompt is the session's whole history (prefix, earlier prompts and outputs)
plus its new tokens, as a chat server sees it. Turns that would overflow the
per-sequence context (``slot_context_tokens``) are dropped, with the session's
later turns, and counted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llamatier.errors import LlamatierError
from llamatier.serving.workload import WorkloadSpec
from llamatier.trace import Trace
from llamatier.units import format_bytes

OPEN_LOOP_STREAM = 2**31  # random stream of open-loop arrival times (sessions use streams 0..n-1)


@dataclass(frozen=True)
class TraceShape:
    """What a request takes from a trace: lengths and measured times."""

    label: str
    prompt_tokens: int  # context after the last prefill step
    decode_steps: int  # decode steps after the prompt (one output token each)
    prefill_s: float  # measured wall time of the prefill steps (llama_decode), on the tracing host
    decode_s: float  # measured wall time of the decode steps

    @property
    def prefill_s_per_token(self) -> float:
        return self.prefill_s / self.prompt_tokens if self.prompt_tokens else 0.0


def trace_shape(trace: Trace, label: str = "") -> TraceShape:
    """Prompt length, decode steps and measured times of a trace."""
    dec = trace.is_decode
    ctx = trace.context_tokens
    if dec.all():
        raise LlamatierError(f"trace {label or trace.path} has no prefill step: record it with a prompt")
    last_prefill = int(np.flatnonzero(~dec)[-1])
    times = trace.steps["decode_s"].to_numpy().astype(np.float64)
    return TraceShape(
        label=label or str(trace.path or trace.model.name),
        prompt_tokens=int(ctx[last_prefill]),
        decode_steps=int(dec[last_prefill + 1 :].sum()),
        prefill_s=float(times[~dec].sum()),
        decode_s=float(times[dec].sum()),
    )


@dataclass(frozen=True)
class Plan:
    """Every user, session and request of a run (numpy arrays; requests grouped by user, in order)."""

    user_start_s: np.ndarray  # float64 [U]: arrival of each user's first request
    user_first: np.ndarray  # int64 [U]: index of the user's first request (-1: none fits)
    session_turns: np.ndarray  # int64 [N]: turns kept per session (after dropping those that overflow)
    req_user: np.ndarray  # int64 [R]
    req_session: np.ndarray  # int64 [R]
    req_turn: np.ndarray  # int64 [R]
    req_trace: np.ndarray  # int64 [R]: index into the workload's traces
    req_new_tokens: np.ndarray  # int64 [R]: prompt tokens new in this turn (turn 0 includes the shared prefix)
    req_history_tokens: np.ndarray  # int64 [R]: tokens of earlier turns (prefix included) the prompt starts with
    req_decode_steps: np.ndarray  # int64 [R]
    req_think_s: np.ndarray  # float64 [R]: think time after the user's previous request finished (0: first)
    req_next: np.ndarray  # int64 [R]: the user's next request (-1: none)
    prefix_tokens: int
    dropped_turns: int  # turns dropped because the session's context would exceed slot_context_tokens

    @property
    def n_users(self) -> int:
        return int(self.user_start_s.shape[0])

    @property
    def n_sessions(self) -> int:
        return int(self.session_turns.shape[0])

    @property
    def n_requests(self) -> int:
        return int(self.req_session.shape[0])

    @property
    def req_prompt_tokens(self) -> np.ndarray:
        return self.req_history_tokens + self.req_new_tokens


def make_plan(spec: WorkloadSpec, shapes: list[TraceShape]) -> Plan:
    """Draw users, sessions and requests for ``spec`` (deterministic for a given seed).

    Closed loop: ``users.count`` users each run ``sessions_per_user`` sessions
    back to back (a think time before every turn but their first). Open loop:
    every session is its own user, arriving as a Poisson process.
    """
    if not shapes:
        raise LlamatierError("a workload needs at least one trace")
    n_users = spec.users if spec.closed_loop else int(spec.sessions or 0)
    per_user = spec.sessions_per_user if spec.closed_loop else 1
    limit = spec.server.slot_context_tokens
    lo, hi = spec.turns
    if spec.closed_loop:
        ramp = spec.ramp_s if spec.ramp_s is not None else spec.think_time_s
        starts = np.empty(n_users)
    else:
        gaps = np.random.default_rng([spec.seed, OPEN_LOOP_STREAM]).exponential(1.0 / float(spec.arrival_rate_per_s), n_users)
        starts = np.cumsum(gaps) - gaps[0]  # first session at t = 0
    prompt = np.array([s.prompt_tokens for s in shapes], dtype=np.int64)
    decode = np.array([s.decode_steps for s in shapes], dtype=np.int64)
    rows: list[tuple[int, int, int, int, int, int, int, float]] = []
    first = np.full(n_users, -1, dtype=np.int64)
    kept = np.zeros(n_users * per_user, dtype=np.int64)
    dropped = 0
    for u in range(n_users):
        rng = np.random.default_rng([spec.seed, u])
        if spec.closed_loop:
            starts[u] = rng.uniform(0.0, ramp) if ramp > 0 else 0.0
        pending_think = 0.0
        for j in range(per_user):
            sid = u * per_user + j
            n_turns = int(rng.integers(lo, hi + 1))
            tr = rng.integers(0, len(shapes), n_turns)
            if spec.think_time_distribution == "exponential" and spec.think_time_s > 0:
                think = rng.exponential(spec.think_time_s, n_turns)
            else:
                think = np.full(n_turns, spec.think_time_s)
            history = 0
            for k in range(n_turns):
                new = int(prompt[tr[k]]) + (spec.prefix_tokens if k == 0 else 0)
                if history + new + int(decode[tr[k]]) > limit:
                    dropped += n_turns - k
                    break
                if first[u] < 0:
                    first[u] = len(rows)
                    pending_think = 0.0
                else:
                    pending_think += float(think[k])
                rows.append((u, sid, k, int(tr[k]), new, history, int(decode[tr[k]]), pending_think))
                pending_think = 0.0
                history += new + int(decode[tr[k]])
                kept[sid] += 1
    if not rows:
        raise LlamatierError(
            f"no request fits server.slot_context_tokens = {limit}: the traces' prompt + output "
            f"({int((prompt + decode).min())} tokens at least) plus the prefix do not fit; raise it"
        )
    cols = list(zip(*rows, strict=True))
    req_user = np.array(cols[0], dtype=np.int64)
    nxt = np.arange(1, len(rows) + 1, dtype=np.int64)
    nxt[np.r_[req_user[1:] != req_user[:-1], True]] = -1
    return Plan(
        user_start_s=starts,
        user_first=first,
        session_turns=kept,
        req_user=req_user,
        req_session=np.array(cols[1], dtype=np.int64),
        req_turn=np.array(cols[2], dtype=np.int64),
        req_trace=np.array(cols[3], dtype=np.int64),
        req_new_tokens=np.array(cols[4], dtype=np.int64),
        req_history_tokens=np.array(cols[5], dtype=np.int64),
        req_decode_steps=np.array(cols[6], dtype=np.int64),
        req_think_s=np.array(cols[7], dtype=np.float64),
        req_next=nxt,
        prefix_tokens=int(spec.prefix_tokens),
        dropped_turns=dropped,
    )


# What one request and one output token cost in memory while a policy plays a run (its request
# objects, per-step records and per-token arrays). Measured with serve-replay on
# examples/workloads/chat-llama3-8b-a100.toml (100 and 600 users, vllm-lru and vllm-arc: about
# 38 KB per request of 256 output tokens, 150 B per token); rounded up to about twice that.
REQUEST_BYTES = 8 * 1024
TOKEN_BYTES = 256
FIT_FRACTION = 0.8  # of the memory available now


def run_size(spec: WorkloadSpec, shapes: list[TraceShape]) -> tuple[int, int]:
    """(requests, output tokens) a run of ``spec`` plays at most (before turns that overflow are dropped)."""
    n_sessions = spec.n_sessions
    lo, hi = spec.turns
    requests = int(np.ceil(n_sessions * (lo + hi) / 2))
    decode = float(np.mean([s.decode_steps for s in shapes])) if shapes else 0.0
    return requests, int(np.ceil(requests * decode))


def available_memory_bytes() -> int | None:
    """Memory this machine can give a new allocation now (Linux MemAvailable), None when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_run_fits(spec: WorkloadSpec, shapes: list[TraceShape], *, runs: int = 1, available: int | None = None) -> int:
    """Estimate the memory ``runs`` runs of ``spec`` hold at once; refuse with one line what will not fit.

    Returns the estimate in bytes. ``available`` defaults to the memory available now.
    """
    requests, tokens = run_size(spec, shapes)
    need = runs * (requests * REQUEST_BYTES + tokens * TOKEN_BYTES)
    have = available if available is not None else available_memory_bytes()
    if have is not None and need > FIT_FRACTION * have:
        who = f"{spec.users:,} users" if spec.closed_loop else f"{spec.n_sessions:,} sessions"
        raise LlamatierError(
            f"this run would need about {format_bytes(need)} of memory ({who}: up to {requests:,} requests, "
            f"{tokens:,} output tokens{f', {runs} policies' if runs > 1 else ''}) but {format_bytes(have)} is "
            "available: lower users.count (or --users / --max-users), users.sessions or sessions.turns"
        )
    return need
