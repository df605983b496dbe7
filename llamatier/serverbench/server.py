"""Build llama.cpp's own ``llama-server`` from the vendored source and run it on 127.0.0.1.

llama-cpp-python's source distribution carries llama.cpp under
``vendor/llama.cpp``; :func:`build_llama_server` downloads it with pip (into a
cache folder, once), configures it with CMake and builds the ``llama-server``
target (about 8 minutes on 2 cores). ``native=True`` compiles for the build
machine's CPU, as pip's own build of llama-cpp-python does (the host model is
calibrated on that build); ``native=False`` is the portable AVX2 build.

:class:`LlamaServer` starts the binary with the given arguments, waits for
``/health``, and stops it (terminate, then kill) however the run ends. Its log
goes to a file next to the results.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path
from types import TracebackType

from llamatier.errors import LlamatierError
from llamatier.serverbench.client import wait_healthy

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
HOST = "127.0.0.1"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "llamatier" / "llama.cpp"


def build_llama_server(
    cache_dir: Path | None = None,
    *,
    native: bool = True,
    targets: tuple[str, ...] = ("llama-server",),
    jobs: int = 2,
    log: Path | None = None,
) -> Path:
    """Build (once) and return the path of ``llama-server`` built from llama-cpp-python's vendored llama.cpp."""
    cache = Path(cache_dir or default_cache_dir())
    src_root = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    build = cache / ("build-native" if native else "build-portable")
    binary = build / "bin" / "llama-server"
    if binary.exists() and all((build / "bin" / t).exists() for t in targets):
        return binary
    for tool in ("cmake",):
        if shutil.which(tool) is None:
            raise LlamatierError(f"building llama-server needs {tool} on PATH: install it, or pass --llama-server PATH")
    cache.mkdir(parents=True, exist_ok=True)
    logf = open(log or cache / "build.log", "a")  # noqa: SIM115 - closed below
    try:
        src = src_root / "vendor" / "llama.cpp"
        if not src.exists():
            sdist = next(iter(sorted(cache.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"))), None)
            if sdist is None:
                _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                      f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(cache)], logf, "pip download")
                sdist = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
            with tarfile.open(sdist) as tf:
                tf.extractall(cache, filter="data")
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        _run(["cmake", "-S", str(src), "-B", str(build), *gen, f"-DGGML_NATIVE={'ON' if native else 'OFF'}",
              "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF"], logf, "cmake configure")
        _run(["cmake", "--build", str(build), "-j", str(jobs), "--target", *targets], logf, "cmake build")
    finally:
        logf.close()
    if not binary.exists():
        raise LlamatierError(f"the build finished without {binary}: see {log or cache / 'build.log'}")
    return binary


def _run(cmd: list[str], logf, what: str) -> None:  # noqa: ANN001
    logf.write(f"$ {' '.join(cmd)}\n")
    logf.flush()
    rc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        raise LlamatierError(f"{what} failed (exit {rc}): see {logf.name}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """A running llama-server (context manager): ``with LlamaServer(binary, model, args, log) as srv:``."""

    def __init__(self, binary: Path, model: Path, args: list[str], log: Path, *, ready_timeout_s: float = 120.0) -> None:
        self.binary = Path(binary)
        self.model = Path(model)
        self.args = list(args)
        self.log = Path(log)
        self.ready_timeout_s = ready_timeout_s
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def command(self) -> list[str]:
        return [str(self.binary), "-m", str(self.model), "--host", HOST, "--port", str(self.port), *self.args]

    def __enter__(self) -> LlamaServer:
        if not self.binary.exists():
            raise LlamatierError(f"llama-server not found at {self.binary}: build it (drop --llama-server) or fix the path")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._logf = open(self.log, "w")  # noqa: SIM115 - closed in __exit__
        self._logf.write(" ".join(self.command) + "\n")
        self._logf.flush()
        self.proc = subprocess.Popen(self.command, stdout=self._logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        why = wait_healthy(HOST, self.port, timeout_s=self.ready_timeout_s, alive=lambda: self.proc.poll() is None)
        if why is not None:
            self.stop()
            raise LlamatierError(f"llama-server did not come up: {why}; see {self.log}")
        return self

    def stop(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        if getattr(self, "_logf", None) is not None and not self._logf.closed:
            self._logf.close()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
