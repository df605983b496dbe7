"""Replay options on the command line, generated from the one declaration in ReplayOptions.

``@replay_options()`` adds one typer option per ReplayOptions field that has a
flag (its help text comes from the field) and calls the command with
``options=ReplayOptions(...)`` built from them. ``@replay_options(axes=False)``
leaves out the fields a sweep takes as axes of its own (``--hbm-budget``
ranges, ``--kv-types``) and passes the built options the same way.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from llamatier.replay.options import cli_fields, geometry_help, options_from_flags

F = TypeVar("F", bound=Callable[..., Any])

POLICY_PARAM_HELP = (
    "Policy parameter, repeatable: POLICY.KEY=VALUE or KEY=VALUE (every policy that takes KEY), "
    "e.g. adaptive.decay=0.9, hysteresis=0.1, max_moves_per_step=16."
)
PolicyParamOpt = Annotated[list[str] | None, typer.Option("--policy-param", help=POLICY_PARAM_HELP)]


def _parameter(f: Any) -> inspect.Parameter:
    meta = f.metadata
    typ = meta["cli_type"]
    help_text = geometry_help() if f.name == "target" else meta["help"]
    annotation = Annotated[typ if typ is bool else typ | None, typer.Option(meta["flag"], help=help_text)]
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=annotation)


def replay_options(*, axes: bool = True) -> Callable[[F], F]:
    """Give the decorated command every declared replay option; it receives them as ``options``."""

    def wrap(fn: F) -> F:
        declared = cli_fields(axes=axes)
        names = {f.name for f in declared}
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "options"]
        # listed in --help after the command's profile option(s), before its report options
        at = next((i + 1 for i, p in enumerate(own) if p.name in ("profile", "profiles")), len(own))
        rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own[at:]]
        params = [*own[:at], *(_parameter(f) for f in declared), *rest]

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            values = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            kwargs["options"] = options_from_flags(values)
            return fn(*args, **kwargs)

        command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command  # type: ignore[return-value]

    return wrap
