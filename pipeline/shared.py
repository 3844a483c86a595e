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
"""

from __future__ import annotations

import uuid
import warnings
from typing import Any

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
