"""Play a serving workload's plan against a real server: closed-loop users, multi-turn sessions.

The plan is the one ``serve-replay`` simulates (:func:`llamatier.serving.make_plan`):
the same users, start times, sessions, turns, prompt lengths, output lengths
and think times. Prompts are token ids: a shared prefix common to every
session, then per turn new ids drawn from a seeded stream (distinct per
session, so sessions share nothing but the prefix). A turn's prompt is the
session's previous prompt, its output without the last token (what the
server's slot holds after the request: the last sampled token is never
decoded) and the turn's new tokens, so prompt lengths equal the plan's and a
slot that kept the session's state can reuse all of it.

Each user runs in its own thread: it sends its request, streams the answer,
waits its think time after the last token, and sends the next. A run is
bounded by a deadline; a request that fails ends its user's run (recorded).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from llamatier.serverbench.client import Completion, stream_completion
from llamatier.serving.plan import Plan

DEFAULT_TOKEN_RANGE = (1000, 200000)  # ordinary text tokens of Gemma 3's 262K vocabulary (no control tokens)


@dataclass
class PlayedRequest:
    """One request of the plan as the real server answered it (times relative to the run's start)."""

    rid: int
    user: int
    session: int
    turn: int
    prompt_tokens: int
    n_predict: int
    arrival_s: float = float("nan")
    completion: Completion | None = None
    skipped: str | None = None  # why it never ran (deadline, an earlier error)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rid": self.rid, "user": self.user, "session": self.session, "turn": self.turn,
            "prompt_tokens": self.prompt_tokens, "n_predict": self.n_predict, "arrival_s": self.arrival_s,
            "completion": self.completion.to_dict() if self.completion is not None else None,
            "skipped": self.skipped,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> PlayedRequest:
        c = d.get("completion")
        return PlayedRequest(
            rid=int(d["rid"]), user=int(d["user"]), session=int(d["session"]), turn=int(d["turn"]),
            prompt_tokens=int(d["prompt_tokens"]), n_predict=int(d["n_predict"]),
            arrival_s=float(d["arrival_s"]), completion=Completion.from_dict(c) if c else None,
            skipped=d.get("skipped"),
        )


def prefix_ids(plan: Plan, seed: int, token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE) -> list[int]:
    """The shared system-prompt tokens (the same for every session)."""
    rng = np.random.default_rng([seed, 2**32 - 1])
    return rng.integers(token_range[0], token_range[1], plan.prefix_tokens).tolist()


def new_ids(plan: Plan, rid: int, seed: int, token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE) -> list[int]:
    """Request ``rid``'s new tokens after the history (the prefix excluded on a session's first turn)."""
    n = int(plan.req_new_tokens[rid]) - (plan.prefix_tokens if int(plan.req_turn[rid]) == 0 else 0)
    rng = np.random.default_rng([seed, int(plan.req_session[rid]), int(plan.req_turn[rid])])
    return rng.integers(token_range[0], token_range[1], n).tolist()


def play(
    plan: Plan,
    host: str,
    port: int,
    *,
    seed: int = 0,
    deadline_s: float = 600.0,
    request_timeout_s: float = 120.0,
    options: dict[str, Any] | None = None,
    token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE,
    send: Callable[..., Completion] = stream_completion,
) -> list[PlayedRequest]:
    """Run every user of ``plan`` against the server at host:port; one record per planned request."""
    played = [
        PlayedRequest(rid=i, user=int(plan.req_user[i]), session=int(plan.req_session[i]), turn=int(plan.req_turn[i]),
                      prompt_tokens=int(plan.req_prompt_tokens[i]), n_predict=int(plan.req_decode_steps[i]) + 1)
        for i in range(plan.n_requests)
    ]
    prefix = prefix_ids(plan, seed, token_range)
    t0 = time.monotonic()
    end = t0 + deadline_s

    def user_loop(u: int) -> None:
        rid = int(plan.user_first[u])
        if rid < 0:
            return
        due = t0 + float(plan.user_start_s[u])
        history: list[int] = []
        while rid >= 0:
            rec = played[rid]
            now = time.monotonic()
            if due > end or now > end:
                _skip_rest(played, plan, rid, f"run deadline of {deadline_s:g} s reached")
                return
            if due > now:
                time.sleep(due - now)
            if int(plan.req_turn[rid]) == 0:
                history = list(prefix)
            prompt = history + new_ids(plan, rid, seed, token_range)
            if len(prompt) != rec.prompt_tokens:  # the plan and the scripts disagree: a bug here, not the server's
                raise AssertionError(f"request {rid}: prompt of {len(prompt)} tokens, planned {rec.prompt_tokens}")
            rec.arrival_s = time.monotonic() - t0
            left = max(1.0, min(request_timeout_s, end - time.monotonic()))
            c = send(host, port, prompt, rec.n_predict, timeout_s=left, options=options)
            rec.completion = _rebase(c, t0)
            if not c.ok or len(c.tokens) != rec.n_predict:
                why = c.error or f"{len(c.tokens)} tokens instead of {rec.n_predict}"
                _skip_rest(played, plan, int(plan.req_next[rid]), f"an earlier request of this user failed: {why}")
                return
            history = prompt + list(c.tokens[:-1])
            nxt = int(plan.req_next[rid])
            if nxt >= 0:
                due = c.token_s[-1] + float(plan.req_think_s[nxt])
            rid = nxt

    threads = [threading.Thread(target=user_loop, args=(u,), daemon=True) for u in range(plan.n_users)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=max(0.0, end - time.monotonic()) + request_timeout_s + 5.0)
    for rec in played:
        if rec.completion is None and rec.skipped is None:
            rec.skipped = "still running when the run ended"
    return played


def _skip_rest(played: list[PlayedRequest], plan: Plan, rid: int, why: str) -> None:
    while rid >= 0:
        played[rid].skipped = why
        rid = int(plan.req_next[rid])


def _rebase(c: Completion, t0: float) -> Completion:
    """Times relative to the run's start."""
    return Completion(
        sent_s=c.sent_s - t0, token_s=tuple(t - t0 for t in c.token_s), tokens=c.tokens, done_s=c.done_s - t0,
        timings=c.timings, tokens_evaluated=c.tokens_evaluated, tokens_cached=c.tokens_cached,
        id_slot=c.id_slot, error=c.error,
    )
