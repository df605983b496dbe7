"""Read llama-bench results in its json, jsonl, csv and markdown output formats.

The formats are those of llama.cpp's ``tools/llama-bench`` (README section
"Output formats", printers in ``llama-bench.cpp``):

- ``-o json``: one JSON array of test objects;
- ``-o jsonl``: one test object per line;
- ``-o csv``: a header row of field names, one row per test;
- ``-o md`` (the default): a table whose columns are display names (``ngl`` for
  n_gpu_layers, ``threads``, ``nkvo``, ``fa`` ...), sizes printed as ``3.56 GiB``,
  parameters as ``6.74 B``, the test as ``pp512``, ``tg128``, ``pp512+tg128`` or
  ``tg128 @ d4096`` (older builds: ``pp 512``), and ``t/s`` as ``avg ± stddev``,
  followed by ``build: COMMIT (NUMBER)``. Pasted console output may also carry
  the ``Device 0: NAME, compute capability X.Y`` lines that name the GPU.

Every row comes back with llama-bench's own field names (:data:`FIELDS`);
fields a format does not carry are null. Extra columns (a published set's
source columns) are kept as strings.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from llamatier.errors import LlamatierError
from llamatier.userfiles import read_text_file

# llama-bench's field names with the type its printers use (test::get_field_type), plus
# the provenance columns llamatier adds: where the row came from.
FIELDS: dict[str, Any] = {
    "build_commit": pl.Utf8,
    "build_number": pl.Int64,
    "cpu_info": pl.Utf8,
    "gpu_info": pl.Utf8,
    "backends": pl.Utf8,
    "model_filename": pl.Utf8,
    "model_type": pl.Utf8,
    "model_size": pl.Int64,
    "model_n_params": pl.Int64,
    "n_batch": pl.Int64,
    "n_ubatch": pl.Int64,
    "n_threads": pl.Int64,
    "type_k": pl.Utf8,
    "type_v": pl.Utf8,
    "n_gpu_layers": pl.Int64,
    "split_mode": pl.Utf8,
    "main_gpu": pl.Int64,
    "no_kv_offload": pl.Boolean,
    "flash_attn": pl.Int64,  # -1 auto, 0 off, 1 on (older builds print a bool)
    "n_prompt": pl.Int64,
    "n_gen": pl.Int64,
    "n_depth": pl.Int64,
    "test_time": pl.Utf8,
    "avg_ns": pl.Float64,
    "stddev_ns": pl.Float64,
    "avg_ts": pl.Float64,
    "stddev_ts": pl.Float64,
}
PROVENANCE = ("source_file", "source_format")
FORMATS = ("json", "jsonl", "csv", "md")

# markdown display name -> field (llama-bench.cpp markdown_printer::get_field_display_name)
_MD_COLUMNS = {
    "model": "model_type",
    "size": "model_size",
    "params": "model_n_params",
    "backend": "backends",
    "ngl": "n_gpu_layers",
    "threads": "n_threads",
    "n_batch": "n_batch",
    "n_ubatch": "n_ubatch",
    "type_k": "type_k",
    "type_v": "type_v",
    "main_gpu": "main_gpu",
    "sm": "split_mode",
    "nkvo": "no_kv_offload",
    "fa": "flash_attn",
    "test": "test",
    "t/s": "t/s",
}
_SIZE_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}
_PARAM_UNITS = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
_TEST_RE = re.compile(
    r"^\s*(?:pp\s*(?P<pp>\d+))?\s*\+?\s*(?:tg\s*(?P<tg>\d+))?\s*(?:@\s*d\s*(?P<d>\d+))?\s*$"
)
_BUILD_RE = re.compile(r"build:\s*([0-9a-fA-F]+)\s*\((\d+)\)")
_DEVICE_RE = re.compile(r"Device\s+\d+:\s*([^,\n]+?)\s*,\s*compute capability")


class LlamaBenchFormatError(LlamatierError):
    """A llama-bench output file that cannot be read as any of its formats."""


def _err(path: str, what: str) -> LlamaBenchFormatError:
    return LlamaBenchFormatError(
        f"{path}: {what} (llamatier reads llama-bench's -o json, jsonl, csv or md output)"
    )


def parse_test_name(text: str) -> tuple[int, int, int]:
    """``"pp512"``, ``"tg128 @ d4096"``, ``"pp512+tg128"``, ``"pp 512"`` -> (n_prompt, n_gen, n_depth)."""
    m = _TEST_RE.match(text or "")
    if not m or (m.group("pp") is None and m.group("tg") is None):
        raise ValueError(f"not a llama-bench test name: {text!r}")
    return int(m.group("pp") or 0), int(m.group("tg") or 0), int(m.group("d") or 0)


def format_test(n_prompt: int, n_gen: int, n_depth: int) -> str:
    """The markdown test name llama-bench prints for these counts (``pp512``, ``tg128 @ d4096``)."""
    if n_prompt > 0 and n_gen == 0:
        name = f"pp{n_prompt}"
    elif n_gen > 0 and n_prompt == 0:
        name = f"tg{n_gen}"
    else:
        name = f"pp{n_prompt}+tg{n_gen}"
    return name + (f" @ d{n_depth}" if n_depth > 0 else "")


def throughput_error(measured_s: Sequence[float] | np.ndarray, predicted_s: np.ndarray) -> np.ndarray:
    """Error of predicted throughput per test (predicted t/s / measured t/s - 1), from test times."""
    return np.asarray(measured_s, dtype=np.float64) / np.asarray(predicted_s, dtype=np.float64) - 1.0


@dataclass(frozen=True)
class RowsFit:
    """A fit's rows (each with a measured test time, ``measured_s``) and its predicted times."""

    rows: tuple[Any, ...]
    predicted_s: np.ndarray

    @property
    def rel_error(self) -> np.ndarray:
        """Error of the predicted throughput per row (predicted t/s / measured t/s - 1)."""
        return throughput_error([r.measured_s for r in self.rows], self.predicted_s)


