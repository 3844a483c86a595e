"""Data that many tasks read (candidates, the SVD's Q, column factors, id maps), recoverable on worker loss.

``share(client, value)`` is the one way the pipeline hands a driver-side array to its tasks: a
future of the task ``held(value)``, whose run_spec *is* the value. Every task that reads it takes
the future as an argument, so the value travels to each worker once (workers fetch it from
whichever worker holds it, on demand) and is never re-sent per task.

Why not ``client.scatter``: scattered data has no run_spec, so the scheduler treats it as pure
data. It is forgotten as soon as the client drops its future or its last holder dies, and every
task computed from it is marked as having lost dependencies: when such a task's own result is
lost with its worker, its future is cancelled ("lost dependencies", "already forgotten") instead
of recomputed. ``broadcast=True`` adds a replication to every worker at once, which waits on a
worker that is dying (connect timeouts, retried) and raises ``CommClosedError`` when it died
mid-transfer. A ``held`` task is recomputed like any other task: from its run_spec, on any live
worker. Nothing here retries or catches errors: recovery is the scheduler's, from lineage.
(The other way, keeping scatter and having each consumer re-scatter and resubmit on
``FutureCancelledError``/``CommClosedError``, was not taken: every consumer, the SVD's
iterations, the top-N windows, the P blocks kept between stages, would need its own bounded
retry loop, and the futures derived from scattered data would still have no lineage.)
``tests/pipeline/test_worker_loss.py`` SIGKILLs a real worker during the SVD and during the
neighbours stage and compares every output with a clean run's.

Data that workers compute (P = X A per row block, the union of ids) is not brought to the driver
to be shared: a task on the futures themselves (``stack``, ``IdIndex(root)`` in ingest) keeps the
lineage back to the Parquet pieces, and costs the scheduler nothing.

Cost: the scheduler holds one deserialized copy of each shared value while its future, or any
task computed from it, is wanted (then it is forgotten), and sends that copy in the task's
message when ``held`` runs (once, and again after a loss). Measured on the 2-core test machine
with a ``dask scheduler`` subprocess and 2 workers, a 64 MiB float32 array read by one task on
each worker: the scheduler's RSS went from 60 to 124 MiB while the shared future was held (one
copy) and back to 60 MiB after its release (a scatter: 60 MiB throughout); either way the array
was on both workers in 0.3-0.8 s. What a run shares: the SVD's Q, p x l float32, one iteration's
at a time; per neighbour list group A, B or their projection, p x k float32; p float64 column
factors; p int64 column maps. The largest for ``conf/paper.yaml`` is Q, 240 KB; for
``mfsim bench svd`` (p = 200,000, l = 74) 59 MB. Values above
``distributed.admin.large-graph-warning-threshold`` (10 MB by default) are shared with that
warning silenced: one large task, sent once, is the point here, not a graph built by mistake.

Here or on the cluster: ``runner(client)`` is the one way code that runs in process and on a Dask client
says where a call runs. It gives ``HERE`` (no client: every call runs at once in this process, a "shared"
value is the value itself, a gathered value is itself) or an ``OnCluster`` (each call a task, ``pure=False``; values
shared with ``share``; results gathered), with the same methods, chosen once where the client is known;
``runner_of(*args)`` chooses by the arguments (beside the first future among them, else here; ``beside(fn,
*args)`` runs one call so, ``value`` reads what it gave). ``is_future`` is the one test of whether a value is
a future.
"""

from __future__ import annotations

import sys
import uuid
import warnings
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any, Callable, Iterator

import numpy as np


def held(value: Any) -> Any:
    """The task behind a shared value: returns its argument (the value lives in the task's run_spec)."""
    return value


def share(client, value: Any, name: str = "value") -> Any:
    """``value`` as a future on ``client`` that the scheduler can recompute when its holder is lost.

    ``name`` labels the key (``shared-<name>-<uuid>``) on the dashboard. Numpy arrays are sent as
    they are (make them contiguous and of the dtype the tasks want before sharing). See the module
    docstring for the cost in scheduler memory.
    """
    key = f"shared-{name}-{uuid.uuid4().hex}"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
        return client.submit(held, value, key=key, pure=False)


