"""What a llama-bench row ran: the model's KV geometry, its weight type, and the GPU's datasheet.

llama-bench names the model (``model_type`` "llama 7B Q4_0", ``model_n_params``,
``model_size``) and the GPU (``gpu_info`` "NVIDIA GeForce RTX 3090 Ti") but not the
model's layer shapes or the GPU's rates. Those come from data files:
``llamatier/data/llama_bench_models.toml`` (model type -> geometry preset) and
``llamatier/data/gpu_specs.toml`` (GPU name -> datasheet numbers, sourced).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from llamatier.errors import LlamatierError
from llamatier.target import TargetModel, geometry_preset, resolve_geometry

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

DATA = Path(__file__).resolve().parent.parent / "data"
GPU_SPECS_FILE = DATA / "gpu_specs.toml"
MODELS_FILE = DATA / "llama_bench_models.toml"

# Weight classes: llama.cpp's decode and prefill kernels differ by weight type family.
WEIGHT_CLASSES = ("f16", "q8_0", "legacy", "kquant", "iquant", "other")


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet numbers of one GPU (SI units)."""

    name: str
    mem_bytes_per_s: float
    sm_count: int
    compute_capability: float
    fp16_tensor_flops_per_s: float  # 0 when the GPU has no tensor cores
    int8_ops_per_s: float
    profile: str  # built-in llamatier profile of this GPU, "" if none
    source: str

    @property
    def has_tensor_cores(self) -> bool:
        return self.fp16_tensor_flops_per_s > 0


@lru_cache(maxsize=1)
def gpu_specs() -> dict[str, tuple[tuple[str, ...], GpuSpec]]:
    """Every GPU of ``gpu_specs.toml``: name -> (match strings, spec)."""
    with GPU_SPECS_FILE.open("rb") as fh:
        data = tomllib.load(fh)
    out = {}
    for name, e in data.items():
        spec = GpuSpec(
            name=name,
            mem_bytes_per_s=float(e["mem_gb_s"]) * 1e9,
            sm_count=int(e["sm_count"]),
            compute_capability=float(e["compute_capability"]),
            fp16_tensor_flops_per_s=float(e["fp16_tensor_tflops"]) * 1e12,
            int8_ops_per_s=float(e["int8_tops"]) * 1e12,
            profile=str(e.get("profile", "")),
            source=str(e["source"]),
        )
        out[name] = (tuple(str(m) for m in e["match"]), spec)
    return out


def find_gpu_spec(gpu_info: str | None) -> GpuSpec | None:
    """The spec whose longest match string ``gpu_info`` contains as whole words (any case); None if none."""
    if not gpu_info:
        return None
    best: tuple[int, GpuSpec] | None = None
    for matches, spec in gpu_specs().values():
        for m in matches:
            # whole words only ("L4" must not match "L40S"), and not a variant ("RTX 4080 SUPER", "RTX 3090 Ti")
            if re.search(rf"(?<![\w-]){re.escape(m)}(?!\w)(?!\s+(?:Ti|SUPER|D)\b)", gpu_info, re.IGNORECASE) and (
                    best is None or len(m) > best[0]):
                best = (len(m), spec)
    return None if best is None else best[1]


def gpu_spec(gpu_info: str | None) -> GpuSpec:
    """Like :func:`find_gpu_spec`, but a one-line error naming the fix when the GPU is unknown."""
    spec = find_gpu_spec(gpu_info)
    if spec is None:
        known = ", ".join(sorted(gpu_specs()))
        raise LlamatierError(
            f"no datasheet numbers for GPU {gpu_info!r}: add it to {GPU_SPECS_FILE} (known GPUs: {known})"
        )
    return spec


def gpu_spec_by_name(name: str) -> GpuSpec:
    """A spec by its table name (``"A100 40GB"``) or built-in profile name (``"a100-40g"``)."""
    for table_name, (_, spec) in gpu_specs().items():
        if name in (table_name, spec.profile) and name:
            return spec
    raise LlamatierError(f"no GPU {name!r} in {GPU_SPECS_FILE}: known GPUs are {', '.join(sorted(gpu_specs()))}")


def weight_class(model_type: str) -> str:
    """The weight type family of ``model_type`` ("llama 7B Q4_0" -> "legacy")."""
    words = str(model_type).split()
    ftype = " ".join(words[2:]).upper().replace("MOSTLY ", "")
    if ftype.startswith(("F16", "BF16", "F32")):
        return "f16"
    if ftype.startswith("Q8_0"):
        return "q8_0"
    if ftype.startswith(("Q4_0", "Q4_1", "Q5_0", "Q5_1")):
        return "legacy"
    if ftype.startswith(("IQ", "TQ")):
        return "iquant"
    if ftype.startswith("Q") and "_K" in ftype:
        return "kquant"
    return "other"


@lru_cache(maxsize=1)
def _model_table() -> tuple[tuple[str, int, str], ...]:
    with MODELS_FILE.open("rb") as fh:
        data = tomllib.load(fh)
    return tuple((str(m["type"]).lower(), int(m["n_params"]), str(m["preset"])) for m in data["model"])


def row_model(model_type: str, n_params: int | None, geometry: str | None = None) -> TargetModel:
    """The geometry of a llama-bench row's model; ``geometry`` (preset or GGUF path) overrides the table."""
    if geometry:
        return resolve_geometry(geometry)
    key = " ".join(str(model_type).split()[:2]).lower()
    candidates = [(p, preset) for t, p, preset in _model_table() if t == key]
    if n_params:
        candidates = [(p, preset) for p, preset in candidates if abs(p / n_params - 1) <= 0.03]
    if len(candidates) != 1:
        why = "is not in" if not candidates else "is ambiguous in"
        raise LlamatierError(
            f"llama-bench model {model_type!r} ({n_params or '?'} parameters) {why} {MODELS_FILE}: pass "
            "--geometry with a preset name or the model's GGUF file"
        )
    return geometry_preset(candidates[0][1])
