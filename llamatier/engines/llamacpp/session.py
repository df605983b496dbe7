"""A thin, safe layer over llama-cpp-python's low-level API, shared by the tracer and quality runs.

Loads a model (weight repacking decided safely, see ``repack.py``) and a context
with explicit settings (flash attention, swa_full, KV types, cb_eval), tokenizes,
decodes batches (logits for the last token, for every token, or for the first k:
teacher forcing), reads logits and samples.
llama.cpp's log goes to one ring buffer, installed by this module alone, so
that a failure is reported as one line quoting llama.cpp's own reason and the
terminal stays clean.
"""

from __future__ import annotations

import ctypes
import itertools
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llamatier.errors import LlamatierError, ModelLoadError
from llamatier.kvtypes import KVType
from llamatier.machine import usable_cores

_GGML_LOG_LEVEL_ERROR = 4  # enum ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_LOG_LINES: deque[tuple[int, int, str]] = deque(maxlen=200)  # (sequence number, level, text)
_LOG_SEQ = itertools.count()
_LOG_CB: Any = None  # the CFUNCTYPE object must stay alive while llama.cpp holds it
_BACKEND_READY = False
# A Ctrl-C whose KeyboardInterrupt Python raised inside a llama.cpp callback: ctypes cannot pass an
# exception back through C (it prints "Exception ignored" and carries on), so the callback notes it
# here and the call that ran the callback raises it once llama.cpp has returned.
_PENDING_INTERRUPT = [False]
_MODEL_BUFFER_LINE = re.compile(r"(\S+) model buffer size =\s*([0-9.]+) MiB")
# Weight buffers of model loads, kept apart: a large model's load logs far more lines than the ring holds.
_BUFFER_LINES: deque[tuple[int, str, float]] = deque(maxlen=64)  # (sequence number, buffer name, MiB)


def _install_logger() -> int:
    """Route llama.cpp's log into the ring buffer; returns a mark for :func:`last_log_error`.

    Set again on every call (cheap): another library in the process (llama-cpp-python's
    ``Llama`` class) may have put its own logger in place since.
    """
    global _LOG_CB, _BACKEND_READY
    import llama_cpp

    if _LOG_CB is None:

        def _log(level: int, text: bytes, _ud: Any) -> None:
            try:
                seq, line = next(_LOG_SEQ), text.decode("utf-8", "replace").rstrip("\n")
                _LOG_LINES.append((seq, int(level), line))
                if "model buffer size" in line and (m := _MODEL_BUFFER_LINE.search(line)):
                    _BUFFER_LINES.append((seq, m.group(1), float(m.group(2))))
            except KeyboardInterrupt:
                note_interrupt()
            except Exception:
                pass

        _LOG_CB = llama_cpp.llama_log_callback(_log)
    llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))
    if not _BACKEND_READY:
        llama_cpp.llama_backend_init()
        _BACKEND_READY = True
        raise_pending_interrupt()
    return _log_mark()


def note_interrupt() -> None:
    """In a callback llama.cpp runs: remember a KeyboardInterrupt for :func:`raise_pending_interrupt`."""
    _PENDING_INTERRUPT[0] = True


def raise_pending_interrupt() -> None:
    """After a llama.cpp call: raise the KeyboardInterrupt one of its callbacks had to swallow."""
    if _PENDING_INTERRUPT[0]:
        _PENDING_INTERRUPT[0] = False
        raise KeyboardInterrupt


def _log_mark() -> int:
    """The sequence number the next llama.cpp log line will get."""
    return _LOG_LINES[-1][0] + 1 if _LOG_LINES else 0


def last_log_error(since: int = 0) -> str:
    """The most telling llama.cpp log line logged at or after mark ``since``.

    The last line that says "error", else the last error-level line, else the last
    that says "failed" or "invalid", else the last line ("" when there is none).
    """
    lines = [(level, text.strip()) for seq, level, text in _LOG_LINES if seq >= since and text.strip()]
    for wanted in (
        lambda level, low: "error" in low,
        lambda level, low: level == _GGML_LOG_LEVEL_ERROR,
        lambda level, low: "failed" in low or "invalid" in low,
    ):
        for level, text in reversed(lines):
            if wanted(level, text.lower()):
                return text
    return lines[-1][1] if lines else ""


