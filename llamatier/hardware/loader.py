"""Load and validate hardware profiles from TOML.

A profile file uses human units in its key names (``read_gb_s``, ``latency_us``,
``energy_pj_per_byte``, ``capacity = "40GiB"``); the loaded dataclasses hold SI
units. Every violation raises :class:`ProfileError` naming the file, the field
and the rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamatier.errors import LlamatierError, ProfileError
from llamatier.hardware.hostmodel import HostComputeModel
from llamatier.hardware.profile import COMPUTE_DEVICES, Compute, Link, Profile, Tier
from llamatier.tiers import LINK_ENDS, LINK_NAMES, TIER_NAMES
from llamatier.units import parse_size_bytes
from llamatier.userfiles import read_toml_file


@dataclass(frozen=True)
class FieldSpec:
    """How one TOML key maps to a dataclass field: kind, scale to SI, rule."""

    attr: str
    kind: str  # "size", "float", "int", "str", "str_list", "float_list", "int_list"
    scale: float = 1.0
    rule: str = ""  # "", "gt0", "ge0", "unit" (0, 1], or "choice"
    required: bool = True
    choices: tuple[str, ...] = ()


TIER_FIELDS: dict[str, FieldSpec] = {
    "capacity": FieldSpec("capacity_bytes", "size", rule="ge0"),
    "read_gb_s": FieldSpec("read_bytes_per_s", "float", 1e9, "gt0"),
    "write_gb_s": FieldSpec("write_bytes_per_s", "float", 1e9, "gt0"),
    "latency_us": FieldSpec("latency_s", "float", 1e-6, "ge0"),
    "transfer_overhead_us": FieldSpec("transfer_overhead_s", "float", 1e-6, "ge0"),
    "energy_pj_per_byte": FieldSpec("energy_j_per_byte", "float", 1e-12, "ge0"),
}

LINK_FIELDS: dict[str, FieldSpec] = {
    "kind": FieldSpec("kind", "str"),
    "gb_s": FieldSpec("bytes_per_s", "float", 1e9, "gt0"),
    "latency_us": FieldSpec("latency_s", "float", 1e-6, "ge0"),
    "transfer_overhead_us": FieldSpec("transfer_overhead_s", "float", 1e-6, "ge0"),
    "energy_pj_per_byte": FieldSpec("energy_j_per_byte", "float", 1e-12, "ge0"),
}

COMPUTE_FIELDS: dict[str, FieldSpec] = {
    "device": FieldSpec("device", "str", rule="choice", choices=COMPUTE_DEVICES),
    "matmul_tflops": FieldSpec("matmul_flops_per_s", "float", 1e12, "gt0"),
    "matmul_efficiency": FieldSpec("matmul_efficiency", "float", 1.0, "unit"),
    "step_overhead_us": FieldSpec("step_overhead_s", "float", 1e-6, "ge0"),
    "energy_pj_per_mac": FieldSpec("energy_j_per_mac", "float", 1e-12, "ge0"),
    "host_attention_gb_s": FieldSpec("host_attention_bytes_per_s", "float", 1e9, "gt0"),
    "host_roundtrip_us": FieldSpec("host_roundtrip_s", "float", 1e-6, "ge0"),
}

HOST_MODEL_FIELDS: dict[str, FieldSpec] = {
    "terms": FieldSpec("terms", "str_list"),
    "serial_s": FieldSpec("serial_s", "float_list", rule="ge0"),
    "parallel_s": FieldSpec("parallel_s", "float_list", rule="ge0"),
    "kv_pad_cells": FieldSpec("kv_pad_cells", "int", rule="gt0", required=False),
    "k_types": FieldSpec("k_types", "str_list", required=False),
    "v_types": FieldSpec("v_types", "str_list", required=False),
    "thread_counts": FieldSpec("thread_counts", "int_list", rule="gt0", required=False),
    "n_ubatch": FieldSpec("n_ubatch", "int", rule="ge0", required=False),
    "model_name": FieldSpec("model_name", "str", required=False),
    "model_weight_bytes": FieldSpec("model_weight_bytes", "int", rule="ge0", required=False),
    "fit_steps": FieldSpec("fit_steps", "int", rule="ge0", required=False),
    "fit_dropped_steps": FieldSpec("fit_dropped_steps", "int", rule="ge0", required=False),
    "fit_median_ape": FieldSpec("fit_median_ape", "float", required=False),
    "fit_p95_ape": FieldSpec("fit_p95_ape", "float", required=False),
    "traces": FieldSpec("traces", "str_list", required=False),
    "notes": FieldSpec("notes", "str", required=False),
    "weight_repack": FieldSpec("weight_repack", "str", rule="choice", choices=("on", "off"), required=False),
}

TOP_LEVEL_KEYS = ("name", "description", "tiers", "links", "compute")

_RULE_TEXT = {
    "gt0": "must be a number > 0",
    "ge0": "must be a number >= 0",
    "unit": "must be a number in (0, 1]",
}


def builtin_profile_dirs() -> list[Path]:
    """Where built-in profiles live: the repository's ``profiles/`` or a packaged copy."""
    here = Path(__file__).resolve().parent
    return [here.parent.parent / "profiles", here.parent / "profiles"]


