"""Hardware profiles: memory tiers, links and compute rates, loaded from TOML data files.

``from llamatier.hardware import load_profile, Profile, TIER_NAMES, ...`` is the
public API; see docs/profiles.md for the file format.
"""

from llamatier.hardware.hostmodel import HostComputeModel, pad_kv_cells
from llamatier.hardware.loader import (
    list_profiles,
    load_profile,
    profile_from_dict,
    resolve_profile_path,
)
from llamatier.hardware.profile import COMPUTE_DEVICES, Compute, Link, Profile, Tier
from llamatier.hardware.writer import profile_to_toml
from llamatier.tiers import LINK_ENDS, LINK_NAMES, TIER_NAMES

__all__ = [
    "COMPUTE_DEVICES",
    "LINK_ENDS",
    "LINK_NAMES",
    "TIER_NAMES",
    "Compute",
    "HostComputeModel",
    "Link",
    "Profile",
    "Tier",
    "list_profiles",
    "load_profile",
    "pad_kv_cells",
    "profile_from_dict",
    "profile_to_toml",
    "resolve_profile_path",
]
