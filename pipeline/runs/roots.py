"""One way in to an output root of either kind: a POSIX directory (``pipeline.runs``: runs built out of sight
and renamed into place) or an object-store URL (``pipeline.object_runs``: runs published by their manifest).

The jobs call these, never the two modules' own functions, so every command takes both kinds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mfsim.pipeline.runs import object_store as object_runs

from mfsim.pipeline.runs import posix as runs
from mfsim.pipeline.runs.storage import is_remote, local_path, normalize


def run_writer(root: str | Path, run_id: str | None = None, *, heartbeat_s: float = 10.0, replace: bool = False):
    """The run writer for ``root``: ``runs.RunWriter`` or ``object_runs.ObjectStoreRunWriter`` (same calls)."""
    if is_remote(root):
        return object_runs.ObjectStoreRunWriter(str(root), run_id, heartbeat_s=heartbeat_s, replace=replace)
    return runs.RunWriter(local_path(root), run_id, heartbeat_s=heartbeat_s, replace=replace)


def list_runs(root: str | Path, *, lost_after_s: float = 120.0) -> list[runs.RunStatus]:
    if is_remote(root):
        return object_runs.list_runs(str(root), lost_after_s=lost_after_s)
    return runs.list_runs(local_path(root), lost_after_s=lost_after_s)


def run_status(root: str | Path, run_id: str, *, lost_after_s: float = 120.0) -> runs.RunStatus:
    if is_remote(root):
        return object_runs.run_status(str(root), run_id, lost_after_s=lost_after_s)
    return runs.run_status(local_path(root), run_id, lost_after_s=lost_after_s)


def resolve_run(path: str | Path) -> str | Path:
    """A published run from a run directory or URL, or ``<root>/LATEST``; ``MfsimError`` otherwise."""
    if is_remote(path):
        return object_runs.resolve_run_url(str(path))
    return runs.resolve_run_dir(local_path(path))


def read_manifest(run: str | Path) -> dict[str, Any]:
    if is_remote(run):
        return object_runs.read_manifest(str(run))
    return runs.read_manifest(local_path(run))


def read_latest(root: str | Path) -> str | None:
    if is_remote(root):
        return object_runs.read_latest(str(root))
    return runs.read_latest(local_path(root))


def run_location(root: str | Path, run_id: str) -> str:
    """Where run ``run_id`` of ``root`` is (published or not): ``<root>/<run_id>`` as a path or URL."""
    return f"{normalize(root)}/{runs.validate_run_id(run_id)}"


def read_run_table(run: str | Path, relative: str):
    """One single-file table of a published run (``evaluation/metrics.parquet``), local or on a store."""
    import pyarrow.parquet as pq

    if not is_remote(run):
        return pq.read_table(local_path(run) / relative)
    from mfsim.pipeline.runs.storage import filesystem

    fs, path = filesystem(f"{normalize(run)}/{relative}")
    with fs.open(path, "rb") as fh:
        return pq.read_table(fh)


def record_submitted(root: str | Path, run_id: str, pid: int) -> None:
    if is_remote(root):
        object_runs.record_submitted(str(root), run_id, pid)
    else:
        runs.record_submitted(local_path(root), run_id, pid)


def prune_runs(root: str | Path, keep_last: int) -> list[str]:
    """Retention of nightly runs (``run.keep_last``) on either kind of root."""
    if is_remote(root):
        runs.check_keep_last(keep_last)
        return object_runs.prune_runs(str(root), keep_last, pattern=runs.NIGHTLY_ID)
    return runs.prune_runs(local_path(root), keep_last)


def lock_dir(root: str | Path) -> Path:
    """Where the nightly lock of ``root`` lives: the root itself, or for an object store (no exclusive create)
    a local directory named after its URL (``~/.cache/mfsim/locks/...``): it stops overlapping runs of this
    host, not of two hosts."""
    if not is_remote(root):
        return local_path(root)
    import hashlib

    name = hashlib.sha256(normalize(root).encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "mfsim" / "locks" / name
