"""The scaling model of ``pipeline.trace`` on hand-built task graphs whose work W, serial time I, critical path S and
predictions are worked out by hand, and the recorder on a real Dask cluster."""

from __future__ import annotations

import time

import pytest

from mfsim.pipeline.trace import (
    Stage,
    StageClock,
    Task,
    covered_seconds,
    critical_path,
    max_ready,
    recorded_tasks,
    rounds,
    stage_seconds,
    stage_table,
)


def _graph() -> tuple[list[Task], list[Stage]]:
    """Stage "fit" [0, 10): round one a [1, 3), b [1, 2), c [3, 6) after a and b; nothing runs in [6, 7); round two
    d [7, 9), e [7, 8). Stage "lists" [10, 14): f [10, 12) after c (a dependency in an earlier stage, not counted),
    g [10.5, 13) after f. x starts before every stage: left out."""
    tasks = [Task("a", 1, 3), Task("b", 1, 2), Task("c", 3, 6, deps=("a", "b")), Task("d", 7, 9), Task("e", 7, 8),
             Task("f", 10, 12, deps=("c",)), Task("g", 10.5, 13, deps=("f",)), Task("x", -5, -4)]
    return tasks, [Stage("fit", 0, 10), Stage("lists", 10, 14)]


def test_work_serial_time_critical_path_and_prediction_by_hand():
    tasks, stages = _graph()
    table = stage_table(tasks, stages, workers=(1, 2, 8))
    fit = table["stages"]["fit"]
    assert fit["T"] == 10 and fit["W"] == 9 and fit["I"] == 3  # idle [0, 1), [6, 7), [9, 10)
    assert fit["S"] == 5 + 2 and fit["rounds"] == 2 and fit["tasks"] == 5  # a -> c, then d
    assert fit["max_ready"] == 2
    # I + max(W_1 / P, S_1) + max(W_2 / P, S_2) with (W, S) = (6, 5) and (3, 2)
    assert fit["predicted"] == {1: 3 + 6 + 3, 2: 3 + 5 + 2, 8: 3 + 5 + 2}
    lists = table["stages"]["lists"]
    # f and g overlap in time but g waits for f: one round, critical path 2 + 2.5; idle [13, 14)
    assert lists["W"] == 4.5 and lists["S"] == 4.5 and lists["I"] == 1 and lists["max_ready"] == 1
    assert lists["predicted"] == {1: 1 + 4.5, 2: 1 + 4.5, 8: 1 + 4.5}
    job = table["job"]
    assert job["T"] == 14 and job["W"] == 13.5 and job["tasks"] == 7
    assert job["predicted"] == {1: 12 + 5.5, 2: 10 + 5.5, 8: 10 + 5.5}
    assert job["predicted_speedup"] == {1: 1.0, 2: pytest.approx(17.5 / 15.5), 8: pytest.approx(17.5 / 15.5)}


def test_a_pause_is_a_barrier_only_when_the_driver_submitted_after_it():
    """a [0, 2) then b [2, 3) after a; c [3.02, 4) independent. Submitted at 0 (queued while a and b ran), c leaves
    one round: S = max(2 + 1, 0.98), and P = 2 runs it beside a. Submitted at 3.01, after the work ended (the driver
    waited for b), the pause [3, 3.02) is a barrier: two rounds, S = 3 + 0.98. Submission unknown: a barrier."""
    def table(submitted):
        tasks = [Task("a", 0, 2, submitted=0.0), Task("b", 2, 3, deps=("a",), submitted=0.0),
                 Task("c", 3.02, 4, submitted=submitted)]
        return stage_table(tasks, [Stage("s", 0, 4)], workers=(1, 2))["stages"]["s"]

    queued = table(0.0)
    assert queued["rounds"] == 1 and queued["S"] == pytest.approx(3.0) and queued["I"] == pytest.approx(0.02)
    assert queued["predicted"][2] == pytest.approx(0.02 + max(3.98 / 2, 3.0))
    for late in (3.01, 2.96, None):  # after the end, within SUBMITTED_BEFORE_S of it, unknown
        barrier = table(late)
        assert barrier["rounds"] == 2 and barrier["S"] == pytest.approx(3.98), late
        assert barrier["predicted"][2] == pytest.approx(0.02 + 3.0 + 0.98)


