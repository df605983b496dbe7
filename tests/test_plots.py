"""Plots: check the Figure objects (axes, titles, labels, lines, legends) and the files' signatures."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from llamatier.errors import LlamatierError
from llamatier.hardware import load_profile
from llamatier.plots import check_plot_path, plot_attention, plot_replay, plot_sweep, save_figure
from llamatier.replay import ReplayOptions, compare, replay
from llamatier.sweep import BudgetPoint, make_cells, parse_budgets, rows_frame, run_cells
from llamatier.trace import load_trace
from tests.conftest import assert_one_line_error, run_cli, trace_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
POLICIES = ["static", "lru", "adaptive", "oracle"]


def _is_svg(path) -> bool:  # noqa: ANN001
    head = path.read_text()[:2000]
    return head.lstrip().startswith("<?xml") and "<svg" in head


def _labels(ax) -> list[str]:  # noqa: ANN001
    return [ln.get_label() for ln in ax.get_lines() if not ln.get_label().startswith("_")]


@pytest.fixture(scope="module")
def sweep_df(tiny_trace_dir) -> pl.DataFrame:
    cells = make_cells(tiny_trace_dir, policies=",".join(POLICIES), budgets=parse_budgets("10%..100%", steps=4),
                       profiles="a100-40g,l4", kv_types="f16,q8_0")
    return rows_frame(run_cells(cells, jobs=1))


@pytest.fixture(scope="module")
def tiny_gemma_trace(tiny_gemma_model, tmp_path_factory):  # noqa: ANN201
    out = tmp_path_factory.mktemp("traces") / "tiny-gemma"
    trace_model(tiny_gemma_model, out)
    return load_trace(out)


# -- sweep ---------------------------------------------------------------------------------


def test_sweep_plot_has_one_facet_per_profile_and_kv_type(sweep_df, tmp_path):
    fig = plot_sweep(sweep_df)
    axes = fig.get_axes()
    assert len(axes) == 4
    assert [ax.get_title() for ax in axes] == [
        "a100-40g · KV f16/f16", "a100-40g · KV q8_0/q8_0", "l4 · KV f16/f16", "l4 · KV q8_0/q8_0",
    ]
    for ax in axes:
        assert ax.get_ylabel() == "p99 per-token latency (ms)"
        assert _labels(ax) == ["static", "lru", "adaptive", "oracle (bound)"]
    assert "% of the trace's peak KV bytes" in axes[-1].get_xlabel()
    assert "vs HBM budget" in fig.get_suptitle()
    legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert legend == ["static", "lru", "adaptive", "oracle (bound)", "llama.cpp n_ctx KV / peak KV"]
    # the drawn line is the data: static on l4, f16, p99 in ms by budget
    ref = sweep_df.filter((pl.col("profile") == "l4") & (pl.col("kv_type") == "f16/f16") & (pl.col("policy") == "static"))
    ref = ref.sort("hbm_budget_fraction")
    line = next(ln for ln in axes[2].get_lines() if ln.get_label() == "static")
    np.testing.assert_allclose(line.get_xdata(), ref["hbm_budget_fraction"].to_numpy() * 100)
    np.testing.assert_allclose(line.get_ydata(), ref["p99_s"].to_numpy() * 1e3)
    png, svg = save_figure(fig, tmp_path / "s.png"), save_figure(fig, tmp_path / "s.svg")
    assert png.read_bytes()[:8] == PNG_MAGIC and _is_svg(svg)


def test_sweep_plot_in_bytes_and_with_cells_that_do_not_run(tiny_trace_dir):
    """Sizes give a byte axis; a DRAM budget below llama.cpp's n_ctx reservation stops static."""
    cells = make_cells(tiny_trace_dir, policies="static,adaptive",
                       budgets=(BudgetPoint(size_bytes=4096), BudgetPoint(size_bytes=65536)),
                       dram_budget_bytes=1024)
    df = rows_frame(run_cells(cells, jobs=1))
    static = df.filter(pl.col("policy") == "static")
    assert not static["runs"].any() and static["error"].is_null().all()
    fig = plot_sweep(df)
    (ax,) = fig.get_axes()
    assert ax.get_xlabel() == "HBM budget for KV (KiB)"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[-1] == "does not run" and "static" in legend and "adaptive" in legend
    line = next(ln for ln in ax.get_lines() if ln.get_label() == "static")
    assert np.isnan(line.get_ydata()).all()


def test_sweep_plot_rejects_results_it_cannot_draw(sweep_df):
    with pytest.raises(LlamatierError, match="lack columns"):
        plot_sweep(sweep_df.drop("p99_s"))
    with pytest.raises(LlamatierError, match="nothing to plot"):
        plot_sweep(sweep_df.with_columns(pl.lit("boom").alias("error")))


# -- replay / compare ----------------------------------------------------------------------


