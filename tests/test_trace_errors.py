"""Bad input gets one line and a non-zero exit; interrupted traces keep their chunks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamatier.errors import TraceFormatError
from llamatier.trace import load_trace
from tests.conftest import REPO, assert_one_line_error, run_cli


def test_missing_model(tmp_path: Path) -> None:
    p = run_cli("trace", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "t"))
    assert_one_line_error(p, "not found", "nope.gguf")


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "weights.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    p = run_cli("trace", str(bad), "--out", str(tmp_path / "t"))
    assert_one_line_error(p, "not a GGUF")


def test_truncated_gguf(tiny_model: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_model.read_bytes()[:3000])
    p = run_cli("trace", str(cut), "--prompt", "hello", "-n", "2", "--ctx", "64", "--out", str(tmp_path / "t"))
    assert_one_line_error(p, "cut.gguf")


def test_prompt_longer_than_context(tiny_model: Path, tmp_path: Path) -> None:
    p = run_cli("trace", str(tiny_model), "--prompt", "the model " * 200, "--ctx", "128", "-n", "4",
                "--out", str(tmp_path / "t"))
    assert_one_line_error(p, "--ctx", "prompt")
    assert not (tmp_path / "t" / "meta.json").exists()


def test_quantized_v_explains_flash_attention(tiny_model: Path, tmp_path: Path) -> None:
    p = run_cli("trace", str(tiny_model), "--type-v", "q8_0", "--out", str(tmp_path / "t"))
    err = assert_one_line_error(p, "flash attention", "--type-v f16", "replay --kv-type")
    assert "q8_0" in err


def test_unknown_type_lists_valid(tiny_model: Path, tmp_path: Path) -> None:
    p = run_cli("trace", str(tiny_model), "--type-k", "q3_zz", "--out", str(tmp_path / "t"))
    assert_one_line_error(p, "q3_zz", "f16", "q8_0", "q4_0", "iq4_nl")


def test_missing_prompt_file(tiny_model: Path, tmp_path: Path) -> None:
    p = run_cli("trace", str(tiny_model), "--prompt-file", str(tmp_path / "none.txt"), "--out", str(tmp_path / "t"))
    assert_one_line_error(p, "prompt file not found")


def test_refuses_to_overwrite_a_trace(tiny_trace_dir: Path, tiny_model: Path) -> None:
    before = sorted(f.name for f in tiny_trace_dir.iterdir())
    p = run_cli("trace", str(tiny_model), "--prompt", "hello", "-n", "2", "--ctx", "64", "--out", str(tiny_trace_dir))
    assert_one_line_error(p, "not empty", "--force")
    assert sorted(f.name for f in tiny_trace_dir.iterdir()) == before


@pytest.mark.parametrize("damage", ["no_meta", "foreign_meta", "bad_json", "missing_attn", "future_version", "not_dir"])
def test_damaged_or_foreign_trace_directories(tiny_trace_dir: Path, tmp_path: Path, damage: str) -> None:
    import shutil

    d = tmp_path / "tr"
    shutil.copytree(tiny_trace_dir, d)
    meta = d / "meta.json"
    if damage == "no_meta":
        meta.unlink()
    elif damage == "foreign_meta":
        meta.write_text(json.dumps({"format": "something-else", "version": 1}))
    elif damage == "bad_json":
        meta.write_text(meta.read_text()[:50])
    elif damage == "missing_attn":
        (d / "attn-00001.parquet").unlink()
    elif damage == "future_version":
        m = json.loads(meta.read_text())
        m["version"] = 99
        meta.write_text(json.dumps(m))
    elif damage == "not_dir":
        shutil.rmtree(d)
        d.write_text("not a trace")
    with pytest.raises(TraceFormatError):
        load_trace(d)
    p = run_cli("inspect", str(d))
    assert_one_line_error(p, str(d.name))


def test_truncated_parquet_chunk(tiny_trace_dir: Path, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "tr"
    shutil.copytree(tiny_trace_dir, d)
    chunk = d / "steps-00001.parquet"
    chunk.write_bytes(chunk.read_bytes()[:40])
    p = run_cli("inspect", str(d))
    assert_one_line_error(p, "corrupt", "steps-00001")


def _start_long_trace(model: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "llamatier", "trace", str(model), "--prompt", "the model reads", "-n", "6000",
         "--ctx", "8192", "--chunk-steps", "16", "--out", str(out)],
        cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "120"},
    )


def _wait_for_chunks(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while len(list(out.glob("steps-*.parquet"))) < n:
        assert proc.poll() is None, "the trace finished before it could be interrupted"
        assert time.time() - t0 < timeout
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_trace_loads_incomplete_with_completed_chunks(tiny_model: Path, tmp_path: Path, sig) -> None:
    out = tmp_path / "killed"
    proc = _start_long_trace(tiny_model, out)
    _wait_for_chunks(out, 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    chunks = len(list(out.glob("steps-*.parquet")))
    tr = load_trace(out)
    assert not tr.complete
    assert chunks >= 3 and tr.n_steps >= 16 * (chunks - 1)
    assert tr.n_steps % 16 == 0 or sig == signal.SIGINT  # SIGKILL keeps whole chunks only
    meta = json.loads((out / "meta.json").read_text())
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and meta["interrupted"] is True
        assert "incomplete" in err.decode() and "Traceback" not in err.decode()
        assert tr.n_steps == meta["n_steps"]  # the buffered partial chunk was flushed too
    import numpy as np

    np.testing.assert_allclose(tr.mass.sum(axis=2), 1.0, atol=1e-4)
    p = run_cli("inspect", str(out))
    assert p.returncode == 0 and "INCOMPLETE" in p.stdout


def test_force_into_a_new_directory_and_over_an_old_trace(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "sub"
    p = run_cli("trace", str(tiny_model), "--prompt", "hello", "-n", "2", "--ctx", "64", "--force", "--out", str(out))
    assert p.returncode == 0, p.stderr
    keep = out / "notes.txt"
    keep.write_text("mine")
    p = run_cli("trace", str(tiny_model), "--prompt", "hello again", "-n", "3", "--ctx", "64", "--force", "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert keep.read_text() == "mine"  # --force replaces the trace, nothing else
    assert load_trace(out).steps["phase"].to_list().count("decode") == 3
