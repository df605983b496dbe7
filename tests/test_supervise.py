"""A crash in native code is one line naming the cause and the fix, a crash log, and a kept trace.

The crash is real: ``tests/crash_cli.py`` runs the CLI with a llama.cpp engine that reads
address 0 through ctypes after 10 decode calls, inside the supervised child.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamatier.engines.llamacpp import repack
from llamatier.trace import load_trace
from tests.conftest import REPO, TINY_PROMPT, assert_one_line_error, run_cli_subprocess

CRASH_CLI = REPO / "tests" / "crash_cli.py"


def _crashing_trace(model: Path, out: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(CRASH_CLI), "trace", str(model), "--prompt", "the model reads the cache", "-n", "30",
            "--ctx", "128", "--threads", "1", "--chunk-steps", "4", "--out", str(out), *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=str(REPO),
                          env={**os.environ, "COLUMNS": "200", **env})


def test_a_segfault_is_one_line_with_cause_fix_log_and_the_kept_trace(tiny_model, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    env = {"LLAMATIER_CACHE": str(cache)}
    monkeypatch.setenv("LLAMATIER_CACHE", str(cache))
    monkeypatch.delenv(repack.ENV_VAR, raising=False)
    # an earlier probe passed on this machine (a real child that exits cleanly), so repacking is on
    ok = repack.decide_repack(tiny_model, n_threads=1, command=[sys.executable, "-c", "pass"])
    out = tmp_path / "t"
    p = _crashing_trace(tiny_model, out, env)
    assert p.returncode == 128 + signal.SIGSEGV
    err = assert_one_line_error(p, "crashed in native code (SIGSEGV)", f"the trace in {out} keeps its 8 completed",
                                "details in ")
    assert "Segmentation fault" not in p.stdout + p.stderr
    log = Path(err.rsplit("details in ", 1)[1].strip())
    text = log.read_text()
    assert "Fatal Python error: Segmentation fault" in text and "in decode" in text and "died of SIGSEGV" in text
    tr = load_trace(out)  # every completed chunk (2 of 4 steps) is kept; the step in progress is lost
    assert not tr.complete and tr.n_steps == 8 and tr.meta["error"].startswith("llama.cpp crashed")
    if not ok.extra_buffer_types:  # a build without extra buffer types: repacking cannot be the cause
        assert "no CPU weight repacking" in err
        return
    assert "with CPU weight repacking on" in err and "now loads this model without repacking" in err
    verdict = json.loads((cache / repack.VERDICTS_FILE).read_text())["verdicts"][ok.key]
    assert verdict["verdict"] == "crash" and verdict["source"] == "earlier crash"
    # the next run (the plain CLI) loads without repacking, says so, and records why
    p2 = run_cli_subprocess("trace", str(tiny_model), "--prompt", "hello", "-n", "2", "--ctx", "64", "--threads", "1",
                 "--out", str(tmp_path / "again"), env=env)
    assert p2.returncode == 0 and p2.stderr.startswith("note: llama.cpp crashed (SIGSEGV) in an earlier run")
    rec = load_trace(tmp_path / "again").meta["engine"]["repack"]
    assert (rec["use_extra_bufts"], rec["source"]) == (False, "earlier crash")


def test_a_crash_with_repacking_off_points_at_a_portable_build(tiny_model, tmp_path) -> None:
    p = _crashing_trace(tiny_model, tmp_path / "t", {"LLAMATIER_CACHE": str(tmp_path / "c"),
                                                    "LLAMATIER_TEST_CRASH_AFTER": "0"}, "--no-repack")
    assert p.returncode == 128 + signal.SIGSEGV
    off = "repacking off" if repack.extra_buffer_types() else "no CPU weight repacking"
    assert_one_line_error(p, off, "GGML_NATIVE=OFF", "keeps its 0 completed steps")


def test_without_the_supervisor_the_same_crash_is_a_bare_signal(tiny_model, tmp_path) -> None:
    """What the supervisor replaces: LLAMATIER_SUPERVISE=0 runs in one process, which just dies."""
    p = _crashing_trace(tiny_model, tmp_path / "t", {"LLAMATIER_SUPERVISE": "0", "LLAMATIER_TEST_CRASH_AFTER": "0",
                                                    "LLAMATIER_CACHE": str(tmp_path / "c")})
    assert p.returncode == -signal.SIGSEGV
    assert "Fatal Python error" not in p.stderr  # no crash log, no explanation


def test_ctrl_c_to_the_process_group_interrupts_once(tiny_model, tmp_path) -> None:
    """A terminal's Ctrl-C reaches supervisor and child together: one line, exit 130, trace interrupted."""
    out = tmp_path / "t"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamatier", "trace", str(tiny_model), "--prompt", TINY_PROMPT, "-n", "6000",
         "--ctx", "8192", "--chunk-steps", "16", "--out", str(out)],
        cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    t0 = time.time()
    while len(list(out.glob("steps-*.parquet"))) < 2:
        assert proc.poll() is None and time.time() - t0 < 120, "the trace ended before it could be interrupted"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
    assert proc.returncode == 130
    assert_one_line_error(done, "interrupted after", "incomplete")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["interrupted"] is True and meta["error"] is None and load_trace(out).n_steps == meta["n_steps"]


