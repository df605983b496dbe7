"""The console entry point: commands that run llama.cpp run in a supervised child process.

A crash in native code (a segfault in llama.cpp) cannot be handled inside the
process that crashed. So ``trace``, ``demo`` and ``quality`` re-run the same
command line in a child process (the command's own output, progress bar and
exit code pass through unchanged) while this small parent, which imports
nothing heavy (start-up cost: one extra interpreter, tens of milliseconds),
waits. If the child dies of a signal, the parent prints one line naming the
likely cause and the workaround, marks an unfinished trace's meta.json with
the reason, and points at the crash log where faulthandler wrote the
tracebacks (:mod:`llamatier.crashlog`).

Signals: Ctrl-C reaches parent and child together; the parent forwards
SIGINT/SIGTERM only when the child did not get them itself (the child reports
each signal it receives through a pipe set as its wakeup fd), so a trace is
interrupted exactly once (one line, exit 130, trace marked interrupted). If the
parent is killed, the child is killed with it (Linux).

``LLAMATIER_SUPERVISE=0`` runs every command in one process (e.g. under a debugger).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llamatier import crashlog
from llamatier.cachedir import cache_dir

SUPERVISED_COMMANDS = frozenset({"trace", "demo", "quality"})
ENV_CHILD = "LLAMATIER_SUPERVISED"
ENV_SIGNAL_FD = "LLAMATIER_SIGNAL_FD"
ENV_DISABLE = "LLAMATIER_SUPERVISE"
FORWARD_AFTER_S = 0.2  # a signal the child has not reported by then was sent to the parent alone
_PR_SET_PDEATHSIG = 1


def main() -> None:
    """Console-script entry point (``llamatier`` and ``python -m llamatier``).

    A Ctrl-C while the CLI is still importing (half a second of numpy, polars, rich ...)
    stops with the same one line as one during a command.
    """
    try:
        if os.environ.get(ENV_CHILD):
            _start_child()
        elif _wants_supervision(sys.argv[1:]):
            sys.exit(supervise())
        from llamatier.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt:
        from llamatier.errors import INTERRUPTED

        sys.stderr.write(INTERRUPTED + "\n")
        sys.exit(130)


def _wants_supervision(args: list[str]) -> bool:
    return (
        os.name == "posix"
        and os.environ.get(ENV_DISABLE, "1").strip() != "0"
        and bool(args)
        and args[0] in SUPERVISED_COMMANDS
        and not any(a in ("--help", "-h") for a in args[1:])
    )


def _start_child() -> None:
    """In the supervised child: faulthandler to the crash log, signals reported to the parent."""
    os.environ.pop(ENV_CHILD, None)
    log = os.environ.pop(crashlog.ENV_LOG, None)
    fd = os.environ.pop(ENV_SIGNAL_FD, None)
    if log:
        crashlog.start(log)
    if fd:
        try:
            os.set_blocking(int(fd), False)
            signal.set_wakeup_fd(int(fd), warn_on_full_buffer=False)
        except (OSError, ValueError):
            pass


def _crash_log_path(command: str) -> Path | None:
    folder = cache_dir() / "crash-logs"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{command}-{os.getpid()}.log"


def _die_with_parent_hook() -> Any:
    """A preexec_fn that has the kernel kill the child when this process dies (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None).prctl  # resolved before the fork: the hook only makes the call
    except (OSError, AttributeError):
        return None

    def hook() -> None:  # pragma: no cover - runs in the forked child before exec
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))

    return hook


def supervise() -> int:
    """Run this process's own command line again as a child; return the exit code to use."""
    log = _crash_log_path(sys.argv[1])
    r, w = os.pipe()
    os.set_blocking(r, False)
    env = dict(os.environ, **{ENV_CHILD: "1", ENV_SIGNAL_FD: str(w)})
    if log is not None:
        env[crashlog.ENV_LOG] = str(log)
    sys.stdout.flush()
    sys.stderr.flush()
    pending: dict[int, float] = {}  # signals the parent got and may have to forward

    def on_signal(signum: int, _frame: Any) -> None:
        pending.setdefault(signum, time.monotonic())

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    proc = subprocess.Popen([sys.executable, *sys.orig_argv[1:]], env=env, pass_fds=(w,),
                            preexec_fn=_die_with_parent_hook())
    os.close(w)
    _wait(proc, r, pending)
    rc = proc.returncode
    if rc >= 0:
        if log is not None:
            log.unlink(missing_ok=True)
        return rc
    return report_death(-rc, log)