def _builtin_paths() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in builtin_profile_dirs():
        if d.is_dir():
            for p in sorted(d.glob("*.toml")):
                found.setdefault(p.stem, p)
    return found


def list_profiles() -> list[str]:
    """Names of the built-in profiles (top-level ``profiles/*.toml``), sorted."""
    return sorted(_builtin_paths())


def resolve_profile_path(name_or_path: str | Path) -> Path:
    """A built-in name or a path to a TOML file -> the file's path (ProfileError if neither)."""
    text = str(name_or_path)
    builtins = _builtin_paths()
    if text in builtins:
        return builtins[text]
    p = Path(text).expanduser()
    if p.is_file():
        return p
    if p.exists():
        raise ProfileError(f"profile {p} is a directory: give a profile name or the path to a .toml file")
    if "/" in text or text.endswith(".toml"):
        raise ProfileError(f"profile file not found: {p} (give a built-in name: {', '.join(builtins)})")
    raise ProfileError(
        f"unknown profile {text!r}: built-in profiles are {', '.join(builtins)}; or give a path to a TOML file"
    )


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a built-in profile by name or a user's profile TOML by path, validated."""
    path = resolve_profile_path(name_or_path)
    data = read_toml_file(path, what="profile file", give="a profile name or the path to a .toml file",
                          error=ProfileError)
    return profile_from_dict(data, source=str(path))


