"""Save quality results (Parquet + JSON) and look a K/V pair up in a saved result.

An output directory holds:

    quality.json             {"format": "llamatier-quality", "version": 1, "meta": {...}, "rows": [...]}
    quality.parquet          one row per K/V pair, with the run's metadata as columns
    quality_positions.parquet  one row per (pair, scored position): kl, top1_agree, nll, nll_ref

An eviction measurement (``llamatier quality --evict``) writes eviction.json,
eviction.parquet (one row per policy and block budget) and
eviction_positions.parquet (one row per policy, budget and scored decode step).

``lookup_quality`` reads either of the first two (or a directory holding them).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import polars as pl

from llamatier.errors import LlamatierError
from llamatier.kvtypes import kv_type
from llamatier.outpaths import make_output_dir
from llamatier.quality.eviction import EvictionResult
from llamatier.quality.measure import QualityResult

FORMAT_NAME = "llamatier-quality"
FORMAT_VERSION = 1
JSON_FILE = "quality.json"
PARQUET_FILE = "quality.parquet"
POSITIONS_FILE = "quality_positions.parquet"

# Keys every lookup returns (the replay report shows them beside the saving).
LOOKUP_KEYS = (
    "model",
    "type_k",
    "type_v",
    "pair",
    "mean_kl",
    "p99_kl",
    "top1_agreement",
    "ppl",
    "ppl_ref",
    "ppl_change_pct",
    "bits_per_element",
    "saving_vs_f16",
    "n_tokens",
)
_META_COLUMNS = ("model", "model_file", "n_tokens", "flash_attn", "text_source", "text_sha256")


def _document(format_name: str, result: QualityResult | EvictionResult) -> dict[str, Any]:
    """The JSON document of a quality or eviction result: format, version, run metadata and rows."""
    return {
        "format": format_name,
        "version": FORMAT_VERSION,
        "meta": result.meta(),
        "rows": [asdict(r) for r in result.rows],
    }


def _frame(result: QualityResult | EvictionResult, meta_columns: tuple[str, ...]) -> pl.DataFrame:
    """One row per result row, with the run's ``meta_columns`` repeated as columns."""
    meta = result.meta()
    frame = pl.DataFrame([asdict(r) for r in result.rows])
    return frame.with_columns([pl.lit(meta[c]).alias(c) for c in meta_columns])


def _save(
    result: QualityResult | EvictionResult, out_dir: str | Path, *, what: str, doc: dict[str, Any],
    meta_columns: tuple[str, ...], files: tuple[str, str, str],
) -> list[Path]:
    """Write ``doc`` (JSON), the rows (Parquet) and the per-position rows if any; return the paths."""
    out = make_output_dir(out_dir, "--out")
    paths = [out / files[0], out / files[1]]
    try:
        paths[0].write_text(json.dumps(doc, indent=2) + "\n")
        _frame(result, meta_columns).write_parquet(paths[1])
        if result.positions is not None:
            paths.append(out / files[2])
            result.positions.write_parquet(paths[2])
    except OSError as exc:
        raise LlamatierError(f"cannot write {what} results to {out}: {exc.strerror or exc}") from None
    return paths


def result_to_dict(result: QualityResult) -> dict[str, Any]:
    """The JSON document for a result (no per-position arrays)."""
    return _document(FORMAT_NAME, result)


def rows_frame(result: QualityResult) -> pl.DataFrame:
    """One row per pair, with the run's identifying metadata repeated as columns."""
    return _frame(result, _META_COLUMNS)


def save_quality(result: QualityResult, out_dir: str | Path) -> list[Path]:
    """Write quality.json, quality.parquet and quality_positions.parquet; return their paths."""
    return _save(result, out_dir, what="quality", doc=result_to_dict(result), meta_columns=_META_COLUMNS,
                 files=(JSON_FILE, PARQUET_FILE, POSITIONS_FILE))


def _bad_file(p: Path, why: str) -> LlamatierError:
    return LlamatierError(
        f"{p} is not a llamatier quality result ({why}); give a quality.json or quality.parquet "
        "written by `llamatier quality --out DIR`"
    )


