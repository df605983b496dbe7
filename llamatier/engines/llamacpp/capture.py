"""Attention capture through llama.cpp's ``cb_eval`` hook.

Two backends with the same semantics: a small C callback (compiled on first
use with the system C compiler and cached) and a pure-Python fallback. Both
ask only for ``kq_soft_max-<layer>`` nodes and sum the probabilities per KV
cell over heads and query rows inside the callback (the tensor's buffer is
reused by ggml, so nothing is kept). After ``llama_decode`` returns,
:meth:`AttentionCapture.take` turns the sums into means per layer.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import numpy as np

from llamatier.cachedir import cache_dir

_C_SOURCE = Path(__file__).with_name("capture.c")
PREFIX = b"kq_soft_max-"


class _LtCapture(ctypes.Structure):
    _fields_ = [
        ("get_name", ctypes.c_void_p),
        ("get_data", ctypes.c_void_p),
        ("buf_is_host", ctypes.c_void_p),
        ("tensor_get", ctypes.c_void_p),
        ("n_layers", ctypes.c_int32),
        ("n_cap", ctypes.c_int32),
        ("acc", ctypes.c_void_p),
        ("rows", ctypes.c_void_p),
        ("n_kv", ctypes.c_void_p),
        ("scratch", ctypes.c_void_p),
        ("scratch_len", ctypes.c_int64),
        ("n_calls", ctypes.c_int64),
        ("reduce_s", ctypes.c_double),
        ("enabled", ctypes.c_int32),
        ("error", ctypes.c_int32),
    ]


_ERRORS = {
    1: "kq_soft_max is not f32",
    2: "n_kv exceeded the capture buffer",
    3: "layer index out of range",
    4: "scratch buffer too small",
}


def build_c_helper() -> Path | None:
    """Compile capture.c into a cached shared library; None if no C compiler works."""
    src = _C_SOURCE.read_bytes()
    digest = hashlib.sha256(src).hexdigest()[:16]
    out = cache_dir() / f"ltcapture-{digest}.so"
    if out.exists():
        return out
    cc = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        cc = "cc" if shutil.which("cc") else ("gcc" if shutil.which("gcc") else None)
    if cc is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    try:
        subprocess.run(
            [cc, "-O3", "-shared", "-fPIC", "-o", str(tmp), str(_C_SOURCE)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(tmp, out)
    except (OSError, subprocess.SubprocessError):
        tmp.unlink(missing_ok=True)
        return None
    return out


def _fn_addr(lib: ctypes.CDLL, name: str) -> int:
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value or 0


class AttentionCapture:
    """Owns the accumulation buffers and the callback passed as ``cb_eval``.

    ``backend`` is "c" (compiled helper), "python" (numpy in a Python
    callback) or "auto" (C when a compiler is available).
    """

    def __init__(self, n_layers: int, n_cap: int, backend: str = "auto") -> None:
        import llama_cpp

        self.n_layers = n_layers
        self.n_cap = n_cap
        self.acc = np.zeros((n_layers, n_cap), dtype=np.float64)
        self.rows = np.zeros(n_layers, dtype=np.float64)
        self.n_kv = np.zeros(n_layers, dtype=np.int32)
        self._scratch = np.zeros(n_cap, dtype=np.float32)
        lib = llama_cpp.llama_cpp._lib  # the handle llama.cpp itself uses (one ggml instance)
        self._lib = lib
        so = build_c_helper() if backend in ("auto", "c") else None
        if backend == "c" and so is None:
            from llamatier.errors import LlamatierError

            raise LlamatierError("cannot compile the C capture helper: install a C compiler (gcc) or use --capture python")
        self.state = _LtCapture(
            get_name=_fn_addr(lib, "ggml_get_name"),
            get_data=_fn_addr(lib, "ggml_get_data"),
            buf_is_host=_fn_addr(lib, "ggml_backend_buffer_is_host"),
            tensor_get=_fn_addr(lib, "ggml_backend_tensor_get"),
            n_layers=n_layers,
            n_cap=n_cap,
            acc=self.acc.ctypes.data,
            rows=self.rows.ctypes.data,
            n_kv=self.n_kv.ctypes.data,
            scratch=self._scratch.ctypes.data,
            scratch_len=n_cap,
            enabled=1,
        )
        if so is not None:
            self.backend = "c"
            self._clib = ctypes.CDLL(str(so))
            fn = self._clib.lt_eval_cb
            self.callback = ctypes.cast(fn, llama_cpp.ggml_backend_sched_eval_callback)
            self.user_data = ctypes.cast(ctypes.pointer(self.state), ctypes.c_void_p)
        else:
            self.backend = "python"
            self._setup_python(lib)
            self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._py_cb)
            self.user_data = ctypes.c_void_p(0)

    # -- python fallback --------------------------------------------------------
    def _setup_python(self, lib: ctypes.CDLL) -> None:
        self._get_name = lib.ggml_get_name
        self._get_name.restype = ctypes.c_char_p
        self._get_name.argtypes = [ctypes.c_void_p]
        self._get_data = lib.ggml_get_data
        self._get_data.restype = ctypes.c_void_p
        self._get_data.argtypes = [ctypes.c_void_p]

    def _py_cb(self, t: int, ask: bool, _ud: int) -> bool:
        try:
            name = self._get_name(t)
            if not name.startswith(PREFIX):
                return not ask
            if ask:
                return bool(self.state.enabled)
            layer = int(name[len(PREFIX) :])
            hdr = ctypes.cast(t, ctypes.POINTER(ctypes.c_int64 * 10)).contents  # type, buffer, ne[4], nb[4]
            ne = [hdr[2], hdr[3], hdr[4], hdr[5]]
            n = ne[0] * ne[1] * ne[2] * ne[3]
            data = self._get_data(t)
            arr = np.ctypeslib.as_array((ctypes.c_float * n).from_address(data)).reshape(-1, ne[0])
            self.acc[layer, : ne[0]] += arr.sum(axis=0, dtype=np.float64)
            self.rows[layer] += arr.shape[0]
            self.n_kv[layer] = max(int(self.n_kv[layer]), int(ne[0]))
            return True
        except KeyboardInterrupt:  # raised by the llama_decode that ran this callback, once it returns
            from llamatier.engines.llamacpp.session import note_interrupt

            note_interrupt()
            return True
        except Exception:  # never raise into ggml: it silently skips the rest of the split
            self.state.error = 99
            return True

    # -- per step ---------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self.state.enabled)

    @enabled.setter
    def enabled(self, on: bool) -> None:
        self.state.enabled = 1 if on else 0

    def take(self, n_ctx_tokens: int) -> tuple[np.ndarray, int]:
        """Return (mean mass per position float64 [n_layers, n_ctx_tokens], n_kv) and reset.

        Raises RuntimeError if a layer produced no softmax rows (capture failed).
        """
        if self.state.error:
            err = _ERRORS.get(self.state.error, f"capture error {self.state.error}")
            self.state.error = 0
            raise RuntimeError(err)
        if np.any(self.rows == 0):
            missing = np.flatnonzero(self.rows == 0).tolist()
            raise RuntimeError(f"no kq_soft_max captured for layers {missing[:6]}")
        pos = self.acc[:, :n_ctx_tokens] / self.rows[:, None]
        n_kv = int(self.n_kv.max())
        self.acc[:, : max(n_kv, n_ctx_tokens)] = 0.0
        self.rows[:] = 0.0
        self.n_kv[:] = 0
        return pos, n_kv

    def reset(self) -> None:
        self.acc[:] = 0.0
        self.rows[:] = 0.0
        self.n_kv[:] = 0
        self.state.error = 0

    @property
    def reduce_s(self) -> float:
        return float(self.state.reduce_s)
