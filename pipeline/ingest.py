"""Ingest: a Parquet interaction log -> contiguous id maps + X as CSR row blocks on the workers.

The log is split into pieces (groups of Parquet row groups, about ``ingest.partition_rows`` rows
each). Every step is a Dask task on the run's client, no raw row ever travels to the client, and
a worker's memory is bounded by X's blocks and ``ingest.partition_rows``, not by the log's length
(a log of the same interactions repeated 4 times needs the same worker memory). The log is read
twice, and each read of a piece is the same deterministic ``read_clean``: the time window, then
invalid rows (null ids, null/NaN/inf/negative weight, null timestamp) counted by reason and dropped.

1. Pass 1, ``scan_ids``: each piece's row counts and sorted unique user and item ids, keeping no
   row; the results are reduced as they arrive by ``union_scans`` (set unions, fan-in 8) into the
   sorted id maps (index = position in the sorted ids) and every piece's counts, which the client
   checks (invalid rows, nothing left) before pass 2.
2. Pass 2, ``encode_piece``: read the piece again, map ids to indices (``IdIndex``) and bucket the
   entries by unit: a row block (``row // ingest.block_rows``), or a part of one for a block of more
   than a fold group's share of the log (``fold_units``); the units grouped by worker thread
   (``assign_groups``: about as many of the log's rows per group, by pass 1's rows per user).
   ``fold_piece`` folds a piece's bucket into its group's running units, piece after piece in
   piece order, on the group's worker: the buckets are kept until a few pieces' worth are
   pending, then merged into each unit's CSR (``csr_add_coo``); a block of several units is
   joined at the end (``joined_rows``).
   Each (user, item) is summed one entry at a time in log order, in float32, whenever the merges
   happen, so the blocks are the same bits on any number of workers, and the same as one
   ``coo_to_csr_sum`` of all the log's entries. The client keeps at most ``fold_window`` pieces
   read and not yet folded; ``finish_blocks`` drops entries that sum to zero at the end.
3. minimum support (``min_user_interactions``, ``min_item_interactions``), iterated on the blocks
   until stable, then rows and columns are re-indexed to stay contiguous.

Before any task, the files' footers are checked on the client (``inspect_files``): every file
has the columns, and files whose columns differ only in encoding are one log (``common_id_type``:
``dictionary<string>`` beside ``string``, ``int32`` beside ``int64``; a file without rows takes
no part). A file whose footer reads but whose data does not decode fails its scan task on the
worker and comes back as one error naming the file and the column.

Futures over pyarrow pieces are used rather than a ``dask.dataframe`` groupby: building the CSR
blocks needs only a partition by row block and a sum of duplicates in log order, which the fold
does without a pandas shuffle. A block lost with its worker is rebuilt from its group's chain of
tasks, back to the Parquet pieces. Only ``ingest`` reads the input log.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import glob as globlib
import logging
import operator
import os
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mfsim.kernels.coo import bucket_entries, count_ids, csr_add_coo, lookup
from mfsim.pipeline.blocks import CSRBlock, RowBlocks
from mfsim.pipeline.config import Config, IngestSection, InputSection
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.inputs import load_item_truth
from mfsim.pipeline.shared import cluster_threads, is_future, runner, where_of

log = logging.getLogger("mfsim.ingest")

PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
# pyarrow decodes a piece in the task's own thread: the workers' threads are the parallelism, and
# pyarrow's pool would compete with the other workers for the same cores (measured on 2 cores and
# 2 workers: more CPU time for the same ingest)
READ_THREADS = False
INVALID_REASONS = ("null_user", "null_item", "null_weight", "nan_weight", "inf_weight", "negative_weight", "null_ts")


# ---------------------------------------------------------------------------------------------
# input resolution and schema checks (client side, metadata only)


@dataclass(frozen=True)
class InputFile:
    """One Parquet file of the log, from its footer: path, size in bytes, rows per row group, and its identity when
    the footer was read (``file_identity``), which every later read of it is checked against."""

    path: str
    size: int
    row_groups: tuple[int, ...]  # rows per row group
    identity: tuple[str, ...] = ()


@dataclass(frozen=True)
class Piece:
    """Row groups ``row_groups`` of one file: the unit of work of a scan task."""

    path: str
    row_groups: tuple[int, ...]
    n_rows: int
    identity: tuple[str, ...] = ()  # the file's ``file_identity`` when ingest began


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
    ran_on: str = "workers"  # "driver": read in this process (``ingest``'s ``here_max_rows``), X's blocks here


def _filesystem(path: str):
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    return fs, root


def _is_hidden(part: str) -> bool:
    return part.startswith((".", "_"))


def _is_parquet(fs, path: str) -> bool:
    """Whether a file starts with Parquet's magic bytes ``PAR1`` (a file named without the ``.parquet`` suffix)."""
    try:
        with fs.open(path, "rb") as fh:
            return fh.read(4) == b"PAR1"
    except OSError:
        return False


def resolve_input(path: str) -> tuple[Any, list[str]]:
    """The Parquet files of ``path``: a file, a directory (hive partitions allowed), a glob, or an fsspec URL.

    In a directory, hidden names (``.``/``_`` prefixes, e.g. ``_SUCCESS``) are skipped; files without the
    ``.parquet`` suffix are read when they are Parquet (their magic bytes: Hive's ``000001_0``), and the others
    are named in a warning. When the
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
    files, skipped = [], []
    for f in found:
        rel = f[len(root.rstrip("/")) + 1 :].split("/")
        if any(_is_hidden(p) for p in rel):
            continue
        if f.endswith(PARQUET_SUFFIXES) or _is_parquet(fs, f):  # Hive and Spark name parts 000001_0, part-00000
            files.append((f, rel))
        else:
            skipped.append(f)
    if skipped:
        log.warning("input %s: %d file(s) that are not Parquet are not part of the log: %s", path, len(skipped),
                    ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
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


def input_columns(input_cfg: InputSection, cfg: IngestSection, keep_ts: bool) -> dict[str, str]:
    """The log's columns ingest reads, by role (``user``, ``item``, ``weight``, ``ts``)."""
    columns = {"user": input_cfg.user_col, "item": input_cfg.item_col}
    if input_cfg.weight_col:
        columns["weight"] = input_cfg.weight_col
    use_window = cfg.window_days is not None or cfg.as_of is not None
    if use_window or keep_ts:
        if not input_cfg.ts_col:
            need = "ingest.window_days / ingest.as_of" if use_window else "evaluation.holdout=temporal"
            raise MfsimError(f"{need} needs a timestamp column: set input.ts_col")
        columns["ts"] = input_cfg.ts_col
    return columns


