"""Progress display: live on a terminal, quarter log lines otherwise; every long stage of a run reports it."""

from __future__ import annotations

import io
import logging
import sys

from mfsim.jobs import progress as jobs_progress
from mfsim.jobs.main_job import run_job
from mfsim.pipeline.config import load_config
from mfsim.pipeline.progress import Progress, progress
from mfsim.pipeline.simulate import simulate, write_simulation


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def quarters(total: int) -> list[int]:
    """The counts at which a quarter of ``total`` is passed (every count when total < 4)."""
    return [d for d in range(1, total + 1) if 4 * d // total > 4 * (d - 1) // total]


def progress_lines(caplog) -> dict[str, list[tuple[int, int]]]:
    """``label -> [(done, total), ...]`` of the ``mfsim.progress`` lines caught, in order."""
    lines: dict[str, list[tuple[int, int]]] = {}
    for rec in caplog.records:
        if rec.name == "mfsim.progress":
            label, count = rec.getMessage().rsplit(": ", 1)
            done, total = count.split()[0].split("/")
            lines.setdefault(label, []).append((int(done), int(total)))
    return lines


def test_live_line_on_a_terminal():
    out = _Tty()
    assert list(progress(range(3), 3, "work", stream=out)) == [0, 1, 2]
    text = out.getvalue()
    assert text.count("\r") == 3 and "work: 3/3" in text and text.endswith("\n")


def test_quarter_log_lines_otherwise(caplog):
    assert jobs_progress.progress is progress  # one home: the jobs use the pipeline's
    with caplog.at_level(logging.INFO, logger="mfsim.progress"):
        assert list(progress(range(8), 8, "work", stream=io.StringIO())) == list(range(8))
    assert progress_lines(caplog) == {"work": [(2, 8), (4, 8), (6, 8), (8, 8)]}


def test_step_callback_and_short_totals(caplog):
    with caplog.at_level(logging.INFO, logger="mfsim.progress"):
        with Progress(3, "three", stream=io.StringIO()) as bar:
            for _ in range(3):
                bar.step()
        with Progress(0, "nothing", stream=io.StringIO()) as bar:
            pass
        with Progress(10, "ten", stream=io.StringIO()) as bar:
            bar.step(5)
            bar.step(5)
    assert quarters(3) == [1, 2, 3] and quarters(10) == [3, 5, 8, 10]
    # fewer than four steps: one line each; a step of several quarters: one line
    assert progress_lines(caplog) == {"three": [(1, 3), (2, 3), (3, 3)], "ten": [(5, 10), (10, 10)]}


def test_long_stages_of_a_run_log_quarter_lines(tmp_path, client, caplog, monkeypatch):
    """SVD power iterations (the subspace solver: a fixed count), neighbours, evaluation, audit and report of one
    small run, on a non-terminal."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal, whatever runs the tests
    sim = load_config(None, ["simulate.n_users=150", "simulate.n_items=40", "simulate.seed=3"]).simulate
    write_simulation(simulate(sim), tmp_path / "sim", sim)
    cfg = load_config(None, [
        f"input.path={tmp_path / 'sim'}", f"run.output={tmp_path / 'runs'}", "run.run_id=progress",
        f"cluster.address={client.scheduler.address}", "svd.rank=4", "svd.solver=subspace", "svd.power_iterations=8",
        "neighbours.top_n=5", "objectives.eq1.scalings=[symmetric,eq2_like]", "audit.draws=1",
        "ingest.block_rows=64", "neighbours.query_chunk=32",  # 150 users: 5 query ranges per list group
        "objectives.lambda_grid=4", "objectives.cosine=null",  # lambda: auto, a 4-point sweep per objective
    ])
    with caplog.at_level(logging.INFO, logger="mfsim.progress"):
        run_job(cfg)
    lines = progress_lines(caplog)
    totals = {label: seen[0][1] for label, seen in lines.items()}
    assert totals["svd power iterations"] == 8
    # cosine lists per scaling and draw (the base + 1), model and projected_cosine once from the canonical form
    assert totals["audit lists"] == 2 * (1 + 1) + 2
    assert totals["report figures"] == 6  # pair scatter, rank displacement, audit Jaccards, heatmaps, spectrum, sweep
    assert totals["lambda sweep eq1"] == totals["lambda sweep eq2"] == 4
    assert [label for label in lines if label.startswith("evaluation eq1/")]
    assert [label for label in lines if label.startswith("neighbours item_item eq1/")]
    for label, seen in lines.items():
        runs = 2 if label == "svd power iterations" else 1  # the SVD of the full data, then the train split's
        assert seen == [(d, totals[label]) for d in quarters(totals[label])] * runs, label