def test_compare_plot_shows_latency_and_occupancy_per_policy(tiny_trace, tmp_path):
    kv = 40_000  # bytes of HBM: below the tiny trace's KV, so tiers are used
    comp = compare(tiny_trace, load_profile("a100-40g"), POLICIES, ReplayOptions(hbm_budget_bytes=kv))
    fig = plot_replay(comp)
    axes = fig.get_axes()
    assert len(axes) == 1 + len(POLICIES)
    top = axes[0]
    assert top.get_ylabel() == "decode step latency (ms)"
    assert _labels(top) == ["static", "lru", "adaptive", "oracle (bound)"]
    for r, ln in zip(comp.results, top.get_lines(), strict=True):
        y = np.asarray(ln.get_ydata(), dtype=float)
        np.testing.assert_allclose(y[r.is_decode], r.costs.step_s[r.is_decode] * 1e3)
        assert np.isnan(y[~r.is_decode]).all()
    assert [ax.get_title() for ax in axes[1:]] == [
        f"{p}: KV bytes per tier after each step" for p in ["static", "lru", "adaptive", "oracle (bound)"]
    ]
    assert all(ax.get_ylabel().startswith("KV held (") for ax in axes[1:])
    assert axes[-1].get_xlabel() == "step (llama_decode call)"
    legend = [t.get_text() for t in axes[1].get_legend().get_texts()]
    assert legend == ["hbm", "dram", "ssd", "remote", "HBM budget"]
    assert "on a100-40g" in fig.get_suptitle()
    assert save_figure(fig, tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC


def test_replay_plot_of_a_placement_that_does_not_run(tiny_trace):
    r = replay(tiny_trace, load_profile("a100-40g"), "static",
               ReplayOptions(hbm_budget_bytes=1024, dram_budget_bytes=1024))
    assert not r.runs
    fig = plot_replay(r)
    top, panel = fig.get_axes()
    assert _labels(top) == ["static: does not run"]
    assert any("does not run" in t.get_text() for t in panel.texts)


# -- attention heat maps -------------------------------------------------------------------


def test_attention_heatmap_layers_by_blocks_marks_sliding_window_layers(tiny_gemma_trace, tmp_path):
    tr = tiny_gemma_trace
    fig = plot_attention(tr)
    ax, cbar = fig.get_axes()
    img = ax.get_images()[0].get_array()
    assert img.shape == (tr.n_layers, tr.n_blocks)
    np.testing.assert_allclose(img.filled(0.0), tr.mass[tr.is_decode].astype(np.float64).mean(axis=0), rtol=1e-6)
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert ticks == ["0 SWA 64", "1"]
    assert ax.get_yticklabels()[0].get_color() != ax.get_yticklabels()[1].get_color()
    assert "sliding-window layers" in ax.get_title() and "mean over" in ax.get_title()
    assert ax.get_xlabel() == f"KV position (tokens; blocks of {tr.block_tokens})"
    assert "log scale" in cbar.get_ylabel()
    assert _is_svg(save_figure(fig, tmp_path / "a.svg"))


def test_attention_heatmap_of_one_layer_is_steps_by_blocks(tiny_gemma_trace):
    tr = tiny_gemma_trace
    ax = plot_attention(tr, layer=0).get_axes()[0]
    assert ax.get_images()[0].get_array().shape == (tr.n_steps, tr.n_blocks)
    assert "layer 0 (sliding window 64 tokens)" in ax.get_title()
    assert "layer 1 (global attention)" in plot_attention(tr, layer=1).get_axes()[0].get_title()
    with pytest.raises(LlamatierError, match="out of range"):
        plot_attention(tr, layer=tr.n_layers)


# -- files ---------------------------------------------------------------------------------


def test_plot_paths_are_checked(tmp_path):
    with pytest.raises(LlamatierError, match=r"\.png or \.svg"):
        check_plot_path(tmp_path / "x.jpg")
    with pytest.raises(LlamatierError, match="does not exist"):
        check_plot_path(tmp_path / "missing" / "x.png")
    with pytest.raises(LlamatierError, match="is a directory"):
        check_plot_path(tmp_path)


def test_cli_bad_plot_extension_is_one_line(tiny_trace_dir, tmp_path):
    assert_one_line_error(run_cli("inspect", str(tiny_trace_dir), "--plot", str(tmp_path / "a.gif")), ".png or .svg")


def test_cli_plots_on_inspect_replay_and_compare(tiny_trace_dir, tmp_path):
    heat, heat1, rep, cmp_svg = (tmp_path / n for n in ("h.png", "h1.svg", "r.png", "c.svg"))
    for args in (
        ("inspect", str(tiny_trace_dir), "--plot", str(heat)),
        ("inspect", str(tiny_trace_dir), "--plot", str(heat1), "--layer", "1"),
        ("replay", str(tiny_trace_dir), "--policy", "lru", "--hbm-budget", "40kB", "--plot", str(rep)),
        ("compare", str(tiny_trace_dir), "--policies", "static,adaptive", "--hbm-budget", "40kB",
         "--plot", str(cmp_svg)),
    ):
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stderr
    assert heat.read_bytes()[:8] == PNG_MAGIC and rep.read_bytes()[:8] == PNG_MAGIC
    assert _is_svg(heat1) and _is_svg(cmp_svg)
    assert_one_line_error(run_cli("inspect", str(tiny_trace_dir), "--plot", str(heat), "--layer", "7"), "out of range")
    assert_one_line_error(run_cli("inspect", str(tiny_trace_dir), "--layer", "1"), "--layer only applies with --plot")
