"""The llama.cpp trace engine: a model and one context with attention capture, for the tracer.

Flash attention is forced off (otherwise ``kq_soft_max`` never exists) and
``swa_full`` on (so KV cell index == token position on every layer).
GPU placement (``n_gpu_layers``, ``offload_kqv``) and CPU weight repacking
(``repack``: True/False forces it, None decides safely, see ``repack.py``) are
engine options; the capture reads device tensors through ggml when they are not
in host memory.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from llamatier.engines.base import EngineDescription, EngineSettings, PositionMass, StepTiming
from llamatier.errors import LlamatierError
from llamatier.model import ModelInfo

CAPTURE_NODE = "kq_soft_max-<layer>"
CAPTURE_PAD_CELLS = 256  # llama.cpp pads attended KV cells to a multiple of this


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


class LlamaCppEngine:
    """:class:`~llamatier.engines.TraceEngine` for llama.cpp through llama-cpp-python."""

    name: ClassVar[str] = "llama.cpp"

    def __init__(self, settings: EngineSettings, *, n_gpu_layers: int = 0, offload_kqv: bool = True,
                 repack: bool | None = None) -> None:
        self.settings = settings
        self.n_gpu_layers = int(n_gpu_layers)
        self.offload_kqv = bool(offload_kqv)
        self.repack = repack
        self.model: Any = None
        self.ctx: Any = None
        self.capture: Any = None
        self._n_layers = 0

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Reject unknown options and a bad ``LLAMATIER_NO_REPACK`` before anything runs."""
        from llamatier.engines.llamacpp.repack import env_setting

        unknown = sorted(set(options) - {"n_gpu_layers", "offload_kqv", "repack"})
        if unknown:
            raise LlamatierError(f"unknown llama.cpp engine option(s) {', '.join(unknown)}: "
                                 "known are n_gpu_layers, offload_kqv, repack")
        env_setting()

    def load(self, model_path: Path, info: ModelInfo) -> None:
        from llamatier.engines.llamacpp.session import LlamaModel

        self._n_layers = info.n_layers
        self.model = LlamaModel(model_path, n_gpu_layers=self.n_gpu_layers, repack=self.repack,
                                n_threads=self.settings.n_threads)

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text, add_bos=True)

    def is_eog(self, token: int) -> bool:
        return self.model.is_eog(token)

    def start(self) -> None:
        from llamatier.engines.llamacpp.capture import AttentionCapture
        from llamatier.engines.llamacpp.session import ContextSettings, LlamaContext

        s = self.settings
        if s.capture:
            n_cap = _pad(s.n_ctx, CAPTURE_PAD_CELLS) + CAPTURE_PAD_CELLS
            self.capture = AttentionCapture(self._n_layers, n_cap, backend=s.capture_backend)
        cs = ContextSettings(
            n_ctx=s.n_ctx, n_batch=s.n_batch, n_ubatch=s.n_batch, n_threads=s.n_threads,
            type_k=s.type_k, type_v=s.type_v, flash_attn=False, swa_full=True,
            offload_kqv=self.offload_kqv, seed=s.seed,
        )
        cap = self.capture
        self.ctx = LlamaContext(self.model, cs, cb_eval=cap.callback if cap else None,
                                cb_user_data=cap.user_data if cap else None)
        self.ctx.set_sampler(temperature=s.temperature, top_k=s.top_k, seed=s.seed)

    def decode(self, tokens: Sequence[int], pos0: int, *, logits: bool) -> StepTiming:
        t0 = time.perf_counter()
        self.ctx.decode(tokens, pos0, logits_last=logits)
        wall_s = time.perf_counter() - t0
        perf = self.ctx.perf()
        return StepTiming(
            wall_s=wall_s,
            perf_t_p_eval_ms=perf["t_p_eval_ms"],
            perf_t_eval_ms=perf["t_eval_ms"],
            perf_n_p_eval=perf["n_p_eval"],
            perf_n_eval=perf["n_eval"],
        )

    def attention(self, n_ctx_tokens: int) -> PositionMass | None:
        if self.capture is None:
            return None
        mass, n_kv = self.capture.take(n_ctx_tokens)
        return PositionMass(mass=mass, n_kv=n_kv)

    def sample(self) -> int:
        return self.ctx.sample()

    def describe(self) -> EngineDescription:
        import llama_cpp

        from llamatier.engines.llamacpp.session import system_info

        return EngineDescription(
            n_ctx=self.ctx.n_ctx(),
            context={"flash_attn": False, "swa_full": True, "offload_kqv": self.offload_kqv,
                     "n_gpu_layers": self.n_gpu_layers},
            capture={"backend": self.capture.backend if self.capture else None, "node": CAPTURE_NODE},
            engine={"repack": self.model.repack.to_meta(self.model.model_buffers_mib)},
            top={"system_info": system_info(), "llama_cpp_python_version": llama_cpp.__version__},
        )

    def run_stats(self) -> dict[str, Any]:
        return {"capture_reduce_s": self.capture.reduce_s if self.capture else 0.0}

    def close(self) -> None:
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None
        if self.model is not None:
            self.model.close()
            self.model = None
