"""Output paths and table layouts of a run, in one place (pure: arrays in, Arrow tables out).

Paths are relative to the run directory; ``pipeline.runs.RunWriter`` writes them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

USERS_IDS = "ids/users.parquet"
ITEMS_IDS = "ids/items.parquet"
SINGULAR_VALUES = "svd/singular_values.parquet"


def factors_dir(objective: str, scaling: str) -> str:
    return f"factors/objective={objective}/scaling={scaling}"


def id_table(ids: pa.Array, id_col: str, n_interactions: np.ndarray) -> pa.Table:
    """``ids/users.parquet`` / ``ids/items.parquet``: ``index``, the original id column, ``n_interactions``."""
    return pa.table({
        "index": pa.array(np.arange(len(ids), dtype=np.int64)),
        id_col: ids,
        "n_interactions": pa.array(np.asarray(n_interactions, dtype=np.int64)),
    })


def singular_values_table(sigma: np.ndarray) -> pa.Table:
    """``svd/singular_values.parquet``: ``component`` (0-based), ``sigma`` (float64), descending."""
    return pa.table({"component": pa.array(np.arange(len(sigma), dtype=np.int32)),
                     "sigma": pa.array(np.asarray(sigma, dtype=np.float64))})


def embedding_table(ids: pa.Array, id_col: str, emb: np.ndarray) -> pa.Table:
    """Original id + ``embedding`` as ``fixed_size_list<float32>[k]``."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, k = emb.shape
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} embedding rows")
    values = pa.array(emb.reshape(-1))
    return pa.table({id_col: ids, "embedding": pa.FixedSizeListArray.from_arrays(values, k)})