def check_input(cfg: Config) -> tuple[int, int]:
    """``validate_before_cluster`` and every file's footer: the columns and types ingest needs, in every file
    (``inspect_files``). Returns (files, rows). What a dry run checks; reads no row of the log."""
    validate_before_cluster(cfg)
    fs, file_paths = resolve_input(cfg.input.path)
    files, _ = inspect_files(fs, file_paths, input_columns(cfg.input, cfg.ingest,
                                                           cfg.evaluation.holdout == "temporal"))
    return len(files), sum(sum(f.row_groups) for f in files)


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
            fmt = str(f).rsplit(".", 1)[-1].lower() if "." in str(f).rsplit("/", 1)[-1] else ""
            if fmt in ("csv", "tsv", "json", "jsonl", "txt", "gz"):
                raise MfsimError(f"{f} is not Parquet (a .{fmt} file?): mfsim reads Parquet logs; convert it once, e.g. "
                                 f"python -c \"import pyarrow.csv as c, pyarrow.parquet as q; "
                                 f"q.write_table(c.read_csv('{f}'), '{str(f).rsplit('.', 1)[0]}.parquet')\" "
                                 "(a .tsv: add parse_options=c.ParseOptions(delimiter='\\t'))") from exc
            raise MfsimError(f"{f} is not a readable Parquet file ({_one_line(exc)}); replace or remove it") from exc
        for role, col in columns.items():
            if meta.num_rows == 0:
                _require_column(f, schema, col, role)
            else:
                seen[role].append((_check_column(f, schema, col, role), f))
        rgs = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        identity = file_identity(fs, f)
        out.append(InputFile(f, int(identity[0]), rgs, identity))
    id_types = {role: common_id_type(columns[role], seen[role]) for role in ("user", "item") if seen.get(role)}
    return out, id_types


#: The keys of ``fs.info`` that change when a file is rewritten: local files (mtime, with nanoseconds where the OS
#: keeps them), S3 and other object stores (ETag, LastModified, VersionId), GCS (generation, md5Hash).
IDENTITY_KEYS = ("mtime", "mtime_ns", "ETag", "etag", "LastModified", "last_modified", "VersionId", "version_id",
                 "generation", "md5Hash", "created")


def file_identity(fs, path: str) -> tuple[str, ...]:
    """What tells one version of a file from another: its size and the fields of ``fs.info`` that a rewrite
    changes (``IDENTITY_KEYS``), as strings (size first)."""
    local = "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol)
    if not local:
        fs.invalidate_cache(path)  # s3fs and others cache listings: ask the store itself
    info = fs.info(path)
    if local:
        info = {**info, "mtime_ns": os.stat(path).st_mtime_ns}
    return (str(info.get("size")), *(f"{k}={info[k]}" for k in IDENTITY_KEYS if info.get(k) is not None))


#: Test hook: with ``MFSIM_HOLD_BETWEEN_PASSES=<path>``, ingest touches ``<path>.scanned`` after its first pass and
#: waits (at most 120 s) for ``<path>.go`` before the second, so that a test can change the log between the passes.
HOLD_BETWEEN_PASSES = "MFSIM_HOLD_BETWEEN_PASSES"


def hold_between_passes() -> None:
    """The ``HOLD_BETWEEN_PASSES`` test hook (nothing when the variable is unset)."""
    path = os.environ.get(HOLD_BETWEEN_PASSES)
    if not path:
        return
    with open(path + ".scanned", "w"):
        pass
    deadline = time.monotonic() + 120
    while not os.path.exists(path + ".go") and time.monotonic() < deadline:
        time.sleep(0.05)


def check_unchanged(fs, piece: Piece) -> None:
    """An ``MfsimError`` when the file of ``piece`` is not the version ingest began with (rewritten, replaced or
    removed while the run read the log: its passes would mix two versions)."""
    if not piece.identity:
        return
    try:
        now = file_identity(fs, piece.path)
    except (FileNotFoundError, OSError):
        now = ("removed",)
    if now != piece.identity:
        what = "was removed" if now == ("removed",) else "was rewritten (its size, modification time or ETag changed)"
        raise MfsimError(f"{piece.path} {what} while this run read the log; nothing was published: rerun once the "
                         "log is complete (write new files beside the old ones, not over them)")


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
                pieces.append(Piece(f.path, tuple(group), rows, f.identity))
                group, rows = [], 0
            group.append(i)
            rows += n
        if group:
            pieces.append(Piece(f.path, tuple(group), rows, f.identity))
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


@contextmanager
def _open_parquet(fs, path: str) -> Iterator[pq.ParquetFile]:
    """``path`` on ``fs`` as a ``ParquetFile`` that verifies page checksums; a local file through pyarrow's own
    reader (no Python file object between it and the disk: a few percent of a piece's decode time)."""
    if "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol):
        with pq.ParquetFile(path, page_checksum_verification=True) as pf:
            yield pf
    else:
        with fs.open(path, "rb") as fh:
            yield pq.ParquetFile(fh, page_checksum_verification=True)


def _read_piece(piece: Piece, spec: ScanSpec) -> pa.Table:
    """The piece's columns; a file that fails to decode is one ``MfsimError`` naming it and the column.

    Page checksums are verified where the writer stored them, so a corrupt page in such a file is
    an error rather than wrong values.
    """
    fs, _ = _filesystem(spec.url)
    cols = [c for c in (spec.user_col, spec.item_col, spec.weight_col, spec.ts_col) if c]
    rgs = list(piece.row_groups)
    check_unchanged(fs, piece)
    try:
        with _open_parquet(fs, piece.path) as pf:
            table = pf.read_row_groups(rgs, columns=cols, use_threads=READ_THREADS)
        check_unchanged(fs, piece)  # and not during the read
        return table
    except (pa.ArrowException, OSError) as exc:
        check_unchanged(fs, piece)  # a file cut short while it was read: say so, not "corrupt"
        where = _failing_column(fs, piece.path, rgs, cols)
        raise MfsimError(f"{piece.path} is corrupt: {where}cannot be decoded ({_one_line(exc)}); "
                         "replace or remove the file") from exc


