"""A streaming client for llama-server's native ``/completion`` endpoint, timed at the client.

``stream_completion`` posts a prompt given as token ids (so that a cached prefix
matches the server's slot cache token for token), asks for exactly ``n_predict``
tokens (``ignore_eos``), and reads the server-sent events as they arrive. Each
event ``data: {...}`` carries one generated token (``tokens``); the last one
(``"stop": true``) carries the server's own ``timings`` (``cache_n``,
``prompt_n``, ``prompt_ms``, ``predicted_n``, ``predicted_ms``; see
tools/server/server-common.cpp ``server_slot_stats::to_json``) and the slot that
served the request (``id_slot``).

Every loop is bounded: the whole request by ``timeout_s`` (socket reads and a
deadline), the number of events by ``n_predict`` plus a margin, and each line
by a byte limit, so a misbehaving server ends in an error record, not a hang.
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass, field
from typing import Any

MAX_LINE_BYTES = 1 << 20  # one SSE line (a final event carries the prompt text back)
EXTRA_EVENTS = 16  # events beyond one per token: the final event, keep-alives, blank lines


@dataclass(frozen=True)
class Completion:
    """What one streamed request measured (times in seconds on the client's monotonic clock)."""

    sent_s: float
    token_s: tuple[float, ...]  # arrival of each token event
    tokens: tuple[int, ...]
    done_s: float  # the final event (or the error)
    timings: dict[str, float] = field(default_factory=dict)  # the server's, from the final event
    tokens_evaluated: int = -1  # prompt tokens the server saw (its tokenisation of our ids: the same)
    tokens_cached: int = -1  # tokens in the slot after the request
    id_slot: int = -1
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft_s(self) -> float:
        """Client wall clock from sending the request to the first token."""
        return self.token_s[0] - self.sent_s if self.token_s else float("nan")

    @property
    def tpot_s(self) -> float:
        """(last - first token) / (tokens - 1), client wall clock."""
        n = len(self.token_s)
        return (self.token_s[-1] - self.token_s[0]) / (n - 1) if n > 1 else float("nan")

    def server_ttft_s(self) -> float:
        """The server's prompt time: from the slot starting the prompt to the first token (no queueing)."""
        return self.timings.get("prompt_ms", float("nan")) / 1e3

    def server_tpot_s(self) -> float:
        """The server's generation time per token after the first."""
        n = self.timings.get("predicted_n", 0)
        return self.timings.get("predicted_ms", float("nan")) / 1e3 / (n - 1) if n and n > 1 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "sent_s": self.sent_s,
            "token_s": list(self.token_s),
            "tokens": list(self.tokens),
            "done_s": self.done_s,
            "timings": dict(self.timings),
            "tokens_evaluated": self.tokens_evaluated,
            "tokens_cached": self.tokens_cached,
            "id_slot": self.id_slot,
            "error": self.error,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Completion:
        return Completion(
            sent_s=float(d["sent_s"]),
            token_s=tuple(float(x) for x in d["token_s"]),
            tokens=tuple(int(x) for x in d["tokens"]),
            done_s=float(d["done_s"]),
            timings={k: float(v) for k, v in d.get("timings", {}).items()},
            tokens_evaluated=int(d.get("tokens_evaluated", -1)),
            tokens_cached=int(d.get("tokens_cached", -1)),
            id_slot=int(d.get("id_slot", -1)),
            error=d.get("error"),
        )


class _Events:
    """Accumulates parsed events of one stream."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.token_s: list[float] = []
        self.tokens: list[int] = []
        self.final: dict[str, Any] | None = None
        self.error: str | None = None

    def feed(self, line: bytes) -> bool:
        """Parse one SSE line; return True when the stream is finished (final event or error)."""
        text = line.decode("utf-8", errors="replace").strip()
        if not text or text.startswith(":"):
            return False  # blank separator or SSE comment (keep-alive)
        if text.startswith("error:"):
            self.error = f"server error event: {text[6:].strip()[:300]}"
            return True
        if not text.startswith("data:"):
            return False
        payload = text[5:].strip()
        if payload == "[DONE]":
            return True
        try:
            ev = json.loads(payload)
        except json.JSONDecodeError:
            self.error = f"unparseable event: {payload[:200]}"
            return True
        if not isinstance(ev, dict):
            self.error = f"unexpected event: {payload[:200]}"
            return True
        if "error" in ev and "tokens" not in ev:
            self.error = f"server error: {json.dumps(ev['error'])[:300]}"
            return True
        toks = ev.get("tokens") or []
        if toks:
            now = self.clock()
            for t in toks:
                self.tokens.append(int(t))
                self.token_s.append(now)
        if ev.get("stop"):
            self.final = ev
            return True
        return False


def parse_timings(ev: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of an event's ``timings`` object."""
    t = ev.get("timings") or {}
    return {k: float(v) for k, v in t.items() if isinstance(v, int | float)}


def stream_completion(
    host: str,
    port: int,
    prompt_tokens: list[int],
    n_predict: int,
    *,
    timeout_s: float = 120.0,
    options: dict[str, Any] | None = None,
    clock: Any = time.monotonic,
) -> Completion:
    """POST ``/completion`` with streaming on; return the measured :class:`Completion`.

    Never raises for server or network trouble: the record's ``error`` says what went wrong.
    """
    body: dict[str, Any] = {
        "prompt": list(prompt_tokens),
        "n_predict": int(n_predict),
        "stream": True,
        "ignore_eos": True,
        "cache_prompt": True,
    }
    body.update(options or {})
    data = json.dumps(body).encode()
    ev = _Events(clock)
    deadline = clock() + timeout_s
    sent = clock()
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("POST", "/completion", body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            msg = resp.read(2000).decode("utf-8", errors="replace").strip().replace("\n", " ")
            ev.error = f"HTTP {resp.status}: {msg[:300]}"
        else:
            max_events = int(n_predict) + EXTRA_EVENTS
            lines = 0
            while lines < 2 * max_events + 8:  # each event is a data line and a blank line
                if clock() > deadline:
                    ev.error = f"no final event within {timeout_s:g} s"
                    break
                line = resp.readline(MAX_LINE_BYTES)
                if not line:
                    ev.error = "stream ended without a final event"
                    break
                lines += 1
                if ev.feed(line):
                    break
            else:
                ev.error = f"more than {max_events} events for {n_predict} tokens"
    except (OSError, http.client.HTTPException) as exc:
        ev.error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    fin = ev.final or {}
    return Completion(
        sent_s=sent,
        token_s=tuple(ev.token_s),
        tokens=tuple(ev.tokens),
        done_s=clock(),
        timings=parse_timings(fin),
        tokens_evaluated=int(fin.get("tokens_evaluated", -1)),
        tokens_cached=int(fin.get("tokens_cached", -1)),
        id_slot=int(fin.get("id_slot", -1)),
        error=ev.error,
    )


def wait_healthy(host: str, port: int, *, timeout_s: float = 60.0, alive: Any = None) -> str | None:
    """Poll ``GET /health`` until it answers 200; return None, or why it never did.

    ``alive`` (optional) is called between polls; returning False stops early
    (the server process died).
    """
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            return f"the server exited before it was ready ({last})"
        conn = http.client.HTTPConnection(host, port, timeout=2.0)
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            resp.read(1000)
            if resp.status == 200:
                return None
            last = f"HTTP {resp.status}"
        except (OSError, http.client.HTTPException) as exc:
            last = f"{type(exc).__name__}"
        finally:
            conn.close()
        time.sleep(0.2)
    return f"not ready within {timeout_s:g} s ({last})"
