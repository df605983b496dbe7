"""The plug-in registry every family shares, and the tier vocabulary every module shares."""

from __future__ import annotations

import importlib.metadata
import warnings

import numpy as np
import pytest
from typer.testing import CliRunner

from llamatier.cli import app
from llamatier.errors import LlamatierDeprecationWarning, LlamatierError
from llamatier.registry import EXECUTORS, FAMILIES, POLICIES, SERVING_POLICIES, Registry
from llamatier.sweep.executors import SweepExecutor
from llamatier.tiers import (
    DOWN,
    DRAM,
    HBM,
    LINK_ENDS,
    LINK_NAMES,
    REMOTE,
    SSD,
    TIER_NAMES,
    UP,
    MoveTiming,
    link_paths,
    links_crossed,
)


class FakeEntryPoint:
    def __init__(self, name: str, obj: object) -> None:
        self.name, self.value, self._obj = name, f"somepkg:{name}", obj

    def load(self) -> object:
        if isinstance(self._obj, Exception):
            raise self._obj
        return self._obj


# -- families ---------------------------------------------------------------------------------


def test_every_family_lists_its_builtins() -> None:
    assert set(FAMILIES) == {"policies", "serving-policies", "executors", "engines"}
    assert {"static", "lru", "adaptive", "oracle"} <= set(POLICIES.names())
    assert {"llamacpp-server", "vllm-lru", "vllm-arc", "session-tiering"} <= set(SERVING_POLICIES.names())
    assert {"serial", "processes", "dask"} <= set(EXECUTORS.names())
    assert {f.entry_point_group for f in FAMILIES.values()} == {
        "llamatier.policies", "llamatier.serving_policies", "llamatier.executors", "llamatier.engines"
    }


@pytest.mark.parametrize(
    "family, typo, message",
    [
        (POLICIES, "adaptiv", "unknown policy 'adaptiv': valid policies are adaptive, adaptive-select, h2o, lru, oracle, snapkv, static, streaming"),
        (SERVING_POLICIES, "vllm-lfu", "unknown serving policy 'vllm-lfu': valid serving policies are llamacpp-server"),
        (EXECUTORS, "slurm", "unknown sweep executor 'slurm': valid sweep executors are dask, processes, serial"),
    ],
)
def test_a_typo_lists_the_valid_names(family: Registry, typo: str, message: str) -> None:
    with pytest.raises(LlamatierError, match=message):
        family.get(typo)


def test_renamed_serving_policies_keep_their_old_names_as_deprecated_aliases() -> None:
    for old, new in (("lru", "vllm-lru"), ("arc", "vllm-arc"), ("adaptive", "session-tiering")):
        with pytest.warns(LlamatierDeprecationWarning, match=f"serving policy '{old}' is deprecated.*use '{new}'"):
            assert SERVING_POLICIES.get(old) is SERVING_POLICIES.get(new)
        assert old not in SERVING_POLICIES.names() and old in SERVING_POLICIES
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SERVING_POLICIES.get("vllm-lru")  # the current name says nothing


def test_cli_prints_a_deprecated_name_as_one_note_line(tmp_path) -> None:  # noqa: ANN001
    from tests.conftest import COMMITTED_GEMMA_TRACE

    wl = tmp_path / "w.toml"
    wl.write_text(
        f'[workload]\nname = "w"\ntraces = ["{COMMITTED_GEMMA_TRACE}"]\nprofile = "a100-40g"\n'
        "[users]\ncount = 1\n[sessions]\nturns = 1\n"
    )
    res = CliRunner().invoke(app, ["serve-replay", str(wl), "--policy", "lru", "--json"])
    assert res.exit_code == 0, res.output
    notes = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert notes == ["note: serving policy 'lru' is deprecated and will be removed: use 'vllm-lru'"]
    assert '"policy": "vllm-lru"' in res.stdout


def test_a_class_of_the_wrong_kind_or_without_a_name_is_refused() -> None:
    with pytest.raises(LlamatierError, match="not a SweepExecutor subclass"):
        EXECUTORS.register(dict)

    class Nameless(SweepExecutor):
        def run(self, fn, items):  # noqa: ANN001, ANN201
            return iter(())

    with pytest.raises(LlamatierError, match="sweep executor class Nameless has no name"):
        EXECUTORS.register(Nameless)


