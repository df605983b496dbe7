"""Serving truth: play a workload against a real llama-server and compare with serve-replay.

Calibrate the host model for the server's batches (llama-cpp-python timing server-shaped
batches of several sequences, plus a one-slot llama-server run for its per-token work;
run it alone on the machine):

    .venv/bin/python bench/serving_truth.py calibrate [--llama-server PATH] [--out PROFILE]

Measure (starts a fresh llama-server per case; run it alone on the machine):

    .venv/bin/python bench/serving_truth.py measure [--cases u1-np1-prefix,u4-np2-prefix] \
        [--llama-server PATH | --cache-dir DIR [--portable]] [--results DIR]

Compare (no server: predicts every saved case and prints measured vs predicted):

    .venv/bin/python bench/serving_truth.py compare [--results DIR] [--per-request] [--json out.json]

Without --llama-server, llama-server is built once from llama-cpp-python's sdist
(pip download; vendored llama.cpp) into --cache-dir, natively like pip's build of
llama-cpp-python unless --portable. The workload file is the one serve-replay reads
(default examples/workloads/gemma-270m-llama-server.toml); cases vary its users,
llama-server slots (-np) and shared prefix. The host model that prices steps comes
from --profile (default: the committed calibration, traces/calib/cpu-host-calibrated.toml).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llamatier.errors import LlamatierError  # noqa: E402
from llamatier.serverbench import (  # noqa: E402
    DEFAULT_CASES,
    GOAL,
    Case,
    build_llama_server,
    load_measurement,
    measure_case,
    pooled,
    predict_case,
    request_table,
    summarize,
)
from llamatier.serving import load_workload  # noqa: E402

WORKLOAD = REPO / "examples" / "workloads" / "gemma-270m-llama-server.toml"
RESULTS = REPO / "bench" / "results" / "serving-truth"
PROFILE = RESULTS / "cpu-host-server.toml"


def _cases(text: str | None) -> list[Case]:
    return [Case.parse(c) for c in text.split(",")] if text else list(DEFAULT_CASES)


def _binary(a: argparse.Namespace) -> Path:
    if a.llama_server:
        return Path(a.llama_server)
    return build_llama_server(Path(a.cache_dir) if a.cache_dir else None, native=not a.portable)


def cmd_calibrate(a: argparse.Namespace) -> None:
    import dataclasses

    from llamatier.demo import demo_model_path
    from llamatier.hardware import load_profile, profile_to_toml
    from llamatier.serverbench.batchcal import (
        BatchSettings,
        fit_server_host_model,
        measure_server_overhead,
        record_batches,
        with_server_overhead,
    )

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.from_batches:  # refit recorded batches (and their server run) without timing anything
        rec = json.loads(Path(a.from_batches).read_text())
        over = rec["server_overhead"]
        binary = rec.get("llama_server", "?")
    else:
        binary = _binary(a)
        model = Path(a.model) if a.model else Path(demo_model_path())
        rec = record_batches(model, BatchSettings(n_threads=a.threads or 2), repeats=a.repeats)
        over = measure_server_overhead(binary, model, rec, log=out.with_suffix(".server.log"))
        rec["server_overhead"] = over
        rec["llama_server"] = str(binary)
    settings = BatchSettings(**rec["settings"])
    fit = fit_server_host_model(rec)
    if Path(a.from_batches or "").resolve() != out.with_suffix(".batches.json").resolve():
        out.with_suffix(".batches.json").write_text(json.dumps(rec))
    hm = with_server_overhead(fit.model, over)
    hm = dataclasses.replace(hm, traces=(str(out.with_suffix(".batches.json").name),))
    cpu = _cpu_name()
    prof = dataclasses.replace(
        load_profile(a.base).with_host_model(hm, name=out.stem),
        description=f"{cpu}: host model for llama-server's batches (tiers and links copied from {a.base})",
    )
    header = (
        f"Host profile for llama-server's batches, written by bench/serving_truth.py calibrate.\n"
        f"Tiers, links and compute rates are copied from {a.base} (another machine's measurements: only\n"
        f"host-memory copies use them here). [compute.host_model] is fitted on {cpu} from\n"
        f"{fit.model.fit_steps} server-shaped batches timed with llama-cpp-python {rec['llama_cpp_python']} "
        f"({settings.n_seq} KV streams, flash attention {settings.flash_attn}, sliding-window caches,\n"
        f"n_batch {settings.n_batch}, n_ubatch {settings.n_ubatch}, {settings.n_threads} threads): median abs error "
        f"{fit.model.fit_median_ape:.1%}, p95 {fit.model.fit_p95_ape:.1%}. 'sample' adds llama-server's own\n"
        f"work per output token, measured on {binary}.\n"
        f"System: {rec['system_info'][:200]}"
    )
    out.write_text(profile_to_toml(prof, header=header))
    err = np.abs(fit.rel_error)
    print(f"{out}: {fit.model.fit_steps} batches, |err| median {np.median(err):.1%} p95 {np.quantile(err, 0.95):.1%}; "
          f"sampler {fit.model.serial_s[fit.model.terms.index('sample')] * 1e3:.3f} ms + server {over['per_token_s'] * 1e3:.3f} ms per token; "
          f"HTTP {over['http_s'] * 1e3:.1f} ms per request")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{__import__('os').cpu_count()}"
    except OSError:
        pass
    return "this machine"


def cmd_measure(a: argparse.Namespace) -> None:
    from llamatier.demo import demo_model_path
    from llamatier.serving import build_context

    spec = load_workload(a.workload)
    binary = _binary(a)
    model = Path(a.model) if a.model else Path(demo_model_path())
    threads = a.threads or build_context(spec).traces[0].context.get("n_threads", 2)
    for case in _cases(a.cases):
        rec = measure_case(spec, case, binary=binary, model=model, out_dir=Path(a.results), n_threads=int(threads),
                           extra_args=a.server_arg, deadline_s=a.deadline_s)
        ok = sum(1 for r in rec["requests"] if r["completion"] and not r["completion"]["error"])
        print(f"{case.name}: {ok}/{len(rec['requests'])} requests in {rec['wall_s']:.1f} s", flush=True)


def _fmt(x: float, scale: float = 1.0, nd: int = 0) -> str:
    return "nan" if x != x else f"{x * scale:.{nd}f}"


def cmd_compare(a: argparse.Namespace) -> None:
    spec = load_workload(a.workload)
    files = sorted(f for f in Path(a.results).glob("*.json") if not f.name.endswith(".batches.json"))
    if a.cases:
        want = {c.name for c in _cases(a.cases)}
        files = [f for f in files if f.stem in want]
    if not files:
        raise LlamatierError(f"no measurements in {a.results}: run `bench/serving_truth.py measure` first")
    tables, out = [], {"goal": GOAL, "cases": {}}
    hdr = (f"{'case':<18} {'req':>4} {'TTFT p50 ms':>15} {'p99':>15} {'err med/p95':>12} "
           f"{'TPOT p50 ms':>13} {'p99':>13} {'err med/p95':>12} {'cache':>7} goal")
    print(hdr)
    order = {c.name: i for i, c in enumerate(DEFAULT_CASES)}
    for f in sorted(files, key=lambda f: order.get(f.stem, 99)):
        case, played, _ = load_measurement(f)
        pred = predict_case(spec, case, profile=a.profile)
        t = request_table(played, pred)
        s = summarize(t)
        tables.append(t)
        out["cases"][case.name] = {"summary": s, "requests": t.to_dicts()}
        tt, tp = s["ttft_s"], s["tpot_s"]
        print(
            f"{case.name:<18} {s['measured']:>4} "
            f"{_fmt(tt['measured_p50'], 1e3):>7}/{_fmt(tt['predicted_p50'], 1e3):<7} "
            f"{_fmt(tt['measured_p99'], 1e3):>7}/{_fmt(tt['predicted_p99'], 1e3):<7} "
            f"{_fmt(tt['median_abs_err'], 100):>5}/{_fmt(tt['p95_abs_err'], 100):<5}% "
            f"{_fmt(tp['measured_p50'], 1e3, 1):>6}/{_fmt(tp['predicted_p50'], 1e3, 1):<6} "
            f"{_fmt(tp['measured_p99'], 1e3, 1):>6}/{_fmt(tp['predicted_p99'], 1e3, 1):<6} "
            f"{_fmt(tp['median_abs_err'], 100):>5}/{_fmt(tp['p95_abs_err'], 100):<5}% "
            f"{s['cache_match']['identical']:>3}/{s['cache_match']['requests']:<3} {'yes' if s['meets_goal'] else 'no'}"
        )
        if a.per_request:
            cols = ["rid", "user", "turn", "prompt_tokens", "arrival_s", "pred_arrival_s", "ttft_s", "server_ttft_s",
                    "pred_ttft_s", "tpot_s", "pred_tpot_s", "cache_n", "pred_cache_n", "id_slot"]
            with __import__("polars").Config(tbl_rows=200, tbl_cols=20, tbl_width_chars=250, float_precision=3):
                print(t.select(cols))
    allp = pooled(tables)
    out["pooled"] = allp
    print(
        f"all cases: TTFT per-request |err| median {_fmt(allp['ttft_s']['median_abs_err'], 100, 1)}% "
        f"p95 {_fmt(allp['ttft_s']['p95_abs_err'], 100, 1)}%; TPOT median "
        f"{_fmt(allp['tpot_s']['median_abs_err'], 100, 1)}% p95 {_fmt(allp['tpot_s']['p95_abs_err'], 100, 1)}% "
        f"(goal: median <= {GOAL['median_abs_err']:.0%}, p95 <= {GOAL['p95_abs_err']:.0%}, "
        f"each run's p99 within {GOAL['p99_err']:.0%})"
    )
    if a.markdown:
        print(markdown_table(out))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1, default=float))


def markdown_table(out: dict) -> str:
    """The per-case table of docs/serving.md."""
    rows = [
        "| case | requests | TTFT p50 ms meas / pred | TTFT p99 ms meas / pred (err) | TTFT per-request abs err median / p95 "
        "| TPOT p50 ms meas / pred | TPOT p99 ms meas / pred (err) | TPOT per-request abs err median / p95 "
        "| prompt tokens reused as measured | slot as measured |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in out["cases"].items():
        s = c["summary"]
        tt, tp, cm = s["ttft_s"], s["tpot_s"], s["cache_match"]
        rows.append(
            f"| {name} | {s['measured']} | {tt['measured_p50'] * 1e3:.0f} / {tt['predicted_p50'] * 1e3:.0f} "
            f"| {tt['measured_p99'] * 1e3:.0f} / {tt['predicted_p99'] * 1e3:.0f} ({tt['p99_err']:+.1%}) "
            f"| {tt['median_abs_err']:.1%} / {tt['p95_abs_err']:.1%} "
            f"| {tp['measured_p50'] * 1e3:.1f} / {tp['predicted_p50'] * 1e3:.1f} "
            f"| {tp['measured_p99'] * 1e3:.1f} / {tp['predicted_p99'] * 1e3:.1f} ({tp['p99_err']:+.1%}) "
            f"| {tp['median_abs_err']:.1%} / {tp['p95_abs_err']:.1%} "
            f"| {cm['identical']}/{cm['requests']} | {cm['same_slot']}/{cm['requests']} |"
        )
    p = out["pooled"]
    rows.append(
        f"| all ({p['measured']} requests) | | | | {p['ttft_s']['median_abs_err']:.1%} / {p['ttft_s']['p95_abs_err']:.1%} "
        f"| | | {p['tpot_s']['median_abs_err']:.1%} / {p['tpot_s']['p95_abs_err']:.1%} "
        f"| {p['cache_match']['identical']}/{p['cache_match']['requests']} "
        f"| {p['cache_match']['same_slot']}/{p['cache_match']['requests']} |"
    )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("calibrate", "measure", "compare"):
        p = sub.add_parser(name)
        p.add_argument("--workload", default=str(WORKLOAD))
        p.add_argument("--results", default=str(RESULTS), help="folder of per-case measurement JSON files")
        p.add_argument("--cases", default=None, help="comma-separated, e.g. u1-np1-prefix,u8-np4-noprefix")
    for name in ("calibrate", "measure"):
        m = sub.choices[name]
        m.add_argument("--llama-server", default=None, help="a llama-server binary (default: build it)")
        m.add_argument("--cache-dir", default=None, help="where to download and build llama.cpp")
        m.add_argument("--portable", action="store_true", help="build with GGML_NATIVE=OFF")
        m.add_argument("--model", default=None, help="GGUF model (default: the Gemma 3 270M demo model)")
        m.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the trace's, 2)")
    k = sub.choices["calibrate"]
    k.add_argument("--out", default=str(PROFILE), help="profile TOML to write (its raw batches go next to it)")
    k.add_argument("--base", default="cpu-host", help="profile whose tiers and links the result copies")
    k.add_argument("--repeats", type=int, default=3)
    k.add_argument("--from-batches", default=None, help="refit a recorded BATCHES.json (no timing runs)")
    m = sub.choices["measure"]
    m.add_argument("--server-arg", action="append", default=[], help="extra llama-server argument (repeat)")
    m.add_argument("--deadline-s", type=float, default=240.0, help="bound on one case's run")
    c = sub.choices["compare"]
    c.add_argument("--profile", default=str(PROFILE))
    c.add_argument("--per-request", action="store_true")
    c.add_argument("--json", default=None)
    c.add_argument("--markdown", action="store_true", help="also print the table of docs/serving.md")
    a = ap.parse_args()
    try:
        {"calibrate": cmd_calibrate, "measure": cmd_measure, "compare": cmd_compare}[a.cmd](a)
    except LlamatierError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
