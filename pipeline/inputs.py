"""Side inputs read from Parquet beside the log: the item truth (clusters, popularity) and stored embeddings.

One routine (``open_parquet``) opens and checks every such file, so every error names the file,
the column and what to do. The interaction log itself is read by ``pipeline.ingest``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mfsim.pipeline.config import Config
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.simulate import ITEMS_TRUTH

EMBEDDING = "embedding"
# Rows per record batch when only some rows of an embedding file are kept (memory O(batch + kept)).
_BATCH_ROWS = 65536


def _require_columns(names: list[str], columns: tuple[str, ...], what: str, path: Path, fix: str) -> None:
    for col in columns:
        if col not in names:
            raise MfsimError(f"{what} {path} has no column {col!r}; received columns {names}. {fix}")


def open_parquet(path: str | Path, what: str, fix: str, columns: tuple[str, ...] = ()) -> pq.ParquetFile:
    """The Parquet file at ``path`` with every name of ``columns``; else one ``MfsimError``.

    ``what`` names the file in messages (``"users file"``, ``"evaluation.item_truth"``); ``fix``
    says what to do when it is missing or unreadable. Reads only the footer.
    """
    path = Path(path)
    if not path.is_file():
        raise MfsimError(f"{what} {path} does not exist or is not a file; {fix}")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise MfsimError(f"cannot read {what} {path} as Parquet: {exc}; {fix}") from None
    _require_columns(pf.schema_arrow.names, columns, what, path, fix)
    return pf


# ---------------------------------------------------------------------------------------------
# item truth


@dataclass
class ItemTruth:
    """The item truth file: its path and table (item id column, cluster, optional popularity)."""

    path: str
    table: pa.Table

    def column_by_item(self, item_ids: pa.Array, item_col: str, col: str, missing) -> np.ndarray:
        """Column ``col`` per item index of ``item_ids`` (``missing`` for items absent from the truth)."""
        try:
            value_set = self.table[item_col].combine_chunks().cast(item_ids.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise MfsimError(f"the ids in column '{item_col}' of the item truth {self.path} are not "
                             f"{item_ids.type} like the log's ({exc}); fix evaluation.item_truth") from exc
        pos = pc.index_in(item_ids, value_set=value_set)
        values = self.table[col].to_numpy()
        out = np.full(len(item_ids), missing, dtype=np.result_type(values.dtype, np.asarray(missing).dtype))
        found = pos.is_valid().to_numpy(zero_copy_only=False)
        out[found] = values[pos.drop_null().to_numpy()]
        return out


def load_item_truth(cfg: Config) -> ItemTruth | None:
    """``evaluation.item_truth``, or ``items_truth.parquet`` beside the input log (the simulator's)."""
    path = cfg.evaluation.item_truth
    if path is None and cfg.input.path:
        beside = Path(cfg.input.path) / ITEMS_TRUTH
        if beside.is_file():
            path = str(beside)
    if path is None:
        return None
    cluster_col = cfg.evaluation.truth_cluster_col
    pf = open_parquet(path, "evaluation.item_truth", f"pass a Parquet file with '{cfg.input.item_col}' and "
                      f"'{cluster_col}' columns or null (set evaluation.truth_cluster_col / input.item_col)",
                      (cfg.input.item_col, cluster_col))
    try:
        t = pf.read()
    except (pa.ArrowException, OSError) as exc:
        raise MfsimError(f"{path} is not a readable Parquet file ({exc}); fix evaluation.item_truth") from exc
    cluster = t[cluster_col]
    if not pa.types.is_integer(cluster.type) or cluster.null_count:
        raise MfsimError(f"column '{cluster_col}' of the item truth {path} must hold integer "
                         f"cluster labels without nulls, got {cluster.type} with {cluster.null_count} nulls")
    return ItemTruth(str(path), t)


# ---------------------------------------------------------------------------------------------
# stored embeddings (``mfsim audit``)


class PartsFile:
    """A directory of Parquet parts (``part-*.parquet``, read in name order) read like one ``pq.ParquetFile``."""

    def __init__(self, path: Path):
        import pyarrow.dataset as ds

        self.path = path
        self.dataset = ds.dataset(path, format="parquet")
        self.schema_arrow = self.dataset.schema
        self.metadata = SimpleNamespace(num_rows=self.dataset.count_rows())

    def iter_batches(self, batch_size: int, columns: list[str]):
        return self.dataset.to_batches(columns=columns, batch_size=batch_size)


def open_parts(path: str | Path, what: str, fix: str, columns: tuple[str, ...] = ()) -> "pq.ParquetFile | PartsFile":
    """``open_parquet`` for a file, or a directory of parts (one dataset partition) as a ``PartsFile``."""
    path = Path(path)
    if not path.is_dir():
        return open_parquet(path, what, fix, columns)
    try:
        pf = PartsFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise MfsimError(f"cannot read {what} {path} as Parquet parts: {exc}; {fix}") from None
    _require_columns(pf.schema_arrow.names, columns, what, path, fix)
    return pf


def open_embeddings(path: str | Path, role: str) -> tuple["pq.ParquetFile | PartsFile", str]:
    """An embedding file (or directory of parts) and its id column (the first column that is not ``embedding``);
    errors name the file."""
    what = f"{role} file"
    side = "item" if role == "items" else "user"
    pf = open_parts(path, what, f"pass a Parquet file or a directory of parts such as "
                    f"{side}_embeddings/objective=eq1/scaling=symmetric, with the embeddings as a "
                    f"list<float> column named {EMBEDDING!r}.", (EMBEDDING,))
    names = pf.schema_arrow.names
    ids = [n for n in names if n != EMBEDDING]
    if not ids:
        raise MfsimError(f"{what} {path} has no id column beside {EMBEDDING!r}; add the ids as the first column.")
    typ = pf.schema_arrow.field(EMBEDDING).type
    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)) \
            or not pa.types.is_floating(typ.value_type):
        raise MfsimError(f"column {EMBEDDING!r} of {what} {path} must be fixed_size_list<float32>[k] or "
                         f"list<float>; received {typ}.")
    if pf.metadata.num_rows == 0:
        raise MfsimError(f"{what} {path} has no rows; audit a non-empty embedding.")
    return pf, ids[0]


