"""Sweeps on Dask: rows equal to the local process pool's, traces shipped by content, one-line errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import polars as pl
import pytest
from distributed import Client, LocalCluster

from llamatier.errors import LlamatierError
from llamatier.sweep import cluster as dask_cluster
from llamatier.sweep import make_cells, parse_budgets, rows_frame, run_cells
from llamatier.sweep.cluster import DaskExecutor
from llamatier.sweep.shipping import resolve_trace, shipped_dir, trace_digest
from tests.conftest import COMMITTED_GEMMA_TRACE, assert_one_line_error
from tests.conftest import run_cli as cli

TIMINGS = ["cell_wall_s", "replay_wall_s", "decision_s"]  # wall-clock measurements differ run to run


def cells_for(trace: str | Path) -> list:
    return make_cells(trace, policies="lru,adaptive", budgets=parse_budgets("30%,90%"), profiles="a100-40g,l4",
                      geometry="llama3-8b")


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory) -> str:  # noqa: ANN001
    """A 2-worker LocalCluster whose workers run in their own folder and keep shipped traces in a temporary cache."""
    home = tmp_path_factory.mktemp("workers")
    old_cwd, old_cache = os.getcwd(), os.environ.get("LLAMATIER_CACHE")
    os.chdir(home)
    os.environ["LLAMATIER_CACHE"] = str(home / "cache")
    try:
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    finally:
        os.chdir(old_cwd)
        if old_cache is None:
            os.environ.pop("LLAMATIER_CACHE", None)
        else:
            os.environ["LLAMATIER_CACHE"] = old_cache
    yield cluster.scheduler_address
    cluster.close()


def test_dask_rows_equal_process_pool_rows() -> None:
    """`dask` starts a 2-worker LocalCluster; its rows equal the local process pool's."""
    cells = cells_for(COMMITTED_GEMMA_TRACE)
    local = rows_frame(run_cells(cells, executor="processes", jobs=2))
    done: list[int] = []
    on_dask = rows_frame(run_cells(cells, executor="dask", jobs=2, progress=lambda d, n: done.append(d)))
    assert local.height == on_dask.height == 8 and local["error"].null_count() == 8
    assert on_dask.drop(TIMINGS).equals(local.drop(TIMINGS))
    assert done[0] == 0 and done[-1] == 8 and done == sorted(done)  # the progress bar moves with both


def test_trace_goes_to_workers_that_cannot_read_it(scheduler: str, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A relative trace path exists here but not in the workers' folder: they get its files by content."""
    shutil.copytree(COMMITTED_GEMMA_TRACE, tmp_path / "tr")
    monkeypatch.chdir(tmp_path)
    cells = cells_for("tr")[:4]
    local = rows_frame(run_cells(cells, executor="serial"))
    on_dask = rows_frame(run_cells(cells, executor=f"dask:{scheduler}"))
    assert on_dask["error"].null_count() == 4 and on_dask.drop(TIMINGS).equals(local.drop(TIMINGS))
    assert on_dask["trace"].unique().to_list() == ["tr"]
    digest = trace_digest("tr")
    with Client(scheduler) as client:
        shipped = client.run(lambda: shipped_dir(digest).is_dir())
    assert list(shipped.values()) == [True, True]


def test_trace_too_big_to_ship_is_one_error(scheduler: str, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    shutil.copytree(COMMITTED_GEMMA_TRACE.with_name("gemma3-270m-32k"), tmp_path / "big")  # not shipped before
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dask_cluster, "SHIP_LIMIT_BYTES", 1000)
    with pytest.raises(LlamatierError, match="cannot read trace big and it is too big to send") as exc:
        run_cells(cells_for("big")[:2], executor=f"dask:{scheduler}")
    assert "\n" not in str(exc.value)


def test_a_worker_without_the_trace_says_so_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(LlamatierError, match="cannot read trace") as exc:
        resolve_trace(str(tmp_path / "gone"), "ab" * 32)
    assert "\n" not in str(exc.value) and "same path" in str(exc.value)
    assert resolve_trace("any", None) == "any"  # local executors read the path as given


def test_unreachable_scheduler_is_one_line(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(dask_cluster, "CONNECT_TIMEOUT_S", 1)
    p = cli("sweep", str(COMMITTED_GEMMA_TRACE), "--executor", "dask:tcp://127.0.0.1:9", "--out", str(tmp_path / "s.parquet"))
    assert_one_line_error(p, "cannot reach the Dask scheduler at tcp://127.0.0.1:9", "dask scheduler")
    assert not (tmp_path / "s.parquet").exists()


def test_sweep_command_on_a_running_scheduler(scheduler: str, tmp_path: Path) -> None:
    args = [str(COMMITTED_GEMMA_TRACE), "--policies", "lru,oracle", "--hbm-budget", "50%", "--geometry", "llama3-8b"]
    a = cli("sweep", *args, "--executor", f"dask:{scheduler}", "--out", str(tmp_path / "a.parquet"))
    b = cli("sweep", *args, "--executor", "serial", "--out", str(tmp_path / "b.parquet"))
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    rows_a, rows_b = pl.read_parquet(tmp_path / "a.parquet"), pl.read_parquet(tmp_path / "b.parquet")
    assert rows_a.height == 2 and rows_a.drop(TIMINGS).equals(rows_b.drop(TIMINGS))


def test_dask_executor_takes_an_address_others_do_not() -> None:
    with pytest.raises(LlamatierError, match="takes no address"):
        run_cells([], executor="processes:tcp://x:1")
    assert DaskExecutor(address="tcp://h:8786").address == "tcp://h:8786"
