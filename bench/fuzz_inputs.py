"""Hostile inputs through the CLI: corrupted traces, broken profiles and workloads, two writers on one --out.

    .venv/bin/python bench/fuzz_inputs.py [--traces 120] [--profiles 60] [--workloads 60] [--writers 4]
                                          [--seed 0] [--trace DIR] [--json out.json]

Every corrupted input runs through the real CLI in this process (typer's runner):
``inspect --json`` and ``replay --json`` for traces, ``replay --profile FILE --json``
for profiles, ``serve-replay FILE --json`` for workloads. Each outcome is judged
(tests/corruption.py ``judge``): a one-line error or a result identical to the clean
input's passes; a traceback, an error over several lines, or a different result from
a corrupt input fails. Damage to a TOML file's text can make another valid file (a
flipped digit): those runs only must not fail with a traceback, and are counted apart.
Two ``trace`` and two ``sweep`` processes started together on one --out count rows lost:
rows a winner reported but did not write, or rows its output lacks.

Goal: 0 tracebacks, 0 silently accepted corrupt inputs, 0 lost rows. Without ``--trace``
the traces are a tiny generated GGUF's (about 10 s to make); cases are seeded (``--seed``).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.corruption import cli_run  # noqa: E402
from tests.fuzzcases import FAILURES, SERVE_ARGS, TRACE_OPS, Fuzzer, clean_workload, toml_ops  # noqa: E402

PROMPT = ("the model reads the cache and the tier keeps hot blocks in fast memory " * 12).strip()


def make_inputs(work: Path, trace: Path | None) -> tuple[Path, Path, dict[str, Path], Path]:
    """(model, trace, profile folders by name, workload folder): clean inputs each in its own folder."""
    from llamatier.tinymodel import write_tiny_gguf
    from llamatier.trace.tracer import TraceConfig, run_trace

    model = write_tiny_gguf(work / "tiny.gguf")
    if trace is None:
        trace = work / "trace"
        run_trace(TraceConfig(model_path=model, out_dir=trace, prompt=PROMPT, n_predict=32, n_ctx=2048, n_batch=256,
                              n_threads=2, positions=True, chunk_steps=8, seed=1))
    profiles = {}
    for name in ("a100-40g", "cpu-host"):
        d = work / f"profile-{name}"
        d.mkdir()
        (d / f"{name}.toml").write_bytes((REPO / "llamatier" / "profiles" / f"{name}.toml").read_bytes())
        profiles[name] = d
    wl = work / "workload"
    wl.mkdir()
    (wl / "w.toml").write_text(clean_workload(trace.resolve()))
    return model, trace, profiles, wl


def fuzz(kind: str, fuzzer: Fuzzer, n: int, seed: int, work: Path) -> list[dict[str, Any]]:
    """``n`` seeded cases of ``fuzzer``, its damage kinds in turn."""
    names = sorted(fuzzer.ops)
    cases = []
    for i in range(n):
        what, verdicts = fuzzer.case(names[i % len(names)], seed + i, work / "case")
        cases.append({"kind": kind, "op": names[i % len(names)], "seed": seed + i, "damage": what,
                      "verdicts": verdicts})
    return cases


def _pair(cmd: list[str]) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen(cmd, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    return [subprocess.CompletedProcess(cmd, p.wait(timeout=600), *p.communicate()) for p in procs]


def _writer_verdict(done: list[subprocess.CompletedProcess], written: int, expected: int,
                    reported: list[int]) -> dict[str, Any]:
    ok = [p for p in done if p.returncode == 0]
    failed = [p for p in done if p.returncode != 0]
    text = "".join(p.stdout + p.stderr for p in done)
    one_line = all(len([ln for ln in p.stderr.strip().splitlines() if ln.strip()]) == 1 for p in failed)
    lost = max(0, expected - written) + sum(max(0, r - written) for r in reported)
    return {"winners": len(ok), "tracebacks": text.count("Traceback"), "one_line_losers": one_line,
            "lost_rows": lost if ok else expected, "errors": [p.stderr.strip() for p in failed]}


def _one_sweep(argv: list[str], out: Path) -> Path:
    p = cli_run(*argv, "--out", str(out))
    if p.returncode != 0:
        raise SystemExit(f"the clean sweep fails: {p.stderr.strip()}")
    return out


def writers(model: Path, trace: Path, work: Path, n: int) -> list[dict[str, Any]]:
    """``n`` pairs of ``trace`` and ``n`` pairs of ``sweep`` processes started together on one --out."""
    import polars as pl

    from llamatier.trace import load_trace

    cases = []
    for i in range(n):
        out = work / f"writers-trace-{i}"
        cmd = [sys.executable, "-m", "llamatier", "trace", str(model), "--prompt", PROMPT[:200], "-n", "64",
               "--ctx", "512", "--chunk-steps", "4", "--out", str(out)]
        done = _pair(cmd)
        try:
            steps = load_trace(out).steps
            written = int((steps["phase"] == "decode").sum())
        except Exception:
            written = 0
        reported = [int(m.group(1)) for p in done if p.returncode == 0
                    for m in [re.search(r"(\d+) decode steps", p.stdout.replace("\n", " "))] if m]
        cases.append({"kind": "two-writers", "op": "trace", **_writer_verdict(done, written, 64, reported)})
    sweep = ["sweep", str(trace), "--jobs", "1", "--profiles", "a100-40g,l4", "--policies", "static,lru",
             "--steps", "4", "--kv-types", "f16,q8_0,q4_0"]
    cells = pl.read_parquet(_one_sweep(sweep, work / "sweep-alone.parquet")).height
    for i in range(n):
        out = work / f"writers-sweep-{i}.parquet"
        done = _pair([sys.executable, "-m", "llamatier", *sweep, "--out", str(out)])
        written = pl.read_parquet(out).height if out.exists() else 0
        reported = [int(m.group(1)) for p in done if p.returncode == 0
                    for m in [re.search(r"wrote (\d+) rows", p.stdout.replace("\n", " "))] if m]
        cases.append({"kind": "two-writers", "op": "sweep", **_writer_verdict(done, written, cells, reported)})
    return cases


def report(cases: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    rows: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    for c in cases:
        if c["kind"] != "two-writers":
            rows[(c["kind"], c["op"])].update(c["verdicts"])
    print(f"{'input':<10} {'damage':<20} " + " ".join(f"{v:>14}" for v in
          ("error", "identical", "accepted-valid", *FAILURES)))
    for (kind, op), cnt in sorted(rows.items()):
        print(f"{kind:<10} {op:<20} " + " ".join(f"{cnt[v]:>14}" for v in
              ("error", "identical", "accepted-valid", *FAILURES)))
    counted = [c for c in cases if c["kind"] != "two-writers"]
    tracebacks = sum(c["verdicts"].count("traceback") for c in counted)
    tracebacks += sum(c["tracebacks"] for c in cases if c["kind"] == "two-writers")
    silent = sum(1 for c in counted if "silent" in c["verdicts"])
    multi = sum(1 for c in counted if "multi-line" in c["verdicts"])
    w = [c for c in cases if c["kind"] == "two-writers"]
    bad_pairs = [c for c in w if c["winners"] != 1 or not c["one_line_losers"]]
    lost = sum(c["lost_rows"] for c in w)
    by_kind = collections.Counter(c["kind"] for c in cases)
    summary = {
        "cases": dict(by_kind), "tracebacks": tracebacks, "silently_accepted": silent, "multi_line_errors": multi,
        "lost_rows": lost, "writer_pairs_without_one_winner_and_a_one_line_loser": len(bad_pairs),
        "accepted_valid_text_damage": sum(1 for c in counted if "accepted-valid" in c["verdicts"]),
        "wall_s": round(wall_s, 1),
        "failures": [c for c in cases if c["kind"] != "two-writers" and set(c["verdicts"]) & set(FAILURES)]
        + bad_pairs + [c for c in w if c["lost_rows"]],
    }
    print(f"\n{by_kind['trace']} corrupted traces, {by_kind['profile']} broken profiles, {by_kind['workload']} broken "
          f"workloads, {len(w)} two-writer pairs in {wall_s:.0f} s")
    print(f"tracebacks {tracebacks}, silently accepted corrupt inputs {silent}, lost rows {lost} "
          f"(errors over several lines {multi}; writer pairs without one winner and a one-line loser "
          f"{len(bad_pairs)}; text damage that left a valid file, run as such {summary['accepted_valid_text_damage']})")
    for f in summary["failures"][:20]:
        print("FAIL", json.dumps(f)[:400])
    return summary


def main() -> None:
    from llamatier.hardware.loader import ProfileToml
    from llamatier.serving.workload import WorkloadToml

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", type=int, default=120)
    ap.add_argument("--profiles", type=int, default=60)
    ap.add_argument("--workloads", type=int, default=60)
    ap.add_argument("--writers", type=int, default=4, help="pairs of trace and of sweep processes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trace", type=Path, default=None, help="a trace to corrupt (default: a tiny generated one)")
    ap.add_argument("--json", dest="json_out", type=Path, default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llamatier-fuzz-") as tmp:
        work = Path(tmp)
        model, trace, profiles, wl = make_inputs(work, args.trace)
        fuzzer = Fuzzer(trace, TRACE_OPS, lambda d: [["inspect", str(d), "--json"], ["replay", str(d), "--json"]],
                        library=True)
        cases = fuzz("trace", fuzzer, args.traces, args.seed, work)
        for i, (name, d) in enumerate(profiles.items()):
            fuzzer = Fuzzer(d, toml_ops(ProfileToml), lambda d, name=name: [
                ["replay", str(trace), "--json", "--profile", str(d / f"{name}.toml")]])
            n = args.profiles // len(profiles) + (i < args.profiles % len(profiles))
            cases += fuzz("profile", fuzzer, n, args.seed + 10_000 * (i + 1), work)
        fuzzer = Fuzzer(wl, toml_ops(WorkloadToml), lambda d: [["serve-replay", str(d / "w.toml"), *SERVE_ARGS]])
        cases += fuzz("workload", fuzzer, args.workloads, args.seed + 50_000, work)
        cases += writers(model, trace, work, args.writers)
    summary = report(cases, time.perf_counter() - t0)
    if args.json_out:
        args.json_out.write_text(json.dumps({"summary": summary, "cases": cases}, indent=1, default=str))
    bad = summary["tracebacks"] + summary["silently_accepted"] + summary["lost_rows"] + summary["multi_line_errors"]
    sys.exit(1 if bad or summary["writer_pairs_without_one_winner_and_a_one_line_loser"] else 0)


if __name__ == "__main__":
    main()
