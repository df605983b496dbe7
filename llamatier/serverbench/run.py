"""Cases of the serving-truth bench: measure one workload on a real llama-server, predict it, compare.

A :class:`Case` varies one workload file (users, llama-server slots, shared
prefix on or off). :func:`measure_case` starts a fresh llama-server configured
from the workload (``-np`` slots of ``slot_context_tokens`` each, ``-b``
``max_batch_tokens``, ``--cache-ram``, the trace's thread count), plays the
case's plan against it and returns the records; :func:`predict_case` runs
``serve-replay``'s ``llamacpp-server`` policy on the same case. Measurements
are saved as JSON so that the model can be re-checked without the server.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamatier.errors import LlamatierError
from llamatier.hardware import Profile
from llamatier.serverbench.server import HOST, LlamaServer
from llamatier.serverbench.sessions import PlayedRequest, play
from llamatier.serving import ServeResult, build_context, make_plan, serve
from llamatier.serving.workload import WorkloadSpec

FORMAT = "llamatier-serving-truth/1"
MIB = 1024**2


@dataclass(frozen=True)
class Case:
    """One variation of the workload: user count, llama-server slots, shared prefix on/off."""

    users: int
    n_parallel: int
    prefix: bool = True

    @property
    def name(self) -> str:
        return f"u{self.users}-np{self.n_parallel}-{'prefix' if self.prefix else 'noprefix'}"

    @staticmethod
    def parse(text: str) -> Case:
        """``u4-np2-prefix`` -> Case(4, 2, True)."""
        try:
            u, npar, pre = text.strip().split("-")
            if not (u.startswith("u") and npar.startswith("np") and pre in ("prefix", "noprefix")):
                raise ValueError
            return Case(int(u[1:]), int(npar[2:]), pre == "prefix")
        except ValueError:
            raise LlamatierError(f"bad case {text!r}: write uUSERS-npSLOTS-prefix|noprefix, e.g. u4-np2-prefix") from None


DEFAULT_CASES = tuple(
    Case(u, n, p)
    for u, n, p in ((1, 1, True), (2, 2, True), (4, 4, True), (8, 8, True), (4, 2, True), (8, 4, True),
                    (4, 4, False), (8, 4, False))
)


def case_spec(spec: WorkloadSpec, case: Case) -> WorkloadSpec:
    """The workload with the case's users, slots and prefix."""
    s = spec.with_users(case.users)
    server = dataclasses.replace(s.server, n_parallel=case.n_parallel)
    return dataclasses.replace(s, server=server, prefix_tokens=s.prefix_tokens if case.prefix else 0)


def server_args(spec: WorkloadSpec, n_threads: int, extra: list[str] | None = None) -> list[str]:
    """llama-server arguments that configure it as the workload's server section says."""
    sv = spec.server
    n = int(sv.n_parallel or spec.users or 1)
    cache_mib = int(sv.cache_ram_bytes // MIB)
    return [
        "-np", str(n),
        "-c", str(n * sv.slot_context_tokens),
        "-b", str(sv.max_batch_tokens),
        "--cache-ram", str(cache_mib),
        "-t", str(n_threads),
        "-tb", str(n_threads),
        *(extra or []),
    ]


def measure_case(
    spec: WorkloadSpec,
    case: Case,
    *,
    binary: Path,
    model: Path,
    out_dir: Path,
    n_threads: int,
    extra_args: list[str] | None = None,
    deadline_s: float = 300.0,
    request_timeout_s: float = 120.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Start a fresh llama-server for ``case``, play the plan, stop it; return (and save) the records."""
    cs = case_spec(spec, case)
    ctx = build_context(cs)
    plan = make_plan(cs, list(ctx.shapes))
    args = server_args(cs, n_threads, extra_args)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / f"{case.name}.server.log"
    t_start = time.time()
    with LlamaServer(binary, model, args, log) as srv:
        played = play(plan, HOST, srv.port, seed=seed, deadline_s=deadline_s, request_timeout_s=request_timeout_s,
                      options={"seed": seed})
        command = srv.command
    rec = {
        "format": FORMAT,
        "case": case.name,
        "workload": spec.source,
        "server_command": command,
        "started_unix": t_start,
        "wall_s": time.time() - t_start,
        "requests": [p.to_dict() for p in played],
    }
    (out_dir / f"{case.name}.json").write_text(json.dumps(rec, indent=1))
    return rec


def load_measurement(path: Path) -> tuple[Case, list[PlayedRequest], dict[str, Any]]:
    """Read a saved measurement (one case)."""
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LlamatierError(f"cannot read measurement {path}: {exc}") from None
    if rec.get("format") != FORMAT:
        raise LlamatierError(f"{path} is not a serving-truth measurement (format {rec.get('format')!r})")
    return Case.parse(rec["case"]), [PlayedRequest.from_dict(d) for d in rec["requests"]], rec


def predict_case(spec: WorkloadSpec, case: Case, profile: str | Profile | None = None) -> ServeResult:
    """``serve-replay --policy llamacpp-server`` on the case."""
    return serve(case_spec(spec, case), "llamacpp-server", profile=profile)
