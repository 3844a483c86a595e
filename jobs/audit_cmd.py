"""``mfsim audit``: the cosine audit of any (user, item) embedding pair stored as Parquet.

Reads two files with an id column (the first column that is not ``embedding``) and an
``embedding`` column (``fixed_size_list<float32>[k]`` or ``list<float>``), as the pipeline writes
them at ``factors/objective=.../scaling=.../users.parquet`` and ``items.parquet``, and runs
``pipeline.audit.audit_embedding_pair``. Only the sampled users are kept in memory (the users file
is streamed in record batches); the items are read whole, since item-item lists need all of them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mfsim.pipeline.audit import AuditResult, audit_embedding_pair, sample_rows
from mfsim.pipeline.errors import MfsimError

EMBEDDING = "embedding"
_BATCH_ROWS = 65536


def _open(path: str | Path, role: str) -> tuple[pq.ParquetFile, str]:
    """The Parquet file and its id column; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise MfsimError(f"{role} file {path} does not exist or is not a file; pass the path of a Parquet file "
                         f"such as factors/objective=eq1/scaling=symmetric/{role}.parquet.")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise MfsimError(f"cannot read {role} file {path} as Parquet: {exc}") from None
    names = pf.schema_arrow.names
    if EMBEDDING not in names:
        raise MfsimError(f"{role} file {path} has no column {EMBEDDING!r}; received columns {names}. "
                         "Write the embeddings as a list<float> column named 'embedding'.")
    ids = [n for n in names if n != EMBEDDING]
    if not ids:
        raise MfsimError(f"{role} file {path} has no id column beside {EMBEDDING!r}; add the ids as the first column.")
    typ = pf.schema_arrow.field(EMBEDDING).type
    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)) \
            or not pa.types.is_floating(typ.value_type):
        raise MfsimError(f"column {EMBEDDING!r} of {role} file {path} must be fixed_size_list<float32>[k] or "
                         f"list<float>; received {typ}.")
    if pf.metadata.num_rows == 0:
        raise MfsimError(f"{role} file {path} has no rows; audit a non-empty embedding.")
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

    The file is read in record batches of 65536 rows and only the wanted rows are kept, so memory
    is O(batch + len(rows)) rows.
    """
    pf, id_col = _open(path, role)
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


def format_result(result: AuditResult, item_ids: pa.Array | None = None, show_items: int = 5) -> str:
    """The stability table, the score check, the least stable items (by id) and the verdict."""
    lines = [f"{'kind':<10} {'metric':<7} {'scaling_b':<16} {'rows':>7} {'mean':>6} {'p10':>6} {'p50':>6} "
             f"{'p90':>6} {'min':>6}"]
    for r in result.stability.to_pylist():
        lines.append(f"{r['kind']:<10} {r['metric']:<7} {r['scaling_b']:<16} {r['n_items']:>7} "
                     f"{r['jaccard_mean']:>6.3f} {r['jaccard_p10']:>6.3f} {r['jaccard_p50']:>6.3f} "
                     f"{r['jaccard_p90']:>6.3f} {r['jaccard_min']:>6.3f}")
    s = result.summary
    lines.append(f"score change under D: max abs {s['score_change_max_abs']:.3g}, max relative "
                 f"{s['score_change_max_rel']:.3g} ({s['n_users_sampled']} of {s['n_users']} users sampled)")
    least = [r for r in result.least_stable.to_pylist() if r["kind"] == "item_item"][:show_items]
    if least and item_ids is not None:
        lines.append("least stable items (cosine): " + ", ".join(
            f"{item_ids[r['index']].as_py()} ({r['jaccard']:.2f})" for r in least))
    lines.append(s["verdict"])
    return "\n".join(lines)


def run_audit_command(users_path: str | Path, items_path: str | Path, *, top_n: int = 100, draws: int = 5,
                      spread: float = 1.0, seed: int = 0, out: str | Path | None = None,
                      max_users: int = 10_000) -> int:
    """Audit a stored (user, item) embedding pair; print the table and the verdict; return 0.

    Parameters
    ----------
    users_path, items_path : path
        Parquet files with an id column and an ``embedding`` column of the same k.
    top_n, draws, spread, seed, max_users
        As for ``pipeline.audit.audit_embedding_pair``.
    out : path, optional
        Where to write the stability table as Parquet (parent folders are created).

    Raises
    ------
    MfsimError
        Missing files or columns, malformed or non-finite embeddings, different k, bad parameters
        or an unwritable ``out``; the message names the file and column.
    """
    users_pf, _ = _open(users_path, "users")
    rows = sample_rows(users_pf.metadata.num_rows, max_users, seed)
    _, U = read_embeddings(users_path, "users", rows)
    item_ids, I = read_embeddings(items_path, "items")
    if U.shape[1] != I.shape[1]:
        raise MfsimError(f"the embeddings of {users_path} have k = {U.shape[1]} and those of {items_path} "
                         f"k = {I.shape[1]}; audit users and items of the same model.")
    result = audit_embedding_pair(U, I, top_n=top_n, draws=draws, spread=spread, seed=seed,
                                  max_users=max_users, user_index=rows)
    result.summary["n_users"] = users_pf.metadata.num_rows  # the file's users, of which rows were sampled
    print(format_result(result, item_ids))
    if out is not None:
        out = Path(out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(result.stability, out)
        except OSError as exc:
            raise MfsimError(f"cannot write the stability table to {out}: {exc}; pass a writable --out path.") from None
    return 0
