"""Trace format v2: a directory with versioned, checksummed metadata and chunked Parquet tables.

Layout of a trace directory::

    meta.json                 format name, version, complete flag, model, context, system, machine,
                              one record per chunk, and meta_sha256
    steps-00000.parquet       one row per llama_decode call (STEP_SCHEMA)
    attn-00000.parquet        attention mass per (step, layer, block) (ATTN_SCHEMA); a block with
                              no row holds 0 (writers leave out zero-mass blocks: sliding-window
                              layers' blocks outside their window)
    positions-00000.parquet   optional: mass per (step, layer, position) (POSITION_SCHEMA)

Chunk ``i`` of every table covers the same steps. A chunk counts once
``meta.json`` lists it: its first step, step count, and per file the row count,
size and SHA-256 (files are written to unique temporary names and renamed, then
``meta.json`` is rewritten the same way). ``meta_sha256`` is the SHA-256 of the
rest of ``meta.json`` (canonical JSON), so an edited field is detected too.
``meta.json`` is written at the start with ``complete: false`` and rewritten
after each chunk and when the run ends. v1 (no checksums) is upgraded by
:func:`llamatier.trace.upgrade.upgrade_trace`. The declared schema of
``meta.json`` is :mod:`llamatier.trace.schema`; the value rules are
:mod:`llamatier.trace.checks`.
"""

from __future__ import annotations

import polars as pl

FORMAT_NAME = "llamatier-trace"
FORMAT_VERSION = 2
META_FILE = "meta.json"

STEP_SCHEMA: dict[str, pl.DataType] = {
    "step": pl.UInt32(),  # 0-based index of the llama_decode call
    "phase": pl.Utf8(),  # "prefill" or "decode"
    "n_tokens": pl.UInt32(),  # tokens in the batch
    "pos0": pl.UInt32(),  # position of the batch's first token
    "n_kv": pl.UInt32(),  # KV cells llama.cpp attended (padded), 0 if not captured
    "token_in": pl.Int32(),  # first input token id of the batch
    "token_out": pl.Int32(),  # token sampled from this step's logits, -1 if none
    "t_start_s": pl.Float64(),  # seconds since the trace started, at llama_decode entry
    "decode_s": pl.Float64(),  # measured llama_decode wall time
    "capture_s": pl.Float64(),  # time spent reducing attention after the call (not in decode_s)
    "perf_t_p_eval_ms": pl.Float64(),  # llama_perf_context counters, cumulative
    "perf_t_eval_ms": pl.Float64(),
    "perf_n_p_eval": pl.Int64(),
    "perf_n_eval": pl.Int64(),
}

ATTN_SCHEMA: dict[str, pl.DataType] = {
    "step": pl.UInt32(),
    "layer": pl.UInt16(),
    "block": pl.UInt32(),  # KV block index: positions [block*B, (block+1)*B)
    "mass": pl.Float32(),  # mean over heads (and batch queries) of attention probability
}

POSITION_SCHEMA: dict[str, pl.DataType] = {
    "step": pl.UInt32(),
    "layer": pl.UInt16(),
    "pos": pl.UInt32(),
    "mass": pl.Float32(),
}

TABLES = {"steps": STEP_SCHEMA, "attn": ATTN_SCHEMA, "positions": POSITION_SCHEMA}


def chunk_name(table: str, index: int) -> str:
    """File name of chunk ``index`` of ``table`` (``steps``, ``attn``, ``positions``)."""
    return f"{table}-{index:05d}.parquet"