@pytest.mark.parametrize("family", list(FAMILIES.values()), ids=lambda f: f.entry_point_group)
def test_plugins_load_from_each_family_entry_point_group(family: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    base = family.base_class()
    if base is not None:
        plugged = type("Plugged", (base,), {"name": "plugged-test"})
    else:
        plugged = type("Plugged", (), {"name": "plugged-test"})

    def fake_entry_points(group: str) -> list[FakeEntryPoint]:
        assert group == family.entry_point_group
        return [FakeEntryPoint("plugged-test", plugged)]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    monkeypatch.setattr(family, "_plugins_loaded", False)
    try:
        assert "plugged-test" in family.names() and family.get("PLUGGED-TEST") is plugged
        assert "plugged-test" in family.help_names()
    finally:
        family.unregister("plugged-test")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [FakeEntryPoint("broken", ImportError("no"))])
    monkeypatch.setattr(family, "_plugins_loaded", False)
    with pytest.raises(LlamatierError, match=f"{family.kind} plug-in 'broken'.*failed to load"):
        family.names()
    monkeypatch.setattr(family, "_plugins_loaded", False)
    assert "broken" not in family.help_names()  # help never fails on a broken plug-in


def test_a_registered_executor_runs_a_sweep(tiny_trace_dir) -> None:  # noqa: ANN001
    from llamatier.sweep import make_cells, parse_budgets, run_cells

    class Reversed(SweepExecutor):
        name = "reversed-test"

        def run(self, fn, items):  # noqa: ANN001, ANN201
            for i in reversed(range(len(items))):
                yield i, fn(items[i])

    EXECUTORS.register(Reversed)
    try:
        cells = make_cells(tiny_trace_dir, policies="static,lru", budgets=parse_budgets("50%"))
        rows = run_cells(cells, executor="reversed-test")
        assert [r["cell"] for r in rows] == [0, 1] and [r["policy"] for r in rows] == ["static", "lru"]
        assert all(r["error"] is None and r["p99_s"] > 0 for r in rows)
    finally:
        EXECUTORS.unregister("reversed-test")


# -- tiers ------------------------------------------------------------------------------------


def test_tier_and_link_vocabulary() -> None:
    assert [int(t) for t in (HBM, DRAM, SSD, REMOTE)] == [0, 1, 2, 3]
    assert [t.label for t in (HBM, DRAM, SSD, REMOTE)] == list(TIER_NAMES)
    assert LINK_NAMES == ("hbm_dram", "dram_ssd", "dram_remote")
    assert [MoveTiming.parse(n) for n in ("demand", "Prefetch", "free")] == list(MoveTiming)
    assert MoveTiming.parse(1) is MoveTiming.PREFETCH
    with pytest.raises(ValueError):
        MoveTiming.parse("later")


def test_link_paths_follow_the_profile_link_ends() -> None:
    """SSD and remote reach HBM only through DRAM; a move crosses each link on its way once."""
    link = {n: i for i, n in enumerate(LINK_NAMES)}
    assert links_crossed(HBM, HBM) == ()
    assert links_crossed(SSD, HBM) == ((link["dram_ssd"], UP), (link["hbm_dram"], UP))
    assert links_crossed(HBM, REMOTE) == ((link["hbm_dram"], DOWN), (link["dram_remote"], DOWN))
    assert links_crossed(SSD, REMOTE) == ((link["dram_ssd"], UP), (link["dram_remote"], DOWN))
    paths = link_paths()
    for name, (upper, lower) in LINK_ENDS.items():
        a, b = TIER_NAMES.index(upper), TIER_NAMES.index(lower)
        assert paths[a, b].sum() == 1 and paths[a, b, link[name], DOWN] == 1
        assert paths[b, a].sum() == 1 and paths[b, a, link[name], UP] == 1
    np.testing.assert_array_equal(paths, paths.transpose(1, 0, 2, 3)[:, :, :, ::-1])  # reverse = same links, other way


def test_a_lazy_member_is_imported_on_first_lookup() -> None:
    import sys

    reg: Registry = Registry("thing", entry_point_group="llamatier.test_things")
    sys.modules.pop("json.tool", None)
    reg.register_lazy("tool", "json.tool:main")
    assert reg.names() == ["tool"] and "tool" in reg and "json.tool" not in sys.modules
    assert reg.get("TOOL") is sys.modules["json.tool"].main
