"""Named plug-ins: one registry class, four families.

Every extension point of llamatier is a family of named classes that the
command line picks by name:

- ``POLICIES``: replay placement policies (``llamatier.policies.Policy``;
  entry-point group ``llamatier.policies``; ``replay/compare/sweep --policy``);
- ``SERVING_POLICIES``: serving-level KV policies
  (``llamatier.serving.policies.ServingPolicy``; ``llamatier.serving_policies``;
  ``serve-replay --policy``);
- ``EXECUTORS``: where sweep cells run (``llamatier.sweep.executors.SweepExecutor``;
  ``llamatier.executors``; ``sweep --executor``);
- ``ENGINES``: inference engines a trace is recorded with
  (``llamatier.engines.TraceEngine``; ``llamatier.engines``; ``trace --engine``).

Built-ins register themselves with ``@FAMILY.register`` exactly as a plug-in
would; installed packages add members through the family's entry-point group
(entry name = member name, value = ``module:Class``), loaded the first time a
name is looked up. Names are case-insensitive; an unknown name is one
:class:`LlamatierError` that lists the valid ones; a renamed member keeps its
old name as a deprecated alias that still works and says what to use instead.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Generic, TypeVar

from llamatier.errors import LlamatierDeprecationWarning, LlamatierError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named classes of one plug-in family (see the module docstring).

    ``kind`` names a member in messages ("policy"), ``plural`` the family
    ("policies"). ``base`` ("module:Class", resolved on first use) is the class
    members must derive from (None: anything with a ``name``). ``builtins`` is
    the module whose import registers the built-in members, imported before the
    first lookup so that the family is complete however it was reached.
    """

    def __init__(
        self,
        kind: str,
        *,
        entry_point_group: str,
        plural: str | None = None,
        base: str | None = None,
        builtins: str | None = None,
    ) -> None:
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self.entry_point_group = entry_point_group
        self._base = base
        self.builtins = builtins
        self._members: dict[str, T] = {}
        self._lazy: dict[str, str] = {}  # name -> "module:Class", imported when first looked up
        self._aliases: dict[str, tuple[str, bool]] = {}  # old name -> (current name, deprecated)
        self._plugins_loaded = False

    # -- registering --------------------------------------------------------------------
    def base_class(self) -> type | None:
        """The class members must derive from (None: no check)."""
        if self._base is None:
            return None
        module, _, attr = self._base.partition(":")
        return getattr(importlib.import_module(module), attr)

    def register(self, obj: Any = None, *, name: str | None = None, replace: bool = False) -> Any:
        """Register ``obj`` under ``name`` (default ``obj.name``); usable as a plain decorator.

        A taken name raises unless ``replace=True``; a class that does not
        derive from the family's base class raises.
        """

        def _register(o: Any) -> Any:
            base = self.base_class()
            if base is not None and not (isinstance(o, type) and issubclass(o, base)):
                raise LlamatierError(
                    f"{o!r} is not a {base.__name__} subclass: derive from {base.__module__.removesuffix('.base')}.{base.__name__}"
                )
            key = _key(name or getattr(o, "name", "") or "")
            label = getattr(o, "__name__", repr(o))
            if not key:
                raise LlamatierError(f"{self.kind} class {label} has no name: set the class attribute `name`")
            held = self._members.get(key)
            if held is not None and held is not o and not replace:
                raise LlamatierError(
                    f"a {self.kind} named {key!r} is already registered ({getattr(held, '__name__', held)})"
                )
            self._members[key] = o
            return o

        return _register(obj) if obj is not None else _register

    def register_lazy(self, name: str, target: str) -> None:
        """Register ``target`` ("module:Class") under ``name`` without importing it yet.

        For members whose module is costly to import (an inference engine's
        bindings): it is imported, checked and registered on first lookup.
        """
        self._lazy[_key(name)] = target

    def alias(self, old: str, new: str, *, deprecated: bool = True) -> None:
        """Let ``old`` stand for the member ``new`` (a deprecated alias says so when used)."""
        self._aliases[_key(old)] = (_key(new), deprecated)

    def unregister(self, name: str) -> None:
        """Forget a member (tests and interactive sessions)."""
        self._members.pop(_key(name), None)
        self._lazy.pop(_key(name), None)

    # -- looking up -----------------------------------------------------------------------
    def _load(self) -> None:
        if self.builtins:
            importlib.import_module(self.builtins)
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=self.entry_point_group):
            if _key(ep.name) in self._members or _key(ep.name) in self._lazy:
                continue
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plug-in must not look like a llamatier bug
                raise LlamatierError(
                    f"{self.kind} plug-in {ep.name!r} ({ep.value}) failed to load: {exc}; fix or uninstall it"
                ) from None
            self.register(obj, name=ep.name)

    def names(self) -> list[str]:
        """Registered names, built-ins and plug-ins (aliases not included)."""
        self._load()
        return sorted(set(self._members) | set(self._lazy))

    def help_names(self) -> str:
        """"a, b, c" for command-line help; never raises (a broken plug-in is reported when used)."""
        try:
            return ", ".join(self.names())
        except LlamatierError:
            return ", ".join(sorted(set(self._members) | set(self._lazy)))

    def canonical(self, name: str) -> str:
        """The registered name ``name`` stands for (an alias resolved, with its deprecation note)."""
        key = _key(name)
        self._load()
        if key in self._members or key in self._lazy:
            return key
        if key in self._aliases:
            new, deprecated = self._aliases[key]
            if deprecated:
                warnings.warn(
                    f"{self.kind} {key!r} is deprecated and will be removed: use {new!r}",
                    LlamatierDeprecationWarning,
                    stacklevel=3,
                )
            return new
        raise LlamatierError(f"unknown {self.kind} {name!r}: valid {self.plural} are {', '.join(self.names())}")

    def get(self, name: str) -> T:
        """The member registered as ``name``; an unknown name raises, listing the valid ones."""
        key = self.canonical(name)
        if key not in self._members:
            module, _, attr = self._lazy[key].partition(":")
            self.register(getattr(importlib.import_module(module), attr), name=key)
        return self._members[key]

    def __contains__(self, name: object) -> bool:
        self._load()
        key = _key(str(name))
        return key in self._members or key in self._lazy or key in self._aliases

    def create(self, spec: Any, **params: Any) -> Any:
        """An instance from a name, a class, or an instance (used as given)."""
        if isinstance(spec, str):
            cls = self.get(spec)
        elif isinstance(spec, type):
            cls = spec
        else:
            return spec
        try:
            return cls(**params)
        except (TypeError, ValueError) as exc:  # a wrong name or a value the class refuses
            raise LlamatierError(f"bad parameters for {self.kind} {getattr(cls, 'name', cls.__name__)!r}: {exc}") from None


def _key(name: str) -> str:
    return str(name).strip().lower()


POLICIES: Registry[Any] = Registry(
    "policy", plural="policies", entry_point_group="llamatier.policies",
    base="llamatier.policies.base:Policy", builtins="llamatier.policies",
)
SERVING_POLICIES: Registry[Any] = Registry(
    "serving policy", plural="serving policies", entry_point_group="llamatier.serving_policies",
    base="llamatier.serving.policies.base:ServingPolicy", builtins="llamatier.serving.policies",
)
EXECUTORS: Registry[Any] = Registry(
    "sweep executor", entry_point_group="llamatier.executors",
    base="llamatier.sweep.executors:SweepExecutor", builtins="llamatier.sweep",
)
ENGINES: Registry[Any] = Registry("engine", entry_point_group="llamatier.engines", builtins="llamatier.engines")

FAMILIES: dict[str, Registry[Any]] = {
    "policies": POLICIES,
    "serving-policies": SERVING_POLICIES,
    "executors": EXECUTORS,
    "engines": ENGINES,
}
