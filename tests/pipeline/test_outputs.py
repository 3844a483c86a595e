"""Helpers of ``pipeline.outputs`` that shape what tasks are sent."""

from __future__ import annotations

import pickle

import pyarrow as pa

from mfsim.pipeline.outputs import id_rows


def test_id_rows_send_only_their_rows():
    """A block's ids from the run's id array: equal to the slice, but pickled (as a task argument or a shared value)
    at the size of their own rows, not of the whole array's buffers as a slice is."""
    n = 200_000
    for ids in (pa.array(range(n), pa.int64()), pa.array([f"user-{i}" for i in range(n)]),
                pa.array([f"u{i % 50}" for i in range(n)]).dictionary_encode()):
        part = id_rows(ids, 150_000, 5_000)
        assert part.equals(ids.slice(150_000, 5_000)) and part.type == ids.type
        if not pa.types.is_dictionary(ids.type):  # a dictionary array keeps its (small) dictionary
            assert len(pickle.dumps(part)) * 10 < len(pickle.dumps(ids.slice(150_000, 5_000)))
        assert len(id_rows(ids, n, 0)) == 0
        chunked = pa.chunked_array([ids.slice(0, 100_000), ids.slice(100_000)])  # across a chunk boundary
        assert id_rows(chunked, 95_000, 10_000).equals(ids.slice(95_000, 10_000))
        assert len(id_rows(chunked, n, 0)) == 0 and len(id_rows(pa.chunked_array([], ids.type), 0, 0)) == 0
