"""Shared values: futures whose task holds the data, so that the scheduler can recompute them.

Losing a worker for real is ``test_worker_loss.py``; here, what makes that possible: unlike a
scattered value, a shared one stays known to the scheduler (with its run_spec) after the client
drops it, as long as a task computed from it is wanted.
"""

from __future__ import annotations

import warnings

import numpy as np
from distributed import wait

from mfsim.pipeline.shared import share, share_f32, stack


def _state(client, key):
    return client.run_on_scheduler(lambda dask_scheduler: getattr(dask_scheduler.tasks.get(key), "state", None))


def test_a_shared_value_outlives_its_future_where_a_scattered_one_is_forgotten(client):
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    shared, scattered = share(client, x, "test"), client.scatter(x, hash=False)
    assert shared.key.startswith("shared-test-")
    from_shared = client.submit(np.sum, shared, pure=False)
    from_scattered = client.submit(np.sum, scattered, pure=False)
    wait([from_shared, from_scattered])
    keys = shared.key, scattered.key
    del shared, scattered
    for _ in range(100):  # the releases reach the scheduler asynchronously
        if _state(client, keys[1]) is None:
            break
        wait([client.submit(int, 0, pure=False)])
    assert _state(client, keys[1]) is None  # forgotten: a task computed from it cannot be recomputed
    assert _state(client, keys[0]) in ("memory", "released")  # kept with its run_spec: recomputable
    assert from_shared.result() == from_scattered.result() == x.sum()


def test_share_f32_sends_contiguous_float32_without_a_large_graph_warning(client):
    x = np.ones((1 << 20, 6), np.float64)[:, ::2]  # 12 MiB as float32 after the cast, not contiguous
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = share_f32(client, x).result()
    assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == x.shape


def test_stack_takes_rows_then_scales():
    parts = [np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(6, 12, dtype=np.float32).reshape(2, 3)]
    scale = np.array([1, 2, 3], np.float32)
    whole = np.concatenate(parts)
    np.testing.assert_array_equal(stack(None, None, *parts), whole)
    np.testing.assert_array_equal(stack(scale, np.array([3, 0]), *parts), whole[[3, 0]] * scale)
    assert stack(scale, None, *parts).flags.c_contiguous
