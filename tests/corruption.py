"""Ways to break traces, profiles and workloads, and how to judge what llamatier made of them.

Shared by the hypothesis fuzzers in tests/test_integrity_fuzz.py and by
bench/fuzz_inputs.py (the large run that gives the goal figures). Every
operation takes a ``random.Random`` so that a seed reproduces a case.

Trace operations come in two kinds:

* ``raw``: what a disk, a copy or a hand edit does (flipped bytes, truncation,
  deleted, swapped or emptied chunks, edited fields, re-typed columns), with the
  checksums left as they were. The outcome must be a one-line error or a result
  identical to the clean trace's.
* ``sealed``: the same semantic damage, then every checksum recomputed, as a
  buggy or hostile writer would leave it. These exercise the declared schema and
  the value rules; each breaks a rule (a wrong type, a non-finite or out-of-range
  value, rows missing, duplicated, shuffled or from other steps), so the outcome
  must again be one line, or identical where the damage did not change what the
  trace says (a zero-mass row dropped, an unused optional field nulled).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import random
import re
import subprocess
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

Op = Callable[[Path, random.Random], str]  # mutate the trace dir in place; returns a description

# ---- judging outcomes --------------------------------------------------------------------------

_NONDETERMINISTIC = {"trace", "wall_s", "block_accesses_per_s", "total_s", "per_step_s", "steps_per_s", "out", "plot"}


def normalise(obj: Any) -> Any:
    """JSON output without paths and timings (which differ between copies and runs)."""
    if isinstance(obj, dict):
        return {k: normalise(v) for k, v in obj.items() if k not in _NONDETERMINISTIC}
    if isinstance(obj, list):
        return [normalise(v) for v in obj]
    return obj


def cli_run(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI in this process (typer's CliRunner); an escaped exception becomes a traceback."""
    from typer.testing import CliRunner

    from llamatier.cli import app

    res = CliRunner().invoke(app, list(args))
    err = res.stderr
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        err += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(res.exception))
    return subprocess.CompletedProcess(list(args), res.exit_code, res.stdout, err)


def judge(proc: subprocess.CompletedProcess, clean: Any) -> str:
    """``error`` (one line, non-zero exit), ``identical`` (same JSON as the clean input), or a failure:
    ``traceback``, ``multi-line`` (an error over several lines) or ``silent`` (exit 0, other result)."""
    text = proc.stdout + proc.stderr
    if "Traceback" in text:
        return "traceback"
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return "error" if len(lines) == 1 else "multi-line"
    try:
        out = normalise(json.loads(proc.stdout))
    except ValueError:
        return "silent"
    return "identical" if out == clean else "silent"


# ---- trace directories ------------------------------------------------------------------------

_CHUNK = re.compile(r"^(steps|attn|positions)-(\d+)\.parquet$")


def meta_of(d: Path) -> dict[str, Any]:
    return json.loads((d / "meta.json").read_text())


def write_meta(d: Path, meta: dict[str, Any], *, seal: bool) -> None:
    """Write ``meta`` as meta.json; with ``seal`` recompute every chunk record and meta_sha256 first."""
    from llamatier.trace.schema import meta_digest

    meta = copy.deepcopy(meta)
    if seal:
        for chunk in meta.get("chunks") or []:
            for rec in (chunk.get("files") or {}).values():
                f = d / str(rec.get("name"))
                if f.is_file():
                    data = f.read_bytes()
                    rec["bytes"], rec["sha256"] = len(data), hashlib.sha256(data).hexdigest()
                    try:
                        rec["rows"] = pl.read_parquet(io.BytesIO(data)).height
                    except Exception:
                        pass
        try:
            meta["meta_sha256"] = meta_digest(meta)
        except (TypeError, ValueError):
            pass
    (d / "meta.json").write_text(json.dumps(meta, indent=1, default=str))


def reseal(d: Path) -> None:
    write_meta(d, meta_of(d), seal=True)


def chunk_files(d: Path, table: str | None = None) -> list[Path]:
    return sorted(f for f in d.iterdir() if (m := _CHUNK.match(f.name)) and (table is None or m.group(1) == table))


def _pick_file(d: Path, rnd: random.Random) -> Path:
    return rnd.choice(sorted(f for f in d.iterdir() if f.is_file() and not f.name.startswith(".")))


def flip_byte(d: Path, rnd: random.Random) -> str:
    f = _pick_file(d, rnd)
    data = bytearray(f.read_bytes())
    i = rnd.randrange(len(data))
    data[i] ^= rnd.randrange(1, 256)
    f.write_bytes(bytes(data))
    return f"flip byte {i} of {f.name}"


