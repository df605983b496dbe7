"""Parse and format sizes, durations and rates. Internals use bytes and seconds."""

from __future__ import annotations

import math
import re

from llamatier.errors import LlamatierError

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size_bytes(text: str, *, what: str = "size") -> int:
    """Parse '2GiB', '512 MB', '1e9' into bytes (SI for kB/MB/GB, binary for KiB/MiB/GiB)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise LlamatierError(
            f"invalid {what} {text!r}: give a number with an optional unit, e.g. 2GiB, 512MB, 1e9"
        )
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit not in _SIZE_UNITS:
        raise LlamatierError(
            f"invalid {what} {text!r}: unknown unit {m.group(2)!r}; use B, kB, MB, GB, TB, KiB, MiB, GiB or TiB"
        )
    nbytes = value * _SIZE_UNITS[unit]
    if not math.isfinite(nbytes):
        raise LlamatierError(f"invalid {what} {text!r}: the number is too large; give a size such as 2GiB or 1TiB")
    return int(round(nbytes))


def format_bytes(n: float) -> str:
    """Human-readable binary size, e.g. 1.50 GiB."""
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            if unit == "B":
                return f"{sign}{n:.0f} B"
            return f"{sign}{n:.2f} {unit}"
        n /= 1024
    return f"{sign}{n:.2f} PiB"  # pragma: no cover


def format_seconds(s: float) -> str:
    """Human-readable duration choosing ns/us/ms/s."""
    a = abs(s)
    if a == 0:
        return "0 s"
    if a < 1e-6:
        return f"{s * 1e9:.1f} ns"
    if a < 1e-3:
        return f"{s * 1e6:.1f} us"
    if a < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"
