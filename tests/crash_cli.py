"""The real CLI with a llama.cpp engine that segfaults (through ctypes) after some decode calls.

    python tests/crash_cli.py trace MODEL ...      (LLAMATIER_TEST_CRASH_AFTER=N decode calls, default 10)

Used by tests of the crash supervisor: the supervised child re-runs this same command line,
so the crashing engine is registered there too.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamatier.engines import register_engine  # noqa: E402
from llamatier.engines.llamacpp import LlamaCppEngine  # noqa: E402


class SegfaultingEngine(LlamaCppEngine):
    """llama.cpp, except that decode call N+1 reads address 0: a real SIGSEGV in native code."""

    calls = 0

    def decode(self, tokens, pos0, *, logits):  # noqa: ANN001, ANN201
        SegfaultingEngine.calls += 1
        if SegfaultingEngine.calls > int(os.environ.get("LLAMATIER_TEST_CRASH_AFTER", "10")):
            ctypes.string_at(0)
        return super().decode(tokens, pos0, logits=logits)


if __name__ == "__main__":
    register_engine(SegfaultingEngine, name="llama.cpp", replace=True)
    from llamatier.supervise import main

    main()
