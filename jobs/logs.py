"""Logging for every ``mfsim`` command: one format, UTC timestamps, a copy of a run's lines in the run.

The formatters, ``setup_logging`` and ``tee_to_file`` live in ``pipeline.logs`` (the embedded
cluster's workers set up the same format from there); the commands import them from here.
"""

from mfsim.pipeline.logs import (
    FORMATS,
    LEVELS,
    JsonFormatter,
    TextFormatter,
    check_level,
    make_formatter,
    setup_logging,
    tee_to_file,
    utc_timestamp,
)

__all__ = ["FORMATS", "LEVELS", "JsonFormatter", "TextFormatter", "check_level", "make_formatter", "setup_logging",
           "tee_to_file", "utc_timestamp"]
