"""Bad input to every command: one line on stderr naming the problem and the fix, a non-zero exit, no traceback.

Most cases run in-process through typer's CliRunner (real exit codes, stderr kept
apart from stdout, an escaped exception turned into a traceback the checks see);
the console entry point, Ctrl-C and interrupted traces run as real subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import (
    COMMITTED_GEMMA_TRACE,
    REPO,
    TINY_PROMPT,
    assert_one_line_error,
    run_cli,
    run_cli_subprocess,
)

NOT_GGUF = b"this is not a model\n"


# -- broken trace directories --------------------------------------------------------------------


def _edit_meta(d: Path, **changes: object) -> None:
    meta = json.loads((d / "meta.json").read_text())
    meta.update(changes)
    (d / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def bad_traces(tiny_trace_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder per way a trace directory can be broken, each a damaged copy of a real trace."""
    root = tmp_path_factory.mktemp("bad-traces")

    def copy(name: str) -> Path:
        return Path(shutil.copytree(tiny_trace_dir, root / name))

    (root / "a-file").write_text("not a trace\n")
    (root / "empty").mkdir()
    (copy("truncated") / "attn-00002.parquet").unlink()
    d = copy("corrupt-chunk")
    (d / "steps-00001.parquet").write_bytes((d / "steps-00001.parquet").read_bytes()[:100])
    d = copy("chunk-is-a-folder")
    (d / "steps-00001.parquet").unlink()
    (d / "steps-00001.parquet").mkdir()
    (root / "foreign").mkdir()
    (root / "foreign" / "meta.json").write_text('{"hello": 1}')
    _edit_meta(copy("version-99"), version=99)
    (copy("bad-json") / "meta.json").write_text("{")
    _edit_meta(copy("bad-block-tokens"), block_tokens="x")
    d = copy("unknown-kv-type")
    meta = json.loads((d / "meta.json").read_text())
    meta["context"]["type_k"] = "zz"
    (d / "meta.json").write_text(json.dumps(meta))
    return root


TRACE_PROBLEMS = [
    ("missing", "trace not found"),
    ("a-file", "not a trace directory"),
    ("empty", "meta.json is missing"),
    ("truncated", "truncated"),
    ("corrupt-chunk", "corrupt trace chunk"),
    ("chunk-is-a-folder", "is a directory"),
    ("foreign", "not a llamatier trace"),
    ("version-99", "v99"),
    ("bad-json", "not valid JSON"),
    ("bad-block-tokens", "block_tokens"),
    ("unknown-kv-type", "'zz'"),
]


@pytest.mark.parametrize("command", ["inspect", "replay", "compare", "sweep"])
@pytest.mark.parametrize(("name", "needle"), TRACE_PROBLEMS, ids=[n for n, _ in TRACE_PROBLEMS])
def test_broken_trace_directories(bad_traces, tmp_path, command, name, needle):
    extra = ["--out", str(tmp_path / "s.parquet"), "--jobs", "1"] if command == "sweep" else []
    assert_one_line_error(run_cli(command, str(bad_traces / name), *extra), needle)


def test_the_console_entry_point_gives_one_line_too(bad_traces):
    """The real `python -m llamatier` process: exit code and stderr as a shell sees them."""
    err = assert_one_line_error(run_cli_subprocess("replay", str(bad_traces / "truncated")), "truncated", "re-record")
    assert err.startswith("error:")


# -- replay / compare / sweep options --------------------------------------------------------------

REPLAY_PROBLEMS = [
    (["--profile", "nope"], ["unknown profile 'nope'", "a100-40g"]),
    (["--profile", "/no/such/profile.toml"], ["profile file not found"]),
    (["--hbm-budget", "2XB"], ["unknown unit 'XB'", "GiB"]),
    (["--hbm-budget", "-5GiB"], ["invalid --hbm-budget '-5GiB'"]),
    (["--hbm-budget", "1e400GiB"], ["too large"]),
    (["--dram-budget", "lots"], ["invalid --dram-budget"]),
    (["--kv-type", "foo"], ["unknown KV type 'foo'", "q8_0"]),
    (["--kv-type", "q8_0/"], ["unknown KV type ''"]),
    (["--kv-type", "a/b/c"], ["invalid KV type pair 'a/b/c'", "K/V"]),
    (["--geometry", "nope"], ["unknown geometry preset 'nope'", "llama3-8b"]),
    (["--mode", "sparse"], ["--block-budget"]),
    (["--mode", "foo"], ["unknown mode 'foo'"]),
    (["--block-tokens", "24"], ["multiple of the trace's recorded block size 16"]),
    (["--block-tokens", "0"], [">= 1"]),
    (["--static-mode", "foo"], ["nkvo or layers"]),
    (["--dram-reads", "foo"], ["host, fetch or auto"]),
    (["--quality", "/no/such/quality.json"], ["--quality file not found"]),
]


