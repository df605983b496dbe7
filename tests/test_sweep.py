"""Budget sweeps: budget parsing, cells, parallel rows equal to direct replays, Parquet, CLI."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from llamatier.errors import LlamatierError
from llamatier.hardware import load_profile
from llamatier.replay import ReplayOptions, replay
from llamatier.sweep import (
    ROW_SCHEMA,
    BudgetPoint,
    SweepCell,
    facet_tables,
    make_cells,
    parse_budgets,
    read_results,
    rows_frame,
    run_cell,
    run_cells,
    summary_row,
    write_results,
)
from tests.conftest import assert_one_line_error, run_cli

TIMING_COLUMNS = {"replay_wall_s", "decision_s", "cell_wall_s"}  # wall clocks: differ run to run
POLICIES = ("static", "lru", "adaptive", "oracle")


# -- budget axes ---------------------------------------------------------------------------


def test_percent_range_is_evenly_spaced_with_ends():
    pts = parse_budgets("10%..100%", steps=10)
    assert [round(p.fraction * 100, 9) for p in pts] == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert all(p.size_bytes is None for p in pts)
    assert pts[0].label == "10%"


def test_sizes_lists_ranges_auto_and_dedup():
    pts = parse_budgets("1GiB,2GiB,1GiB,auto")
    assert [p.size_bytes for p in pts[:2]] == [1024**3, 2 * 1024**3]
    assert pts[2].is_auto and len(pts) == 3
    rng = parse_budgets("1GiB..3GiB", steps=3)
    assert [p.size_bytes for p in rng] == [1024**3, 2 * 1024**3, 3 * 1024**3]
    assert parse_budgets("50%", steps=4) == (BudgetPoint(fraction=0.5),)
    assert BudgetPoint(fraction=0.25).resolve_bytes(1000) == 250
    assert BudgetPoint(size_bytes=7).resolve_bytes(1000) == 7
    assert BudgetPoint().resolve_bytes(1000) is None


@pytest.mark.parametrize(
    "spec, steps, needle",
    [
        ("10%..1GiB", 10, "mixes a percentage and a size"),
        ("100%..10%", 10, "goes down"),
        ("5 parsecs", 10, "unknown unit"),
        ("abc%", 10, "invalid HBM budget"),
        ("-5%", 10, "must be >= 0%"),
        ("10%..100%", 0, "--steps"),
        ("auto..10%", 10, "cannot include auto"),
        (",", 10, "empty HBM budget"),
    ],
)
def test_bad_budget_specs_name_the_problem(spec, steps, needle):
    with pytest.raises(LlamatierError, match=needle):
        parse_budgets(spec, steps=steps)


# -- cells ---------------------------------------------------------------------------------


def test_make_cells_is_the_full_product_and_validates_names(tiny_trace_dir):
    cells = make_cells(tiny_trace_dir, policies="static,adaptive", budgets=parse_budgets("50%,100%"),
                       profiles="a100-40g,l4", kv_types="f16,q8_0")
    assert len(cells) == 2 * 2 * 2 * 2
    assert len(set(cells)) == len(cells)  # frozen, hashable, all distinct
    with pytest.raises(LlamatierError, match="valid policies are"):
        make_cells(tiny_trace_dir, policies="static,nope")
    with pytest.raises(LlamatierError, match="nope"):
        make_cells(tiny_trace_dir, profiles="nope")
    with pytest.raises(LlamatierError, match="q9_9"):
        make_cells(tiny_trace_dir, kv_types="q9_9")
    with pytest.raises(LlamatierError, match="sparse mode needs"):
        make_cells(tiny_trace_dir, mode="sparse")
    with pytest.raises(LlamatierError, match="trace not found"):
        make_cells(tiny_trace_dir / "missing")


def test_peak_kv_is_the_final_context_for_a_global_model(tiny_trace_dir, tiny_trace):
    """100% on the axis = every block the run stores at its largest (no sliding window here)."""
    row = run_cell(SweepCell(str(tiny_trace_dir), "a100-40g", "static", BudgetPoint(fraction=1.0)))
    g = tiny_trace.model.geometry
    from llamatier.kvtypes import kv_type

    bpt = g.bytes_per_token(kv_type("f16"), kv_type("f16"))
    blocks = int(tiny_trace.visible_blocks.max())
    assert row["kv_peak_bytes"] == blocks * tiny_trace.block_tokens * bpt
    assert row["hbm_budget_bytes"] == row["kv_peak_bytes"]
    assert row["kv_n_ctx_bytes"] == tiny_trace.n_ctx * bpt
    assert row["error"] is None and row["runs"] is True


@pytest.fixture(scope="module")
def small_sweep(tiny_trace_dir):
    cells = make_cells(tiny_trace_dir, policies=",".join(POLICIES), budgets=parse_budgets("20%,60%,2KiB,auto"),
                       profiles="a100-40g,cpu-host", kv_types="f16,q8_0")
    return cells, run_cells(cells, jobs=2)


def test_sweep_rows_equal_separate_replays(small_sweep, tiny_trace):
    """Rows from worker processes equal replay() called here on the same inputs."""
    cells, rows = small_sweep
    assert [r["cell"] for r in rows] == list(range(len(cells)))
    compared = 0
    for cell, row in zip(cells, rows, strict=True):
        assert row["error"] is None, row["error"]
        assert (row["profile"], row["policy"]) == (cell.profile, cell.policy)
        b = cell.hbm_budget
        if b.fraction is not None:
            assert row["hbm_budget_fraction"] == b.fraction
            if row["profile"] != "cpu-host":  # host profiles have no HBM: budget 0 whatever was asked
                assert row["hbm_budget_bytes"] == round(b.fraction * row["kv_peak_bytes"])
        elif b.size_bytes is not None and row["profile"] != "cpu-host":
            assert row["hbm_budget_bytes"] == b.size_bytes
        want_budget = None if b.is_auto else b.resolve_bytes(row["kv_peak_bytes"])
        direct = replay(tiny_trace, load_profile(cell.profile), cell.policy,
                        ReplayOptions(hbm_budget_bytes=want_budget, kv_type=cell.options.kv_type))
        expect = summary_row(direct.summary())
        for k, v in expect.items():
            if k in TIMING_COLUMNS:
                continue
            got = row[k]
            if isinstance(v, float) and isinstance(got, float):
                assert math.isclose(got, v, rel_tol=1e-12, abs_tol=0.0), (cell, k, got, v)
            else:
                assert got == v, (cell, k, got, v)
        compared += 1
    assert compared == 4 * 4 * 2 * 2
    # the sweep is not degenerate: budgets change the answer for some policy
    df = rows_frame(rows)
    a100 = df.filter((pl.col("profile") == "a100-40g") & (pl.col("kv_type") == "f16/f16"))
    assert a100.group_by("policy").agg(pl.col("p99_s").n_unique())["p99_s"].max() > 1


def test_every_output_column_is_filled_for_a_cell_that_ran(small_sweep):
    """A row's figures come from the summary by path: a renamed summary key must not pass as None == None."""
    from llamatier.sweep.cells import _OUTPUTS

    _, rows = small_sweep
    ran = [r for r in rows if r["runs"] and r["error"] is None]
    assert len(ran) == len(rows)
    for r in ran:
        empty = [name for name, _, _ in _OUTPUTS if r[name] is None]
        assert not empty, (r["profile"], r["policy"], empty)


