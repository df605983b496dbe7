"""The real CLI, with a terminal's Ctrl-C arriving while llama.cpp loads the model.

    python tests/sigint_at_load_cli.py trace MODEL ...

In the supervised child, the first line llama.cpp logs from its model loader sends SIGINT to
the whole process group (supervisor and child, as a terminal does). Python runs its SIGINT
handler at the next Python code it executes: llamatier's llama.cpp logger callback, inside
``llama_model_load_from_file``. That is the moment a Ctrl-C during a model load lands in.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _SigintOnLoaderLine(collections.deque):
    sent = False

    def append(self, item) -> None:  # noqa: ANN001
        super().append(item)
        if not _SigintOnLoaderLine.sent and "llama_model_loader" in item[2]:
            _SigintOnLoaderLine.sent = True
            os.killpg(os.getpgid(0), signal.SIGINT)


if __name__ == "__main__":
    if os.environ.get("LLAMATIER_SUPERVISED"):
        from llamatier.engines.llamacpp import session

        session._LOG_LINES = _SigintOnLoaderLine(maxlen=200)
    from llamatier.supervise import main

    main()