@pytest.mark.parametrize("command", ["replay", "compare"])
@pytest.mark.parametrize(("args", "needles"), REPLAY_PROBLEMS, ids=[" ".join(a) for a, _ in REPLAY_PROBLEMS])
def test_replay_and_compare_options(tiny_trace_dir, command, args, needles):
    assert_one_line_error(run_cli(command, str(tiny_trace_dir), *args), *needles)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a plain file, a file that claims to be GGUF, and an empty folder."""
    d = tmp_path_factory.mktemp("files")
    (d / "a-file.txt").write_text("hello\n")
    (d / "not-a-model.gguf").write_bytes(NOT_GGUF)
    (d / "folder").mkdir()
    return d


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--geometry", "{d}/not-a-model.gguf"], ["not a GGUF file"]),
        (["--geometry", "{d}/missing.gguf"], ["model file not found"]),
        (["--plot", "{d}/missing-folder/p.png"], ["does not exist", "create it first"]),
        (["--plot", "{d}/p.jpg"], [".png or .svg"]),
        (["--plot", "{d}/folder"], ["is a directory"]),
        (["--plot", "{d}/a-file.txt/p.png"], ["is a file, not a folder"]),
        (["--timeline", "{d}/missing-folder/t.json"], ["does not exist"]),
        (["--timeline", "{d}/a-file.txt/t.json"], ["is a file, not a folder"]),
        (["--timeline", "{d}/folder"], ["is a directory"]),
        (["--profile", "{d}/a-file.txt"], ["not valid TOML"]),
        (["--quality", "{d}/a-file.txt"], ["not a llamatier quality result"]),
    ],
)
def test_replay_paths(tiny_trace_dir, files, args, needles):
    args = [a.format(d=files) for a in args]
    assert_one_line_error(run_cli("replay", str(tiny_trace_dir), *args), *needles)


@pytest.mark.parametrize(
    ("command", "args", "needles"),
    [
        ("replay", ["--policy", "foo"], ["unknown policy 'foo'", "static"]),
        ("compare", ["--policies", "static,foo"], ["unknown policy 'foo'", "static"]),
        ("compare", ["--policies", " , "], ["--policies is empty"]),
    ],
)
def test_unknown_or_no_policy(tiny_trace_dir, command, args, needles):
    assert_one_line_error(run_cli(command, str(tiny_trace_dir), *args), *needles)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--policies", ","], ["no policies given"]),
        (["--policies", "static,foo"], ["unknown policy 'foo'"]),
        (["--kv-types", ","], ["no KV types given"]),
        (["--kv-types", "q8_0/"], ["unknown KV type ''"]),
        (["--profiles", "nope"], ["unknown profile 'nope'"]),
        (["--hbm-budget", "2XB"], ["unknown unit 'XB'"]),
        (["--hbm-budget", "inf%"], ["finite percentage"]),
        (["--hbm-budget", "5%..1%"], ["low..high"]),
        (["--geometry", "{d}/not-a-model.gguf"], ["not a GGUF file"]),
        (["--mode", "sparse"], ["--block-budget"]),
        (["--block-tokens", "24"], ["multiple of the trace's recorded block size 16"]),
        (["--jobs", "0"], ["--jobs must be >= 1"]),
        (["--steps", "0"], ["--steps must be >= 1"]),
        (["--out", "{d}/folder"], ["is a directory"]),
        (["--out", "{d}/missing-folder/s.parquet"], ["does not exist"]),
        (["--out", "{d}/a-file.txt/s.parquet"], ["is a file, not a folder"]),
        (["--out", "{d}/a-file.txt"], ["not a llamatier sweep result", "new file name"]),
        (["--plot", "{d}/p.gif"], [".png or .svg"]),
    ],
)
def test_sweep_options_fail_before_any_cell_runs(tiny_trace_dir, files, tmp_path, args, needles):
    args = [a.format(d=files) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "s.parquet")]
    proc = run_cli("sweep", str(tiny_trace_dir), "--jobs", "1", *out, *args)
    err = assert_one_line_error(proc, *needles)
    assert "no sweep cell could be replayed" not in err  # caught up front, not per cell
    assert (files / "a-file.txt").read_text() == "hello\n"  # an existing non-sweep file is never overwritten
    assert not list(tmp_path.iterdir()) and not list((files / "folder").iterdir())


# -- trace, quality, demo, usage ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["{m}", "--out", "{d}/a-file.txt"], ["is a file", "directory"]),
        (["{m}", "--out", "{d}/a-file.txt/sub/trace"], ["is a file, not a folder"]),
        (["{m}", "--threads", "0"], ["--threads must be >= 1"]),
        (["{m}", "--type-k", "foo"], ["unknown KV type 'foo'"]),
        (["{m}", "--type-v", "q8_0"], ["flash attention", "--type-v f16"]),
        (["{m}", "--capture", "gpu"], ["unknown --capture"]),
        (["{m}", "--prompt-file", "{d}/folder"], ["is a directory"]),
        (["{d}/not-a-model.gguf"], ["not a GGUF file"]),
        (["{d}/missing.gguf"], ["model file not found"]),
        (["{m}", "--ctx", "abc"], ["'--ctx'", "integer", "llamatier trace --help"]),
        (["{m}", "--chunk-steps", "0"], ["--chunk-steps must be >= 1"]),
        (["{m}", "--temp", "nan"], ["--temp must be a finite number"]),
        (["{m}", "--temp", "-1"], ["--temp must be a finite number"]),
    ],
)
def test_trace_options(tiny_model, files, tmp_path, args, needles):
    args = [a.format(m=tiny_model, d=files) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "t")]
    prompt = [] if "--prompt-file" in args else ["--prompt", "hello"]
    assert_one_line_error(run_cli("trace", *args, *prompt, "-n", "2", *out), *needles)
    assert not (tmp_path / "t").exists()


def test_trace_into_a_non_empty_folder_keeps_what_is_there(tiny_model, tiny_trace_dir):
    before = sorted(p.name for p in tiny_trace_dir.iterdir())
    assert_one_line_error(run_cli("trace", str(tiny_model), "--prompt", "hi", "--out", str(tiny_trace_dir)), "--force")
    assert sorted(p.name for p in tiny_trace_dir.iterdir()) == before


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--out", "{d}/a-file.txt/q"], ["cannot create --out directory", "Not a directory"]),
        (["--out", "{d}/a-file.txt"], ["is a file"]),
        (["--threads", "0"], ["threads must be at least 1"]),
        (["--text-file", "{d}/folder"], ["is a directory"]),
        (["--text-file", "{d}/missing.txt"], ["text file not found"]),
        (["--kv-types", "a/b/c"], ["invalid KV type pair"]),
        (["--kv-types", ","], ["no KV types given"]),
        (["--kv-types", "f16/q8_0", "--no-flash-attn"], ["needs flash attention"]),
    ],
)
def test_quality_options(tiny_model_hd32, files, args, needles):
    args = [a.format(d=files) for a in args]
    assert_one_line_error(run_cli("quality", str(tiny_model_hd32), *args), *needles)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--hbm-budget", "10%,20%"], ["gives 2 budgets", "one"]),
        (["--hbm-budget", "2XB"], ["unknown unit 'XB'"]),
        (["--profile", "nope"], ["unknown profile 'nope'"]),
        (["--geometry", "nope"], ["unknown geometry preset 'nope'"]),
        (["--out", "{d}/a-file.txt"], ["not an empty directory"]),
        (["--threads", "0"], ["--threads must be >= 1"]),
    ],
)
def test_demo_options_fail_before_tracing(files, args, needles):
    args = [a.format(d=files) for a in args]
    t0 = time.perf_counter()
    assert_one_line_error(run_cli("demo", "-n", "1", *args), *needles)
    assert time.perf_counter() - t0 < 30, "the demo traced Gemma before checking its options"


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["replya"], ["No such command 'replya'", "replay", "llamatier --help"]),
        (["replay"], ["Missing argument", "llamatier replay --help"]),
        (["replay", "x", "--polcy", "lru"], ["No such option: --polcy", "--policy"]),
        (["replay", "x", "--policy"], ["requires an argument", "llamatier replay --help"]),
        (["sweep", "x", "--jobs", "two"], ["'--jobs'", "integer"]),
        (["inspect", "x", "--json=yes"], ["does not take a value"]),
    ],
)
def test_usage_errors_are_one_line(args, needles):
    assert_one_line_error(run_cli(*args), *needles)


# -- incomplete traces replay, and say so ------------------------------------------------------------


def trace_model_with_progress(model: Path, out: Path, progress, **kw):  # noqa: ANN001, ANN201
    """Like conftest's trace_model, with a progress callback (which stops the run by raising)."""
    from llamatier.trace.tracer import TraceConfig, run_trace

    cfg = dict(prompt=TINY_PROMPT, n_predict=32, n_ctx=2048, n_batch=256, n_threads=2, chunk_steps=8, seed=1)
    cfg.update(kw)
    return run_trace(TraceConfig(model_path=model, out_dir=out, **cfg), progress)


