"""Trace engines: what runs a model for ``llamatier trace``.

The step loop and the trace writer are engine-neutral (:mod:`llamatier.engines.base`
defines the :class:`TraceEngine` protocol). Engines are looked up by name;
plug-ins register through the ``llamatier.engines`` entry-point group or
:func:`register_engine`. The built-in engine is llama.cpp through
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
from llamatier.errors import LlamatierError

DEFAULT_ENGINE = "llama.cpp"
ENTRY_POINT_GROUP = "llamatier.engines"
_BUILTIN = {DEFAULT_ENGINE: "llamatier.engines.llamacpp:LlamaCppEngine"}
_REGISTRY: dict[str, Any] = {}
_ENTRY_POINTS_LOADED = False


def register_engine(cls: Any = None, *, name: str | None = None, replace: bool = False) -> Any:
    """Register a TraceEngine class under ``name`` (default ``cls.name``); usable as a decorator."""

    def _register(c: Any) -> Any:
        key = (name or getattr(c, "name", "") or "").strip().lower()
        if not key:
            raise LlamatierError(f"engine class {c!r} has no name: set the class attribute `name`")
        if key in _REGISTRY and _REGISTRY[key] is not c and not replace:
            raise LlamatierError(f"an engine named {key!r} is already registered")
        _REGISTRY[key] = c
        return c

    return _register(cls) if cls is not None else _register


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name.lower() in _REGISTRY or ep.name.lower() in _BUILTIN:
            continue
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plug-in must not break the built-in engine
            raise LlamatierError(
                f"engine plug-in {ep.name!r} ({ep.value}) failed to load: {exc}; fix or uninstall it"
            ) from None
        register_engine(cls, name=ep.name)


def engine_names() -> list[str]:
    """Names of the available engines (built-in and plug-ins)."""
    _load_entry_points()
    return sorted(set(_REGISTRY) | set(_BUILTIN))


def get_engine(name: str = DEFAULT_ENGINE) -> Any:
    """The engine class registered as ``name``; the error lists the valid names."""
    key = str(name).strip().lower()
    if key not in _REGISTRY and key in _BUILTIN:
        import importlib

        module, _, attr = _BUILTIN[key].partition(":")
        register_engine(getattr(importlib.import_module(module), attr), name=key)
    if key not in _REGISTRY:
        _load_entry_points()
    if key not in _REGISTRY:
        raise LlamatierError(f"unknown engine {name!r}: valid engines are {', '.join(engine_names())}")
    return _REGISTRY[key]


__all__ = [
    "DEFAULT_ENGINE",
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
