"""A run's task graph as it ran, and what it predicts on more workers.

``TaskRecorder`` is a Dask scheduler plugin that keeps, for every task that finishes, its key, the
seconds it computed (start and stop on its worker), its worker, its dependencies and its result's
size. ``StageClock`` keeps when each timed stage of the job started and ended (``RunWriter.stage`` tells
its listeners). ``stage_table`` turns both into, per stage:

- ``T``: wall time of the stage (the names of the manifest's ``timings``);
- ``W``: task work, the sum of the tasks' compute seconds;
- ``I``: serial time, the part of T when no task runs (driver work, round trips, the stages that run
  in the driver entirely);
- ``S``: critical path, the longest chain of dependent tasks (their seconds summed), the stage's
  rounds one after another: a round ends where no task runs and the next task was submitted only after the
  work before it ended (the driver waited for results), and those waits are kept as barriers;
- ``max_ready``: the most tasks that could run at once, every task started as soon as its
  dependencies in its round are done (infinitely many workers);
- ``predicted[P]``: ``I + sum over rounds of max(W_r / P, S_r)``, the time on P workers of one thread
  (one round: ``I + max(W / P, S)``). A lower bound in each round's term: tasks are assumed to pack
  perfectly and their data moves are ignored; the serial part is assumed not to shrink.

The whole job's prediction is the sum over its stages, and its predicted speedup from one worker
``predicted[1] / predicted[P]``. A task's times are its worker's clock shifted to the scheduler's by an offset
that distributed re-estimates at every heartbeat: a task's duration is exact, two tasks' times can be off by
tens of milliseconds against each other (a round boundary that short can be misplaced).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

PLUGIN_NAME = "mfsim-task-recorder"
WORKER_COUNTS = (1, 2, 8, 32, 128)


@dataclass(frozen=True)
class Task:
    """One finished task: compute interval on its worker (seconds since the epoch), dependencies, result bytes."""

    key: str
    start: float
    stop: float
    worker: str = ""
    deps: tuple[str, ...] = ()
    nbytes: int = 0
    submitted: float | None = None  # when the scheduler first knew it (its clock); None: unknown

    @property
    def seconds(self) -> float:
        return max(0.0, self.stop - self.start)


@dataclass(frozen=True)
class Stage:
    name: str
    start: float
    stop: float


try:  # the plugin's base class; the analysis below needs no Dask
    from distributed.diagnostics.plugin import SchedulerPlugin as _PluginBase
except ImportError:  # pragma: no cover
    _PluginBase = object


class TaskRecorder(_PluginBase):
    """Scheduler plugin: one record per task that reaches memory (its ``compute`` start and stop)."""

    name = PLUGIN_NAME

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.scheduler = None
        self.known: dict[str, float] = {}  # key -> when the scheduler first moved it out of "released"

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        if start == "released":
            self.known.setdefault(str(key), time.time())
        if finish in ("forgotten", "erred"):  # never finished: nothing to record (a cancelled or failed task)
            self.known.pop(str(key), None)
        if start != "processing" or finish != "memory":
            return
        compute = [s for s in kwargs.get("startstops", ()) if s.get("action") == "compute"]
        if not compute:
            return
        ts = self.scheduler.tasks.get(key) if self.scheduler is not None else None
        deps = tuple(str(d.key) for d in ts.dependencies) if ts is not None else ()
        self.records.append({"key": str(key), "start": float(compute[0]["start"]), "stop": float(compute[-1]["stop"]),
                             "worker": str(kwargs.get("worker", "")), "deps": deps,
                             "nbytes": int(kwargs.get("nbytes", 0) or 0), "submitted": self.known.pop(str(key), None)})


def _records_on_scheduler(dask_scheduler=None) -> list[dict]:
    plugin = dask_scheduler.plugins.get(PLUGIN_NAME)
    return list(plugin.records) if plugin is not None else []


@contextmanager
def recorded_tasks(client) -> Iterator[list[Task]]:
    """Record every task the scheduler of ``client`` finishes inside the block; the yielded list is filled with
    them (``Task``) when the block ends."""
    client.register_plugin(TaskRecorder(), name=PLUGIN_NAME)
    out: list[Task] = []
    try:
        yield out
    finally:
        records = client.run_on_scheduler(_records_on_scheduler)
        client.unregister_scheduler_plugin(PLUGIN_NAME)
        out.extend(Task(r["key"], r["start"], r["stop"], r["worker"], tuple(r["deps"]), r["nbytes"],
                        r.get("submitted")) for r in records)


class StageClock:
    """Listener of ``pipeline.runs.writer.STAGE_LISTENERS``: each stage's wall interval (epoch seconds)."""

    def __init__(self) -> None:
        self.stages: list[Stage] = []
        self._open: dict[str, float] = {}

    def __call__(self, name: str, event: str, when: float | None = None) -> None:
        when = time.time() if when is None else when
        if event == "start":
            self._open[name] = when
        elif event == "done" and name in self._open:
            self.stages.append(Stage(name, self._open.pop(name), when))


