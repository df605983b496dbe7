"""Where llamatier keeps per-machine state: the compiled capture helper, probe verdicts, crash logs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$LLAMATIER_CACHE``, else ``$XDG_CACHE_HOME/llamatier``, else ``~/.cache/llamatier`` (not created)."""
    base = os.environ.get("LLAMATIER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llamatier"
    )
    return Path(base)
