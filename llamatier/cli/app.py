"""The typer app and the error boundary every command goes through."""

from __future__ import annotations

import contextvars
import functools
import sys
import warnings
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from llamatier.errors import INTERRUPTED, LlamatierDeprecationWarning, LlamatierError

try:  # typer >= 0.2x vendors click as typer._click; older typer uses click itself
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import NoArgsIsHelpError, UsageError
from typer.core import TyperGroup


class _OneLineUsageErrors(TyperGroup):
    """Usage errors (a value of the wrong type, an unknown option, a missing argument) as one line on stderr."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            if isinstance(exc, NoArgsIsHelpError):
                raise
            where = ctx.command_path
            if exc.ctx is not None and exc.ctx is not ctx:
                where = exc.ctx.command_path
            elif ctx.invoked_subcommand:
                where = f"{ctx.command_path} {ctx.invoked_subcommand}"
            fail(f"{exc.format_message()} (see `{where} --help`)", exc.exit_code)


app = typer.Typer(
    cls=_OneLineUsageErrors,
    name="llamatier",
    help="Trace real llama.cpp runs and replay their KV-cache reads through a four-tier memory model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Commands that run llama.cpp (trace, demo, quality) share this option.
RepackOpt = Annotated[
    bool | None,
    typer.Option(
        "--repack/--no-repack",
        help="Force llama.cpp's CPU weight repacking (extra buffer types, e.g. AMX) on or off. Default: "
        "LLAMATIER_NO_REPACK (1 off, 0 on), else on unless a one-time probe crashed on this machine.",
        show_default=False,
    ),
]

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])



def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit non-zero."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def cli_errors(fn: F) -> F:
    """Turn LlamatierError (and Ctrl-C) into a one-line message and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        token = _AT_EXIT.set([])
        try:
            with warnings.catch_warnings():
                show = warnings.showwarning

                def note(message: Any, category: type[Warning], *rest: Any, **kw: Any) -> None:
                    """A deprecated name the user typed: one ``note:`` line on stderr."""
                    if issubclass(category, LlamatierDeprecationWarning):
                        err_console.print(f"[yellow]note:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
                    else:
                        show(message, category, *rest, **kw)

                warnings.showwarning = note
                warnings.simplefilter("default", LlamatierDeprecationWarning)
                return fn(*args, **kwargs)
        except LlamatierError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            err_console.print(INTERRUPTED, highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        except MemoryError:
            fail("out of memory: use a smaller trace, fewer steps or a coarser --block-tokens", 3)
        finally:
            for release in reversed(_AT_EXIT.get()):
                release()
            _AT_EXIT.reset(token)

    return wrapper  # type: ignore[return-value]


_AT_EXIT: contextvars.ContextVar[list[Callable[[], None]]] = contextvars.ContextVar("llamatier_at_exit")


def release_at_exit(release: Callable[[], None]) -> None:
    """Call ``release`` when the running command ends, however it ends (e.g. an output claim's release)."""
    _AT_EXIT.get().append(release)


def print_json(obj: Any) -> None:
    """Machine-readable output on stdout (no rich markup); NaN and Infinity are written as null."""
    import json

    from llamatier.schema import finite_json

    sys.stdout.write(json.dumps(finite_json(obj), indent=2, default=_json_default, allow_nan=False) + "\n")


def _json_default(o: Any) -> Any:
    return str(o)  # paths and the like (numbers, arrays and dataclasses are converted before)
