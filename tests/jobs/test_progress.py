"""Progress display: live on a terminal, quarter log lines otherwise."""

from __future__ import annotations

import io
import logging

from mfsim.jobs.progress import progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_line_on_a_terminal():
    out = _Tty()
    assert list(progress(range(3), 3, "work", stream=out)) == [0, 1, 2]
    text = out.getvalue()
    assert text.count("\r") == 3 and "work: 3/3" in text and text.endswith("\n")


def test_quarter_log_lines_otherwise(caplog):
    with caplog.at_level(logging.INFO, logger="mfsim.progress"):
        assert list(progress(range(8), 8, "work", stream=io.StringIO())) == list(range(8))
    done = [r.getMessage().split(":")[1].split()[0] for r in caplog.records]
    assert done == ["2/8", "4/8", "6/8", "8/8"]
