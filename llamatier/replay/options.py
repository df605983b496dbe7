"""Replay options: what-if knobs that are not part of the trace or the hardware profile.

:class:`ReplayOptions` is the one declaration of every replay option: each
field carries its command-line flag and help text, and ``replay``, ``compare``
and ``sweep`` build their options from it (:mod:`llamatier.cli.options`);
sweep cells hold a ReplayOptions too. :func:`options_from_flags` turns the
command line's text values into one, :func:`parse_policy_params` the
``--policy-param POLICY.KEY=VALUE`` texts.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from llamatier.errors import LlamatierError
from llamatier.kvtypes import parse_kv_pair
from llamatier.replay.budgets import BudgetPoint, parse_budget
from llamatier.target import TargetModel, list_geometry_presets, resolve_geometry
from llamatier.tiers import DRAM_READ_MODES
from llamatier.units import parse_size_bytes

MODES = ("lossless", "sparse")
STATIC_MODES = ("nkvo", "layers")


def _option(
    default: Any, help: str, *, flag: str | None = None, cli_type: type = str, axis: bool = False,
    column: str | None = None,
) -> Any:
    """A field with its command-line flag (None: library only) and the value's type there.

    ``axis``: a sweep takes it as an axis of its own; ``column``: sweep rows record it in that column.
    """
    meta = {"flag": flag, "help": help, "cli_type": cli_type, "axis": axis, "column": column}
    return field(default=default, metadata=meta)


def geometry_help() -> str:
    """Help of --geometry, naming the presets that exist."""
    return (f"What-if model: a geometry preset ({', '.join(list_geometry_presets())}) "
            "or a .gguf whose header gives layers, KV heads and head dims.")


@dataclass(frozen=True)
class ReplayOptions:
    """How to replay a trace (every field has a default that reproduces the traced run)."""

    kv_type: str | None = _option(
        None, "Re-cost with GGUF KV types: K/V (q8_0/f16) or one type (q4_0); default: the trace's.",
        flag="--kv-type", axis=True, column="kv_type")
    target: TargetModel | None = _option(None, "", flag="--geometry", column="geometry")  # help: geometry_help()
    block_tokens: int | None = _option(
        None, "Re-aggregate to coarser blocks (a multiple of the trace's).", flag="--block-tokens", cli_type=int,
        column="block_tokens")
    mode: str = _option(
        "lossless", "lossless (every visible block read) or sparse (--block-budget).", flag="--mode", axis=True,
        column="mode")
    block_budget: int | None = _option(
        None, "Sparse mode: blocks read per layer per decode step.", flag="--block-budget", cli_type=int, axis=True,
        column="block_budget")
    hbm_budget_bytes: int | None = _option(
        None, "KV allowed in HBM: a size (2GiB) or a percentage of the replay's peak KV (25%); "
        "default: HBM minus weights.", flag="--hbm-budget", axis=True)
    hbm_budget_fraction: float | None = _option(None, "KV allowed in HBM as a fraction of the replay's peak KV bytes.")
    dram_budget_bytes: int | None = _option(
        None, "KV bytes allowed in DRAM, e.g. 64GiB (default: DRAM capacity; host profiles: minus weights).",
        flag="--dram-budget")
    ssd_budget_bytes: int | None = _option(None, "KV bytes allowed on SSD (default: SSD capacity).")
    remote_budget_bytes: int | None = _option(None, "KV bytes allowed in remote storage (default: its capacity).")
    static_mode: str = _option(
        "nkvo", "static when KV does not fit HBM: nkvo (all on host) or layers (-ngl split).", flag="--static-mode",
        column="static_mode")
    dram_reads: str = _option(
        "auto", "adaptive/oracle: DRAM KV attended on the host, fetched, or auto per layer.", flag="--dram-reads",
        column="dram_reads")
    prefetch: bool = _option(
        False, "adaptive: migrations may hide in idle link time during compute.", flag="--prefetch/--no-prefetch",
        cli_type=bool, column="prefetch")
    swa_full: bool = _option(
        False, "Keep every cell of sliding-window layers (llama.cpp --swa-full).", flag="--swa-full", cli_type=bool,
        column="swa_full")
    n_ubatch: int | None = _option(None, "llama.cpp n_ubatch (static's window-layer reservation); default: the trace's.")
    policy_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # {policy name: constructor kwargs}

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise LlamatierError(f"unknown mode {self.mode!r}: use lossless or sparse")
        if self.mode == "sparse":
            if self.block_budget is None or int(self.block_budget) < 1:
                raise LlamatierError("sparse mode needs --block-budget N (blocks read per layer per step, N >= 1)")
        elif self.block_budget is not None:
            raise LlamatierError("--block-budget only applies with --mode sparse (lossless reads every block)")
        if self.static_mode not in STATIC_MODES:
            raise LlamatierError(f"unknown static mode {self.static_mode!r}: use nkvo or layers")
        if self.dram_reads not in DRAM_READ_MODES:
            raise LlamatierError(f"unknown DRAM read mode {self.dram_reads!r}: use host, fetch or auto")
        for name in ("hbm_budget_bytes", "dram_budget_bytes", "ssd_budget_bytes", "remote_budget_bytes"):
            v = getattr(self, name)
            if v is not None and int(v) < 0:
                flag = "--" + name.removesuffix("_bytes").replace("_", "-")
                raise LlamatierError(f"{flag} must be >= 0 bytes (got {v})")
        if self.hbm_budget_fraction is not None:
            if self.hbm_budget_bytes is not None:
                raise LlamatierError("an HBM budget is either a percentage or a size, not both")
            BudgetPoint(fraction=self.hbm_budget_fraction)  # >= 0 and finite, or the error says so
        if self.kv_type is not None:
            parse_kv_pair(self.kv_type)  # raises with the valid names
        if self.block_tokens is not None and int(self.block_tokens) < 1:
            raise LlamatierError(f"--block-tokens must be >= 1 (got {self.block_tokens})")
        if self.n_ubatch is not None and int(self.n_ubatch) < 1:
            raise LlamatierError(f"n_ubatch must be >= 1 (got {self.n_ubatch})")

    def __hash__(self) -> int:  # policy_params is a dict: hash a frozen copy of it
        return hash(tuple(_frozen(getattr(self, f.name)) for f in fields(self)))

    def with_hbm_budget(self, budget: BudgetPoint) -> ReplayOptions:
        """A copy with the HBM budget replaced (auto: the profile's)."""
        return replace(self, hbm_budget_bytes=budget.size_bytes, hbm_budget_fraction=budget.fraction)


def _frozen(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((k, _frozen(x)) for k, x in v.items()))
    if isinstance(v, list | tuple):
        return tuple(_frozen(x) for x in v)
    return v


def cli_fields(*, axes: bool = True) -> list[Any]:
    """The ReplayOptions fields that have a command-line flag (``axes=False``: not those a sweep turns into axes)."""
    return [f for f in fields(ReplayOptions) if f.metadata.get("flag") and (axes or not f.metadata["axis"])]


def option_columns() -> list[tuple[str, type]]:
    """(column, value type) of the options every sweep row records, in declaration order."""
    return [(f.metadata["column"], f.metadata["cli_type"]) for f in fields(ReplayOptions) if f.metadata.get("column")]


def column_values(options: ReplayOptions) -> dict[str, Any]:
    """The sweep row columns of ``options`` (a what-if target as its preset name or GGUF path)."""
    out = {}
    for f in fields(ReplayOptions):
        if f.metadata.get("column"):
            v = getattr(options, f.name)
            out[f.metadata["column"]] = v.source if isinstance(v, TargetModel) else v
    return out


def _from_text(name: str, value: Any) -> dict[str, Any]:
    """ReplayOptions fields from one command-line value of field ``name``."""
    if value is None:
        return {}
    if name == "hbm_budget_bytes":
        point = parse_budget(str(value), what="--hbm-budget")
        return {"hbm_budget_bytes": point.size_bytes, "hbm_budget_fraction": point.fraction}
    if name == "dram_budget_bytes":
        return {name: parse_size_bytes(str(value), what="--dram-budget")}
    if name == "target":
        return {name: resolve_geometry(str(value))}
    return {name: value}


def options_from_flags(values: dict[str, Any], **more: Any) -> ReplayOptions:
    """ReplayOptions from command-line values keyed by field name (text for sizes, budgets and geometry)."""
    kw: dict[str, Any] = {}
    for name, value in values.items():
        kw.update(_from_text(name, value))
    return ReplayOptions(**kw, **more)


# -- --policy-param POLICY.KEY=VALUE ---------------------------------------------------------------


def _value(text: str) -> Any:
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    return t


def _accepted(cls: type) -> tuple[list[str], bool]:
    """Keyword parameters a policy class takes, and whether it takes any (``**kwargs``)."""
    if cls.__init__ is object.__init__:
        return [], False
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return named, any(p.kind is p.VAR_KEYWORD for p in params)


def parse_policy_params(
    texts: Iterable[str], policies: Sequence[str], *, lists: bool = False
) -> dict[str, dict[str, Any]]:
    """``[POLICY.]KEY=VALUE`` texts -> ``{policy: {key: value}}`` for the given policies.

    A bare KEY applies to every listed policy that takes it (at least one
    must); POLICY must be one of ``policies``. Values are ints, floats,
    true/false, none or text. With ``lists`` a value may be a comma-separated
    list (a sweep axis) and every value comes back as a list.
    """
    from llamatier.registry import POLICIES

    names = [POLICIES.canonical(p) for p in policies]
    accepted = {p: _accepted(POLICIES.get(p)) for p in names}
    out: dict[str, dict[str, Any]] = {}
    for text in texts:
        key, sep, raw = str(text).partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise LlamatierError(f"--policy-param {text!r}: write KEY=VALUE or POLICY.KEY=VALUE, e.g. adaptive.decay=0.9")
        policy, _, param = key.rpartition(".")
        if policy:
            policy = POLICIES.canonical(policy)
            if policy not in names:
                raise LlamatierError(
                    f"--policy-param {text!r}: policy {policy!r} is not among those replayed ({', '.join(names)})"
                )
            targets = [policy]
        else:
            targets = [p for p in names if param in accepted[p][0] or accepted[p][1]]
            if not targets:
                raise LlamatierError(
                    f"--policy-param {text!r}: none of {', '.join(names)} takes a parameter {param!r} ("
                    + "; ".join(f"{p}: {', '.join(accepted[p][0]) or 'none'}" for p in names) + ")"
                )
        if not lists and "," in raw:
            raise LlamatierError(f"--policy-param {text!r}: give one value here (sweep takes a list, e.g. {key}=0.5,0.9)")
        values = [_value(v) for v in raw.split(",") if v.strip()]
        for p in targets:
            if param not in accepted[p][0] and not accepted[p][1]:
                raise LlamatierError(
                    f"--policy-param {text!r}: policy {p!r} has no parameter {param!r}; "
                    f"its parameters are {', '.join(accepted[p][0]) or 'none'}"
                )
            out.setdefault(p, {})[param] = values if lists else values[0]
    return out


def policy_param_grid(params: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of one policy's swept parameter values (keys in the order given)."""
    if not params:
        return [{}]
    keys = list(params)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(params[k] for k in keys))]


def params_label(params: dict[str, Any] | None) -> str | None:
    """"decay=0.5, hysteresis=0.1" for reports (None when there are none)."""
    if not params:
        return None
    return ", ".join(f"{k}={v}" for k, v in params.items())
