"""Attention heat maps from a trace: layers x KV positions, or steps x KV positions for one layer."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from llamatier.errors import LlamatierError
from llamatier.plots.common import new_figure
from llamatier.trace import Trace

SWA_COLOR = "#d95f02"
_FLOOR = 1e-5  # smallest mass shown on the log colour scale


def _cmap():  # noqa: ANN202
    import matplotlib

    return matplotlib.colormaps["viridis"].with_extremes(bad="#f2f2f2")  # exact zeros: masked or unwritten


def plot_attention(trace: Trace, *, layer: int | None = None) -> Figure:
    """Heat map of the attention mass the trace recorded per KV block.

    ``layer=None``: one row per layer, each cell the block's mass averaged over
    decode steps (all steps if the trace has none); sliding-window layers are
    labelled in orange. ``layer=k``: one row per step of layer ``k`` (prefill
    rows average the batch's queries). Colours are on a log scale: mass is
    concentrated on a few blocks.
    """
    if trace.n_steps == 0:
        raise LlamatierError("the trace has no steps: nothing to plot")
    g = trace.model.geometry
    B = trace.block_tokens
    nb = trace.n_blocks
    swa = np.asarray(g.swa_layers, dtype=bool)
    windows = np.asarray(g.sliding_window, dtype=np.int64)
    if layer is None:
        dec = trace.is_decode
        sel = dec if dec.any() else np.ones(trace.n_steps, dtype=bool)
        data = trace.mass[sel].astype(np.float64).mean(axis=0)  # [L, NB]
        what = f"mean over {int(sel.sum())} {'decode' if dec.any() else ''} steps".replace("  ", " ")
        fig = new_figure(10.0, 1.6 + 0.28 * trace.n_layers)
        ax = fig.subplots()
        im = _show(ax, data, nb * B)
        ax.set_ylabel("layer")
        ax.set_yticks(np.arange(trace.n_layers))
        labels = [f"{i} SWA {windows[i]}" if swa[i] else str(i) for i in range(trace.n_layers)]
        ax.set_yticklabels(labels, fontsize=7)
        for tick, is_swa in zip(ax.get_yticklabels(), swa, strict=False):
            if is_swa:
                tick.set_color(SWA_COLOR)
        title = f"Attention mass per KV block, {what}: {trace.model.name}"
        if swa.any():
            title += f" (orange: sliding-window layers, window {int(windows.max())} tokens)"
    else:
        if not 0 <= int(layer) < trace.n_layers:
            raise LlamatierError(
                f"--layer {layer} is out of range: the trace's model has layers 0..{trace.n_layers - 1}"
            )
        layer = int(layer)
        data = trace.mass[:, layer, :].astype(np.float64)  # [S, NB]
        fig = new_figure(10.0, 5.5)
        ax = fig.subplots()
        im = _show(ax, data, nb * B)
        ax.set_ylabel("step (llama_decode call)")
        dec = trace.is_decode
        if (~dec).any():
            ax.axhline(float(np.flatnonzero(~dec).max()) + 0.5, color="w", lw=0.8, ls="--")
        kind = f"sliding window {windows[layer]} tokens" if swa[layer] else "global attention"
        title = f"Attention mass per KV block, layer {layer} ({kind}), every step: {trace.model.name}"
    ax.set_xlabel(f"KV position (tokens; blocks of {B})")
    ax.set_title(title, fontsize=10)
    cb = fig.colorbar(im, ax=ax, pad=0.01)
    cb.set_label("attention mass per block (log scale)")
    return fig


def _show(ax, data: np.ndarray, width_tokens: int):  # noqa: ANN001, ANN202
    """imshow with rows top to bottom, x in tokens, zeros masked, log colours."""
    pos = data[data > 0]
    vmax = float(pos.max()) if pos.size else 1.0
    vmin = max(_FLOOR, float(pos.min()) if pos.size else _FLOOR)
    vmin = min(vmin, vmax / 10)
    shown = np.ma.masked_less_equal(data, 0.0)
    return ax.imshow(
        shown, aspect="auto", interpolation="nearest", cmap=_cmap(),
        norm=LogNorm(vmin=vmin, vmax=vmax, clip=True),
        extent=(0, width_tokens, data.shape[0] - 0.5, -0.5),
    )
