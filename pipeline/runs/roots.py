"""The one way in to an output root of either kind: ``open_root`` gives a ``posix.PosixRoot`` for a directory
(runs built out of sight and renamed into place) or an ``object_store.ObjectStoreRoot`` for an fsspec URL
(runs published by their manifest); both are ``root.Root``s, with the same calls.

A few calls start from a run's path rather than its root's: ``resolve_run`` (a run directory or URL, or
``<root>/LATEST``), ``read_manifest`` and ``read_run_table``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from mfsim.pipeline.runs.object_store import ObjectStoreRoot
from mfsim.pipeline.runs.posix import PosixRoot
from mfsim.pipeline.runs.root import Root
from mfsim.pipeline.runs.storage import is_remote

__all__ = ["locate_run", "open_root", "read_manifest", "read_run_table", "resolve_run"]


def _kind(path: str | Path) -> type[Root]:
    return ObjectStoreRoot if is_remote(path) else PosixRoot


def open_root(path: str | Path) -> Root:
    """The output root at ``path``: a local path or ``file://`` URL, or any other fsspec URL (``s3://...``)."""
    return _kind(path)(path)


def locate_run(run: str | Path) -> tuple[Root, str]:
    """The root that a run directory or URL (or ``<root>/LATEST``) lies in, and its name there."""
    return _kind(run).locate(run)


def resolve_run(path: str | Path) -> Any:
    """A published run from a run directory or URL, or ``<root>/LATEST``: its ``Path`` or URL; ``MfsimError``
    otherwise (``Root.resolve``)."""
    root, name = locate_run(path)
    return root.resolve(name)


def read_manifest(run: str | Path) -> dict[str, Any]:
    """The ``_manifest.json`` of the published run at ``run``; an ``MfsimError`` when there is none."""
    root, name = locate_run(run)
    return root.read_manifest(name)


def read_run_table(run: str | Path, relative: str) -> pa.Table:
    """One single-file table of a published run (``evaluation/metrics.parquet``), local or on a store."""
    root, name = locate_run(run)
    return root.read_table(f"{name}/{relative}")
