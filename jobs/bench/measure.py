"""What every benchmark measures the same way: wall time and peak resident memory of one call, in
this process and in each Dask worker, on the same embedded cluster, written out the same way.

Memory is ``VmRSS`` from ``/proc/self/status``, sampled every 10 ms by a thread (and once more at
the end), in this process and, with a client, in every worker: ``peak`` is the highest sample,
``peak - base`` the memory the call added. A spike shorter than 10 ms can be missed.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np


def _rss() -> int:
    """This process's resident set size in bytes (0 where ``/proc`` has no ``VmRSS``)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Samples this process's VmRSS every 10 ms; ``peak - base`` is the extra memory used."""

    def __init__(self) -> None:
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "PeakRSS":
        """Take the base sample and start the sampling thread."""
        self.base = self.peak = _rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss())

    def stop(self) -> int:
        """Stop sampling, take a last sample; returns ``peak - base`` in bytes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, _rss())
        return self.peak - self.base

    def __enter__(self) -> "PeakRSS":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# one sampler per worker process, started and stopped through ``client.run`` (so these two
# functions must stay importable module-level functions: the workers unpickle them by name)
_WORKER_SAMPLER: dict[str, PeakRSS] = {}


def _worker_sampler_start() -> int:
    """On a worker: start its sampler (replacing one left running); returns the base in bytes."""
    old = _WORKER_SAMPLER.pop("s", None)
    if old is not None:
        old.stop()
    _WORKER_SAMPLER["s"] = PeakRSS().start()
    return _WORKER_SAMPLER["s"].base


def _worker_sampler_stop() -> tuple[int, int]:
    """On a worker: stop its sampler; ``(base, peak)`` in bytes, ``(0, 0)`` when none was running."""
    sampler = _WORKER_SAMPLER.pop("s", None)
    if sampler is None:
        return 0, 0
    sampler.stop()
    return sampler.base, sampler.peak


@dataclass
class Timing:
    """One measured call: its result, wall seconds, and resident memory in bytes, here and per worker."""

    result: Any
    seconds: float
    base: int  # this process, at the start
    peak: int  # this process, the highest sample
    workers: dict[str, tuple[int, int]] = field(default_factory=dict)  # worker address -> (base, peak)

    @property
    def extra_rss(self) -> int:
        """Memory this process added during the call."""
        return self.peak - self.base

    @property
    def worker_extra_rss(self) -> int:
        """The most memory any worker added during the call (0 without workers)."""
        return max((peak - base for base, peak in self.workers.values()), default=0)

    @property
    def worker_peaks(self) -> dict[str, int]:
        """Each worker's highest resident memory during the call."""
        return {addr: peak for addr, (_, peak) in self.workers.items()}


def timed(fn: Callable[[], Any], client: Any = None) -> Timing:
    """Call ``fn()`` once: its wall time and peak RSS here and, given a ``distributed.Client``, on
    every worker (the samplers start before the clock and stop after it)."""
    if client is not None:
        client.run(_worker_sampler_start)
    try:
        with PeakRSS() as mem:
            t = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - t
    finally:
        workers = client.run(_worker_sampler_stop) if client is not None else {}
    return Timing(out, seconds, mem.base, mem.peak, workers)


@contextmanager
def local_client(n_workers: int = 2) -> Iterator[Any]:
    """The benchmarks' embedded cluster: ``n_workers`` processes x 1 thread on 127.0.0.1, no dashboard,
    BLAS/OpenMP/numba pinned to the worker's thread (``pipeline.cluster.get_client``); closed on exit."""
    from mfsim.pipeline.cluster import get_client
    from mfsim.pipeline.config import ClusterSection

    with get_client(ClusterSection(n_workers=n_workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None)) as client:
        yield client


def write_json(path: str | Path, numbers: dict) -> None:
    """Write a benchmark's returned numbers as JSON: arrays as lists, numpy scalars as numbers, the rest as text."""

    def default(obj: Any) -> Any:
        if isinstance(obj, (np.ndarray, np.generic)):
            return obj.tolist()
        return str(obj)

    Path(path).write_text(json.dumps(numbers, indent=1, default=default))
