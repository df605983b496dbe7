"""Hardware profiles: every built-in loads, every number has a source, every rule rejects bad input."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llamatier.errors import ProfileError
from llamatier.hardware import (
    LINK_NAMES,
    TIER_NAMES,
    list_profiles,
    load_profile,
    profile_from_dict,
    profile_to_toml,
)
from llamatier.hardware.loader import builtin_profile_dirs

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

BUILTINS = ("a100-40g", "a100-80g", "h100-sxm", "l4", "t4", "cpu-host")


def _builtin_path(name: str) -> Path:
    for d in builtin_profile_dirs():
        if (d / f"{name}.toml").exists():
            return d / f"{name}.toml"
    raise AssertionError(f"built-in {name} not found")


def _dump(d: dict) -> str:
    """Minimal TOML writer for test fixtures (scalars, lists, nested tables)."""

    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v + '"'
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return repr(v)

    lines: list[str] = []

    def emit(prefix: str, table: dict) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {val(v)}" for k, v in scalars.items())
        for k, v in table.items():
            if isinstance(v, dict):
                emit(f"{prefix}.{k}" if prefix else k, v)

    emit("", d)
    return "\n".join(lines) + "\n"


def _raw(name: str = "a100-40g") -> dict:
    return tomllib.loads(_builtin_path(name).read_text())


def _write(tmp_path: Path, data: dict, fname: str = "mine.toml") -> Path:
    p = tmp_path / fname
    p.write_text(_dump(data))
    return p


def test_list_profiles_has_the_six_builtins():
    names = list_profiles()
    for name in BUILTINS:
        assert name in names


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_profile_loads_with_all_tiers_and_links(name):
    p = load_profile(name)
    assert p.name == name
    assert tuple(p.tiers) == TIER_NAMES
    assert tuple(p.links) == LINK_NAMES
    for t in p.tiers.values():
        assert t.read_bytes_per_s > 0 and t.write_bytes_per_s > 0
        assert t.latency_s >= 0 and t.transfer_overhead_s >= 0 and t.energy_j_per_byte >= 0
    for link in p.links.values():
        assert link.bytes_per_s > 0 and link.kind
    assert (link.upper, link.lower) == ("dram", "remote")
    assert 0 < p.compute.matmul_efficiency <= 1
    assert p.compute.host_model is None  # built-ins are datasheet profiles
    # capacities grow down the hierarchy (HBM may be absent on a CPU host)
    caps = [p.tier(t).capacity_bytes for t in TIER_NAMES]
    assert caps[1] < caps[2] < caps[3]
    # the fastest tier is faster than the slowest
    assert p.tier("dram").read_bytes_per_s > p.tier("ssd").read_bytes_per_s


def test_gpu_profiles_match_datasheet_headline_numbers():
    assert load_profile("a100-40g").tier("hbm").read_bytes_per_s == pytest.approx(1555e9)
    assert load_profile("a100-80g").tier("hbm").capacity_bytes == 80 * 1024**3
    assert load_profile("h100-sxm").tier("hbm").read_bytes_per_s == pytest.approx(3350e9)
    assert load_profile("l4").compute.matmul_flops_per_s == pytest.approx(121e12)
    assert load_profile("t4").link("hbm_dram").kind == "pcie3-x16"


def test_cpu_host_has_no_hbm():
    p = load_profile("cpu-host")
    assert p.compute.device == "host"
    assert p.tier("hbm").capacity_bytes == 0
    assert p.is_host_only
    assert not load_profile("a100-40g").is_host_only


@pytest.mark.parametrize("name", BUILTINS)
def test_every_number_in_a_builtin_carries_a_source_comment(name):
    in_section = False
    for line in _builtin_path(name).read_text().splitlines():
        if line.startswith("["):
            in_section = True
            continue
        if in_section and re.match(r"^\s*\w+\s*=", line) and not line.startswith("device"):
            assert "#" in line and len(line.split("#", 1)[1].strip()) > 10, f"{name}: no source for {line!r}"


@pytest.mark.parametrize("name", BUILTINS)
def test_profile_to_toml_round_trips(name, tmp_path):
    p = load_profile(name)
    out = tmp_path / "copy.toml"
    out.write_text(profile_to_toml(p, header="copy"))
    q = load_profile(str(out))
    assert q.tiers == p.tiers and q.links == p.links and q.compute == p.compute and q.name == p.name


def test_load_by_path_and_with_capacity(tmp_path):
    path = _write(tmp_path, _raw())
    p = load_profile(str(path))
    assert p.source == str(path)
    q = p.with_capacity("hbm", 2 * 1024**3)
    assert q.tier("hbm").capacity_bytes == 2 * 1024**3
    assert p.tier("hbm").capacity_bytes == 40 * 1024**3  # frozen: the original is unchanged
    with pytest.raises(ProfileError, match="unknown tier 'l3'"):
        p.with_capacity("l3", 1)
    with pytest.raises(ProfileError, match=">= 0"):
        p.with_capacity("dram", -1)
    with pytest.raises(ProfileError, match="valid links are"):
        p.link("hbm_ssd")


def test_units_are_converted_to_si():
    p = load_profile("a100-40g")
    assert p.tier("ssd").latency_s == pytest.approx(80e-6)
    assert p.tier("hbm").energy_j_per_byte == pytest.approx(31e-12)
    assert p.compute.matmul_flops_per_s == pytest.approx(312e12)
    assert p.compute.step_overhead_s == pytest.approx(200e-6)
    assert p.tier("ssd").capacity_bytes == 1_920_000_000_000


def _mutations():
    """(id, mutate(data), expected field, expected rule fragment)."""

    def drop(path):
        def f(d):
            *head, last = path
            for k in head:
                d = d[k]
            del d[last]

        return f

    def set_(path, value):
        def f(d):
            *head, last = path
            for k in head:
                d = d[k]
            d[last] = value

        return f

    return [
        ("missing-tier", drop(["tiers", "ssd"]), "tiers.ssd", "missing tier"),
        ("missing-link", drop(["links", "dram_remote"]), "links.dram_remote", "missing link"),
        ("missing-field", drop(["tiers", "dram", "latency_us"]), "tiers.dram.latency_us", "missing"),
        ("zero-bandwidth", set_(["tiers", "hbm", "read_gb_s"], 0), "tiers.hbm.read_gb_s", "> 0"),
        ("negative-bandwidth", set_(["links", "hbm_dram", "gb_s"], -25), "links.hbm_dram.gb_s", "> 0"),
        ("negative-latency", set_(["tiers", "ssd", "latency_us"], -1.0), "tiers.ssd.latency_us", ">= 0"),
        ("unknown-top-key", set_(["colour"], "red"), "colour", "unknown key"),
        ("unknown-tier-key", set_(["tiers", "dram", "speed"], 3), "tiers.dram.speed", "unknown key"),
        ("unknown-tier", set_(["tiers", "l3"], {"capacity": 1}), "tiers.l3", "unknown tier"),
        ("unknown-link", set_(["links", "hbm_ssd"], {"kind": "x"}), "links.hbm_ssd", "unknown link"),
        ("wrong-type", set_(["tiers", "dram", "read_gb_s"], "fast"), "tiers.dram.read_gb_s", "must be a number"),
        ("bool-is-not-number", set_(["compute", "matmul_tflops"], True), "compute.matmul_tflops", "must be a number"),
        ("bad-size", set_(["tiers", "dram", "capacity"], "lots"), "tiers.dram.capacity", "must be a size"),
        ("efficiency-over-1", set_(["compute", "matmul_efficiency"], 1.5), "compute.matmul_efficiency", "(0, 1]"),
        ("bad-device", set_(["compute", "device"], "tpu"), "compute.device", "must be one of"),
        ("gpu-without-hbm", set_(["tiers", "hbm", "capacity"], 0), "tiers.hbm.capacity", "must be > 0"),
        ("host-with-hbm", set_(["compute", "device"], "host"), "tiers.hbm.capacity", "must be 0"),
        ("tier-not-table", set_(["tiers", "dram"], 5), "tiers.dram", "must be a table"),
        ("link-kind-not-string", set_(["links", "dram_ssd", "kind"], 4), "links.dram_ssd.kind", "must be a string"),
        (
            "host-model-length",
            set_(["compute", "host_model"], {"terms": ["step", "token"], "serial_s": [1e-3], "parallel_s": [0.0, 0.0]}),
            "compute.host_model.serial_s",
            "one value per term",
        ),
        (
            "host-model-term",
            set_(["compute", "host_model"], {"terms": ["flops"], "serial_s": [1e-3], "parallel_s": [0.0]}),
            "compute.host_model",
            "unknown host-model term",
        ),
    ]


@pytest.mark.parametrize("case", _mutations(), ids=lambda c: c[0])
def test_invalid_profile_names_file_field_and_rule(case, tmp_path):
    _, mutate, field, rule = case
    data = _raw()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    msg = str(info.value)
    assert str(path) in msg and field in msg and rule in msg, msg
    assert "\n" not in msg


def test_profile_from_dict_accepts_valid_data():
    p = profile_from_dict(_raw("l4"), source="l4-copy")
    assert p.name == "l4" and p.source == "l4-copy"


def test_bad_toml_syntax_and_missing_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[tiers.hbm\ncapacity = 1\n")
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile(str(bad))
    with pytest.raises(ProfileError, match="profile file not found"):
        load_profile(str(tmp_path / "nope.toml"))
    with pytest.raises(ProfileError, match="unknown profile 'a100'.*a100-40g"):
        load_profile("a100")
    with pytest.raises(ProfileError, match="is a directory"):
        load_profile(str(tmp_path))


def test_nan_bandwidth_rejected(tmp_path):
    data = _raw()
    data["tiers"]["hbm"]["read_gb_s"] = math.nan
    path = _write(tmp_path, data)
    path.write_text(path.read_text().replace("read_gb_s = nan", "read_gb_s = nan"))
    with pytest.raises(ProfileError, match="tiers.hbm.read_gb_s: must be finite"):
        load_profile(str(path))


# ---- CLI ---------------------------------------------------------------------------------


def test_cli_lists_and_shows_profiles():
    from typer.testing import CliRunner

    from llamatier.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["profiles"])
    assert res.exit_code == 0, res.output
    for name in BUILTINS:
        assert name in res.stdout
    res = runner.invoke(app, ["profiles", "show", "h100-sxm"])
    assert res.exit_code == 0, res.output
    assert "3,350" in res.stdout and "pcie5" in res.stdout
    res = runner.invoke(app, ["profiles", "show", "cpu-host", "--json"])
    assert res.exit_code == 0
    import json

    d = json.loads(res.stdout)
    assert d["tiers"]["hbm"]["capacity_bytes"] == 0 and d["compute"]["device"] == "host"
    res = runner.invoke(app, ["profiles", "--json"])
    assert [p["name"] for p in json.loads(res.stdout)] == list_profiles()


@pytest.mark.parametrize("case", _mutations()[:4], ids=lambda c: c[0])
def test_cli_invalid_profile_is_one_line_error(case, tmp_path):
    from typer.testing import CliRunner

    from llamatier.cli import app

    _, mutate, field, rule = case
    data = _raw()
    mutate(data)
    path = _write(tmp_path, data)
    res = CliRunner().invoke(app, ["profiles", "show", str(path)])
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and field in res.stderr and rule in res.stderr
    assert "Traceback" not in res.output


def test_cli_subprocess_unknown_profile_exit_code(tmp_path):
    exe = Path(sys.executable).with_name("llamatier")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from llamatier.cli import main; main()"]
    proc = subprocess.run([*cmd, "profiles", "show", "a100-4g"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown profile 'a100-4g'" in proc.stderr and "a100-40g" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
