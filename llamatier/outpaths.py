"""Output paths checked before long work starts, so a bad --out fails in a second, not after the run."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
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


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """``write(tmp)`` into a unique temporary file beside ``path``, fsync it, rename it over ``path``.

    A reader sees the old file or the whole new one, never a part; two writers never share a
    temporary name. The temporary file is removed if writing fails or is interrupted.
    """
    p = Path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


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


class OutputClaim:
    """An exclusive claim on an output (a locked file beside or inside it), held until :meth:`release`.

    The lock is an ``flock`` on ``lock_path``: the kernel drops it when the process ends, even on
    ``kill -9``, so a crashed writer never blocks the next one.
    """

    def __init__(self, lock_path: Path, fd: int) -> None:
        self.lock_path = lock_path
        self._fd: int | None = fd

    def release(self) -> None:
        """Remove the lock file, then drop the lock (a claimer that opened the old file retries)."""
        if self._fd is None:
            return
        try:
            self.lock_path.unlink()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_output(lock_path: str | Path, target: str | Path, flag: str, what: str) -> OutputClaim:
    """Claim ``target`` for this process through ``lock_path``; one line if another process holds it."""
    import fcntl

    lock = Path(lock_path)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LlamatierError(
                f"cannot claim {flag} {target}: {exc.strerror or exc} (choose a folder you can write to)"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise LlamatierError(
                f"{flag} {target} is being written by another llamatier {what} (pid {holder}); "
                f"wait for it to finish or choose another {flag}"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed the file after we opened it: claim the new one
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return OutputClaim(lock, fd)