def truncate(d: Path, rnd: random.Random) -> str:
    f = _pick_file(d, rnd)
    data = f.read_bytes()
    n = rnd.randrange(len(data))
    f.write_bytes(data[:n])
    return f"truncate {f.name} to {n} bytes"


def append_garbage(d: Path, rnd: random.Random) -> str:
    f = _pick_file(d, rnd)
    f.write_bytes(f.read_bytes() + bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 64))))
    return f"append bytes to {f.name}"


def zero_range(d: Path, rnd: random.Random) -> str:
    f = _pick_file(d, rnd)
    data = bytearray(f.read_bytes())
    i = rnd.randrange(len(data))
    n = rnd.randrange(1, 256)
    data[i : i + n] = bytes(len(data[i : i + n]))
    f.write_bytes(bytes(data))
    return f"zero {n} bytes at {i} of {f.name}"


def not_utf8(d: Path, rnd: random.Random) -> str:
    f = d / "meta.json"
    data = f.read_bytes()
    i = rnd.randrange(len(data))
    f.write_bytes(data[:i] + b"\xff\xfe" + data[i:])
    return "meta.json with bytes that are not UTF-8"


def delete_file(d: Path, rnd: random.Random) -> str:
    f = _pick_file(d, rnd)
    f.unlink()
    return f"delete {f.name}"


def _same_table_pair(d: Path, rnd: random.Random) -> tuple[Path, Path]:
    table = rnd.choice(["steps", "attn", "positions"])
    files = chunk_files(d, table) or chunk_files(d, "steps")
    a, b = rnd.sample(files, 2)
    return a, b


def swap_chunks(d: Path, rnd: random.Random) -> str:
    a, b = _same_table_pair(d, rnd)
    ta, tb = a.read_bytes(), b.read_bytes()
    a.write_bytes(tb)
    b.write_bytes(ta)
    return f"swap {a.name} and {b.name}"


def copy_chunk(d: Path, rnd: random.Random) -> str:
    a, b = _same_table_pair(d, rnd)
    b.write_bytes(a.read_bytes())
    return f"overwrite {b.name} with {a.name}"


def empty_chunk(d: Path, rnd: random.Random) -> str:
    f = rnd.choice(chunk_files(d))
    pl.read_parquet(f).clear().write_parquet(f)
    return f"empty {f.name} (0 rows)"


def extra_chunk(d: Path, rnd: random.Random) -> str:
    files = chunk_files(d, "steps")
    last = files[-1]
    n = int(_CHUNK.match(last.name).group(2)) + 1  # type: ignore[union-attr]
    for table in ("steps", "attn", "positions"):
        src = d / f"{table}-{n - 1:05d}.parquet"
        if src.exists():
            (d / f"{table}-{n:05d}.parquet").write_bytes(src.read_bytes())
    return f"add an unlisted chunk {n}"


def _leaves(obj: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _leaves(v, (*path, k))] or [path]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in _leaves(v, (*path, i))] or [path]
    return [path]


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> None:
    _get(obj, path[:-1])[path[-1]] = value


def hostile_value(value: Any, rnd: random.Random) -> Any:
    """A value of another JSON type than ``value``, or a number past every physical bound."""
    pool: list[Any] = ["abc", "18", None, True, [], {}, 3.5, 7, 1.5e300, -1.5e300, -7]
    kind = type(value)

    def differs(v: Any) -> bool:
        if isinstance(value, bool) or isinstance(v, bool):
            return type(v) is not kind
        if isinstance(value, int | float) and isinstance(v, int | float):
            if isinstance(value, int) and isinstance(v, float):
                return True  # 3.5 or 1.5e300 for an integer
            return abs(v) > 1e200  # only a number past every bound counts for a float field
        return type(v) is not kind

    return rnd.choice([v for v in pool if differs(v)])


def _meta_field(d: Path, rnd: random.Random, *, seal: bool) -> str:
    from llamatier.trace.schema import TraceMeta
    from tests.schemawalk import declared_nullable

    meta = meta_of(d)
    path = rnd.choice([p for p in _leaves(meta) if p and p[-1] != "meta_sha256"])
    old = _get(meta, path)
    new = hostile_value(old, rnd)
    while new is None and declared_nullable(TraceMeta, path):  # null is "not known" there: a valid file
        new = hostile_value(old, rnd)
    _set(meta, path, new)
    write_meta(d, meta, seal=seal)
    return f"{'.'.join(map(str, path))}: {old!r} -> {new!r}"


def meta_field(d: Path, rnd: random.Random) -> str:
    return _meta_field(d, rnd, seal=False)


def meta_field_sealed(d: Path, rnd: random.Random) -> str:
    return _meta_field(d, rnd, seal=True)


