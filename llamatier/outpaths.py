"""Output paths checked before long work starts, so a bad --out fails in a second, not after the run."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from llamatier.errors import LlamatierError


def _check_folder_writable(folder: Path, target: Path) -> None:
    """``folder`` exists, is a folder, and a file can be created in it (tried, then removed)."""
    if not folder.exists():
        raise LlamatierError(f"cannot write {target}: folder {folder} does not exist (create it first)")
    if not folder.is_dir():
        raise LlamatierError(f"cannot write {target}: {folder} is a file, not a folder (give a path in a folder)")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".llamatier-write-check-")
    except OSError as exc:
        raise LlamatierError(
            f"cannot write {target}: {exc.strerror or exc} in {folder} (choose a folder you can write to)"
        ) from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: str | Path, flag: str, example_name: str) -> Path:
    """A file we will be able to write later: not a folder, in an existing writable folder."""
    p = Path(path)
    if p.is_dir():
        raise LlamatierError(f"{flag} {p} is a directory: give a file name such as {p / example_name}")
    _check_folder_writable(p.parent, p)
    if p.exists() and not os.access(p, os.W_OK):
        raise LlamatierError(f"cannot write {p}: the file is read-only (choose another {flag} or make it writable)")
    return p


def make_output_dir(path: str | Path, flag: str) -> Path:
    """Create the output folder ``path`` (and its parents) now; a clear error if that is impossible."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise LlamatierError(f"{flag} {p} is a file; give a directory to write into")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LlamatierError(
            f"cannot create {flag} directory {p}: {exc.strerror or exc} (choose a folder you can write to)"
        ) from None
    _check_folder_writable(p, p)
    return p
