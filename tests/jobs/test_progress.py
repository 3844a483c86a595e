"""Progress display: live on a terminal, log lines otherwise (a tenth done and 10 s since the last, with the time
left); every long stage of a run reports it."""

from __future__ import annotations

import io
import logging
import sys

from mfsim.jobs import progress as jobs_progress
from mfsim.jobs.main_job import run_job
from mfsim.pipeline.config import load_config
import mfsim.pipeline.progress as progress_module
from mfsim.pipeline.progress import Progress, progress
from mfsim.pipeline.simulate import simulate, write_simulation


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def tenths(total: int) -> list[int]:
    """The counts at which another tenth of ``total`` is passed (every count when total < 10)."""
    return [d for d in range(1, total + 1) if 10 * d // total > 10 * (d - 1) // total]


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
    assert text.count("\r") == 3 and "work: 3/3" in text and "work: 1/3" in text and text.endswith("\n")
    assert "s left)" in text.split("\r")[1]  # 1/3 done: the time left at the rate so far


def test_log_lines_every_tenth_when_due(caplog, monkeypatch):
    assert jobs_progress.progress is progress  # one home: the jobs use the pipeline's
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="mfsim.progress"):
        assert list(progress(range(20), 20, "work", stream=io.StringIO())) == list(range(20))
        with Progress(3, "three", stream=io.StringIO()) as bar:
            for _ in range(3):
                bar.step()
        with Progress(0, "nothing", stream=io.StringIO()) as bar:
            pass
        with Progress(10, "ten", stream=io.StringIO()) as bar:
            bar.step(5)
            bar.step(5)
    assert tenths(20) == list(range(2, 21, 2)) and tenths(3) == [1, 2, 3]
    # fewer than ten steps: one line each; a step of several tenths: one line
    assert progress_lines(caplog) == {"work": [(d, 20) for d in range(2, 21, 2)], "three": [(1, 3), (2, 3), (3, 3)],
                                      "ten": [(5, 10), (10, 10)]}


def test_work_of_seconds_logs_nothing_and_long_work_a_line_every_10s_with_the_time_left(caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="mfsim.progress"):
        assert len(list(progress(range(50), 50, "fast", stream=io.StringIO()))) == 50
    assert progress_lines(caplog) == {}
    now = [0.0]
    monkeypatch.setattr(progress_module, "perf_counter", lambda: now[0])
    with caplog.at_level(logging.INFO, logger="mfsim.progress"):
        with Progress(100, "slow", stream=io.StringIO()) as bar:
            for _ in range(100):
                now[0] += 3.0  # 3 s per unit: a tenth every 30 s, so every tenth is due
                bar.step()
        with Progress(1000, "quick tenths", stream=io.StringIO()) as bar:
            for _ in range(1000):
                now[0] += 0.03125  # a tenth every 3.125 s: a line at the first tenth 10 s after the last
                bar.step()
    messages = [r.getMessage() for r in caplog.records if r.name == "mfsim.progress"]
    slow = [m for m in messages if m.startswith("slow")]
    # at 10 done 30 s passed and 90 remain at 3 s each
    assert len(slow) == 10 and slow[0] == "slow: 10/100 (30.0s, ~270s left)"
    quick = [m for m in messages if m.startswith("quick")]
    assert [m.split(" (")[0] for m in quick] == ["quick tenths: 400/1000", "quick tenths: 800/1000"]
    assert slow[-1] == "slow: 100/100 (300.0s)"


def test_long_stages_of_a_run_log_tenth_lines(tmp_path, client, caplog, monkeypatch):
    """SVD power iterations (the subspace solver: a fixed count), neighbours, evaluation, audit and report of one
    small run, on a non-terminal (lines due at every tenth: ``LOG_EVERY_S`` 0)."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal, whatever runs the tests
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)
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
        assert seen == [(d, totals[label]) for d in tenths(totals[label])] * runs, label


def test_a_terminal_at_warning_level_keeps_one_live_line_of_the_stages(tmp_path, client, monkeypatch):
    """``--log-level WARNING`` hides the stage lines; on a terminal one line, rewritten in place, still says which
    stage of how many runs, and ends with the total."""
    out = _Tty()
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.setattr(logging.getLogger("mfsim"), "level", logging.WARNING)
    sim = load_config(None, ["simulate.n_users=60", "simulate.n_items=30", "simulate.seed=3"]).simulate
    write_simulation(simulate(sim), tmp_path / "sim", sim)
    cfg = load_config(None, [
        f"input.path={tmp_path / 'sim'}", f"run.output={tmp_path / 'runs'}", f"cluster.address={client.scheduler.address}",
        "svd.rank=3", "neighbours.top_n=3", "objectives.eq1.lambda=1", "objectives.eq2.lambda=1",
        "objectives.cosine=null", "evaluation.holdout=none", "audit.enabled=false", "report.enabled=false"])
    run_job(cfg)
    text = out.getvalue()
    assert "\r[1/5] ingest (" in text and "\r[3/5] factors (" in text and "\r[5/5] done in " in text  # + truth
    assert text.endswith("\n") and "stage ingest: start" not in text
