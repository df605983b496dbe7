"""The serving-truth bench's client, player and comparison against a stub llama-server on 127.0.0.1.

The stub speaks llama-server's streamed ``/completion`` protocol (server-sent
events, one ``data:`` line per token, a final event with ``stop: true`` and the
server's ``timings``) and can misbehave on request: HTTP errors, error events,
endless streams, stalls, malformed JSON.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from llamatier.serverbench import (
    Case,
    case_spec,
    play,
    request_table,
    stream_completion,
    summarize,
    wait_healthy,
)
from llamatier.serverbench.run import load_measurement, server_args
from llamatier.serverbench.sessions import new_ids, prefix_ids
from llamatier.serving import build_context, load_workload, make_plan, serve

REPO = Path(__file__).resolve().parents[1]
WORKLOAD = REPO / "examples" / "workloads" / "gemma-270m-llama-server.toml"


class _Stub:
    """A llama-server look-alike; ``mode`` picks its behaviour for every request."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.prompts: list[list[int]] = []
        self.lock = threading.Lock()
        self.token_delay_s = 0.0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                body = b'{"status":"ok"}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _event(self, obj: object) -> None:
                self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
                self.wfile.flush()

            def do_POST(self) -> None:  # noqa: N802
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt, n = req["prompt"], int(req["n_predict"])
                with stub.lock:
                    stub.prompts.append(list(prompt))
                if stub.mode == "http500":
                    body = b'{"error":{"code":500,"message":"boom"}}'
                    self.send_response(500)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                if stub.mode == "error_event":
                    self.wfile.write(b'error: {"code":500,"message":"context exceeded"}\n\n')
                    return
                if stub.mode == "bad_json":
                    self.wfile.write(b"data: {not json\n\n")
                    return
                if stub.mode == "stall":
                    time.sleep(1.5)
                    return
                total = 10 * n + 100 if stub.mode == "endless" else n
                for i in range(total):
                    if stub.token_delay_s:
                        time.sleep(stub.token_delay_s)
                    try:
                        self._event({"content": "x", "tokens": [1000 + i], "stop": False, "id_slot": 0})
                    except OSError:
                        return
                if stub.mode == "endless":
                    return
                if stub.mode == "no_final":
                    return
                self.wfile.write(b": keep-alive comment\n\n")
                self._event({
                    "content": "", "tokens": [], "stop": True, "id_slot": 1, "tokens_predicted": n,
                    "tokens_evaluated": len(prompt), "tokens_cached": len(prompt) + n - 1,
                    "timings": {"cache_n": 3, "prompt_n": len(prompt) - 3, "prompt_ms": 120.5,
                                "predicted_n": n, "predicted_ms": 10.0 * (n - 1), "prompt_per_second": 1.0},
                })

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    s = _Stub()
    yield s
    s.close()


def test_streamed_tokens_and_final_timings_are_parsed(stub: _Stub) -> None:
    stub.token_delay_s = 0.002
    c = stream_completion("127.0.0.1", stub.port, [5, 6, 7, 8], 6, timeout_s=10)
    assert c.ok, c.error
    assert c.tokens == tuple(1000 + i for i in range(6))
    assert len(c.token_s) == 6 and all(b >= a for a, b in zip(c.token_s, c.token_s[1:], strict=False))
    assert c.sent_s <= c.token_s[0] <= c.done_s
    assert c.ttft_s == pytest.approx(c.token_s[0] - c.sent_s)
    assert c.tpot_s == pytest.approx((c.token_s[-1] - c.token_s[0]) / 5)
    assert c.timings["cache_n"] == 3 and c.timings["prompt_n"] == 1
    assert c.server_ttft_s() == pytest.approx(0.1205)
    assert c.server_tpot_s() == pytest.approx(0.010)
    assert (c.tokens_evaluated, c.tokens_cached, c.id_slot) == (4, 9, 1)
    assert stub.prompts == [[5, 6, 7, 8]]


@pytest.mark.parametrize(
    ("mode", "words"),
    [
        ("http500", "HTTP 500"),
        ("error_event", "server error event"),
        ("bad_json", "unparseable event"),
        ("no_final", "without a final event"),
        ("endless", "more than"),
        ("stall", "TimeoutError"),
    ],
)
def test_misbehaving_server_gives_an_error_record_not_a_hang(stub: _Stub, mode: str, words: str) -> None:
    stub.mode = mode
    t0 = time.monotonic()
    c = stream_completion("127.0.0.1", stub.port, [1, 2, 3], 4, timeout_s=0.5)
    assert not c.ok and words in c.error
    assert time.monotonic() - t0 < 5.0  # bounded by the timeout or the event limit


def test_wait_healthy_and_a_dead_port() -> None:
    s = _Stub()
    port = s.port
    try:
        assert wait_healthy("127.0.0.1", port, timeout_s=5) is None
    finally:
        s.close()
    why = wait_healthy("127.0.0.1", port, timeout_s=0.5)
    assert why is not None and "not ready" in why
    assert "exited" in wait_healthy("127.0.0.1", port, timeout_s=5, alive=lambda: False)


def _small_spec(users: int = 2, n_parallel: int = 2, prefix: bool = True):
    spec = load_workload(WORKLOAD)
    spec = dataclasses.replace(spec, think_time_s=0.01, ramp_s=0.0)
    return case_spec(spec, Case(users, n_parallel, prefix))


