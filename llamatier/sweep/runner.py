"""Build the cells of a sweep, run them on any executor, and store the rows as Parquet."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import polars as pl

from llamatier.errors import LlamatierError
from llamatier.outpaths import check_output_file
from llamatier.sweep.budgets import BudgetPoint
from llamatier.sweep.cells import ROW_SCHEMA, SweepCell, _geometry, _profile, _trace, run_cell

ProgressFn = Callable[[int, int], None]  # (cells done, cells total)


def default_jobs() -> int:
    """Worker processes by default: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _split(values: str | Sequence[str] | None) -> list[str | None]:
    if values is None:
        return [None]
    items = values.split(",") if isinstance(values, str) else list(values)
    out = [v.strip() for v in items if v is not None and str(v).strip()]
    return list(dict.fromkeys(out)) or [None]


def make_cells(
    trace_path: str | Path,
    *,
    policies: str | Sequence[str] = ("static", "lru", "adaptive", "oracle"),
    budgets: Sequence[BudgetPoint] = (BudgetPoint(),),
    profiles: str | Sequence[str] = ("a100-40g",),
    kv_types: str | Sequence[str] | None = None,
    dram_budget_bytes: int | None = None,
    geometry: str | None = None,
    block_tokens: int | None = None,
    mode: str = "lossless",
    block_budget: int | None = None,
    static_mode: str = "nkvo",
    dram_reads: str = "auto",
    prefetch: bool = False,
    swa_full: bool = False,
) -> list[SweepCell]:
    """Every combination of profile x KV type x policy x budget, validated before anything runs.

    Bad names (policy, profile, KV type, geometry) and bad options raise one
    LlamatierError here, in the calling process, not in a worker.
    """
    from llamatier.kvtypes import parse_kv_pair
    from llamatier.policies import get_policy

    path = str(Path(trace_path))
    trace = _trace(path)  # a missing or corrupt trace fails here, once
    pols = [p for p in _split(policies) if p]
    profs = [p for p in _split(profiles) if p]
    kvs = _split(kv_types)
    if not pols:
        raise LlamatierError("no policies given: e.g. --policies static,lru,adaptive,oracle")
    if not profs:
        raise LlamatierError("no profiles given: e.g. --profiles a100-40g,l4 (see `llamatier profiles`)")
    if not budgets:
        raise LlamatierError("no HBM budgets given: e.g. --hbm-budget 10%..100%")
    if kv_types is not None and kvs == [None]:
        raise LlamatierError("no KV types given: e.g. --kv-types f16,q8_0,q4_0/f16 (or leave it out for the trace's)")
    for p in pols:
        get_policy(p)
    for p in profs:
        _profile(p)
    for k in kvs:
        if k is not None:
            parse_kv_pair(k)
    if geometry:
        _geometry(geometry)
    cells = [
        SweepCell(
            trace_path=path,
            profile=prof,
            policy=pol.lower(),
            hbm_budget=b,
            kv_type=kv,
            dram_budget_bytes=dram_budget_bytes,
            geometry=geometry or None,
            block_tokens=block_tokens,
            mode=mode,
            block_budget=block_budget,
            static_mode=static_mode,
            dram_reads=dram_reads,
            prefetch=prefetch,
            swa_full=swa_full,
        )
        for prof, kv, pol, b in itertools.product(profs, kvs, pols, budgets)
    ]
    cells[0].options(None)  # option errors (mode, block budget, ...) surface here
    if block_tokens is not None:
        trace.with_block_tokens(int(block_tokens))  # not a multiple of the trace's blocks: fail here, once
    return cells


class SweepInterrupted(LlamatierError):
    """Ctrl-C during :func:`run_cells`: ``rows`` holds the cells that finished (in cell order)."""

    def __init__(self, rows: list[dict[str, Any]], n_cells: int) -> None:
        super().__init__(f"sweep interrupted after {len(rows)} of {n_cells} cells", exit_code=130)
        self.rows = rows
        self.n_cells = n_cells


def check_jobs(jobs: int | None) -> None:
    """``jobs`` is None (usable cores) or at least 1."""
    if jobs is not None and jobs < 1:
        raise LlamatierError(f"--jobs must be >= 1 (got {jobs})")


def _pool(jobs: int) -> ProcessPoolExecutor:
    # forkserver: workers do not inherit the parent's threads (the progress bar's) or llama.cpp state
    methods = multiprocessing.get_all_start_methods()
    method = "forkserver" if "forkserver" in methods else "spawn"
    if method == "forkserver":
        _start_forkserver_without_sigint()
    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context(method))


def _start_forkserver_without_sigint() -> None:
    """Start the forkserver with SIGINT ignored, so that sweep workers never see Ctrl-C.

    A terminal sends SIGINT to its whole foreground process group, workers included: a worker
    hit while importing or waiting for a cell printed a multi-line traceback. An ignored signal
    stays ignored across fork and exec (Python then installs no KeyboardInterrupt handler), so
    the forkserver and every worker it forks ignore SIGINT; the parent alone handles Ctrl-C and
    stops the workers. SIGINT is blocked meanwhile, so a Ctrl-C in that moment is delivered
    here once the handler is back (Linux keeps a blocked signal pending even while ignored).
    """
    from multiprocessing import forkserver

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        forkserver.ensure_running()  # only the main thread may change signal handlers
        return
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    old_handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, old_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _stop_workers(pool: Executor) -> None:
    """Terminate a process pool's workers (they ignore Ctrl-C; running cells are abandoned)."""
    processes = getattr(pool, "_processes", None) or {}
    for proc in list(processes.values()):
        if proc.is_alive():
            proc.terminate()


