"""Write a Profile back to TOML in the same human units the loader reads."""

from __future__ import annotations

import json
import math
from typing import Any

from llamatier.hardware.gpumodel import GPU_MODEL_KEYS, coef_to_toml
from llamatier.hardware.loader import (
    COMPUTE_FIELDS,
    GPU_MODEL_FIELDS,
    HOST_MODEL_FIELDS,
    LINK_FIELDS,
    TIER_FIELDS,
    FieldSpec,
)
from llamatier.hardware.profile import Profile
from llamatier.tiers import LINK_NAMES, TIER_NAMES


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(float(f"{value:.12g}"))
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _human(value: Any, fs: FieldSpec) -> Any:
    if fs.kind == "size":
        return int(value)
    if fs.kind == "float":
        return float(value) / fs.scale
    if fs.kind == "float_list":
        return [float(v) / fs.scale for v in value]
    return value


def _section_lines(obj: Any, spec: dict[str, FieldSpec]) -> list[str]:
    lines = []
    for key, fs in spec.items():
        value = getattr(obj, fs.attr)
        if not fs.required and (value in ((), "", None) or (isinstance(value, float) and math.isnan(value))):
            continue  # optional and unset (a NaN fit statistic means "not computed")
        lines.append(f"{key} = {_toml_value(_human(value, fs))}")
    return lines


def profile_to_toml(profile: Profile, *, header: str = "") -> str:
    """TOML text that :func:`load_profile` reads back into an equal Profile."""
    out: list[str] = []
    if header:
        out += [f"# {line}".rstrip() for line in header.splitlines()]
        out.append("")
    out.append(f"name = {_toml_value(profile.name)}")
    out.append(f"description = {_toml_value(profile.description)}")
    for tname in TIER_NAMES:
        out += ["", f"[tiers.{tname}]"] + _section_lines(profile.tiers[tname], TIER_FIELDS)
    for lname in LINK_NAMES:
        out += ["", f"[links.{lname}]"] + _section_lines(profile.links[lname], LINK_FIELDS)
    out += ["", "[compute]"] + _section_lines(profile.compute, COMPUTE_FIELDS)
    hm = profile.compute.host_model
    if hm is not None:
        out += ["", "[compute.host_model]"] + _section_lines(hm, HOST_MODEL_FIELDS)
    gm = profile.compute.gpu_model
    if gm is not None:
        out += ["", "[compute.gpu_model]"] + gpu_model_lines(gm)
    return "\n".join(out) + "\n"


def gpu_model_lines(gm: Any, comments: dict[str, str] | None = None) -> list[str]:
    """The [compute.gpu_model] lines of a fitted GPU model (``comments``: key -> trailing comment)."""
    comments = comments or {}
    lines = []
    for term, c in gm.coef.items():
        key, value = coef_to_toml(term, c)
        lines.append((key, float(f"{value:.6g}")))
    order = list(GPU_MODEL_KEYS)
    lines.sort(key=lambda kv: order.index(kv[0]))
    if gm.paths is not None:
        lines += [("cuda_graphs", gm.paths.cuda_graphs), ("quant_prefill", gm.paths.quant_prefill),
                  ("kv_pad_cells", gm.paths.kv_pad)]
    if gm.int8_ops_per_s:
        lines.append(("int8_tops", gm.int8_ops_per_s / 1e12))
    for key in ("fitted_on", "fitted_models", "unfitted", "tied", "n_rows", "fit_median_ape", "notes"):
        value = getattr(gm, GPU_MODEL_FIELDS[key].attr)
        if value not in ((), "", None) and not (isinstance(value, float) and math.isnan(value)):
            lines.append((key, list(value) if isinstance(value, tuple) else value))
    return [f"{k} = {_toml_value(v)}" + (f"  # {comments[k]}" if k in comments else "") for k, v in lines]
