"""Progress of long stages: a live line on a terminal, a few plain log lines otherwise.

One mechanism for every stage that runs longer than a few seconds (SVD power iterations,
neighbours, evaluation, audit, report). ``Progress(total, label)`` counts units of work: the loop
that does them calls ``step()`` once per unit (a callback it can hand on), and
``progress(items, total, label)`` wraps an iterable in one, counting an item when the loop comes
back for the next. On a terminal (``stream.isatty()``) the line ``label: done/total (seconds)`` is
rewritten in place after every step; otherwise an INFO line with the same text goes to the logger
``mfsim.progress`` each time another quarter of ``total`` is done (at most four lines; a total
below four logs every step).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")
log = logging.getLogger("mfsim.progress")


class Progress:
    """Counts ``total`` units of work named ``label``; ``step()`` after each, ``close()`` (or ``with``) at the end.

    ``stream`` (default ``sys.stderr`` when created) decides the display: a terminal gets the live
    line, anything else the quarter log lines.
    """

    def __init__(self, total: int, label: str, *, stream: TextIO | None = None) -> None:
        self.total = int(total)
        self.label = label
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.done = 0
        self._next_quarter = 1  # the next quarter of total whose passing is logged
        self._t0 = time.perf_counter()

    def step(self, n: int = 1) -> None:
        """Count ``n`` more units done and show the count (live, or at a quarter passed)."""
        self.done += n
        seconds = time.perf_counter() - self._t0
        if self.live:
            self.stream.write(f"\r{self.label}: {self.done}/{self.total} ({seconds:.1f}s)")
            self.stream.flush()
        elif self.total > 0 and self.done * 4 >= self._next_quarter * self.total:
            log.info("%s: %d/%d (%.1fs)", self.label, self.done, self.total, seconds)
            self._next_quarter = self.done * 4 // self.total + 1

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
