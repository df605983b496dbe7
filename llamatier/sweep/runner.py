"""Build the cells of a sweep, run them on any executor, and store the rows as Parquet."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import replace
from pathlib import Path
from typing import Any

import polars as pl

from llamatier.errors import LlamatierError
from llamatier.outpaths import OutputClaim, atomic_write, check_output_file, claim_output
from llamatier.registry import EXECUTORS
from llamatier.replay import DEFAULT_POLICIES
from llamatier.replay.budgets import BudgetPoint
from llamatier.replay.options import ReplayOptions, policy_param_grid
from llamatier.sweep.cells import (
    ROW_SCHEMA,
    SweepCell,
    cached_geometry,
    cached_profile,
    cached_trace,
    run_cell,
)
from llamatier.sweep.executors import FuturesExecutor, SweepExecutor, make_executor

ProgressFn = Callable[[int, int], None]  # (cells done, cells total)


def _split(values: str | Sequence[str] | None) -> list[str | None]:
    if values is None:
        return [None]
    items = values.split(",") if isinstance(values, str) else list(values)
    out = [v.strip() for v in items if v is not None and str(v).strip()]
    return list(dict.fromkeys(out)) or [None]


def make_cells(
    trace_path: str | Path,
    *,
    policies: str | Sequence[str] = DEFAULT_POLICIES,
    budgets: Sequence[BudgetPoint] = (BudgetPoint(),),
    profiles: str | Sequence[str] = ("a100-40g",),
    kv_types: str | Sequence[str] | None = None,
    policy_params: dict[str, dict[str, Sequence[Any]]] | None = None,
    block_budgets: int | str | Sequence[int] | None = None,
    options: ReplayOptions | None = None,
    **option_fields: Any,
) -> list[SweepCell]:
    """Every combination of profile x KV type x policy (x its parameter values) x budget, validated first.

    ``options`` (or ReplayOptions fields as keywords; ``geometry=NAME`` for a
    what-if target) apply to every cell; ``policy_params`` gives, per policy,
    the values of each constructor parameter to sweep (``{"adaptive":
    {"decay": [0.5, 0.9]}}``); ``block_budgets`` (sparse mode: one number of
    blocks, several, or "4,8,16") is one more axis. Bad names (policy, profile, KV type, geometry)
    and bad options raise one LlamatierError here, in the calling process,
    not in a worker.
    """
    from llamatier.kvtypes import parse_kv_pair
    from llamatier.registry import POLICIES

    path = str(Path(trace_path))
    trace = cached_trace(path)  # a missing or corrupt trace fails here, once
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
    pols = list(dict.fromkeys(POLICIES.canonical(p) for p in pols))
    for p in profs:
        cached_profile(p)
    for k in kvs:
        if k is not None:
            parse_kv_pair(k)
    geometry = option_fields.pop("geometry", None)
    if geometry is not None:
        option_fields["target"] = cached_geometry(geometry)
    blocks = parse_block_budgets(block_budgets)
    if blocks[0] is not None:
        option_fields["block_budget"] = blocks[0]
    base = replace(options or ReplayOptions(), **option_fields)  # option errors (mode, block budget, ...) surface here
    grids = {p: policy_param_grid(dict((policy_params or {}).get(p, {}))) for p in pols}
    for p in policy_params or {}:
        if POLICIES.canonical(p) not in pols:
            raise LlamatierError(f"parameters given for policy {p!r}, which the sweep does not run ({', '.join(pols)})")
    cells = [
        SweepCell(trace_path=path, profile=prof, policy=pol, hbm_budget=b,
                  options=_cell_options(base, kv, pol, combo, bb))
        for prof, kv, pol in itertools.product(profs, kvs, pols)
        for combo in grids[pol]
        for bb in blocks
        for b in budgets
    ]
    if base.block_tokens is not None:
        trace.with_block_tokens(int(base.block_tokens))  # not a multiple of the trace's blocks: fail here, once
    return cells


def _cell_options(
    base: ReplayOptions, kv: str | None, policy: str, params: dict[str, Any], block_budget: int | None = None
) -> ReplayOptions:
    opts = replace(base, kv_type=kv) if kv is not None else base
    if block_budget is not None:
        opts = replace(opts, block_budget=block_budget)
    if params:
        merged = {**opts.policy_params, policy: {**opts.policy_params.get(policy, {}), **params}}
        opts = replace(opts, policy_params=merged)
    return opts


def parse_block_budgets(spec: int | str | Sequence[int] | None) -> list[int | None]:
    """Block budgets from 4, "4,8,16" or [4, 8]; [None] when none is given."""
    if spec is None:
        return [None]
    items = spec.split(",") if isinstance(spec, str) else [spec] if isinstance(spec, int) else list(spec)
    out: list[int | None] = []
    for item in items:
        if item is None or (isinstance(item, str) and not item.strip()):
            continue
        try:
            out.append(int(item))
        except (TypeError, ValueError):
            raise LlamatierError(f"--block-budget {spec!r}: give whole numbers of blocks, e.g. 4,8,16") from None
    return list(dict.fromkeys(out)) or [None]


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


def run_cells(
    cells: Sequence[SweepCell],
    *,
    executor: str | SweepExecutor | Executor | None = None,
    jobs: int | None = None,
    progress: ProgressFn | None = None,
) -> list[dict[str, Any]]:
    """Run every cell; rows come back in cell order, each with its ``cell`` index.

    ``executor``: a registered executor name (``serial``, ``processes``, ``dask``
    or a plug-in's; ``dask:tcp://HOST:8786`` for a running scheduler), a
    :class:`SweepExecutor`, or any ``concurrent.futures.Executor`` (used, not shut down). Default: ``processes`` with ``jobs`` workers
    (default: usable cores); ``jobs=1`` runs the cells in this process.
    """
    n = len(cells)
    check_jobs(jobs)
    runner = _executor(executor, jobs)
    rows: list[dict[str, Any] | None] = [None] * n
    done = 0
    if progress:
        progress(0, n)
    try:
        for i, row in runner.run(run_cell, cells):
            rows[i] = row
            done += 1
            if progress:
                progress(done, n)
    except KeyboardInterrupt:
        raise SweepInterrupted([{"cell": i, **r} for i, r in enumerate(rows) if r is not None], n) from None
    return [{"cell": i, **r} for i, r in enumerate(rows) if r is not None]


def _executor(executor: str | SweepExecutor | Executor | None, jobs: int | None) -> SweepExecutor:
    if executor is None:
        executor = "processes"
    if isinstance(executor, Executor):
        return FuturesExecutor(executor)
    if isinstance(executor, str):
        return make_executor(executor, jobs)
    return EXECUTORS.create(executor, jobs=jobs)


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


def claim_out_file(path: str | Path, flag: str = "--out", *, overwrite: bool = True) -> OutputClaim:
    """Claim the sweep result file ``path`` for this process (a hidden lock file beside it), then
    check it again under the claim; a second sweep to the same file gets a one-line error."""
    p = Path(path)
    claim = claim_output(p.with_name(f".{p.name}.llamatier-lock"), p, flag, "sweep")
    try:
        check_out_path(p, flag, overwrite=overwrite)
    except BaseException:
        claim.release()
        raise
    return claim


def write_results(rows: Iterable[dict[str, Any]] | pl.DataFrame, path: str | Path) -> Path:
    """Write sweep rows to one Parquet file (a unique temporary file, renamed over ``path`` once
    complete), then read its row count back; returns its path."""
    df = rows if isinstance(rows, pl.DataFrame) else rows_frame(rows)
    p = check_out_path(path)
    try:
        atomic_write(p, lambda tmp: df.write_parquet(tmp))
        written = int(pl.scan_parquet(p).select(pl.len()).collect().item())
    except OSError as exc:
        raise LlamatierError(f"cannot write {p}: {exc.strerror or exc}") from None
    if written != df.height:
        raise LlamatierError(f"{p} holds {written} rows after writing {df.height}: another process replaced it; run again")
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
    executor: str | SweepExecutor | Executor | None = None,
    jobs: int | None = None,
    progress: ProgressFn | None = None,
    **cell_args: Any,
) -> pl.DataFrame:
    """make_cells + run_cells + rows_frame in one call (``cell_args`` go to :func:`make_cells`)."""
    cells = make_cells(trace_path, **cell_args)
    return rows_frame(run_cells(cells, executor=executor, jobs=jobs, progress=progress))