# ---------------------------------------------------------------------------------------------
# the model: pure functions of the tasks and the stage intervals


def covered_seconds(intervals: Sequence[tuple[float, float]]) -> float:
    """Length of the union of ``[start, stop)`` intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


#: A task submitted at least this long before a pause in the work began is taken as waiting for a worker, not for
#: the driver: the pause is no barrier. Task times come from the workers' clocks shifted to the scheduler's, off by
#: up to tens of milliseconds (the module's notes); closer submissions count as the driver's reaction.
SUBMITTED_BEFORE_S = 0.05


def rounds(tasks: Sequence[Task]) -> list[list[Task]]:
    """The tasks split at the driver's barriers: a new round begins where no task runs and the next task to start
    was submitted after the work before it ended (less ``SUBMITTED_BEFORE_S``; its submission unknown: always),
    so the driver waited for results before it sent more. A pause in which the next tasks were already submitted
    (the scheduler's latency, a worker between two tasks) stays inside the round, and dependencies inside a round
    count in its critical path."""
    out: list[list[Task]] = []
    end = float("-inf")
    for t in sorted(tasks, key=lambda t: (t.start, t.stop)):
        waited = t.submitted is None or t.submitted > end - SUBMITTED_BEFORE_S
        if not out or (t.start > end and waited):
            out.append([])
        out[-1].append(t)
        end = max(end, t.stop)
    return out


def earliest_finish(tasks: Sequence[Task]) -> dict[str, float]:
    """Per task, the end of the longest chain of dependencies (within ``tasks``) that ends with it, in seconds
    of work from the start of the set: every task started as soon as its dependencies are done."""
    by_key = {t.key: t for t in tasks}
    done: dict[str, float] = {}
    for t in sorted(tasks, key=lambda t: t.stop):  # a dependency finished before its dependent started
        stack = [t.key]
        while stack:  # iterative: chains can be thousands of tasks long
            key = stack[-1]
            if key in done:
                stack.pop()
                continue
            pending = [d for d in by_key[key].deps if d in by_key and d not in done]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            done[key] = max((done[d] for d in by_key[key].deps if d in by_key), default=0.0) + by_key[key].seconds
    return done


def critical_path(tasks: Sequence[Task]) -> float:
    """Longest chain of dependent tasks within ``tasks``: the sum of their seconds."""
    return max(earliest_finish(tasks).values(), default=0.0)


def max_ready(tasks: Sequence[Task]) -> int:
    """Most tasks running at once when each starts as soon as its dependencies (within ``tasks``) are done."""
    finish = earliest_finish(tasks)
    events = []
    for t in tasks:
        f = finish[t.key]
        events += [(f - t.seconds, 1), (f, -1)]
    now = best = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):  # an end before a start at the same time
        now += step
        best = max(best, now)
    return best


def stage_row(stage: Stage, tasks: Sequence[Task], workers: Sequence[int] = WORKER_COUNTS,
              running: Sequence[Task] | None = None) -> dict[str, Any]:
    """T, W, I, S, max_ready and the predicted seconds on each count of ``workers`` for one stage's ``tasks``.

    ``running``: every task of the job (default: ``tasks``): I is the part of T when none of them runs, so that a
    task begun in an earlier stage and still running in this one (counted in that stage's W and S) is not counted
    again as this stage's serial time."""
    clipped = [(max(t.start, stage.start), min(t.stop, stage.stop)) for t in (tasks if running is None else running)]
    T = stage.stop - stage.start
    W = sum(t.seconds for t in tasks)
    I = max(0.0, T - covered_seconds([c for c in clipped if c[1] > c[0]]))
    split = rounds(tasks)
    parts = [(sum(t.seconds for t in r), critical_path(r)) for r in split]
    return {"T": T, "W": W, "I": I, "S": sum(s for _, s in parts), "tasks": len(tasks), "rounds": len(parts),
            "max_ready": max((max_ready(r) for r in split), default=0),
            "predicted": {p: I + sum(max(w / p, s) for w, s in parts) for p in workers}}


def stage_table(tasks: Sequence[Task], stages: Sequence[Stage], workers: Sequence[int] = WORKER_COUNTS
                ) -> dict[str, Any]:
    """``stage_row`` per stage (each task counted in the stage during which it started, tasks outside every stage
    left out; a stage's serial time is its time when no task of the job runs) and the whole job: the sums, and
    ``predicted_speedup[P] = predicted[1] / predicted[P]``.

    A stage timed in several parts (the fit's ``factors`` inside it, then the stage of that name) is one row, the
    sum of its parts' (``max_ready`` their largest). The job's time outside every stage (the driver between two
    stages) is a row of its own, ``BETWEEN``, all serial: the job's T is its wall time from the first stage's start
    to the last one's end."""
    ordered = sorted(stages, key=lambda s: s.start)
    members: list[list[Task]] = [[] for _ in ordered]
    for t in tasks:
        for k, s in enumerate(ordered):
            if s.start <= t.start < s.stop:
                members[k].append(t)
                break
    counts = tuple(workers) if 1 in workers else (1, *workers)
    full: dict[str, dict[str, Any]] = {}
    for s, m in zip(ordered, members):
        row = stage_row(s, m, counts, running=tasks)
        if s.name in full:
            row = _summed(full[s.name], row)
        full[s.name] = row
    outside = stage_seconds(ordered).get(BETWEEN)
    if outside:
        full[BETWEEN] = {"T": outside, "W": 0.0, "I": outside, "S": 0.0, "tasks": 0, "rounds": 0, "max_ready": 0,
                         "predicted": {p: outside for p in counts}}
    rows = {name: {**r, "predicted": {p: r["predicted"][p] for p in workers}} for name, r in full.items()}
    predicted = {p: sum(r["predicted"][p] for r in full.values()) for p in counts}
    job = {key: sum(r[key] for r in rows.values()) for key in ("T", "W", "I", "S", "tasks")}
    job["predicted"] = {p: predicted[p] for p in workers}
    job["predicted_speedup"] = {p: (predicted[1] / predicted[p] if predicted[p] > 0 else 1.0) for p in workers}
    return {"stages": rows, "job": job}


#: ``stage_table``'s row of the job's time outside every stage.
BETWEEN = "(between stages)"


def stage_seconds(stages: Sequence[Stage]) -> dict[str, float]:
    """Wall seconds per stage name, as ``stage_table``'s T: a stage's parts summed, the time outside every stage
    under ``BETWEEN`` (when there is any)."""
    out: dict[str, float] = {}
    for s in stages:
        out[s.name] = out.get(s.name, 0.0) + (s.stop - s.start)
    if stages:
        outside = max(0.0, max(s.stop for s in stages) - min(s.start for s in stages)
                      - covered_seconds([(s.start, s.stop) for s in stages]))
        if outside > 0:
            out[BETWEEN] = outside
    return out


def _summed(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two parts of one stage as one row."""
    return {**{key: a[key] + b[key] for key in ("T", "W", "I", "S", "tasks", "rounds")},
            "max_ready": max(a["max_ready"], b["max_ready"]),
            "predicted": {p: a["predicted"][p] + b["predicted"][p] for p in a["predicted"]}}


#: The neighbours stage's tasks by the lists they make, from their keys (``client.submit``'s key is the function's
#: name and a token): item-item lists (``run_symmetric``'s tasks) and query lists (``run_topn``'s: user-item lists,
#: and user-user lists where they are on).
LIST_KINDS = {"item_item": ("_prepare_task-", "_floors_task-", "_pair_task-", "getitem-", "_merge_task-",
                            "_finish_task-"),
              "user_item": ("topn_task-",)}


def work_row(tasks: Sequence[Task], workers: Sequence[int] = WORKER_COUNTS) -> dict[str, Any]:
    """W, S, rounds, max_ready and ``predicted[P] = sum over rounds max(W_r / P, S_r)`` of a subset of a stage's
    tasks (no serial part: the stage's is shared by all its tasks)."""
    split = rounds(tasks)
    parts = [(sum(t.seconds for t in r), critical_path(r)) for r in split]
    return {"W": sum(t.seconds for t in tasks), "S": sum(x for _, x in parts), "tasks": len(tasks),
            "rounds": len(parts), "max_ready": max((max_ready(r) for r in split), default=0),
            "predicted": {p: sum(max(w / p, x) for w, x in parts) for p in workers}}


def kind_rows(tasks: Sequence[Task], stage: Stage, kinds: dict[str, tuple[str, ...]] = LIST_KINDS,
              workers: Sequence[int] = WORKER_COUNTS) -> dict[str, dict[str, Any]]:
    """``work_row`` of each kind's tasks (keys starting with one of its prefixes) that started within ``stage``;
    kinds with no task are left out."""
    inside = [t for t in tasks if stage.start <= t.start < stage.stop]
    out = {}
    for name, prefixes in kinds.items():
        mine = [t for t in inside if t.key.startswith(prefixes)]
        if mine:
            out[name] = work_row(mine, workers)
    return out
