"""Output paths and table layouts of a run, in one place (pure: arrays in, Arrow tables out).

Paths are relative to the run directory; ``pipeline.runs.writer.RunWriter`` writes them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

USERS_IDS = "ids/users.parquet"
ITEMS_IDS = "ids/items.parquet"
SINGULAR_VALUES = "svd/singular_values.parquet"
SVD_BASIS = "svd/basis.parquet"  # item_id + V_k (embedding): what the next run's svd.warm_start reads
EVALUATION_METRICS = "evaluation/metrics.parquet"
CLUSTER_PRECISION = "evaluation/cluster_precision.parquet"
LAMBDA_SWEEP = "evaluation/lambda_sweep.parquet"
AUDIT_STABILITY = "audit/stability.parquet"
AUDIT_ITEMS = "audit/items.parquet"
AUDIT_LEAST_STABLE = "audit/least_stable.parquet"
REPORT = "report.html"

# One directory per dataset, one schema per dataset, hive partitions below it (the output contract).
# The output id columns are always ``user_id``, ``item_id``, ``neighbour_id`` (input.user_col and
# input.item_col only say how to read the input), with the input ids' types.
USER_ID, ITEM_ID, NEIGHBOUR_ID = "user_id", "item_id", "neighbour_id"
EMBEDDING_DATASETS = {"items": "item_embeddings", "users": "user_embeddings"}
LIST_DATASETS = {"item_item": "similar_items", "user_item": "recommendations", "user_user": "similar_users"}
NEIGHBOUR_COLUMNS = {  # kind -> (query id column, neighbour id column)
    "item_item": (ITEM_ID, NEIGHBOUR_ID),
    "user_item": (USER_ID, ITEM_ID),
    "user_user": (USER_ID, NEIGHBOUR_ID),
}
PARTITION_KEYS = ("objective", "scaling", "metric")  # the hive partition columns, in directory order


def embeddings_dir(side: str, objective: str, scaling: str) -> str:
    """``item_embeddings/objective=<o>/scaling=<s>`` (side ``items``: B) or ``user_embeddings/...`` (``users``: P = X A)."""
    return f"{EMBEDDING_DATASETS[side]}/objective={objective}/scaling={scaling}"


def list_dir(kind: str, objective: str, scaling: str, metric: str) -> str:
    """The directory of one list's ``part-*.parquet`` files: ``similar_items/objective=/scaling=/metric=`` and the
    same below ``recommendations`` (user-item) and ``similar_users`` (user-user)."""
    return f"{LIST_DATASETS[kind]}/objective={objective}/scaling={scaling}/metric={metric}"


def part_file(directory: str, part_no: int) -> str:
    """``<directory>/part-00000.parquet``: the numbered parts of one dataset, in query order."""
    return f"{directory}/part-{part_no:05d}.parquet"


def dataset_of(relative: str) -> str:
    """The dataset a run file belongs to: its first directory (``similar_items``), or the file itself at the top
    (``report.html``); ``ids/users.parquet`` and the other single files of a directory are datasets of their own."""
    parts = relative.split("/")
    if len(parts) > 1 and "=" in parts[1]:
        return parts[0]
    return relative


EVALUATION_SCHEMA = pa.schema([
    ("objective", pa.string()), ("scaling", pa.string()), ("metric", pa.string()), ("top_n", pa.int32()),
    ("recall", pa.float64()), ("recall_se", pa.float64()), ("ndcg", pa.float64()), ("ndcg_se", pa.float64()),
    ("n_users", pa.int64())])  # *_se: sd (ddof 1) of the n_users per-user values / sqrt(n_users)
CLUSTER_PRECISION_SCHEMA = pa.schema([
    ("objective", pa.string()), ("scaling", pa.string()), ("metric", pa.string()), ("top_n", pa.int32()),
    ("cluster_precision", pa.float64()), ("chance", pa.float64())])


def id_table(ids: pa.Array, id_col: str, n_interactions: np.ndarray) -> pa.Table:
    """``ids/users.parquet`` / ``ids/items.parquet``: ``index``, ``user_id`` / ``item_id``, ``n_interactions``."""
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
    """``id_col`` (``item_id`` / ``user_id``) + ``embedding`` as ``fixed_size_list<float32>[k]``."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, k = emb.shape
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} embedding rows")
    values = pa.array(emb.reshape(-1))
    # the list's field is named "element", as Parquet writes it back: the schema in memory (and in the
    # manifest) is then the schema every reader sees
    typ = pa.list_(pa.field("element", pa.float32()), k)
    return pa.table({id_col: ids, "embedding": pa.FixedSizeListArray.from_arrays(values, type=typ)})


def neighbour_table(kind: str, query_ids: pa.Array, candidate_ids: pa.Array, indices: np.ndarray,
                    scores: np.ndarray, counts: np.ndarray) -> pa.Table:
    """Rows (query id, neighbour id, ``rank`` int32 from 1, ``score`` float32), by query then rank.

    ``indices``/``scores`` are (q, N) with ``counts[r]`` valid entries in row r (sorted lists).
    """
    q_col, n_col = NEIGHBOUR_COLUMNS[kind]
    n = indices.shape[1] if indices.ndim == 2 else 0
    valid = np.arange(n)[None, :] < np.asarray(counts)[:, None]
    rows = np.nonzero(valid)[0]
    ranks = (np.nonzero(valid)[1] + 1).astype(np.int32)
    return pa.table({
        q_col: query_ids.take(pa.array(rows)),
        n_col: candidate_ids.take(pa.array(indices[valid].astype(np.int64))),
        "rank": pa.array(ranks),
        "score": pa.array(scores[valid].astype(np.float32)),
    })


def keyed_by_item(table: pa.Table, item_ids: pa.Array) -> pa.Table:
    """``table`` with its internal ``index`` column (an item's row) replaced by ``item_id`` in the same place,
    and dictionary-encoded label columns as plain strings (as in every other table of a run)."""
    i = table.schema.get_field_index("index")
    table = table.set_column(i, ITEM_ID, item_ids.take(table["index"]))
    for j, f in enumerate(table.schema):
        if pa.types.is_dictionary(f.type):
            table = table.set_column(j, f.name, table[f.name].cast(f.type.value_type))
    return table


def schema_json(schema: pa.Schema) -> list[dict[str, str]]:
    """A schema for the manifest: ``[{"name": ..., "type": ...}]`` (Arrow type names)."""
    return [{"name": f.name, "type": str(f.type)} for f in schema]


def id_rows(ids: pa.Array | pa.ChunkedArray, start: int, n: int) -> pa.Array:
    """Ids ``start:start + n`` in buffers of their own: a slice pickles its parent's whole buffers (a block's 65,536
    of 1M user ids sent to a task as 8-14 MB), a copy only its rows (a dictionary array keeps its dictionary)."""
    part = ids.slice(start, n)
    chunks = part.chunks if isinstance(part, pa.ChunkedArray) else [part]
    return pa.concat_arrays(chunks) if chunks else pa.array([], type=ids.type)