def load_quality_rows(path: str | Path) -> list[dict[str, Any]]:
    """All pair rows of a saved result (quality.json, quality.parquet, or a directory with one)."""
    p = Path(path)
    if p.is_dir():
        for name in (PARQUET_FILE, JSON_FILE):
            if (p / name).is_file():
                return load_quality_rows(p / name)
        raise LlamatierError(f"no {PARQUET_FILE} or {JSON_FILE} in {p}; run `llamatier quality --out {p}` first")
    if not p.is_file():
        raise LlamatierError(f"quality result not found: {p} (write one with `llamatier quality --out DIR`)")
    if p.suffix == ".parquet":
        try:
            rows = pl.read_parquet(p).to_dicts()
        except Exception as exc:
            raise _bad_file(p, f"unreadable Parquet: {type(exc).__name__}") from None
    elif p.suffix == ".json":
        try:
            doc = json.loads(p.read_text("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise _bad_file(p, f"invalid JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise _bad_file(p, f"no \"format\": \"{FORMAT_NAME}\" key")
        if doc.get("version") != FORMAT_VERSION:
            raise _bad_file(p, f"version {doc.get('version')!r}, this llamatier reads {FORMAT_VERSION}")
        meta = doc.get("meta") or {}
        rows = [{**{c: meta.get(c) for c in _META_COLUMNS}, **r} for r in doc.get("rows") or []]
    else:
        raise _bad_file(p, f"unknown extension {p.suffix!r}")
    missing = [k for k in LOOKUP_KEYS if rows and k not in rows[0]]
    if not rows or missing:
        raise _bad_file(p, f"missing columns {', '.join(missing)}" if missing else "no rows")
    return rows


def lookup_quality(path: str | Path, type_k: str, type_v: str) -> dict[str, Any] | None:
    """The measured accuracy of K/V pair (type_k, type_v) in a saved result, or None if absent.

    Keys: model, type_k, type_v, pair, mean_kl, p99_kl, top1_agreement, ppl, ppl_ref,
    ppl_change_pct, bits_per_element, saving_vs_f16, n_tokens.
    """
    k, v = kv_type(type_k).name, kv_type(type_v).name
    for row in load_quality_rows(path):
        if row["type_k"] == k and row["type_v"] == v:
            return {key: row[key] for key in LOOKUP_KEYS}
    return None


# -- eviction results ----------------------------------------------------------------------

EVICTION_FORMAT = "llamatier-eviction"
EVICTION_JSON = "eviction.json"
EVICTION_PARQUET = "eviction.parquet"
EVICTION_POSITIONS = "eviction_positions.parquet"
_EVICTION_META_COLUMNS = ("model", "trace", "trace_prompt_sha256", "trace_created_utc", "block_tokens", "n_steps")
EVICTION_KEYS = ("policy", "keep_blocks", "mean_kl", "p99_kl", "top1_agreement", "ppl_change_pct", "mass_dropped_mean")


def eviction_to_dict(result: EvictionResult) -> dict[str, Any]:
    """The JSON document for an eviction result (no per-step arrays)."""
    return _document(EVICTION_FORMAT, result)


def save_eviction(result: EvictionResult, out_dir: str | Path) -> list[Path]:
    """Write eviction.json, eviction.parquet and eviction_positions.parquet; return their paths."""
    return _save(result, out_dir, what="eviction", doc=eviction_to_dict(result), meta_columns=_EVICTION_META_COLUMNS,
                 files=(EVICTION_JSON, EVICTION_PARQUET, EVICTION_POSITIONS))


def load_eviction_rows(path: str | Path) -> pl.DataFrame:
    """The rows of a saved eviction result (eviction.parquet, or a directory holding it), run metadata as columns."""
    p = Path(path)
    if p.is_dir():
        p = p / EVICTION_PARQUET
    if not p.is_file():
        raise LlamatierError(
            f"eviction result not found: {p} (write one with `llamatier quality MODEL --trace TRACE --evict ... --out DIR`)"
        )
    try:
        frame = pl.read_parquet(p)
    except Exception as exc:
        raise LlamatierError(
            f"{p} is not a llamatier eviction result (unreadable Parquet: {type(exc).__name__}); give the "
            "eviction.parquet written by `llamatier quality --evict ... --out DIR`"
        ) from None
    missing = [k for k in (*EVICTION_KEYS, *_EVICTION_META_COLUMNS) if k not in frame.columns]
    if missing or frame.height == 0:
        raise LlamatierError(
            f"{p} is not a llamatier eviction result ({'missing columns ' + ', '.join(missing) if missing else 'no rows'}); "
            "give the eviction.parquet written by `llamatier quality --evict ... --out DIR`"
        )
    return frame
