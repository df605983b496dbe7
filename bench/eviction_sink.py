"""Does keeping the first block (the attention sink) change what a policy's eviction costs? Measured in llama.cpp.

On Gemma 3 270M, adaptive-select at 4 blocks on gemma3-270m-1k and snapkv at 4 blocks on
gemma3-270m-mixed drop the first block at most scored steps, although it holds 29-56% of
the attention of each of the three global layers: the 15 sliding-window layers never see
it, so the layer-mean mass the policies score by (and the replay reports as dropped) puts
it at 5-7%. This script measures each policy as it is and with the first block always
kept ("POLICY+sink", registered here as plug-ins), and prints the first block's mass per
layer.

Run:  .venv/bin/python bench/eviction_sink.py [--trace traces/gemma3-270m-1k] \
          [--policies adaptive-select,snapkv] [--keep 4] [--steps 128] [--threads 1]
Takes about 2.5 minutes per trace (two policies) on one thread; results/eviction/sink.md holds a run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from llamatier.demo import demo_model_path
from llamatier.policies import get_policy, register_policy
from llamatier.policies.eviction import AdaptiveSelectPolicy, EvictionPolicy
from llamatier.quality import measure_eviction, plan_eviction
from llamatier.trace import load_trace


def with_sink(name: str) -> str:
    """Register ``name+sink``: the policy ``name`` that never drops block 0; returns the new name."""
    base = get_policy(name)
    new = f"{name}+sink"
    if issubclass(base, AdaptiveSelectPolicy):

        def _select(self, view, p):  # noqa: ANN001, ANN202
            saved = self.score[0]
            self.score[0] = np.inf  # the selection ranks the first layer's row of scores: block 0 first
            try:
                return base._select(self, view, p)
            finally:
                self.score[0] = saved

        attrs = {"_select": _select}
    elif issubclass(base, EvictionPolicy):

        def score(self, view):  # noqa: ANN001, ANN202
            s = base.score(self, view)
            s[0] = np.inf
            return s

        attrs = {"score": score}
    else:
        raise SystemExit(f"{name} is not an eviction policy")
    register_policy(type(f"{base.__name__}Sink", (base,), {"name": new, **attrs}), replace=True)
    return new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, action="append")
    ap.add_argument("--policies", default="adaptive-select,snapkv")
    ap.add_argument("--keep", type=int, default=4)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    traces = args.trace or [Path("traces/gemma3-270m-1k"), Path("traces/gemma3-270m-mixed")]
    names = [p.strip() for p in args.policies.split(",") if p.strip()]
    pols = [q for p in names for q in (p, with_sink(p))]

    print("| text | policy | blocks kept | block 0 kept (steps) | mass dropped | mean KL | top-1 | ΔPPL |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for t in traces:
        tr = load_trace(t)
        m = tr.mass[tr.is_decode][: args.steps, :, 0].mean(axis=0)
        sink_mass = ", ".join(f"L{i} {v:.2f}" for i, v in enumerate(m) if v > 0)
        res = measure_eviction(demo_model_path(), tr, pols, [args.keep], steps=args.steps, n_threads=args.threads)
        for r in res.rows:
            kept0 = plan_eviction(tr, r.policy, args.keep).kept[: args.steps, 0].mean()
            print(f"| {t.name} | {r.policy} | {r.keep_blocks} | {100 * kept0:.0f}% | {r.mass_dropped_mean:.3f} | "
                  f"{r.mean_kl:.3f} ± {r.mean_kl_stderr:.3f} | {100 * r.top1_agreement:.1f}% | "
                  f"{r.ppl_change_pct:+.1f}% |")
        print(f"<!-- {t.name}: block 0's decode attention mass by layer (others 0): {sink_mass} -->")


if __name__ == "__main__":
    main()
