"""Serving workload files: the declared TOML schema (pydantic), and the parsed :class:`WorkloadSpec`.

A workload says who talks to the server and how: closed-loop users (``users.count``) or Poisson session arrivals (``users.arrival_rate_per_s``), multi-turn
sessions with think time, a shared system-prompt prefix, and the traces whose
prompt/output lengths and attention patterns the requests replay. It also names
the hardware profile, KV type, model geometry, the server's knobs and the SLO.
See docs/serving.md for the schema with an example.

The schema is :class:`WorkloadToml` (one pydantic model per section: strict
types, physical ranges, enums, cross-field rules). Every violation raises
:class:`WorkloadError` with one line naming the file, the field and the rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, model_validator

from llamatier.errors import LlamatierError
from llamatier.schema import RuleError, Size, Strict, describe, validate
from llamatier.userfiles import read_toml_file


class WorkloadError(LlamatierError):
    """A workload file is missing, malformed, or breaks a rule (the message names the field)."""


THINK_DISTRIBUTIONS = ("exponential", "fixed")
PREFILL_COSTS = ("model", "measured")
FLASH_ATTN = ("auto", "on", "off")

@dataclass(frozen=True)
class ServerSpec:
    """The serving engine's knobs (shared by every policy unless a policy says otherwise)."""

    slot_context_tokens: int = 8192  # per-sequence context limit (llama.cpp server: n_ctx / n_parallel)
    n_parallel: int | None = None  # llamacpp-server slots; None: one per user (closed loop) / 1 per expected session
    max_batch_tokens: int = 2048  # tokens per batch step (llama.cpp n_batch, vLLM max_num_batched_tokens)
    max_batch_seqs: int = 256  # sequences decoding at once (vLLM max_num_seqs)
    cache_ram_bytes: int = 8 * 1024**3  # llama.cpp server --cache-ram (host prompt cache), default 8192 MiB
    block_tokens: int | None = None  # KV block (page) size in tokens; None: the first trace's block size
    prefill_cost: str = "model"  # "model": the cost model; "measured": the traces' measured prefill time (host)
    flash_attn: str = "auto"  # llama.cpp -fa: "auto" (on for the CPU backend), "on", "off"
    swa_full: bool = False  # llama.cpp --swa-full: sliding-window layers keep every cell
    budgets_bytes: tuple[int | None, int | None, int | None, int | None] = (None, None, None, None)


