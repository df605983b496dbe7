"""A replayed run as a Chrome / Perfetto trace-event timeline (JSON), to scroll through step by step.

One process per replayed policy; in each, tracks (threads) for:

- ``steps``: one slice per step, with the cost model's terms as nested slices
  laid end to end in the order they add up (compute, host layers, HBM reads,
  host attention, exposed link time);
- ``reads <tier>``: the bytes attention read from each tier, drawn over the term
  that pays for them (HBM reads over the HBM term, host-attended DRAM over host
  attention, fetched/staged blocks over the link term);
- ``link <name> <up|down>``: busy time of each link direction, drawn ending at
  the step's end (its prefetched part overlaps the step's compute);
- ``migrations``: moves between tiers, demand moves over the link term,
  prefetches over compute, free (oracle) moves as instants;
- counters: KV bytes held per tier and context tokens after each step.

Timestamps are microseconds of modelled time (not replay wall time). The file
opens in https://ui.perfetto.dev and chrome://tracing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llamatier.errors import LlamatierError
from llamatier.outpaths import check_output_file
from llamatier.tiers import DIRECTION_NAMES, LINK_NAMES, TIER_NAMES, MoveTiming

US = 1e6  # seconds -> microseconds
SEGMENTS = ("compute", "host_layers", "hbm", "host_attention", "link")  # StepCosts terms, in order
_SEGMENT_LABEL = {
    "compute": "compute",
    "host_layers": "host layers",
    "hbm": "HBM KV reads/writes",
    "host_attention": "host attention (DRAM KV)",
    "link": "link (exposed)",
}
TID_STEPS = 1
TID_READS = {t: 10 + i for i, t in enumerate(TIER_NAMES)}
TID_LINKS = {(n, d): 20 + 2 * i + j for i, n in enumerate(LINK_NAMES) for j, d in enumerate(DIRECTION_NAMES)}
TID_MIGRATIONS = 30


def _results(what: Any) -> list[Any]:
    if hasattr(what, "results"):
        return list(what.results)
    if isinstance(what, Sequence):
        return list(what)
    return [what]


def _x(name: str, pid: int, tid: int, ts_us: float, end_us: float, cat: str, args: dict | None = None) -> dict:
    """A complete event from start and end in microseconds (already rounded, so nesting is exact)."""
    ev = {"name": name, "cat": cat, "ph": "X", "pid": pid, "tid": tid, "ts": ts_us, "dur": round(end_us - ts_us, 3)}
    if args:
        ev["args"] = args
    return ev


def _meta(pid: int, tid: int | None, kind: str, value: Any) -> dict:
    ev: dict[str, Any] = {"name": kind, "ph": "M", "pid": pid, "args": {}}
    if tid is not None:
        ev["tid"] = tid
    ev["args"]["name" if kind.endswith("_name") else "sort_index"] = value
    return ev


def _pairs(mat: np.ndarray) -> dict[str, float]:
    return {f"{TIER_NAMES[a]}->{TIER_NAMES[b]}": float(mat[a, b]) for a in range(4) for b in range(4) if mat[a, b] > 0}


def _result_events(r: Any, pid: int) -> list[dict]:
    """Events of one ReplayResult (metadata first, then by time)."""
    label = f"{r.policy}{' (bound)' if r.is_bound else ''} · {r.profile} · {r.model} · KV {r.type_k}/{r.type_v}"
    meta = [_meta(pid, None, "process_name", label), _meta(pid, None, "process_sort_index", pid)]
    names = {TID_STEPS: "steps", TID_MIGRATIONS: "migrations"}
    names.update({tid: f"reads {t}" for t, tid in TID_READS.items()})
    names.update({tid: f"link {n} {d}" for (n, d), tid in TID_LINKS.items()})
    if not r.runs or r.costs is None:
        meta.append(_meta(pid, TID_STEPS, "thread_name", "steps"))
        return meta + [{"name": f"does not run: {r.verdict}", "ph": "i", "s": "p", "pid": pid, "tid": TID_STEPS,
                        "ts": 0.0, "cat": "verdict"}]
    c, tr, rec = r.costs, r.record.traffic, r.record
    S = r.n_steps
    seg = np.stack([c.compute_s, c.host_layers_s, c.hbm_s, c.host_attention_s, c.link_s], axis=1)  # [S, 5]
    step_s = seg.sum(axis=1)
    # every boundary once, rounded once: step s, term k runs from edge[s, k] to edge[s, k + 1]
    flat = np.round(np.concatenate([[0.0], np.cumsum(seg.ravel())]) * US, 3)
    edge = np.empty((S, len(SEGMENTS) + 1))
    edge[:, :-1] = flat[:-1].reshape(S, len(SEGMENTS))
    edge[:, -1] = flat[len(SEGMENTS):: len(SEGMENTS)]
    read_b = tr.read_bytes.sum(axis=1)  # [S, 4]
    read_n = tr.read_blocks.sum(axis=1)
    dec = np.asarray(r.is_decode, dtype=bool)
    ev: list[dict] = []
    used: set[int] = {TID_STEPS}

    def span(s: int, k: int) -> tuple[float, float]:
        """Start and end (us) of term k of step s (the whole step when that term is empty)."""
        return (edge[s, k], edge[s, k + 1]) if seg[s, k] > 0 else (edge[s, 0], edge[s, -1])

    for s in range(S):
        t0_us, t1_us = float(edge[s, 0]), float(edge[s, -1])
        phase = "decode" if dec[s] else f"prefill {int(tr.n_tokens[s])} tok"
        ev.append(_x(phase, pid, TID_STEPS, t0_us, t1_us, "step", {
            "step": s, "n_tokens": int(tr.n_tokens[s]), "context_tokens": int(tr.ctx_tokens[s]),
            "step_ms": float(step_s[s] * 1e3), **{f"{k}_ms": float(seg[s, i] * 1e3) for i, k in enumerate(SEGMENTS)},
        }))
        for k, name in enumerate(SEGMENTS):
            if seg[s, k] > 0:
                ev.append(_x(_SEGMENT_LABEL[name], pid, TID_STEPS, float(edge[s, k]), float(edge[s, k + 1]), "cost"))
        for t, tier in enumerate(TIER_NAMES):
            if read_b[s, t] <= 0:
                continue
            if t == 0:
                k = 2
            elif t == 1 and c.host_attention_s[s] > 0 and c.fetched_layers[s] == 0:
                k = 3
            else:
                k = 4
            a, b = span(s, k)
            ev.append(_x(f"read {tier}", pid, TID_READS[tier], float(a), float(b), "read",
                         {"bytes": float(read_b[s, t]), "blocks": float(read_n[s, t])}))
            used.add(TID_READS[tier])
        for (lname, direction), tid in TID_LINKS.items():
            li, di = LINK_NAMES.index(lname), DIRECTION_NAMES.index(direction)
            busy = float(c.link_busy_s[s, li, di])
            nbytes = float(c.link_bytes[s, li, di])
            if busy <= 0 and nbytes <= 0:
                continue
            start = max(t0_us, round(t1_us - busy * US, 3))
            ev.append(_x(f"{lname} {direction}", pid, tid, start, t1_us, "link",
                         {"bytes": nbytes, "busy_ms": busy * 1e3}))
            used.add(tid)
        for m in MoveTiming:
            timing = m.label
            cnt = tr.move_count[s, m]
            if cnt.sum() <= 0:
                continue
            args = {"timing": timing, "blocks": _pairs(cnt), "bytes": _pairs(tr.move_bytes[s, m])}
            used.add(TID_MIGRATIONS)
            if m == MoveTiming.FREE:
                ev.append({"name": "migrate (free, bound)", "cat": "migration", "ph": "i", "s": "t", "pid": pid,
                           "tid": TID_MIGRATIONS, "ts": t1_us, "args": args})
                continue
            a, b = span(s, 0 if m == MoveTiming.PREFETCH else 4)
            ev.append(_x(f"migrate ({timing})", pid, TID_MIGRATIONS, float(a), float(b), "migration", args))
        occ = rec.occupancy_bytes[s]
        ev.append({"name": "KV held (bytes)", "ph": "C", "pid": pid, "ts": t1_us,
                   "args": {t: float(occ[i]) for i, t in enumerate(TIER_NAMES)}})
        ev.append({"name": "context tokens", "ph": "C", "pid": pid, "ts": t1_us,
                   "args": {"tokens": int(tr.ctx_tokens[s])}})
    for tid in sorted(used):
        meta += [_meta(pid, tid, "thread_name", names[tid]), _meta(pid, tid, "thread_sort_index", tid)]
    # per track: by time, a parent slice before the children that start with it
    ev.sort(key=lambda e: (e.get("tid", -1), e["ts"], -e.get("dur", 0.0)))
    return meta + ev


def timeline_events(what: Any) -> dict[str, Any]:
    """Trace-event JSON object (``{"traceEvents": [...], ...}``) for a ReplayResult, a Comparison
    or a sequence of results (one process each)."""
    results = _results(what)
    if not results:
        raise LlamatierError("nothing to export: give at least one replay result")
    events: list[dict] = []
    for i, r in enumerate(results):
        events += _result_events(r, i + 1)
    first = results[0]
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "generator": "llamatier timeline",
            "time": "modelled time (cost model), microseconds",
            "trace": first.trace,
            "model": first.model,
            "profile": first.profile,
            "policies": [r.policy for r in results],
            "verdicts": [r.verdict for r in results],
        },
    }


def write_timeline(what: Any, path: str | Path) -> Path:
    """Write :func:`timeline_events` to ``path`` (JSON); returns the path."""
    p = check_output_file(path, "--timeline", "run.json")
    data = timeline_events(what)
    try:
        with p.open("w") as fh:
            json.dump(data, fh, separators=(",", ":"), allow_nan=False)
    except OSError as exc:
        raise LlamatierError(f"cannot write {p}: {exc.strerror or exc}") from None
    return p