def profile_from_dict(data: dict[str, Any], *, source: str = "<dict>") -> Profile:
    """Build a validated Profile from parsed TOML (human units), naming ``source`` in errors."""

    def err(field: str, rule: str) -> ProfileError:
        return ProfileError(f"{source}: {field}: {rule}")

    unknown = [k for k in data if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise err(unknown[0], f"unknown key; valid top-level keys are {', '.join(TOP_LEVEL_KEYS)}")
    name = data.get("name", Path(source).stem)
    description = data.get("description", "")
    for key, value in (("name", name), ("description", description)):
        if not isinstance(value, str):
            raise err(key, f"must be a string (got {type(value).__name__})")

    tiers_raw = _table(data, "tiers", err)
    tiers: dict[str, Tier] = {}
    _require_exactly(tiers_raw, "tiers", "tier", TIER_NAMES, err)
    for tname in TIER_NAMES:
        values = _section(tiers_raw[tname], f"tiers.{tname}", TIER_FIELDS, err)
        tiers[tname] = Tier(name=tname, **values)

    links_raw = _table(data, "links", err)
    links: dict[str, Link] = {}
    _require_exactly(links_raw, "links", "link", LINK_NAMES, err)
    for lname in LINK_NAMES:
        values = _section(links_raw[lname], f"links.{lname}", LINK_FIELDS, err)
        upper, lower = LINK_ENDS[lname]
        links[lname] = Link(name=lname, upper=upper, lower=lower, **values)

    compute_raw = dict(_table(data, "compute", err))
    host_model_raw = compute_raw.pop("host_model", None)
    values = _section(compute_raw, "compute", COMPUTE_FIELDS, err)
    host_model = None
    if host_model_raw is not None:
        if not isinstance(host_model_raw, dict):
            raise err("compute.host_model", "must be a table")
        hm = _section(host_model_raw, "compute.host_model", HOST_MODEL_FIELDS, err)
        hm = {k: tuple(v) if isinstance(v, list) else v for k, v in hm.items()}
        n_terms = len(hm["terms"])
        for key in ("serial_s", "parallel_s"):
            if len(hm[key]) != n_terms:
                raise err(f"compute.host_model.{key}", f"must have one value per term ({n_terms})")
        try:
            host_model = HostComputeModel(**hm)
        except LlamatierError as exc:
            raise err("compute.host_model", str(exc)) from None
    compute = Compute(**values, host_model=host_model)

    if compute.device == "host" and tiers["hbm"].capacity_bytes != 0:
        raise err("tiers.hbm.capacity", 'must be 0 when compute.device = "host" (a CPU-only host has no HBM)')
    if compute.device == "gpu" and tiers["hbm"].capacity_bytes == 0:
        raise err("tiers.hbm.capacity", 'must be > 0 when compute.device = "gpu"')
    return Profile(name=name, description=description, tiers=tiers, links=links, compute=compute, source=source)


def _require_exactly(raw: dict[str, Any], section: str, what: str, names: tuple[str, ...], err: Any) -> None:
    """Every name in ``names`` present in ``raw`` and nothing else (errors name the key and the rule)."""
    for extra in raw:
        if extra not in names:
            raise err(f"{section}.{extra}", f"unknown {what}; the {what}s are {', '.join(names)}")
    for name in names:
        if name not in raw:
            raise err(f"{section}.{name}", f"missing {what}; a profile needs all of {', '.join(names)}")


def _table(data: dict[str, Any], key: str, err: Any) -> dict[str, Any]:
    if key not in data:
        raise err(key, f"missing table [{key}]")
    value = data[key]
    if not isinstance(value, dict):
        raise err(key, "must be a table")
    return value


def _section(raw: Any, where: str, spec: dict[str, FieldSpec], err: Any) -> dict[str, Any]:
    """Check one table against its field spec and convert values to SI units."""
    if not isinstance(raw, dict):
        raise err(where, "must be a table")
    for key in raw:
        if key not in spec:
            raise err(f"{where}.{key}", f"unknown key; valid keys are {', '.join(spec)}")
    out: dict[str, Any] = {}
    for key, fs in spec.items():
        field = f"{where}.{key}"
        if key not in raw:
            if fs.required:
                raise err(field, "missing")
            continue
        out[fs.attr] = _convert(raw[key], fs, field, err)
    return out


def _number(value: Any, field: str, err: Any, *, integer: bool = False) -> float:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok:
        kind = "an integer" if integer else "a number"
        raise err(field, f"must be {kind} (got {type(value).__name__} {value!r})")
    if not math.isfinite(value):
        raise err(field, f"must be finite (got {value!r})")
    return value


def _check_rule(value: float, fs: FieldSpec, field: str, err: Any) -> None:
    bad = (
        (fs.rule == "gt0" and not value > 0)
        or (fs.rule == "ge0" and not value >= 0)
        or (fs.rule == "unit" and not 0 < value <= 1)
    )
    if bad:
        raise err(field, f"{_RULE_TEXT[fs.rule]} (got {value!r})")


def _convert(value: Any, fs: FieldSpec, field: str, err: Any) -> Any:
    if fs.kind == "size":
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise err(field, f'must be a size such as "40GiB" or a number of bytes (got {type(value).__name__})')
        if isinstance(value, int | float):
            _check_rule(value, fs, field, err)
            return int(value)
        try:
            return parse_size_bytes(value, what=field)
        except LlamatierError:
            raise err(field, f'must be a size such as "40GiB", "512MB" or a number of bytes (got {value!r})') from None
    if fs.kind == "str":
        if not isinstance(value, str):
            raise err(field, f"must be a string (got {type(value).__name__} {value!r})")
        if fs.rule == "choice" and value not in fs.choices:
            raise err(field, f"must be one of {', '.join(repr(c) for c in fs.choices)} (got {value!r})")
        return value
    if fs.kind in ("float", "int"):
        v = _number(value, field, err, integer=fs.kind == "int")
        _check_rule(v, fs, field, err)
        return int(v) if fs.kind == "int" else float(v) * fs.scale
    # lists
    if not isinstance(value, list):
        raise err(field, f"must be a list (got {type(value).__name__})")
    if fs.kind == "str_list":
        for v in value:
            if not isinstance(v, str):
                raise err(field, f"must be a list of strings (got {v!r})")
        return list(value)
    out = []
    for v in value:
        num = _number(v, field, err, integer=fs.kind == "int_list")
        _check_rule(num, fs, field, err)
        out.append(int(num) if fs.kind == "int_list" else float(num) * fs.scale)
    return out