def _failing_column(fs, path: str, row_groups: list[int], cols: list[str]) -> str:
    """``"column 'c' in row group g "`` for the first column chunk of ``path`` that fails to decode, else ``""``.

    Runs only after a read failed, to say which column chunk is corrupt; reads one chunk at a time.
    """
    try:
        with _open_parquet(fs, path) as pf:
            for col in cols:
                for rg in row_groups:
                    try:
                        pf.read_row_group(rg, columns=[col])
                    except (pa.ArrowException, OSError):
                        return f"column '{col}' in row group {rg} "
    except (pa.ArrowException, OSError):
        pass
    return ""


@dataclass
class CleanRows:
    """One piece after the time window and the invalid-row filters: its kept rows and what was dropped."""

    users: pa.Array
    items: pa.Array
    weights: np.ndarray  # float32
    ts: np.ndarray | None  # int64 microseconds, when the spec reads a timestamp column
    n_read: int
    outside_window: int
    invalid: dict[str, int]

    def summary(self) -> dict[str, Any]:
        """Row counts by outcome, for the client; ``n_nonzero`` counts the kept rows whose weight is not zero
        (X stores only those)."""
        return {"n_read": self.n_read, "outside_window": self.outside_window, "invalid": self.invalid,
                "n_kept": len(self.weights), "n_nonzero": int(np.count_nonzero(self.weights))}


def read_clean(piece: Piece, spec: ScanSpec) -> CleanRows:
    """Read, window and validate one piece (raises ``MfsimError`` when it cannot be read).

    Deterministic: both passes of ``ingest`` call it and keep the same rows. Weights are read via
    float64 into float32 (float32 columns without nulls as they are: the same values), so large
    integers round instead of failing the cast and values beyond the float32 range become inf and
    are counted as ``inf_weight``, as they would be stored.
    """
    t = _read_piece(piece, spec)
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
        if w_arr.type == pa.float32() and not w_arr.null_count:
            weights = w_arr.to_numpy()  # what the float64 round trip gives, without it
        else:
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
    return CleanRows(users=users, items=items, weights=weights, ts=ts_s, n_read=n_read, outside_window=outside,
                     invalid=counts)


def scan_ids(index: int, piece: Piece, spec: ScanSpec) -> dict[str, Any]:
    """Pass 1 on one piece: ``{"summaries": [(index, summary)], "user_ids": ..., "item_ids": ...}``, keeping no row.

    The ids come sorted and unique (``id_counts``), ready for ``union_scans``, the users with their
    kept rows (``"user_rows"``, int64: what pass 2 balances the workers' blocks by). A piece that
    cannot be read has ``{"error": message}`` as its summary and no ids (``None``) instead of
    raising, so the client reports it as one line (a raising task would also print a worker
    traceback).
    """
    try:
        rows = read_clean(piece, spec)
    except MfsimError as exc:
        return {"summaries": [(index, {"error": str(exc)})], "user_ids": None, "user_rows": None, "item_ids": None}
    user_ids, user_rows = id_counts(rows.users)
    return {"summaries": [(index, rows.summary())], "user_ids": user_ids, "user_rows": user_rows,
            "item_ids": sorted_unique(rows.items)}


def union_scans(*nodes: dict[str, Any]) -> dict[str, Any]:
    """Pass-1 results of several pieces as one: their summaries, and the unions of their ids (``None`` for none),
    the users' rows summed."""
    out: dict[str, Any] = {"summaries": [s for n in nodes for s in n["summaries"]]}
    users = [n for n in nodes if n["user_ids"] is not None]
    out["user_ids"], out["user_rows"] = (None, None) if not users else id_counts(
        pa.concat_arrays([n["user_ids"] for n in users]), np.concatenate([n["user_rows"] for n in users]))
    items = [n["item_ids"] for n in nodes if n["item_ids"] is not None]
    out["item_ids"] = union_ids(*items) if items else None
    return out


def _to_us(t: dt.datetime) -> int:
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return int(round(t.timestamp() * 1_000_000))


def id_counts(ids: pa.Array, weights: np.ndarray | None = None) -> tuple[pa.Array, np.ndarray]:
    """The distinct values of ``ids``, sorted, and how often each occurs (int64; with ``weights``, their sums).

    Integer ids without nulls whose range is at most about 4 times their number are counted in an
    array over the range (O(n + range), no hash table, no sort); others are grouped by pyarrow and
    sorted.
    """
    if pa.types.is_integer(ids.type) and len(ids) and not ids.null_count:
        v = ids.to_numpy()
        lo, hi = v.min(), v.max()
        if int(hi) - int(lo) <= 4 * len(v) + 1_000_000:
            present, n = count_ids(v, lo, int(hi) - int(lo) + 1, np.zeros(0, np.int32) if weights is None else weights)
            return pa.array(present.astype(v.dtype) + lo, type=ids.type), n
    w = np.ones(len(ids), np.int64) if weights is None else weights
    g = pa.table({"id": ids, "n": w}).group_by("id").aggregate([("n", "sum")])
    g = g.take(pc.sort_indices(g["id"]))
    return g["id"].combine_chunks(), g["n_sum"].to_numpy()


def sorted_unique(ids: pa.Array) -> pa.Array:
    """The distinct values of ``ids``, sorted (``id_counts`` without the counts)."""
    return id_counts(ids)[0]


def union_ids(*arrays: pa.Array) -> pa.Array:
    """Sorted unique union of id arrays (exact, so any grouping of a reduction gives the same result)."""
    return sorted_unique(pa.concat_arrays(list(arrays)))


