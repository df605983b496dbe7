"""Weight repacking (llama.cpp's CPU "extra buffer types"): on or off, and why.

At load time llama.cpp copies eligible weights into CPU extra buffer types
(``CPU_REPACK``: interleaved layouts for the AVX2/AVX512/NEON kernels; ``AMX``:
Intel AMX tiles) unless the model parameter ``use_extra_bufts`` is false (its
tools' ``--no-repack``). On some Intel Xeons with AMX a native build segfaults
in the first ``llama_decode`` with the AMX buffer (llama.cpp issues 20824 and
11115, PR 26954: tile-data permission requested on one thread only), and
repacking crashed elsewhere too (llama.cpp issue 16479, q4_0 on an AVX2 CPU).
A segfault cannot be caught inside the process, so the setting is decided
before a model is loaded, in this order:

1. the caller's explicit choice (the CLI's ``--no-repack``/``--repack``);
2. the environment variable ``LLAMATIER_NO_REPACK`` (1: off, 0: on);
3. a build without extra buffer types: nothing to decide;
4. the cached verdict for this llama.cpp build, CPU, kernel, model tensor
   layout (types and shapes), thread count and GPU layers;
5. else a probe: a child process loads the model with extra buffer types and
   decodes a 40-token batch and two single tokens. A child killed by
   SIGSEGV/SIGBUS/SIGILL/SIGFPE/SIGABRT is a crash verdict (repack off, with a
   one-line notice); a clean run is an ok verdict (repack on). Both are cached.
   A supervised run that crashes with repacking on also records a crash verdict.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamatier.cachedir import cache_dir
from llamatier.errors import LlamatierError
from llamatier.outpaths import atomic_write_bytes

ENV_VAR = "LLAMATIER_NO_REPACK"
VERDICTS_FILE = "repack-verdicts.json"
CRASH_SIGNALS = tuple(
    int(getattr(signal, n)) for n in ("SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT") if hasattr(signal, n)
)
PROBE_TIMEOUT_S = 900.0  # a large model's load (and repack) can take minutes
PROBE_MODULE = "llamatier.engines.llamacpp.probe"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class RepackDecision:
    """The ``use_extra_bufts`` a model is loaded with, and why."""

    use_extra_bufts: bool
    source: str  # option | env | probe | cached probe | earlier crash | no extra buffer types
    reason: str  # one phrase, for meta.json, inspect and notices
    extra_buffer_types: tuple[str, ...] = ()  # the build's CPU extra buffer types (e.g. CPU_REPACK, AMX)
    key: str | None = None  # the probe-cache key, when a probe verdict applies

    def to_meta(self, model_buffers_mib: dict[str, float] | None = None) -> dict[str, Any]:
        """The ``engine.repack`` record of a trace's meta.json."""
        d: dict[str, Any] = {
            "use_extra_bufts": self.use_extra_bufts,
            "source": self.source,
            "reason": self.reason,
            "extra_buffer_types": list(self.extra_buffer_types),
        }
        if model_buffers_mib is not None:
            d["model_buffers_mib"] = dict(model_buffers_mib)
        return d


@dataclass(frozen=True)
class ProbeResult:
    verdict: str  # ok | crash | inconclusive
    detail: str  # e.g. "SIGSEGV", "exit 1: ...", "timed out after 900 s"
    model_buffers_mib: dict[str, float] | None = None


def notice(message: str) -> None:
    """Tell the user about an automatic choice: one line on stderr."""
    sys.stderr.write(f"note: {message}\n")
    sys.stderr.flush()


def env_setting() -> bool | None:
    """``use_extra_bufts`` forced by ``LLAMATIER_NO_REPACK`` (None when unset or empty)."""
    raw = os.environ.get(ENV_VAR, "").strip().lower()
    if not raw:
        return None
    if raw in _TRUE:
        return False
    if raw in _FALSE:
        return True
    raise LlamatierError(
        f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not understood: set 1 to load models without weight "
        "repacking, 0 to force repacking, or unset it to let llamatier probe this machine"
    )


# -- facts that decide whether a probe's verdict still applies --------------------------------


def extra_buffer_types() -> tuple[str, ...]:
    """Names of the CPU backend's extra buffer types in the loaded llama.cpp (e.g. CPU_REPACK, AMX)."""
    import ctypes

    import llama_cpp

    lib = llama_cpp.llama_cpp._lib  # the handle llama.cpp itself uses (one ggml instance)
    llama_cpp.llama_backend_init()
    vp = ctypes.c_void_p
    lib.ggml_backend_dev_by_type.restype, lib.ggml_backend_dev_by_type.argtypes = vp, [ctypes.c_int]
    lib.ggml_backend_dev_backend_reg.restype, lib.ggml_backend_dev_backend_reg.argtypes = vp, [vp]
    lib.ggml_backend_reg_get_proc_address.restype = vp
    lib.ggml_backend_reg_get_proc_address.argtypes = [vp, ctypes.c_char_p]
    lib.ggml_backend_buft_name.restype, lib.ggml_backend_buft_name.argtypes = ctypes.c_char_p, [vp]
    dev = lib.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    if not dev:
        return ()
    fn = lib.ggml_backend_reg_get_proc_address(lib.ggml_backend_dev_backend_reg(dev),
                                               b"ggml_backend_dev_get_extra_bufts")
    if not fn:
        return ()
    bufts = ctypes.CFUNCTYPE(ctypes.POINTER(vp), vp)(fn)(dev)
    names: list[str] = []
    i = 0
    while bufts and bufts[i]:
        names.append(lib.ggml_backend_buft_name(bufts[i]).decode("utf-8", "replace"))
        i += 1
    return tuple(names)


