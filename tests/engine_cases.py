"""Fixed replay cases whose results the replay engine must keep bit for bit.

``tests/data/engine_golden.json`` holds, per case, the digest
(:meth:`ReplayResult.digest`) of every per-step count and cost that the
whole-array engine (before streaming replay) produced. Regenerate only when a
change of results is intended, and say why in the commit:

    .venv/bin/python -m tests.engine_cases
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "data" / "engine_golden.json"
POLICIES = ("static", "lru", "adaptive", "oracle")


def random_cases(n: int = 40) -> list[dict[str, Any]]:
    """Synthetic traces and options drawn from a fixed seed (shapes up to a few hundred blocks)."""
    rng = np.random.default_rng(12)
    out = []
    for i in range(n):
        sparse = bool(rng.random() < 0.35)
        n_layers = int(rng.integers(1, 6))
        bt = int(rng.choice([4, 8, 16]))
        trace = dict(
            n_layers=n_layers, n_prompt=int(rng.integers(1, 700)), n_decode=int(rng.integers(0, 70)), block_tokens=bt,
            sliding_window=int(rng.choice([0, 0, 24, 40, 97])), swa_pattern=int(rng.choice([0, 2, 3])),
            prefill_chunk=[None, 16, 64, 128][int(rng.integers(0, 4))], seed=int(rng.integers(0, 10_000)),
        )
        trace["n_ctx"] = trace["n_prompt"] + trace["n_decode"] + int(rng.choice([0, 0, 64]))
        total = 2 * 2 * 64 * 2 * n_layers * (trace["n_prompt"] + trace["n_decode"])
        opts = dict(
            hbm_budget_bytes=int(float(rng.choice([0.0, 0.1, 0.3, 0.6, 1.0, 3.0])) * total),
            dram_budget_bytes=[None, None, int(0.25 * total)][int(rng.integers(0, 3))],
            mode="sparse" if sparse else "lossless",
            block_budget=int(rng.integers(1, 6)) if sparse else None,
            swa_full=bool(rng.random() < 0.3),
            kv_type=[None, "q8_0", "q4_0/f16"][int(rng.integers(0, 3))],
            static_mode=str(rng.choice(["nkvo", "layers"])),
            dram_reads=str(rng.choice(["auto", "host", "fetch"])),
            prefetch=bool(rng.random() < 0.3),
        )
        out.append({"id": f"synthetic-{i}", "trace": trace, "profile": str(rng.choice(["a100-40g", "t4", "cpu-host"])),
                    "options": opts})
    return out


def real_cases() -> list[dict[str, Any]]:
    """The committed Gemma traces, as the CLI replays them (what-if geometries, sparse mode, coarse blocks)."""
    out = []
    for name, budgets in (("gemma3-270m-1k", (30 << 20, 100 << 20)), ("gemma3-270m-32k", (1 << 30, 3 << 30))):
        for geometry in (None, "llama3-8b"):
            for mode, bb in (("lossless", None), ("sparse", 16)):
                out.append({"id": f"{name}-{geometry}-{mode}", "trace": name, "profile": "a100-40g" if geometry else "l4",
                            "options": dict(hbm_budget_bytes=budgets[1] if geometry else budgets[0], mode=mode,
                                            block_budget=bb, geometry=geometry)})
    out.append({"id": "gemma3-270m-1k-blocks64", "trace": "gemma3-270m-1k", "profile": "t4",
                "options": dict(hbm_budget_bytes=4 << 20, block_tokens=64, swa_full=True)})
    return out


@cache
def _real_trace(name: str):  # noqa: ANN202
    from llamatier.trace import load_trace

    return load_trace(REPO / "traces" / name)


def build(case: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(trace, profile, options) of a case."""
    from llamatier.hardware import load_profile
    from llamatier.replay import ReplayOptions
    from llamatier.replay.synthetic import synthetic_trace
    from llamatier.target import geometry_preset

    t = case["trace"]
    trace = _real_trace(t) if isinstance(t, str) else synthetic_trace(**t)
    o = dict(case["options"])
    geometry = o.pop("geometry", None)
    if geometry:
        o["target"] = geometry_preset(geometry)
    return trace, load_profile(case["profile"]), ReplayOptions(**o)


def digest_of(case: dict[str, Any], policy: str) -> str:
    """The replay's digest, or the one-line error it raises."""
    from llamatier.errors import LlamatierError
    from llamatier.replay import replay

    trace, prof, opts = build(case)
    try:
        return replay(trace, prof, policy, opts).digest()
    except LlamatierError as exc:
        return f"error: {exc}"


def all_cases() -> list[dict[str, Any]]:
    return random_cases() + real_cases()


def main() -> None:
    golden = {c["id"]: {p: digest_of(c, p) for p in POLICIES} for c in all_cases()}
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    n_err = sum(v.startswith("error") for d in golden.values() for v in d.values())
    print(f"wrote {GOLDEN}: {len(golden)} cases x {len(POLICIES)} policies ({n_err} end in a one-line error)")


if __name__ == "__main__":
    main()
