"""Shared plotting helpers: figures without pyplot's global state, units, saving by extension."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # plots are files: never ask for a display

from matplotlib.figure import Figure  # noqa: E402

from llamatier.errors import LlamatierError  # noqa: E402
from llamatier.outpaths import check_output_file  # noqa: E402

PLOT_FORMATS = (".png", ".svg")
POLICY_COLORS = {
    "static": "#d62728",
    "lru": "#ff7f0e",
    "adaptive": "#2ca02c",
    "oracle": "#7f7f7f",
    "streaming": "#1f77b4",
    "h2o": "#9467bd",
    "snapkv": "#8c564b",
    "adaptive-select": "#17becf",
}
TIER_COLORS = {"hbm": "#1f77b4", "dram": "#ff7f0e", "ssd": "#9467bd", "remote": "#8c564b"}
_EXTRA_COLORS = ("#1f77b4", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")


def policy_color(name: str, index: int = 0) -> str:
    """A stable colour per policy name (plug-in policies take the next free colour)."""
    return POLICY_COLORS.get(name, _EXTRA_COLORS[index % len(_EXTRA_COLORS)])


def policy_label(name: str, is_bound: bool) -> str:
    return f"{name} (bound)" if is_bound else name


def new_figure(width_in: float, height_in: float) -> Figure:
    """A figure not registered with pyplot (no global state, safe in libraries and threads)."""
    return Figure(figsize=(width_in, height_in), layout="constrained")


def bytes_unit(max_bytes: float) -> tuple[float, str]:
    """(divisor, unit name) that shows ``max_bytes`` as a readable number (binary units)."""
    for unit, div in (("GiB", 1024.0**3), ("MiB", 1024.0**2), ("KiB", 1024.0)):
        if max_bytes >= div:
            return div, unit
    return 1.0, "B"


def wants_log(values: list[float] | tuple[float, ...], ratio: float = 20.0) -> bool:
    """Log scale when the positive finite values span more than ``ratio``."""
    v = [x for x in values if x == x and x > 0 and x != float("inf")]
    return bool(v) and max(v) / min(v) > ratio


def log_y(ax: Any) -> None:
    """Log y axis with plain tick labels (0.5, 1, 2, 5 rather than 5x10^-1)."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_yscale("log")
    fmt = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    ax.yaxis.set_minor_formatter(fmt)


def check_plot_path(path: str | Path) -> Path:
    """Validate a --plot target: .png or .svg, in an existing folder."""
    p = Path(path)
    if not p.is_dir() and p.suffix.lower() not in PLOT_FORMATS:
        raise LlamatierError(
            f"--plot {p}: unknown image type {p.suffix or '(none)'!r}; give a file ending in .png or .svg"
        )
    return check_output_file(p, "--plot", "plot.png")


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 130) -> Path:
    """Write ``fig`` as PNG or SVG, chosen by the file's extension."""
    p = check_plot_path(path)
    try:
        fig.savefig(p, dpi=dpi, format=p.suffix.lower().lstrip("."))
    except OSError as exc:
        raise LlamatierError(f"cannot write {p}: {exc.strerror or exc}") from None
    return p