def system_info() -> str:
    import llama_cpp

    _install_logger()
    return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


@dataclass
class ContextSettings:
    """Settings for one llama.cpp context; mirrors llama_context_params fields we use."""

    n_ctx: int = 2048
    n_batch: int = 512
    n_ubatch: int = 512
    n_threads: int = 2
    type_k: KVType | None = None
    type_v: KVType | None = None
    flash_attn: bool = False
    swa_full: bool = True
    offload_kqv: bool = True
    seed: int = 42
    n_seq_max: int = 1  # sequences the context holds (a second one serves as a per-step view of the first)
    kv_unified: bool = False  # one KV buffer for all sequences: copying a sequence only tags cells, no data moves


def _model_buffers_mib(since: int) -> dict[str, float]:
    """llama.cpp's 'NAME model buffer size = X MiB' load lines logged at or after mark ``since``."""
    out: dict[str, float] = {}
    for seq, name, mib in _BUFFER_LINES:
        if seq >= since:
            out[name] = round(out.get(name, 0.0) + mib, 2)
    return out


class LlamaModel:
    """A loaded GGUF model (weights on the CPU unless ``n_gpu_layers``).

    ``repack`` chooses llama.cpp's CPU weight repacking (``use_extra_bufts``): True or False
    forces it; None decides per :func:`~llamatier.engines.llamacpp.repack.decide_repack`
    (``LLAMATIER_NO_REPACK``, else a cached or fresh probe run with ``n_threads`` threads).
    The decision is kept as ``self.repack``, the weight buffers llama.cpp made as
    ``self.model_buffers_mib``.
    """

    def __init__(self, path: str | Path, *, n_gpu_layers: int = 0, repack: bool | None = None,
                 n_threads: int | None = None) -> None:
        import llama_cpp

        from llamatier import crashlog
        from llamatier.engines.llamacpp.repack import decide_repack

        _install_logger()
        self.path = Path(path)
        self.repack = decide_repack(self.path, n_threads=n_threads or usable_cores(), n_gpu_layers=n_gpu_layers,
                                    requested=repack)
        crashlog.note(llama_cpp_model=str(self.path), repack=self.repack.use_extra_bufts,
                      repack_source=self.repack.source, repack_key=self.repack.key,
                      extra_buffer_types=list(self.repack.extra_buffer_types))
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        mp.use_mmap = True
        mp.use_extra_bufts = self.repack.use_extra_bufts
        mark = _log_mark()  # the load's own log lines, after whatever deciding the repacking logged
        ptr = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mp)
        if _PENDING_INTERRUPT[0]:  # Ctrl-C during the load: free what was loaded, then stop
            if ptr:
                llama_cpp.llama_model_free(ptr)
            raise_pending_interrupt()
        if not ptr:
            why = last_log_error(mark)
            raise ModelLoadError(
                f"llama.cpp could not load {self.path}: {why or 'unknown reason'} "
                "(check that the GGUF is complete and its architecture is supported by llama-cpp-python "
                f"{llama_cpp.__version__})"
            )
        self.ptr = ptr
        self.model_buffers_mib = _model_buffers_mib(mark)
        self.vocab = llama_cpp.llama_model_get_vocab(ptr)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``, with the model's BOS first when ``add_bos``."""
        import llama_cpp

        raw = text.encode("utf-8")
        n_max = len(raw) + 16
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), buf, n_max, add_bos, False)
        if n < 0:  # buffer too small: -n is the count needed
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), buf, n_max, add_bos, False)
        if n < 0:
            raise LlamatierError("llama.cpp could not tokenize the text; check that it is UTF-8 text")
        return list(buf[:n])

    def is_eog(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def close(self) -> None:
        import llama_cpp

        if getattr(self, "ptr", None):
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None

    def __enter__(self) -> LlamaModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LlamaContext:
    """One llama.cpp context with a single sequence and a reusable batch."""

    def __init__(self, model: LlamaModel, settings: ContextSettings, *, cb_eval: Any = None, cb_user_data: Any = None) -> None:
        import llama_cpp

        self.model = model
        self.settings = settings
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = settings.n_ctx
        cp.n_batch = settings.n_batch
        cp.n_ubatch = settings.n_ubatch
        cp.n_seq_max = settings.n_seq_max
        cp.kv_unified = settings.kv_unified
        cp.n_threads = settings.n_threads
        cp.n_threads_batch = settings.n_threads
        cp.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if settings.flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        cp.swa_full = settings.swa_full
        cp.offload_kqv = settings.offload_kqv
        cp.no_perf = False
        if settings.type_k is not None:
            cp.type_k = settings.type_k.ggml_id
        if settings.type_v is not None:
            cp.type_v = settings.type_v.ggml_id
        self._cb = cb_eval  # keep the CFUNCTYPE alive for the context's life
        if cb_eval is not None:
            cp.cb_eval = cb_eval
            cp.cb_eval_user_data = cb_user_data
        mark = _install_logger()
        ctx = llama_cpp.llama_init_from_model(model.ptr, cp)
        if _PENDING_INTERRUPT[0]:
            if ctx:
                llama_cpp.llama_free(ctx)
            raise_pending_interrupt()
        if not ctx:
            raise LlamatierError(
                f"llama.cpp could not create a context (n_ctx={settings.n_ctx}, type_k="
                f"{settings.type_k.name if settings.type_k else 'f16'}, type_v="
                f"{settings.type_v.name if settings.type_v else 'f16'}, flash_attn={settings.flash_attn}): "
                f"{last_log_error(mark) or 'unknown reason'}; try other KV types or a smaller --ctx"
            )
        self.ptr = ctx
        self.batch = llama_cpp.llama_batch_init(settings.n_batch, 0, settings.n_seq_max)
        self._sampler = None

    def decode(
        self,
        tokens: list[int] | np.ndarray,
        pos0: int,
        *,
        logits_last: bool = True,
        logits_all: bool = False,
        logits_first: int | None = None,
        seq_id: int = 0,
    ) -> None:
        """Run one llama_decode over ``tokens`` at positions pos0.. of sequence ``seq_id``.

        Logits are kept for the last token (``logits_last``), for every token
        (``logits_all``), or, when ``logits_first`` is given, for the first that many
        tokens only (teacher forcing: every position but the text's final one).
        """
        import llama_cpp

        n = len(tokens)
        if n > self.settings.n_batch:
            raise ValueError(f"batch of {n} tokens exceeds n_batch {self.settings.n_batch}")
        b = self.batch
        b.n_tokens = n
        for i in range(n):
            b.token[i] = int(tokens[i])
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq_id
            if logits_first is not None:
                b.logits[i] = 1 if i < logits_first else 0
            else:
                b.logits[i] = 1 if (logits_all or (logits_last and i == n - 1)) else 0
        mark = _log_mark()
        rc = llama_cpp.llama_decode(self.ptr, b)
        # Wait for the compute to finish (and let llama.cpp settle its perf counters) so
        # that the caller's wall-clock time covers the whole step.
        llama_cpp.llama_synchronize(self.ptr)
        raise_pending_interrupt()  # a Ctrl-C seen by the log or a Python capture callback: the step is not kept
        if rc != 0:
            raise LlamatierError(
                f"llama_decode failed with code {rc} at position {pos0}: {last_log_error(mark) or 'no detail'} "
                "(if the KV cache is full, raise --ctx)"
            )

    def logits(self, i: int = -1) -> np.ndarray:
        """Logits of output row i as a numpy view (valid until the next decode)."""
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self.ptr, i)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def logits_rows(self, n_rows: int) -> np.ndarray:
        """The last decode's first ``n_rows`` output rows, float32 (n_rows, n_vocab); a view valid until the next decode."""
        import llama_cpp

        ptr = llama_cpp.llama_get_logits(self.ptr)
        return np.ctypeslib.as_array(ptr, shape=(n_rows, self.model.n_vocab))

    # -- the KV cache through llama.cpp's memory API ---------------------------------------

    def _memory(self) -> Any:
        import llama_cpp

        return llama_cpp.llama_get_memory(self.ptr)

    def remove_positions(self, seq_id: int, p0: int, p1: int) -> None:
        """Remove sequence ``seq_id``'s KV at positions [p0, p1) from every layer (llama_memory_seq_rm).

        The remaining cells keep their positions (their keys were rotated when written).
        """
        import llama_cpp

        if not llama_cpp.llama_memory_seq_rm(self._memory(), seq_id, p0, p1):
            raise LlamatierError(
                f"llama.cpp refused to remove positions [{p0}, {p1}) of sequence {seq_id} "
                "(this model's memory cannot drop part of a sequence)"
            )

    def copy_positions(self, src_seq: int, dst_seq: int, p0: int = -1, p1: int = -1) -> None:
        """Add ``dst_seq`` to the cells of ``src_seq`` at positions [p0, p1) (-1: open end; llama_memory_seq_cp).

        In a unified KV cache this tags cells only: no KV data is copied.
        """
        import llama_cpp

        llama_cpp.llama_memory_seq_cp(self._memory(), src_seq, dst_seq, p0, p1)

    def seq_pos_max(self, seq_id: int = 0) -> int:
        """The largest position sequence ``seq_id`` holds (-1 when empty)."""
        import llama_cpp

        return int(llama_cpp.llama_memory_seq_pos_max(self._memory(), seq_id))

    def sequence_state(self, seq_id: int = 0) -> bytes:
        """Sequence ``seq_id``'s KV cache and positions, serialised by llama.cpp (llama_state_seq_get_data)."""
        import llama_cpp

        n = int(llama_cpp.llama_state_seq_get_size(self.ptr, seq_id))
        buf = (ctypes.c_uint8 * n)()
        written = int(llama_cpp.llama_state_seq_get_data(self.ptr, buf, n, seq_id))
        return bytes(buf[:written])

    def load_sequence_state(self, state: bytes, seq_id: int = 0) -> None:
        """Restore a :meth:`sequence_state` (from a context with the same model and settings) into ``seq_id``."""
        import llama_cpp

        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        mark = _log_mark()
        if int(llama_cpp.llama_state_seq_set_data(self.ptr, buf, len(state), seq_id)) != len(state):
            raise LlamatierError(
                f"llama.cpp could not restore a sequence state: {last_log_error(mark) or 'no detail'}"
            )

    def set_sampler(self, *, temperature: float, top_k: int, seed: int) -> None:
        import llama_cpp

        sp = llama_cpp.llama_sampler_chain_default_params()
        chain = llama_cpp.llama_sampler_chain_init(sp)
        if temperature <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(top_k))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(temperature))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        self._sampler = chain

    def sample(self) -> int:
        import llama_cpp

        if self._sampler is None:
            self.set_sampler(temperature=0.0, top_k=1, seed=0)
        return int(llama_cpp.llama_sampler_sample(self._sampler, self.ptr, -1))

    def perf(self) -> dict[str, float]:
        import llama_cpp

        d = llama_cpp.llama_perf_context(self.ptr)
        return {
            "t_p_eval_ms": float(d.t_p_eval_ms),
            "t_eval_ms": float(d.t_eval_ms),
            "n_p_eval": int(d.n_p_eval),
            "n_eval": int(d.n_eval),
        }

    def n_ctx(self) -> int:
        import llama_cpp

        return int(llama_cpp.llama_n_ctx(self.ptr))

    def close(self) -> None:
        import llama_cpp

        if self._sampler is not None:
            llama_cpp.llama_sampler_free(self._sampler)
            self._sampler = None
        if getattr(self, "batch", None) is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ptr", None):
            llama_cpp.llama_free(self.ptr)
            self.ptr = None

    def __enter__(self) -> LlamaContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
