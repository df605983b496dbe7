"""llama.cpp through llama-cpp-python: the built-in trace engine.

- :mod:`.session`: a thin, safe layer over llama-cpp-python's low-level API
  (model, context, batches, logits, sampling, one logger), also used by quality runs;
- :mod:`.capture`: the ``cb_eval`` attention capture (a small C helper, or Python);
- :mod:`.engine`: :class:`LlamaCppEngine`, the :class:`~llamatier.engines.TraceEngine`.
"""

from llamatier.engines.llamacpp.engine import LlamaCppEngine

__all__ = ["LlamaCppEngine"]
