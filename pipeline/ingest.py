"""Ingest: a Parquet interaction log -> contiguous id maps + X as CSR row blocks on the workers.

The log is split into pieces (groups of Parquet row groups, about ``ingest.partition_rows`` rows
each). Every step is a Dask task on the run's client, and no raw row ever travels to the client:

1. ``scan_piece``: read the needed columns of one piece with pyarrow, apply the time window,
   count invalid rows by reason (null ids, null/NaN/inf/negative weight, null timestamp), drop
   them, and keep the clean columns on the worker; its sorted unique user and item ids are
   reduced by ``blocks.tree_reduce`` (set unions, fan-in 8) into the sorted id maps (index =
   position in the sorted ids).
2. ``encode_piece``: map ids to indices and bucket the entries by row block
   (``row // ingest.block_rows``).
3. ``build_block``: concatenate one block's buckets from every piece, in piece order, and build
   its CSR with duplicates summed (``coo -> csr``), so the result does not depend on how many
   workers ran it.
4. minimum support (``min_user_interactions``, ``min_item_interactions``), iterated on the blocks
   until stable, then rows and columns are re-indexed to stay contiguous.

Before any task, the files' footers are checked on the client (``inspect_files``): every file
has the columns, and files whose columns differ only in encoding are one log (``common_id_type``:
``dictionary<string>`` beside ``string``, ``int32`` beside ``int64``; a file without rows takes
no part). A file whose footer reads but whose data does not decode fails its scan task on the
worker and comes back as one error naming the file and the column.

Futures over pyarrow pieces are used rather than a ``dask.dataframe`` groupby: building the CSR
blocks needs only a partition by row block and a sum of duplicates, which the block build does
in one pass without a pandas shuffle. Only ``ingest`` reads the input log.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import glob as globlib
import logging
import operator
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mfsim.kernels.coo import bucket_order, coo_to_csr_sum
from mfsim.pipeline.blocks import CSRBlock, RowBlocks, tree_reduce
from mfsim.pipeline.config import Config, IngestSection, InputSection
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.inputs import load_item_truth
from mfsim.pipeline.shared import share

log = logging.getLogger("mfsim.ingest")

PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
INVALID_REASONS = ("null_user", "null_item", "null_weight", "nan_weight", "inf_weight", "negative_weight", "null_ts")


# ---------------------------------------------------------------------------------------------
# input resolution and schema checks (client side, metadata only)


@dataclass(frozen=True)
class InputFile:
    """One Parquet file of the log, from its footer: path, size in bytes, rows per row group."""

    path: str
    size: int
    row_groups: tuple[int, ...]  # rows per row group


@dataclass(frozen=True)
class Piece:
    """Row groups ``row_groups`` of one file: the unit of work of a scan task."""

    path: str
    row_groups: tuple[int, ...]
    n_rows: int


@dataclass
class IngestResult:
    """What ingest hands on: X in row blocks, the id maps, per-row and per-column counts, input files and counts."""

    X: RowBlocks
    user_ids: pa.Array  # sorted original ids; position = row index of X
    item_ids: pa.Array  # sorted original ids; position = column index of X
    user_counts: np.ndarray  # int64 (n_users,), non-zeros per row
    item_counts: np.ndarray  # int64 (n_items,), non-zeros per column
    files: list[dict[str, Any]]
    counts: dict[str, Any] = field(default_factory=dict)


def _filesystem(path: str):
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    return fs, root


def _is_hidden(part: str) -> bool:
    return part.startswith((".", "_"))


def resolve_input(path: str) -> tuple[Any, list[str]]:
    """The Parquet files of ``path``: a file, a directory (hive partitions allowed), a glob, or an fsspec URL.

    In a directory, hidden names (``.``/``_`` prefixes, e.g. ``_SUCCESS``) are skipped. When the
    directory is hive-partitioned (``key=value`` sub-directories), only the files inside the
    partitions belong to the log: loose files beside them (such as the simulator's
    ``items_truth.parquet``) are not read.
    """
    if not path:
        raise MfsimError("no input given: pass --input PATH (a Parquet file, directory, glob or URL) or set input.path")
    fs, root = _filesystem(path)
    if globlib.has_magic(root):
        files = sorted(f for f in fs.glob(root) if fs.isfile(f))
        if not files:
            raise MfsimError(f"input glob {path} matches no file; check the pattern")
        return fs, files
    if not fs.exists(root):
        raise MfsimError(f"input path {path} does not exist; pass an existing Parquet file, directory or glob")
    if fs.isfile(root):
        return fs, [root]
    found = sorted(fs.find(root))
    files = []
    for f in found:
        rel = f[len(root.rstrip("/")) + 1 :].split("/")
        if any(_is_hidden(p) for p in rel):
            continue
        if f.endswith(PARQUET_SUFFIXES):
            files.append((f, rel))
    partitioned = [f for f, rel in files if any("=" in p for p in rel[:-1])]
    if partitioned:
        loose = [f for f, rel in files if not any("=" in p for p in rel[:-1])]
        if loose:
            log.info("input %s is hive-partitioned; not part of the log: %s", path, ", ".join(loose))
        result = partitioned
    else:
        result = [f for f, _ in files]
    if not result:
        raise MfsimError(f"input directory {path} holds no Parquet file (*.parquet); point --input at the log")
    return fs, result


def validate_before_cluster(cfg: Config) -> None:
    """Check, before any cluster starts, what can fail in milliseconds: the input and the item truth.

    The input must resolve to at least one Parquet file (``resolve_input``: a local path that does
    not exist fails at once, with the message ingest gives), and the item truth, when one is set or
    lies beside the input, must be a readable Parquet file with its columns (``load_item_truth``;
    it holds one row per item, so reading it here is cheap). Reads no footer of the log itself.
    Raises ``MfsimError``; needs no Dask client.
    """
    resolve_input(cfg.input.path)
    load_item_truth(cfg)


def _id_type_ok(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def _require_column(file: str, schema: pa.Schema, col: str, role: str) -> None:
    if col not in schema.names:
        raise MfsimError(
            f"column '{col}' ({role}) is missing from {file}; its columns are {schema.names}; "
            f"set input.{role}_col to the right name"
        )


def _check_column(file: str, schema: pa.Schema, col: str, role: str) -> pa.DataType:
    _require_column(file, schema, col, role)
    t = schema.field(col).type
    ok = {
        "user": _id_type_ok,
        "item": _id_type_ok,
        "weight": lambda t: pa.types.is_integer(t) or pa.types.is_floating(t),
        "ts": lambda t: pa.types.is_timestamp(t) or pa.types.is_date(t),
    }[role]
    if not ok(t):
        want = {
            "user": "integers or strings",
            "item": "integers or strings",
            "weight": "a numeric type",
            "ts": "a timestamp or date",
        }[role]
        raise MfsimError(
            f"column '{col}' in {file} has type {t}; {role} values must be {want}; "
            f"cast the column or set input.{role}_col to another column"
        )
    return t


def _decoded_id_type(t: pa.DataType) -> pa.DataType:
    """The type an id column is read as: dictionaries decoded, ``large_string`` as ``string``."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.string() if pa.types.is_large_string(t) else t