def _wait(proc: subprocess.Popen, r: int, pending: dict[int, float]) -> None:
    """Wait for the child, forwarding the parent's signals the child did not receive itself.

    Sleeps in select() on: the child's signal reports (``r``), this process's own signal
    wakeups, and (Linux) a pidfd that becomes readable when the child exits.
    """
    own_r, own_w = os.pipe()
    for fd in (own_r, own_w):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(own_w, warn_on_full_buffer=False)
    try:
        pidfd = os.pidfd_open(proc.pid) if hasattr(os, "pidfd_open") else None
    except OSError:
        pidfd = None
    fds = [r, own_r] + ([pidfd] if pidfd is not None else [])
    child_got: dict[int, float] = {}
    while proc.poll() is None:
        timeout = 0.05 if pending or pidfd is None else None
        ready = select.select(fds, [], [], timeout)[0]
        now = time.monotonic()
        for fd in ready:
            if fd == pidfd:
                continue
            try:
                data = os.read(fd, 256)
            except BlockingIOError:
                continue
            if fd == r:
                if not data:  # the child closed it: it is exiting
                    fds.remove(r)
                for b in data:
                    child_got[b] = now
        for signum, t in list(pending.items()):
            if now - child_got.get(signum, -1e9) < 1.0:
                del pending[signum]
                child_got.pop(signum, None)
            elif now - t >= FORWARD_AFTER_S:
                del pending[signum]
                try:
                    proc.send_signal(signum)
                except ProcessLookupError:
                    pass
    signal.set_wakeup_fd(-1)
    for fd in (r, own_r, own_w, pidfd):
        if fd is not None:
            os.close(fd)


def _mark_trace(trace_dir: str | None, error: str) -> tuple[str, int] | None:
    """Record ``error`` in an unfinished trace's meta.json; (dir, completed steps) or None."""
    if not trace_dir:
        return None
    meta_path = Path(trace_dir) / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("complete"):
        return None
    meta.update(complete=False, error=error)
    from llamatier.errors import LlamatierError
    from llamatier.outpaths import atomic_write_bytes
    from llamatier.trace.writer import meta_json_bytes

    try:  # sealed with a fresh meta_sha256, as the writer would have left it
        atomic_write_bytes(meta_path, meta_json_bytes(meta))
    except (OSError, LlamatierError):
        pass
    return trace_dir, int(meta.get("n_steps", 0))


def crash_message(signum: int, notes: dict[str, Any]) -> tuple[str, str]:
    """(cause, workaround) for a child that died of ``signum``, from the crash log's notes."""
    from llamatier.engines.llamacpp.repack import CRASH_SIGNALS, ENV_VAR, signal_name

    name = signal_name(signum)
    if signum == signal.SIGKILL:
        return (f"the command was killed ({name}), perhaps by the system's out-of-memory killer",
                "free memory, or use a smaller model, --ctx or --n-predict")
    if signum not in CRASH_SIGNALS:
        return f"the command died of {name}", "run it again"
    bufts = notes.get("extra_buffer_types") or []
    if "llama_cpp_model" not in notes:
        return (f"llamatier crashed in native code ({name}) before loading a model",
                "run it again; if it persists, report it with the crash log")
    if notes.get("repack") and bufts:
        amx = ", a known llama.cpp fault on Intel Xeons with AMX" if "AMX" in bufts else ""
        cause = (f"llama.cpp crashed in native code ({name}) with CPU weight repacking on (extra buffer types "
                 f"{', '.join(bufts)}){amx}")
        if notes.get("repack_source") in ("probe", "cached probe"):
            return cause, (f"run the command again: this machine now loads this model without repacking "
                           f"(or pass --no-repack, or set {ENV_VAR}=1)")
        return cause, f"run it again with --no-repack (or {ENV_VAR}=1)"
    setting = "with weight repacking off" if bufts else "(this llama.cpp build has no CPU weight repacking)"
    return (f"llama.cpp crashed in native code ({name}) {setting}",
            "a llama.cpp fault with this model, build or CPU: try a portable build (CMAKE_ARGS=-DGGML_NATIVE=OFF "
            "pip install --no-cache-dir --force-reinstall llama-cpp-python==0.3.36) and report it with the crash log")


def report_death(signum: int, log: Path | None) -> int:
    """Explain a child that died of ``signum`` in one line on stderr; the exit code (128 + signal)."""
    if signum == signal.SIGINT:  # the child already said it was interrupted
        return 130
    if signum == signal.SIGTERM:
        sys.stderr.write("error: stopped by SIGTERM before the command finished: run it again to complete it\n")
        return 128 + signum
    from llamatier.engines.llamacpp.repack import CRASH_SIGNALS, record_crash, signal_name

    notes = crashlog.read_notes(log) if log is not None else {}
    cause, fix = crash_message(signum, notes)
    if log is not None:
        try:
            with log.open("a") as fh:
                fh.write(f"llamatier: the command died of {signal_name(signum)} at {time.strftime('%H:%M:%S')}\n")
        except OSError:
            pass
    details = f"details in {log}" if log is not None and log.exists() else "no crash log could be written"
    trace = _mark_trace(notes.get("trace_dir"), f"{cause}; {details}")
    if signum in CRASH_SIGNALS and notes.get("repack") and notes.get("repack_key"):
        record_crash(notes["repack_key"], signal_name(signum))
    parts = [cause, fix]
    if trace is not None:
        parts.append(f"the trace in {trace[0]} keeps its {trace[1]} completed steps and is marked incomplete")
    parts.append(details)
    if sys.stdout.isatty():  # the child may have died inside a progress display: cursor back, new line
        sys.stdout.write("\x1b[?25h\n")
        sys.stdout.flush()
    sys.stderr.write("error: " + "; ".join(parts) + "\n")
    return 128 + signum
