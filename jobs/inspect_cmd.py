"""``mfsim neighbours RUN_DIR --item ID``: one item's lists side by side, for a quick look."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from mfsim.pipeline import outputs
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.runs import read_manifest


def show_item_lists(run_dir: Path, item: str, metrics: list[str], top: int = 10) -> str:
    """A text table: one column per (objective, scaling, metric) item-item list of ``item``."""
    read_manifest(run_dir)  # a published run, or a clear error
    root = Path(run_dir) / outputs.LIST_DATASETS["item_item"]
    if not root.is_dir():
        raise MfsimError(f"{run_dir} has no item-item lists ({outputs.LIST_DATASETS['item_item']}/); "
                         "run with neighbours.item_item set")
    dataset = ds.dataset(root, format="parquet", partitioning="hive")
    id_type = dataset.schema.field("item_id").type
    try:
        key = pa.scalar(item).cast(id_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise MfsimError(f"--item {item!r} is not a {id_type} id like those of {run_dir}") from exc
    flt = pc.field("item_id") == key
    if metrics:
        flt = flt & pc.field("metric").isin(metrics)
    t = dataset.to_table(filter=flt & (pc.field("rank") <= top))
    if t.num_rows == 0:
        raise MfsimError(f"item {item!r} has no item-item list in {run_dir}; check the id (ids/items.parquet) "
                         "and --metric")
    columns: dict[str, list[str]] = {}
    for r in sorted(t.to_pylist(), key=lambda r: (r["objective"], r["scaling"], r["metric"], r["rank"])):
        columns.setdefault(f"{r['objective']}/{r['scaling']}/{r['metric']}", []).append(
            f"{r['neighbour_id']} ({r['score']:.3f})")
    names = list(columns)
    width = max(max(len(n) for n in names), max(len(v) for col in columns.values() for v in col)) + 2
    lines = [f"item {item}: top {top} neighbours per list", "rank  " + "".join(n.ljust(width) for n in names)]
    for i in range(top):
        cells = [columns[n][i] if i < len(columns[n]) else "" for n in names]
        if not any(cells):
            break
        lines.append(f"{i + 1:<4}  " + "".join(c.ljust(width) for c in cells))
    return "\n".join(lines)
