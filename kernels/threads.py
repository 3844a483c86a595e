"""Thread counts of BLAS and numba, set around one call: the thread policies of every task and kernel.

``threads(numba=, blas=)`` is the one mechanism: numba's thread count (for the calling thread) and BLAS's (for
the process) set for the duration of a block, both restored after; the named policies below are the calls that
use it. ``on_one_thread`` runs a call with numba and BLAS on one thread each, ``one_thread`` makes a function do
so, ``on_worker`` runs a call with numba on as many threads as its Dask worker has (BLAS left as it is).

``threadpoolctl.threadpool_limits`` scans the process's loaded libraries on every call (about 3 ms), which
costs more than the small products of a per-block task. ``blas_limit`` keeps one ``ThreadpoolController``.
Limiting BLAS beside numba's parallel kernels also matters for speed: on two cores, OpenBLAS's idle threads
and numba's OpenMP threads spin against each other between alternating calls (measured: a 2048-row sparse
product plus a 2048 x 50 Gram matrix 20 ms per pair unlimited, 0.6 ms with BLAS on one thread).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Callable

import scipy.linalg  # noqa: F401  (loads SciPy's BLAS before the libraries are inspected)
from threadpoolctl import ThreadpoolController

_CONTROLLER: ThreadpoolController | None = None


def blas_controller() -> ThreadpoolController:
    """The process's ``ThreadpoolController``, made on first use."""
    global _CONTROLLER
    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER


def blas_limit(n_threads: int):
    """Context limiting BLAS to ``n_threads`` threads, restored on exit."""
    return blas_controller().limit(limits=int(n_threads), user_api="blas")


@contextmanager
def threads(*, numba: int | None = None, blas: int | None = None) -> Iterator[None]:
    """numba on ``numba`` threads (for the calling thread only: ``numba.set_num_threads``) and BLAS on ``blas``
    (``blas_limit``) inside the block, both restored after; None leaves that one as it is."""
    if numba is None:
        with blas_limit(blas) if blas is not None else nullcontext():
            yield
        return
    import numba as nb

    before = nb.get_num_threads()
    nb.set_num_threads(int(numba))
    try:
        with blas_limit(blas) if blas is not None else nullcontext():
            yield
    finally:
        nb.set_num_threads(before)


def on_one_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with numba and BLAS on one thread each, both restored after: for a task on a worker
    thread, which runs one piece of work (more threads would spin against the other workers' threads), and for sums
    that must round the same in any process (a multi-threaded gemm splits its sums by thread count)."""
    with threads(numba=1, blas=1):
        return fn(*args, **kwargs)


def one_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run by ``on_one_thread`` (a decorator; the result keeps ``fn``'s name, so Dask names its tasks
    after ``fn``, and pickles by reference as ``fn`` did)."""
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return on_one_thread(fn, *args, **kwargs)
    return wrapped


def worker_threads() -> int | None:
    """The thread count of the Dask worker running the calling task; None outside a worker (and without importing
    distributed where nothing has: no worker runs in such a process)."""
    if "distributed" not in sys.modules:
        return None
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except ValueError:  # not in a worker
        return None


def on_worker(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` inside a Dask task, with numba using as many threads as the worker has (outside a
    worker: the call as it is).

    A worker with t threads runs t tasks at once; numba's pool (sized at import, often to every
    core, e.g. when the worker process imported numba before its environment was set) would
    otherwise run t x cores threads. ``numba.set_num_threads`` applies to the calling thread
    only, and is restored afterwards.
    """
    n = worker_threads()
    if n is None:
        return fn(*args, **kwargs)
    import numba

    with threads(numba=max(1, min(n, numba.config.NUMBA_NUM_THREADS))):
        return fn(*args, **kwargs)


def on_local_threads(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with numba on every thread of its pool and BLAS on one: for work in the driver that a
    worker would run ``on_one_thread``, whose numba kernels split only rows or column panels (each sum on one
    thread, so the same bits on any thread count) and whose BLAS products stay on one thread (a threaded gemm may
    split its sums)."""
    import numba

    with threads(numba=numba.config.NUMBA_NUM_THREADS, blas=1):
        return fn(*args, **kwargs)


def available_cores() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
