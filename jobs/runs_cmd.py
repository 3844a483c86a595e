"""What ``mfsim runs``, ``mfsim status`` and ``mfsim show`` print: run states and manifest summaries as text or JSON."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from mfsim.pipeline.errors import MfsimError

#: ``mfsim status`` exit codes by state.
STATUS_EXIT = {"succeeded": 0, "failed": 1, "lost": 1, "damaged": 1, "removed": 1, "running": 3}
_COLUMNS = ("run_id", "state", "started_at", "duration_s", "n_users", "n_items", "nnz")


def format_runs(runs: list, fmt: str = "table") -> str:
    """One line per run (``RunStatus``): id, state, start, duration, n_users, n_items, nnz; or a JSON list."""
    if fmt == "json":
        return json.dumps([dataclasses.asdict(r) for r in runs], indent=2, default=str)
    if fmt != "table":
        raise MfsimError(f"--format must be table or json, got {fmt!r}")
    cells = [[_cell(getattr(r, c)) + (" (LATEST)" if c == "run_id" and r.latest else "") for c in _COLUMNS]
             for r in runs]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(_COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(_COLUMNS, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def format_manifest(run_dir: Path, manifest: dict[str, Any]) -> str:
    """The summary of a published run: id, status, counts, stage timings, the audit's verdict, warnings."""
    c = manifest.get("counts", {})
    lines = [f"run {manifest.get('run_id')} ({manifest.get('status')}) at {run_dir}",
             f"started {manifest.get('started_at')}  finished {manifest.get('finished_at')}",
             f"users {c.get('n_users')}  items {c.get('n_items')}  non-zeros {c.get('nnz')}"]
    timings = manifest.get("timings", {})
    if timings:
        lines.append("stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    if "audit" in manifest:
        lines.append(f"audit: {manifest['audit'].get('verdict', '')}")
    for w in manifest.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)
