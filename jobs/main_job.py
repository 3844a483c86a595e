"""The main batch job: conf -> Dask client -> pipeline stages -> one atomically published run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline import ingest as ingest_stage
from pipeline.cluster import get_client
from pipeline.config import Config
from pipeline.runs import RunWriter, validate_run_id

log = logging.getLogger("mfsim.job")


def run_job(cfg: Config, *, scheduler: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Run every configured stage and publish ``<run.output>/<run_id>/``; returns (run dir, manifest)."""
    if cfg.run.run_id is not None:
        validate_run_id(cfg.run.run_id)
    with RunWriter(cfg.run.output, cfg.run.run_id) as run:
        with get_client(cfg.cluster, scheduler) as client:
            with run.stage("ingest"):
                data = ingest_stage.ingest(client, cfg.input, cfg.ingest)
                run.write_table("ids/users.parquet",
                                ingest_stage.id_table(data.user_ids, cfg.input.user_col, data.user_counts))
                run.write_table("ids/items.parquet",
                                ingest_stage.id_table(data.item_ids, cfg.input.item_col, data.item_counts))
            log.info("ingest: %d users x %d items, %d non-zeros", data.counts["n_users"], data.counts["n_items"],
                     data.counts["nnz"])
        manifest = {
            "config": cfg.resolved(),
            "input": {"path": cfg.input.path, "files": data.files},
            "counts": data.counts,
            **{k: data.counts[k] for k in ("n_users", "n_items", "nnz")},
        }
        run_dir = run.publish(manifest)
    return run_dir, run.manifest