def test_custom_executor_gives_the_same_rows(small_sweep):
    cells, rows = small_sweep
    with ThreadPoolExecutor(max_workers=2) as ex:
        again = run_cells(cells[:8], executor=ex)
    for a, b in zip(again, rows[:8], strict=True):
        assert {k: v for k, v in a.items() if k not in TIMING_COLUMNS} == {
            k: v for k, v in b.items() if k not in TIMING_COLUMNS
        }


def test_progress_reports_every_cell(tiny_trace_dir):
    cells = make_cells(tiny_trace_dir, policies="static", budgets=parse_budgets("50%,100%"))
    seen = []
    run_cells(cells, jobs=1, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(0, 2), (1, 2), (2, 2)]


def test_parquet_round_trip_has_one_typed_row_per_cell(small_sweep, tmp_path):
    cells, rows = small_sweep
    out = write_results(rows, tmp_path / "s.parquet")
    df = read_results(out)
    assert df.height == len(cells)
    assert list(df.columns) == list(ROW_SCHEMA)
    assert dict(df.schema) == {k: v for k, v in ROW_SCHEMA.items()}
    runs = df.filter(pl.col("runs"))
    assert (runs["p50_s"] <= runs["p90_s"]).all() and (runs["p90_s"] <= runs["p99_s"]).all()
    assert (runs["tok_per_s"] > 0).all() and (runs["energy_total_j"] > 0).all()
    with pytest.raises(LlamatierError, match="does not exist"):
        write_results(rows, tmp_path / "no" / "s.parquet")
    bogus = tmp_path / "x.parquet"
    pl.DataFrame({"a": [1]}).write_parquet(bogus)
    with pytest.raises(LlamatierError, match="not a llamatier sweep"):
        read_results(bogus)


