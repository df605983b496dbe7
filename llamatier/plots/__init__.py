"""Figures people look at: sweep curves, per-step latency and occupancy, attention heat maps.

Every function returns a matplotlib Figure (Agg backend, no pyplot state) so
tests can check its axes; :func:`save_figure` writes PNG or SVG by extension.
"""

from llamatier.plots.attention_plot import plot_attention
from llamatier.plots.common import PLOT_FORMATS, check_plot_path, save_figure
from llamatier.plots.frontier_plot import plot_frontier
from llamatier.plots.proxy_plot import plot_proxy
from llamatier.plots.replay_plot import plot_replay
from llamatier.plots.sweep_plot import plot_sweep

__all__ = [
    "PLOT_FORMATS",
    "check_plot_path",
    "plot_attention",
    "plot_frontier",
    "plot_proxy",
    "plot_replay",
    "plot_sweep",
    "save_figure",
]
