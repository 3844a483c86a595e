"""The main batch job: conf -> Dask client -> the stages of ``jobs.stages.STAGES`` -> one atomically published run.

Each stage is timed under ``timings`` in the manifest (``fit`` as its parts: preprocess, svd,
factors).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mfsim.jobs.stages import STAGES, StageContext
from mfsim.pipeline.cluster import get_client
from mfsim.pipeline.config import Config
from mfsim.pipeline.inputs import load_item_truth
from mfsim.pipeline.runs import RunWriter, validate_run_id

log = logging.getLogger("mfsim.job")


def run_stages(ctx: StageContext) -> dict[str, Any]:
    """Every stage of ``STAGES`` that applies, in order; returns the manifest entries they made."""
    for stage in STAGES:
        if not stage.when(ctx):
            continue
        if stage.timed:
            with ctx.run.stage(stage.name):
                ctx.results[stage.name] = stage.fn(ctx)
        else:
            ctx.results[stage.name] = stage.fn(ctx)
    return {key: value for result in ctx.results.values() for key, value in result.manifest.items()}


def run_job(cfg: Config, *, scheduler: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Run every configured stage and publish ``<run.output>/<run_id>/``; returns (run dir, manifest)."""
    if cfg.run.run_id is not None:
        validate_run_id(cfg.run.run_id)
    truth = load_item_truth(cfg)  # read before any work: a bad truth file fails fast
    with RunWriter(cfg.run.output, cfg.run.run_id) as run:
        with get_client(cfg.cluster, scheduler) as client:
            ctx = StageContext(cfg, client, run, truth=truth)
            entries = run_stages(ctx)
        for w in ctx.warnings:
            log.warning("%s", w)
        run_dir = run.publish({"config": cfg.resolved(), **entries, "warnings": ctx.warnings})
    return run_dir, run.manifest
