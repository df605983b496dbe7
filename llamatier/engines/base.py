"""The seam between the tracer's step loop and whatever runs the model.

The tracer (``llamatier.trace.tracer``) drives a :class:`TraceEngine`: load a
model, tokenize the prompt, start a context, then decode batch after batch,
each returning its wall time and perf counters, and, when capture is on, the
attention mass per KV position. The step loop turns that into trace rows and
per-block mass; the writer stores them. Neither knows which engine ran.

An engine is a class registered by name (see :mod:`llamatier.engines`); it is
built as ``cls(settings, **options)`` where ``options`` are its own settings
(llama.cpp: ``n_gpu_layers``, ``offload_kqv``, ``repack``). An optional
classmethod ``check_options(options)`` lets it reject bad options before the
tracer writes anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from llamatier.kvtypes import KVType
from llamatier.model import ModelInfo


@dataclass(frozen=True)
class EngineSettings:
    """What every engine needs for one traced run (one sequence)."""

    n_ctx: int
    n_batch: int
    n_threads: int
    type_k: KVType
    type_v: KVType
    seed: int = 42
    temperature: float = 0.8
    top_k: int = 40
    capture: bool = True
    capture_backend: str = "auto"


@dataclass(frozen=True)
class StepTiming:
    """One decode call: measured wall time and the engine's own counters (cumulative)."""

    wall_s: float
    perf_t_p_eval_ms: float = 0.0
    perf_t_eval_ms: float = 0.0
    perf_n_p_eval: int = 0
    perf_n_eval: int = 0


@dataclass(frozen=True)
class PositionMass:
    """Attention of the last decode call: mean mass per layer and KV position, and cells attended."""

    mass: np.ndarray  # float64 [n_layers, n_ctx_tokens]; each row sums to 1
    n_kv: int  # KV cells the engine attended (may be padded beyond n_ctx_tokens)


@dataclass(frozen=True)
class EngineDescription:
    """What the engine ran with, for the trace's meta.json.

    ``context`` entries join meta.json's ``context`` (e.g. flash_attn, n_gpu_layers),
    ``capture`` entries its ``capture``, ``engine`` entries its ``engine`` (after the
    engine's name: settings that change step times, and why they were chosen),
    ``top`` entries go at the top level (e.g. system_info, the engine's version).
    """

    n_ctx: int  # the context size the engine actually created
    context: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    capture: dict[str, Any] = field(default_factory=dict)
    top: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class TraceEngine(Protocol):
    """Runs one model with one sequence for the tracer.

    Call order: ``load`` -> ``tokenize``/``is_eog`` -> ``start`` -> (``decode`` ->
    ``attention`` -> ``sample``)* -> ``close`` (always, also after errors).
    Errors the user can fix are :class:`~llamatier.errors.LlamatierError`;
    a capture failure is ``RuntimeError``.
    """

    name: ClassVar[str]

    def load(self, model_path: Path, info: ModelInfo) -> None:
        """Load the model's weights."""

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, the model's BOS first."""

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation."""

    def start(self) -> None:
        """Create the context (and the attention capture) for the settings given at construction."""

    def decode(self, tokens: Sequence[int], pos0: int, *, logits: bool) -> StepTiming:
        """Decode ``tokens`` at positions ``pos0..``, logits for the last one if ``logits``; timed."""

    def attention(self, n_ctx_tokens: int) -> PositionMass | None:
        """Attention of the last decode over the first ``n_ctx_tokens`` positions (None without capture)."""

    def sample(self) -> int:
        """Sample the next token from the last logits."""

    def describe(self) -> EngineDescription:
        """What the engine ran with (after ``start``)."""

    def run_stats(self) -> dict[str, Any]:
        """Top-level meta.json entries known only after the run (e.g. time spent capturing)."""

    def close(self) -> None:
        """Free everything (idempotent)."""


def block_mass(position_mass: np.ndarray, block_tokens: int) -> np.ndarray:
    """Sum per-position mass [L, n] into blocks of ``block_tokens`` positions: float32 [L, ceil(n / B)]."""
    n_layers, n = position_mass.shape
    nb = -(-n // block_tokens)
    padded = np.zeros((n_layers, nb * block_tokens), dtype=np.float64)
    padded[:, :n] = position_mass
    return padded.reshape(n_layers, nb, block_tokens).sum(axis=2).astype(np.float32)
