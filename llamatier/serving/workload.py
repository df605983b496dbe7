"""Serving workload files: the TOML schema, its validation, and the parsed :class:`WorkloadSpec`.

A workload says who talks to the server and how: closed-loop users (``users.count``) or Poisson session arrivals (``users.arrival_rate_per_s``), multi-turn
sessions with think time, a shared system-prompt prefix, and the traces whose
prompt/output lengths and attention patterns the requests replay. It also names
the hardware profile, KV type, model geometry, the server's knobs and the SLO.
See docs/serving.md for the schema with an example.

Every rule violation raises :class:`WorkloadError` with one line naming the
file, the field and the rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llamatier.errors import LlamatierError
from llamatier.units import parse_size_bytes
from llamatier.userfiles import read_toml_file


class WorkloadError(LlamatierError):
    """A workload file is missing, malformed, or breaks a rule (the message names the field)."""


THINK_DISTRIBUTIONS = ("exponential", "fixed")
PREFILL_COSTS = ("model", "measured")
FLASH_ATTN = ("auto", "on", "off")

# section -> allowed keys (the schema; docs/serving.md documents each)
_SCHEMA: dict[str, tuple[str, ...]] = {
    "workload": ("name", "seed", "traces", "profile", "geometry", "kv_type"),
    "users": ("count", "ramp_s", "sessions_per_user", "arrival_rate_per_s", "sessions"),
    "sessions": ("turns", "think_time_s", "think_time_distribution"),
    "prefix": ("shared_tokens",),
    "server": (
        "slot_context_tokens",
        "n_parallel",
        "max_batch_tokens",
        "max_batch_seqs",
        "cache_ram",
        "block_tokens",
        "prefill_cost",
        "flash_attn",
        "swa_full",
        "hbm_budget",
        "dram_budget",
        "ssd_budget",
        "remote_budget",
    ),
    "slo": ("tpot_ms", "ttft_ms"),
}


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


def workload_from_dict(data: dict[str, Any], *, source: str = "<dict>", base_dir: Path | None = None) -> WorkloadSpec:
    """Validate a workload given as a dict (the TOML's structure)."""
    v = _Validator(source)
    for section, body in data.items():
        if section not in _SCHEMA:
            v.fail(f"section {section}", f"unknown section; valid sections are {', '.join(_SCHEMA)}")
        if not isinstance(body, dict):
            v.fail(f"section {section}", "must be a table (a section header line), not a value")
        for key in body:
            if key not in _SCHEMA[section]:
                v.fail(f"{section}.{key}", f"unknown key; valid keys are {', '.join(_SCHEMA[section])}")
    w = data.get("workload", {})
    if "workload" not in data:
        v.fail("section workload", "missing: it must list the traces and the profile")
    base = base_dir or Path(".")

    traces_raw = w.get("traces")
    if traces_raw is None:
        v.fail("workload.traces", "missing: list at least one trace directory (recorded by `llamatier trace`)")
    if isinstance(traces_raw, str):
        traces_raw = [traces_raw]
    if not isinstance(traces_raw, list) or not traces_raw or not all(isinstance(t, str) for t in traces_raw):
        v.fail("workload.traces", "must be a non-empty list of trace directory paths (strings)")
    traces = []
    for i, t in enumerate(traces_raw):
        tp = Path(t)
        tp = tp if tp.is_absolute() else base / tp
        if not tp.is_dir():
            v.fail(f"workload.traces[{i}]", f"trace directory {tp} not found (record one with `llamatier trace`)")
        traces.append(tp)

    profile = w.get("profile")
    if not isinstance(profile, str) or not profile.strip():
        v.fail("workload.profile", "missing or empty: name a hardware profile (see `llamatier profiles`)")
    geometry = v.opt_str(w, "workload", "geometry")
    if geometry is not None:
        gp = Path(geometry)
        if gp.suffix.lower() == ".gguf" and not gp.is_absolute():
            geometry = str(base / gp)
    kv = v.opt_str(w, "workload", "kv_type")
    if kv is not None:
        from llamatier.kvtypes import parse_kv_pair

        try:
            parse_kv_pair(kv)
        except LlamatierError as exc:
            v.fail("workload.kv_type", str(exc))
    name = v.opt_str(w, "workload", "name") or (Path(source).stem if source != "<dict>" else "workload")
    seed = v.int_(w, "workload", "seed", default=0, lo=0)

    u = data.get("users", {})
    users = v.int_(u, "users", "count", default=None, lo=1)
    rate = v.float_(u, "users", "arrival_rate_per_s", default=None, lo=0.0, lo_open=True)
    sessions = v.int_(u, "users", "sessions", default=None, lo=1)
    ramp = v.float_(u, "users", "ramp_s", default=None, lo=0.0)
    per_user = v.int_(u, "users", "sessions_per_user", default=None, lo=1)
    if (users is None) == (rate is None):
        v.fail("section users", "set exactly one of count (closed loop: concurrent users) or arrival_rate_per_s (open loop)")
    if rate is not None and sessions is None:
        v.fail("users.sessions", "missing: an open-loop workload (arrival_rate_per_s) needs the number of sessions")
    if users is not None and sessions is not None:
        v.fail("users.sessions", "only applies with arrival_rate_per_s (closed loop runs one session per user)")
    if rate is not None and ramp is not None:
        v.fail("users.ramp_s", "only applies with count (closed loop)")
    if rate is not None and per_user is not None:
        v.fail("users.sessions_per_user", "only applies with count (open loop: every arrival is a new session)")

    s = data.get("sessions", {})
    turns_raw = s.get("turns", 1)
    if isinstance(turns_raw, bool):
        v.fail("sessions.turns", "must be an integer >= 1 or a list of two integers such as [1, 4]")
    if isinstance(turns_raw, int):
        turns = (turns_raw, turns_raw)
    elif isinstance(turns_raw, list) and len(turns_raw) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in turns_raw):
        turns = (int(turns_raw[0]), int(turns_raw[1]))
    else:
        v.fail("sessions.turns", f"must be an integer >= 1 or a list of two integers such as [1, 4] (got {turns_raw!r})")
    if turns[0] < 1 or turns[1] < turns[0]:
        v.fail("sessions.turns", f"needs 1 <= first <= second (got {turns_raw!r})")
    think = v.float_(s, "sessions", "think_time_s", default=0.0, lo=0.0)
    dist = v.opt_str(s, "sessions", "think_time_distribution") or "exponential"
    if dist not in THINK_DISTRIBUTIONS:
        v.fail("sessions.think_time_distribution", f"unknown {dist!r}: use {' or '.join(THINK_DISTRIBUTIONS)}")

    prefix = v.int_(data.get("prefix", {}), "prefix", "shared_tokens", default=0, lo=0)

    sv = data.get("server", {})
    d = ServerSpec()
    n_par_raw = sv.get("n_parallel", "users")
    if n_par_raw == "users":
        n_parallel = None
    else:
        n_parallel = v.int_(sv, "server", "n_parallel", default=None, lo=1, extra="or the string \"users\"")
    budgets = tuple(
        v.size(sv, "server", key, default=None) for key in ("hbm_budget", "dram_budget", "ssd_budget", "remote_budget")
    )
    prefill_cost = v.opt_str(sv, "server", "prefill_cost") or d.prefill_cost
    if prefill_cost not in PREFILL_COSTS:
        v.fail("server.prefill_cost", f"unknown {prefill_cost!r}: use {' or '.join(PREFILL_COSTS)}")
    flash_attn = v.opt_str(sv, "server", "flash_attn") or d.flash_attn
    if flash_attn not in FLASH_ATTN:
        v.fail("server.flash_attn", f"unknown {flash_attn!r}: use {', '.join(FLASH_ATTN)} (llama.cpp -fa)")
    swa_full = sv.get("swa_full", d.swa_full)
    if not isinstance(swa_full, bool):
        v.fail("server.swa_full", f"must be true or false (got {swa_full!r})")
    server = ServerSpec(
        slot_context_tokens=v.int_(sv, "server", "slot_context_tokens", default=d.slot_context_tokens, lo=1),
        n_parallel=n_parallel,
        max_batch_tokens=v.int_(sv, "server", "max_batch_tokens", default=d.max_batch_tokens, lo=1),
        max_batch_seqs=v.int_(sv, "server", "max_batch_seqs", default=d.max_batch_seqs, lo=1),
        cache_ram_bytes=v.size(sv, "server", "cache_ram", default=d.cache_ram_bytes),
        block_tokens=v.int_(sv, "server", "block_tokens", default=None, lo=1),
        prefill_cost=prefill_cost,
        flash_attn=flash_attn,
        swa_full=swa_full,
        budgets_bytes=budgets,  # type: ignore[arg-type]
    )
    if prefix >= server.slot_context_tokens:
        v.fail("prefix.shared_tokens", f"must be below server.slot_context_tokens ({server.slot_context_tokens})")

    slo = data.get("slo", {})
    tpot = v.float_(slo, "slo", "tpot_ms", default=None, lo=0.0, lo_open=True)
    ttft = v.float_(slo, "slo", "ttft_ms", default=None, lo=0.0, lo_open=True)
    return WorkloadSpec(
        name=name,
        source=source,
        seed=seed,
        traces=tuple(traces),
        profile=profile.strip(),
        geometry=geometry,
        kv_type=kv,
        users=users,
        ramp_s=ramp,
        sessions_per_user=per_user or 1,
        arrival_rate_per_s=rate,
        sessions=sessions,
        turns=turns,
        think_time_s=think,
        think_time_distribution=dist,
        prefix_tokens=prefix,
        server=server,
        slo_tpot_s=tpot / 1e3 if tpot is not None else None,
        slo_ttft_s=ttft / 1e3 if ttft is not None else None,
    )


