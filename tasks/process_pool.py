"""Processing in worker processes, where a machine has cores to spare.

:func:`tasks.processing.pipeline.process` is pandas and numpy under the GIL: a flow's worker threads can't
put a second core to work on it, and while they process, the threads that fetch and parse wait.
With ``collection.processes: N`` a run hands it to N worker processes instead. The pool is forked
from a server process that imported the processing modules once, so a worker starts in
milliseconds and shares those pages. On two cores the flow's own threads, the Prefect server and
the source already keep both busy, so the default (0) processes in the run's threads; a pod with
more cores than that gains from a pool.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

_logger = logging.getLogger(__name__)
_guard = threading.Lock()


class _Running:
    pool: ProcessPoolExecutor | None = None


_running = _Running()


def start(processes: int) -> None:
    """Start ``processes`` workers now, so their start overlaps whatever the caller does next.

    Idempotent: a pool already running is kept (its size is the first caller's). 0 starts nothing.
    """
    if processes < 1:
        return
    with _guard:
        if _running.pool is not None:
            return
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["tasks.processing.pipeline"])
        _running.pool = ProcessPoolExecutor(max_workers=processes, mp_context=context)
        for _ in range(processes):  # the workers fork now, not on the first symbol
            _running.pool.submit(os.getpid)


def running() -> bool:
    return _running.pool is not None


def run[T](function: Callable[..., T], *args: object, **kwargs: object) -> T:
    """``function(*args, **kwargs)`` in a worker process when the pool runs, else here.

    A worker that dies (killed, out of memory) breaks the pool: this call and the rest of the run
    then process in the calling thread, slower but complete.
    """
    pool = _running.pool
    if pool is None:
        return function(*args, **kwargs)
    try:
        return pool.submit(function, *args, **kwargs).result()
    except BrokenProcessPool:
        _logger.warning("a processing worker process died: the run processes in its own threads from here")
        _discard(pool)
        return function(*args, **kwargs)


def worker_pids() -> list[int]:
    """The running workers' process ids, for operators (and the test that kills one)."""
    pool = _running.pool
    processes = getattr(pool, "_processes", None) or {}
    return sorted(processes)


def stop() -> None:
    """Stop the workers; the next :func:`start` begins a new pool."""
    with _guard:
        pool, _running.pool = _running.pool, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


atexit.register(stop)  # a run that ends without stopping its pool leaves no workers behind


def _discard(pool: ProcessPoolExecutor) -> None:
    with _guard:
        if _running.pool is pool:
            _running.pool = None
    pool.shutdown(wait=False, cancel_futures=True)
