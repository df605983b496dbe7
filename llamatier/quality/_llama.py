"""Thin wrappers over llama-cpp-python's low-level API for teacher-forced runs.

Only what the quality measurement needs: load a model once, create one
context per K/V type pair, tokenize, decode a batch with logits for every
position, and read those logits as a numpy view. llama.cpp's log lines are
captured while we work (so the terminal stays clean) and the errors among
them are quoted when llama.cpp refuses a model or a context.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from llamatier.errors import LlamatierError, ModelLoadError
from llamatier.kvtypes import KVType

# enum ggml_log_level in this llama.cpp: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5.
_GGML_LOG_LEVEL_WARN = 3
_GGML_LOG_LEVEL_ERROR = 4

_log_lock = threading.Lock()
_captured: list[str] = []
_log_callback = None  # the CFUNCTYPE object must stay alive while installed


def _llama():  # imported lazily: importing llama_cpp costs ~0.3 s
    import llama_cpp

    return llama_cpp


@contextlib.contextmanager
def captured_llama_logs() -> Iterator[list[str]]:
    """Route llama.cpp's log output into a list of warning/error lines, then restore."""
    global _log_callback
    llama_cpp = _llama()
    with _log_lock:
        lines: list[str] = []

        @llama_cpp.llama_log_callback
        def _callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if level in (_GGML_LOG_LEVEL_WARN, _GGML_LOG_LEVEL_ERROR):
                lines.append(text.decode("utf-8", "replace").strip())

        _log_callback = _callback
        llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
        try:
            yield lines
        finally:
            from llama_cpp import _logger

            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
            _log_callback = None


def _last_error(lines: list[str]) -> str:
    """The most telling captured line: the last one that says 'error', else the last one."""
    useful = [ln for ln in lines if ln]
    errors = [ln for ln in useful if "error" in ln.lower()]
    picked = (errors or useful)[-1:]
    return f" (llama.cpp says: {picked[0]})" if picked else ""


class LoadedModel:
    """A llama.cpp model loaded once and shared by every context of a measurement."""

    def __init__(self, path: str | Path, logs: list[str]) -> None:
        llama_cpp = _llama()
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        params.use_mmap = True
        ptr = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not ptr:
            raise ModelLoadError(
                f"llama.cpp could not load {path}{_last_error(logs)}; check that it is a complete "
                "GGUF model file of an architecture this llama-cpp-python supports"
            )
        self.ptr = ptr
        self.vocab = llama_cpp.llama_model_get_vocab(ptr)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))

    def tokenize(self, text: str) -> np.ndarray:
        """Token ids of ``text`` with the model's BOS (add_special), as int32."""
        llama_cpp = _llama()
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, True, False)
        if n < 0:  # buffer too small: -n is the count needed
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, True, False)
        if n < 0:
            raise LlamatierError("llama.cpp could not tokenize the text; check that it is UTF-8 text")
        return np.frombuffer(buf, dtype=np.int32, count=n).copy()

    def close(self) -> None:
        if self.ptr:
            _llama().llama_model_free(self.ptr)
            self.ptr = None


class TeacherForcedContext:
    """One llama.cpp context with a given K/V type pair, fed the same tokens as the others."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        type_k: KVType,
        type_v: KVType,
        n_ctx: int,
        batch_tokens: int,
        n_threads: int,
        flash_attn: bool,
        logs: list[str],
    ) -> None:
        llama_cpp = _llama()
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = batch_tokens
        params.n_ubatch = batch_tokens
        params.n_seq_max = 1
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.type_k = type_k.ggml_id
        params.type_v = type_v.ggml_id
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.no_perf = True
        params.embeddings = False
        ptr = llama_cpp.llama_init_from_model(model.ptr, params)
        if not ptr:
            raise LlamatierError(
                f"llama.cpp refused a context with K={type_k.name} V={type_v.name} "
                f"(flash attention {'on' if flash_attn else 'off'}){_last_error(logs)}; "
                "try another K/V type pair"
            )
        self.ptr = ptr
        self.n_vocab = model.n_vocab

    def decode(self, batch: object) -> None:
        rc = _llama().llama_decode(self.ptr, batch)
        if rc != 0:
            raise LlamatierError(
                f"llama_decode failed with code {rc}; try a smaller --batch or --ctx"
            )

    def logits(self, n_outputs: int) -> np.ndarray:
        """View of the last batch's logits, shape (n_outputs, n_vocab); valid until the next decode."""
        ptr = _llama().llama_get_logits(self.ptr)
        return np.ctypeslib.as_array(ptr, shape=(n_outputs, self.n_vocab))

    def close(self) -> None:
        if self.ptr:
            _llama().llama_free(self.ptr)
            self.ptr = None


class TokenBatch:
    """A reusable llama_batch for one sequence; every position but the text's last asks for logits."""

    def __init__(self, capacity: int) -> None:
        self._llama_cpp = _llama()
        self.capacity = capacity
        self.batch = self._llama_cpp.llama_batch_init(capacity, 0, 1)

    def fill(self, tokens: np.ndarray, pos0: int, n_total: int) -> int:
        """Load ``tokens`` starting at position ``pos0``; return how many outputs (logits rows) it asks for."""
        b = self.batch
        n_out = 0
        for i, tok in enumerate(tokens.tolist()):
            pos = pos0 + i
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            wants = pos < n_total - 1  # the last token predicts nothing we can score
            b.logits[i] = 1 if wants else 0
            n_out += int(wants)
        b.n_tokens = len(tokens)
        return n_out

    def close(self) -> None:
        if self.batch is not None:
            self._llama_cpp.llama_batch_free(self.batch)
            self.batch = None
