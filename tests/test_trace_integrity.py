"""Trace integrity: checksums, the declared meta.json schema, value rules, v1 upgrade, one writer per --out.

Each damage the issue report found in a real trace is applied to a copy of a real
(tiny) trace and resealed (checksums recomputed, as a buggy writer would leave
them), so that the schema or a value rule, not the checksum, has to catch it.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from llamatier.errors import LlamatierError, TraceFormatError
from llamatier.trace import TraceWriter, load_trace
from tests.conftest import REPO, assert_one_line_error
from tests.corruption import cli_run, meta_of, reseal, write_meta


@pytest.fixture
def copy(tiny_trace_dir: Path, tmp_path: Path):  # noqa: ANN201
    def make(name: str = "tr") -> Path:
        return Path(shutil.copytree(tiny_trace_dir, tmp_path / name))

    return make


def _set_meta(d: Path, path: str, value: object) -> None:
    meta = meta_of(d)
    *head, last = path.split(".")
    obj = meta
    for k in head:
        obj = obj[int(k)] if k.isdigit() else obj[k]
    obj[int(last) if last.isdigit() else last] = value
    write_meta(d, meta, seal=True)


def _set_cell(d: Path, file: str, col: str, row: int, value: object) -> None:
    f = d / file
    df = pl.read_parquet(f)
    s = df[col].to_list()
    s[row] = value
    df.with_columns(pl.Series(col, s, dtype=df[col].dtype)).write_parquet(f)
    reseal(d)


def _map_table(d: Path, file: str, fn) -> None:  # noqa: ANN001
    f = d / file
    fn(pl.read_parquet(f)).write_parquet(f)
    reseal(d)


META_DAMAGE = [
    ("n_steps", "abc", "n_steps: must be an integer"),
    ("n_steps", None, "n_steps: must be an integer"),
    ("model.n_layers", "18", "model.n_layers: must be an integer"),
    ("model.geometry.head_dim_v", ["64", "64"], "model.geometry.head_dim_v[0]: must be an integer"),
    ("model.n_params", "many", "model.n_params: must be an integer"),
    ("context.n_ctx", "big", "context.n_ctx: must be an integer"),
    ("model.geometry.head_dim_k", [-16, 16], "model.geometry.head_dim_k[0]: must be a number >= 1"),
    ("model.geometry.n_head_kv", [0, 0], "n_head_kv is 0 on every layer"),
    ("model.weight_bytes", -1, "model.weight_bytes: must be a number >= 1"),
    ("model.n_params", -5, "model.n_params: must be a number >= 1"),
    ("model.n_params", 10**12, "bits per parameter"),
    ("context.n_ctx", -2048, "context.n_ctx: must be a number >= 1"),
    ("context.n_ctx", 2_048_000, "kv_cache_bytes"),
    ("model.geometry.sliding_window", [-1, 0], "model.geometry.sliding_window[0]: must be a number >= 0"),
    ("model.geometry.sliding_window", [0], "sliding_window has 1 entries"),
    ("complete", "no", "complete: must be true or false"),
    ("interrupted", True, "complete is true but the run is also marked interrupted"),
    ("block_tokens", 0, "block_tokens: must be a number >= 1"),
    ("context.type_k", "zz", "context.type_k: must be one of"),
    ("context.temperature", 1e300, "context.temperature"),
    ("model.n_layers", 3, "model: n_layers is 3 but geometry.n_layers is 2"),
    ("chunks.1.first_step", 9, "contiguous"),
    ("n_steps", 1, "n_steps is 1 but the chunks cover"),
    ("version", 3, "trace format v3"),
]


@pytest.mark.parametrize(("field", "value", "needle"), META_DAMAGE, ids=[f"{f}={v!r}" for f, v, _ in META_DAMAGE])
def test_broken_metadata_is_one_line_naming_the_field(copy, field, value, needle):
    d = copy()
    _set_meta(d, field, value)
    with pytest.raises(TraceFormatError) as info:
        load_trace(d)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg, msg


def _block_tokens(bt: int):  # noqa: ANN202
    return lambda d: _set_meta(d, "block_tokens", bt)


TABLE_DAMAGE = [
    ("mass-nan", lambda d: _set_cell(d, "attn-00001.parquet", "mass", 5, math.nan), "not a probability"),
    ("mass-inf", lambda d: _set_cell(d, "attn-00001.parquet", "mass", 5, math.inf), "not a probability"),
    ("mass-negative", lambda d: _set_cell(d, "attn-00001.parquet", "mass", 5, -0.1), "not a probability"),
    ("mass-x1000", lambda d: _map_table(d, "attn-00002.parquet", lambda df: df.with_columns(pl.col("mass") * 1000)),
     "not a probability"),
    ("mass-x2", lambda d: _map_table(d, "attn-00002.parquet", lambda df: df.with_columns(pl.col("mass") * 0.5)),
     "sums to"),
    ("attn-emptied", lambda d: _map_table(d, "attn-00003.parquet", lambda df: df.clear()), "has no attention rows"),
    ("attn-from-another-chunk", lambda d: (shutil.copy(d / "attn-00000.parquet", d / "attn-00002.parquet"), reseal(d)),
     "outside the chunk's steps"),
    ("attn-row-duplicated", lambda d: _map_table(d, "attn-00001.parquet", lambda df: pl.concat([df, df.tail(1)])),
     "each once"),
    ("block-tokens-halved", _block_tokens(8), "last visible block"),
    ("block-tokens-doubled", _block_tokens(32), "outside the step's context"),
    ("phase-outside-enum", lambda d: _set_cell(d, "steps-00001.parquet", "phase", 2, "decoding"), "is not one of"),
    ("decode-s-negative", lambda d: _set_cell(d, "steps-00002.parquet", "decode_s", 1, -0.001), "decode_s must be finite and >= 0"),
    ("decode-s-nan", lambda d: _set_cell(d, "steps-00002.parquet", "decode_s", 1, math.nan), "decode_s must be finite"),
    ("pos0-1e6", lambda d: _set_cell(d, "steps-00003.parquet", "pos0", 0, 1_000_000), "pos0 1000000 does not continue"),
    ("token-chain-broken", lambda d: _set_cell(d, "steps-00003.parquet", "token_in", 3, 7), "not the token sampled before"),
    ("clock-goes-back", lambda d: _set_cell(d, "steps-00003.parquet", "t_start_s", 3, 0.0), "before the previous step ended"),
    ("step-as-float", lambda d: _map_table(d, "steps-00001.parquet", lambda df: df.with_columns(pl.col("step").cast(pl.Float64))),
     "column step is Float64, not UInt32"),
    ("mass-as-string", lambda d: _map_table(d, "attn-00001.parquet", lambda df: df.with_columns(pl.col("mass").cast(pl.Utf8))),
     "column mass is String, not Float32"),
]


@pytest.mark.parametrize(("name", "damage", "needle"), TABLE_DAMAGE, ids=[t[0] for t in TABLE_DAMAGE])
def test_broken_tables_are_one_line_naming_the_rule(copy, name, damage, needle):
    d = copy()
    damage(d)
    with pytest.raises(TraceFormatError) as info:
        load_trace(d)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg, msg


def _drop_faintest_inner_row(df: pl.DataFrame) -> pl.DataFrame:
    """Without the row of least mass that has neighbours in its (step, layer): the sums still reach 1."""
    g = pl.struct("step", "layer")
    inner = (g == g.shift(1)) & (g == g.shift(-1))
    i = df.with_row_index().filter(inner).sort("mass")["index"][0]
    return df.with_row_index().filter(pl.col("index") != i).drop("index")


def test_a_faint_row_missing_inside_a_range_is_caught(copy):
    """A row whose mass is below the sum tolerance, removed by a writer that reseals: the range has a gap."""
    d = copy()
    _map_table(d, "attn-00001.parquet", _drop_faintest_inner_row)
    with pytest.raises(TraceFormatError, match="a gap before this row"):
        load_trace(d)
    d = copy("positions")
    _map_table(d, "positions-00002.parquet", _drop_faintest_inner_row)
    load_trace(d)  # positions are read only when asked for
    with pytest.raises(TraceFormatError, match="a gap before this row"):
        load_trace(d, positions=True)


def test_a_faint_first_row_missing_is_caught(copy):
    """The front of a (step, layer)'s range: a full-attention layer reads from block 0."""
    d = copy()
    df = pl.read_parquet(d / "attn-00001.parquet")
    g = pl.struct("step", "layer")
    first = df.with_row_index().filter(g != g.shift(1)).sort("mass")
    assert first["mass"][0] < 1e-4  # too faint for the sum rule: the range's start has to catch it
    _map_table(d, "attn-00001.parquet",
               lambda t: t.with_row_index().filter(pl.col("index") != first["index"][0]).drop("index"))
    with pytest.raises(TraceFormatError, match="rows start at block 1, after the oldest block the step attends to"):
        load_trace(d).mass  # noqa: B018


