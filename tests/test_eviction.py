"""Eviction policies and their accuracy measured in real llama.cpp (tiny gemma3 model: a sliding-window
layer and a global one), plus the policies' invariants with hypothesis on synthetic traces."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llamatier.errors import LlamatierError
from llamatier.policies import get_policy
from llamatier.quality import load_eviction_rows, measure_eviction, plan_eviction, save_eviction
from llamatier.replay import ReplayOptions, replay
from llamatier.sweep.frontier import same_trace
from llamatier.trace import load_trace
from llamatier.trace.chunks import ArrayMassSource
from tests.conftest import TINY_PROMPT, assert_one_line_error, run_cli, trace_model
from tests.strategies import eviction_case, slow_settings

POLICIES = ["streaming", "h2o", "snapkv", "adaptive-select"]
N_STEPS = 24  # scored decode steps in the llama.cpp tests


@pytest.fixture(scope="module")
def gemma_tiny_trace(tiny_gemma_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("evict")
    prompt = d / "prompt.txt"
    prompt.write_text(TINY_PROMPT)
    out = d / "trace"
    trace_model(tiny_gemma_model, out, n_predict=N_STEPS, positions=False, prompt_source=f"file:{prompt}")
    return out


@pytest.fixture(scope="module")
def result(tiny_gemma_model: Path, gemma_tiny_trace: Path):
    # keep 64 blocks: more than the trace holds, so nothing is dropped
    return measure_eviction(tiny_gemma_model, gemma_tiny_trace, POLICIES, [3, 8, 64], n_threads=1)


def test_removing_nothing_gives_exactly_the_full_run(result) -> None:
    for pol in POLICIES:
        row = result.row(pol, 64)
        assert row.kept_fraction == 1.0 and row.mass_dropped_mean == 0.0
        assert row.mean_kl == 0.0 and row.max_kl == 0.0
        assert row.top1_agreement == 1.0 and row.ppl == row.ppl_ref
        p = result.positions.filter((pl.col("policy") == pol) & (pl.col("keep_blocks") == 64))
        assert (p["nll"] == p["nll_ref"]).all()  # bit for bit, every step


def test_removing_blocks_changes_the_logits(result) -> None:
    for pol in POLICIES:
        small, mid = result.row(pol, 3), result.row(pol, 8)
        assert small.kept_fraction < mid.kept_fraction < 1.0
        assert small.mass_dropped_mean > 0.0 and small.mean_kl > 0.0
        p = result.positions.filter((pl.col("policy") == pol) & (pl.col("keep_blocks") == 3))
        assert (p["kl"] > 0).mean() > 0.9  # almost every step differs from the full cache
        assert (p["blocks_kept"] <= 3).all() and (p["blocks_kept"] < p["blocks_held"]).all()
    assert result.row("streaming", 3).mean_kl > result.row("streaming", 8).mean_kl


def test_rows_match_their_steps_and_the_replay(result, gemma_tiny_trace: Path) -> None:
    tr = load_trace(gemma_tiny_trace)
    for r in result.rows:
        p = result.positions.filter((pl.col("policy") == r.policy) & (pl.col("keep_blocks") == r.keep_blocks))
        assert p.height == N_STEPS == result.n_steps
        assert r.mean_kl == pytest.approx(p["kl"].mean(), abs=1e-15)
        assert r.top1_agreement == pytest.approx(p["top1_agree"].mean())
        assert r.mass_dropped_mean == pytest.approx(p["mass_dropped"].mean())
        s = replay(tr, _profile(), r.policy, ReplayOptions(mode="sparse", block_budget=r.keep_blocks)).summary()
        assert r.mass_dropped_mean == pytest.approx(s["attention_mass_dropped"]["mean"])  # the replay's own figure
    assert result.row("adaptive-select", 8).kind == "selection" and result.row("h2o", 8).kind == "eviction"
    assert not result.row("adaptive-select", 3).permanent and result.row("streaming", 3).permanent


def test_freeing_cells_for_good_agrees_with_the_per_step_view(tiny_gemma_model: Path, gemma_tiny_trace: Path,
                                                              result) -> None:
    freed = measure_eviction(tiny_gemma_model, gemma_tiny_trace, "streaming,snapkv", [3, 64], n_threads=1,
                             mechanism="evict")
    for pol in ("streaming", "snapkv"):
        assert freed.row(pol, 64).mean_kl == 0.0
        a, b = freed.row(pol, 3), result.row(pol, 3)
        assert a.mean_kl == pytest.approx(b.mean_kl, rel=1e-3)  # only the cells' order differs
    with pytest.raises(LlamatierError, match="use --mechanism view"):
        measure_eviction(tiny_gemma_model, gemma_tiny_trace, "adaptive-select", [3], n_threads=1, mechanism="evict")


def test_saved_result_round_trips(result, tmp_path: Path) -> None:
    paths = save_eviction(result, tmp_path / "ev")
    assert [p.name for p in paths] == ["eviction.json", "eviction.parquet", "eviction_positions.parquet"]
    rows = load_eviction_rows(tmp_path / "ev")
    assert rows.height == len(result.rows) and set(rows["policy"]) == set(POLICIES)
    doc = json.loads(paths[0].read_text())
    assert doc["format"] == "llamatier-eviction" and doc["meta"]["n_steps"] == N_STEPS
    with pytest.raises(LlamatierError, match="not a llamatier eviction result"):
        load_eviction_rows(paths[2])


def test_what_the_memory_api_cannot_express_is_refused(tiny_gemma_model: Path, gemma_tiny_trace: Path,
                                                       tiny_model: Path) -> None:
    tr = load_trace(gemma_tiny_trace)
    with pytest.raises(LlamatierError, match="layer-uniform"):
        plan_eviction(tr, "adaptive", 4)  # per-layer choices
    with pytest.raises(LlamatierError, match="--block-budget >= 2"):
        plan_eviction(tr, "h2o", 1)
    with pytest.raises(LlamatierError, match="--mode sparse"):
        replay(tr, _profile(), "h2o", ReplayOptions())
    with pytest.raises(LlamatierError, match="not the model the trace was recorded with"):
        measure_eviction(tiny_model, gemma_tiny_trace, "h2o", [4], n_threads=1)


def test_cli_eviction_run_and_its_errors(tiny_gemma_model: Path, gemma_tiny_trace: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    proc = run_cli("quality", str(tiny_gemma_model), "--trace", str(gemma_tiny_trace), "--evict", "h2o",
                   "--keep", "4", "--steps", "6", "--threads", "1", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["meta"]["n_steps"] == 6 and doc["rows"][0]["policy"] == "h2o"
    assert (out / "eviction.parquet").is_file()
    assert_one_line_error(run_cli("quality", str(tiny_gemma_model), "--evict", "h2o", "--keep", "4"), "--trace")
    assert_one_line_error(run_cli("quality", str(tiny_gemma_model), "--trace", str(gemma_tiny_trace),
                                  "--evict", "h2o", "--keep", "4", "--kv-types", "q8_0"), "--kv-types")
    assert_one_line_error(run_cli("quality", str(tiny_gemma_model), "--trace", str(gemma_tiny_trace),
                                  "--evict", "h2o", "--keep", "four"), "--keep")
    assert_one_line_error(run_cli("quality", str(tiny_gemma_model), "--trace", str(gemma_tiny_trace),
                                  "--evict", "nope", "--keep", "4"), "unknown policy", "h2o")
    wrong = tmp_path / "other.txt"
    wrong.write_text("another prompt")
    assert_one_line_error(run_cli("quality", str(tiny_gemma_model), "--trace", str(gemma_tiny_trace), "--evict",
                                  "h2o", "--keep", "4", "--prompt-file", str(wrong)), "sha256")


# -- the policies' invariants on synthetic traces (hypothesis) ---------------------------------


def _profile():  # noqa: ANN202
    from llamatier.hardware import load_profile

    return load_profile("a100-40g")


SETTINGS = slow_settings(60)


@SETTINGS
@given(case=eviction_case(POLICIES), cut=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_choices_at_a_step_depend_only_on_earlier_steps(case: tuple, cut: float, seed: int) -> None:
    trace, policy, budget = case
    t = int(cut * (trace.n_steps - 1))
    mass = trace.mass.copy()
    rng = np.random.default_rng(seed)
    future = rng.random(mass[t:].shape).astype(np.float32) * (mass[t:] > 0)  # same visible blocks, other mass
    mass[t:] = future / np.maximum(future.sum(axis=2, keepdims=True), 1e-12)
    a = plan_eviction(trace, policy, budget)
    b = plan_eviction(replace(trace, source=ArrayMassSource(mass)), policy, budget)
    upto = a.steps <= t  # step t itself is decided before its attention is seen
    np.testing.assert_array_equal(a.kept[upto], b.kept[upto])


@SETTINGS
@given(case=eviction_case(POLICIES))
def test_budget_respected_and_current_position_never_dropped(case: tuple) -> None:
    trace, policy, budget = case
    plan = plan_eviction(trace, policy, budget)
    B = trace.block_tokens
    n = np.arange(plan.steps.size)
    assert (plan.kept.sum(axis=1) <= budget).all()
    assert plan.kept[n, plan.pos // B].all()  # the block the new token is written to
    assert plan.kept[n, np.maximum(plan.pos - 1, 0) // B].all()  # and the previous token's
    assert (plan.kept.sum(axis=1) <= plan.held).all()
    if get_policy(policy).permanent:
        assert plan.permanent
    else:  # a per-step selection always uses its whole budget when there is enough to choose from
        assert (plan.kept.sum(axis=1) == np.minimum(budget, plan.held)).all()
    reads = plan.result.record.traffic.read_blocks.sum(axis=2)[plan.steps]  # [D, L] blocks read per layer
    assert (reads <= budget).all()


@SETTINGS
@given(case=eviction_case(POLICIES), hbm_blocks=st.integers(0, 40))
def test_placement_stays_within_every_tier_and_the_decisions_do_not_depend_on_it(case: tuple, hbm_blocks: int) -> None:
    trace, policy, budget = case
    opts = ReplayOptions(mode="sparse", block_budget=budget, hbm_budget_bytes=hbm_blocks * 16 * 1024)
    r = replay(trace, _profile(), policy, opts)  # the engine raises if a tier goes over its budget
    assert (r.record.occupancy_bytes <= r.capacity_bytes[None, :] + 1e-6).all()
    assert (r.record.traffic.move_bytes >= 0).all()
    free = replay(trace, _profile(), policy, replace(opts, hbm_budget_bytes=None))
    np.testing.assert_array_equal(r.record.dropped_mass, free.record.dropped_mass)


# -- the frontier (sweep + measured accuracy) and the proxy check ----------------------------


def test_trace_prompt_is_found_and_checked(gemma_trace) -> None:
    from llamatier.demo import builtin_prompt
    from llamatier.quality.inputs import trace_prompt_text

    assert trace_prompt_text(gemma_trace) == builtin_prompt()


def test_sweep_crosses_block_budgets_and_joins_measured_accuracy(result, gemma_tiny_trace: Path,
                                                                 tmp_path: Path) -> None:
    save_eviction(result, tmp_path / "ev")
    out, plot = tmp_path / "sweep.parquet", tmp_path / "frontier.png"
    proc = run_cli("sweep", str(gemma_tiny_trace), "--policies", "h2o,streaming,snapkv,adaptive-select,lru",
                   "--mode", "sparse", "--block-budget", "3,8,5", "--hbm-budget", "25%,100%", "--profiles", "t4",
                   "--jobs", "1", "--quality", str(tmp_path / "ev"), "--out", str(out), "--plot", str(plot))
    assert proc.returncode == 0, proc.stderr
    assert "mean KL" in proc.stdout and "no measured accuracy" in proc.stderr  # budget 5 and lru were not measured
    df = pl.read_parquet(out)
    assert df.height == 5 * 3 * 2 and plot.stat().st_size > 0
    for r in result.rows:
        if r.keep_blocks not in (3, 8):
            continue
        d = df.filter((pl.col("policy") == r.policy) & (pl.col("block_budget") == r.keep_blocks))
        assert d.height == 2  # both HBM budgets
        assert (d["measured_mean_kl"] == r.mean_kl).all() and (d["measured_top1"] == r.top1_agreement).all()
        assert d["dropped_mass_mean"].to_numpy() == pytest.approx(r.mass_dropped_mean)  # the replay agrees
    assert df.filter(pl.col("block_budget") == 5)["measured_mean_kl"].is_null().all()
    assert df.filter(pl.col("policy") == "lru")["measured_mean_kl"].is_null().all()
    assert_one_line_error(run_cli("sweep", str(gemma_tiny_trace), "--quality", str(tmp_path / "ev"),
                                  "--out", str(tmp_path / "x.parquet")), "--mode sparse")
    from tests.conftest import COMMITTED_GEMMA_TRACE

    assert_one_line_error(run_cli("sweep", str(COMMITTED_GEMMA_TRACE), "--policies", "h2o", "--mode", "sparse",
                                  "--block-budget", "8", "--quality", str(tmp_path / "ev"),
                                  "--out", str(tmp_path / "y.parquet")), "another trace")


def test_proxy_correlation_is_spearman() -> None:
    from llamatier.quality import proxy_correlation, spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # ties: average ranks (scipy)
    rows = pl.DataFrame({
        "trace": ["a"] * 4 + ["b"] * 4, "policy": ["p", "q"] * 4, "keep_blocks": [4, 4, 8, 8] * 2,
        "mass_dropped_mean": [0.5, 0.4, 0.2, 0.1, 0.6, 0.3, 0.25, 0.05],
        "mean_kl": [0.9, 0.7, 0.3, 0.2, 1.0, 0.5, 0.35, 0.01],
        "top1_agreement": [0.5, 0.6, 0.8, 0.9, 0.4, 0.7, 0.75, 0.99],
    })
    s = proxy_correlation(rows)
    assert s["rho_mass_vs_kl"] == 1.0 and s["rho_mass_vs_top1_loss"] == 1.0 and s["n_points"] == 8
    assert s["per_trace"] == {"a": 1.0, "b": 1.0}
    from llamatier.plots import plot_proxy

    fig = plot_proxy(rows)
    assert "rho = 1.00 over 8 points" in fig._suptitle.get_text()


def test_committed_gemma_results_match_their_proxy_figures() -> None:
    """results/eviction: every row loads, nothing-dropped rows are exact, proxy.json is what the rows give."""
    from llamatier.quality import proxy_correlation
    from tests.conftest import REPO

    base = REPO / "results" / "eviction"
    rows, steps = [], []
    for d in sorted(p.parent for p in base.glob("*/eviction.parquet")):
        rows.append(load_eviction_rows(d).with_columns(pl.lit(d.name).alias("trace")))
        steps.append(pl.read_parquet(d / "eviction_positions.parquet").with_columns(pl.lit(d.name).alias("trace")))
    frame = pl.concat(rows, how="diagonal_relaxed")
    assert frame.height >= 30 and frame["policy"].n_unique() >= 3 and frame["keep_blocks"].n_unique() >= 5
    assert frame["trace"].n_unique() >= 2
    for d in sorted(frame["trace"].unique()):  # each was measured on the committed trace of its name
        assert same_trace(frame.filter(pl.col("trace") == d), load_trace(REPO / "traces" / d)).height >= 20
    saved = json.loads((base / "proxy.json").read_text())
    fresh = proxy_correlation(frame, pl.concat(steps))
    assert saved["rho_mass_vs_kl"] == pytest.approx(fresh["rho_mass_vs_kl"])
    assert saved["steps"]["rho_mass_vs_kl"] == pytest.approx(fresh["steps"]["rho_mass_vs_kl"])
