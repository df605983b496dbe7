"""Replay options: declared once (ReplayOptions), reached from replay, compare and sweep alike."""

from __future__ import annotations

import json
import pickle

import polars as pl
import pytest
import typer

from llamatier.cli import app
from llamatier.hardware import load_profile
from llamatier.replay import ReplayOptions, prepare, replay
from llamatier.replay.options import cli_fields, parse_policy_params
from llamatier.sweep import (
    SweepCell,
    facet_tables,
    make_cells,
    parse_budgets,
    rows_frame,
    run_cells,
)
from llamatier.sweep.budgets import BudgetPoint
from tests.conftest import assert_one_line_error, run_cli

VOLATILE = {"wall_s", "block_accesses_per_s", "policy_decision"}


def _flags(command: str) -> set[str]:
    cmd = typer.main.get_command(app).commands[command]
    return {opt.split("/")[0] for p in cmd.params for opt in p.opts}


def test_every_declared_option_reaches_replay_compare_and_sweep() -> None:
    declared = {f.metadata["flag"].split("/")[0] for f in cli_fields()}
    assert {"--mode", "--hbm-budget", "--kv-type", "--geometry", "--prefetch", "--swa-full"} <= declared
    assert declared <= _flags("replay") and declared <= _flags("compare")
    axes = {f.metadata["flag"] for f in cli_fields() if f.metadata["axis"]}
    assert axes == {"--hbm-budget", "--kv-type", "--mode", "--block-budget"}
    assert declared - axes <= _flags("sweep") and {"--hbm-budget", "--kv-types", "--mode", "--block-budget"} <= _flags("sweep")
    assert "--policy-param" in _flags("replay") & _flags("compare") & _flags("sweep")


def _json(*args: str) -> dict:
    proc = run_cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _same(a: dict, b: dict) -> None:
    strip = lambda d: {k: (strip(v) if isinstance(v, dict) else v) for k, v in d.items() if k not in VOLATILE}  # noqa: E731
    assert strip(a) == strip(b)


def test_hbm_budget_as_a_percentage_in_replay_and_compare(tiny_trace, tiny_trace_dir) -> None:
    peak = prepare(tiny_trace, load_profile("a100-40g"), ReplayOptions()).peak_kv_bytes()
    nbytes = round(0.4 * peak)
    pct = _json("replay", str(tiny_trace_dir), "--policy", "adaptive", "--hbm-budget", "40%")
    size = _json("replay", str(tiny_trace_dir), "--policy", "adaptive", "--hbm-budget", f"{nbytes}B")
    assert pct["budget_bytes"]["hbm"] == nbytes
    _same(pct, size)
    cmp = _json("compare", str(tiny_trace_dir), "--policies", "static,lru", "--hbm-budget", "40%")
    assert {p["budget_bytes"]["hbm"] for p in cmp["policies"]} == {nbytes}
    lib = replay(tiny_trace, load_profile("a100-40g"), "adaptive", ReplayOptions(hbm_budget_fraction=0.4))
    assert lib.capacity_bytes[0] == nbytes


def test_policy_params_from_the_command_line(tiny_trace_dir) -> None:
    sparse = ("--mode", "sparse", "--block-budget", "2", "--hbm-budget", "30%")
    base = _json("replay", str(tiny_trace_dir), "--policy", "adaptive", *sparse)
    tuned = _json("replay", str(tiny_trace_dir), "--policy", "adaptive", *sparse,
                  "--policy-param", "decay=0.2", "--policy-param", "adaptive.max_moves_per_step=3")
    assert base["policy_params"]["decay"] == 0.8 and tuned["policy_params"]["decay"] == 0.2
    assert tuned["policy_params"]["max_moves_per_step"] == 3
    assert tuned["migrations"] != base["migrations"]  # the parameters reach the policy
    cmp = _json("compare", str(tiny_trace_dir), "--policies", "static,adaptive", "--policy-param", "hysteresis=0.5")
    params = {p["policy"]: p["policy_params"] for p in cmp["policies"]}
    assert params["adaptive"]["hysteresis"] == 0.5 and "hysteresis" not in params["static"]