@dataclass(frozen=True)
class WorkloadSpec:
    """A parsed, validated workload (paths resolved against the file's folder)."""

    name: str
    source: str  # the file it came from ("<dict>" when built in code)
    seed: int
    traces: tuple[Path, ...]
    profile: str
    geometry: str | None  # preset name or GGUF path; None: the traced model
    kv_type: str | None  # "q8_0/f16" or "q4_0"; None: the traces' types
    users: int | None  # closed loop: concurrent users
    ramp_s: float | None  # closed loop: users start uniformly over [0, ramp_s); None: think_time_s
    sessions_per_user: int  # closed loop: sessions each user runs back to back
    arrival_rate_per_s: float | None  # open loop: Poisson session arrivals per second
    sessions: int | None  # open loop: sessions in the run
    turns: tuple[int, int]  # turns per session, uniform in [lo, hi]
    think_time_s: float
    think_time_distribution: str
    prefix_tokens: int
    server: ServerSpec = field(default_factory=ServerSpec)
    slo_tpot_s: float | None = None
    slo_ttft_s: float | None = None

    @property
    def closed_loop(self) -> bool:
        return self.users is not None

    @property
    def n_sessions(self) -> int:
        return int(self.users * self.sessions_per_user if self.users is not None else self.sessions or 0)

    def with_users(self, users: int) -> WorkloadSpec:
        """The same workload with another user count (closed loop only)."""
        if not self.closed_loop:
            raise WorkloadError(
                f"{self.source}: users.count is not set: the user-count search needs a closed-loop "
                "workload (set users.count instead of arrival_rate_per_s)"
            )
        if int(users) < 1:
            raise WorkloadError(f"user count must be >= 1 (got {users})")
        return replace(self, users=int(users))

    def with_overrides(self, **changes: Any) -> WorkloadSpec:
        """A copy with top-level fields replaced (``profile=``, ``seed=``, ``slo_tpot_s=``...)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def load_workload(path: str | Path) -> WorkloadSpec:
    """Read and validate a workload TOML file; relative trace paths are relative to the file."""
    p = Path(path)
    data = read_toml_file(p, what="workload file", give="a workload .toml file (examples/workloads/ has some)",
                          error=WorkloadError)
    return workload_from_dict(data, source=str(p), base_dir=p.parent)


# ---- the declared schema (pydantic) --------------------------------------------------------------

MAX_SECONDS = 1e7  # ~4 months: longer think times or ramps are a unit mistake, and keep clocks finite
MAX_COUNT = 1 << 31
MAX_TOKENS = 1 << 31


def _text(value: Any) -> Any:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("must be a non-empty string")
        return value.strip()
    return value


Text = Annotated[str, BeforeValidator(_text)]
Tokens = Annotated[int, Field(ge=0, le=MAX_TOKENS)]
Seconds = Annotated[float, Field(ge=0, le=MAX_SECONDS)]


def _traces(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _kv_pair(value: str | None) -> str | None:
    if value is not None:
        from llamatier.kvtypes import parse_kv_pair

        try:
            parse_kv_pair(value)
        except LlamatierError as exc:
            raise ValueError(str(exc)) from None
    return value


class WorkloadSection(Strict):
    """``[workload]``: the traces, the hardware profile and what to cost them as."""

    name: Text | None = None
    seed: Annotated[int, Field(ge=0, le=(1 << 63) - 1)] = 0
    traces: Annotated[list[Text], BeforeValidator(_traces), Field(min_length=1)]
    profile: Text
    geometry: Text | None = None
    kv_type: Annotated[Text | None, AfterValidator(_kv_pair)] = None


class UsersSection(Strict):
    """``[users]``: closed loop (``count``) or open loop (``arrival_rate_per_s`` + ``sessions``)."""

    count: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None
    ramp_s: Seconds | None = None
    sessions_per_user: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None
    arrival_rate_per_s: Annotated[float, Field(gt=0, le=1e9)] | None = None
    sessions: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None

    @model_validator(mode="after")
    def _one_loop(self) -> UsersSection:
        if (self.count is None) == (self.arrival_rate_per_s is None):
            raise RuleError("", "set exactly one of count (closed loop: concurrent users) or arrival_rate_per_s (open loop)")
        if self.arrival_rate_per_s is not None:
            if self.sessions is None:
                raise RuleError("sessions", "missing: an open-loop workload (arrival_rate_per_s) needs the number of sessions")
            for key, rule in (("ramp_s", "only applies with count (closed loop)"),
                              ("sessions_per_user", "only applies with count (open loop: every arrival is a new session)")):
                if getattr(self, key) is not None:
                    raise RuleError(key, rule)
        elif self.sessions is not None:
            raise RuleError("sessions", "only applies with arrival_rate_per_s (closed loop runs one session per user)")
        return self


def _turns(value: Any) -> Any:
    ints = isinstance(value, list) and len(value) == 2 and all(type(x) is int for x in value)
    if type(value) is int:
        value = [value, value]
    elif not ints:
        raise ValueError(f"must be an integer >= 1 or a list of two integers such as [1, 4] (got {value!r})")
    if not 1 <= value[0] <= value[1] or value[1] > 1_000_000:
        raise ValueError(f"needs 1 <= first <= second <= 1000000 (got {value!r})")
    return tuple(value)


class SessionsSection(Strict):
    """``[sessions]``: turns per session and the think time between them."""

    turns: Annotated[tuple[int, int], BeforeValidator(_turns)] = (1, 1)
    think_time_s: Seconds = 0.0
    think_time_distribution: Literal[THINK_DISTRIBUTIONS] = "exponential"  # type: ignore[valid-type]


class PrefixSection(Strict):
    """``[prefix]``: the system prompt every session starts with."""

    shared_tokens: Tokens = 0


def _n_parallel(value: Any) -> Any:
    if value == "users":
        return None
    if type(value) is not int or not 1 <= value <= MAX_COUNT:
        raise ValueError(f'must be an integer >= 1 or the string "users" (got {value!r})')
    return value


class ServerSection(Strict):
    """``[server]``: the serving engine's knobs (see :class:`ServerSpec`)."""

    slot_context_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] = ServerSpec.slot_context_tokens
    n_parallel: Annotated[int | None, BeforeValidator(_n_parallel)] = None
    max_batch_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] = ServerSpec.max_batch_tokens
    max_batch_seqs: Annotated[int, Field(ge=1, le=1 << 20)] = ServerSpec.max_batch_seqs
    cache_ram: Size = ServerSpec.cache_ram_bytes
    block_tokens: Annotated[int, Field(ge=1, le=1 << 20)] | None = None
    prefill_cost: Literal[PREFILL_COSTS] = ServerSpec.prefill_cost  # type: ignore[valid-type]
    flash_attn: Literal[FLASH_ATTN] = ServerSpec.flash_attn  # type: ignore[valid-type]
    swa_full: bool = ServerSpec.swa_full
    hbm_budget: Size | None = None
    dram_budget: Size | None = None
    ssd_budget: Size | None = None
    remote_budget: Size | None = None


