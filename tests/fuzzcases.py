"""Fuzz cases: a clean input, the ways to break it, and the verdict on what llamatier made of each.

Shared by tests/test_integrity_fuzz.py (hypothesis picks the cases) and
bench/fuzz_inputs.py (hundreds of seeded cases, the goal figures). A verdict is
``error`` (one line, non-zero exit or the library's error type), ``identical`` (the
clean input's result), ``accepted-valid`` (damage to a TOML file's text that left
another valid file, which then ran), or a failure: ``traceback``, ``multi-line``
(an error over several lines) or ``silent`` (accepted, with another result).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tests.corruption import RAW_TRACE_OPS, SEALED_TRACE_OPS, Op, cli_run, judge, normalise
from tests.corruption_toml import TEXT_OPS, field_ops

FAILURES = ("traceback", "multi-line", "silent")
TRACE_OPS: dict[str, Op] = {**{f"raw:{k}": v for k, v in RAW_TRACE_OPS.items()},
                            **{f"sealed:{k}": v for k, v in SEALED_TRACE_OPS.items()}}
SERVE_ARGS = ["--json", "--max-users", "4", "-p", "llamacpp-server", "-p", "vllm-lru"]


def toml_ops(model: Any) -> dict[str, Op]:
    """Text damage and schema-breaking edits of a TOML file declared by the pydantic ``model``."""
    return {**{f"text:{k}": v for k, v in TEXT_OPS.items()}, **{f"field:{k}": v for k, v in field_ops(model).items()}}


def clean_workload(trace: Path) -> str:
    """A workload on ``trace`` that sets every section, so that every field can be broken."""
    return f"""[workload]
name = "fuzz"
seed = 3
traces = ["{trace}"]
profile = "a100-40g"
kv_type = "q8_0"

[users]
count = 2
ramp_s = 1.0
sessions_per_user = 2

[sessions]
turns = [1, 2]
think_time_s = 2.0
think_time_distribution = "exponential"

[prefix]
shared_tokens = 16

[server]
slot_context_tokens = 4096
n_parallel = 2
max_batch_tokens = 512
max_batch_seqs = 8
cache_ram = "1GiB"
hbm_budget = "2GiB"
swa_full = true

[slo]
tpot_ms = 100.0
ttft_ms = 2000.0
"""


def trace_digest(d: Path) -> str:
    """SHA-256 of what a trace says: model, block size, completeness, steps, mass and positions."""
    from llamatier.trace import load_trace

    tr = load_trace(d, positions=True)
    h = hashlib.sha256(repr((tr.model, tr.block_tokens, tr.complete, tr.n_steps)).encode())
    for df in (tr.steps, tr.positions):
        if df is not None:
            h.update(repr(df.schema).encode() + df.hash_rows(seed=0).to_numpy().tobytes())
    h.update(np.ascontiguousarray(tr.mass).tobytes())
    return h.hexdigest()


def library_verdict(d: Path, clean_digest: str) -> str:
    """``load_trace(positions=True)`` and a read of all its mass, judged against the clean trace's digest."""
    from llamatier.errors import LlamatierError

    try:
        digest = trace_digest(d)
    except LlamatierError as exc:
        return "multi-line" if "\n" in str(exc).strip() else "error"
    except Exception:
        return "traceback"
    return "identical" if digest == clean_digest else "silent"


class Fuzzer:
    """One clean input folder ``src``, the commands run on a copy, their clean results.

    ``commands(folder)`` gives the CLI argument lists to run on a folder's input;
    ``library`` adds the trace library's own verdict (:func:`library_verdict`).
    """

    def __init__(self, src: Path, ops: dict[str, Op], commands: Callable[[Path], list[list[str]]],
                 *, library: bool = False) -> None:
        self.src, self.ops, self.commands = src, ops, commands
        self.clean = []
        for argv in commands(src):
            p = cli_run(*argv)
            if p.returncode != 0:
                raise RuntimeError(f"the clean input fails: {' '.join(argv)}: {p.stderr.strip()}")
            self.clean.append(normalise(json.loads(p.stdout)))
        self.digest = trace_digest(src) if library else None

    def case(self, op: str, seed: int, work: Path) -> tuple[str, list[str]]:
        """Copy the clean input to ``work``, break it with ``op`` (seeded); (the damage, the verdicts)."""
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(self.src, work)
        what = self.ops[op](work, random.Random(seed))
        verdicts = [judge(cli_run(*argv), c) for argv, c in zip(self.commands(work), self.clean, strict=True)]
        if self.digest is not None:
            verdicts.append(library_verdict(work, self.digest))
        if op.startswith("text:"):  # a TOML file has no checksum: damage may leave another valid file
            verdicts = ["accepted-valid" if v == "silent" else v for v in verdicts]
        return what, verdicts
