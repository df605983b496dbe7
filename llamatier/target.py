"""Target models for what-if replays: named KV geometry presets (data) or a GGUF header.

A replay costs the trace's attention pattern with some model's KV geometry and
compute size. By default that model is the traced one; ``--geometry NAME`` or
``--geometry MODEL.gguf`` swaps in another (a "what-if", labelled as such).
Presets live in ``llamatier/data/geometries.toml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from llamatier.errors import LlamatierError
from llamatier.model import KVGeometry, ModelInfo, read_model_info

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport has the same API
    import tomli as tomllib

PRESETS_FILE = Path(__file__).parent / "data" / "geometries.toml"

_REQUIRED = ("label", "n_layers", "n_head", "n_head_kv", "head_dim", "n_params", "weight_bytes", "source")
_OPTIONAL = ("head_dim_v", "sliding_window", "sliding_window_pattern")


@dataclass(frozen=True)
class TargetModel:
    """The model a replay costs: KV geometry plus what sets compute time."""

    label: str
    geometry: KVGeometry
    n_head: int  # query heads (attention flops)
    n_params: int  # multiply-accumulates per token ~= parameters
    weight_bytes: int  # bytes streamed from memory per decode step
    source: str  # "trace", a preset name, or a GGUF path
    what_if: bool  # True when this is not the traced model

    def kv_bytes_per_token(self, type_k: Any, type_v: Any) -> int:
        return self.geometry.bytes_per_token(type_k, type_v)


def target_from_model_info(info: ModelInfo, *, source: str = "trace", what_if: bool = False) -> TargetModel:
    """The target model a GGUF header (or a trace's recorded header) describes."""
    return TargetModel(
        label=info.name,
        geometry=info.geometry,
        n_head=int(info.n_head),
        n_params=int(info.n_params),
        weight_bytes=int(info.weight_bytes),
        source=source,
        what_if=what_if,
    )


@lru_cache(maxsize=1)
def _load_presets() -> dict[str, dict[str, Any]]:
    with PRESETS_FILE.open("rb") as fh:
        data = tomllib.load(fh)
    for name, entry in data.items():
        missing = [k for k in _REQUIRED if k not in entry]
        unknown = [k for k in entry if k not in _REQUIRED + _OPTIONAL]
        if missing or unknown:
            raise LlamatierError(
                f"{PRESETS_FILE}: preset [{name}] has missing keys {missing} or unknown keys {unknown}"
            )
    return data


def list_geometry_presets() -> list[str]:
    """Names of the built-in geometry presets."""
    return sorted(_load_presets())


def geometry_preset(name: str) -> TargetModel:
    """A built-in preset by name; the error lists the valid names."""
    presets = _load_presets()
    key = str(name).strip().lower()
    if key not in presets:
        raise LlamatierError(
            f"unknown geometry preset {name!r}: valid presets are {', '.join(sorted(presets))}, "
            "or give the path to a .gguf file"
        )
    e = presets[key]
    n = int(e["n_layers"])
    window = int(e.get("sliding_window", 0))
    pattern = int(e.get("sliding_window_pattern", 0))
    swa = tuple(window > 0 and (pattern == 0 or il % pattern < pattern - 1) for il in range(n))
    geometry = KVGeometry.uniform(
        n,
        int(e["n_head_kv"]),
        int(e["head_dim"]),
        head_dim_v=int(e.get("head_dim_v", e["head_dim"])),
        sliding_window=window,
        swa_layers=swa,
        label=str(e["label"]),
    )
    return TargetModel(
        label=str(e["label"]),
        geometry=geometry,
        n_head=int(e["n_head"]),
        n_params=int(e["n_params"]),
        weight_bytes=int(e["weight_bytes"]),
        source=key,
        what_if=True,
    )


def resolve_geometry(name_or_path: str) -> TargetModel:
    """``--geometry`` argument: a preset name, or a path to a GGUF whose header gives the geometry."""
    text = str(name_or_path).strip()
    if not text:
        raise LlamatierError(
            f"--geometry is empty: give a preset name ({', '.join(sorted(_load_presets()))}) or a .gguf path"
        )
    if text.lower() in _load_presets():
        return geometry_preset(text)
    p = Path(text)
    if p.suffix.lower() == ".gguf" or p.exists():
        return target_from_model_info(read_model_info(p), source=str(p), what_if=True)
    return geometry_preset(text)  # raises, listing the presets


def map_layers(source: KVGeometry, target: KVGeometry) -> np.ndarray:
    """For each target layer, the traced layer whose attention pattern it replays (int64 [n_target]).

    Layers map within their kind: target global layers take the trace's global
    layers, target sliding-window layers the trace's windowed ones (falling back
    to all trace layers when the trace has none of that kind), spread in depth
    order: the j-th of n target layers of a kind takes source index
    ``floor(j * m / n)`` of the m source layers of that kind.
    """
    src_swa = np.asarray(source.swa_layers, dtype=bool)
    out = np.empty(target.n_layers, dtype=np.int64)
    all_src = np.arange(source.n_layers)
    for kind in (False, True):
        tgt_idx = [i for i in range(target.n_layers) if target.swa_layers[i] == kind]
        if not tgt_idx:
            continue
        src_idx = all_src[src_swa == kind]
        if src_idx.size == 0:
            src_idx = all_src
        n, m = len(tgt_idx), src_idx.size
        for j, i in enumerate(tgt_idx):
            out[i] = src_idx[(j * m) // n]
    return out
