"""Is dropped attention mass a good proxy for what eviction costs? Rank correlations on measured results.

Reads every ``eviction.parquet`` (+ ``eviction_positions.parquet``) under --results
(written by ``llamatier quality MODEL --trace TRACE --evict ... --out DIR``, see
results/eviction/README.md), computes Spearman's rank correlation between the
replay's dropped mass and the KL measured in llama.cpp (all points, per text, per
policy, within each budget, per step), writes it as JSON and draws the scatter.

Run:  .venv/bin/python bench/eviction_proxy.py [--results results/eviction] \
          [--json results/eviction/proxy.json] [--plot docs/img/eviction-proxy.png]
Takes a second.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import polars as pl

from llamatier.plots import plot_proxy, save_figure
from llamatier.quality import load_eviction_rows, proxy_correlation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("results/eviction"))
    ap.add_argument("--json", type=Path, default=Path("results/eviction/proxy.json"))
    ap.add_argument("--plot", type=Path, default=Path("docs/img/eviction-proxy.png"))
    args = ap.parse_args()

    dirs = sorted(p.parent for p in args.results.glob("*/eviction.parquet"))
    if not dirs:
        raise SystemExit(f"no eviction results under {args.results}: run `llamatier quality --evict ... --out DIR` first")
    rows, steps = [], []
    for d in dirs:
        r = load_eviction_rows(d)
        rows.append(r.with_columns(pl.lit(d.name).alias("trace")))
        pos = d / "eviction_positions.parquet"
        if pos.is_file():
            steps.append(pl.read_parquet(pos).with_columns(pl.lit(d.name).alias("trace")))
    frame = pl.concat(rows, how="diagonal_relaxed")
    stats = proxy_correlation(frame, pl.concat(steps) if steps else None)
    args.json.write_text(json.dumps(stats, indent=2) + "\n")
    save_figure(plot_proxy(frame), args.plot)

    print(f"points {stats['n_points']} ({stats['n_policies']} policies x {stats['n_budgets']} budgets x "
          f"{stats['n_traces']} texts)")
    print(f"Spearman rho, dropped mass vs mean KL: {stats['rho_mass_vs_kl']:.3f}; "
          f"vs top-1 loss: {stats['rho_mass_vs_top1_loss']:.3f}")
    for k, v in stats["per_trace"].items():
        print(f"  text {k}: {v:.3f}")
    for k, v in stats["per_policy"].items():
        print(f"  policy {k}: {v:.3f}")
    for w in stats["within_budget"]:
        print(f"  {w['trace']} keep {w['keep_blocks']:>3}: rho {w['rho']:+.2f} over {w['n']} policies")
    if "steps" in stats:
        print(f"per step: rho {stats['steps']['rho_mass_vs_kl']:.3f} over {stats['steps']['n']} steps")
    print("\n| text | policy | blocks kept | kept | mass dropped | mean KL | top-1 | ΔPPL |\n|---|---|---:|---:|---:|---:|---:|---:|")
    for r in frame.sort(["trace", "policy", "keep_blocks"]).iter_rows(named=True):
        print(f"| {r['trace']} | {r['policy']} | {r['keep_blocks']} | {100 * r['kept_fraction']:.0f}% | "
              f"{r['mass_dropped_mean']:.3f} | {r['mean_kl']:.3g} | {100 * r['top1_agreement']:.1f}% | "
              f"{r['ppl_change_pct']:+.1f}% |")
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