@functools.cache
def _build_digest() -> str:
    """llama-cpp-python's version, path, and its native libraries' names, sizes and times (a rebuild changes them)."""
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    h = hashlib.sha256(f"{llama_cpp.__version__}|{lib_dir}".encode())
    for f in sorted(lib_dir.glob("*")):
        try:
            st = f.stat()
        except OSError:
            continue
        h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


@functools.cache
def _cpu_identity() -> str:
    """CPU model, its feature flags and the kernel (AMX needs kernel support: XFD, arch_prctl)."""
    model, flags = platform.processor(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip().lower()
            if key == "model name" and not model.strip():
                model = line.split(":", 1)[1].strip()
            elif key in ("flags", "features") and not flags:
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return f"{platform.machine()}|{model}|{flags}|{platform.system()} {platform.release()}"


def _tensor_layout(model_path: Path) -> str:
    """Hash of the model's weight types and shapes (what decides which weights get repacked)."""
    from llamatier.gguf_header import read_gguf_header

    header = read_gguf_header(model_path)
    items = sorted({(int(t.ggml_type), tuple(int(d) for d in t.shape)) for t in header.tensors})
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]


def probe_key(model_path: str | Path, *, n_threads: int, n_gpu_layers: int = 0,
              buffer_types: Sequence[str] | None = None) -> str:
    """The cache key of a probe verdict: llama.cpp build, CPU, kernel, tensor layout, threads, GPU layers."""
    from llamatier.engines.llamacpp.session import system_info

    bufts = tuple(buffer_types) if buffer_types is not None else extra_buffer_types()
    parts = [_build_digest(), system_info(), _cpu_identity(), ",".join(bufts), _tensor_layout(Path(model_path)),
             f"threads={int(n_threads)}", f"ngl={int(n_gpu_layers)}"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


# -- the verdict cache ------------------------------------------------------------------------


def _verdicts_path() -> Path:
    return cache_dir() / VERDICTS_FILE


def load_verdicts() -> dict[str, dict[str, Any]]:
    """Cached verdicts by key ({} when there is no readable cache)."""
    try:
        data = json.loads(_verdicts_path().read_text())
    except (OSError, ValueError):
        return {}
    v = data.get("verdicts") if isinstance(data, dict) else None
    return v if isinstance(v, dict) else {}


def save_verdict(key: str, verdict: str, detail: str, **extra: Any) -> None:
    """Store a verdict (ok | crash) for ``key``; a cache that cannot be written is skipped."""
    verdicts = load_verdicts()
    verdicts[key] = {"verdict": verdict, "detail": detail,
                     "when_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), **extra}
    path = _verdicts_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps({"version": 1, "verdicts": verdicts}, indent=1).encode())
    except OSError:
        pass


def record_crash(key: str, detail: str) -> None:
    """A run with repacking on crashed: later runs with the same key load without repacking."""
    save_verdict(key, "crash", detail, source="earlier crash")


# -- the probe ----------------------------------------------------------------------------------


def probe_command(model_path: str | Path, *, n_threads: int, n_gpu_layers: int = 0) -> list[str]:
    """The child process that loads the model with extra buffer types and decodes a little."""
    return [sys.executable, "-m", PROBE_MODULE, str(model_path), "--threads", str(int(n_threads)),
            "--n-gpu-layers", str(int(n_gpu_layers))]


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def run_probe(command: Sequence[str], *, timeout_s: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Run a probe child and classify how it ended (a crash signal, a clean run, anything else)."""
    try:
        proc = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return ProbeResult("inconclusive", f"timed out after {timeout_s:.0f} s")
    except OSError as exc:
        return ProbeResult("inconclusive", f"could not start: {exc}")
    if proc.returncode < 0:
        sig = -proc.returncode
        verdict = "crash" if sig in CRASH_SIGNALS else "inconclusive"
        return ProbeResult(verdict, signal_name(sig))
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        return ProbeResult("inconclusive", f"exit {proc.returncode}: {last[:200]}")
    buffers = None
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            try:
                buffers = json.loads(line).get("model_buffers_mib")
            except ValueError:
                pass
    return ProbeResult("ok", "decoded with extra buffer types", buffers)


def _crash_reason(bufts: Sequence[str], detail: str, earlier: bool) -> str:
    what = "an earlier run" if earlier else "a test decode"
    amx = ", a known llama.cpp fault on Intel Xeons with AMX" if "AMX" in bufts else ""
    return (f"llama.cpp crashed ({detail}) in {what} with weight repacking (CPU extra buffer types "
            f"{', '.join(bufts)}) on this machine{amx}")


def decide_repack(
    model_path: str | Path,
    *,
    n_threads: int,
    n_gpu_layers: int = 0,
    requested: bool | None = None,
    command: Sequence[str] | None = None,
    notify: Callable[[str], None] = notice,
) -> RepackDecision:
    """Whether to load ``model_path`` with extra buffer types (see module docstring for the order).

    ``requested`` is the caller's explicit choice (None: decide); ``command`` replaces the
    probe child (tests use a child that segfaults).
    """
    forced = env_setting()  # checked even when overridden: a bad value is reported, not ignored
    bufts = extra_buffer_types()
    if requested is not None:
        return RepackDecision(bool(requested), "option", "forced on (--repack)" if requested
                              else "forced off (--no-repack)", bufts)
    if forced is not None:
        return RepackDecision(forced, "env", f"{ENV_VAR}={os.environ[ENV_VAR].strip()}", bufts)
    if not bufts:
        return RepackDecision(True, "no extra buffer types", "this llama.cpp build has no CPU extra buffer types")
    try:
        key = probe_key(model_path, n_threads=n_threads, n_gpu_layers=n_gpu_layers, buffer_types=bufts)
    except Exception:  # unreadable model: loading it reports the problem
        return RepackDecision(True, "probe", "not probed (model header unreadable); llama.cpp's default", bufts)
    cached = load_verdicts().get(key)
    if cached and cached.get("verdict") in ("ok", "crash"):
        source = "earlier crash" if cached.get("source") == "earlier crash" else "cached probe"
        result = ProbeResult(str(cached["verdict"]), str(cached.get("detail", "")))
    else:
        source = "probe"
        result = run_probe(command or probe_command(model_path, n_threads=n_threads, n_gpu_layers=n_gpu_layers))
        if result.verdict in ("ok", "crash"):
            save_verdict(key, result.verdict, result.detail, model=Path(model_path).name,
                         extra_buffer_types=list(bufts), n_threads=int(n_threads))
    if result.verdict == "ok":
        return RepackDecision(True, source, f"a test decode with CPU extra buffer types {', '.join(bufts)} "
                                            "passed on this machine", bufts, key)
    if result.verdict == "crash":
        reason = _crash_reason(bufts, result.detail, earlier=source == "earlier crash")
        notify(f"{reason}; loading {Path(model_path).name} without repacking (like --no-repack; "
               f"{ENV_VAR}=0 forces repacking)")
        return RepackDecision(False, source, reason, bufts, key)
    if result.detail.startswith("exit "):  # the child failed cleanly (e.g. the model does not load): no hazard seen
        return RepackDecision(True, "probe", f"probe inconclusive ({result.detail}); llama.cpp's default",
                              bufts, None)
    reason = f"the repacking probe did not finish ({result.detail})"
    notify(f"{reason}; loading {Path(model_path).name} without repacking to be safe ({ENV_VAR}=0 forces it)")
    return RepackDecision(False, "probe", reason, bufts, None)


# -- reading the record back ----------------------------------------------------------------------


def recorded_repack(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The ``engine.repack`` record of a trace's meta.json (None for traces recorded before it existed)."""
    engine = meta.get("engine")
    rec = engine.get("repack") if isinstance(engine, dict) else None
    return rec if isinstance(rec, dict) and "use_extra_bufts" in rec else None


def repack_state(meta: dict[str, Any]) -> bool:
    """Whether the trace's model was loaded with extra buffer types (unrecorded: llama.cpp's default, on)."""
    rec = recorded_repack(meta)
    return True if rec is None else bool(rec["use_extra_bufts"])


def describe_repack(meta: dict[str, Any]) -> str:
    """One phrase for reports, e.g. 'on (probe passed; CPU_REPACK holds 12.7 MiB of weights)'."""
    rec = recorded_repack(meta)
    if rec is None:
        return "on (not recorded; llama.cpp's default)"
    on, source = bool(rec["use_extra_bufts"]), str(rec.get("source", ""))
    why = {
        "probe": "probe passed" if on else "probe crashed or did not finish",
        "cached probe": "probe passed" if on else "probe crashed",
        "earlier crash": "an earlier run crashed with it",
        "no extra buffer types": "this build has no CPU extra buffer types",
    }.get(source, str(rec.get("reason", source)))
    bufts = set(rec.get("extra_buffer_types") or ())
    used = {k: v for k, v in (rec.get("model_buffers_mib") or {}).items() if k in bufts and v}
    if used:
        why += "; " + ", ".join(f"{k} holds {v:.1f} MiB of weights" for k, v in used.items())
    elif on and "model_buffers_mib" in rec and bufts:
        why += "; no weight of this model was repacked"
    return f"{'on' if on else 'off'} ({why})"
