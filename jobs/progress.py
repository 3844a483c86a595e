"""Progress of long stages: a live line on a terminal, a few plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger("mfsim.progress")


def progress(items: Iterable[T], total: int, label: str, *, stream=None) -> Iterator[T]:
    """Yield ``items``; show ``label done/total`` live on a terminal, else log at each quarter."""
    stream = stream or sys.stderr
    live = stream.isatty()
    t0 = time.perf_counter()
    next_quarter = 1
    done = 0
    for done, item in enumerate(items, start=1):
        yield item
        if live:
            stream.write(f"\r{label}: {done}/{total} ({time.perf_counter() - t0:.1f}s)")
            stream.flush()
        elif total >= 4 and done * 4 >= next_quarter * total:
            log.info("%s: %d/%d (%.1fs)", label, done, total, time.perf_counter() - t0)
            next_quarter = done * 4 // total + 1
    if live and done:
        stream.write("\n")
        stream.flush()
