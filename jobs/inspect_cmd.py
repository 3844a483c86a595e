"""``mfsim neighbours RUN --item ID`` / ``--user ID``: one query's lists side by side, or as CSV or JSON rows.

The rows come from ``pipeline.runs.results`` (the Python API's reader); this module only formats them.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from mfsim.pipeline import outputs
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.runs.results import Run

FORMATS = ("table", "csv", "json")
NOUNS = {"item_item": "neighbours", "user_item": "recommendations", "user_user": "neighbours"}


def show_lists(run: Run, kind: str, query: Any, *, objectives: list[str] = (), scalings: list[str] = (),
               metrics: list[str] = (), top: int | None = None, fmt: str = "table") -> str:
    """One query's lists of ``kind`` in ``fmt``: ``table`` (a column per objective/scaling/metric, cells
    "id (score)"), ``csv`` or ``json`` (one row per list entry: objective, scaling, metric, ids, rank, score)."""
    if fmt not in FORMATS:
        raise MfsimError(f"unknown --format {fmt!r}; valid: {', '.join(FORMATS)}")
    frame = run.neighbour_lists(kind, query, top, objectives=objectives, scalings=scalings, metrics=metrics)
    top = int(frame["rank"].max()) if top is None and len(frame) else (top or 0)
    rows = frame.to_dict("records")  # Python ints, floats (float32 scores exactly) and strings
    if fmt == "json":
        return json.dumps(rows, indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(frame.columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue().rstrip("\n")
    return _table(rows, kind, query, top)


def _table(rows: list[dict[str, Any]], kind: str, query: Any, top: int) -> str:
    """The text table: a title line, a header ``rank`` + one name per list, then one line per rank."""
    n_col = outputs.NEIGHBOUR_COLUMNS[kind][1]
    columns: dict[str, list[str]] = {}
    for r in rows:  # sorted by objective, scaling, metric, rank
        columns.setdefault(f"{r['objective']}/{r['scaling']}/{r['metric']}", []).append(
            f"{r[n_col]} ({r['score']:.3f})")
    names = list(columns)
    width = max(max(len(n) for n in names), max(len(v) for col in columns.values() for v in col)) + 2
    side = "item" if kind == "item_item" else "user"
    lines = [f"{side} {query}: top {top} {NOUNS[kind]} per list", "rank  " + "".join(n.ljust(width) for n in names)]
    for i in range(top):
        cells = [columns[n][i] if i < len(columns[n]) else "" for n in names]
        if not any(cells):
            break
        lines.append(f"{i + 1:<4}  " + "".join(c.ljust(width) for c in cells))
    return "\n".join(line.rstrip() for line in lines)
