"""The live state of one request (one turn of a session) while a serving run plays it."""

from __future__ import annotations

import numpy as np

WAITING, PREFILL, DECODE, DONE = 0, 1, 2, 3


class Request:
    """One turn: arrives, waits, is admitted, prefills, decodes, finishes (possibly preempted on the way).

    ``ctx`` is the number of tokens whose KV the sequence holds now; the prompt
    (``prompt_tokens``: the session's history plus this turn's new tokens) must
    be in KV before the first output token. Policies read ``session``, ``ctx``,
    ``prompt_tokens`` and write nothing here except through the engine's calls.
    """

    __slots__ = (
        "rid",
        "session",
        "turn",
        "trace",
        "arrival_s",
        "prompt_tokens",
        "orig_prompt_tokens",
        "decode_total",
        "decode_left",
        "ctx",
        "prefill_left",
        "phase",
        "admit_step",
        "first_token_step",
        "finish_step",
        "reused_tokens",
        "reused_by_tier",
        "recomputed_tokens",
        "known_tokens",
        "known_total",
        "preemptions",
        "admissions",
        "slot",
    )

    def __init__(self, rid: int, session: int, turn: int, trace: int, prompt_tokens: int, decode_total: int) -> None:
        self.rid = rid
        self.session = session
        self.turn = turn
        self.trace = trace
        self.arrival_s = float("nan")
        self.prompt_tokens = int(prompt_tokens)  # tokens to have in KV before going on (after a preemption: all so far)
        self.orig_prompt_tokens = int(prompt_tokens)  # the turn's prompt: history + new tokens
        self.decode_total = int(decode_total)
        self.decode_left = int(decode_total)
        self.ctx = 0
        self.prefill_left = 0
        self.phase = WAITING
        self.admit_step = -1
        self.first_token_step = -1
        self.finish_step = -1
        self.reused_tokens = 0  # prompt tokens whose KV was found (summed over admissions)
        self.reused_by_tier = np.zeros(4, dtype=np.int64)
        self.recomputed_tokens = 0  # tokens computed before (by this session, or the shared prefix) and computed again
        self.known_tokens = 0  # tokens of the prompt computed before this admission (reused + recomputed)
        self.known_total = 0  # known_tokens summed over admissions (= reused_tokens + recomputed_tokens)
        self.preemptions = 0
        self.admissions = 0
        self.slot = -1  # the server slot (llama.cpp sequence) of its last admission; -1: the policy has none

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Request(rid={self.rid}, session={self.session}, turn={self.turn}, ctx={self.ctx}, phase={self.phase})"