def test_a_stage_in_parts_is_one_row_and_the_time_between_stages_is_serial():
    """Stage "a" timed twice, [0, 4) and [7, 8) (a: 1 s of work at [0, 1), b: [7, 8)), stage "b" [5, 7) (c: [5, 6)):
    "a" is one row, T 5, W 2, I 3; [4, 5) is in no stage: a row of its own, all serial; the job's T is 8."""
    tasks = [Task("a", 0, 1), Task("c", 5, 6), Task("b", 7, 8)]
    table = stage_table(tasks, [Stage("a", 0, 4), Stage("b", 5, 7), Stage("a", 7, 8)], workers=(1, 2))
    a, between = table["stages"]["a"], table["stages"]["(between stages)"]
    assert (a["T"], a["W"], a["I"], a["S"], a["tasks"], a["rounds"]) == (5, 2, 3, 2, 2, 2)
    assert a["predicted"] == {1: 3 + 1 + 1, 2: 3 + 1 + 1}
    assert between["T"] == between["I"] == 1 and between["W"] == 0 and between["predicted"] == {1: 1, 2: 1}
    job = table["job"]
    assert job["T"] == 8 and job["I"] == 3 + 1 + 1 and job["predicted"] == {1: 5 + 2 + 1, 2: 5 + 2 + 1}
    assert stage_seconds([Stage("a", 0, 4), Stage("b", 5, 7), Stage("a", 7, 8)]) == {
        "a": 5, "b": 2, "(between stages)": 1}
    assert stage_seconds([Stage("a", 0, 4), Stage("b", 4, 6)]) == {"a": 4, "b": 2}


def test_a_task_still_running_from_an_earlier_stage_is_not_the_next_stages_serial_time():
    """Stage "audit" [0, 4): a [0, 3), then the figure f [3.5, 5) submitted at its end, still running when "report"
    [4, 6) begins, whose driver waits for it, then works alone until 6. f is the audit's (it started there: W 4.5,
    S 3 + 1.5 in two rounds); the report's serial time is [5, 6) only, not [4, 5) again; the audit's [3, 3.5)."""
    tasks = [Task("a", 0, 3, submitted=0.0), Task("f", 3.5, 5, submitted=3.4)]
    table = stage_table(tasks, [Stage("audit", 0, 4), Stage("report", 4, 6)], workers=(1, 2))
    audit, report = table["stages"]["audit"], table["stages"]["report"]
    assert (audit["W"], audit["S"], audit["I"], audit["rounds"]) == (4.5, 4.5, 0.5, 2)
    assert (report["W"], report["I"], report["tasks"]) == (0, 1, 0)
    assert table["job"]["predicted"] == {1: 0.5 + 4.5 + 1, 2: 0.5 + 4.5 + 1}  # the job's 6 s, each second once


def test_a_speedup_always_has_its_one_worker_reference():
    tasks, stages = _graph()
    table = stage_table(tasks, stages, workers=(4,))
    assert set(table["job"]["predicted"]) == {4} and table["job"]["predicted_speedup"][4] == pytest.approx(17.5 / 15.5)


def test_wide_independent_tasks_scale_until_the_longest():
    """64 independent tasks of 1 s and one of 4 s in one stage: W = 68, S = 4; at P workers max(68 / P, 4)."""
    tasks = [Task(f"t{i}", 0, 1) for i in range(64)] + [Task("long", 0, 4)]
    table = stage_table(tasks, [Stage("s", 0, 4)], workers=(1, 2, 8, 32))
    row = table["stages"]["s"]
    assert row["I"] == 0 and row["max_ready"] == 65
    assert row["predicted"] == {1: 68, 2: 34, 8: 8.5, 32: 4}


def test_helpers():
    assert covered_seconds([(0, 2), (1, 3), (5, 6), (5.5, 5.8)]) == 4
    assert covered_seconds([]) == 0
    chain = [Task(str(i), i, i + 1, deps=(str(i - 1),) if i else ()) for i in range(5000)]  # a long chain: no recursion
    assert critical_path(chain) == 5000 and max_ready(chain) == 1
    assert [len(r) for r in rounds([Task("a", 0, 1), Task("b", 1, 2), Task("c", 2.5, 3)])] == [2, 1]


