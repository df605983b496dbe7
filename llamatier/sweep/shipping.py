"""Traces by content: a sweep cell names its trace by path *and* content hash, so a worker on
another machine either reads the very same trace or says, in one line, that it cannot.

An executor whose workers do not share this machine's files installs the trace's
files into each worker's cache (``<cache>/traces/<sha256>/``, see
:func:`llamatier.cachedir.cache_dir`); :func:`resolve_trace` finds it there, or at
the cell's path when the files there have the same content.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import uuid
from functools import lru_cache
from pathlib import Path

from llamatier.cachedir import cache_dir
from llamatier.errors import LlamatierError
from llamatier.trace.format import META_FILE


def trace_files(path: str | Path) -> list[Path]:
    """The files a trace consists of (meta.json and its Parquet chunks), in name order."""
    p = Path(path)
    return sorted(f for f in p.iterdir() if f.is_file() and (f.name == META_FILE or f.suffix == ".parquet"))


def _stamp(path: str | Path) -> tuple[tuple[str, int, int], ...]:
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in trace_files(path))


@lru_cache(maxsize=16)
def _digest(path: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    for f in trace_files(path):
        h.update(f.name.encode() + b"\0" + str(f.stat().st_size).encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def trace_digest(path: str | Path) -> str:
    """sha256 (hex) over a trace directory's files, names and bytes (cached while they are unchanged)."""
    return _digest(str(Path(path).resolve()), _stamp(path))


def trace_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in trace_files(path))


def shipped_dir(digest: str) -> Path:
    return cache_dir() / "traces" / digest


def has_trace(path: str, digest: str) -> bool:
    """Whether this process can read the trace: shipped here before, or at ``path`` with this content."""
    if shipped_dir(digest).is_dir():
        return True
    try:
        return Path(path).is_dir() and trace_digest(path) == digest
    except OSError:
        return False


def install_trace(digest: str, files: dict[str, bytes]) -> str:
    """Write a shipped trace into this machine's cache (atomically: several workers may race)."""
    final = shipped_dir(digest)
    if final.is_dir():
        return str(final)
    tmp = final.with_name(f".{digest}.{uuid.uuid4().hex}")
    tmp.mkdir(parents=True)
    for name, data in files.items():
        (tmp / Path(name).name).write_bytes(data)
    try:
        os.rename(tmp, final)
    except OSError:  # another worker was first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def resolve_trace(path: str, digest: str | None) -> str:
    """Where this process reads the trace of a cell: the shipped copy, else ``path`` if its content matches."""
    if digest is None:
        return path
    shipped = shipped_dir(digest)
    if shipped.is_dir():
        return str(shipped)
    if has_trace(path, digest):
        return path
    raise LlamatierError(
        f"worker {socket.gethostname()} cannot read trace {path} (content sha256 {digest[:12]}): it is not "
        "at that path there, or holds other files; put the trace on a filesystem every worker shares, "
        "at the same path"
    )