def _parse_size(text: str) -> int:
    num, _, unit = text.strip().partition(" ")
    if unit.strip() not in _SIZE_UNITS:
        raise ValueError(f"unknown size unit in {text!r}")
    return int(round(float(num) * _SIZE_UNITS[unit.strip()]))


def _parse_params(text: str) -> int:
    num, _, unit = text.strip().partition(" ")
    if unit.strip() not in _PARAM_UNITS:
        raise ValueError(f"unknown parameter unit in {text!r}")
    return int(round(float(num) * _PARAM_UNITS[unit.strip()]))


def _to_bool(value: Any) -> bool | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _to_flash_attn(value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return int(value)
    text = str(value).strip().lower()
    named = {"auto": -1, "on": 1, "off": 0, "true": 1, "false": 0}
    return named[text] if text in named else int(text)


def _coerce(field: str, value: Any) -> Any:
    """One value converted to the field's type; '' and None are null."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    kind = FIELDS[field]
    if field == "flash_attn":
        return _to_flash_attn(value)
    if kind == pl.Boolean:
        return _to_bool(value)
    if kind == pl.Int64:
        if isinstance(value, bool):
            return int(value)
        return int(round(float(value)))
    if kind == pl.Float64:
        return float(value)
    return str(value)


def _normalise(records: Iterable[dict[str, Any]], path: str, fmt: str) -> list[dict[str, Any]]:
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise _err(path, f"entry {i + 1} is not an object of llama-bench fields")
        row: dict[str, Any] = {}
        for key, value in rec.items():
            if key in ("samples_ns", "samples_ts"):
                continue
            try:
                row[key] = _coerce(key, value) if key in FIELDS else (None if value is None else str(value))
            except (ValueError, KeyError, TypeError):
                raise _err(path, f"entry {i + 1}: field {key} has an unreadable value {value!r}") from None
        missing = [k for k in ("model_type", "n_prompt", "n_gen", "avg_ts") if row.get(k) is None]
        if missing:
            raise _err(path, f"entry {i + 1} lacks {', '.join(missing)}")
        if row["avg_ts"] <= 0:
            raise _err(path, f"entry {i + 1} has avg_ts {row['avg_ts']!r}: a measured rate must be > 0")
        row.setdefault("n_depth", 0)
        row["source_file"] = path
        row["source_format"] = fmt
        out.append(row)
    return out


def _read_json(text: str, path: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _err(path, f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise _err(path, "JSON output must be an array of test objects")
    return _normalise(data, path, "json")


def _read_jsonl(text: str, path: str) -> list[dict[str, Any]]:
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise _err(path, f"line {n} is not valid JSON ({exc.msg})") from None
    return _normalise(records, path, "jsonl")


def _read_csv(text: str, path: str) -> list[dict[str, Any]]:
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    if not rows or "avg_ts" not in rows[0]:
        raise _err(path, "CSV output needs a header row with llama-bench field names (avg_ts, n_prompt, ...)")
    header = rows[0]
    for n, row in enumerate(rows[1:], 1):
        if len(row) != len(header):
            raise _err(path, f"CSV row {n} has {len(row)} values for {len(header)} header fields: the row and "
                       "the header do not line up (re-run llama-bench -o csv rather than editing the file)")
    return _normalise([dict(zip(header, row, strict=True)) for row in rows[1:]], path, "csv")


def _md_cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _read_md(text: str, path: str) -> list[dict[str, Any]]:
    lines = text.splitlines()
    records: list[dict[str, Any]] = []
    devices: list[str] = []
    table_start = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        dev = _DEVICE_RE.search(line)
        if dev:
            devices.append(dev.group(1).strip())
        build = _BUILD_RE.search(line)
        if build:
            for rec in records[table_start:]:
                rec.setdefault("build_commit", build.group(1))
                rec.setdefault("build_number", build.group(2))
        is_header = line.strip().startswith("|") and i + 1 < len(lines) and set(
            lines[i + 1].replace("|", "").replace(":", "").replace(" ", "")) == {"-"}
        if not is_header:
            i += 1
            continue
        header = _md_cells(line)
        if "test" not in header or "t/s" not in header:
            i += 1
            continue
        table_start = len(records)
        gpu = ", ".join(devices) if devices else None
        devices = []
        i += 2
        while i < len(lines) and lines[i].strip().startswith("|"):
            cells = _md_cells(lines[i])
            i += 1
            if len(cells) != len(header):
                raise _err(path, f"markdown row {cells!r} has {len(cells)} cells for {len(header)} columns")
            rec: dict[str, Any] = {}
            try:
                for name, value in zip(header, cells, strict=True):
                    field = _MD_COLUMNS.get(name, name)
                    if field == "model_size":
                        rec[field] = _parse_size(value)
                    elif field == "model_n_params":
                        rec[field] = _parse_params(value)
                    elif field == "test":
                        rec["n_prompt"], rec["n_gen"], rec["n_depth"] = parse_test_name(value)
                    elif field == "t/s":
                        avg, _, std = value.partition("±")
                        rec["avg_ts"] = float(avg)
                        rec["stddev_ts"] = float(std) if std.strip() else None
                    elif field in FIELDS:
                        rec[field] = value
            except ValueError as exc:
                raise _err(path, f"markdown row {' | '.join(cells)}: {exc}") from None
            if gpu is not None:
                rec["gpu_info"] = gpu
            records.append(rec)
    if not records:
        raise _err(path, "no llama-bench table found (a markdown table with 'test' and 't/s' columns)")
    return _normalise(records, path, "md")


def sniff_format(text: str, path: str) -> str:
    """The output format of ``text``: by extension first, then by content."""
    ext = Path(path).suffix.lower().lstrip(".")
    if ext in FORMATS:
        return ext
    if ext == "markdown":
        return "md"
    head = text.lstrip()[:1]
    if head == "[":
        return "json"
    if head == "{":
        return "jsonl"
    first = text.lstrip().splitlines()[0] if text.strip() else ""
    if "avg_ts" in first and "," in first:
        return "csv"
    if "|" in text and "t/s" in text:
        return "md"
    raise _err(path, "cannot tell its format (give the file a .json, .jsonl, .csv or .md extension)")


def parse_llama_bench(text: str, *, path: str = "<text>", fmt: str | None = None) -> pl.DataFrame:
    """Rows of one llama-bench output given as text (``fmt`` None: sniffed)."""
    fmt = fmt or sniff_format(text, path)
    if fmt not in FORMATS:
        raise _err(path, f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    reader = {"json": _read_json, "jsonl": _read_jsonl, "csv": _read_csv, "md": _read_md}[fmt]
    return _frame(reader(text, path))


def _frame(records: list[dict[str, Any]]) -> pl.DataFrame:
    extra = sorted({k for r in records for k in r} - set(FIELDS) - set(PROVENANCE))
    schema = {**FIELDS, **{k: pl.Utf8 for k in extra}, **{k: pl.Utf8 for k in PROVENANCE}}
    cols = {k: [r.get(k) for r in records] for k in schema}
    return pl.DataFrame(cols, schema=schema)


def read_llama_bench(paths: str | Path | Sequence[str | Path]) -> pl.DataFrame:
    """Every row of one or more llama-bench output files (json, jsonl, csv, md; mixed is fine)."""
    if isinstance(paths, str | Path):
        paths = [paths]
    if not paths:
        raise LlamatierError("no llama-bench files given: pass at least one llama-bench output file")
    frames = []
    for p in paths:
        path = Path(p)
        text = read_text_file(path, what="llama-bench file", give="the file llama-bench -o ... wrote")
        frames.append(parse_llama_bench(text, path=str(path)))
    return pl.concat(frames, how="diagonal_relaxed")