@pytest.mark.parametrize(("cut", "needle"), [(lambda df: df.head(df.height - 1), "rows end at pos"),
                                            (lambda df: df.slice(1), "rows start at pos 1, not 0")])
def test_a_positions_table_holds_every_position(copy, cut, needle):
    d = copy()
    _map_table(d, "positions-00001.parquet", cut)
    with pytest.raises(TraceFormatError, match=needle):
        load_trace(d, positions=True)


def test_unsealed_damage_is_caught_by_the_checksums(copy):
    d = copy()
    f = d / "attn-00002.parquet"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    assert_one_line_error(cli_run("replay", str(d)), "corrupt trace chunk", "attn-00002.parquet", "checksum")
    d = copy("edited")
    meta = meta_of(d)
    meta["context"]["n_threads"] = 64  # a plausible value: only the checksum can tell
    write_meta(d, meta, seal=False)
    assert_one_line_error(cli_run("inspect", str(d)), "meta_sha256", "changed after the trace was written")


def test_a_missing_middle_chunk_of_an_incomplete_trace_is_an_error(copy):
    d = copy()
    meta = meta_of(d)
    meta.update(complete=False, interrupted=True)
    write_meta(d, meta, seal=True)
    assert load_trace(d).n_steps == meta["n_steps"]  # intact: every recorded chunk loads
    (d / "steps-00002.parquet").unlink()
    assert_one_line_error(cli_run("inspect", str(d)), "truncated", "steps-00002.parquet")