@pytest.fixture(scope="module")
def interrupted_traces(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from llamatier.trace.tracer import TraceInterrupted

    root = tmp_path_factory.mktemp("interrupted")
    traces = {}
    for name, after, kw in (("decoding", 10, {}), ("prefill", 3, {"n_batch": 32})):
        seen: list[str] = []

        def progress(phase: str, done: int, total: int, seen=seen, after=after) -> None:
            seen.append(phase)
            if len(seen) == after:
                raise KeyboardInterrupt

        with pytest.raises(TraceInterrupted):
            trace_model_with_progress(tiny_model, root / name, progress, **kw)
        traces[name] = root / name
    return traces


def test_interrupted_trace_replays_with_an_honest_note(interrupted_traces, tmp_path):
    d = interrupted_traces["decoding"]
    meta = json.loads((d / "meta.json").read_text())
    assert meta["complete"] is False and meta["interrupted"] is True and meta["n_steps"] == 10
    for command in ("replay", "compare"):
        proc = run_cli(command, str(d), "--json")
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        notes = doc["notes"] if command == "replay" else doc["policies"][0]["notes"]
        (note,) = [n for n in notes if "incomplete" in n]
        planned = meta["context"]["n_prompt_tokens"] + meta["context"]["n_predict"]
        assert "interrupted" in note and "10 steps" in note and f"of {planned} planned tokens" in note
    out = tmp_path / "s.parquet"
    proc = run_cli("sweep", str(d), "--jobs", "1", "--hbm-budget", "50%", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "note: trace is incomplete (interrupted)" in proc.stdout.replace("\n", " ")
    rows = pl.read_parquet(out)
    assert rows["error"].null_count() == rows.height and rows["p99_s"].null_count() == 0
    assert rows["notes"].str.contains("incomplete").all()


def test_trace_interrupted_in_prefill_says_it_has_no_decode_step(interrupted_traces):
    d = interrupted_traces["prefill"]
    proc = run_cli("replay", str(d))
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "it holds no decode step" in text and "decode time: no decode steps" in text
    assert "()" not in run_cli("compare", str(d)).stdout
    inspect = " ".join(run_cli("inspect", str(d)).stdout.split())
    assert "over 96 of " in inspect and "no decode steps" in inspect


# -- Ctrl-C during a sweep keeps the finished cells -------------------------------------------------


def test_sweep_interrupted_in_process_writes_finished_rows(tiny_trace_dir, tmp_path, monkeypatch):
    import llamatier.sweep.runner as runner

    real_run_cell, calls = runner.run_cell, []

    def run_cell(cell):  # noqa: ANN001, ANN202
        calls.append(cell)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_run_cell(cell)

    monkeypatch.setattr(runner, "run_cell", run_cell)
    out = tmp_path / "s.parquet"
    proc = run_cli("sweep", str(tiny_trace_dir), "--jobs", "1", "--hbm-budget", "25%,50%", "--out", str(out))
    assert proc.returncode == 130
    assert_one_line_error(proc, "interrupted after 3 of 8 cells", "run the sweep again")
    rows = pl.read_parquet(out)
    assert rows["cell"].to_list() == [0, 1, 2] and rows["p99_s"].null_count() == 0


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc to see the sweep's workers start")
def test_ctrl_c_during_a_parallel_sweep(tmp_path):
    """SIGINT to the whole process group, as a terminal sends it: workers stop, finished rows are kept."""
    out = tmp_path / "s.parquet"
    args = [sys.executable, "-m", "llamatier", "sweep", str(COMMITTED_GEMMA_TRACE), "--jobs", "2", "--steps", "40",
            "--geometry", "llama3-8b", "--profiles", "a100-40g,l4,t4", "--kv-types", "f16,q8_0", "--out", str(out)]
    proc = subprocess.Popen(args, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.time()
    while not _children(proc.pid) and proc.poll() is None and time.time() - t0 < 60:
        time.sleep(0.05)  # the worker pool exists once the cells start running
    time.sleep(1.0)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    done = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
    assert proc.returncode == 130
    err = assert_one_line_error(done, "sweep interrupted after", "of 960 cells")
    if out.exists():
        n = pl.read_parquet(out).height
        assert 0 < n < 960 and f"the {n} finished rows are in {out}" in err
    else:
        assert "no cell had finished" in err


def test_ctrl_c_elsewhere_is_one_line_with_exit_130(tiny_model_hd32, monkeypatch):
    import llamatier.quality as quality

    def interrupted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(quality, "measure_quality", interrupted)
    proc = run_cli("quality", str(tiny_model_hd32), "-k", "f16")
    assert proc.returncode == 130
    assert_one_line_error(proc, "interrupted", "run it again")


CALIB = REPO / "traces" / "calib"
CALIB_PROBLEMS = [
    (["validate", "--profile", str(CALIB / "cpu-host-calibrated.toml"), "{tiny}"], ["fitted on", "calibrate"]),
    (["validate", "--profile", str(CALIB / "cpu-host-calibrated.toml"), str(CALIB / "heldout-00"),
      "--skip-warmup", "1000"], ["--skip-warmup 1000", "no step"]),
    (["validate", "--profile", str(CALIB / "cpu-host-calibrated.toml"), str(CALIB / "heldout-00"),
      "--skip-warmup", "-5"], ["--skip-warmup", ">= 0"]),
    (["calibrate", str(CALIB / "fit-00"), str(CALIB / "fit-01"), "--out", "{file}/x.toml"], ["is a file"]),
    (["calibrate", str(CALIB / "fit-00"), "--out", "{tmp}/x.toml", "--outlier-sigmas", "-1"], ["--outlier-sigmas"]),
    (["calibrate", str(CALIB / "fit-00"), "--out", "{tmp}/x.toml", "--warmup-steps", "-1"], ["--warmup-steps"]),
]


@pytest.mark.parametrize(("args", "needles"), CALIB_PROBLEMS, ids=[a[0] + " " + a[-1] for a, _ in CALIB_PROBLEMS])
def test_calibrate_and_validate_bad_input(tiny_trace_dir, tmp_path, args, needles):
    f = tmp_path / "afile"
    f.write_text("x")
    subst = {"{tiny}": str(tiny_trace_dir), "{file}": str(f), "{tmp}": str(tmp_path)}
    real = []
    for a in args:
        for k, v in subst.items():
            a = a.replace(k, v)
        real.append(a)
    assert_one_line_error(run_cli(*real), *needles)
    assert not (tmp_path / "x.toml").exists()


def test_sweep_never_replaces_an_earlier_result_without_force(tiny_trace_dir, tmp_path):
    out = tmp_path / "s.parquet"
    first = run_cli("sweep", str(tiny_trace_dir), "--jobs", "1", "--policies", "static", "--hbm-budget", "50%",
                "--out", str(out))
    assert first.returncode == 0, first.stderr
    before = out.read_bytes()
    again = run_cli("sweep", str(tiny_trace_dir), "--jobs", "1", "--policies", "lru", "--hbm-budget", "50%",
                "--out", str(out))
    assert_one_line_error(again, "already holds a sweep result", "--force")
    assert out.read_bytes() == before
    forced = run_cli("sweep", str(tiny_trace_dir), "--jobs", "1", "--policies", "lru", "--hbm-budget", "50%",
                 "--out", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert pl.read_parquet(out)["policy"].to_list() == ["lru"]