def test_player_sends_the_plans_conversations(stub: _Stub) -> None:
    spec = _small_spec()
    plan = make_plan(spec, list(build_context(spec).shapes))
    played = play(plan, "127.0.0.1", stub.port, seed=3, deadline_s=30)
    assert all(p.completion is not None and p.completion.ok for p in played)
    assert len(stub.prompts) == plan.n_requests
    pre = prefix_ids(plan, 3)
    assert len(pre) == plan.prefix_tokens > 0
    sent = {}
    for rid in range(plan.n_requests):  # each request's prompt ends with its own new tokens
        tail = new_ids(plan, rid, 3)
        (prompt,) = [p for p in stub.prompts if p[-len(tail):] == tail]
        assert len(prompt) == plan.req_prompt_tokens[rid]
        assert prompt[: len(pre)] == pre  # every conversation starts with the shared prefix
        sent[rid] = prompt
    for rid in range(plan.n_requests):  # a turn continues its predecessor: prompt + output without its last token
        nxt = int(plan.req_next[rid])
        if nxt >= 0 and plan.req_session[nxt] == plan.req_session[rid]:
            a = played[rid]
            assert sent[nxt][: a.prompt_tokens] == sent[rid]
            assert sent[nxt][a.prompt_tokens: a.prompt_tokens + a.n_predict - 1] == list(a.completion.tokens[:-1])
        if nxt >= 0:
            assert played[nxt].arrival_s >= played[rid].completion.token_s[-1] + float(plan.req_think_s[nxt]) - 1e-3
    firsts = {tuple(p[len(pre): len(pre) + 8]) for p in stub.prompts}  # sessions differ after the prefix
    assert len(firsts) == plan.n_sessions


def test_player_is_bounded_and_records_why_requests_did_not_run(stub: _Stub) -> None:
    spec = _small_spec()
    plan = make_plan(spec, list(build_context(spec).shapes))
    stub.mode = "http500"
    played = play(plan, "127.0.0.1", stub.port, deadline_s=10)
    firsts = {int(plan.user_first[u]) for u in range(plan.n_users)}
    for p in played:
        if p.rid in firsts:
            assert p.completion is not None and "HTTP 500" in p.completion.error
        else:
            assert p.completion is None and "earlier request" in p.skipped
    stub.mode = "ok"
    stub.token_delay_s = 0.05  # 65 tokens take 3 s; the deadline stops the run long before all turns
    t0 = time.monotonic()
    played = play(plan, "127.0.0.1", stub.port, deadline_s=0.5, request_timeout_s=0.5)
    assert time.monotonic() - t0 < 8.0
    assert any(p.skipped for p in played) or any(p.completion and not p.completion.ok for p in played)


def test_compare_against_the_prediction_and_the_saved_format(stub: _Stub, tmp_path: Path) -> None:
    spec = _small_spec(users=2, n_parallel=1)
    plan = make_plan(spec, list(build_context(spec).shapes))
    played = play(plan, "127.0.0.1", stub.port, deadline_s=30)
    pred = serve(spec, "llamacpp-server")
    t = request_table(played, pred)
    assert t.height == plan.n_requests and t["ok"].all()
    assert np.allclose(t["pred_ttft_s"].to_numpy(), pred.requests_frame()["ttft_s"].to_numpy())
    s = summarize(t)
    assert s["measured"] == plan.n_requests
    for m in ("ttft_s", "tpot_s"):
        meas, prd = t[m].to_numpy(), t[f"pred_{m}"].to_numpy()
        assert s[m]["median_abs_err"] == pytest.approx(float(np.median(np.abs(prd / meas - 1))))
        assert s[m]["p99_err"] == pytest.approx(np.quantile(prd, 0.99) / np.quantile(meas, 0.99) - 1)
    # the stub answers in milliseconds: a model of a real CPU server cannot meet the goal against it
    assert not s["meets_goal"]
    # saved records round-trip
    rec = {"format": "llamatier-serving-truth/1", "case": "u2-np1-prefix", "requests": [p.to_dict() for p in played]}
    f = tmp_path / "u2-np1-prefix.json"
    f.write_text(json.dumps(rec))
    case, back, _ = load_measurement(f)
    assert case == Case(2, 1, True)
    assert request_table(back, pred).equals(t)


def test_server_arguments_follow_the_workload() -> None:
    spec = _small_spec(users=8, n_parallel=4)
    args = server_args(spec, 2)
    assert args[args.index("-np") + 1] == "4"
    assert args[args.index("-c") + 1] == str(4 * spec.server.slot_context_tokens)
    assert args[args.index("-b") + 1] == str(spec.server.max_batch_tokens)
    assert args[args.index("--cache-ram") + 1] == "8192"
    assert Case.parse("u8-np4-noprefix") == Case(8, 4, False)
    with pytest.raises(Exception, match="uUSERS-npSLOTS"):
        Case.parse("8users")


RESULTS = REPO / "bench" / "results" / "serving-truth"


@pytest.mark.parametrize("case", ["u4-np2-prefix", "u4-np4-noprefix", "u8-np8-prefix", "u1-np1-prefix"])
def test_serve_replay_schedules_like_the_measured_llama_server(case: str) -> None:
    """Which slot each request took and how many prompt tokens it reused, as a real llama-server did.

    The measurements (bench/results/serving-truth) are llama-server's own ``id_slot`` and ``cache_n``
    for each request; the prediction is serve-replay's llamacpp-server policy on the same plan.
    """
    from llamatier.serverbench import predict_case

    c, played, _ = load_measurement(RESULTS / f"{case}.json")
    t = request_table(played, predict_case(load_workload(WORKLOAD), c, profile=str(RESULTS / "cpu-host-server.toml")))
    assert t["ok"].all()
    assert (t["cache_n"] == t["pred_cache_n"]).all() and (t["prompt_n"] == t["pred_prompt_n"]).all()
    assert (t["id_slot"] == t["pred_slot"]).all()