_REQUIRED_META = (
    ("format",), ("version",), ("complete",), ("n_steps",), ("block_tokens",), ("chunks",), ("model",),
    ("model", "n_layers"), ("model", "geometry"), ("model", "geometry", "head_dim_k"), ("model", "weight_bytes"),
    ("context",), ("context", "n_ctx"), ("context", "type_k"), ("context", "n_prompt_tokens"), ("capture",),
    ("capture", "enabled"), ("chunks", 0, "files"), ("chunks", 0, "files", "attn"),
)


def meta_delete_sealed(d: Path, rnd: random.Random) -> str:
    meta = meta_of(d)
    path = rnd.choice(_REQUIRED_META)
    del _get(meta, path[:-1])[path[-1]]
    write_meta(d, meta, seal=True)
    return f"delete {'.'.join(map(str, path))}"


def meta_nan(d: Path, rnd: random.Random) -> str:
    meta = meta_of(d)
    path = rnd.choice([p for p in _leaves(meta) if isinstance(_get(meta, p), int | float)])
    _set(meta, path, rnd.choice([math.nan, math.inf, -math.inf]))
    write_meta(d, meta, seal=rnd.random() < 0.5)
    return f"{'.'.join(map(str, path))} = NaN/Infinity"


# -- table edits (sealed unless stated) -----------------------------------------------------------


def _rewrite(d: Path, f: Path, df: pl.DataFrame, *, seal: bool = True) -> None:
    df.write_parquet(f, compression="zstd", statistics=False)
    if seal:
        reseal(d)


_CASTS = [pl.Float64, pl.Int64, pl.Utf8, pl.Float32, pl.Int32, pl.UInt64]


def _cast(d: Path, rnd: random.Random, *, seal: bool) -> str:
    f = rnd.choice(chunk_files(d))
    df = pl.read_parquet(f)
    col = rnd.choice(df.columns)
    to = rnd.choice([t for t in _CASTS if t != df[col].dtype])
    try:
        new = df.with_columns(df[col].cast(to, strict=False))
    except Exception:
        new = df.with_columns(df[col].cast(pl.Utf8))
        to = pl.Utf8
    _rewrite(d, f, new, seal=seal)
    return f"{f.name}: {col} cast to {to}"


def dtype_cast(d: Path, rnd: random.Random) -> str:
    return _cast(d, rnd, seal=False)


def dtype_cast_sealed(d: Path, rnd: random.Random) -> str:
    return _cast(d, rnd, seal=True)


def columns_sealed(d: Path, rnd: random.Random) -> str:
    f = rnd.choice(chunk_files(d))
    df = pl.read_parquet(f)
    col = rnd.choice(df.columns)
    how = rnd.choice(["drop", "rename", "add", "reorder"])
    if how == "drop":
        df = df.drop(col)
    elif how == "rename":
        df = df.rename({col: col + "_x"})
    elif how == "add":
        df = df.with_columns(pl.lit(1).alias("extra"))
    else:
        df = df.select(list(reversed(df.columns)))
    _rewrite(d, f, df)
    return f"{f.name}: {how} column {col}"


def rows_sealed(d: Path, rnd: random.Random) -> str:
    f = rnd.choice(chunk_files(d))
    df = pl.read_parquet(f)
    how = rnd.choice(["drop-last", "drop-first", "duplicate", "shuffle", "reverse", "empty"])
    n = df.height
    if how == "drop-last":
        df = df.head(max(0, n - rnd.randrange(1, 4)))
    elif how == "drop-first":
        df = df.tail(max(0, n - rnd.randrange(1, 4)))
    elif how == "duplicate":
        i = rnd.randrange(n)
        df = pl.concat([df.head(i + 1), df.slice(i, 1), df.tail(n - i - 1)])
    elif how == "shuffle":
        df = df.sample(fraction=1.0, shuffle=True, seed=rnd.randrange(1 << 30))
    elif how == "reverse":
        df = df.reverse()
    else:
        df = df.clear()
    _rewrite(d, f, df)
    return f"{f.name}: rows {how}"