def test_facet_tables_group_budgets_by_profile_and_kv(small_sweep):
    _, rows = small_sweep
    tables = facet_tables(rows_frame(rows))
    assert {(t["profile"], t["kv_type"]) for t in tables} == {
        (p, k) for p in ("a100-40g", "cpu-host") for k in ("f16/f16", "q8_0/q8_0")
    }
    for t in tables:
        assert t["policies"] == list(POLICIES)
        assert len(t["rows"]) == 4 and all(len(cells) == 4 for _, _, cells in t["rows"])


def test_a_cell_that_cannot_run_is_a_row_with_an_error(tiny_trace_dir):
    """Llama 3 70B's weights (42.5 GB) do not fit an L4 (24 GB): that cell errors, the A100-80G one runs."""
    cells = make_cells(tiny_trace_dir, policies="static", budgets=(BudgetPoint(fraction=1.0),),
                       profiles="l4,a100-80g", geometry="llama3-70b")
    rows = run_cells(cells, jobs=1)
    assert "do not fit" in rows[0]["error"] and rows[0]["runs"] is False and rows[0]["p99_s"] is None
    assert rows[1]["error"] is None and rows[1]["runs"] is True and rows[1]["what_if"] is True


# -- CLI -----------------------------------------------------------------------------------


def test_cli_sweep_writes_parquet_and_plot(tiny_trace_dir, tmp_path):
    out, png = tmp_path / "r.parquet", tmp_path / "r.png"
    proc = run_cli("sweep", str(tiny_trace_dir), "--policies", "static,adaptive", "--hbm-budget", "25%..100%",
                   "--steps", "2", "--kv-types", "f16,q8_0", "--jobs", "2", "--out", str(out), "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    df = pl.read_parquet(out)
    assert df.height == 2 * 2 * 2
    assert sorted(df["hbm_budget"].unique().to_list()) == ["100%", "25%"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "a100-40g, KV q8_0/q8_0: p99 per-token latency (ms)" in proc.stdout
    assert f"wrote 8 rows to {out}" in " ".join(proc.stdout.split())


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--hbm-budget", "10%..1GiB"], ["mixes a percentage and a size"]),
        (["--policies", "static,fifo"], ["unknown policy", "valid policies"]),
        (["--plot", "x.jpg"], [".png or .svg"]),
        (["--geometry", "llama3-70b", "--profiles", "l4"], ["no sweep cell could be replayed", "do not fit"]),
    ],
)
def test_cli_sweep_bad_input_is_one_line(tiny_trace_dir, tmp_path, args, needles):
    proc = run_cli("sweep", str(tiny_trace_dir), "--jobs", "1", "--out", str(tmp_path / "o.parquet"), *args)
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "o.parquet").exists()


def test_budget_points_are_picklable_and_hashable():
    import pickle

    cell = SweepCell("t", "a100-40g", "lru", BudgetPoint(fraction=0.5), ReplayOptions(kv_type="q8_0", policy_params={"lru": {}}))
    assert pickle.loads(pickle.dumps(cell)) == cell
    assert hash(cell) == hash(pickle.loads(pickle.dumps(cell)))
    assert np.isfinite(BudgetPoint(fraction=0.5).fraction)
    assert Path(cell.trace_path).name == "t"
