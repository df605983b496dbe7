"""Budget sweeps: replay every combination of profile, KV type, policy and HBM budget.

Each cell is a frozen :class:`SweepCell`; :func:`run_cell` turns it into one
row, a pure function of the cell, so cells run on any executor
(:mod:`llamatier.sweep.executors`). Rows go to one
Parquet file (:func:`write_results`), one row per cell.
"""

from llamatier.sweep.budgets import BudgetPoint, parse_budgets
from llamatier.sweep.cells import ROW_SCHEMA, SweepCell, run_cell, summary_row
from llamatier.sweep.cluster import DaskExecutor
from llamatier.sweep.executors import (
    FuturesExecutor,
    ProcessExecutor,
    SerialExecutor,
    SweepExecutor,
    default_jobs,
)
from llamatier.sweep.frontier import MEASURED_COLUMNS, frontier_table, join_measured
from llamatier.sweep.runner import (
    SweepInterrupted,
    check_jobs,
    check_out_path,
    claim_out_file,
    make_cells,
    parse_block_budgets,
    read_results,
    rows_frame,
    run_cells,
    sweep,
    write_results,
)
from llamatier.sweep.tables import facet_tables

__all__ = [
    "MEASURED_COLUMNS",
    "ROW_SCHEMA",
    "DaskExecutor",
    "BudgetPoint",
    "FuturesExecutor",
    "ProcessExecutor",
    "SerialExecutor",
    "SweepCell",
    "SweepExecutor",
    "SweepInterrupted",
    "check_jobs",
    "check_out_path",
    "claim_out_file",
    "default_jobs",
    "facet_tables",
    "frontier_table",
    "join_measured",
    "make_cells",
    "parse_block_budgets",
    "parse_budgets",
    "read_results",
    "rows_frame",
    "run_cell",
    "run_cells",
    "summary_row",
    "sweep",
    "write_results",
]