class SloSection(Strict):
    """``[slo]``: p99 targets of the user-count search, in milliseconds."""

    tpot_ms: Annotated[float, Field(gt=0, le=1e9)] | None = None
    ttft_ms: Annotated[float, Field(gt=0, le=1e9)] | None = None


class WorkloadToml(Strict):
    """A workload file: its sections (``[workload]`` required, the others optional)."""

    item_name: ClassVar[str] = "section"
    workload: WorkloadSection
    users: UsersSection
    sessions: SessionsSection = SessionsSection()
    prefix: PrefixSection = PrefixSection()
    server: ServerSection = ServerSection()
    slo: SloSection = SloSection()

    @model_validator(mode="before")
    @classmethod
    def _users_section(cls, data: Any) -> Any:
        if isinstance(data, dict) and "users" not in data:
            raise RuleError("users", "missing: set count (closed loop) or arrival_rate_per_s (open loop)")
        return data

    @model_validator(mode="after")
    def _prefix_fits(self) -> WorkloadToml:
        if self.prefix.shared_tokens >= self.server.slot_context_tokens:
            raise RuleError(
                "prefix.shared_tokens", f"must be below server.slot_context_tokens ({self.server.slot_context_tokens})"
            )
        return self


def workload_from_dict(data: dict[str, Any], *, source: str = "<dict>", base_dir: Path | None = None) -> WorkloadSpec:
    """Validate a workload given as a dict (the TOML's structure) against :class:`WorkloadToml`."""
    doc = validate(WorkloadToml, data, source=source, error=WorkloadError)
    w, u, s, sv, slo = doc.workload, doc.users, doc.sessions, doc.server, doc.slo
    base = base_dir or Path(".")
    traces = []
    for i, t in enumerate(w.traces):
        tp = Path(t) if Path(t).is_absolute() else base / t
        if not tp.is_dir():
            raise WorkloadError(
                f"{source}: workload.traces[{i}]: trace directory {tp} not found (record one with `llamatier trace`)"
            )
        traces.append(tp)
    geometry = w.geometry
    if geometry is not None and Path(geometry).suffix.lower() == ".gguf" and not Path(geometry).is_absolute():
        geometry = str(base / geometry)
    server = ServerSpec(
        slot_context_tokens=sv.slot_context_tokens,
        n_parallel=sv.n_parallel,
        max_batch_tokens=sv.max_batch_tokens,
        max_batch_seqs=sv.max_batch_seqs,
        cache_ram_bytes=sv.cache_ram,
        block_tokens=sv.block_tokens,
        prefill_cost=sv.prefill_cost,
        flash_attn=sv.flash_attn,
        swa_full=sv.swa_full,
        budgets_bytes=(sv.hbm_budget, sv.dram_budget, sv.ssd_budget, sv.remote_budget),
    )
    return WorkloadSpec(
        name=w.name or (Path(source).stem if source != "<dict>" else "workload"),
        source=source,
        seed=w.seed,
        traces=tuple(traces),
        profile=w.profile,
        geometry=geometry,
        kv_type=w.kv_type,
        users=u.count,
        ramp_s=u.ramp_s,
        sessions_per_user=u.sessions_per_user or 1,
        arrival_rate_per_s=u.arrival_rate_per_s,
        sessions=u.sessions,
        turns=s.turns,
        think_time_s=s.think_time_s,
        think_time_distribution=s.think_time_distribution,
        prefix_tokens=doc.prefix.shared_tokens,
        server=server,
        slo_tpot_s=slo.tpot_ms / 1e3 if slo.tpot_ms is not None else None,
        slo_ttft_s=slo.ttft_ms / 1e3 if slo.ttft_ms is not None else None,
    )


def check_overrides(
    *, users: int | None = None, seed: int | None = None, slo_tpot_ms: float | None = None,
    slo_ttft_ms: float | None = None, max_users: int | None = None,
) -> None:
    """Command-line values that replace workload fields, checked by the same rules as the file's."""
    checks = (
        ("--users", UsersSection, {"count": users}),
        ("--max-users", UsersSection, {"count": max_users}),
        ("--seed", WorkloadSection, {"seed": seed, "traces": ["x"], "profile": "x"}),
        ("--slo-tpot-ms", SloSection, {"tpot_ms": slo_tpot_ms}),
        ("--slo-ttft-ms", SloSection, {"ttft_ms": slo_ttft_ms}),
    )
    for flag, model, data in checks:
        if next(iter(data.values())) is None:
            continue
        try:
            model.model_validate(data)
        except ValidationError as exc:
            rule = describe(exc).split(": ", 1)[-1]
            raise WorkloadError(f"{flag}: {rule}") from None
