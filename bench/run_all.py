"""Regenerate every performance figure the README quotes, and print one table.

Runs, each in its own process with ``--json FILE``:

- bench/bench_tracer.py    tracer overhead (decode tok/s traced / untraced)
- bench/bench_replay.py    replay speed vs libcachesim's LRU
- bench/bench_fidelity.py  host-model prediction error on held-out traces

A bench that is missing or fails is reported as such in the table (never
silently left out), and the exit code is non-zero. ``--update-readme``
writes the table, the machine and the date into bench/README.md.

    python bench/run_all.py [--quick] [--only tracer,fidelity] [--update-readme]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
README = BENCH / "README.md"
BEGIN, END = "<!-- run_all:begin -->", "<!-- run_all:end -->"

# name -> (script, args, quick args)
BENCHES: dict[str, tuple[str, list[str], list[str]]] = {
    "tracer": ("bench_tracer.py", [], ["--n-predict", "64"]),
    "replay": ("bench_replay.py", [], ["--quick"]),
    "fidelity": ("bench_fidelity.py", [], []),
}


def _pct(v: Any) -> str:
    return f"{v:.2%}" if isinstance(v, int | float) else str(v)


def rows_tracer(r: dict) -> list[tuple[str, str, str]]:
    def pick(*keys: str) -> Any:
        return next((r[k] for k in keys if k in r), float("nan"))

    return [
        ("tracer: llama_decode tok/s traced / untraced",
         f"{pick('ratio_llama_decode', 'median_ratio_llama_decode'):.3f}", r.get("goal", ">= 0.95")),
        ("tracer: whole decode loop traced / untraced",
         f"{pick('ratio_decode_loop', 'median_ratio_decode_loop'):.3f}", r.get("goal", ">= 0.95")),
        ("tracer: untraced decode tok/s", f"{pick('untraced_tok_s', 'untraced_tok_s_median'):.1f}", ""),
    ]


def rows_fidelity(r: dict) -> list[tuple[str, str, str]]:
    d, p = r["heldout"]["decode"], r["heldout"]["prefill"]
    out = [
        (f"fidelity: held-out decode error, median ({d['n_steps']} steps, {r['heldout_traces']} traces)",
         _pct(d["median_ape"]), "<= 3%"),
        ("fidelity: held-out decode error, p95", _pct(d["p95_ape"]), "<= 10%"),
        (f"fidelity: held-out prefill error, median ({p['n_steps']} steps)", _pct(p["median_ape"]), ""),
        ("fidelity: held-out prefill error, p95", _pct(p["p95_ape"]), ""),
        (f"fidelity: fit residual decode median ({r['fit_steps']} steps kept, {r['fit_dropped_steps']} dropped)",
         _pct(r["fit_residuals"]["decode"]["median_ape"]), ""),
    ]
    rep = r.get("repeatability") or {}
    if rep:
        out.append((f"fidelity: identical runs, spread of median decode time ({rep['runs']} runs, max/min - 1)",
                    _pct(rep["spread_max_over_min"]), ""))
        out.append(("fidelity: identical runs, std / mean of median decode time", _pct(rep["cv"]), ""))
    ov = r.get("capture_overhead") or {}
    if ov:
        out.append(("fidelity: capture-on / capture-off decode time (same run config)",
                    f"{ov['capture_on_over_off_decode_time']:.3f}", ""))
    return out


def rows_generic(name: str, r: dict) -> list[tuple[str, str, str]]:
    """Top-level scalar figures of a bench whose JSON layout this script does not know."""
    if isinstance(r.get("figures"), list):
        return [(str(f.get("name")) if str(f.get("name")).startswith(f"{name}:") else f"{name}: {f.get('name')}",
                 f"{f.get('value')} {f.get('unit', '')}".strip(), str(f.get("goal", "")))
                for f in r["figures"]]
    skip = {"bench", "date", "model", "goal"}
    return [(f"{name}: {k}", f"{v:.4g}" if isinstance(v, float) else str(v), str(r.get("goal", "")))
            for k, v in r.items() if k not in skip and isinstance(v, int | float | str | bool)]


def run_bench(name: str, quick: bool, timeout_s: float) -> tuple[list[tuple[str, str, str]], str]:
    script, args, quick_args = BENCHES[name]
    path = BENCH / script
    if not path.exists():
        return [(f"{name}: not run", "-", "")], f"missing: bench/{script}"
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "result.json"
        cmd = [sys.executable, str(path), *(quick_args if quick else args), "--json", str(out)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=str(ROOT))
        except subprocess.TimeoutExpired:
            return [(f"{name}: not run", "-", "")], f"timed out after {timeout_s:.0f} s"
        took = time.perf_counter() - t0
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return [(f"{name}: failed", "-", "")], f"exit {proc.returncode}: {tail[0][:200]}"
        result = json.loads(out.read_text())
    maker = {"tracer": rows_tracer, "fidelity": rows_fidelity}.get(name)
    try:
        rows = maker(result) if maker else rows_generic(name, result)
    except KeyError:
        rows = rows_generic(name, result)
    return rows, f"ok in {took:.0f} s"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(open("/proc/meminfo").readline().split()[1])
        mem = f", {kb / 1024**2:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs{mem}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def render(rows: list[tuple[str, str, str]], status: dict[str, str], when: str, where: str) -> str:
    lines = [f"Measured {when} on: {where}.", "", "| figure | value | goal |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", "Bench status: " + "; ".join(f"{k}: {v}" for k, v in status.items()) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller runs (for a smoke test)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(BENCHES)}")
    ap.add_argument("--timeout-s", type=float, default=1800)
    ap.add_argument("--update-readme", action="store_true", help="write the table into bench/README.md")
    a = ap.parse_args(argv)
    names = [n for n in (a.only.split(",") if a.only else BENCHES) if n]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"error: unknown bench {unknown[0]!r}: choose from {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    rows: list[tuple[str, str, str]] = []
    status: dict[str, str] = {}
    for n in names:
        print(f"running {n} ...", file=sys.stderr, flush=True)
        r, st = run_bench(n, a.quick, a.timeout_s)
        rows += r
        status[n] = st
    when = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    text = render(rows, status, when, machine())
    print(text)
    if a.update_readme:
        old = README.read_text() if README.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
        if BEGIN not in old:
            old += f"\n{BEGIN}\n{END}\n"
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1] if END in rest else ""
        README.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    return 0 if all(v.startswith("ok") for v in status.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
