"""The ``mfsim`` command line: thin wrappers that load the config and call the jobs."""

from __future__ import annotations

import functools
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from mfsim.pipeline.config import Config, load_config
from mfsim.pipeline.errors import MfsimError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Interaction logs -> MF embeddings and neighbour lists, with a cosine-similarity audit.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks against named anchors, timed in the same run.")
app.add_typer(bench_app, name="bench")

SET_HELP = "Override a config key, value parsed as YAML: --set svd.rank=32 (repeatable)."
LOG_OPTIONS = {"--log-level": "INFO", "--log-format": "text"}  # accepted before or after the command
LOG_SETTINGS = dict(LOG_OPTIONS)  # what this invocation asked for (a submitted run inherits it)


def user_errors(fn):
    """One ``error: ...`` line on stderr and the exit code: an ``MfsimError``'s own (2 bad input or config,
    1 a run-time failure, 75 a held lock), 1 for anything else (its traceback goes to the log at DEBUG)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MfsimError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001  (disk full, lost workers, ...: one line, not a traceback)
            logging.getLogger("mfsim").debug("traceback", exc_info=True)
            first = str(exc).splitlines()[0] if str(exc) else ""
            typer.echo(f"error: {type(exc).__name__}: {first}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        import mfsim

        typer.echo(f"mfsim {mfsim.__version__}")
        raise typer.Exit(0)


@app.callback()
def _global(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR (any command)."),
    log_format: str = typer.Option("text", "--log-format", help="text or json: one JSON object per line (any command)."),
) -> None:
    """Interaction logs -> MF embeddings and neighbour lists, with a cosine-similarity audit."""


def _split_log_options(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """``--log-level``/``--log-format`` taken out of argv wherever they stand (so every command accepts them)."""
    rest, found = [], dict(LOG_OPTIONS)
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in LOG_OPTIONS:
            if eq:
                found[name] = value
            elif i + 1 < len(argv):
                found[name] = argv[i + 1]
                i += 1
            i += 1
            continue
        rest.append(arg)
        i += 1
    return rest, found


def _load(config: Optional[Path], overrides: list[str], **top: object) -> Config:
    cfg = load_config(config, overrides)
    for dotted, value in top.items():
        if value is not None:
            section, key = dotted.split(".")
            setattr(getattr(cfg, section), key, value)
    return cfg


@app.command(epilog="Example: mfsim run conf/default.yaml --input ../shared/data/ml-100k/interactions.parquet "
                    "--output /tmp/o --run-id t1 --set svd.rank=32")
@user_errors
def run(
    config: Path = typer.Argument(..., help="YAML config, e.g. conf/default.yaml or conf/paper.yaml."),
    input: Optional[str] = typer.Option(None, "--input", help="Parquet log: file, directory, glob or URL."),
    output: Optional[str] = typer.Option(None, "--output", help="Root of the run directories (run.output)."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Run id (default: a timestamped one)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Dask scheduler, e.g. tcp://HOST:8786."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    force: bool = typer.Option(False, "--force", help="Replace a published run of the same --run-id (swapped in "
                               "atomically once this one succeeds)."),
) -> None:
    """Run the pipeline on an interaction log and publish one run directory."""
    from mfsim.jobs.main_job import run_job

    cfg = _load(config, set_, **{"input.path": input, "run.output": output, "run.run_id": run_id})
    run_dir, manifest = run_job(cfg, scheduler=scheduler, replace=force)
    typer.echo(run_summary(run_dir, manifest))


def run_summary(run_dir: Path | str, manifest: dict) -> str:
    """The terminal summary of a published run: its tables, the audit's verdict, where it lies."""
    from mfsim.pipeline import outputs
    from mfsim.pipeline.runs.roots import read_run_table

    lines = []
    datasets = manifest.get("datasets", {})
    for path, title, values in (
        (outputs.EVALUATION_METRICS, "Held-out evaluation (fit on the train split):",
         ["recall", "recall_se", "ndcg", "ndcg_se"]),
        (outputs.CLUSTER_PRECISION, "Cluster precision@N of item-item lists (the paper's Fig. 1 in numbers):",
         ["cluster_precision", "chance"]),
    ):
        if path in datasets:
            lines += ["", title, format_table(read_run_table(run_dir, path), values)]
    factors = manifest.get("factors", {})
    chosen = [f"{name} lambda = {f['lambda']:.4g} (chosen by {f['lambda_chosen']['by']} on the held-out split, "
              f"{len(f['lambda_chosen']['grid'])} lambdas tried)"
              for name, f in factors.items() if "lambda_chosen" in f]
    if chosen:
        lines += ["", "Lambda sweep (" + outputs.LAMBDA_SWEEP + "):", *("  " + c for c in chosen)]
    if "cosine" in factors:
        c = factors["cosine"]
        lines += ["", f"Cosine-trained model: {c['iterations']} L-BFGS iterations in {c['seconds']:.1f}s, loss "
                      f"{c['start_loss']:.6g} -> {c['loss']:.6g}, gamma {c['gamma']:.4g}"
                      + ("" if c["converged"] else " (iteration limit reached)")]
    if "audit" in manifest:
        lines += ["", f"Cosine audit: {manifest['audit'].get('verdict', '')}"]
    lines += ["", f"run directory: {run_dir}"]
    if outputs.REPORT in datasets:
        lines.append(f"report: {run_dir}/{outputs.REPORT}")
    c = manifest["counts"]
    lines.append(f"users {c['n_users']}  items {c['n_items']}  non-zeros {c['nnz']}  "
                 f"stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in manifest["timings"].items()))
    return "\n".join(lines)


def format_table(table, value_cols: list[str]) -> str:
    """A fixed-width text table of the rows (for the terminal)."""
    cols = table.column_names
    rows = table.to_pylist()
    cells = [[(f"{r[c]:.4f}" if c in value_cols and r[c] is not None else str(r[c])) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


@app.command(epilog="Example: mfsim submit conf/default.yaml --input logs/ --output runs --scheduler tls://HOST:8786 --wait")
@user_errors
def submit(
    config: Path = typer.Argument(..., help="YAML config."),
    input: Optional[str] = typer.Option(None, "--input", help="Parquet log: file, directory, glob or URL."),
    output: Optional[str] = typer.Option(None, "--output", help="Root of the run directories (run.output)."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Run id (default: a timestamped one)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler",
                                            help="Run the driver inside this Dask cluster (else a detached local process)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    wait: bool = typer.Option(False, "--wait", help="Stream the run's log and exit with its exit status."),
) -> None:
    """Start a run and print its id at once; it goes on when this process or terminal goes away."""
    from mfsim.jobs import submit as sub
    from mfsim.pipeline.ingest import validate_before_cluster
    from mfsim.pipeline.runs.records import new_run_id, validate_run_id
    from mfsim.pipeline.runs.roots import open_root

    cfg = _load(config, set_, **{"input.path": input, "run.output": output, "run.run_id": run_id})
    cfg.run.run_id = validate_run_id(cfg.run.run_id or new_run_id())
    validate_before_cluster(cfg)  # bad input fails here, with exit 2, not in the background
    opts = LOG_SETTINGS
    if scheduler or cfg.cluster.address:
        from mfsim.pipeline.cluster import get_client

        with get_client(cfg.cluster, scheduler) as client:
            fut = sub.submit_driver(client, cfg, opts["--log-level"], opts["--log-format"])
            _submitted(cfg)
            if wait:
                raise typer.Exit(_finished(cfg, sub.wait_cluster(fut, cfg.run.output, cfg.run.run_id, sys.stderr)))
        return
    argv = ["run", str(config.resolve()), "--run-id", cfg.run.run_id, "--output", cfg.run.output,
            "--log-level", opts["--log-level"], "--log-format", opts["--log-format"]]
    if input is not None:
        argv += ["--input", input]
    for kv in set_:
        argv += ["--set", kv]
    proc = sub.start_local(argv, cfg.run.output, cfg.run.run_id)
    open_root(cfg.run.output).record_submitted(cfg.run.run_id, proc.pid)
    _submitted(cfg)
    if wait:
        raise typer.Exit(_finished(cfg, sub.wait_local(proc, cfg.run.output, cfg.run.run_id, sys.stderr)))


def _submitted(cfg: Config) -> None:
    """The run id on stdout (the one line a script reads), where its log goes and how to follow it on stderr."""
    from mfsim.jobs.submit import log_path

    typer.echo(cfg.run.run_id)
    typer.echo(f"submitted run {cfg.run.run_id}: log {log_path(cfg.run.output, cfg.run.run_id)}; follow it with: "
               f"mfsim logs {cfg.run.run_id} --output {cfg.run.output} --follow", err=True)


def _finished(cfg: Config, code: int) -> int:
    """After ``--wait``: the published run's summary on stdout, as ``mfsim run`` prints it; the exit code."""
    if code == 0:
        from mfsim.pipeline.runs.roots import open_root, read_manifest

        run_dir = open_root(cfg.run.output).run_location(cfg.run.run_id)
        typer.echo(run_summary(run_dir, read_manifest(run_dir)))
    return code


@app.command("runs", epilog="Example: mfsim runs --output runs --format json")
@user_errors
def runs_(
    output: str = typer.Option(..., "--output", help="Output root."),
    format: str = typer.Option("table", "--format", help="table or json."),
) -> None:
    """One line per run: run id, state, start, duration, n_users, n_items, nnz."""
    from mfsim.jobs.runs_cmd import format_runs
    from mfsim.pipeline.runs.roots import open_root

    typer.echo(format_runs(open_root(output).list_runs(), format))


RUN_HELP = "A run: its directory (or URL), <output>/LATEST, or its id with --output."


def _run_ref(run: str, output: Optional[str]) -> tuple[str, str]:
    """(output root, run id) of a run named as every command takes it: an id with ``--output``, a run directory or
    URL, or ``<output>/LATEST`` (``LATEST`` alone with ``--output``)."""
    from mfsim.pipeline.runs.roots import open_root

    if output is None:
        text = str(run).rstrip("/")
        if "/" not in text:
            raise MfsimError(f"run {run!r} is an id: give its output root too (--output ROOT), or the run's path "
                             "(ROOT/ID, ROOT/LATEST)")
        output, run = text.rsplit("/", 1)
    if run == "LATEST":
        latest = open_root(output).read_latest()
        if latest is None:
            raise MfsimError(f"no run has succeeded in {output} yet (no LATEST); list its runs: mfsim runs "
                             f"--output {output}")
        run = latest
    return output, run


@app.command(epilog="Example: mfsim status 2026-11-30 --output runs; mfsim status runs/2026-11-30")
@user_errors
def status(
    run: str = typer.Argument(..., help=RUN_HELP),
    output: Optional[str] = typer.Option(None, "--output", help="Output root (with a run id)."),
) -> None:
    """The state of one run (a running one's stage and dashboard too); exit code 0 succeeded, 1 failed or lost,
    3 running."""
    from mfsim.jobs.runs_cmd import STATUS_EXIT, format_runs
    from mfsim.pipeline.runs.roots import open_root

    output, run_id = _run_ref(run, output)
    st = open_root(output).run_status(run_id)
    typer.echo(format_runs([st], "table"))
    if st.stage:
        typer.echo(f"stage: {st.stage}")
    if st.dashboard:
        typer.echo(f"dashboard: {st.dashboard}")
    if st.error:
        typer.echo(f"error: {st.error}")
    raise typer.Exit(STATUS_EXIT[st.state])


@app.command(epilog="Example: mfsim show runs/LATEST; mfsim show 2026-11-30 --output runs")
@user_errors
def show(
    run: str = typer.Argument(..., help=RUN_HELP),
    output: Optional[str] = typer.Option(None, "--output", help="Output root (with a run id)."),
) -> None:
    """The manifest summary of a published run: counts, timings, the audit's verdict, warnings."""
    from mfsim.jobs.runs_cmd import format_manifest
    from mfsim.pipeline.runs.roots import open_root, read_manifest

    run_dir = open_root(_run_ref(run, output)[0]).run_location(_run_ref(run, output)[1])
    typer.echo(format_manifest(run_dir, read_manifest(run_dir)))


@app.command(epilog="Example: mfsim logs 2026-11-30 --output runs --follow")
@user_errors
def logs(
    run: str = typer.Argument(..., help=RUN_HELP),
    output: Optional[str] = typer.Option(None, "--output", help="Output root (with a run id)."),
    follow: bool = typer.Option(False, "--follow", help="Keep printing new lines until the run ends (exit code as "
                                "mfsim status: 0 succeeded, 1 failed or lost)."),
) -> None:
    """A run's log: a submitted run's (``<output>/.mfsim/logs/<id>.log``), else the published run's ``_log.txt``."""
    from mfsim.jobs.runs_cmd import STATUS_EXIT
    from mfsim.jobs.submit import log_path, stream_until
    from mfsim.pipeline.runs.roots import open_root

    output, run_id = _run_ref(run, output)
    root = open_root(output)
    path = log_path(output, run_id)
    if not path.is_file():
        if root.is_file(f"{run_id}/_log.txt"):
            typer.echo(root.read_bytes(f"{run_id}/_log.txt").decode("utf-8", "replace"), nl=False)
            raise typer.Exit(0)
        raise MfsimError(f"no log of run {run_id!r} in {output}: it was neither submitted nor published there; "
                         f"list the runs: mfsim runs --output {output}")
    if not follow:
        typer.echo(path.read_text(errors="replace"), nl=False)
        return
    stream_until(path, lambda: root.run_status(run_id).state != "running", sys.stdout)
    raise typer.Exit(STATUS_EXIT[root.run_status(run_id).state])


@app.command(epilog="Example: mfsim nightly conf/default.yaml --input 'logs/dt=*/*.parquet' --output runs "
                    "--backfill 2026-11-01 2026-11-03")
@user_errors
def nightly(
    config: Path = typer.Argument(..., help="YAML config."),
    output: str = typer.Option(..., "--output", help="Output root; run ids are the days, YYYY-MM-DD."),
    input: Optional[str] = typer.Option(None, "--input", help="Parquet log: file, directory, glob or URL."),
    date: Optional[str] = typer.Option(None, "--date", help="Day D, YYYY-MM-DD (default: yesterday, UTC)."),
    backfill: Optional[tuple[str, str]] = typer.Option(None, "--backfill", help="FROM TO: every missing day, in order."),
    force: bool = typer.Option(False, "--force", help="Recompute the day(s) even if they succeeded; swapped in atomically."),
    lock_timeout: float = typer.Option(0.0, "--lock-timeout", help="Seconds to wait for another nightly's lock (then exit 75)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Dask scheduler, e.g. tls://HOST:8786."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the config, the input's files and the output "
                                 "root, say which days would run, and exit (0, or 2 on bad input)."),
) -> None:
    """Process day D (the ingest.window_days days up to the end of D); a day that succeeded is skipped."""
    from mfsim.jobs.nightly import days_between, dry_run as check, run_nightly, yesterday_utc

    cfg = _load(config, set_, **{"input.path": input, "run.output": output})
    _need_input(cfg)
    if date is not None and backfill is not None:
        raise MfsimError("pass --date or --backfill FROM TO, not both")
    if backfill is not None:
        days = days_between(_day(backfill[0], "--backfill FROM"), _day(backfill[1], "--backfill TO"))
    else:
        days = [_day(date, "--date") if date is not None else yesterday_utc()]
    if dry_run:
        typer.echo(check(cfg, days))
        return
    done = run_nightly(cfg, days, force=force, lock_timeout_s=lock_timeout, scheduler=scheduler)
    typer.echo(f"nightly: {len(done)} run(s) published" + (f": {', '.join(done)}" if done else " (all days done)"))


def _day(text: str, what: str):
    import datetime as dt

    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise MfsimError(f"{what} must be a date YYYY-MM-DD, got {text!r}") from None


@app.command(epilog="Example: mfsim schedule conf/default.yaml --input '/data/logs/dt=*/*.parquet' "
                    "--output /data/mfsim/runs --at 02:30 --install")
@user_errors
def schedule(
    config: Path = typer.Argument(..., help="YAML config."),
    output: str = typer.Option(..., "--output", help="Output root (created if missing)."),
    at: str = typer.Option(..., "--at", help="HH:MM, UTC."),
    input: Optional[str] = typer.Option(None, "--input", help="Parquet log: file, directory, glob or URL "
                                        "(as nightly's; default: the config's input.path)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Dask scheduler, e.g. tls://HOST:8786."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    install: bool = typer.Option(False, "--install", help="Write the crontab line and the systemd units (else print them)."),
    into: Path = typer.Option(Path("."), "--into", help="With --install: the folder for the three files."),
) -> None:
    """A crontab line and a systemd service + timer that run ``mfsim nightly`` every day at --at (UTC).

    The generated command is checked before anything is written: it is run once with ``--dry-run`` (config,
    input files, output root), from another directory, as cron would run it.
    """
    import subprocess

    from mfsim.jobs.nightly import check_schedulable, enable_instructions, parse_at, schedule_files

    parse_at(at)
    cfg = _load(config, set_, **{"input.path": input, "run.output": output})
    _need_input(cfg)
    command = [str(Path(sys.executable).parent / "mfsim"), "nightly", str(config.resolve()),
               "--output", _absolute(output), "--input", _absolute(cfg.input.path)]
    for item in set_:
        command += ["--set", item]
    if scheduler:
        command += ["--scheduler", scheduler]
    check_schedulable(command)
    check = subprocess.run([*command, "--dry-run"], capture_output=True, text=True, cwd="/")
    if check.returncode != 0:
        why = [ln for ln in check.stderr.splitlines() if ln.startswith("error:")] or check.stderr.splitlines()[-1:]
        raise MfsimError(f"the nightly command this schedule would run fails its dry run "
                         f"({' '.join(why) or f'exit {check.returncode}'}); nothing written. The command: "
                         f"{shlex.join(command)}")
    files = schedule_files(command, _absolute(output), at)
    typer.echo(check.stdout.strip(), err=True)
    if not install:
        for name, text in files.items():
            typer.echo(f"# {name}\n{text}")
        typer.echo("(--install writes these files into --into and says how to enable them)", err=True)
        return
    into.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (into / name).write_text(text)
        typer.echo(f"wrote {into / name}")
    typer.echo(enable_instructions(into))


def _need_input(cfg: Config) -> None:
    if not cfg.input.path:
        raise MfsimError("no input given: pass --input (a Parquet file, directory, glob or URL) or set input.path "
                         "in the config")


def _absolute(path: str) -> str:
    """A local path (or glob) made absolute against the current directory, as a job started elsewhere needs it;
    a URL as it is."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


@app.command(epilog="Example: mfsim simulate conf/paper.yaml --out data/simulated --set simulate.n_users=5000")
@user_errors
def simulate(
    config: Optional[Path] = typer.Argument(None, help="YAML config (default conf/default.yaml); uses its simulate section."),
    out: Path = typer.Option(..., "--out", help="Directory to create with the simulated log and items_truth.parquet."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Simulate the paper's Section 4 data: clustered items, power-law popularity and activity."""
    from mfsim.pipeline.simulate import simulate as simulate_data, write_simulation

    cfg = _load(config, set_)
    sim = simulate_data(cfg.simulate)
    summary = write_simulation(sim, out, cfg.simulate)
    typer.echo(f"simulated {summary['n_users']} users x {summary['n_items']} items, "
               f"{summary['n_interactions']} interactions -> {summary['path']}")


@bench_app.command("ingest", epilog="Example: mfsim bench ingest --rows 5000000")
@user_errors
def bench_ingest(
    rows: int = typer.Option(50_000_000, help="Rows of the synthetic log."),
    users: Optional[int] = typer.Option(None, help="Distinct users (default rows/50)."),
    items: Optional[int] = typer.Option(None, help="Distinct items (default rows/250)."),
    workdir: Optional[Path] = typer.Option(None, help="Where to write the log (default: a temp dir)."),
    repeat: int = typer.Option(1, min=1, help="Also ingest the log's interactions repeated this many times "
                               "(the same X) and print both runs' worker peak RSS."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the measured numbers to this JSON file."),
) -> None:
    """Time mfsim's ingest against a single-process pyarrow read + scipy coo->csr build."""
    from mfsim.jobs.bench.ingest import run_bench_ingest
    from mfsim.jobs.bench.measure import write_json

    out = run_bench_ingest(rows=rows, users=users, items=items, workdir=workdir, repeat=repeat)
    if json_out is not None:
        write_json(json_out, out)


# the options of the benchmarks that run the whole job on a synthetic log (bench pipeline, bench scaling)
BENCH_USERS = typer.Option(200_000, help="Distinct users of the synthetic log.")
BENCH_ITEMS = typer.Option(50_000, help="Distinct items.")
BENCH_NNZ = typer.Option(5_000_000, help="Rows of the log.")
BENCH_CONFIG = typer.Option(None, "--config", help="YAML config (default: conf/default.yaml).")
BENCH_SET = typer.Option([], "--set", help=SET_HELP)


@bench_app.command("pipeline", epilog="Example: mfsim bench pipeline --users 200000 --items 50000 --nnz 5000000 "
                                       "--set evaluation.holdout=none")
@user_errors
def bench_pipeline(
    users: int = BENCH_USERS,
    items: int = BENCH_ITEMS,
    nnz: int = BENCH_NNZ,
    config: Optional[Path] = BENCH_CONFIG,
    set_: list[str] = BENCH_SET,
    workdir: Optional[Path] = typer.Option(None, help="Where to keep the log and the run (default: a temp dir)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the measured numbers to this JSON file."),
) -> None:
    """The whole job on a synthetic power-law log: each stage's wall time, driver and worker peak RSS, output sizes."""
    from mfsim.jobs.bench.measure import write_json
    from mfsim.jobs.bench.pipeline import run_bench_pipeline

    out = run_bench_pipeline(users=users, items=items, nnz=nnz, config=str(config) if config else None,
                             overrides=list(set_), workdir=workdir)
    if json_out is not None:
        write_json(json_out, out)


@bench_app.command("scaling", epilog="Example: mfsim bench scaling --users 200000 --items 50000 --nnz 5000000 "
                                      "--set evaluation.holdout=none --json scaling.json")
@user_errors
def bench_scaling(
    users: int = BENCH_USERS,
    items: int = BENCH_ITEMS,
    nnz: int = BENCH_NNZ,
    config: Optional[Path] = BENCH_CONFIG,
    set_: list[str] = BENCH_SET,
    workdir: Optional[Path] = typer.Option(None, help="Where to keep the log and the runs (default: a temp dir)."),
    workers: int = typer.Option(2, "--workers", help="Workers (of one thread) of the embedded cluster the graph is "
                                "recorded on."),
    check: list[int] = typer.Option([], "--check", help="Also run on this many workers and print the measured stage "
                                    "times against the prediction (repeatable, e.g. --check 1 --check 2)."),
    trace_out: Optional[Path] = typer.Option(None, "--trace", help="Write the recorded tasks and stages (JSON)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the numbers (JSON); the whole job's predicted "
                                            "speedup from one worker is under predicted_speedup, {P: x}."),
    plan_for: Optional[int] = typer.Option(None, "--plan-for", help="Record the graph the job gives a cluster of "
                                           "this many worker threads (list groups and audit lists side by side), "
                                           "not the recording cluster's (default)."),
) -> None:
    """The job's task graph recorded on its cluster: per stage work, serial time, critical path and the predicted
    time on 1 to 128 workers."""
    from mfsim.jobs.bench.measure import write_json
    from mfsim.jobs.bench.scaling import run_bench_scaling

    if workers < 1 or any(n < 1 for n in check) or (plan_for is not None and plan_for < 1):
        raise typer.BadParameter("worker counts must be at least 1.")
    out = run_bench_scaling(users=users, items=items, nnz=nnz, config=str(config) if config else None,
                            overrides=list(set_), workdir=workdir, n_workers=workers, check_workers=tuple(check),
                            trace_out=trace_out, plan_for=plan_for)
    if json_out is not None:
        write_json(json_out, out)


@bench_app.command("quality", epilog="Example: mfsim bench quality ../shared/data/ml-100k/interactions.parquet "
                                      "--json quality.json")
@user_errors
def bench_quality(
    inputs: list[str] = typer.Argument(..., help="Interaction logs (Parquet with user_id and item_id), one or more."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config of mfsim's fit (default: "
                                          "conf/default.yaml, with svd.rank=auto)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    seed: int = typer.Option(0, help="Seed of the splits."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the numbers to this JSON file."),
) -> None:
    """Held-out NDCG@20 of mfsim, EASE and implicit's ALS under one protocol (binarized, users with >= 5 items, a
    seeded per-user 80/20 split, each method tuned on an inner split of train)."""
    from mfsim.jobs.bench.measure import write_json
    from mfsim.jobs.bench.quality import run_bench_quality
    from mfsim.pipeline.config import parse_override

    overrides = {".".join(path): value for path, value in map(parse_override, set_)}
    out = run_bench_quality(list(inputs), config=str(config) if config else None, overrides=overrides, seed=seed)
    if json_out is not None:
        write_json(json_out, out)


@bench_app.command("svd", epilog="Example: mfsim bench svd --users 200000 --items 50000 --nnz 5000000 --rank 64")
@user_errors
def bench_svd(
    users: int = typer.Option(1_000_000, help="Rows of the power-law matrix."),
    items: int = typer.Option(200_000, help="Columns."),
    nnz: int = typer.Option(50_000_000, help="Non-zeros."),
    rank: int = typer.Option(64, help="k, the same for every method."),
    oversample: int = typer.Option(10, help="Oversampling, the same for every method."),
    power_iterations: Optional[int] = typer.Option(None, help="q (default: the config default)."),
    seed: int = typer.Option(0, help="Seed of the matrix and of every method."),
    block_rows: Optional[int] = typer.Option(None, help="Rows per block (default: the config default)."),
    methods: str = typer.Option("krylov,krylov-dask,mfsim,mfsim-dask,sklearn,dask-svd_compressed",
                                help="Comma-separated methods to time (default: all six; mfsim = subspace iteration)."),
    sklearn_power_iterations: Optional[int] = typer.Option(None, help="sklearn's n_iter (default: --power-iterations)."),
    svds_max_nnz: int = typer.Option(10_000_000, help="Compare against scipy's svds (tol 1e-10) up to this many "
                                     "non-zeros (the 200k x 50k matrix: ~2 min); above it, the best value any method found."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the measured numbers to this JSON file."),
) -> None:
    """Time mfsim's randomized SVD (in-process and on Dask) against scikit-learn and dask.array."""
    from mfsim.jobs.bench.measure import write_json
    from mfsim.jobs.bench.svd import run_bench_svd

    out = run_bench_svd(users=users, items=items, nnz=nnz, rank=rank, oversample=oversample,
                        power_iterations=power_iterations, seed=seed, block_rows=block_rows,
                        methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
                        sklearn_power_iterations=sklearn_power_iterations, svds_max_nnz=svds_max_nnz)
    if json_out is not None:
        write_json(json_out, out)


@bench_app.command("neighbours", epilog="Example: mfsim bench neighbours --items 100000 --rank 64 --top-n 100")
@user_errors
def bench_neighbours(
    items: int = typer.Option(100_000, help="Items P (queries = candidates); 0: only the --from-run factors."),
    rank: int = typer.Option(64, help="Embedding dimension k."),
    top_n: int = typer.Option(100, help="List length N."),
    seed: int = typer.Option(0, help="Seed of the embeddings."),
    slice_items: Optional[int] = typer.Option(None, help="Catalog size of the measured slice (default 1,000,000; 0: none)."),
    slice_queries: int = typer.Option(20_000, help="Queries timed in the slice."),
    threads: Optional[int] = typer.Option(None, help="Threads for every method (default: all cores)."),
    query_chunk: int = typer.Option(2048, help="Query rows per tile (mfsim and the bare gemm)."),
    candidate_block: int = typer.Option(1280, help="Candidate rows per tile (mfsim and the bare gemm)."),
    from_run: Optional[str] = typer.Option(None, "--from-run", help="Also time the factors of this published run "
                                           "(a run directory, <output>/LATEST or a URL): every objective and scaling "
                                           "it has, item-item and user-item."),
    run_users: int = typer.Option(50_000, "--from-run-users", help="User-item lists of --from-run timed for a "
                                  "seeded sample of this many users (all when fewer)."),
    run_sets: Optional[list[str]] = typer.Option(None, "--from-run-set", help="Only this objective/scaling of "
                                                 "--from-run (repeatable; default every set it has)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the measured numbers to this JSON file."),
) -> None:
    """Time item-item cosine + dot top-N against faiss IndexFlatIP and a bare sgemm over the same tiles."""
    from mfsim.jobs.bench.measure import write_json
    from mfsim.jobs.bench.neighbours import run_bench_from_run, run_bench_neighbours

    out: dict = {}
    if items > 0:
        out = run_bench_neighbours(items=items, rank=rank, top_n=top_n, seed=seed, slice_items=slice_items,
                                   slice_queries=slice_queries, threads=threads, query_chunk=query_chunk,
                                   candidate_block=candidate_block)
    if from_run is not None:
        out["from_run"] = run_bench_from_run(from_run, top_n, threads=threads, query_chunk=query_chunk,
                                             candidate_block=candidate_block, users=run_users, sets=run_sets)
    if json_out is not None:
        write_json(json_out, out)


@app.command(epilog="Example: mfsim audit --users runs/<run_id>/user_embeddings/objective=eq1/scaling=symmetric "
                    "--items runs/<run_id>/item_embeddings/objective=eq1/scaling=symmetric --draws 5")
@user_errors
def audit(
    users: Path = typer.Option(..., "--users", help="Parquet file or directory of parts: an id column and "
                               "'embedding' (list<float>)."),
    items: Path = typer.Option(..., "--items", help="Parquet file or directory of parts: an id column and "
                               "'embedding' (list<float>)."),
    top_n: int = typer.Option(100, "--top-n", help="N of Jaccard@N."),
    draws: int = typer.Option(5, "--draws", help="Random diagonal rescalings D."),
    spread: float = typer.Option(1.0, "--spread", help="Standard deviation of log D."),
    seed: int = typer.Option(0, "--seed", help="Seed of the rescalings and the user sample."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the stability table here (Parquet)."),
    cosine_norm_floor: float = typer.Option(1e-4, "--cosine-norm-floor", help="Rows whose norm is below this times "
                                            "the largest row norm get no cosine list (as neighbours.cosine_norm_floor); "
                                            "0: only zero rows."),
) -> None:
    """Audit any (user, item) embedding pair whose dot product is the model: do cosine lists survive U D, I D^-1?"""
    from mfsim.jobs.audit_cmd import run_audit_command

    run_audit_command(users, items, top_n=top_n, draws=draws, spread=spread, seed=seed, out=out,
                      cosine_norm_floor=cosine_norm_floor)


@app.command(epilog="Example: mfsim neighbours runs/LATEST --item 50 --metric cosine --metric model; "
                    "mfsim neighbours runs/LATEST --user 7 --format json")
@user_errors
def neighbours(
    run: str = typer.Argument(..., help=RUN_HELP),
    output: Optional[str] = typer.Option(None, "--output", help="Output root (with a run id)."),
    item: Optional[str] = typer.Option(None, "--item", help="Item id (as in the input): its similar items."),
    user: Optional[str] = typer.Option(None, "--user", help="User id (as in the input): its recommendations."),
    objective: list[str] = typer.Option([], "--objective", help="eq1 or eq2 (repeatable; default: both)."),
    scaling: list[str] = typer.Option([], "--scaling", help="Scalings to show, e.g. symmetric, invariant, unique "
                                      "(repeatable; default: all)."),
    metric: list[str] = typer.Option([], "--metric", help="Metrics to show (repeatable; default: all of the list kind)."),
    top: Optional[int] = typer.Option(None, "--top", help="Rows to show per list (default 10, at most the lists' "
                                      "length)."),
    format: str = typer.Option("table", "--format", help="table (a column per list), csv or json (a row per entry)."),
) -> None:
    """Print one item's item-item lists (--item) or one user's recommendations (--user), one column per
    (objective, scaling, metric), or their rows as CSV or JSON."""
    from mfsim.jobs.inspect_cmd import show_lists
    from mfsim.pipeline.runs.results import open_run

    if (item is None) == (user is None):
        raise MfsimError("pass --item ID (its similar items) or --user ID (its recommendations), one of them")
    kind, query = ("item_item", item) if item is not None else ("user_item", user)
    if output is not None:
        from mfsim.pipeline.runs.roots import open_root

        root, run_id = _run_ref(run, output)
        run = open_root(root).run_location(run_id)
    typer.echo(show_lists(open_run(run), kind, query, objectives=objective, scalings=scaling, metrics=metric,
                          top=top, fmt=format))


def _stop_on_signal(signum, frame) -> None:
    """SIGTERM: one ``error:`` line, then unwind (exit 128 + signum). The cluster's own loggers are silenced first:
    its connections close under it while it shuts down, which they would report as tracebacks."""
    import signal

    for name in ("distributed", "tornado", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    typer.echo(f"error: stopped by {signal.Signals(signum).name}: the run is abandoned, nothing published, "
               "earlier runs and LATEST untouched", err=True)
    sys.exit(128 + signum)


def main() -> None:
    """The ``mfsim`` entry point: logging set up, SIGTERM turned into a clean exit, then the typer app."""
    import signal

    from mfsim.jobs.logs import setup_logging

    argv, opts = _split_log_options(sys.argv[1:])
    LOG_SETTINGS.update(opts)
    try:
        setup_logging(opts["--log-level"], opts["--log-format"])
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    # SIGTERM (a scheduler's kill, systemd stop) unwinds like Ctrl-C: the run's temporary directory is
    # removed, its state says failed, the embedded cluster is shut down
    signal.signal(signal.SIGTERM, _stop_on_signal)
    try:
        app(args=argv, prog_name="mfsim")
    except MfsimError as exc:  # raised outside a command; commands handle their own
        typer.echo(f"error: {exc}", err=True)
        end_process(exc.exit_code)
        raise SystemExit(exc.exit_code) from None
    except SystemExit as exc:
        end_process(exc.code)
        raise
    end_process(0)


def end_process(code: int | str | None) -> None:
    """Exit now with ``code`` (as ``SystemExit`` reads it), once the command is done: output flushed, logging shut
    down, the ``atexit`` handlers run, but not Python's teardown of every module, which after a run (numba, pyarrow,
    matplotlib, thousands of objects freed one by one) took 0.4 s, 4% of a small run. Returns (a normal exit
    follows) while a thread other than daemons is still running."""
    import atexit
    import threading

    if any(t is not threading.main_thread() and t.is_alive() and not t.daemon for t in threading.enumerate()):
        return
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # SystemExit("message"): printed, status 1
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (mfsim ... | head): nothing more can reach it
            pass
    os._exit(status)


if __name__ == "__main__":
    main()