def test_a_chunk_written_but_never_recorded_is_left_out_and_named(copy, tiny_trace_dir):
    d = copy()
    meta = meta_of(d)
    last = meta["chunks"].pop()
    meta.update(complete=False, interrupted=False, n_chunks=len(meta["chunks"]),
                n_steps=meta["n_steps"] - last["n_steps"])
    write_meta(d, meta, seal=True)
    tr = load_trace(d)
    assert tr.n_steps == meta["n_steps"] and tr.unrecorded == tuple(sorted(last["files"][t]["name"] for t in last["files"]))
    full = load_trace(tiny_trace_dir)
    np.testing.assert_array_equal(tr.mass, full.mass[: tr.n_steps, :, : tr.n_blocks])


def _as_v1(d: Path) -> None:
    meta = meta_of(d)
    for key in ("chunks", "meta_sha256"):
        meta.pop(key)
    meta["version"] = 1
    write_meta(d, meta, seal=False)


def test_v1_traces_are_refused_then_upgraded_to_the_same_data(copy, tiny_trace_dir):
    d = copy()
    _as_v1(d)
    err = assert_one_line_error(cli_run("replay", str(d)), "format v1", "upgrade-trace")
    assert "checksums" in err
    p = cli_run("upgrade-trace", str(d))
    assert p.returncode == 0 and "upgraded to v2" in p.stdout, p.stderr
    a, b = load_trace(d, positions=True), load_trace(tiny_trace_dir, positions=True)
    np.testing.assert_array_equal(a.mass, b.mass)
    assert a.steps.equals(b.steps) and a.positions.equals(b.positions)
    assert "already v2" in cli_run("upgrade-trace", str(d)).stdout


