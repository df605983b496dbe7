"""Timeline export: valid Chrome/Perfetto trace-event JSON whose numbers add up to the replay's."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest

from llamatier.errors import LlamatierError
from llamatier.hardware import load_profile
from llamatier.replay import ReplayOptions, compare, replay
from llamatier.tiers import LINK_NAMES, TIER_NAMES
from llamatier.timeline import TID_STEPS, timeline_events, write_timeline

POLICIES = ["static", "lru", "adaptive", "oracle"]
PHASES = {"X", "C", "M", "i"}


def check_trace_events(data: dict) -> dict[tuple[int, int], list[dict]]:
    """Trace-event format rules Perfetto's JSON importer relies on; returns X events per track."""
    assert isinstance(data["traceEvents"], list) and data["traceEvents"]
    named_threads, named_procs = set(), set()
    tracks: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for e in data["traceEvents"]:
        assert e["ph"] in PHASES, e
        assert isinstance(e["name"], str) and isinstance(e["pid"], int)
        if e["ph"] == "M":
            assert e["name"] in {"process_name", "process_sort_index", "thread_name", "thread_sort_index"}
            if e["name"] == "thread_name":
                named_threads.add((e["pid"], e["tid"]))
            if e["name"] == "process_name":
                named_procs.add(e["pid"])
            continue
        assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0
        if e["ph"] == "C":
            assert e["args"] and all(isinstance(v, (int, float)) for v in e["args"].values())
        if e["ph"] == "X":
            assert isinstance(e["dur"], (int, float)) and e["dur"] >= 0
            tracks[(e["pid"], e["tid"])].append(e)
        if e["ph"] == "i":
            assert e["s"] in ("t", "p", "g")
    for key, events in tracks.items():
        assert key in named_threads, f"track {key} has no thread_name"
        assert key[0] in named_procs
        ts = [e["ts"] for e in events]
        assert ts == sorted(ts), f"timestamps go back on track {key}"
        open_ends: list[float] = []
        for e in events:  # slices on one track nest or follow each other, never half-overlap
            start, end = e["ts"], e["ts"] + e["dur"]
            while open_ends and open_ends[-1] <= start + 1e-6:
                open_ends.pop()
            assert not open_ends or end <= open_ends[-1] + 1e-6, f"half-overlapping slices on {key}: {e}"
            open_ends.append(end)
    return tracks


@pytest.fixture(scope="module")
def tight_comparison(tiny_trace):
    """HBM well below the tiny trace's KV, so reads come from DRAM and policies migrate."""
    return compare(tiny_trace, load_profile("a100-40g"), POLICIES, ReplayOptions(hbm_budget_bytes=40_000))


def test_timeline_is_valid_trace_event_json(tight_comparison, tmp_path):
    path = write_timeline(tight_comparison, tmp_path / "t.json")
    data = json.loads(path.read_text())
    tracks = check_trace_events(data)
    assert data["displayTimeUnit"] == "ms"
    assert data["otherData"]["policies"] == POLICIES
    pids = {pid for pid, _ in tracks}
    assert pids == {1, 2, 3, 4}
    names = {e["pid"]: e["args"]["name"] for e in data["traceEvents"] if e["name"] == "process_name"}
    assert names[1].startswith("static · a100-40g") and names[4].startswith("oracle (bound)")


def test_timeline_numbers_add_up_to_the_replay(tight_comparison):
    data = timeline_events(tight_comparison)
    tracks = check_trace_events(data)
    ev = data["traceEvents"]
    for pid, r in enumerate(tight_comparison.results, start=1):
        steps = [e for e in tracks[(pid, TID_STEPS)] if e["cat"] == "step"]
        assert len(steps) == r.n_steps
        dur_us = np.array([e["dur"] for e in steps])
        np.testing.assert_allclose(dur_us, r.costs.step_s * 1e6, rtol=1e-6, atol=2e-3)
        assert steps[0]["ts"] == 0.0
        for a, b in zip(steps, steps[1:], strict=False):  # steps run back to back
            assert b["ts"] == pytest.approx(a["ts"] + a["dur"], abs=2e-3)
        for t, tier in enumerate(TIER_NAMES):
            got = sum(e["args"]["bytes"] for e in ev if e.get("pid") == pid and e["name"] == f"read {tier}")
            assert got == pytest.approx(float(r.record.traffic.read_bytes[:, :, t].sum()), rel=1e-12)
        for li, link in enumerate(LINK_NAMES):
            for di, d in enumerate(("up", "down")):
                got = sum(e["args"]["bytes"] for e in ev if e.get("pid") == pid and e["name"] == f"{link} {d}")
                assert got == pytest.approx(float(r.costs.link_bytes[:, li, di].sum()), rel=1e-12, abs=1e-9)
        occ = [e["args"] for e in ev if e.get("pid") == pid and e["name"] == "KV held (bytes)"]
        np.testing.assert_allclose([[o[t] for t in TIER_NAMES] for o in occ], r.record.occupancy_bytes)
        moved = sum(
            sum(e["args"]["blocks"].values()) for e in ev if e.get("pid") == pid and e.get("cat") == "migration"
        )
        assert moved == pytest.approx(float(r.record.traffic.move_count.sum()))
    # the tight budget made this a real test: something was read below HBM and something migrated
    assert any(e["name"] == "read dram" for e in ev)
    assert any(e.get("cat") == "migration" for e in ev)


def test_timeline_of_a_placement_that_does_not_run(tiny_trace):
    r = replay(tiny_trace, load_profile("a100-40g"), "static",
               ReplayOptions(hbm_budget_bytes=1024, dram_budget_bytes=1024))
    data = timeline_events(r)
    check_trace_events(data)
    (inst,) = [e for e in data["traceEvents"] if e["ph"] == "i"]
    assert inst["name"].startswith("does not run")


def test_timeline_path_errors(tight_comparison, tmp_path):
    with pytest.raises(LlamatierError, match="does not exist"):
        write_timeline(tight_comparison, tmp_path / "missing" / "t.json")
    with pytest.raises(LlamatierError, match="is a directory"):
        write_timeline(tight_comparison, tmp_path)
    with pytest.raises(LlamatierError, match="nothing to export"):
        timeline_events([])


def test_cli_replay_timeline(tiny_trace_dir, tmp_path):
    from tests.conftest import assert_one_line_error, run_cli

    out = tmp_path / "run.json"
    proc = run_cli("replay", str(tiny_trace_dir), "--policy", "adaptive", "--hbm-budget", "40kB", "--json",
                   "--timeline", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    data = json.loads(out.read_text())
    check_trace_events(data)
    steps = [e for e in data["traceEvents"] if e.get("cat") == "step"]
    assert len(steps) == summary["latency"]["decode_steps"] + sum(1 for e in steps if e["name"] != "decode")
    assert sum(e["dur"] for e in steps) == pytest.approx(summary["latency"]["total_s"] * 1e6, rel=1e-6)
    assert_one_line_error(
        run_cli("replay", str(tiny_trace_dir), "--timeline", str(tmp_path / "no" / "t.json")), "does not exist"
    )
