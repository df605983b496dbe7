"""Trace engines: what runs a model for ``llamatier trace``.

The step loop and the trace writer are engine-neutral (:mod:`llamatier.engines.base`
defines the :class:`TraceEngine` protocol). Engines are looked up by name in
:data:`llamatier.registry.ENGINES`; plug-ins register through the
``llamatier.engines`` entry-point group or :func:`register_engine`. The built-in engine is llama.cpp through
llama-cpp-python (:mod:`llamatier.engines.llamacpp`).
"""

from __future__ import annotations

from typing import Any

from llamatier.engines.base import (
    EngineDescription,
    EngineSettings,
    PositionMass,
    StepTiming,
    TraceEngine,
    block_mass,
)
from llamatier.registry import ENGINES

DEFAULT_ENGINE = "llama.cpp"
# Registered lazily: importing llama-cpp-python is left to the first lookup.
ENGINES.register_lazy(DEFAULT_ENGINE, "llamatier.engines.llamacpp:LlamaCppEngine")


def register_engine(cls: Any = None, *, name: str | None = None, replace: bool = False) -> Any:
    """Register a TraceEngine class under ``name`` (default ``cls.name``); usable as a decorator."""
    return ENGINES.register(cls, name=name, replace=replace)


def engine_names() -> list[str]:
    """Names of the available engines (built-in and plug-ins)."""
    return ENGINES.names()


def get_engine(name: str = DEFAULT_ENGINE) -> Any:
    """The engine class registered as ``name``; the error lists the valid names."""
    return ENGINES.get(name)


__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "EngineDescription",
    "EngineSettings",
    "PositionMass",
    "StepTiming",
    "TraceEngine",
    "block_mass",
    "engine_names",
    "get_engine",
    "register_engine",
]
