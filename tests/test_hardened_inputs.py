"""Hardened inputs and outputs: one writer per sweep --out, bounded serve-replay work, JSON without
NaN, and command-line values checked by the same rules as the files they override."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from llamatier.errors import LlamatierError
from llamatier.serving.plan import check_run_fits, trace_shape
from llamatier.serving.workload import load_workload
from llamatier.sweep import claim_out_file
from tests.conftest import COMMITTED_GEMMA_TRACE, REPO, assert_one_line_error
from tests.corruption import cli_run

SWEEP = ["sweep", str(COMMITTED_GEMMA_TRACE), "--jobs", "1", "--profiles", "a100-40g,l4", "--steps", "6",
         "--policies", "static,lru,adaptive"]


def test_a_second_sweep_to_the_same_out_is_refused_before_it_computes(tmp_path):
    out = tmp_path / "s.parquet"
    with claim_out_file(out):
        err = assert_one_line_error(cli_run(*SWEEP, "--out", str(out)), "being written by another llamatier sweep")
        assert str(out) in err and not out.exists()
    assert not list(tmp_path.iterdir())  # the claim leaves nothing behind once released
    p = cli_run(*SWEEP, "--out", str(out), "--json")
    assert p.returncode == 0, p.stderr
    assert pl.read_parquet(out).height == len(json.loads(p.stdout)["rows"]) == 2 * 6 * 3


def test_two_sweep_processes_on_one_out(tmp_path):
    """The second starts while the first runs: it stops at once with one line; the first's rows all land."""
    out = tmp_path / "s.parquet"
    cmd = [sys.executable, "-m", "llamatier", *SWEEP, "--steps", "30", "--out", str(out)]
    first = subprocess.Popen(cmd, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".s.parquet.llamatier-lock"
    t0 = time.time()
    while not lock.exists() and first.poll() is None and time.time() - t0 < 120:
        time.sleep(0.02)
    assert first.poll() is None, "the first sweep ended before the second could start"
    second = subprocess.run(cmd, cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert_one_line_error(second, "being written by another llamatier sweep", "wait for it")
    out_text, err_text = first.communicate(timeout=300)
    assert first.returncode == 0, err_text
    assert pl.read_parquet(out).height == 2 * 30 * 3
    assert f"wrote {2 * 30 * 3} rows" in out_text.replace("\n", " ")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["s.parquet"]


def test_serve_replay_refuses_work_that_will_not_fit(tmp_path):
    w = tmp_path / "huge.toml"
    w.write_text(f'[workload]\ntraces = ["{COMMITTED_GEMMA_TRACE}"]\nprofile = "a100-40g"\n'
                 "[users]\ncount = 1000000000\n[sessions]\nturns = 2\n")
    err = assert_one_line_error(cli_run("serve-replay", str(w), "--json"), "would need about", "TiB", "is available")
    assert "1,000,000,000 users" in err
    spec = load_workload(w).with_users(10)
    from llamatier.trace import load_trace

    shapes = [trace_shape(load_trace(COMMITTED_GEMMA_TRACE))]
    need = check_run_fits(spec, shapes, available=1 << 40)
    with pytest.raises(LlamatierError, match="would need about"):
        check_run_fits(spec, shapes, available=need)  # more than the 80% of memory a run may take


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--slo-tpot-ms", "nan"], ["--slo-tpot-ms", "finite"]),
        (["--slo-tpot-ms", "-1"], ["--slo-tpot-ms", "> 0"]),
        (["--slo-ttft-ms", "inf"], ["--slo-ttft-ms", "finite"]),
        (["--users", "0"], ["--users", ">= 1"]),
        (["--max-users", "-5"], ["--max-users", ">= 1"]),
        (["--seed", "-1"], ["--seed", ">= 0"]),
    ],
)
def test_serve_replay_overrides_follow_the_workload_rules(args, needles):
    workload = REPO / "examples" / "workloads" / "gemma-270m-cpu-host.toml"
    assert_one_line_error(cli_run("serve-replay", str(workload), *args), *needles)


@pytest.mark.parametrize("command", ["replay", "compare", "sweep"])
def test_an_empty_geometry_is_an_error_not_ignored(command, tmp_path):
    extra = ["--out", str(tmp_path / "s.parquet")] if command == "sweep" else []
    assert_one_line_error(cli_run(command, str(COMMITTED_GEMMA_TRACE), "--geometry", "", *extra), "--geometry is empty")


def test_json_output_never_holds_nan_or_infinity(capsys):
    from llamatier.cli.app import print_json

    print_json({"a": math.nan, "b": np.float32("inf"), "c": [np.float64(-np.inf), 1.5], "d": np.array([np.nan, 2.0]),
                "e": np.int64(3), "f": Path("x")})
    text = capsys.readouterr().out
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": None, "c": [None, 1.5], "d": [None, 2.0], "e": 3, "f": "x"}