@pytest.mark.parametrize(
    "command, args, needles",
    [
        ("replay", ["--policy-param", "decay"], ["KEY=VALUE"]),
        ("replay", ["--policy-param", "decayy=0.5"], ["takes a parameter 'decayy'", "decay"]),
        ("replay", ["--policy-param", "decay=2"], ["bad parameters for policy 'adaptive'", "decay must be in [0, 1)"]),
        ("replay", ["--policy-param", "decay=0.5,0.9"], ["one value here", "sweep"]),
        ("replay", ["--policy-param", "lru.decay=0.5"], ["'lru' is not among those replayed"]),
        ("compare", ["--policies", "static,lru", "--policy-param", "decay=0.5"], ["none of static, lru"]),
        ("sweep", ["--policy-param", "oracle.decay=0.5,0.9"], ["policy 'oracle' has no parameter 'decay'"]),
        ("replay", ["--hbm-budget", "50%%"], ["invalid --hbm-budget"]),
    ],
)
def test_bad_policy_params_are_one_line(tiny_trace_dir, tmp_path, command: str, args: list[str], needles) -> None:
    extra = ["--out", str(tmp_path / "s.parquet"), "--jobs", "1"] if command == "sweep" else []
    assert_one_line_error(run_cli(command, str(tiny_trace_dir), *args, *extra), *needles)
    assert not (tmp_path / "s.parquet").exists()


def test_a_sweep_sweeps_policy_parameters(tiny_trace, tiny_trace_dir, tmp_path) -> None:
    out = tmp_path / "p.parquet"
    proc = run_cli("sweep", str(tiny_trace_dir), "--policies", "static,adaptive", "--hbm-budget", "30%,60%",
                   "--mode", "sparse", "--block-budget", "2", "--policy-param", "adaptive.decay=0.2,0.9",
                   "--jobs", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    df = pl.read_parquet(out)
    assert df.height == 2 * 3
    assert df["policy_params"].to_list() == [None, None, "decay=0.2", "decay=0.2", "decay=0.9", "decay=0.9"]
    for row in df.filter(pl.col("policy") == "adaptive").iter_rows(named=True):
        decay = float(row["policy_params"].split("=")[1])
        opts = ReplayOptions(mode="sparse", block_budget=2, hbm_budget_fraction=row["hbm_budget_fraction"],
                             policy_params={"adaptive": {"decay": decay}})
        direct = replay(tiny_trace, load_profile("a100-40g"), "adaptive", opts).summary()
        assert row["p99_s"] == direct["latency"]["p99_s"] and row["migrated_blocks"] == direct["migrations"]["blocks"]
    (table,) = facet_tables(df)
    assert table["policies"] == ["static", "adaptive (decay=0.2)", "adaptive (decay=0.9)"]
    assert "adaptive (decay=0.2)" in " ".join(proc.stdout.split())


def test_sweep_cells_hold_replay_options(tiny_trace_dir) -> None:
    cells = make_cells(tiny_trace_dir, policies="static,adaptive", budgets=parse_budgets("50%"), kv_types="f16,q8_0",
                       policy_params={"adaptive": {"decay": [0.5, 0.7]}}, geometry="llama3-8b", mode="sparse",
                       block_budget=4)
    assert [(c.options.kv_type, c.policy, c.options.policy_params) for c in cells] == [
        ("f16", "static", {}), ("f16", "adaptive", {"adaptive": {"decay": 0.5}}),
        ("f16", "adaptive", {"adaptive": {"decay": 0.7}}), ("q8_0", "static", {}),
        ("q8_0", "adaptive", {"adaptive": {"decay": 0.5}}), ("q8_0", "adaptive", {"adaptive": {"decay": 0.7}}),
    ]
    assert all(c.options.target.label == "Llama 3 8B" and c.options.block_budget == 4 for c in cells)
    assert len(set(cells)) == len(cells) and pickle.loads(pickle.dumps(cells)) == cells
    rows = run_cells(cells[:2], jobs=1)
    assert [r["geometry"] for r in rows] == ["llama3-8b"] * 2 and rows_frame(rows).height == 2
    with pytest.raises(Exception, match="does not run"):
        make_cells(tiny_trace_dir, policies="static", policy_params={"adaptive": {"decay": [0.5]}})
    assert SweepCell("t", "l4", "lru", BudgetPoint(fraction=0.5)).replay_options(7).hbm_budget_bytes == 7


def test_parse_policy_params_library() -> None:
    assert parse_policy_params(["decay=0.5", "adaptive.prefetch=true"], ["static", "adaptive"]) == {
        "adaptive": {"decay": 0.5, "prefetch": True}
    }
    assert parse_policy_params(["max_moves_per_step=4,8"], ["adaptive"], lists=True) == {
        "adaptive": {"max_moves_per_step": [4, 8]}
    }