def _to_matrix(col: pa.ChunkedArray | pa.Array, ids: pa.Array, path: Path, role: str) -> np.ndarray:
    """An (n, k) float32 matrix from a list column; errors name the file, column and first bad row's id."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)

    def bad(row: int, what: str) -> MfsimError:
        return MfsimError(f"column {EMBEDDING!r} of {role} file {path}: {what} at row {row} "
                          f"(id {ids[row].as_py()!r}); every row needs k finite floats.")

    if arr.null_count:
        raise bad(int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0]), "a null embedding")
    if pa.types.is_fixed_size_list(arr.type):
        k = arr.type.list_size
    else:
        lengths = arr.value_lengths().to_numpy(zero_copy_only=False)
        k = int(lengths[0]) if n else 0
        odd = np.flatnonzero(lengths != k)
        if odd.size:
            raise bad(int(odd[0]), f"{lengths[odd[0]]} values where row 0 has {k}")
    values = arr.flatten()
    if values.null_count:
        raise bad(int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]) // max(k, 1),
                  "a null value")
    if k == 0:
        raise MfsimError(f"column {EMBEDDING!r} of {role} file {path} has 0 values per row; expected k >= 1.")
    mat = values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, k)
    finite = np.isfinite(mat).all(axis=1)
    if not finite.all():
        raise bad(int(np.flatnonzero(~finite)[0]), "NaN or infinite values (after the cast to float32)")
    return mat


def read_embeddings(path: str | Path, role: str, rows: np.ndarray | None = None) -> tuple[pa.Array, np.ndarray]:
    """Ids and float32 embeddings of a Parquet file, only the sorted positions ``rows`` if given.

    The file is read in record batches of ``_BATCH_ROWS`` rows and only the wanted rows are kept,
    so memory is O(batch + len(rows)) rows.
    """
    pf, id_col = open_embeddings(path, role)
    path = Path(path)
    id_parts, emb_parts = [], []
    start = 0
    try:
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=[id_col, EMBEDDING]):
            stop = start + batch.num_rows
            if rows is not None:
                lo, hi = np.searchsorted(rows, [start, stop])
                batch = batch.take(pa.array(rows[lo:hi] - start))
            id_parts.append(batch.column(0))
            emb_parts.append(batch.column(1))
            start = stop
    except pa.ArrowException as exc:
        raise MfsimError(f"cannot read {role} file {path} as Parquet: {exc}") from None
    ids = pa.concat_arrays(id_parts)
    return ids, _to_matrix(pa.chunked_array(emb_parts, type=pf.schema_arrow.field(EMBEDDING).type), ids, path, role)
