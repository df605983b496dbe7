"""Load and validate hardware profiles from TOML.

A profile file uses human units in its key names (``read_gb_s``, ``latency_us``,
``energy_pj_per_byte``, ``capacity = "40GiB"``); the loaded dataclasses hold SI
units. Every violation raises :class:`ProfileError` naming the file, the field
and the rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, create_model, model_validator

from llamatier.errors import LlamatierError, ProfileError
from llamatier.hardware.gpumodel import (
    GPU_MODEL_KEYS,
    GPU_TERMS,
    GpuStepModel,
    KernelPaths,
    coef_from_toml,
)
from llamatier.hardware.hostmodel import HostComputeModel, parse_term
from llamatier.hardware.profile import COMPUTE_DEVICES, Compute, Link, Profile, Tier
from llamatier.kvtypes import KV_TYPES
from llamatier.schema import MAX_BYTES, RuleError, Size, Strict, validate
from llamatier.tiers import LINK_ENDS, LINK_NAMES, TIER_NAMES
from llamatier.userfiles import read_toml_file


@dataclass(frozen=True)
class FieldSpec:
    """How one TOML key maps to a dataclass field: kind and scale to SI (derived from the schema)."""

    attr: str
    kind: str  # "size", "float", "int", "bool", "str", "str_list", "bool_list", "float_list", "int_list"
    scale: float = 1.0
    required: bool = True


# Physical bounds: far beyond any real machine, so that a wrong unit or a typo is caught.
MAX_GB_S = 1e6  # 1 PB/s
MAX_US = 1e8  # 100 s
MAX_PJ = 1e7  # 10 uJ per byte or per MAC
MAX_TFLOPS = 1e6  # 1 EFLOP/s


def _to(attr: str, scale: float = 1.0, *, kind: str = "float", rule: str | None = None, **bounds: Any) -> Any:
    extra: dict[str, Any] = {"attr": attr, "scale": scale, "kind": kind}
    if rule:
        extra["rule"] = rule
    return Field(json_schema_extra=extra, **bounds)


Rate = Annotated[float, Field(gt=0, le=MAX_GB_S)]
Micros = Annotated[float, Field(ge=0, le=MAX_US)]
Pico = Annotated[float, Field(ge=0, le=MAX_PJ)]


class TierToml(Strict):
    """One ``[tiers.NAME]`` table."""

    capacity: Size = _to("capacity_bytes", kind="size")
    read_gb_s: Rate = _to("read_bytes_per_s", 1e9)
    write_gb_s: Rate = _to("write_bytes_per_s", 1e9)
    latency_us: Micros = _to("latency_s", 1e-6)
    transfer_overhead_us: Micros = _to("transfer_overhead_s", 1e-6)
    energy_pj_per_byte: Pico = _to("energy_j_per_byte", 1e-12)


class LinkToml(Strict):
    """One ``[links.NAME]`` table."""

    kind: str = _to("kind", kind="str")
    gb_s: Rate = _to("bytes_per_s", 1e9)
    latency_us: Micros = _to("latency_s", 1e-6)
    transfer_overhead_us: Micros = _to("transfer_overhead_s", 1e-6)
    energy_pj_per_byte: Pico = _to("energy_j_per_byte", 1e-12)


class HostModelToml(Strict):
    """``[compute.host_model]``: a calibrated host step-time model (see ``llamatier calibrate``)."""

    terms: list[str] = _to("terms", kind="str_list")
    serial_s: list[Annotated[float, Field(ge=0, le=1e3)]] = _to("serial_s", kind="float_list")
    parallel_s: list[Annotated[float, Field(ge=0, le=1e3)]] = _to("parallel_s", kind="float_list")
    kv_pad_cells: Annotated[int, Field(ge=1, le=1 << 20)] | None = _to("kv_pad_cells", kind="int", default=None)
    k_types: list[str] | None = _to("k_types", kind="str_list", default=None)
    v_types: list[str] | None = _to("v_types", kind="str_list", default=None)
    thread_counts: list[Annotated[int, Field(ge=1, le=1 << 16)]] | None = _to("thread_counts", kind="int_list", default=None)
    n_ubatch: Annotated[int, Field(ge=0, le=1 << 31)] | None = _to("n_ubatch", kind="int", default=None)
    flash_attn: list[bool] | None = _to("flash_attn", kind="bool_list", default=None)
    swa_layer_fraction: Annotated[float, Field(ge=0, le=1)] | None = _to("swa_layer_fraction", default=None)
    swa_window: Annotated[int, Field(ge=0, le=1 << 24)] | None = _to("swa_window", kind="int", default=None)
    model_name: str | None = _to("model_name", kind="str", default=None)
    model_weight_bytes: Annotated[int, Field(ge=0, le=MAX_BYTES)] | None = _to("model_weight_bytes", kind="int", default=None)
    fit_steps: Annotated[int, Field(ge=0)] | None = _to("fit_steps", kind="int", default=None)
    fit_dropped_steps: Annotated[int, Field(ge=0)] | None = _to("fit_dropped_steps", kind="int", default=None)
    fit_median_ape: Annotated[float, Field(ge=0, le=1e6)] | None = _to("fit_median_ape", default=None)
    fit_p95_ape: Annotated[float, Field(ge=0, le=1e6)] | None = _to("fit_p95_ape", default=None)
    traces: list[str] | None = _to("traces", kind="str_list", default=None)
    notes: str | None = _to("notes", kind="str", default=None)
    weight_repack: Literal["on", "off"] | None = _to("weight_repack", kind="str", default=None)

    @model_validator(mode="after")
    def _one_per_term(self) -> HostModelToml:
        for key in ("serial_s", "parallel_s"):
            if len(getattr(self, key)) != len(self.terms):
                raise RuleError(key, f"must have one value per term ({len(self.terms)})")
        for key in ("k_types", "v_types"):
            unknown = [t for t in getattr(self, key) or () if t not in KV_TYPES]
            if unknown:
                raise RuleError(key, f"unknown KV type {unknown[0]!r}; valid types are {', '.join(KV_TYPES)}")
        for t in self.terms:
            try:
                parse_term(t)
            except LlamatierError as exc:
                raise RuleError("terms", str(exc)) from None
        return self


Factor = Annotated[float, Field(ge=0, le=1e6)]


class GpuModelToml(Strict):
    """``[compute.gpu_model]``: a GPU step model fitted on llama-bench rows (see ``calibrate --llama-bench``).

    Coefficient keys (``layer_us``, ``weights_factor`` ... :data:`llamatier.hardware.gpumodel.GPU_MODEL_KEYS`)
    are optional: an absent one was not fitted.
    """

    layer_us: Micros | None = None
    layer_graph_us: Micros | None = None
    weights_factor: Factor | None = None
    dequant_factor: Factor | None = None
    matmul_factor: Factor | None = None
    matmul_mmq_factor: Factor | None = None
    matmul_dp4a_factor: Factor | None = None
    attention_factor: Factor | None = None
    split_us: Micros | None = None
    host_attention_gb_s: Rate | None = None
    host_attention_gflops: Annotated[float, Field(gt=0, le=1e9)] | None = None
    host_weights_gb_s: Rate | None = None
    cuda_graphs: bool = _to("cuda_graphs", kind="bool")
    quant_prefill: Literal["mmq_int8", "cublas_dequant", "dp4a"] = _to("quant_prefill", kind="str")
    kv_pad_cells: Annotated[int, Field(ge=1, le=1 << 20)] | None = _to("kv_pad", kind="int", default=None)
    int8_tops: Annotated[float, Field(ge=0, le=MAX_TFLOPS)] | None = _to("int8_ops_per_s", 1e12, default=None)
    fitted_on: list[str] | None = _to("fitted_on", kind="str_list", default=None)
    fitted_models: list[str] | None = _to("fitted_models", kind="str_list", default=None)
    unfitted: list[str] | None = _to("unfitted", kind="str_list", default=None)
    tied: list[str] | None = _to("tied", kind="str_list", default=None)
    n_rows: Annotated[int, Field(ge=0)] | None = _to("n_rows", kind="int", default=None)
    fit_median_ape: Annotated[float, Field(ge=0, le=1e6)] | None = _to("fit_median_ape", default=None)
    notes: str | None = _to("notes", kind="str", default=None)

    @model_validator(mode="after")
    def _known_terms(self) -> GpuModelToml:
        for t in self.unfitted or ():
            if t not in GPU_TERMS:
                raise RuleError("unfitted", f"unknown GPU term {t!r}; terms are {', '.join(GPU_TERMS)}")
        for pair in self.tied or ():
            term, eq, partner = pair.partition("=")
            if not eq or term not in GPU_TERMS or partner not in GPU_TERMS:
                raise RuleError("tied", f"{pair!r} is not TERM=TERM of GPU terms ({', '.join(GPU_TERMS)})")
        return self


class ComputeToml(Strict):
    """``[compute]``."""

    device: Literal[COMPUTE_DEVICES] = _to("device", kind="str")  # type: ignore[valid-type]
    matmul_tflops: Annotated[float, Field(gt=0, le=MAX_TFLOPS)] = _to("matmul_flops_per_s", 1e12)
    matmul_efficiency: Annotated[float, Field(gt=0, le=1)] = _to(
        "matmul_efficiency", rule="must be a number in (0, 1]"
    )
    step_overhead_us: Micros = _to("step_overhead_s", 1e-6)
    energy_pj_per_mac: Pico = _to("energy_j_per_mac", 1e-12)
    host_attention_gb_s: Rate = _to("host_attention_bytes_per_s", 1e9)
    host_roundtrip_us: Micros = _to("host_roundtrip_s", 1e-6)
    host_model: HostModelToml | None = None
    gpu_model: GpuModelToml | None = None


TiersToml = create_model(
    "TiersToml", __base__=Strict, **{t: (TierToml, ...) for t in TIER_NAMES}  # type: ignore[call-overload]
)
TiersToml.item_name = "tier"
LinksToml = create_model(
    "LinksToml", __base__=Strict, **{name: (LinkToml, ...) for name in LINK_NAMES}  # type: ignore[call-overload]
)
LinksToml.item_name = "link"


class ProfileToml(Strict):
    """A profile file: name, description, four tiers, three links, compute (human units)."""

    name: str | None = None
    description: str = ""
    tiers: TiersToml  # type: ignore[valid-type]
    links: LinksToml  # type: ignore[valid-type]
    compute: ComputeToml

    @model_validator(mode="after")
    def _hbm_matches_device(self) -> ProfileToml:
        hbm = self.tiers.hbm.capacity  # type: ignore[attr-defined]
        if self.compute.device == "host" and hbm != 0:
            raise RuleError("tiers.hbm.capacity", 'must be 0 when compute.device = "host" (a CPU-only host has no HBM)')
        if self.compute.device == "gpu" and hbm == 0:
            raise RuleError("tiers.hbm.capacity", 'must be > 0 when compute.device = "gpu"')
        return self


def _spec(model: type[Strict]) -> dict[str, FieldSpec]:
    out = {}
    for key, info in model.model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and "attr" in extra:
            out[key] = FieldSpec(str(extra["attr"]), str(extra["kind"]), float(extra["scale"]), info.is_required())
    return out


TIER_FIELDS = _spec(TierToml)
LINK_FIELDS = _spec(LinkToml)
COMPUTE_FIELDS = _spec(ComputeToml)
HOST_MODEL_FIELDS = _spec(HostModelToml)
GPU_MODEL_FIELDS = _spec(GpuModelToml)


def _si(model: Strict, spec: dict[str, FieldSpec]) -> dict[str, Any]:
    """The dataclass keyword arguments of one validated table, in SI units."""
    out: dict[str, Any] = {}
    for key, fs in spec.items():
        value = getattr(model, key)
        if value is None:
            continue
        if fs.kind == "float":
            value = float(value) * fs.scale
        elif fs.kind == "float_list":
            value = tuple(float(v) * fs.scale for v in value)
        elif fs.kind.endswith("_list"):
            value = tuple(value)
        out[fs.attr] = value
    return out


def _gpu_model(doc: GpuModelToml) -> GpuStepModel:
    """[compute.gpu_model] -> GpuStepModel (coefficients in SI units)."""
    coef = dict(coef_from_toml(k, getattr(doc, k)) for k in GPU_MODEL_KEYS if getattr(doc, k) is not None)
    v = _si(doc, GPU_MODEL_FIELDS)
    paths = KernelPaths(cuda_graphs=v.pop("cuda_graphs"), quant_prefill=v.pop("quant_prefill"),
                        kv_pad=v.pop("kv_pad", 256))
    return GpuStepModel(coef=coef, paths=paths, **v)


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
    doc = validate(ProfileToml, data, source=source, error=ProfileError)
    tiers = {t: Tier(name=t, **_si(getattr(doc.tiers, t), TIER_FIELDS)) for t in TIER_NAMES}
    links = {}
    for name in LINK_NAMES:
        upper, lower = LINK_ENDS[name]
        links[name] = Link(name=name, upper=upper, lower=lower, **_si(getattr(doc.links, name), LINK_FIELDS))
    host_model = None
    if doc.compute.host_model is not None:
        host_model = HostComputeModel(**_si(doc.compute.host_model, HOST_MODEL_FIELDS))
    gpu_model = None
    if doc.compute.gpu_model is not None:
        gpu_model = _gpu_model(doc.compute.gpu_model)
    compute = Compute(**_si(doc.compute, COMPUTE_FIELDS), host_model=host_model, gpu_model=gpu_model)
    name = doc.name if doc.name is not None else Path(source).stem
    return Profile(name=name, description=doc.description, tiers=tiers, links=links, compute=compute, source=source)