def max_ts(piece: Piece, spec: ScanSpec) -> dict[str, Any]:
    """``{"max_ts": v}``: the largest timestamp of a piece in microseconds (None if all null), for a default ``as_of``.

    A piece that cannot be read gives ``{"error": message}``, as in ``scan_ids``.
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
    """Maps original ids to positions in a sorted id array (a lookup table for compact integer ids).

    Positions are int32 (int64 beyond 2**31 - 1 ids).
    """

    def __init__(self, sorted_ids: pa.Array):
        self.ids = sorted_ids
        self.lut = None
        if pa.types.is_integer(sorted_ids.type) and len(sorted_ids):
            vals = sorted_ids.to_numpy()
            lo, hi = int(vals[0]), int(vals[-1])
            if hi - lo <= 4 * len(vals) + 1_000_000:
                self.lo = vals[0]
                self.lut = np.full(hi - lo + 1, -1, dtype=self.dtype)
                self.lut[vals - self.lo] = np.arange(len(vals), dtype=self.dtype)

    @property
    def dtype(self) -> type:
        """The positions' dtype."""
        return np.int32 if len(self.ids) < 2**31 else np.int64

    def positions(self, values: pa.Array) -> np.ndarray | None:
        """Position of each value in the sorted ids; ``None`` when a value is not among them."""
        if not len(values):
            return np.zeros(0, self.dtype)
        if self.lut is not None:
            pos, known = lookup(values.to_numpy(), self.lo, self.lut)
            return pos if known else None
        pos = pc.index_in(values, value_set=self.ids)
        return None if pos.null_count else pos.to_numpy().astype(self.dtype, copy=False)


def id_index(scanned: dict[str, Any], key: str) -> IdIndex | None:
    """The ``IdIndex`` of the ids ``scanned[key]`` (the root of pass 1, ``"user_ids"`` or ``"item_ids"``); None where
    no piece could be read (the run then stops at the scan's errors)."""
    return IdIndex(scanned[key]) if scanned[key] is not None else None


# pass 2: each piece's entries, bucketed by row block, folded into running blocks, piece after piece


