"""``mfsim.run_pipeline``: the ``mfsim run`` job from Python, returning the published run to read.

The config is loaded exactly as ``mfsim run`` loads it (``pipeline.config.load_config``): a YAML
file, or a mapping of sections read as that file's mapping would be, with dotted-key overrides on
top that go through the same ``--set`` mechanism (a Python value is written as JSON, which is
YAML, so ``8`` stays an int and ``"true"`` a string).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mfsim.pipeline.config import Config, load_config
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.runs.results import Run, open_run

LABEL = "run_pipeline override"  # how an override is named in a config error
CONVENIENCE_KEYS = {"input": "input.path", "output": "run.output", "run_id": "run.run_id"}


def run_pipeline(config: str | Path | Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None, *,
                 input: str | Path | None = None, output: str | Path | None = None, run_id: str | None = None,
                 scheduler: str | None = None, client: Any = None, log_level: str | None = "INFO",
                 **dotted: Any) -> Run:
    """Run the pipeline and return the published run (``open_run`` of its directory).

    Parameters
    ----------
    config : path of a YAML config, a mapping of sections (``{"svd": {"rank": 8}}``), or None for
        ``conf/default.yaml``; keys left out keep their defaults, unknown keys are errors.
    overrides, **dotted : dotted config keys and Python values, as ``--set`` gives them:
        ``run_pipeline(cfg, overrides={"svd.rank": 8})`` or ``run_pipeline(cfg, **{"svd.rank": 8})``.
    input, output, run_id : shorthands for ``input.path``, ``run.output``, ``run.run_id``.
    scheduler : a Dask scheduler address (as ``--scheduler``); ``client``: an existing Dask client
        to run on. Neither: the embedded local cluster of ``cluster.*``, whose worker processes
        need a script to call this under ``if __name__ == "__main__":`` (notebooks need nothing;
        ``cluster.processes=False`` runs threads; a script without the guard fails at once, saying so).
    log_level : when logging is not configured (no handler on the root logger), the run's progress is logged
        to stderr at this level (``INFO``: a line per stage and its progress); None leaves logging alone.

    Raises ``MfsimError`` for a bad config or input (nothing published), as ``mfsim run`` exits 2.
    """
    refuse_in_a_starting_worker()
    from mfsim.jobs.main_job import run_job  # dask is imported only when a job runs

    cfg = build_config(config, overrides, dotted, input=input, output=output, run_id=run_id)
    if log_level is not None and not logging.getLogger().handlers:
        from mfsim.pipeline.logs import setup_logging

        setup_logging(log_level)  # nothing configured (a script, a notebook): the run's progress on stderr
    try:
        run_dir, _ = run_job(cfg, scheduler=scheduler, client=client)
    except RuntimeError as exc:
        if "failed to start" in str(exc) and _main_is_a_script():
            raise MfsimError(f"the embedded cluster's worker processes failed to start ({exc}); in a script, "
                             f"{NO_GUARD.split('; ', 1)[1]}") from exc
        raise
    return open_run(run_dir)


def _main_is_a_script() -> bool:
    import sys

    return hasattr(sys.modules.get("__main__"), "__file__")


def build_config(config: str | Path | Mapping[str, Any] | None, overrides: Mapping[str, Any] | None,
                 dotted: Mapping[str, Any], **convenience: Any) -> Config:
    """The config of ``run_pipeline`` and ``Model``: a YAML path or a mapping of sections over the defaults, then the
    dotted overrides (``input=``, ``output=``, ``run_id=`` for their keys), as ``--set`` applies them."""
    values: dict[str, Any] = {}
    given = [{CONVENIENCE_KEYS[k]: v for k, v in convenience.items() if v is not None}, dict(overrides or {}),
             dict(dotted)]
    for source in given:
        for key, value in source.items():
            if key in values:
                raise MfsimError(f"{LABEL} {key!r} is given twice (input=/output=/run_id=, overrides= and "
                                 "keyword arguments name the same keys); give it once")
            values[key] = value
    texts = [f"{_dotted(key)}={_as_yaml(value, f'{LABEL} {key}')}" for key, value in values.items()]
    if config is not None and not isinstance(config, (str, os.PathLike, Mapping)):
        raise MfsimError(f"config must be a YAML file's path or a mapping of sections, got {type(config).__name__}")
    if isinstance(config, Mapping):
        config = json.loads(_as_yaml(config, "the config mapping"))  # Paths, NumPy scalars: plain values
    return load_config(config, texts, label=LABEL)


def refuse_in_a_starting_worker() -> None:
    """Fail at once, in one line, where a worker process of the embedded cluster, starting, imports the caller's
    script and so calls ``run_pipeline`` again (a script without ``if __name__ == "__main__":``; worker processes
    are spawned, and a spawned process imports the main script): that call would start a run in every worker."""
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise SystemExit(NO_GUARD)


NO_GUARD = ('error: mfsim.run_pipeline was called while a worker process imported this script: the embedded '
            'cluster spawns worker processes, which import the main script; put the call under '
            '`if __name__ == "__main__":` (a notebook needs nothing)')


def _dotted(key: Any) -> str:
    """``key`` if it is a dotted config key (``svd.rank``); an ``MfsimError`` saying how to write one otherwise."""
    parts = key.split(".") if isinstance(key, str) else []
    if len(parts) < 2 or any(not p.strip() for p in parts) or "=" in key:
        raise MfsimError(f"{LABEL} {key!r} is not a dotted config key section.key (e.g. 'svd.rank'); pass "
                         "run_pipeline(cfg, **{'svd.rank': 8}) or overrides={'svd.rank': 8}")
    return key


def _as_yaml(value: Any, what: str) -> str:
    """``value`` as JSON text (valid YAML): paths as strings, NumPy scalars and arrays as numbers and lists,
    dates in ISO 8601; an ``MfsimError`` for anything a config cannot hold."""
    def plain(v: Any) -> Any:
        if isinstance(v, os.PathLike):
            return os.fspath(v)
        if isinstance(v, (dt.date, dt.datetime)):
            return v.isoformat()
        if isinstance(v, Mapping):
            return dict(v)
        if isinstance(v, (set, frozenset)):
            return sorted(v)
        if hasattr(v, "tolist"):  # NumPy scalars and arrays
            return v.tolist()
        raise TypeError(type(v).__name__)

    try:
        return json.dumps(value, default=plain, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise MfsimError(f"{what}: {value!r} is not a config value (strings, numbers, booleans, None, "
                         f"lists and mappings of them; {exc})") from None
