"""Input files the user names (a prompt, a workload, a profile): read them or fail with one line.

Every reader of a user's text file goes through :func:`read_text_file`, so a
missing file, a folder, an unreadable file or one that is not UTF-8 is the
same kind of one-line :class:`LlamatierError` everywhere: what is wrong with
which file, and what to give instead.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from llamatier.errors import LlamatierError


def read_text_file(
    path: str | Path, *, what: str, give: str, error: type[LlamatierError] = LlamatierError
) -> str:
    """The UTF-8 text of the ``what`` file at ``path`` ("prompt file", ...).

    ``give`` completes "give ..." in the messages, e.g. "a text file to --prompt-file";
    ``error`` is the LlamatierError subclass raised.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise error(f"{what} not found: {p} (give {give})")
    if p.is_dir():
        raise error(f"{what} {p} is a directory: give {give}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"{what} {p} is not UTF-8 text: save it as UTF-8") from None
    except OSError as exc:
        raise error(f"cannot read {what} {p}: {exc.strerror or exc} (check its permissions)") from None


def read_toml_file(
    path: str | Path, *, what: str, give: str, error: type[LlamatierError] = LlamatierError
) -> dict[str, Any]:
    """The parsed TOML of the ``what`` file at ``path`` (messages as :func:`read_text_file`'s)."""
    text = read_text_file(path, what=what, give=give, error=error)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what} {Path(path).expanduser()}: not valid TOML ({exc}): fix the syntax") from None
