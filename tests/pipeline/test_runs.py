"""Atomic publishing: a crash between writing and renaming leaves nothing visible."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from mfsim.pipeline import runs
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.runs import RunWriter, read_latest, read_manifest


def _publish(root, run_id, value=1):
    with RunWriter(root, run_id) as run:
        with run.stage("work"):
            run.write_table("t/x.parquet", pa.table({"x": [value]}))
        return run.publish({"counts": {"n": value}})


def test_publish_writes_manifest_last_and_latest(tmp_path):
    run_dir = _publish(tmp_path, "r1")
    assert run_dir == tmp_path / "r1"
    m = read_manifest(run_dir)
    assert m["run_id"] == "r1" and m["status"] == "succeeded" and "work" in m["timings"]
    assert m["versions"]["numpy"] != "not installed"
    assert read_latest(tmp_path) == "r1"
    _publish(tmp_path, "r2", 2)
    assert read_latest(tmp_path) == "r2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "r1", "r2"]


@pytest.mark.parametrize("where", ["before_rename", "inside_stage"])
def test_crash_leaves_nothing_visible(tmp_path, monkeypatch, where):
    _publish(tmp_path, "good")
    before = sorted(p.name for p in tmp_path.iterdir())

    class Crash(Exception):
        pass

    if where == "before_rename":
        def boom(*a, **k):
            raise Crash("killed between writing and renaming")
        monkeypatch.setattr(runs.os, "rename", boom)
        with pytest.raises(Crash):
            _publish(tmp_path, "bad")
    else:
        with pytest.raises(Crash):
            with RunWriter(tmp_path, "bad") as run:
                run.write_table("a.parquet", pa.table({"x": [1]}))
                raise Crash("stage failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run, no temporary directory
    assert read_latest(tmp_path) == "good"
    assert json.loads((tmp_path / "good" / "_manifest.json").read_text())["counts"] == {"n": 1}


def test_manifest_written_last(tmp_path, monkeypatch):
    order = []
    real = RunWriter.write_json

    def spy(self, rel, obj):
        order.append(sorted(p.relative_to(self.tmp).as_posix() for p in self.tmp.rglob("*") if p.is_file()))
        return real(self, rel, obj)

    monkeypatch.setattr(RunWriter, "write_json", spy)
    _publish(tmp_path, "r")
    assert order == [["t/x.parquet"]]


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", ".hidden", "", "a" * 200, "x y"])
def test_run_id_validated(tmp_path, bad):
    with pytest.raises(MfsimError, match="run id"):
        RunWriter(tmp_path, bad)


def test_existing_run_is_never_overwritten(tmp_path):
    _publish(tmp_path, "same")
    with pytest.raises(MfsimError, match="already exists"):
        RunWriter(tmp_path, "same")
    assert read_manifest(tmp_path / "same")["counts"] == {"n": 1}


def test_new_run_ids_are_unique_and_valid():
    ids = {runs.new_run_id() for _ in range(50)}
    assert len(ids) == 50
    for i in ids:
        assert runs.validate_run_id(i) == i
    assert not any(os.sep in i for i in ids)