def common_id_type(col: str, seen: list[tuple[pa.DataType, str]]) -> pa.DataType:
    """The one type that an id column of every file decodes to, from each file's (type, path).

    Encodings that hold the same values agree: ``dictionary<string>``, ``large_string`` and
    ``string`` are read as ``string``; integers of different widths or signs as the narrowest
    integer type that holds all of them (``int32`` beside ``int64``: ``int64``). Strings beside
    integers, or ``uint64`` beside a signed type (no integer type holds both), are an
    ``MfsimError`` naming the column and a file of each type.
    """
    decoded = [(_decoded_id_type(t), t, f) for t, f in seen]
    d0, t0, f0 = decoded[0]

    def first_not(pred) -> tuple[pa.DataType, str] | None:
        return next(((t, f) for d, t, f in decoded if not pred(d)), None)

    if pa.types.is_string(d0):
        other, common = first_not(pa.types.is_string), pa.string()
    else:
        other, common = first_not(pa.types.is_integer), None
        if other is None:
            widest = np.result_type(*(d.to_pandas_dtype() for d, _, _ in decoded))  # int32, int64 -> int64
            if np.issubdtype(widest, np.integer):
                common = pa.from_numpy_dtype(widest)
            else:  # uint64 beside a signed type promotes to float64, which would round large ids
                other = first_not(lambda d: pa.types.is_unsigned_integer(d) == pa.types.is_unsigned_integer(d0))
    if other is not None:
        raise MfsimError(
            f"column '{col}' has type {other[0]} in {other[1]} but {t0} in {f0}; the files' schemas differ: "
            "rewrite them with one schema"
        )
    return common


