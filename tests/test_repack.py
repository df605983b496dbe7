"""Weight repacking on or off: the probe against real crashing children, its cached verdict, the record.

The crash these guard against (llama.cpp's AMX buffer on some Intel Xeons) cannot be
reproduced on every machine, so the probe's verdict logic runs against child processes
that really segfault (reading address 0 through ctypes). The build's extra buffer types
are fixed where a test needs a probe to run, so the logic is tested on any CPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from llamatier.engines.llamacpp import repack
from llamatier.errors import LlamatierError
from llamatier.trace import load_trace
from tests.conftest import assert_one_line_error, run_cli, run_cli_subprocess, trace_model

SEGFAULT = [sys.executable, "-c", "import ctypes; ctypes.string_at(0)"]
CLEAN_EXIT = [sys.executable, "-c", "pass"]
FAILS = [sys.executable, "-c", "import sys; sys.exit('model would not load')"]


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    """A private cache directory and no repack setting in the environment."""
    monkeypatch.setenv("LLAMATIER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(repack.ENV_VAR, raising=False)
    return tmp_path / "cache"


@pytest.fixture()
def amx_build(monkeypatch) -> tuple[str, ...]:
    """Pretend the build has the extra buffer types of a native build on an AMX Xeon."""
    bufts = ("AMX", "CPU_REPACK")
    monkeypatch.setattr(repack, "extra_buffer_types", lambda: bufts)
    return bufts


def test_probe_classifies_how_a_real_child_ends() -> None:
    crash = repack.run_probe(SEGFAULT)
    assert (crash.verdict, crash.detail) == ("crash", "SIGSEGV")
    assert repack.run_probe(CLEAN_EXIT).verdict == "ok"
    failed = repack.run_probe(FAILS)
    assert failed.verdict == "inconclusive" and failed.detail == "exit 1: model would not load"
    slow = repack.run_probe([sys.executable, "-c", "import time; time.sleep(30)"], timeout_s=0.5)
    assert slow.verdict == "inconclusive" and "timed out" in slow.detail


def test_a_crashing_probe_falls_back_with_one_notice_and_is_cached(tiny_model, cache, amx_build) -> None:
    notes: list[str] = []
    d = repack.decide_repack(tiny_model, n_threads=1, command=SEGFAULT, notify=notes.append)
    assert (d.use_extra_bufts, d.source, d.extra_buffer_types) == (False, "probe", amx_build)
    assert "crashed (SIGSEGV)" in d.reason and "AMX" in d.reason
    assert len(notes) == 1 and "\n" not in notes[0] and "without repacking" in notes[0]
    stored = json.loads((cache / repack.VERDICTS_FILE).read_text())["verdicts"][d.key]
    assert stored["verdict"] == "crash" and stored["detail"] == "SIGSEGV"
    # the verdict is reused: a probe that would now fail differently is not run
    again = repack.decide_repack(tiny_model, n_threads=1, command=FAILS, notify=notes.append)
    assert (again.use_extra_bufts, again.source, again.key) == (False, "cached probe", d.key)
    assert len(notes) == 2  # every run that falls back says so
    # another thread count is another key: probed anew
    other = repack.decide_repack(tiny_model, n_threads=2, command=CLEAN_EXIT, notify=notes.append)
    assert (other.use_extra_bufts, other.source) == (True, "probe") and other.key != d.key
    assert len(notes) == 2


def test_inconclusive_probes_are_not_cached(tiny_model, cache, amx_build) -> None:
    d = repack.decide_repack(tiny_model, n_threads=1, command=FAILS, notify=lambda m: None)
    assert d.use_extra_bufts and "inconclusive" in d.reason  # loading the model reports the real problem
    assert not (cache / repack.VERDICTS_FILE).exists()


def test_option_and_environment_force_either_way_without_a_probe(tiny_model, cache, amx_build, monkeypatch) -> None:
    marker = cache.parent / "probe-ran"
    probe = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    for value, expected in (("1", False), ("0", True), ("yes", False), ("off", True)):
        monkeypatch.setenv(repack.ENV_VAR, value)
        d = repack.decide_repack(tiny_model, n_threads=1, command=probe)
        assert (d.use_extra_bufts, d.source) == (expected, "env")
    d = repack.decide_repack(tiny_model, n_threads=1, requested=True, command=probe)  # the option wins
    assert (d.use_extra_bufts, d.source, d.reason) == (True, "option", "forced on (--repack)")
    assert not marker.exists()
    monkeypatch.setenv(repack.ENV_VAR, "maybe")
    with pytest.raises(LlamatierError, match="LLAMATIER_NO_REPACK='maybe' is not understood"):
        repack.decide_repack(tiny_model, n_threads=1, command=probe)


def test_the_real_probe_decodes_a_model(tiny_model) -> None:
    """On any machine the real probe child ends cleanly or with a crash signal, never otherwise."""
    assert isinstance(repack.extra_buffer_types(), tuple)
    result = repack.run_probe(repack.probe_command(tiny_model, n_threads=1))
    assert result.verdict in ("ok", "crash"), result.detail
    if result.verdict == "ok":
        assert result.model_buffers_mib and result.model_buffers_mib.get("CPU_Mapped", 0) > 0


def test_meta_records_the_setting_and_why(tiny_model, tmp_path) -> None:
    trace_model(tiny_model, tmp_path / "off", n_predict=2, engine_options={"repack": False})
    rec = load_trace(tmp_path / "off").meta["engine"]["repack"]
    assert rec["use_extra_bufts"] is False and rec["source"] == "option" and "--no-repack" in rec["reason"]
    assert rec["extra_buffer_types"] == list(repack.extra_buffer_types())
    assert rec["model_buffers_mib"]["CPU_Mapped"] > 0  # the weight buffers llama.cpp made
    assert repack.describe_repack(load_trace(tmp_path / "off").meta) == "off (forced off (--no-repack))"


def test_cli_falls_back_on_a_cached_crash_verdict_and_inspect_shows_it(tiny_model, cache, tmp_path) -> None:
    """A crash verdict left by a real segfaulting probe: trace falls back, says so, records it."""
    env = {"LLAMATIER_CACHE": str(cache)}
    seeded = repack.decide_repack(tiny_model, n_threads=1, command=SEGFAULT, notify=lambda m: None)
    out = tmp_path / "t"
    p = run_cli_subprocess("trace", str(tiny_model), "--prompt", "hello there", "-n", "3", "--ctx", "64", "--threads", "1",
                "--out", str(out), env=env)
    assert p.returncode == 0, p.stderr
    rec = load_trace(out).meta["engine"]["repack"]
    if not seeded.extra_buffer_types:  # a build without extra buffer types has nothing to fall back from
        assert rec["source"] == "no extra buffer types" and rec["use_extra_bufts"] is True
        return
    assert (rec["use_extra_bufts"], rec["source"]) == (False, "cached probe")
    notes = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(notes) == 1 and notes[0].startswith("note: llama.cpp crashed (SIGSEGV) in a test decode")
    shown = run_cli("inspect", str(out), env=env)
    assert "off (probe crashed)" in shown.stdout
    js = json.loads(run_cli("inspect", str(out), "--json", env=env).stdout)
    assert js["repack"] == {"use_extra_bufts": False, "recorded": True, "summary": "off (probe crashed)"}


def test_calibration_never_mixes_repacked_and_plain_runs(tiny_model, tmp_path) -> None:
    for name, flag in (("on", True), ("off", False)):
        trace_model(tiny_model, tmp_path / name, n_predict=12, engine_options={"repack": flag})
    p = run_cli("calibrate", str(tmp_path / "on"), str(tmp_path / "off"), "--out", str(tmp_path / "h.toml"))
    assert_one_line_error(p, "mix", "repacking on", "off", "calibrate each group separately")
    assert not (tmp_path / "h.toml").exists()
    from llamatier.calibrate import calibrate_profile, write_calibrated_profile
    from llamatier.validate import validate_profile

    profile, _ = calibrate_profile([str(tmp_path / "on")], terms=("step",))
    assert profile.compute.host_model.weight_repack == "on"
    written = write_calibrated_profile(profile, tmp_path / "on.toml")
    assert 'weight_repack = "on"' in written.read_text()
    with pytest.raises(LlamatierError, match="fitted on runs with llama.cpp's CPU weight repacking on, but trace"):
        validate_profile(str(written), [str(tmp_path / "off")])
