"""Thread counts of BLAS and numba, limited around a block of code; the loaded libraries inspected once per process.

``threadpoolctl.threadpool_limits`` scans the process's loaded libraries on every call (about 3 ms), which
costs more than the small products of a per-block task. ``blas_limit`` keeps one ``ThreadpoolController``.
Limiting BLAS beside numba's parallel kernels also matters for speed: on two cores, OpenBLAS's idle threads
and numba's OpenMP threads spin against each other between alternating calls (measured: a 2048-row sparse
product plus a 2048 x 50 Gram matrix 20 ms per pair unlimited, 0.6 ms with BLAS on one thread).
"""

from __future__ import annotations

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


def on_one_thread(fn, *args):
    """``fn(*args)`` with numba and BLAS on one thread each, both restored after: for a task on a worker thread,
    which runs one piece of work (more threads would spin against the other workers' threads), and for sums
    that must round the same in any process (a multi-threaded gemm splits its sums by thread count)."""
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with blas_limit(1):
            return fn(*args)
    finally:
        numba.set_num_threads(before)