def test_stage_clock_pairs_start_and_done():
    clock = StageClock()
    clock("svd", "start", 1.0)
    clock("svd", "done", 3.0)
    clock("neighbours", "start", 3.5)
    clock("neighbours", "done", 9.0)
    assert clock.stages == [Stage("svd", 1.0, 3.0), Stage("neighbours", 3.5, 9.0)]


def _sleep(seconds: float, *_deps) -> float:
    time.sleep(seconds)
    return seconds


def test_recorder_on_a_real_cluster(client):
    """A chain a -> c and an independent b on 2 workers: the recorder sees each task's compute interval (at least
    its sleep) and c's dependency on a."""
    with recorded_tasks(client) as tasks:
        a = client.submit(_sleep, 0.3, key="trace-a")
        b = client.submit(_sleep, 0.2, key="trace-b")
        c = client.submit(_sleep, 0.3, a, key="trace-c")
        assert c.result() == 0.3 and b.result() == 0.2
    by_key = {t.key: t for t in tasks}
    assert {"trace-a", "trace-b", "trace-c"} <= set(by_key)
    assert by_key["trace-c"].deps == ("trace-a",) and by_key["trace-a"].deps == ()
    assert by_key["trace-a"].seconds >= 0.3 and by_key["trace-b"].seconds >= 0.2
    # c ran after a: the workers' times are shifted to the scheduler's clock by an offset re-estimated at every
    # heartbeat (distributed's time_delay), so two tasks' times can be tens of milliseconds apart from the truth
    assert by_key["trace-c"].start >= by_key["trace-a"].stop - 0.1
    assert by_key["trace-a"].worker and by_key["trace-a"].nbytes > 0
    # each submitted when the client sent it, before it ran (the scheduler's clock, as the shifted times)
    for key in ("trace-a", "trace-b", "trace-c"):
        assert by_key[key].submitted is not None and by_key[key].submitted <= by_key[key].start + 0.1
    assert by_key["trace-c"].submitted < by_key["trace-a"].stop  # sent at once, it waited for a
    assert critical_path([by_key[k] for k in ("trace-a", "trace-b", "trace-c")]) >= 0.6


def test_the_neighbours_tasks_by_kind():
    """Item-item pair tasks (a chain of two) and query-list tasks (two independent) in one stage, each kind its own
    work and critical path; tasks of other names, and outside the stage, left out."""
    from mfsim.pipeline.trace import kind_rows

    tasks = [Task("_pair_task-1", 0, 2, submitted=0.0), Task("_pair_task-2", 2, 3, deps=("_pair_task-1",),
                                                             submitted=0.0),
             Task("topn_task-1", 0, 1, submitted=0.0), Task("topn_task-2", 1, 2, submitted=0.0),
             Task("scaled_columns-1", 0, 0.5, submitted=0.0), Task("topn_task-0", -3, -2, submitted=-3.0)]
    rows = kind_rows(tasks, Stage("neighbours", 0, 3), workers=(1, 2))
    assert rows["item_item"]["W"] == 3 and rows["item_item"]["S"] == 3 and rows["item_item"]["tasks"] == 2
    assert rows["item_item"]["predicted"] == {1: 3, 2: 3}
    assert rows["user_item"]["W"] == 2 and rows["user_item"]["S"] == 1
    assert rows["user_item"]["predicted"] == {1: 2, 2: 1}
    assert set(rows) == {"item_item", "user_item"}


def test_the_recorder_keeps_submissions_of_live_tasks_only():
    """A task that finishes is recorded with when the scheduler first knew it; one that is forgotten or errs before
    it finishes leaves nothing behind (a long recording would otherwise keep every cancelled key)."""
    from mfsim.pipeline.trace import TaskRecorder

    rec = TaskRecorder()
    for key in ("done", "cancelled", "failed"):
        rec.transition(key, "released", "waiting")
    rec.transition("cancelled", "waiting", "released")
    rec.transition("cancelled", "released", "forgotten")
    rec.transition("failed", "processing", "erred")
    assert set(rec.known) == {"done"}
    rec.transition("done", "processing", "memory", startstops=[{"action": "compute", "start": 1.0, "stop": 2.5}],
                   worker="w", nbytes=8)
    assert rec.known == {} and len(rec.records) == 1
    got = rec.records[0]
    assert (got["key"], got["start"], got["stop"], got["worker"], got["nbytes"]) == ("done", 1.0, 2.5, "w", 8)
    assert got["submitted"] is not None and got["submitted"] <= time.time()
