"""Hardware profile data: four memory tiers, the links between them, and compute rates.

All fields are SI units (bytes, seconds, joules). Profiles are data: they are
loaded from TOML files (``profiles/*.toml``) by :mod:`llamatier.hardware.loader`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from llamatier.errors import ProfileError
from llamatier.hardware.gpumodel import GpuStepModel
from llamatier.hardware.hostmodel import HostComputeModel
from llamatier.tiers import LINK_NAMES, TIER_NAMES

COMPUTE_DEVICES = ("gpu", "host")


@dataclass(frozen=True)
class Tier:
    """One memory tier of a machine."""

    name: str  # one of TIER_NAMES
    capacity_bytes: int  # total capacity of the tier on this machine (HBM: whole card)
    read_bytes_per_s: float
    write_bytes_per_s: float
    latency_s: float  # per access/request
    transfer_overhead_s: float  # fixed cost per request (software, queueing)
    energy_j_per_byte: float  # access energy


@dataclass(frozen=True)
class Link:
    """A data path between two adjacent tiers (per-direction bandwidth)."""

    name: str  # one of LINK_NAMES
    upper: str  # tier name, e.g. "hbm"
    lower: str  # tier name, e.g. "dram"
    kind: str  # "pcie4-x16", "nvme-gen4-x4", "ethernet-100g", ...
    bytes_per_s: float  # per direction
    latency_s: float  # per transfer
    transfer_overhead_s: float  # fixed DMA/software setup cost per transfer
    energy_j_per_byte: float


@dataclass(frozen=True)
class Compute:
    """Compute rates of the device that runs the model's matmuls."""

    device: str  # "gpu" or "host"
    matmul_flops_per_s: float  # dense fp16/bf16 peak of the device
    matmul_efficiency: float  # fraction of peak reached in decode matmuls, (0, 1]
    step_overhead_s: float  # fixed per-step cost (launches, sampling)
    energy_j_per_mac: float
    host_attention_bytes_per_s: float  # bandwidth attention reaches on the host (llama.cpp -nkvo)
    host_roundtrip_s: float  # per-layer Q / partial-result round trip when attending on the host
    host_model: HostComputeModel | None = None  # calibrated host step-time model, None for datasheet profiles
    gpu_model: GpuStepModel | None = None  # GPU step model fitted on llama-bench rows, None: datasheet roofline


@dataclass(frozen=True)
class Profile:
    """A machine: four tiers, three links, compute. Loaded with :func:`load_profile`."""

    name: str
    description: str
    tiers: dict[str, Tier]  # exactly the four TIER_NAMES keys
    links: dict[str, Link]  # exactly the three LINK_NAMES keys
    compute: Compute
    source: str  # path of the TOML it came from

    def tier(self, name: str) -> Tier:
        """The tier called ``name``; ProfileError listing valid names otherwise."""
        if name not in self.tiers:
            raise ProfileError(f"unknown tier {name!r}: valid tiers are {', '.join(TIER_NAMES)}")
        return self.tiers[name]

    def link(self, name: str) -> Link:
        """The link called ``name``; ProfileError listing valid names otherwise."""
        if name not in self.links:
            raise ProfileError(f"unknown link {name!r}: valid links are {', '.join(LINK_NAMES)}")
        return self.links[name]

    def with_capacity(self, tier: str, capacity_bytes: int) -> Profile:
        """A copy with one tier's capacity replaced (e.g. an HBM budget for KV)."""
        old = self.tier(tier)
        if int(capacity_bytes) < 0:
            raise ProfileError(f"capacity of tier {tier!r} must be >= 0 bytes (got {capacity_bytes})")
        tiers = dict(self.tiers)
        tiers[tier] = replace(old, capacity_bytes=int(capacity_bytes))
        return replace(self, tiers=tiers)

    def with_host_model(self, host_model: HostComputeModel | None, *, name: str | None = None) -> Profile:
        """A copy whose compute carries a calibrated host model (see ``llamatier calibrate``)."""
        return replace(
            self,
            name=name or self.name,
            compute=replace(self.compute, host_model=host_model),
        )

    @property
    def is_host_only(self) -> bool:
        """True for CPU-only machines: no HBM, DRAM is the fastest tier."""
        return self.compute.device == "host" or self.tiers["hbm"].capacity_bytes == 0

    def to_dict(self) -> dict[str, Any]:
        """Plain SI-unit dictionary (for JSON output)."""
        d = asdict(self)
        hm = self.compute.host_model
        d["compute"]["host_model"] = hm.to_dict() if hm is not None else None
        gm = self.compute.gpu_model
        d["compute"]["gpu_model"] = None if gm is None else {
            "coef": dict(gm.coef), "fitted_on": list(gm.fitted_on), "unfitted": list(gm.unfitted),
            "n_rows": gm.n_rows, "fit_median_ape": gm.fit_median_ape, "notes": gm.notes,
            "cuda_graphs": None if gm.paths is None else gm.paths.cuda_graphs,
            "quant_prefill": None if gm.paths is None else gm.paths.quant_prefill,
        }
        return d