def test_upgrade_refuses_a_v1_trace_that_breaks_a_rule_and_writes_nothing(copy):
    d = copy()
    f = d / "attn-00001.parquet"
    df = pl.read_parquet(f)
    df.with_columns(pl.col("mass") * 3).write_parquet(f)
    _as_v1(d)
    before = (d / "meta.json").read_bytes()
    assert_one_line_error(cli_run("upgrade-trace", str(d)), "attn-00001.parquet", "not a probability")
    assert (d / "meta.json").read_bytes() == before


# ---- one writer per --out -----------------------------------------------------------------------


def _writer(out: Path, **kw) -> TraceWriter:  # noqa: ANN003
    return TraceWriter(out, {"command": "test"}, n_layers=2, block_tokens=16, chunk_steps=4, **kw)


def test_a_second_trace_writer_on_the_same_out_is_refused(tmp_path):
    out = tmp_path / "t"
    first = _writer(out)
    with pytest.raises(LlamatierError, match="being written by another llamatier trace") as info:
        _writer(out, overwrite=True)
    assert "\n" not in str(info.value)
    first.close(complete=False, error="test")
    assert not (out / ".llamatier-writer.lock").exists()  # the claim is released with the writer
    _writer(out, overwrite=True).close(complete=False, error="test")  # free again


def test_a_claim_left_by_a_killed_writer_does_not_block(tmp_path):
    out = tmp_path / "t"
    out.mkdir()
    (out / ".llamatier-writer.lock").write_text("12345\n")  # the file stays after kill -9; the lock does not
    _writer(out).close(complete=False, error="test")


def test_two_trace_runs_into_one_out(tiny_model, tmp_path):
    """Started together: one writes the trace, the other stops with one line; nothing is mixed."""
    out = tmp_path / "shared"
    cmd = [sys.executable, "-m", "llamatier", "trace", str(tiny_model), "--prompt", "the tier keeps hot blocks",
           "-n", "64", "--ctx", "256", "--chunk-steps", "4", "--out", str(out)]
    procs = [subprocess.Popen(cmd, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    done = [subprocess.CompletedProcess(cmd, p.wait(timeout=120), *p.communicate()) for p in procs]
    ok = [p for p in done if p.returncode == 0]
    failed = [p for p in done if p.returncode != 0]
    assert len(ok) == 1 and len(failed) == 1, [p.stderr for p in done]
    assert_one_line_error(failed[0])
    assert any(s in failed[0].stderr for s in ("being written by another", "not empty"))
    tr = load_trace(out)
    assert tr.complete and (tr.steps["phase"] == "decode").sum() == 64
    said = " ".join(ok[0].stdout.split())  # what it reports, it wrote
    assert f"{tr.n_steps} steps" in said and "64 decode steps" in said
    assert "trace written" not in failed[0].stdout
    assert sorted(f.name for f in out.iterdir() if f.name.endswith(".tmp")) == []


def test_trace_metadata_never_holds_nan(tmp_path):
    with pytest.raises(LlamatierError, match="not finite"):
        TraceWriter(tmp_path / "t", {"context": {"temperature": math.nan}}, n_layers=2, block_tokens=16)
    text = json.dumps(meta_of(REPO / "traces" / "gemma3-270m-1k"))
    assert "NaN" not in text and "Infinity" not in text


def test_every_committed_trace_loads():
    """Committed traces are in the current format (a v1 trace committed later fails here, not in a user's run)."""
    dirs = sorted(p.parent for p in (REPO / "traces").rglob("meta.json"))
    assert len(dirs) >= 3
    for d in dirs:
        tr = load_trace(d)
        assert tr.n_steps == json.loads((d / "meta.json").read_text())["n_steps"], d