def inspect_files(fs, files: list[str], columns: dict[str, str]) -> tuple[list[InputFile], dict[str, pa.DataType]]:
    """Read each file's footer; check columns and types, and that they agree across files.

    Returns the files and, for the ``user`` and ``item`` roles, the type their ids are decoded to
    in every file (``common_id_type``). Weights may be any numeric type and timestamps any
    timestamp or date type in each file: the scan casts every file's values to float32 weights and
    microsecond timestamps. A file without rows (often written with null-typed columns) must have
    the columns but does not take part in the type decision.
    """
    out = []
    seen: dict[str, list[tuple[pa.DataType, str]]] = {role: [] for role in columns}
    for f in files:
        try:
            with fs.open(f, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
                schema = meta.schema.to_arrow_schema()
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise MfsimError(f"{f} is not a readable Parquet file ({_one_line(exc)}); replace or remove it") from exc
        for role, col in columns.items():
            if meta.num_rows == 0:
                _require_column(f, schema, col, role)
            else:
                seen[role].append((_check_column(f, schema, col, role), f))
        rgs = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        out.append(InputFile(f, int(fs.size(f)), rgs))
    id_types = {role: common_id_type(columns[role], seen[role]) for role in ("user", "item") if seen.get(role)}
    return out, id_types


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (Arrow's messages may span several)."""
    return " ".join(str(exc).split())


def plan_pieces(files: list[InputFile], partition_rows: int) -> list[Piece]:
    """Group consecutive row groups of each file into pieces of about ``partition_rows`` rows.

    Row groups without rows are left out: a file without rows gives no piece.
    """
    pieces = []
    for f in files:
        group: list[int] = []
        rows = 0
        for i, n in enumerate(f.row_groups):
            if n == 0:
                continue
            if group and rows + n > partition_rows:
                pieces.append(Piece(f.path, tuple(group), rows))
                group, rows = [], 0
            group.append(i)
            rows += n
        if group:
            pieces.append(Piece(f.path, tuple(group), rows))
    return pieces


# ---------------------------------------------------------------------------------------------
# tasks (run on the workers)


@dataclass(frozen=True)
class ScanSpec:
    """What a scan task reads and keeps: column names, the time window, the invalid-row policy, the input URL."""

    user_col: str
    item_col: str
    weight_col: str | None
    ts_col: str | None
    window_start: dt.datetime | None
    window_end: dt.datetime | None
    on_invalid: str
    url: str  # the input as given, to rebuild the filesystem on the worker
    keep_ts: bool = False  # keep each row's timestamp (for a temporal holdout)
    user_type: pa.DataType | None = None  # the type user ids are cast to in every file (common_id_type)
    item_type: pa.DataType | None = None


def _as_plain(arr: pa.ChunkedArray, to: pa.DataType | None = None) -> pa.Array:
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    if to is not None and arr.type != to:
        arr = arr.cast(to)  # a wider integer, or null -> the ids' type: never loses a value
    return arr


def _read_piece(piece: Piece, spec: ScanSpec) -> pa.Table:
    """The piece's columns; a file that fails to decode is one ``MfsimError`` naming it and the column.

    Page checksums are verified where the writer stored them, so a corrupt page in such a file is
    an error rather than wrong values.
    """
    fs, _ = _filesystem(spec.url)
    cols = [c for c in (spec.user_col, spec.item_col, spec.weight_col, spec.ts_col) if c]
    rgs = list(piece.row_groups)
    try:
        with fs.open(piece.path, "rb") as fh:
            return pq.ParquetFile(fh, page_checksum_verification=True).read_row_groups(rgs, columns=cols)
    except (pa.ArrowException, OSError) as exc:
        where = _failing_column(fs, piece.path, rgs, cols)
        raise MfsimError(f"{piece.path} is corrupt: {where}cannot be decoded ({_one_line(exc)}); "
                         "replace or remove the file") from exc


def _failing_column(fs, path: str, row_groups: list[int], cols: list[str]) -> str:
    """``"column 'c' in row group g "`` for the first column chunk of ``path`` that fails to decode, else ``""``.

    Runs only after a read failed, to say which column chunk is corrupt; reads one chunk at a time.
    """
    try:
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh, page_checksum_verification=True)
            for col in cols:
                for rg in row_groups:
                    try:
                        pf.read_row_group(rg, columns=[col])
                    except (pa.ArrowException, OSError):
                        return f"column '{col}' in row group {rg} "
    except (pa.ArrowException, OSError):
        pass
    return ""


def scan_piece(piece: Piece, spec: ScanSpec) -> dict[str, Any]:
    """Read, window and validate one piece; return its clean columns, counts and unique ids.

    A piece that cannot be read returns ``{"error": message}`` instead of raising, so the client
    reports it as one line (a raising task would also print a worker traceback). Weights are read
    via float64 into float32, so large integers round instead of failing the cast and values beyond
    the float32 range become inf and are counted as ``inf_weight``, as they would be stored. The
    piece's ids come sorted and unique (``sorted_unique``), ready for ``union_ids``.
    """
    try:
        t = _read_piece(piece, spec)
    except MfsimError as exc:
        return {"error": str(exc), "n_read": 0, "outside_window": 0, "invalid": {}, "weights": np.zeros(0, np.float32)}
    n_read = t.num_rows
    counts = dict.fromkeys(INVALID_REASONS, 0)
    users = _as_plain(t.column(spec.user_col), spec.user_type)
    items = _as_plain(t.column(spec.item_col), spec.item_type)
    keep = np.ones(n_read, dtype=bool)
    outside = 0
    ts_s = None
    if spec.ts_col:
        ts = t.column(spec.ts_col).combine_chunks()
        if ts.null_count:
            null_ts = ts.is_null().to_numpy(zero_copy_only=False)
            counts["null_ts"] = int(null_ts.sum())
            keep &= ~null_ts
        ts_s = timestamps_us(ts).fill_null(0).to_numpy()
    if ts_s is not None and (spec.window_start or spec.window_end):
        in_win = np.ones(n_read, dtype=bool)
        if spec.window_start is not None:
            in_win &= ts_s >= _to_us(spec.window_start)
        if spec.window_end is not None:
            in_win &= ts_s < _to_us(spec.window_end)
        outside = int((keep & ~in_win).sum())
        keep &= in_win
    for reason, ids in (("null_user", users), ("null_item", items)):
        if ids.null_count:
            bad = ids.is_null().to_numpy(zero_copy_only=False)
            counts[reason] = int((keep & bad).sum())
            keep &= ~bad
    if spec.weight_col:
        w_arr = t.column(spec.weight_col).combine_chunks()
        with np.errstate(over="ignore"):
            weights = w_arr.cast(pa.float64()).fill_null(0.0).to_numpy().astype(np.float32)
        if w_arr.null_count or not (np.isfinite(weights).all() and (weights >= 0).all()):
            w = weights
            for reason, bad in (("null_weight", w_arr.is_null().to_numpy(zero_copy_only=False)),
                                ("nan_weight", np.isnan(w)), ("inf_weight", np.isinf(w)), ("negative_weight", w < 0)):
                counts[reason] = int((keep & bad).sum())
                keep &= ~bad
    else:
        weights = np.ones(n_read, dtype=np.float32)
    if not keep.all():
        mask = pa.array(keep)
        users, items = users.filter(mask), items.filter(mask)
        weights = weights[keep]
        ts_s = ts_s[keep] if ts_s is not None else None
    return {
        "users": users,
        "items": items,
        "weights": weights,
        "ts": ts_s if spec.keep_ts else None,
        "n_read": n_read,
        "outside_window": outside,
        "invalid": counts,
        "user_ids": sorted_unique(users),
        "item_ids": sorted_unique(items),
    }


def _to_us(t: dt.datetime) -> int:
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return int(round(t.timestamp() * 1_000_000))


def piece_summary(scanned: dict[str, Any]) -> dict[str, Any]:
    """The small part of a scan result for the client: row counts by outcome, and the error if any.

    ``n_nonzero`` counts the kept rows whose weight is not zero (X stores only those).
    """
    w = scanned["weights"]
    out = {k: scanned[k] for k in ("n_read", "outside_window", "invalid")}
    out |= {"n_kept": len(w), "n_nonzero": int(np.count_nonzero(w))}
    return out | ({"error": scanned["error"]} if "error" in scanned else {})


def sorted_unique(ids: pa.Array) -> pa.Array:
    """The distinct values of ``ids``, sorted."""
    u = pc.unique(ids)
    return u.take(pc.sort_indices(u))


def union_ids(*arrays: pa.Array) -> pa.Array:
    """Sorted unique union of id arrays (exact, so any grouping of a reduction gives the same result)."""
    return sorted_unique(pa.concat_arrays(list(arrays)))


def max_ts(piece: Piece, spec: ScanSpec) -> dict[str, Any]:
    """``{"max_ts": v}``: the largest timestamp of a piece in microseconds (None if all null), for a default ``as_of``.

    A piece that cannot be read gives ``{"error": message}``, as in ``scan_piece``.
    """
    try:
        t = _read_piece(piece, dataclasses.replace(spec, user_col="", item_col="", weight_col=None))
    except MfsimError as exc:
        return {"error": str(exc)}
    return {"max_ts": pc.max(timestamps_us(t.column(0).combine_chunks())).as_py()}


def timestamps_us(ts: pa.Array) -> pa.Array:
    """A date or timestamp column as int64 microseconds since the epoch (UTC); finer units are truncated
    (pandas writes nanoseconds: 12:00:00.0000007 becomes 12:00:00.000000, never an error)."""
    if pa.types.is_date(ts.type):
        ts = ts.cast(pa.timestamp("s"))
    return pc.cast(ts.cast(pa.timestamp("us"), safe=False), pa.int64())


def raise_piece_errors(results: list[dict[str, Any]]) -> None:
    """Raise the first ``{"error": message}`` of the pieces' task results as the client's ``MfsimError``."""
    for r in results:
        if "error" in r:
            raise MfsimError(r["error"])


class IdIndex:
    """Maps original ids to positions in a sorted id array (a lookup table for compact integer ids)."""

    def __init__(self, sorted_ids: pa.Array):
        self.ids = sorted_ids
        self.lut = None
        if pa.types.is_integer(sorted_ids.type) and len(sorted_ids):
            vals = sorted_ids.to_numpy()
            lo, hi = int(vals[0]), int(vals[-1])
            if hi - lo <= 4 * len(vals) + 1_000_000:
                self.lo = lo
                self.lut = np.full(hi - lo + 1, -1, dtype=np.int64)
                self.lut[vals - lo] = np.arange(len(vals), dtype=np.int64)

    def positions(self, values: pa.Array) -> np.ndarray:
        """int64 position of each value in the sorted ids (every value must be present)."""
        if self.lut is not None:
            return self.lut[values.to_numpy() - self.lo]
        return pc.index_in(values, value_set=self.ids).to_numpy(zero_copy_only=False).astype(np.int64)


def encode_piece(scanned: dict[str, Any], user_index: IdIndex, item_index: IdIndex, block_rows: int,
                 n_blocks: int) -> list[tuple[np.ndarray, ...]]:
    """Entries of one piece as (row, col, weight, ts) buckets, one per row block (ts empty when not kept)."""
    rows = user_index.positions(scanned["users"])
    cols = item_index.positions(scanned["items"]).astype(np.int32)
    w = scanned["weights"]
    ts = scanned["ts"] if scanned.get("ts") is not None else np.zeros(0, np.int64)
    if n_blocks == 1:
        return [(rows, cols, w, ts)]
    order, bounds = bucket_order(rows, block_rows, n_blocks)
    rows, cols, w = rows[order], cols[order], w[order]
    ts = ts[order] if len(ts) else ts
    return [(rows[lo:hi], cols[lo:hi], w[lo:hi], ts[lo:hi] if len(ts) else ts)
            for lo, hi in zip(bounds[:-1], bounds[1:])]


def build_block(row_start: int, n_rows: int, n_cols: int, *buckets) -> CSRBlock:
    """CSR of one row block from its buckets (in piece order); duplicate (user, item) entries are summed."""
    rows = np.concatenate([b[0] for b in buckets]) - row_start if buckets else np.zeros(0, np.int64)
    cols = np.concatenate([b[1] for b in buckets]) if buckets else np.zeros(0, np.int32)
    vals = np.concatenate([b[2] for b in buckets]) if buckets else np.zeros(0, np.float32)
    ts = np.concatenate([b[3] for b in buckets]) if buckets else np.zeros(0, np.int64)
    indptr, indices, data, ts = coo_to_csr_sum(rows, cols, vals, n_rows, ts)
    return CSRBlock(indptr, indices, data, n_cols, ts if len(ts) == len(data) and len(ts) else None)


def block_counts(block: CSRBlock) -> tuple[np.ndarray, np.ndarray]:
    """(non-zeros per row, non-zeros per column) of a block."""
    return np.diff(block.indptr), np.bincount(block.indices, minlength=block.n_cols).astype(np.int64)


def filter_block(block: CSRBlock, keep_rows: np.ndarray, col_map: np.ndarray, n_cols: int) -> CSRBlock:
    """Keep rows ``keep_rows`` (bool) and columns with ``col_map >= 0``, renumbered by ``col_map``.

    Column order within a row is preserved (``col_map`` is increasing on kept columns).
    """
    row_of = np.repeat(np.arange(block.n_rows), np.diff(block.indptr))
    new_cols = col_map[block.indices]
    ok = keep_rows[row_of] & (new_cols >= 0)
    per_row = np.bincount(row_of[ok], minlength=block.n_rows)[keep_rows]
    indptr = np.zeros(len(per_row) + 1, dtype=np.int64)
    np.cumsum(per_row, out=indptr[1:])
    ts = block.ts[ok] if block.ts is not None else None
    return CSRBlock(indptr, new_cols[ok].astype(np.int32), block.data[ok], n_cols, ts)


class _PhaseClock:
    """Logs the wall time of each phase of the stage."""

    def __init__(self):
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        """Log the time since the last lap under ``name``."""
        now = time.perf_counter()
        log.info("ingest: %s %.2fs", name, now - self.t)
        self.t = now


# ---------------------------------------------------------------------------------------------
# the stage


def ingest(client, input_cfg: InputSection, cfg: IngestSection, path: str | None = None, *,
           keep_ts: bool = False) -> IngestResult:
    """Read the log at ``path`` (default ``input_cfg.path``) into id maps and X's CSR row blocks.

    With ``keep_ts`` each block also carries the latest timestamp of each (user, item) entry.
    """
    url = path or input_cfg.path
    fs, file_paths = resolve_input(url)
    columns = {"user": input_cfg.user_col, "item": input_cfg.item_col}
    if input_cfg.weight_col:
        columns["weight"] = input_cfg.weight_col
    use_window = cfg.window_days is not None or cfg.as_of is not None
    if use_window or keep_ts:
        if not input_cfg.ts_col:
            need = "ingest.window_days / ingest.as_of" if use_window else "evaluation.holdout=temporal"
            raise MfsimError(f"{need} needs a timestamp column: set input.ts_col")
        columns["ts"] = input_cfg.ts_col
    files, id_types = inspect_files(fs, file_paths, columns)
    pieces = plan_pieces(files, cfg.partition_rows)
    total_rows = sum(p.n_rows for p in pieces)
    log.info("ingest: %d files, %d pieces, %d rows", len(files), len(pieces), total_rows)

    spec = ScanSpec(input_cfg.user_col, input_cfg.item_col, input_cfg.weight_col,
                    input_cfg.ts_col if (use_window or keep_ts) else None, None, None, cfg.on_invalid, url, keep_ts,
                    id_types.get("user"), id_types.get("item"))
    if use_window:
        end = cfg.as_of
        if end is None:
            results = client.gather([client.submit(max_ts, p, spec) for p in pieces])
            raise_piece_errors(results)
            maxes = [r["max_ts"] for r in results if r["max_ts"] is not None]
            end = (dt.datetime.fromtimestamp(max(maxes) / 1e6, dt.timezone.utc) + dt.timedelta(microseconds=1)
                   if maxes else dt.datetime.now(dt.timezone.utc))
        start = end - dt.timedelta(days=cfg.window_days) if cfg.window_days is not None else None
        spec = dataclasses.replace(spec, window_start=start, window_end=end)

    clock = _PhaseClock()
    scanned = [client.submit(scan_piece, p, spec, pure=False) for p in pieces]
    summaries = client.gather([client.submit(piece_summary, s) for s in scanned])
    raise_piece_errors(summaries)
    invalid = {k: sum(s["invalid"][k] for s in summaries) for k in INVALID_REASONS}
    if spec.on_invalid == "error" and any(invalid.values()):
        where = _files_where(pieces, summaries, lambda s: any(s["invalid"].values()))
        reasons = ", ".join(f"{k}={v}" for k, v in invalid.items() if v)
        raise MfsimError(
            f"{where} has {sum(invalid.values())} invalid rows ({reasons}); fix the data or set "
            "ingest.on_invalid=drop to drop them and count them by reason"
        )
    n_kept = sum(s["n_kept"] for s in summaries)
    counts: dict[str, Any] = {
        "rows_read": int(sum(s["n_read"] for s in summaries)),
        "rows_outside_window": int(sum(s["outside_window"] for s in summaries)),
        "rows_dropped": {k: int(v) for k, v in invalid.items() if v},
        "rows_valid": int(n_kept),
    }
    if n_kept == 0:
        raise MfsimError(f"input {url} has no valid rows after the time window and invalid-row filters; "
                         "check ingest.as_of / ingest.window_days and the data")
    if not any(s["n_nonzero"] for s in summaries):
        where = _files_where(pieces, summaries, lambda s: s["n_kept"] > 0)
        raise MfsimError(f"all {n_kept} valid rows of {where} have weight 0 in column '{input_cfg.weight_col}', so X "
                         "has no non-zero entry; check input.weight_col (null: every row weighs 1.0) and the data")

    clock.lap("scan")
    roots = [tree_reduce([client.submit(operator.itemgetter(key), s) for s in scanned], union_ids, client=client,
                         fan_in=8, gather=False) for key in ("user_ids", "item_ids")]
    user_ids, item_ids = client.gather(roots)
    n_users, n_items = len(user_ids), len(item_ids)
    n_blocks = max(1, -(-n_users // cfg.block_rows))
    # the id maps as tasks on the unions, not scattered: X's blocks keep their lineage back to the
    # Parquet pieces, so a block lost with its worker is rebuilt (pipeline.shared)
    uidx, iidx = (client.submit(IdIndex, r, pure=False) for r in roots)
    encoded = [client.submit(encode_piece, s, uidx, iidx, cfg.block_rows, n_blocks) for s in scanned]
    offsets = np.minimum(np.arange(n_blocks + 1, dtype=np.int64) * cfg.block_rows, n_users)
    blocks = []
    for b in range(n_blocks):
        buckets = [client.submit(operator.itemgetter(b), e) for e in encoded]
        blocks.append(client.submit(build_block, int(offsets[b]), int(offsets[b + 1] - offsets[b]), n_items, *buckets))
    del scanned, encoded
    X = RowBlocks(blocks, offsets, n_items, client)
    clock.lap("id maps")
    X, user_ids, item_ids, user_counts, item_counts, support = _minimum_support(
        client, X, user_ids, item_ids, cfg.min_user_interactions, cfg.min_item_interactions)
    clock.lap("blocks and minimum support")
    counts.update(support)
    nnz = int(user_counts.sum())
    X.nnz = nnz
    counts.update(n_users=len(user_ids), n_items=len(item_ids), nnz=nnz,
                  duplicates_merged=int(n_kept - support["nnz_before_support"]))
    if nnz == 0:
        raise MfsimError(f"input {url} is empty after the minimum-support filter "
                         f"(ingest.min_user_interactions={cfg.min_user_interactions}, "
                         f"ingest.min_item_interactions={cfg.min_item_interactions}); lower them")
    file_info = [{"path": f.path, "size": f.size, "rows": int(sum(f.row_groups))} for f in files]
    return IngestResult(X, user_ids, item_ids, user_counts, item_counts, file_info, counts)


def _files_where(pieces: list[Piece], summaries: list[dict[str, Any]], pick) -> str:
    """The files of the pieces whose summary ``pick`` selects: the first by name, then how many more."""
    paths = list(dict.fromkeys(p.path for p, s in zip(pieces, summaries) if pick(s)))
    return paths[0] + (f" (and {len(paths) - 1} more files)" if len(paths) > 1 else "")


def _minimum_support(client, X: RowBlocks, user_ids, item_ids, min_user: int, min_item: int):
    """Drop users and items below the minimum support, repeatedly, until stable; re-index contiguously.

    Users and items left with no interactions (all weights zero) are dropped in any case.
    """
    keep_u = np.ones(X.n_rows, dtype=bool)
    keep_i = np.ones(X.n_cols, dtype=bool)
    rounds = 0
    current = X
    nnz_before = None
    while True:
        per_block = client.gather(current.map(block_counts))
        row_nnz = np.concatenate([r for r, _ in per_block]) if per_block else np.zeros(0, np.int64)
        col_nnz = np.sum([c for _, c in per_block], axis=0) if per_block else np.zeros(X.n_cols, np.int64)
        if nnz_before is None:
            nnz_before = int(row_nnz.sum())
        ok_u = row_nnz >= min_user
        ok_i = col_nnz >= min_item
        if ok_u.all() and ok_i.all():
            break
        rounds += 1
        # map the current (already filtered) rows/cols back to the original index space
        cur_u = np.flatnonzero(keep_u)
        cur_i = np.flatnonzero(keep_i)
        keep_u[cur_u[~ok_u]] = False
        keep_i[cur_i[~ok_i]] = False
        col_map = np.full(len(ok_i), -1, dtype=np.int64)
        col_map[ok_i] = np.arange(int(ok_i.sum()))
        new_parts, new_offsets = [], [0]
        cmap = share(client, col_map, "column-map")
        for b, part in enumerate(current.parts):
            rows_ok = ok_u[current.row_offsets[b] : current.row_offsets[b + 1]]
            new_parts.append(client.submit(filter_block, part, rows_ok, cmap, int(ok_i.sum())))
            new_offsets.append(new_offsets[-1] + int(rows_ok.sum()))
        current = RowBlocks(new_parts, np.array(new_offsets, dtype=np.int64), int(ok_i.sum()), client)
    user_ids = user_ids.filter(pa.array(keep_u)) if not keep_u.all() else user_ids
    item_ids = item_ids.filter(pa.array(keep_i)) if not keep_i.all() else item_ids
    support = {
        "nnz_before_support": nnz_before,
        "support_rounds": rounds,
        "users_removed_by_support": int((~keep_u).sum()),
        "items_removed_by_support": int((~keep_i).sum()),
    }
    return current, user_ids, item_ids, row_nnz.astype(np.int64), col_nnz.astype(np.int64), support
