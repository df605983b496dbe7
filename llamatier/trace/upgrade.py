"""Upgrade a v1 trace (no checksums) to v2 in place, after checking every value.

v1 counted a chunk once its steps file existed and recorded no checksum. The
upgrade reads every chunk as v1 did, builds the v2 records (step range, rows,
size, SHA-256 of each file), and runs the v2 schema and every value rule on the
result before it rewrites ``meta.json``: a v1 trace that breaks a rule is
refused, and nothing is written.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import polars as pl

from llamatier.errors import TraceFormatError
from llamatier.outpaths import atomic_write_bytes
from llamatier.schema import loads_strict_json, validate
from llamatier.trace.checks import ChunkChecker, file_record, read_chunk_table
from llamatier.trace.format import FORMAT_NAME, FORMAT_VERSION, META_FILE, chunk_name
from llamatier.trace.schema import TraceMeta, seal
from llamatier.trace.writer import meta_json_bytes


def _v1_meta(p: Path) -> dict[str, Any]:
    mp = p / META_FILE
    if not mp.is_file():
        raise TraceFormatError(f"{p} is not a llamatier trace: {META_FILE} is missing")
    try:
        meta = loads_strict_json(mp.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        raise TraceFormatError(f"{mp} is not readable JSON: the trace metadata is corrupt; re-record the trace") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise TraceFormatError(f"{p} is not a llamatier trace ({META_FILE} has no format '{FORMAT_NAME}')")
    return meta


def upgrade_trace(path: str | Path) -> int:
    """Upgrade the v1 trace at ``path`` to v2 in place; returns the number of chunks recorded.

    A trace that is already v2 is left as it is (and 0 returned).
    """
    p = Path(path)
    meta = _v1_meta(p)
    if meta.get("version") == FORMAT_VERSION:
        return 0
    if meta.get("version") != 1:
        raise TraceFormatError(f"{p} is trace format v{meta.get('version')}: only v1 traces can be upgraded")
    chunks = []
    first = 0
    i = 0
    while (p / chunk_name("steps", i)).exists():
        files = {}
        for table in ("steps", "attn", "positions"):
            f = p / chunk_name(table, i)
            if table == "positions" and not f.exists():
                continue
            if not f.exists():
                raise TraceFormatError(f"trace {p} is truncated: {f.name} is missing; re-record the trace")
            data = f.read_bytes()
            try:
                rows = pl.read_parquet(io.BytesIO(data)).height
            except Exception:
                raise TraceFormatError(f"trace chunk {f} is not readable Parquet; re-record the trace") from None
            files[table] = file_record(f.name, data, rows)
        n = files["steps"]["rows"]
        chunks.append({"index": i, "first_step": first, "n_steps": n, "files": files})
        first += n
        i += 1
    new = dict(meta)
    new.update(version=FORMAT_VERSION, chunks=chunks, n_chunks=len(chunks))
    if not new.get("complete"):
        new["n_steps"] = first  # v1 counted what was on disk
    new.setdefault("chunk_steps", max([c["n_steps"] for c in chunks] or [1]))
    new = seal(new)
    tm = validate(TraceMeta, new, source=str(p / META_FILE), error=TraceFormatError,
                  fix="the v1 trace cannot be upgraded; re-record it")
    checker = ChunkChecker(tm, p)
    for rec in tm.chunks:
        tables = {t: read_chunk_table(p, t, f) for t, f in rec.files.items()}
        checker.check_chunk(rec, tables["steps"], tables["attn"], tables.get("positions"))
    checker.finish()
    atomic_write_bytes(p / META_FILE, meta_json_bytes(new))
    return len(chunks)
