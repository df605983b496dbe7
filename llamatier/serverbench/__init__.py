"""Check ``serve-replay`` against a real llama-server: build and run it, play a workload, compare.

- :mod:`.client`: streamed ``/completion`` requests timed at the client, with the server's own timings;
- :mod:`.server`: build llama-server from llama-cpp-python's vendored llama.cpp, start and stop it;
- :mod:`.sessions`: play a workload plan (closed-loop users, multi-turn sessions, token-id prompts);
- :mod:`.run`: the bench's cases (users, slots, shared prefix), measuring and predicting one case;
- :mod:`.compare`: measured vs predicted per request and per percentile, and the accuracy goal.

``bench/serving_truth.py`` drives it; docs/serving.md reports the results.
"""

from __future__ import annotations

from llamatier.serverbench.client import Completion, stream_completion, wait_healthy
from llamatier.serverbench.compare import GOAL, pooled, request_table, summarize
from llamatier.serverbench.run import (
    DEFAULT_CASES,
    Case,
    case_spec,
    load_measurement,
    measure_case,
    predict_case,
)
from llamatier.serverbench.server import LlamaServer, build_llama_server
from llamatier.serverbench.sessions import PlayedRequest, play

__all__ = [
    "DEFAULT_CASES",
    "GOAL",
    "Case",
    "Completion",
    "LlamaServer",
    "PlayedRequest",
    "build_llama_server",
    "case_spec",
    "load_measurement",
    "measure_case",
    "play",
    "pooled",
    "predict_case",
    "request_table",
    "stream_completion",
    "summarize",
    "wait_healthy",
]