def share_f32(client, x: np.ndarray, name: str = "array") -> Any:
    """``x`` as a contiguous float32 array, shared (candidates and queries of the top-N kernels)."""
    return share(client, np.ascontiguousarray(x, dtype=np.float32), name)


def stack(scale: np.ndarray | None, rows: np.ndarray | None, *parts: np.ndarray) -> np.ndarray:
    """``concatenate(parts)[rows] * scale`` as contiguous float32 (a task on P's row-block futures).

    ``rows`` None: every row; ``scale`` None: no column scale. O(n k) memory on the worker.
    """
    out = np.concatenate(parts, axis=0) if parts else np.zeros((0, 0), np.float32)
    if rows is not None:
        out = out[rows]
    if scale is not None:
        out = out * scale
    return np.ascontiguousarray(out, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# here or on the cluster


def is_future(x: Any) -> bool:
    """Whether ``x`` is a Dask future (``distributed.Future``; nothing is, before distributed is imported)."""
    distributed = sys.modules.get("distributed")
    return distributed is not None and isinstance(x, distributed.Future)


def near(worker: str | None) -> dict[str, Any]:
    """``client.submit`` keywords that run a task on ``worker`` while it lives, on any worker after (none for None)."""
    return {"workers": [worker], "allow_other_workers": True} if worker else {}


class Here:
    """Runs every call at once in this process: ``submit`` calls, ``share`` and ``gather`` return what they get."""

    client = None
    name = "local"

    def submit(self, fn: Callable[..., Any], *args: Any, worker: str | None = None, pure: bool = False,
               **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` (``worker`` and ``pure`` are a task's placement and naming: ignored here)."""
        return fn(*args, **kwargs)

    def share(self, value: Any, name: str = "value") -> Any:
        """The value itself (nothing is sent)."""
        return value

    def share_f32(self, x: Any, name: str = "array") -> Any:
        """``x`` as a contiguous float32 array, as ``share_f32`` makes it (no copy when it already is one)."""
        return np.ascontiguousarray(x, dtype=np.float32)

    def gather(self, x: Any) -> Any:
        """``x`` itself (a value, or a list of values)."""
        return x

    def holders(self, values: list) -> list[str | None]:
        """Where each value lives: None (this process) for each."""
        return [None] * len(values)


HERE = Here()


class OnCluster:
    """Runs every call as a task on ``client``: ``submit`` returns a future, ``share`` shares (``share``), ``gather``
    brings values to this process."""

    name = "dask"

    def __init__(self, client):
        self.client = client

    def submit(self, fn: Callable[..., Any], *args: Any, worker: str | None = None, pure: bool = False,
               **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` as a task (``pure=False`` unless asked: a fresh key per call), on ``worker``
        while it lives (``near``); its arguments may be futures."""
        at_once = _SENT_AT_ONCE.get() if worker is None else None
        placed = {"workers": at_once, "allow_other_workers": True} if at_once else near(worker)
        return self.client.submit(fn, *args, pure=pure, **placed, **kwargs)

    def share(self, value: Any, name: str = "value") -> Any:
        """``share(client, value, name)``."""
        return share(self.client, value, name)

    def share_f32(self, x: Any, name: str = "array") -> Any:
        """``share_f32(client, x, name)``."""
        return share_f32(self.client, x, name)

    def gather(self, x: Any) -> Any:
        """The value of a future, or the values of a list of futures."""
        return self.client.gather(x)

    def holders(self, futures: list) -> list[str | None]:
        """Where each future's value lives once computed (waits for them): the first of its workers by address,
        None when none holds it."""
        from distributed import wait

        wait(futures)
        who = self.client.who_has(futures)
        return [min(who.get(f.key, ()), default=None) for f in futures]


#: Worker threads the job plans its concurrency for (list groups and audit lists side by side, windows of list tasks in
#: flight) in place of the client's own, inside ``planned_threads``; None: the client's.
_PLANNED_THREADS: int | None = None


def cluster_threads(client: Any) -> int:
    """The worker threads ``client``'s work is planned for: its workers' threads, or ``planned_threads``'s count."""
    return _PLANNED_THREADS if _PLANNED_THREADS else sum(client.nthreads().values())


@contextmanager
def planned_threads(threads: int | None) -> Iterator[None]:
    """Inside, the job plans its concurrency as for a cluster of ``threads`` worker threads (None: its own):
    ``bench scaling --plan-for P`` records on a small cluster the graph a P-thread cluster would be given (the same
    tasks; more of them submitted side by side). Results do not change: only when tasks are submitted does."""
    global _PLANNED_THREADS
    saved, _PLANNED_THREADS = _PLANNED_THREADS, (int(threads) if threads else None)
    try:
        yield
    finally:
        _PLANNED_THREADS = saved


#: Workers that tasks submitted from this thread without a worker are sent to at once (``task_priority``); None: the
#: scheduler's choice of when.
_SENT_AT_ONCE: ContextVar[list[str] | None] = ContextVar("mfsim_sent_at_once", default=None)


@contextmanager
def task_priority(priority: int, workers: list[str] | None = None) -> Iterator[None]:
    """Tasks submitted to a client from this thread inside get Dask's ``priority`` (of the tasks ready on a worker
    the higher runs first; 0 by default); nested, the innermost wins. Order only: results do not change.

    ``workers`` (the client's: ``worker_addresses``): the tasks (those ``OnCluster.submit`` places nowhere) go to a
    worker at once, chosen by the scheduler among them as for any task (where their inputs are); None: when the
    scheduler chooses. The scheduler holds back a task it takes for a graph's root (one of a group of many tasks
    with few inputs, such as each list's rescaled factors) while every worker has tasks queued, and such a task
    waits behind all of them, whatever its priority; on a worker's queue it runs next."""
    import dask

    token = _SENT_AT_ONCE.set(list(workers) if workers else None)
    try:
        with dask.annotate(priority=int(priority)):
            yield
    finally:
        _SENT_AT_ONCE.reset(token)


def worker_addresses(client: Any) -> list[str] | None:
    """The addresses of ``client``'s workers (one round trip), None without a client."""
    return None if client is None else sorted(client.scheduler_info()["workers"])


#: The priority of the top-N range tasks submitted from this thread (``range_priority``); None: their caller's.
_RANGE_PRIORITY: ContextVar[int | None] = ContextVar("mfsim_range_priority", default=None)


@contextmanager
def range_priority(priority: int) -> Iterator[None]:
    """Inside, the top-N range tasks ``lists.neighbours.run_topn`` submits from this thread get ``priority``, over any
    ``task_priority`` around them: a caller running several lists side by side (the audit) runs their ranges in the
    order it takes the lists and its other, short tasks (each list's inputs) before any range."""
    token = _RANGE_PRIORITY.set(int(priority))
    try:
        yield
    finally:
        _RANGE_PRIORITY.reset(token)


def ranges_prioritized():
    """The context a range task is submitted in: ``range_priority``'s value as its priority, if one is set (and not
    sent at once: ``task_priority``'s ``workers`` are for the short tasks around the ranges)."""
    priority = _RANGE_PRIORITY.get()
    return nullcontext() if priority is None else task_priority(priority)  # placed and sent as any task


def where_of(client: Any) -> str:
    """``"driver"`` for work in this process (no client), ``"workers"`` for tasks on a client: the manifest's
    ``ran_on``."""
    return "driver" if client is None else "workers"


def runner(client) -> Here | OnCluster:
    """Where calls run: ``HERE`` without a client, else tasks on ``client``."""
    return HERE if client is None else OnCluster(client)


def runner_of(*args: Any) -> Here | OnCluster:
    """Where a call on ``args`` runs: as a task on the client of the first future among them, else here."""
    future = next((a for a in args if is_future(a)), None)
    return HERE if future is None else OnCluster(future.client)


def beside(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` where its arguments are (``runner_of``): at once here, or a task on the client of the first
    future among them, whose errors come back when its result is read (``value``)."""
    return runner_of(*args).submit(fn, *args)


def value(x: Any) -> Any:
    """The value of ``x``: a future's result, anything else as it is."""
    return x.result() if is_future(x) else x