@dataclass(frozen=True)
class BlockLayout:
    """X's row blocks, the units pass 2 folds them in, and how it groups the units: block ``b`` holds rows
    ``offsets[b]:offsets[b + 1]`` and units ``first_unit[b]:first_unit[b + 1]`` (``fold_units``: one, or several
    for a block of more than a fold group's share of the log), unit ``u`` holds rows ``units[u]:units[u + 1]``
    and belongs to group ``group_of[u]`` (one group of running units per worker thread)."""

    offsets: np.ndarray  # int64 (n_blocks + 1,)
    units: np.ndarray  # int64 (n_units + 1,): the units' first rows, every block's first row among them
    first_unit: np.ndarray  # int64 (n_blocks + 1,)
    block_rows: int
    n_cols: int
    group_of: np.ndarray  # int64 (n_units,), each in [0, n_groups)
    n_groups: int
    pending_min: np.ndarray  # int64 (n_groups,): a group merges its unmerged entries into its units once it holds
    pending_max: np.ndarray  # more than pending_limit(its units' entries, group) of them: see there
    keep_ts: bool

    @property
    def n_blocks(self) -> int:
        """Number of row blocks."""
        return len(self.offsets) - 1

    @property
    def n_units(self) -> int:
        """Number of units."""
        return len(self.units) - 1

    def pending_limit(self, nnz: int, group: int) -> int:
        """How many unmerged entries ``group``, with ``nnz`` entries in its units, may hold: a quarter of ``nnz``
        (each merge copies the units, so merges come no more often than every quarter of them), but at
        least ``pending_min`` (its share of a piece: few merges of small units) and at most ``pending_max``."""
        return min(int(self.pending_max[group]), max(int(self.pending_min[group]), nnz // 4))

    def units_of(self, group: int) -> list[int]:
        """The units of ``group``, in order."""
        return np.flatnonzero(self.group_of == group).tolist()

    def slots(self) -> tuple[np.ndarray, np.ndarray]:
        """(slot of each unit, first slot of each group + the end): the units ordered group by group."""
        slot_of_unit = np.empty(self.n_units, np.int64)
        slot_of_unit[np.argsort(self.group_of, kind="stable")] = np.arange(self.n_units)
        starts = np.zeros(self.n_groups + 1, np.int64)
        np.cumsum(np.bincount(self.group_of, minlength=self.n_groups), out=starts[1:])
        return slot_of_unit, starts


def fold_units(user_rows: np.ndarray, offsets: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Pass 2's units of X's blocks (``offsets``) for ``n_groups`` fold groups: ``(units, first_unit)`` as
    ``BlockLayout`` has them. A unit is folded by one chain of tasks, so a block of the most active users, folded
    whole, is the ingest's critical path (at 1M users x 200k items x 50M the first block holds 26% of the log, at
    200k x 50k x 5M 57%). Each block whose users' rows in the log (``user_rows``, pass 1's count per user) are more
    than a group's share (``1 / n_groups`` of the log) is cut, at users, into units of about equal rows, each at
    most half a share where its users allow (a user is never cut); every other block is one unit. The cut is kept
    only where it makes the heaviest group (``assign_groups``) at most ``CUT_GAIN`` of the heaviest with whole
    blocks: a block of several units is joined at the end, one more copy of its entries."""
    user_rows = np.asarray(user_rows, np.int64)
    offsets = np.asarray(offsets, np.int64)
    n_blocks = len(offsets) - 1
    whole = offsets.copy(), np.arange(n_blocks + 1, dtype=np.int64)
    cum = np.concatenate([[0], np.cumsum(user_rows)])
    total = float(cum[-1])
    if n_groups < 2 or not total > 0:
        return whole
    units, first_unit = [int(offsets[0])], [0]
    for b in range(n_blocks):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        weight = float(cum[hi] - cum[lo])
        if weight > total / n_groups:
            pieces = int(np.ceil(weight / (total / (2 * n_groups))))
            # the unit ending at user i takes users up to the first whose running rows reach its part of the block
            ends = np.searchsorted(cum[lo + 1 : hi + 1] - cum[lo], weight * np.arange(1, pieces) / pieces) + lo + 1
            units += sorted({int(e) for e in ends if lo < e < hi})
        units.append(hi)
        first_unit.append(len(units) - 1)
    cut = np.asarray(units, np.int64), np.asarray(first_unit, np.int64)

    def heaviest(bounds: np.ndarray) -> float:
        weights = cum[bounds[1:]] - cum[bounds[:-1]]
        return float(np.bincount(assign_groups(weights, n_groups), weights=weights, minlength=n_groups).max())

    return cut if heaviest(cut[0]) <= CUT_GAIN * heaviest(whole[0]) else whole


#: ``fold_units`` cuts blocks into units only where that makes the heaviest fold group at most this fraction of
#: the heaviest with whole blocks (2 groups and a first block of 57% of the log: 56% after a cut, kept whole).
CUT_GAIN = 0.8


def encode_piece(piece: Piece, spec: ScanSpec, user_index: IdIndex, item_index: IdIndex,
                 layout: BlockLayout) -> list[tuple[np.ndarray, ...]]:
    """Pass 2 on one piece: read and validate it again (``read_clean``), map ids to indices, bucket by unit.

    Returns one bucket per group: ``(rows, cols, vals, ts, bounds)``, its entries sorted by unit
    (the group's units in order, stably: the piece's order within a unit), ``rows`` local to
    their unit (int32), ``ts`` empty when not kept, and the entries of the group's ``j``-th unit
    at ``bounds[j]:bounds[j + 1]``. An id not seen by pass 1 (the file changed in between) is an
    ``MfsimError``.
    """
    rows = read_clean(piece, spec)
    users = user_index.positions(rows.users)
    items = item_index.positions(rows.items)
    if users is None or items is None:
        raise MfsimError(f"{piece.path} changed while it was read (ids that its first read did not have); "
                         "ingest a log whose files do not change")
    weights, ts = rows.weights, rows.ts if layout.keep_ts and rows.ts is not None else np.zeros(0, np.int64)
    del rows  # the piece's id columns, before the buckets are allocated
    slot_of_unit, starts = layout.slots()
    *entries, bounds = bucket_entries(users, items, weights, ts, layout.block_rows, layout.first_unit, layout.units,
                                      slot_of_unit)
    del users, items
    out = []
    for g in range(layout.n_groups):
        lo, hi = bounds[starts[g]], bounds[starts[g + 1]]
        out.append((*(a[lo:hi] if len(a) else a for a in entries), bounds[starts[g] : starts[g + 1] + 1] - lo))
    return out


def group_bucket(encoded: list[tuple[np.ndarray, ...]], group: int) -> tuple[np.ndarray, ...]:
    """One group's bucket of an ``encode_piece`` result, copied out of the piece's arrays (a task of its own, so
    only it travels, and the piece's arrays are freed once every group has its bucket)."""
    return tuple(np.array(a) for a in encoded[group])


class RunningBlocks:
    """The running units of one group in pass 2 (``BlockLayout``: a block, or part of one): each a CSR of the
    entries folded so far (duplicates summed, in piece order), plus the buckets not merged into them yet.

    It lives on one worker and is folded in place: ``fold_piece`` hands on the object it was given
    (its previous key has no other reader), so a worker holds each of its units once, plus at most
    ``pending_limit`` unmerged entries, plus one unit being merged.
    """

    def __init__(self, layout: BlockLayout, group: int):
        self.layout = layout
        self.group = group
        self.blocks = list(layout.units_of(group))  # its units
        n_rows = np.diff(layout.units)
        ts0 = np.zeros(0, np.int64)
        self.csr = [(np.zeros(n_rows[b] + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), ts0)
                    for b in self.blocks]
        self.pending: list[tuple[np.ndarray, ...]] = []
        self.n_pending = 0
        self.nnz = 0  # entries in the units (merged)
        self.last_piece = -1
        self.final: list[CSRBlock] | None = None

    def __sizeof__(self) -> int:  # what Dask counts for this object
        arrays = [a for t in (*self.csr, *self.pending) for a in t]
        arrays += [a for blk in self.final or [] for a in (blk.indptr, blk.indices, blk.data, blk.ts) if a is not None]
        return 200 + sum(a.nbytes for a in arrays)

    def merge(self, final: bool) -> None:
        """Merge the pending buckets into the units, one unit at a time; ``final``: drop the entries that sum
        to zero and size every unit's arrays to its entries (a running unit may keep some slack)."""
        for j in range(len(self.blocks)):
            parts = [[p[i][p[4][j] : p[4][j + 1]] for p in self.pending] for i in range(4)]
            new = [np.concatenate(a) if len(a) > 1 else a[0] for a in parts] if self.pending else None
            if new is None or not len(new[0]):
                if not final:
                    continue  # nothing to add: the block as it is
                new = [np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.int64)]
            self.csr[j] = csr_add_coo(*self.csr[j], *new, final, final)
        self.pending, self.n_pending = [], 0
        self.nnz = sum(len(c[1]) for c in self.csr)


def fold_piece(state: RunningBlocks | None, bucket: tuple[np.ndarray, ...], piece_index: int, layout: BlockLayout,
               group: int) -> RunningBlocks:
    """Fold piece ``piece_index``'s bucket into a group's running units (``None``: a new group, for piece 0).

    The bucket is kept pending; once the group holds more than ``layout.pending_limit`` pending
    entries, they are merged into its units (``csr_add_coo``). When they are merged does not change
    a bit of the result: every position is summed one entry at a time in piece order. Pieces must
    come in order; a piece already folded (a task run twice) leaves the state as it is.
    """
    if state is None:
        state = RunningBlocks(layout, group)
    if piece_index <= state.last_piece:
        return state
    if piece_index != state.last_piece + 1:
        raise RuntimeError(f"ingest: piece {piece_index} folded after piece {state.last_piece}")
    state.pending.append(bucket)
    state.n_pending += len(bucket[0])
    state.last_piece = piece_index
    if state.n_pending > layout.pending_limit(state.nnz, state.group):
        state.merge(final=False)
    return state


def finish_blocks(state: RunningBlocks) -> RunningBlocks:
    """The group's final units: pending entries merged, entries that sum to zero dropped, as ``CSRBlock``."""
    if state.final is None:
        state.merge(final=True)
        keep_ts = state.layout.keep_ts
        state.final = [CSRBlock(indptr, indices, data, state.layout.n_cols,
                                ts if keep_ts and len(ts) == len(data) and len(ts) else None)
                       for indptr, indices, data, ts in state.csr]
        state.csr = []
    return state


def unit_block(state: RunningBlocks, unit: int) -> CSRBlock:
    """Unit ``unit`` of a finished group (the same arrays: nothing is copied): X's block, or a part of one."""
    return state.final[state.blocks.index(unit)]


def joined_counts(*parts: tuple[np.ndarray, np.ndarray, float]) -> tuple[np.ndarray, np.ndarray, float]:
    """``block_counts`` of consecutive rows from those of their parts, in order: a block's from its units'
    (``joined_rows``), X's from its blocks'."""
    return (np.concatenate([rows for rows, _, _ in parts]), np.sum([cols for _, cols, _ in parts], axis=0),
            max(largest for _, _, largest in parts))


def joined_rows(keep_ts: bool, *parts: CSRBlock) -> CSRBlock:
    """One block of ``parts``' rows, one part after another (a block folded in several units): the same arrays as
    the block folded whole (each row's entries, and its timestamps when ``keep_ts``, as its unit has them)."""
    nnz = np.cumsum([0] + [part.nnz for part in parts])
    indptr = np.concatenate([parts[0].indptr[:1]] + [part.indptr[1:] + nnz[i] for i, part in enumerate(parts)])
    ts = None  # as ``finish_blocks`` has it: one timestamp per entry, or none
    if keep_ts and nnz[-1] and all(part.ts is not None for part in parts if part.nnz):
        ts = np.concatenate([part.ts if part.ts is not None else np.zeros(0, np.int64) for part in parts])
    return CSRBlock(indptr, np.concatenate([part.indices for part in parts]),
                    np.concatenate([part.data for part in parts]), parts[0].n_cols, ts)


def block_counts(block: CSRBlock) -> tuple[np.ndarray, np.ndarray, float]:
    """(non-zeros per row, non-zeros per column, largest |value|: ``block_max_abs``) of a block."""
    return (np.diff(block.indptr), np.bincount(block.indices, minlength=block.n_cols).astype(np.int64),
            block_max_abs(block))


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


# how much of the log is on the workers at once (see ``_scan_pass`` and ``_fold_pass``)
SCAN_FAN_IN = 8  # pass-1 results per union task
PIECES_IN_FLIGHT_PER_THREAD = 2  # pass 2: pieces read but not yet folded, per worker thread
PENDING_PIECES = 4  # pass 2: a group keeps at most this many pieces' share unmerged (``piece_shares``)


def _worker_slots(client) -> list[str | None]:
    """One worker address per worker thread the work is planned for (``shared.cluster_threads``: the client's, or
    ``planned_threads``'s count over the same workers), the workers taken in turn (each one's first thread, then each
    one's second, ...: the first slots spread over the workers); ``[None]`` without workers (or without a client:
    in this process)."""
    if client is None:
        return [None]
    nthreads = client.nthreads()
    addrs = sorted(nthreads)
    slots = [a for t in range(max(nthreads.values(), default=0)) for a in addrs if nthreads[a] > t]
    if not slots:
        return [None]
    return [slots[i % len(slots)] for i in range(max(1, cluster_threads(client)))]


def _wait_for(futures: list[Any]) -> None:
    """Wait until ``futures`` are done; raise the error of the first that failed (values, made in this process, are
    done)."""
    futures = [f for f in futures if is_future(f)]
    if not futures:
        return
    from distributed import wait

    wait(futures)
    for f in futures:
        if f.status == "error":
            f.result()


def _scan_pass(client, pieces: list[Piece], spec: ScanSpec):
    """Pass 1: ``scan_ids`` of every piece, reduced by ``union_scans`` into one root future (``None``: no piece).

    The union tree is built as the pieces are submitted, ``SCAN_FAN_IN`` results per union at every
    level, and the client submits a batch of ``SCAN_FAN_IN`` pieces only once the union of the batch
    two before it is done: at most ``2 * SCAN_FAN_IN`` pieces' results are waiting for a union, and
    ``SCAN_FAN_IN - 1`` per level above, whatever the length of the log.
    """
    run = runner(client)
    levels: list[list[Any]] = [[]]
    batches: deque = deque()  # unions of the leaf batches not yet waited for

    def push(level: int, future) -> None:
        if len(levels) == level:
            levels.append([])
        levels[level].append(future)
        if len(levels[level]) == SCAN_FAN_IN:
            node = run.submit(union_scans, *levels[level], pure=False)
            levels[level] = []
            if level == 0:
                batches.append(node)
            push(level + 1, node)

    for k, piece in enumerate(pieces):
        if k % SCAN_FAN_IN == 0 and len(batches) >= 2:
            _wait_for([batches.popleft()])
        push(0, run.submit(scan_ids, k, piece, spec, pure=False))
    rest = [f for level in reversed(levels) for f in level]
    if len(rest) <= 1:
        return rest[0] if rest else None
    return run.submit(union_scans, *rest, pure=False)


def assign_groups(weights: np.ndarray, n_groups: int) -> np.ndarray:
    """Each block's group: heaviest block first, each to the group with the least weight so far (the first
    such group on a tie), so that the groups' weights (the blocks' rows in the log) come out about even."""
    group_of = np.zeros(len(weights), np.int64)
    load = np.zeros(n_groups)
    for b in np.argsort(-np.asarray(weights, np.float64), kind="stable"):
        g = int(np.argmin(load))
        group_of[b] = g
        load[g] += weights[b]
    return group_of


def piece_shares(block_weights: np.ndarray, group_of: np.ndarray, n_groups: int, piece_rows: int) -> np.ndarray:
    """Each group's share of a piece of ``piece_rows`` rows, for its merge limits (int64, at least 1): an even split
    (``piece_rows / n_groups``), or the piece's rows in proportion to the group's blocks' rows in the log where that
    is more. A group of the most active users gets most of each piece: with the even split it merged its blocks at
    almost every piece, each merge copying them (measured at 1M users x 200k items x 50M, 16 groups: the heaviest
    group's 32 folds took 1.55 s, the others' 0.1-0.4 s: the ingest's critical path; 0.80 s with its share). The
    other groups keep the even split: smaller shares merged them more often (ingest's work +11%). A worker so holds
    at most ``2 x PENDING_PIECES`` pieces' entries unmerged."""
    even = max(1, piece_rows // max(1, n_groups))
    weight = np.bincount(group_of, weights=np.asarray(block_weights, np.float64), minlength=n_groups)
    total = float(weight.sum())
    if not total > 0:
        return np.full(n_groups, even, np.int64)
    return np.maximum(even, np.ceil(piece_rows * weight / total)).astype(np.int64)


def fold_window(n_slots: int) -> int:
    """Pass 2's window: the most pieces read (or being read) and not yet folded into every group."""
    return PIECES_IN_FLIGHT_PER_THREAD * n_slots


def _fold_pass(client, pieces: list[Piece], spec: ScanSpec, *, uidx, iidx, offsets: np.ndarray, n_cols: int,
               user_rows: np.ndarray, cfg: IngestSection) -> tuple[list[Any], list[Any]]:
    """Pass 2: ``encode_piece`` of every piece, folded piece by piece into running units; X's block futures, and
    each block's ``block_counts`` (a block of several units: its units' counts, joined by ``joined_counts``, so the
    first minimum-support round need not wait for the block's join and count it whole).

    One group per worker thread, and no more groups than blocks; X's blocks are folded in units (``fold_units``: a
    block of more than a group's share of the log in several, by ``user_rows``, pass 1's rows per user), the units
    spread over the groups (``assign_groups`` by their rows in the log), each group a chain of ``fold_piece`` tasks
    in piece order on its worker, so a worker folds only its own units; ``finish_blocks`` and ``unit_block`` end
    each chain, and ``joined_rows`` makes a block of several units, on the worker of its largest. Before submitting
    piece ``k`` the client waits until piece ``k - fold_window`` is folded into every group, so at most that many
    pieces' buckets are on the workers unfolded, and each group holds at most ``PENDING_PIECES`` pieces' share of
    entries unmerged, and no more than a quarter of its units' entries once that is more than a piece's share
    (``BlockLayout.pending_limit``): a worker's memory is its units plus what ``ingest.partition_rows`` bounds,
    whatever the length of the log (and a block of several units once more while it is joined). The chains keep
    the lineage: a block lost with its worker is rebuilt by rerunning its groups' chains from the Parquet pieces.
    """
    run = runner(client)
    # no more groups than blocks (each group's tasks cost a task a piece, whatever its size); a block of more than a
    # group's share of the log in several units, spread over the groups
    slots = _worker_slots(client)[: max(1, len(offsets) - 1)]
    n_groups = len(slots)
    units, first_unit = fold_units(user_rows, offsets, n_groups)
    cum = np.concatenate([[0], np.cumsum(np.asarray(user_rows, np.int64))])
    unit_weights = cum[units[1:]] - cum[units[:-1]]
    group_of = assign_groups(unit_weights, n_groups)
    share = piece_shares(unit_weights, group_of, n_groups, cfg.partition_rows)
    layout = BlockLayout(offsets=offsets, units=units, first_unit=first_unit, block_rows=cfg.block_rows, n_cols=n_cols,
                         group_of=group_of, n_groups=n_groups, pending_min=share, pending_max=PENDING_PIECES * share,
                         keep_ts=spec.keep_ts)
    window = fold_window(n_groups)
    states: list[Any] = [None] * n_groups
    in_flight: deque = deque()  # per piece not yet waited for: its fold futures (the states, folded in place)
    for k, piece in enumerate(pieces):
        if len(in_flight) >= window:
            _wait_for(in_flight.popleft())
        encoded = run.submit(encode_piece, piece, spec, uidx, iidx, layout, pure=False)
        for g in range(n_groups):
            bucket = run.submit(group_bucket, encoded, g, pure=True)
            states[g] = run.submit(fold_piece, states[g], bucket, k, layout, g, pure=False, worker=slots[g])
        in_flight.append(list(states))
    in_flight.clear()
    finished = [run.submit(finish_blocks, s, pure=False, worker=slots[g]) for g, s in enumerate(states)]
    parts = [run.submit(unit_block, finished[g], u, pure=True, worker=slots[g])
             for u, g in enumerate(layout.group_of.tolist())]
    counts = [run.submit(block_counts, part, pure=True, worker=slots[g])
              for part, g in zip(parts, layout.group_of.tolist())]
    blocks, per_block = [], []
    for b in range(layout.n_blocks):
        lo, hi = int(first_unit[b]), int(first_unit[b + 1])
        if hi - lo == 1:
            blocks.append(parts[lo])
            per_block.append(counts[lo])
            continue
        where = slots[int(group_of[lo + int(np.argmax(unit_weights[lo:hi]))])]  # its largest unit's worker
        blocks.append(run.submit(joined_rows, spec.keep_ts, *parts[lo:hi], pure=True, worker=where))
        per_block.append(run.submit(joined_counts, *counts[lo:hi], pure=True, worker=where))
    return blocks, per_block


def ingest(client, input_cfg: InputSection, cfg: IngestSection, path: str | None = None, *,
           keep_ts: bool = False, here_max_rows: int | None = None) -> IngestResult:
    """Read the log at ``path`` (default ``input_cfg.path``) into id maps and X's CSR row blocks.

    With ``keep_ts`` each block also carries the latest timestamp of each (user, item) entry. Without a client the
    same steps run in this process, and X's blocks are arrays here; ``here_max_rows``: so too for a log of at most
    this many rows (``blocks.INGEST_HERE_MAX_ROWS``; ``IngestResult.ran_on`` says where it ran). ``client`` may be a
    function that returns one (e.g. starts a cluster), called only when the log goes to the workers.
    """
    url = path or input_cfg.path
    fs, file_paths = resolve_input(url)
    columns = input_columns(input_cfg, cfg, keep_ts)
    use_window = cfg.window_days is not None or cfg.as_of is not None
    files, id_types = inspect_files(fs, file_paths, columns)
    pieces = plan_pieces(files, cfg.partition_rows)
    total_rows = sum(p.n_rows for p in pieces)
    if here_max_rows is not None and total_rows <= here_max_rows:
        client = None
    elif callable(client):
        client = client()
    run = runner(client)
    log.info("ingest: %d files, %d pieces, %d rows%s", len(files), len(pieces), total_rows,
             f" (read in the {where_of(client)})")

    spec = ScanSpec(user_col=input_cfg.user_col, item_col=input_cfg.item_col, weight_col=input_cfg.weight_col,
                    ts_col=input_cfg.ts_col if (use_window or keep_ts) else None, window_start=None, window_end=None,
                    on_invalid=cfg.on_invalid, url=url, keep_ts=keep_ts, user_type=id_types.get("user"),
                    item_type=id_types.get("item"))
    if use_window:
        end = cfg.as_of
        if end is None:
            results = run.gather([run.submit(max_ts, p, spec, pure=True) for p in pieces])
            raise_piece_errors(results)
            maxes = [r["max_ts"] for r in results if r["max_ts"] is not None]
            try:
                end = (dt.datetime.fromtimestamp(max(maxes) / 1e6, dt.timezone.utc) + dt.timedelta(microseconds=1)
                       if maxes else dt.datetime.now(dt.timezone.utc))
            except (OverflowError, ValueError, OSError):
                raise MfsimError(f"column '{input_cfg.ts_col}' (input.ts_col) of {url} holds a timestamp at the end of "
                                 "what dates can hold (year 9999), so the window cannot end just after its newest "
                                 "row; set ingest.as_of, or fix that timestamp") from None
        try:
            start = end - dt.timedelta(days=cfg.window_days) if cfg.window_days is not None else None
        except (OverflowError, ValueError):
            raise MfsimError(f"ingest.window_days={cfg.window_days:g} before {end.isoformat()} begins before the year "
                             "1; lower ingest.window_days") from None
        spec = dataclasses.replace(spec, window_start=start, window_end=end)

    clock = _PhaseClock()
    root = _scan_pass(client, pieces, spec)
    # the id maps as tasks on the root, not scattered: X's blocks keep their lineage back to the Parquet pieces, so a
    # block lost with its worker is rebuilt (pipeline.shared); submitted before the root comes here, so that they are
    # made while this process reads the scan's summaries and plans the fold
    uidx, iidx = ((run.submit(id_index, root, key, pure=False) for key in ("user_ids", "item_ids"))
                  if root is not None else (None, None))
    scanned = run.gather(root) if root is not None else {"summaries": [], "user_ids": None, "item_ids": None}
    hold_between_passes()
    summaries = [s for _, s in sorted(scanned["summaries"], key=operator.itemgetter(0))]
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
    user_ids, item_ids = scanned["user_ids"], scanned["item_ids"]
    n_users, n_items = len(user_ids), len(item_ids)
    n_blocks = max(1, -(-n_users // cfg.block_rows))
    offsets = np.minimum(np.arange(n_blocks + 1, dtype=np.int64) * cfg.block_rows, n_users)
    user_rows = scanned["user_rows"]
    del scanned
    clock.lap("scan and id maps")
    blocks, per_block = _fold_pass(client, pieces, spec, uidx=uidx, iidx=iidx, offsets=offsets, n_cols=n_items,
                                   user_rows=user_rows, cfg=cfg)
    X = RowBlocks(blocks, offsets, n_items, client)
    _wait_for(blocks)
    clock.lap("blocks")
    X, user_ids, item_ids, user_counts, item_counts, support, largest = _minimum_support(
        client, X, user_ids, item_ids, cfg.min_user_interactions, cfg.min_item_interactions, first_counts=per_block)
    clock.lap("minimum support")
    counts.update(support)
    nnz = int(user_counts.sum())
    X.nnz = nnz
    check_float32_range(largest, nnz, input_cfg.weight_col, url)
    counts.update(n_users=len(user_ids), n_items=len(item_ids), nnz=nnz,
                  duplicates_merged=int(n_kept - support["nnz_before_support"]))
    if nnz == 0:
        raise MfsimError(f"input {url} is empty after the minimum-support filter "
                         f"(ingest.min_user_interactions={cfg.min_user_interactions}, "
                         f"ingest.min_item_interactions={cfg.min_item_interactions}); lower them")
    file_info = [{"path": f.path, "size": f.size, "rows": int(sum(f.row_groups)), "version": list(f.identity[1:])}
                 for f in files]
    return IngestResult(X=X, user_ids=user_ids, item_ids=item_ids, user_counts=user_counts, item_counts=item_counts,
                        files=file_info, counts=counts, ran_on=where_of(client))


def _files_where(pieces: list[Piece], summaries: list[dict[str, Any]], pick) -> str:
    """The files of the pieces whose summary ``pick`` selects: the first by name, then how many more."""
    paths = list(dict.fromkeys(p.path for p, s in zip(pieces, summaries) if pick(s)))
    return paths[0] + (f" (and {len(paths) - 1} more files)" if len(paths) > 1 else "")


#: The largest ``weight^2 x non-zeros`` X may have: the SVD's products sum about that much in float32 (its largest
#: value 3.4e38), here with a margin of 300 for the Gram matrices' sums of such products.
FLOAT32_WORK_BOUND = 1e36


def block_max_abs(block: CSRBlock) -> float:
    """The largest |value| of a block (0 for an empty one)."""
    return float(np.max(np.abs(block.data))) if len(block.data) else 0.0


def check_float32_range(largest: float, nnz: int, weight_col: str | None, url: str) -> None:
    """One error, at ingest, for weights too large for float32 arithmetic (``FLOAT32_WORK_BOUND``) instead of an
    overflow deep in the SVD (an ``Eigenvalues did not converge`` of infs)."""
    if largest * largest * max(nnz, 1) > FLOAT32_WORK_BOUND:
        bound = (FLOAT32_WORK_BOUND / max(nnz, 1)) ** 0.5
        raise MfsimError(f"column '{weight_col}' (input.weight_col) of {url} holds weights up to {largest:.3g} (after "
                         f"summing duplicate pairs): with {nnz:,} non-zeros the SVD's float32 sums would overflow "
                         f"above {bound:.3g}; rescale the weights (divide by a constant, or take log1p) before the run")


def _minimum_support(client, X: RowBlocks, user_ids, item_ids, min_user: int, min_item: int, first_counts=None):
    """Drop users and items below the minimum support, repeatedly, until stable; re-index contiguously.

    Users and items left with no interactions (all weights zero) are dropped in any case. Returns X, the ids, the
    counts per user and per item, the support's entries of the manifest's counts, and the largest |value| of the
    returned X (read in the same round as its counts, for ``check_float32_range``). ``first_counts``: X's blocks'
    ``block_counts`` (futures or values) where they are known already (``_fold_pass``), for the first round.
    """
    run = runner(client)
    keep_u = np.ones(X.n_rows, dtype=bool)
    keep_i = np.ones(X.n_cols, dtype=bool)
    rounds = 0
    current = X
    nnz_before = None
    while True:
        first = first_counts is not None and current is X
        per_block = run.gather(first_counts if first else current.map(block_counts))
        row_nnz, col_nnz, largest = (joined_counts(*per_block) if per_block
                                     else (np.zeros(0, np.int64), np.zeros(X.n_cols, np.int64), 0.0))
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
        cmap = run.share(col_map, "column-map")
        for b, part in enumerate(current.parts):
            rows_ok = ok_u[current.row_offsets[b] : current.row_offsets[b + 1]]
            new_parts.append(run.submit(filter_block, part, rows_ok, cmap, int(ok_i.sum()), pure=True))
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
    return current, user_ids, item_ids, row_nnz.astype(np.int64), col_nnz.astype(np.int64), support, largest
