"""Shared values: futures whose task holds the data, so that the scheduler can recompute them; where calls run.

Losing a worker for real is ``test_worker_loss.py``; here, what makes that possible: unlike a
scattered value, a shared one stays known to the scheduler (with its run_spec) after the client
drops it, as long as a task computed from it is wanted.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
from distributed import wait

from mfsim.kernels.threads import on_one_thread, on_worker, threads
from mfsim.pipeline.shared import HERE, beside, is_future, near, runner, runner_of, share, share_f32, stack, value


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


# ---------------------------------------------------------------------------------------------
# here or on the cluster


class _Keyed:
    key = "not-a-future"
    client = None


def test_is_future_only_for_dask_futures(client):
    fut = client.submit(int, 1, pure=False)
    assert is_future(fut)
    assert not any(is_future(x) for x in (np.zeros(3), None, 3, _Keyed(), [fut]))


def test_here_runs_every_call_at_once_and_hands_values_back():
    run = runner(None)
    assert run is HERE and run.client is None and run.name == "local"
    x = np.arange(4.0)
    assert run.submit(np.multiply, x, 2, worker="tcp://nowhere:1", pure=True).tolist() == [0, 2, 4, 6]
    assert run.submit(np.sum, x, axis=0) == 6.0  # keywords reach the function
    assert run.share(x, "x") is x  # nothing sent
    f32 = run.share_f32(x[::2], "x")  # made what a task on a cluster reads: contiguous float32
    assert f32.dtype == np.float32 and f32.flags.c_contiguous and f32.tolist() == [0.0, 2.0]
    assert run.share_f32(f32, "x") is f32  # no copy when it already is one
    assert run.gather([x])[0] is x and run.holders([x, x]) == [None, None]
    assert runner_of(x, 2) is HERE and beside(np.sum, x) == 6.0 and value(x) is x


def test_on_cluster_runs_tasks_where_asked_and_gathers(client):
    run = runner(client)
    assert run.client is client and run.name == "dask"
    workers = sorted(client.nthreads())
    x = np.arange(6, dtype=np.float64)
    shared = run.share(x, "test")
    assert shared.key.startswith("shared-test-")
    futs = [run.submit(_worker_address, shared, worker=w) for w in workers]
    assert all(is_future(f) for f in futs) and futs[0].key != run.submit(_worker_address, shared).key
    assert run.gather(futs) == workers  # each ran on the worker asked for, while it lives
    assert run.holders(futs) == workers and value(futs[0]) == workers[0] and value(3) == 3
    assert run.gather(run.submit(np.sum, shared, axis=0)) == x.sum()
    f32 = run.share_f32(x[::2], "test").result()
    assert f32.dtype == np.float32 and f32.flags.c_contiguous
    assert near(None) == {} and near(workers[0]) == {"workers": [workers[0]], "allow_other_workers": True}


def test_beside_runs_a_call_where_its_future_arguments_are(client):
    x = np.arange(5.0)
    fut = client.submit(np.multiply, x, 3, pure=False)
    assert runner_of(x, fut).client is client
    out = beside(np.add, x, fut)
    assert is_future(out)
    np.testing.assert_array_equal(value(out), x * 4)
    np.testing.assert_array_equal(value(beside(np.add, x, x)), x * 2)  # no future: here, at once


def _worker_address(_):
    from distributed import get_worker

    return get_worker().address


def _numba_threads_on_worker():
    import numba

    before = numba.get_num_threads()
    return on_worker(numba.get_num_threads), before == numba.get_num_threads()


def test_thread_policies_restore_what_they_change(client):
    import numba

    before = numba.get_num_threads()
    assert on_one_thread(numba.get_num_threads) == 1 and numba.get_num_threads() == before
    with threads(numba=1):
        assert numba.get_num_threads() == 1
    assert numba.get_num_threads() == before
    assert on_worker(numba.get_num_threads) == before  # outside a worker: the call as it is
    inside, restored = client.submit(_numba_threads_on_worker, pure=False).result()
    assert inside == 1 and restored  # the test workers have one thread each


def _busy(x, seconds):
    time.sleep(seconds)
    return time.time()


def _stamp(x, i):
    return time.time()


def test_task_priority_sends_a_short_task_ahead_of_work_queued_on_the_workers(client1):
    """On one worker with 12 long tasks queued, a group of many short tasks on one small input (tasks the scheduler
    takes for roots of a graph and holds back while the worker is busy) runs after the long ones by default;
    inside ``task_priority(p, workers)`` each runs next, before most of them (the scheduler's documented queuing:
    a restricted task is never held back, and the worker runs its ready tasks by priority)."""
    from mfsim.pipeline.shared import OnCluster, task_priority, worker_addresses

    run = OnCluster(client1)
    seed = client1.submit(np.ones, 3, pure=False)
    seed.result()

    def ends(*, ranked: bool) -> tuple[list[float], list[float]]:
        inputs = [run.submit(np.zeros, i) for i in range(12)]
        wait(inputs)  # a group of 12 inputs: their long tasks are not held back, but sent to the worker at once
        long = [run.submit(_busy, x, 0.05) for x in inputs]
        time.sleep(0.05)  # the long tasks are on the worker
        if ranked:
            with task_priority(10, worker_addresses(client1)):
                short = [run.submit(_stamp, seed, i) for i in range(8)]
        else:
            short = [run.submit(_stamp, seed, i) for i in range(8)]
        return client1.gather(long), client1.gather(short)

    long, short = ends(ranked=False)
    # the group's first 2 (up to twice the worker's threads) are sent at once, the rest held back to the end
    assert sorted(short)[2] > sorted(long)[-2]
    long, short = ends(ranked=True)
    assert max(short) < sorted(long)[3]  # each ran as soon as the running long task ended
