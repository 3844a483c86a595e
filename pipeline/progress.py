"""Progress of long stages: a live line on a terminal, a few plain log lines otherwise.

One mechanism for every stage that runs longer than a few seconds (SVD power iterations,
neighbours, evaluation, audit, report). ``Progress(total, label)`` counts units of work: the loop
that does them calls ``step()`` once per unit (a callback it can hand on), and
``progress(items, total, label)`` wraps an iterable in one, counting an item when the loop comes
back for the next. On a terminal (``stream.isatty()``) the line ``label: done/total (seconds, ~left)``
is rewritten in place after every step, whatever the log level; otherwise an INFO line with the same text
goes to the logger ``mfsim.progress`` once another tenth of ``total`` is done and ``LOG_EVERY_S`` seconds
have passed since the last line (or the start): work that ends in seconds logs nothing but its stage's
lines, long work a line every ~10 s at most, each with the time left at the rate so far.
"""

from __future__ import annotations

import logging
import sys
from time import perf_counter
from typing import Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")
log = logging.getLogger("mfsim.progress")


#: Seconds between two progress log lines at least (and before the first).
LOG_EVERY_S = 10.0


class Progress:
    """Counts ``total`` units of work named ``label``; ``step()`` after each, ``close()`` (or ``with``) at the end.

    ``stream`` (default ``sys.stderr`` when created) decides the display: a terminal gets the live
    line, anything else the log lines (``LOG_EVERY_S``, every tenth at most).
    """

    def __init__(self, total: int, label: str, *, stream: TextIO | None = None) -> None:
        self.total = int(total)
        self.label = label
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.done = 0
        self._next_tenth = 1  # the next tenth of total whose passing may be logged
        self._t0 = self._last_line = perf_counter()

    def text(self) -> str:
        """``label: done/total (elapsed, ~time left at the rate so far)``."""
        seconds = perf_counter() - self._t0
        left = ""
        if 0 < self.done < self.total:
            left = f", ~{seconds * (self.total - self.done) / self.done:.0f}s left"
        return f"{self.label}: {self.done}/{self.total} ({seconds:.1f}s{left})"

    def step(self, n: int = 1) -> None:
        """Count ``n`` more units done and show the count (live, or a log line when due)."""
        self.done += n
        if self.live:
            self.stream.write(f"\r{self.text()}\x1b[K")
            self.stream.flush()
        elif self.total > 0 and self.done * 10 >= self._next_tenth * self.total:
            self._next_tenth = self.done * 10 // self.total + 1
            now = perf_counter()
            if now - self._last_line >= LOG_EVERY_S:
                log.info("%s", self.text())
                self._last_line = now

    def close(self) -> None:
        """End the live line (a newline after it, when there was one); the log needs nothing."""
        if self.live and self.done:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        """The counter itself."""
        return self

    def __exit__(self, *exc) -> None:
        """``close()``, however the block ends."""
        self.close()


def progress(items: Iterable[T], total: int, label: str, *, stream: TextIO | None = None) -> Iterator[T]:
    """Yield ``items``; each counts as done (``Progress.step``) when the loop asks for the next one."""
    with Progress(total, label, stream=stream) as bar:
        for item in items:
            yield item
            bar.step()