class _Validator:
    """Typed field readers that fail with one line naming file, field and rule."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, rule: str) -> None:
        raise WorkloadError(f"{self.source}: {where}: {rule}")

    def opt_str(self, body: dict, section: str, key: str) -> str | None:
        val = body.get(key)
        if val is None:
            return None
        if not isinstance(val, str) or not val.strip():
            self.fail(f"{section}.{key}", f"must be a non-empty string (got {val!r})")
        return val.strip()

    def int_(self, body: dict, section: str, key: str, *, default: Any, lo: int, extra: str = "") -> Any:
        val = body.get(key, default)
        if val is None:
            return None
        if isinstance(val, bool) or not isinstance(val, int) or val < lo:
            more = f" {extra}" if extra else ""
            self.fail(f"{section}.{key}", f"must be an integer >= {lo}{more} (got {val!r})")
        return int(val)

    def float_(self, body: dict, section: str, key: str, *, default: Any, lo: float, lo_open: bool = False) -> Any:
        val = body.get(key, default)
        if val is None:
            return None
        bad = isinstance(val, bool) or not isinstance(val, (int, float)) or val != val or val == float("inf")
        if not bad:
            bad = val <= lo if lo_open else val < lo
        if bad:
            rel = ">" if lo_open else ">="
            self.fail(f"{section}.{key}", f"must be a finite number {rel} {lo:g} (got {val!r})")
        return float(val)

    def size(self, body: dict, section: str, key: str, *, default: Any) -> Any:
        val = body.get(key, default)
        if val is None:
            return None
        if isinstance(val, bool):
            self.fail(f"{section}.{key}", f"must be a size such as \"8GiB\" or a byte count (got {val!r})")
        if isinstance(val, (int, float)):
            if val < 0:
                self.fail(f"{section}.{key}", f"must be >= 0 bytes (got {val!r})")
            return int(val)
        try:
            return parse_size_bytes(str(val), what=f"{section}.{key}")
        except LlamatierError as exc:
            self.fail(f"{section}.{key}", str(exc))
        return None  # pragma: no cover