_HOSTILE_CELLS: dict[str, list[Any]] = {
    "mass": [math.nan, math.inf, -math.inf, -0.5, 1.5, 1000.0, "x1000", "zero-group", "+0.25"],
    "phase": ["other", "", "Decode", "PREFILL"],
    "n_tokens": [0, "+1", 1_000_000],
    "pos0": [1_000_000, "+1", "-1"],
    "n_kv": [0, 10_000_000, "ctx-1"],
    "token_in": [-5, 2_000_000_000, "+1"],
    "token_out": [-7, 2_000_000_000],
    "step": ["+1", "-1", 10_000],
    "layer": [10_000, "+1"],
    "block": [1_000_000, "+1", "-1"],
    "pos": [10_000_000, "+1"],
    "t_start_s": [math.nan, -1.0, math.inf, "-1"],
    "decode_s": [math.nan, -1.0, 0.0, math.inf],
    "capture_s": [math.nan, -1.0, math.inf],
    "perf_t_p_eval_ms": [math.nan, -1.0, "back"],
    "perf_t_eval_ms": [math.nan, -1.0, "back"],
    "perf_n_p_eval": [-1, "back"],
    "perf_n_eval": [-1, "back"],
}
# "back": below the row before (cumulative counters); lowering a counter by 1 can keep it in order,
# a plausible value that only the checksum (left unsealed) could tell


def _decrement_ok(df: pl.DataFrame, col: str, i: int) -> bool:
    return df[col][i] is not None and df[col][i] > 0


def value_sealed(d: Path, rnd: random.Random) -> str:
    """Set one cell of a chunk table to a value that breaks a rule, keep dtypes, reseal."""
    f = rnd.choice(chunk_files(d))
    df = pl.read_parquet(f)
    col = rnd.choice([c for c in df.columns if c in _HOSTILE_CELLS])
    i = rnd.randrange(df.height) if df.height else 0
    how = rnd.choice(_HOSTILE_CELLS[col])
    s = df[col].to_list()
    if not s:
        return f"{f.name} is empty: nothing changed"
    if how == "x1000":  # on the row of most mass: x1000 of a faint row can stay below the sum tolerance
        i = max(range(len(s)), key=lambda k: s[k])
        s[i] = s[i] * 1000 if s[i] else 1000.0
    elif how == "+0.25":
        s[i] = s[i] + 0.25
    elif how == "zero-group":
        key = (df["step"][i], df["layer"][i])
        s = [0.0 if (a, b) == key else v for a, b, v in zip(df["step"], df["layer"], s, strict=True)]
    elif how == "+1":
        s[i] = s[i] + 1
    elif how == "-1":
        if not _decrement_ok(df, col, i):
            i = next((k for k in range(len(s)) if _decrement_ok(df, col, k)), None)
            if i is None:
                return f"{f.name}: {col} has no value to lower: nothing changed"
        s[i] = s[i] - 1
    elif how == "back":
        i = next((k for k in range(1, len(s)) if s[k - 1] and s[k - 1] >= 1), None)
        if i is None:
            return f"{f.name}: {col} has no row to set below the one before: nothing changed"
        s[i] = s[i - 1] - 1
    elif how == "ctx-1":
        s[i] = max(0, int(df["pos0"][i]) + int(df["n_tokens"][i]) - 1)
    else:
        s[i] = how
    dtype = df[col].dtype
    try:
        new_col = pl.Series(col, s, dtype=dtype, strict=False)
    except Exception:
        return f"{f.name}: {col} cannot hold {how!r}: nothing changed"
    if new_col.null_count() > df[col].null_count():
        return f"{f.name}: {col} cannot hold {how!r}: nothing changed"
    _rewrite(d, f, df.with_columns(new_col))
    return f"{f.name}: row {i} {col} {how!r}"


def chunks_sealed(d: Path, rnd: random.Random) -> str:
    how = rnd.choice([swap_chunks, copy_chunk, empty_chunk])
    text = how(d, rnd)
    reseal(d)
    return text + " (resealed)"


def drop_chunk_record_sealed(d: Path, rnd: random.Random) -> str:
    meta = meta_of(d)
    i = rnd.randrange(len(meta["chunks"]))
    del meta["chunks"][i]
    meta["n_chunks"] = len(meta["chunks"])
    write_meta(d, meta, seal=True)
    return f"chunk {i} removed from meta.json (resealed)"


RAW_TRACE_OPS: dict[str, Op] = {
    "flip-byte": flip_byte,
    "truncate": truncate,
    "append-garbage": append_garbage,
    "zero-range": zero_range,
    "not-utf8": not_utf8,
    "delete-file": delete_file,
    "swap-chunks": swap_chunks,
    "copy-chunk": copy_chunk,
    "empty-chunk": empty_chunk,
    "extra-chunk": extra_chunk,
    "meta-field": meta_field,
    "meta-nan": meta_nan,
    "dtype": dtype_cast,
}

SEALED_TRACE_OPS: dict[str, Op] = {
    "meta-field": meta_field_sealed,
    "meta-delete": meta_delete_sealed,
    "dtype": dtype_cast_sealed,
    "columns": columns_sealed,
    "rows": rows_sealed,
    "value": value_sealed,
    "chunks": chunks_sealed,
    "drop-chunk-record": drop_chunk_record_sealed,
}
