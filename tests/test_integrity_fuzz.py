"""Hypothesis fuzzers: a corrupted trace, profile or workload gives a one-line error or the clean result.

Each example copies a clean input, breaks it one way (tests/corruption.py and
tests/corruption_toml.py: flipped bytes, truncation, swapped, emptied or removed
chunks, fields of the wrong type or out of range, re-typed columns, resealed edits
that break a value rule ...) and runs the real CLI in process on it: ``inspect`` and
``replay`` (plus ``load_trace`` with positions) for traces, ``replay --profile`` for
profiles, ``serve-replay`` for workloads. A traceback, an error over several lines, or
a run that accepts the damage with another result fails the test (tests/fuzzcases.py).
Hypothesis draws the same examples on every run (derandomized: a suite that fails
only some of the time helps nobody); bench/fuzz_inputs.py --seed N explores further,
hundreds of cases a run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamatier.hardware.loader import ProfileToml
from llamatier.serving.workload import WorkloadToml
from tests.conftest import REPO
from tests.fuzzcases import FAILURES, SERVE_ARGS, TRACE_OPS, Fuzzer, clean_workload, toml_ops

SEEDS = st.integers(0, 2**32 - 1)


def fuzz_settings(n: int):  # noqa: ANN201
    return settings(max_examples=n, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _check(fuzzer: Fuzzer, op: str, seed: int, work: Path) -> None:
    what, verdicts = fuzzer.case(op, seed, work)
    assert not set(verdicts) & set(FAILURES), f"{op} (seed {seed}): {what}: {verdicts}"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def trace_fuzzer(tiny_trace_dir: Path) -> Fuzzer:
    return Fuzzer(tiny_trace_dir, TRACE_OPS,
                  lambda d: [["inspect", str(d), "--json"], ["replay", str(d), "--json"]], library=True)


@pytest.fixture(scope="module", params=["a100-40g", "cpu-host"])
def profile_fuzzer(request: pytest.FixtureRequest, tiny_trace_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Fuzzer:
    name = request.param
    d = tmp_path_factory.mktemp(f"profile-{name}")
    (d / f"{name}.toml").write_bytes((REPO / "llamatier" / "profiles" / f"{name}.toml").read_bytes())
    return Fuzzer(d, toml_ops(ProfileToml),
                  lambda f: [["replay", str(tiny_trace_dir), "--json", "--profile", str(f / f"{name}.toml")]])


@pytest.fixture(scope="module")
def workload_fuzzer(tiny_trace_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Fuzzer:
    d = tmp_path_factory.mktemp("workload")
    (d / "w.toml").write_text(clean_workload(tiny_trace_dir.resolve()))
    return Fuzzer(d, toml_ops(WorkloadToml), lambda f: [["serve-replay", str(f / "w.toml"), *SERVE_ARGS]])


@fuzz_settings(120)
@given(op=st.sampled_from(sorted(TRACE_OPS)), seed=SEEDS)
def test_a_corrupted_trace_is_one_line_or_the_clean_result(trace_fuzzer, work, op, seed):
    _check(trace_fuzzer, op, seed, work / "trace")


@fuzz_settings(30)
@given(op=st.sampled_from(sorted(toml_ops(ProfileToml))), seed=SEEDS)
def test_a_broken_profile_is_one_line_or_the_clean_result(profile_fuzzer, work, op, seed):
    _check(profile_fuzzer, op, seed, work / "profile")


@fuzz_settings(50)
@given(op=st.sampled_from(sorted(toml_ops(WorkloadToml))), seed=SEEDS)
def test_a_broken_workload_is_one_line_or_the_clean_result(workload_fuzzer, work, op, seed):
    _check(workload_fuzzer, op, seed, work / "workload")


def test_every_kind_of_damage_is_fuzzed():
    """The trace fuzzer covers bytes, fields, dtypes and chunks, raw and resealed."""
    assert {"raw:flip-byte", "raw:meta-field", "raw:dtype", "raw:swap-chunks", "raw:empty-chunk", "raw:delete-file",
            "sealed:meta-field", "sealed:dtype", "sealed:value", "sealed:chunks", "sealed:rows",
            "sealed:drop-chunk-record"} <= set(TRACE_OPS)
    assert {"text:flip-byte", "field:field", "field:delete-required", "field:unknown-key"} <= set(toml_ops(ProfileToml))