def run_cells(
    cells: Sequence[SweepCell],
    *,
    executor: Executor | None = None,
    jobs: int | None = None,
    progress: ProgressFn | None = None,
) -> list[dict[str, Any]]:
    """Run every cell; rows come back in cell order, each with its ``cell`` index.

    ``executor``: any ``concurrent.futures.Executor`` (it is used, not shut
    down), e.g. a cluster backend's. Without one, ``jobs`` worker processes run
    the cells (default: usable cores); ``jobs=1`` runs them in this process.
    Workers start through forkserver (polars and llama.cpp hold threads that
    fork would copy mid-lock), so a script that calls this needs the usual
    ``if __name__ == "__main__":`` guard.
    """
    n = len(cells)
    check_jobs(jobs)
    rows: list[dict[str, Any] | None] = [None] * n
    done = 0
    if progress:
        progress(0, n)
    try:
        if executor is None and (min(jobs or default_jobs(), n) <= 1):
            for i, cell in enumerate(cells):
                rows[i] = run_cell(cell)
                done += 1
                if progress:
                    progress(done, n)
        else:
            own = executor is None
            pool = executor if executor is not None else _pool(min(jobs or default_jobs(), n))
            try:
                futures = {pool.submit(run_cell, cell): i for i, cell in enumerate(cells)}
                for fut in as_completed(futures):
                    rows[futures[fut]] = fut.result()
                    done += 1
                    if progress:
                        progress(done, n)
            except BrokenProcessPool:
                raise LlamatierError(
                    "a sweep worker process died before finishing its cell: in a script, call run_cells under "
                    "`if __name__ == '__main__':` (workers re-import the main module), or run with jobs=1"
                ) from None
            except KeyboardInterrupt:
                if own:
                    _stop_workers(pool)
                raise
            finally:
                if own:
                    pool.shutdown(cancel_futures=True)
    except KeyboardInterrupt:
        raise SweepInterrupted([{"cell": i, **r} for i, r in enumerate(rows) if r is not None], n) from None
    return [{"cell": i, **r} for i, r in enumerate(rows) if r is not None]


def rows_frame(rows: Iterable[dict[str, Any]]) -> pl.DataFrame:
    """Rows as a polars frame with the fixed sweep schema (one row per cell)."""
    rows = list(rows)
    return pl.DataFrame(
        [{k: r.get(k) for k in ROW_SCHEMA} for r in rows], schema=ROW_SCHEMA, orient="row"
    ) if rows else pl.DataFrame(schema=ROW_SCHEMA)


def check_out_path(path: str | Path, flag: str = "--out", *, overwrite: bool = True) -> Path:
    """A file we can write (checked before a long run); an existing file only if it is a sweep's own result,
    and only with ``overwrite`` (the CLI's --force), so that an earlier sweep is never lost by accident."""
    p = check_output_file(path, flag, "sweep.parquet")
    if p.exists():
        try:
            columns = pl.read_parquet_schema(p)
        except Exception:
            columns = {}
        if "cell" not in columns or "p99_s" not in columns:
            raise LlamatierError(
                f"{flag} {p} exists and is not a llamatier sweep result; give a new file name (or delete it)"
            )
        if not overwrite:
            raise LlamatierError(
                f"{flag} {p} already holds a sweep result; give another {flag} or pass --force to replace it"
            )
    return p


def write_results(rows: Iterable[dict[str, Any]] | pl.DataFrame, path: str | Path) -> Path:
    """Write sweep rows to one Parquet file; returns its path."""
    df = rows if isinstance(rows, pl.DataFrame) else rows_frame(rows)
    p = check_out_path(path)
    try:
        df.write_parquet(p)
    except OSError as exc:
        raise LlamatierError(f"cannot write {p}: {exc.strerror or exc}") from None
    return p


def read_results(path: str | Path) -> pl.DataFrame:
    """Read a sweep's Parquet file back, checking it has the sweep columns."""
    p = Path(path)
    if not p.exists():
        raise LlamatierError(f"sweep results not found: {p} (run `llamatier sweep TRACE --out {p}`)")
    try:
        df = pl.read_parquet(p)
    except Exception:
        raise LlamatierError(f"{p} is not a readable Parquet file: re-run the sweep") from None
    missing = [c for c in ("policy", "profile", "kv_type", "hbm_budget_bytes", "p99_s") if c not in df.columns]
    if missing:
        raise LlamatierError(f"{p} is not a llamatier sweep (no columns {missing}): re-run `llamatier sweep`")
    return df


def sweep(
    trace_path: str | Path,
    *,
    executor: Executor | None = None,
    jobs: int | None = None,
    progress: ProgressFn | None = None,
    **cell_args: Any,
) -> pl.DataFrame:
    """make_cells + run_cells + rows_frame in one call (``cell_args`` go to :func:`make_cells`)."""
    cells = make_cells(trace_path, **cell_args)
    return rows_frame(run_cells(cells, executor=executor, jobs=jobs, progress=progress))
