"""The examples in docs/CONTRIBUTING.md and the README run as written."""

from __future__ import annotations

import contextlib
import re

import numpy as np

from llamatier.registry import ENGINES, EXECUTORS, POLICIES
from tests.conftest import REPO


def _python_blocks(path) -> list[str]:  # noqa: ANN001
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_contributing_examples_plug_in(tiny_trace) -> None:
    from llamatier.hardware import load_profile
    from llamatier.replay import replay
    from llamatier.sweep import make_cells, parse_budgets, run_cells

    blocks = _python_blocks(REPO / "docs" / "CONTRIBUTING.md")
    assert len(blocks) == 3  # a policy, an executor, an engine
    try:
        for code in blocks:
            exec(compile(code, "CONTRIBUTING.md", "exec"), {"__name__": "contributing_example"})
        r = replay(tiny_trace, load_profile("a100-40g"), "all-dram")
        reads = r.record.traffic.read_bytes.sum(axis=(0, 1))
        assert reads[1] > 0 and reads[0] == reads[2] == reads[3] == 0  # every read from DRAM
        cells = make_cells(tiny_trace.path, policies="static,all-dram", budgets=parse_budgets("50%"))
        rows = run_cells(cells, executor="threads", jobs=2)
        assert [r["policy"] for r in rows] == ["static", "all-dram"] and all(r["error"] is None for r in rows)
        assert ENGINES.get("llama.cpp-slow-host").name == "llama.cpp-slow-host"
    finally:
        POLICIES.unregister("all-dram")
        EXECUTORS.unregister("threads")
        ENGINES.unregister("llama.cpp-slow-host")


def test_readme_library_example_runs() -> None:
    (code,) = [b for b in _python_blocks(REPO / "README.md") if "replay(" in b]
    ns: dict = {}
    with contextlib.chdir(REPO):  # the example's paths are relative to the repository
        exec(compile(code, "README.md", "exec"), ns)
    assert ns["r"].summary()["latency"]["p99_s"] > 0
    assert [x.policy for x in ns["c"].results] == ["static", "lru", "adaptive", "oracle"]
    assert np.isfinite(ns["c"].results[0].costs.step_s).all()
