"""Where sweep cells run: a small executor interface and the built-ins.

A sweep executor takes a pure function and the cells, runs them wherever it
likes, and yields ``(index, result)`` as each cell finishes (in any order).
Because ``run_cell`` depends only on its cell, the rows are the same whatever
runs them. Built-ins: ``serial`` (this process, one cell after another),
``processes`` (a pool of local worker processes; also called ``local``) and
``dask`` (a Dask cluster, :mod:`llamatier.sweep.cluster`). Others (a batch
queue) register in :data:`llamatier.registry.EXECUTORS` or through the
``llamatier.executors`` entry-point group, and ``llamatier sweep --executor
NAME[:TARGET]`` picks them (TARGET, e.g. a scheduler address, goes to the
executor's ``address`` parameter).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any, ClassVar

from llamatier.errors import LlamatierError
from llamatier.registry import EXECUTORS


def default_jobs() -> int:
    """Worker processes by default: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class SweepExecutor(ABC):
    """Runs a function over cells; ``jobs`` is the parallelism asked for (None: the executor's default)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def __init__(self, jobs: int | None = None) -> None:
        self.jobs = jobs

    @abstractmethod
    def run(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, fn(items[index]))`` for every item, each as soon as it is done."""


@EXECUTORS.register
class SerialExecutor(SweepExecutor):
    """Every cell in this process, in order."""

    name = "serial"
    summary = "this process, one cell after another"

    def run(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        for i, item in enumerate(items):
            yield i, fn(item)


class FuturesExecutor(SweepExecutor):
    """Cells submitted to a ``concurrent.futures.Executor`` (used as given, never shut down here)."""

    name = "futures"
    summary = "any concurrent.futures executor"

    def __init__(self, executor: Executor) -> None:
        super().__init__(None)
        self.executor = executor

    def run(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        futures = {self.executor.submit(fn, item): i for i, item in enumerate(items)}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()


@EXECUTORS.register
class ProcessExecutor(SweepExecutor):
    """A pool of local worker processes (``jobs`` of them; default: usable cores).

    Workers start through forkserver (polars and llama.cpp hold threads that
    fork would copy mid-lock), so a script that uses it needs the usual
    ``if __name__ == "__main__":`` guard. Workers ignore Ctrl-C (a terminal
    sends it to the whole process group, and a worker hit while importing
    printed a traceback): the parent alone handles it, terminates the workers
    and keeps the finished rows.
    """

    name = "processes"
    summary = "local worker processes (--jobs of them)"

    def run(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        workers = min(self.jobs or default_jobs(), max(len(items), 1))
        if workers <= 1:  # one worker: run here, no process to start
            yield from SerialExecutor().run(fn, items)
            return
        # forkserver: workers do not inherit the parent's threads (the progress bar's) or llama.cpp state
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        if method == "forkserver":
            start_forkserver_without_sigint()
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        try:
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
        except BrokenProcessPool:
            raise LlamatierError(
                "a sweep worker process died before finishing its cell: in a script, call run_cells under "
                "`if __name__ == '__main__':` (workers re-import the main module), or run with jobs=1"
            ) from None
        except KeyboardInterrupt:
            # Terminate first, cancel nothing: the pool then fails every unfinished cell itself. (Python
            # 3.11's pool raises InvalidStateError in its own thread, a traceback on stderr, when it
            # fails a cell that was cancelled a moment before.)
            _stop_workers(pool)
            pool.shutdown(wait=True)
            raise
        finally:
            pool.shutdown(cancel_futures=True)


def start_forkserver_without_sigint() -> None:
    """Start the forkserver with SIGINT ignored, so that sweep workers never see Ctrl-C.

    An ignored signal stays ignored across fork and exec (Python then installs no
    KeyboardInterrupt handler), so the forkserver and every worker it forks ignore SIGINT.
    SIGINT is blocked meanwhile, so a Ctrl-C in that moment is delivered here once the
    handler is back (Linux keeps a blocked signal pending even while ignored).
    """
    from multiprocessing import forkserver

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        forkserver.ensure_running()  # only the main thread may change signal handlers
        return
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    old_handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, old_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate a process pool's workers (they ignore Ctrl-C; running cells are abandoned)."""
    processes = getattr(pool, "_processes", None) or {}
    for proc in list(processes.values()):
        if proc.is_alive():
            proc.terminate()


EXECUTORS.alias("local", "processes", deprecated=False)


def executor_spec(spec: str) -> tuple[str, str | None]:
    """``NAME`` or ``NAME:TARGET`` (``dask:tcp://host:8786``) -> (registered name, target or None)."""
    name, sep, target = str(spec).partition(":")
    return EXECUTORS.canonical(name), (target.strip() or None) if sep else None


def make_executor(spec: str, jobs: int | None = None) -> SweepExecutor:
    """The executor ``spec`` names, for ``jobs`` workers; a target it cannot take is one error."""
    name, target = executor_spec(spec)
    if target is None:
        return EXECUTORS.create(name, jobs=jobs)
    cls = EXECUTORS.get(name)
    if not getattr(cls, "uses_address", False):
        raise LlamatierError(f"--executor {name} takes no address (got {spec!r}); e.g. --executor dask:tcp://HOST:8786")
    return EXECUTORS.create(name, jobs=jobs, address=target)

