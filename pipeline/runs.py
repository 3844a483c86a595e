"""Run directories, the manifest, and atomic publishing.

A run writes everything into a hidden temporary sibling ``<output>/.<run_id>.tmp-<pid>/``,
``_manifest.json`` last, then renames it to ``<output>/<run_id>/`` and replaces ``<output>/LATEST``
atomically. A crash before the rename leaves no visible run and earlier runs untouched.
This is the only module that writes run outputs (Parquet and JSON).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from mfsim.pipeline.errors import MfsimError

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MANIFEST = "_manifest.json"
LATEST = "LATEST"
PACKAGES = ("mfsim", "numpy", "scipy", "scikit-learn", "numba", "dask", "distributed", "pyarrow", "pandas", "pydantic")


def new_run_id(now: dt.datetime | None = None) -> str:
    """A sortable, unique run id: ``YYYYmmddTHHMMSSZ-xxxxxx``."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:6]}"


def validate_run_id(run_id: str) -> str:
    """``run_id`` if it is a safe directory name; an ``MfsimError`` saying what is allowed otherwise."""
    if not RUN_ID_PATTERN.match(run_id) or ".." in run_id:
        raise MfsimError(
            f"run id {run_id!r} is not allowed: use letters, digits, '.', '_' or '-' (no path separators, "
            "no '..', not starting with '.'), at most 128 characters"
        )
    return run_id


def package_versions() -> dict[str, str]:
    """Versions of the packages a run depends on, for its manifest."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


class RunWriter:
    """Collects a run's outputs in a temporary directory and publishes them atomically.

    Use as a context manager (``with RunWriter(root, run_id) as run: ...; run.publish(manifest)``);
    leaving the block without ``publish`` (an exception, a crash) removes the temporary directory.
    """

    def __init__(self, output_root: str | Path, run_id: str | None = None):
        self.root = Path(output_root)
        self.run_id = validate_run_id(new_run_id() if run_id is None else run_id)
        self.final = self.root / self.run_id
        if self.final.exists():
            raise MfsimError(
                f"run {self.final} already exists; pass another --run-id (or none for a fresh one) "
                "or remove that directory"
            )
        self.tmp = self.root / f".{self.run_id}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.timings: dict[str, float] = {}
        self.started = dt.datetime.now(dt.timezone.utc)
        self.published = False
        self.manifest: dict[str, Any] = {}

    def __enter__(self) -> "RunWriter":
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir()
        except OSError as exc:
            raise MfsimError(f"cannot create the run directory under {self.root}: {exc.strerror}; "
                             "choose a writable --output") from exc
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.published:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- writing ------------------------------------------------------------------------------
    def path(self, relative: str) -> Path:
        """A path inside the (temporary) run directory; parent directories are created."""
        rel = Path(relative)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"run output path must be relative and inside the run: {relative}")
        p = self.tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_table(self, relative: str, table: pa.Table) -> Path:
        """Write ``table`` as Parquet (zstd) at ``relative`` inside the run."""
        p = self.path(relative)
        pq.write_table(table, p, compression="zstd")
        return p

    def write_table_parts(self, relative: str, tables) -> Path:
        """One Parquet file from an iterable of tables with the same schema (streamed, bounded memory)."""
        p = self.path(relative)
        writer = None
        try:
            for t in tables:
                if writer is None:
                    writer = pq.ParquetWriter(p, t.schema, compression="zstd")
                writer.write_table(t)
        finally:
            if writer is not None:
                writer.close()
        return p

    def write_json(self, relative: str, obj: Any) -> Path:
        """Write ``obj`` as indented JSON at ``relative`` inside the run."""
        p = self.path(relative)
        p.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str))
        return p

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Times a stage; the wall time lands in the manifest under ``timings[name]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0, 4)

    # -- publishing ---------------------------------------------------------------------------
    def publish(self, manifest: dict[str, Any]) -> Path:
        """Write ``_manifest.json`` last, rename the run into place, then point LATEST at it."""
        manifest = dict(manifest)
        manifest.update(
            run_id=self.run_id,
            started_at=self.started.isoformat(),
            finished_at=dt.datetime.now(dt.timezone.utc).isoformat(),
            timings=dict(self.timings),
            versions=package_versions(),
            status="succeeded",
        )
        self.manifest = manifest
        self.write_json(MANIFEST, manifest)
        _fsync_dir(self.tmp)
        self._rename_into_place()
        self.published = True
        write_latest(self.root, self.run_id)
        return self.final

    def _rename_into_place(self) -> None:
        try:
            os.rename(self.tmp, self.final)
        except OSError as exc:
            raise MfsimError(f"could not publish {self.final}: {exc.strerror}; the run was not published") from exc


def write_latest(root: Path, run_id: str) -> None:
    """Replace ``root/LATEST`` atomically (write a temporary file, then ``os.replace``)."""
    tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    tmp.write_text(run_id + "\n")
    os.replace(tmp, root / LATEST)


def read_latest(root: str | Path) -> str | None:
    """The run id in ``<root>/LATEST``, or None when no run has succeeded there."""
    p = Path(root) / LATEST
    return p.read_text().strip() if p.is_file() else None


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The ``_manifest.json`` of a published run; an ``MfsimError`` when there is none."""
    p = Path(run_dir) / MANIFEST
    if not p.is_file():
        raise MfsimError(f"{run_dir} is not a published run (no {MANIFEST}); pass a directory written by mfsim run")
    return json.loads(p.read_text())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
