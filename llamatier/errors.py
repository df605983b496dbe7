"""User-facing errors: one line that names the problem and the fix."""

from __future__ import annotations

INTERRUPTED = "interrupted (Ctrl-C) before the command finished: run it again to complete it"


class LlamatierError(Exception):
    """An error the CLI prints as one line (no traceback) and exits non-zero.

    The message must say what is wrong and what to do about it.
    """

    exit_code: int = 2

    def __init__(self, message: str, *, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TraceFormatError(LlamatierError):
    """A trace directory is missing, truncated, foreign or of another version."""


class ProfileError(LlamatierError):
    """A hardware profile is missing or violates a rule."""


class ModelLoadError(LlamatierError):
    """A model file is missing, not GGUF, or llama.cpp refused it."""


class LlamatierDeprecationWarning(FutureWarning):
    """A name or option still works but will go: the message says what to use instead.

    The CLI prints it as one ``note:`` line on stderr.
    """
