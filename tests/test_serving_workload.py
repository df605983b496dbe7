"""Workload files: every rule gets a one-line error naming the file and the field (library and CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamatier.serving import WorkloadError, load_workload

from .conftest import assert_one_line_error, run_cli

GOOD = """
[workload]
name = "t"
seed = 3
traces = ["{trace}"]
profile = "a100-40g"

[users]
count = 2

[sessions]
turns = [1, 2]
think_time_s = 0.01

[prefix]
shared_tokens = 32

[server]
slot_context_tokens = 2048
max_batch_tokens = 256

[slo]
tpot_ms = 100
"""


def write(tmp_path: Path, text: str, name: str = "w.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def good(tmp_path: Path, trace: Path) -> str:
    return GOOD.format(trace=trace)


def test_good_workload_parses(tmp_path: Path, tiny_trace_dir: Path) -> None:
    spec = load_workload(write(tmp_path, good(tmp_path, tiny_trace_dir)))
    assert spec.users == 2 and spec.turns == (1, 2) and spec.prefix_tokens == 32
    assert spec.slo_tpot_s == pytest.approx(0.1) and spec.server.max_batch_tokens == 256
    assert spec.server.n_parallel is None  # "users": one llama.cpp slot per user


def test_relative_trace_paths_resolve_against_the_file(tmp_path: Path, tiny_trace_dir: Path) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    rel = Path("..") / Path(tiny_trace_dir).relative_to(tmp_path) if tiny_trace_dir.is_relative_to(tmp_path) else None
    text = good(tmp_path, tiny_trace_dir)
    if rel is not None:
        text = text.replace(str(tiny_trace_dir), str(rel))
    spec = load_workload(write(sub, text))
    assert spec.traces[0].resolve() == tiny_trace_dir.resolve()


BAD = [
    # (edit: old -> new, field named in the error, rule words)
    ('[users]\ncount = 2', "[users]\ncount = 0", "users.count", ">= 1"),
    ('[users]\ncount = 2', "[users]\ncount = 2\narrival_rate_per_s = 1.0", "users: set", "exactly one"),
    ('[users]\ncount = 2', "[users]\narrival_rate_per_s = 1.0", "users.sessions", "missing"),
    ("turns = [1, 2]", "turns = [3, 1]", "sessions.turns", "first <= second"),
    ("turns = [1, 2]", 'turns = "many"', "sessions.turns", "integer"),
    ("think_time_s = 0.01", "think_time_s = -1", "sessions.think_time_s", ">= 0"),
    ("shared_tokens = 32", "shared_tokens = 5000", "prefix.shared_tokens", "slot_context_tokens"),
    ("max_batch_tokens = 256", "max_batch_tokens = 256\ncache_ram = \"lots\"", "server.cache_ram", "invalid"),
    ("max_batch_tokens = 256", "max_batch_tokens = 256\nprefill_cost = \"guess\"", "server.prefill_cost", "'model', 'measured'"),
    ("max_batch_tokens = 256", "max_batch_tokens = 256\nn_parallel = 0", "server.n_parallel", ">= 1"),
    ("max_batch_tokens = 256", "max_batch_tokens = 256\nbatch = 4", "server.batch", "unknown key"),
    ("tpot_ms = 100", "tpot_ms = 0", "slo.tpot_ms", "> 0"),
    ('profile = "a100-40g"', 'profile = "a100-40g"\nkv_type = "q3_k"', "workload.kv_type", "q3_k"),
    ('profile = "a100-40g"', "", "workload.profile", "missing"),
    ("[slo]", "[slos]", "slos: unknown section", "valid sections are"),
]


@pytest.mark.parametrize("old,new,field,rule", BAD)
def test_invalid_workload_names_the_field(tmp_path: Path, tiny_trace_dir: Path, old: str, new: str, field: str, rule: str) -> None:
    text = good(tmp_path, tiny_trace_dir)
    assert old in text
    p = write(tmp_path, text.replace(old, new, 1))
    with pytest.raises(WorkloadError) as ei:
        load_workload(p)
    msg = str(ei.value)
    assert "\n" not in msg
    assert str(p) in msg and field in msg and rule.lower() in msg.lower(), msg


def test_missing_trace_and_bad_toml(tmp_path: Path, tiny_trace_dir: Path) -> None:
    p = write(tmp_path, good(tmp_path, tiny_trace_dir).replace(str(tiny_trace_dir), str(tmp_path / "nope")))
    with pytest.raises(WorkloadError, match=r"workload\.traces\[0\].*not found"):
        load_workload(p)
    with pytest.raises(WorkloadError, match="not valid TOML"):
        load_workload(write(tmp_path, "[workload\n", "broken.toml"))
    with pytest.raises(WorkloadError, match="not found"):
        load_workload(tmp_path / "absent.toml")


def test_unknown_profile_and_geometry_name_the_field(tmp_path: Path, tiny_trace_dir: Path) -> None:
    from llamatier.serving import build_context

    spec = load_workload(write(tmp_path, good(tmp_path, tiny_trace_dir).replace("a100-40g", "a100-41g")))
    with pytest.raises(WorkloadError, match=r"workload\.profile.*a100-41g"):
        build_context(spec)
    text = good(tmp_path, tiny_trace_dir).replace('profile = "a100-40g"', 'profile = "a100-40g"\ngeometry = "llama9"')
    with pytest.raises(WorkloadError, match=r"workload\.geometry.*llama9"):
        build_context(load_workload(write(tmp_path, text, "g.toml")))


# -- CLI -----------------------------------------------------------------------------------------


def test_cli_invalid_workload_is_one_line(tmp_path: Path, tiny_trace_dir: Path) -> None:
    p = write(tmp_path, good(tmp_path, tiny_trace_dir).replace("count = 2", "count = -3"))
    proc = run_cli("serve-replay", str(p))
    assert proc.returncode == 2
    assert_one_line_error(proc, "users.count", str(p))
    proc = run_cli("serve-replay", str(write(tmp_path, good(tmp_path, tiny_trace_dir), "ok.toml")), "--policy", "fifo")
    assert_one_line_error(proc, "unknown serving policy", "llamacpp-server")


def test_cli_json_and_search(tmp_path: Path, tiny_trace_dir: Path) -> None:
    p = write(tmp_path, good(tmp_path, tiny_trace_dir))
    proc = run_cli("serve-replay", str(p), "--policy", "vllm-lru", "--policy", "llamacpp-server", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [r["policy"] for r in out["results"]] == ["vllm-lru", "llamacpp-server"]
    for r in out["results"]:
        assert r["completed"] == r["requests"]
        assert r["latency"]["tpot_p99_s"] > 0 and r["slo"]["meets"] in (True, False)
    proc = run_cli("serve-replay", str(p), "--policy", "session-tiering", "--slo-tpot-ms", "1000", "--max-users", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)["search"][0]
    assert found["policy"] == "session-tiering" and found["max_users"] == 2 and found["capped"]
    proc = run_cli("serve-replay", str(p), "--policy", "vllm-arc", "--users", "3")
    assert proc.returncode == 0, proc.stderr
    assert "TPOT p50 / p99 ms" in proc.stdout and "3 users" in proc.stdout
