"""Where a run's files go: a local directory or an fsspec URL, as a small picklable value.

The driver and the workers write through the same ``Location``: the driver its small tables and
the manifest, each worker the Parquet parts it computed (lists, embeddings), so no list passes
through the driver. A local path (or ``file://`` URL) is written with the operating system's
calls; any other URL (``s3://``, ``gs://``, ``abfs://``, ``memory://``) through fsspec, whose
credentials and endpoints come from the usual places (environment, config files; for example
``AWS_ENDPOINT_URL`` or ``FSSPEC_S3_ENDPOINT_URL`` for an S3-compatible store).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
import pyarrow as pa
import pyarrow.parquet as pq

LOCAL_PROTOCOLS = ("file", "local")
# fsspec's in-memory store lives in one process: workers in other processes cannot see it, so the
# driver writes every file itself there (tests and notebooks; never a cluster).
PROCESS_LOCAL_PROTOCOLS = ("memory",)


def protocol_of(path: str | Path) -> str:
    """The URL's protocol (``s3``), or ``file`` for a plain path."""
    text = str(path)
    if "://" not in text:
        return "file"
    return text.split("://", 1)[0].lower()


def is_remote(path: str | Path) -> bool:
    """True for a URL that is not a local file (an object store or another fsspec filesystem)."""
    return protocol_of(path) not in LOCAL_PROTOCOLS


def local_path(path: str | Path) -> Path:
    """A plain path for a local path or ``file://`` URL, absolute, so that workers in other directories agree."""
    text = str(path)
    if "://" in text:
        text = text.split("://", 1)[1]
    return Path(os.path.abspath(os.path.expanduser(text)))


def normalize(path: str | Path) -> str:
    """``path`` as workers can use it: an absolute local path, or the URL without a trailing slash."""
    return str(path).rstrip("/") if is_remote(path) else str(local_path(path))


def filesystem(url: str):
    """The fsspec filesystem of ``url`` and the path inside it."""
    import fsspec

    return fsspec.core.url_to_fs(url)


def parquet_options(schema: pa.Schema) -> dict:
    """How every output table is written: zstd, and dictionary encoding for its string and binary columns only (ids
    repeated along a list). Numeric columns are written plain: dictionaries of item ids, ranks and scores cost more
    than they save (a 168k-row list part: 15 -> 8.5 ms, 964 -> 818 kB). Readers see the same schema and values."""
    strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
               or pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) or pa.types.is_dictionary(f.type)]
    return {"compression": "zstd", "use_dictionary": strings}


@dataclass(frozen=True)
class Location:
    """A directory (local) or a prefix (URL) that a run's files are written below.

    ``driver_only``: the store is visible in this process only (``memory://``), so workers hand
    their tables back instead of writing them.
    """

    base: str

    @classmethod
    def of(cls, path: str | Path) -> "Location":
        return cls(normalize(path))

    @property
    def remote(self) -> bool:
        return is_remote(self.base)

    @property
    def driver_only(self) -> bool:
        return protocol_of(self.base) in PROCESS_LOCAL_PROTOCOLS

    def join(self, relative: str) -> str:
        rel = Path(relative)
        if rel.is_absolute() or ".." in rel.parts or not relative:
            raise ValueError(f"run output path must be relative and inside the run: {relative}")
        return f"{self.base}/{rel.as_posix()}"

    def local(self, relative: str) -> Path:
        """The local path of ``relative`` (local locations only), its directory created."""
        p = Path(self.join(relative))
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_table(self, relative: str, table: pa.Table) -> int:
        """``table`` as Parquet (``parquet_options``) at ``relative``; its row count."""
        if self.remote:
            buf = io.BytesIO()
            pq.write_table(table, buf, **parquet_options(table.schema))
            self.write_bytes(relative, buf.getvalue())
        else:
            pq.write_table(table, self.local(relative), **parquet_options(table.schema))
        return table.num_rows

    def write_bytes(self, relative: str, data: bytes) -> None:
        """``data`` at ``relative`` (one PUT on an object store)."""
        if self.remote:
            fs, path = filesystem(self.join(relative))
            fs.pipe_file(path, bytes(data))
        else:
            self.local(relative).write_bytes(data)

    def read_bytes(self, relative: str) -> bytes:
        if self.remote:
            fs, path = filesystem(self.join(relative))
            return fs.cat_file(path)
        return Path(self.join(relative)).read_bytes()

    def exists(self, relative: str) -> bool:
        if self.remote:
            fs, path = filesystem(self.join(relative))
            return fs.exists(path)
        return os.path.lexists(self.join(relative))


@dataclass(frozen=True)
class Written:
    """What a task wrote: the file's path inside the run, its rows and its schema (for the manifest).

    ``table`` is set instead when the location is ``driver_only``: the driver writes it then.
    """

    relative: str
    rows: int
    schema: pa.Schema | None
    table: pa.Table | None = None
    error: tuple[int, str, str] | None = None  # (errno, strerror, path) of a failed write

    def __reduce__(self):
        # a pickled pa.Schema loses the field name of a fixed_size_list (pyarrow 26: "element" comes back as
        # "item"); Arrow's IPC form keeps it, so the manifest names the type that readers see
        ipc = self.schema.serialize().to_pybytes() if self.schema is not None else None
        return _written, (self.relative, self.rows, ipc, self.table, self.error)


def _written(relative: str, rows: int, schema_ipc: bytes | None, table: pa.Table | None,
             error: tuple[int, str, str] | None = None) -> Written:
    schema = pa.ipc.read_schema(pa.py_buffer(schema_ipc)) if schema_ipc is not None else None
    return Written(relative, rows, schema, table, error)


def write_part(location: Location, relative: str, table: pa.Table) -> Written:
    """Write ``table`` at ``relative`` below ``location`` (in a task); what was written.

    A failed write (a full disk, a read-only mount) comes back as ``error`` rather than raised, so the
    driver reports it as one line (``RunWriter.written``) instead of a worker's traceback.
    """
    if location.driver_only:
        return Written(relative, table.num_rows, table.schema, table)
    try:
        rows = location.write_table(relative, table)
    except OSError as exc:
        return Written(relative, 0, None, error=(exc.errno or 0, exc.strerror or str(exc), location.join(relative)))
    return Written(relative, rows, table.schema)