def test_the_supervisor_starts_without_heavy_imports() -> None:
    """The parent process only waits: it must not pay for numpy, polars or llama.cpp."""
    code = ("import sys, llamatier.supervise; "
            "print(sorted(m for m in ('numpy', 'polars', 'llama_cpp', 'rich', 'typer') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


def test_ctrl_c_during_the_model_load_stops_with_one_line(tiny_model, tmp_path) -> None:
    """SIGINT to the process group while llama.cpp loads the model (it lands in the log callback)."""
    out = tmp_path / "t"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "sigint_at_load_cli.py"), "trace", str(tiny_model), "--prompt",
         "hello world", "-n", "20", "--ctx", "128", "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=str(REPO), start_new_session=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 130, proc.stderr
    assert_one_line_error(proc, "interrupted (Ctrl-C) before the command finished")
    assert "Exception ignored" not in proc.stderr and "trace written" not in proc.stdout
    assert not out.exists()  # claimed before the load, released and removed: nothing was written


def test_ctrl_c_inside_a_python_capture_callback_stops_the_decode(tiny_model) -> None:
    """A KeyboardInterrupt raised in the Python capture callback is raised by the decode that ran it."""
    from llamatier.engines.llamacpp.capture import AttentionCapture
    from llamatier.engines.llamacpp.session import ContextSettings, LlamaContext, LlamaModel

    with LlamaModel(tiny_model, repack=False, n_threads=1) as model:
        cap = AttentionCapture(2, 256, backend="python")
        ctx = LlamaContext(model, ContextSettings(n_ctx=128, n_batch=32, n_ubatch=32, n_threads=1),
                           cb_eval=cap.callback, cb_user_data=cap.user_data)
        try:
            tokens = model.tokenize("hello world")
            ctx.decode(tokens, 0)
            cap.take(len(tokens))  # a normal step captures every layer
            get_name, calls = cap._get_name, []

            def interrupted_once(t: int) -> bytes:
                if not calls:
                    calls.append(t)
                    raise KeyboardInterrupt
                return get_name(t)

            cap._get_name = interrupted_once
            with pytest.raises(KeyboardInterrupt):
                ctx.decode([tokens[-1]], len(tokens))
            assert calls
            cap.reset()
            ctx.decode([tokens[-1]], len(tokens) + 1)  # raised once: the next step runs
        finally:
            ctx.close()


_INTERRUPT_AT_IMPORT = """
import sys
class Finder:
    def find_spec(self, name, path=None, target=None):
        if name == "polars":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Finder())
sys.argv = ["llamatier", "inspect", "no-such-trace"]
from llamatier.supervise import main
main()
"""


def test_ctrl_c_while_the_cli_imports_is_one_line() -> None:
    """A Ctrl-C in the half second of imports (numpy, polars, rich) before any command runs."""
    p = subprocess.run([sys.executable, "-c", _INTERRUPT_AT_IMPORT], capture_output=True, text=True, timeout=60,
                       cwd=str(REPO))
    assert p.returncode == 130
    assert_one_line_error(p, "interrupted (Ctrl-C) before the command finished")


@pytest.mark.parametrize("delay_s", [0.0, 0.05, 0.1, 0.2])
def test_ctrl_c_around_the_model_load_is_one_line(tiny_model, tmp_path, delay_s) -> None:
    """After the --out claim: the repack probe (fresh cache), the load, the first steps; always one line, 130."""
    out = tmp_path / "t"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamatier", "trace", str(tiny_model), "--prompt", TINY_PROMPT, "-n", "6000",
         "--ctx", "8192", "--out", str(out)],
        cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "COLUMNS": "200", "LLAMATIER_CACHE": str(tmp_path / "cache")},
    )
    t0 = time.time()
    while not (out / ".llamatier-writer.lock").exists():
        assert proc.poll() is None and time.time() - t0 < 120, "the trace ended before it could be interrupted"
        time.sleep(0.005)
    time.sleep(delay_s)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, "", err), "interrupted")
