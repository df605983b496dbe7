"""The crash log of a supervised command: Python's faulthandler output plus what the run was doing.

A command that runs native code (llama.cpp) runs in a child process of a small
supervisor (:mod:`llamatier.supervise`). In the child, :func:`start` points
:mod:`faulthandler` at a log file and library code adds context with
:func:`note` (the trace directory, the llama.cpp settings that matter). If
the child dies of a signal, the supervisor reads the notes back with
:func:`read_notes` and names the likely cause in one line. Outside a
supervised child, :func:`note` does nothing.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

NOTE_PREFIX = "llamatier-note "
ENV_LOG = "LLAMATIER_CRASH_LOG"  # set by the supervisor for its child: the log file to write
_FILE: TextIO | None = None


def start(path: str | Path) -> bool:
    """Open ``path`` for appending, send faulthandler's report there; False if it cannot be opened."""
    global _FILE
    try:
        fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - stays open for faulthandler
    except OSError:
        return False
    _FILE = fh
    fh.write(f"llamatier crash log: pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
             f"command: {' '.join(sys.argv)}\npython {sys.version.split()[0]} on {sys.platform}\n")
    fh.flush()
    faulthandler.enable(file=fh, all_threads=True)
    return True


def note(**context: Any) -> None:
    """Record context for a crash report (JSON values); no-op outside a supervised child."""
    if _FILE is None:
        return
    try:
        _FILE.write(NOTE_PREFIX + json.dumps(context, default=str) + "\n")
        _FILE.flush()
    except (OSError, ValueError):
        pass


def read_notes(path: str | Path) -> dict[str, Any]:
    """Every note in the log merged in order (later values win); {} when there is none."""
    merged: dict[str, Any] = {}
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return merged
    for line in text.splitlines():
        if line.startswith(NOTE_PREFIX):
            try:
                merged.update(json.loads(line[len(NOTE_PREFIX):]))
            except ValueError:
                continue
    return merged
