"""The output contract, read by the clients people use: every dataset of a run, with each reader's default
options, gives the manifest's row count, no null ids, and ids of the input's type (pyarrow.dataset, pandas,
DuckDB, polars; Spark where pyspark and Java are present). The README's reading examples run against a run.

Three real runs through the command line: a small simulation (integer ids, item truth beside it), the
same log with string ids under other column names (``uid``, ``iid``), and ml-100k (skipped when absent).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from mfsim.pipeline.config import load_config
from mfsim.pipeline.simulate import ITEMS_TRUTH, simulate, write_simulation
from tests_support import SHARED_DATA

MFSIM = str(Path(sys.executable).parent / "mfsim")
REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
ML100K = SHARED_DATA / "ml-100k" / "interactions.parquet"

# Fast runs that still write every kind of dataset: item-item, user-item and user-user lists, both
# embeddings, held-out evaluation, the audit (one random draw) and the report; one worker.
FAST = ["--set", "svd.power_iterations=4", "--set", "objectives.eq1.scalings=[symmetric,item_orthonormal]",
        "--set", "neighbours.user_user=[cosine,projected_cosine]",  # off in conf/default.yaml
        "--set", "audit.draws=1", "--set", "evaluation.cutoffs=[5,10]", "--set", "report.heatmap_items=200",
        "--set", "cluster.n_workers=1",
        "--set", "objectives.lambda_grid=4", "--set", "objectives.cosine.max_iterations=20"]  # the remedies, short
SMALL = ["--set", "svd.rank=5", "--set", "neighbours.top_n=10", *FAST]
ML = ["--set", "svd.rank=16", "--set", "neighbours.top_n=20", *FAST]

# The contract (names used by checks outside the project): dataset -> its id columns.
ID_COLUMNS = {
    "ids/users.parquet": ("user_id",),
    "ids/items.parquet": ("item_id",),
    "svd/singular_values.parquet": (),
    "svd/basis.parquet": ("item_id",),  # V_k for the next run's svd.warm_start
    "item_embeddings": ("item_id",),
    "user_embeddings": ("user_id",),
    "similar_items": ("item_id", "neighbour_id"),
    "recommendations": ("user_id", "item_id"),
    "similar_users": ("user_id", "neighbour_id"),
    "evaluation/metrics.parquet": (),
    "evaluation/lambda_sweep.parquet": (),  # with objectives.eq*.lambda: auto (the default)
    "evaluation/cluster_precision.parquet": (),  # only when the item truth is known
    "audit/stability.parquet": (),
    "audit/items.parquet": ("item_id",),
    "audit/least_stable.parquet": ("item_id",),
    "report.html": (),
}
PARTITION_KEYS = {"item_embeddings": ("objective", "scaling"), "user_embeddings": ("objective", "scaling"),
                  "similar_items": ("objective", "scaling", "metric"),
                  "recommendations": ("objective", "scaling", "metric"),
                  "similar_users": ("objective", "scaling", "metric")}
ID_NAMES = ("user_id", "item_id", "neighbour_id")


@dataclass
class Run:
    root: Path  # the --output root (holds LATEST)
    dir: Path
    manifest: dict
    id_type: pa.DataType  # the input ids' Arrow type
    truth: bool  # item truth known: evaluation/cluster_precision.parquet is written

    def datasets(self):
        """(name, manifest entry) of every Parquet dataset of the manifest."""
        return [(n, d) for n, d in sorted(self.manifest["datasets"].items()) if d["format"] == "parquet"]

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def glob(self, name: str) -> str:
        """What DuckDB and polars read: a directory dataset's file glob, or the single file."""
        return self.path(name) if name.endswith(".parquet") else f"{self.path(name)}/**/*.parquet"


def mfsim_run(log: Path, out: Path, run_id: str, *options: str) -> tuple[Path, dict]:
    """``mfsim run conf/default.yaml`` on ``log``; (run directory, manifest)."""
    r = subprocess.run([MFSIM, "run", "conf/default.yaml", "--input", str(log), "--output", str(out),
                        "--run-id", run_id, *options], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    run_dir = out / run_id
    manifest = json.loads((run_dir / "_manifest.json").read_text())
    return run_dir, manifest


def _simulated_log(root: Path) -> Path:
    """200 users x 60 items of the paper's simulation (item ids 0..59, so item 50 of the README exists)."""
    cfg = load_config(None, ["simulate.n_users=200", "simulate.n_items=60", "simulate.seed=3", "simulate.n_days=3"])
    sim = root / "sim"
    write_simulation(simulate(cfg.simulate), sim, cfg.simulate)
    return sim


@pytest.fixture(scope="module")
def sim_log(tmp_path_factory) -> Path:
    return _simulated_log(tmp_path_factory.mktemp("readers-sim"))


@pytest.fixture(scope="module")
def simulated(tmp_path_factory, sim_log) -> Run:
    out = tmp_path_factory.mktemp("readers-sim-runs")
    run_dir, manifest = mfsim_run(sim_log, out, "sim", *SMALL)
    return Run(out, run_dir, manifest, pa.int64(), truth=True)


@pytest.fixture(scope="module")
def string_ids(tmp_path_factory, sim_log) -> Run:
    """The simulated log with string ids in columns ``uid`` / ``iid`` and its item truth keyed by ``iid``."""
    root = tmp_path_factory.mktemp("readers-str")
    log = root / "log"
    for f in sorted(sim_log.glob("dt=*/*.parquet")):
        t = pq.read_table(f)
        t = pa.table({"uid": pc.binary_join_element_wise("u", pc.cast(t["user_id"], pa.string()), ""),
                      "iid": pc.binary_join_element_wise("i", pc.cast(t["item_id"], pa.string()), ""),
                      "weight": t["weight"], "ts": t["ts"]})
        (log / f.parent.name).mkdir(parents=True)
        pq.write_table(t, log / f.parent.name / f.name)
    truth = pq.read_table(sim_log / ITEMS_TRUTH)
    truth = truth.set_column(0, "iid", pc.binary_join_element_wise("i", pc.cast(truth["item_id"], pa.string()), ""))
    pq.write_table(truth, log / ITEMS_TRUTH)
    assert pq.read_schema(next(log.glob("dt=*/*.parquet"))).field("uid").type == pa.string()
    run_dir, manifest = mfsim_run(log, root / "runs", "str", "--set", "input.user_col=uid",
                                  "--set", "input.item_col=iid", *SMALL)
    return Run(root / "runs", run_dir, manifest, pa.string(), truth=True)


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory) -> Run:
    if not ML100K.is_file():
        pytest.skip(f"{ML100K} is absent: the real data set ml-100k lives in ../shared beside the checkout")
    out = tmp_path_factory.mktemp("readers-ml")
    run_dir, manifest = mfsim_run(ML100K, out, "ml-100k", *ML)
    return Run(out, run_dir, manifest, pq.read_schema(ML100K).field("user_id").type, truth=False)


RUNS = ["simulated", "string_ids", "ml100k"]
INT_RUNS = ["simulated", "ml100k"]


@pytest.fixture(params=RUNS)
def run(request) -> Run:
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------------------------------------
# the manifest against the files


def test_the_manifest_lists_the_contract_datasets(run):
    expected = set(ID_COLUMNS) - (set() if run.truth else {"evaluation/cluster_precision.parquet"})
    datasets = run.manifest["datasets"]
    assert set(datasets) == expected
    assert datasets["report.html"]["format"] == "html" and (run.dir / "report.html").is_file()
    for name, d in run.datasets():
        assert d["path"] == name
        files = sorted((run.dir / name).rglob("*.parquet")) if not name.endswith(".parquet") else [run.dir / name]
        assert d["files"] == len(files), name
        keys = PARTITION_KEYS.get(name, ())
        for f in files:  # hive partitions only: every file at <dataset>/k1=v1/.../part-NNNNN.parquet
            rel = f.relative_to(run.dir / name).parts if keys else ()
            assert [p.split("=")[0] for p in rel[:-1]] == list(keys), f
            assert not keys or re.fullmatch(r"part-\d{5}\.parquet", rel[-1]), f
        names = pq.read_schema(files[0]).names
        assert set(ID_COLUMNS[name]) <= set(names) and set(names) & set(ID_NAMES) == set(ID_COLUMNS[name]), \
            f"{name}: id columns {names}"


def test_one_schema_per_dataset_and_the_manifest_says_which(run):
    """Every file of a dataset has the same Parquet schema, and the manifest's ``schema`` is that schema
    as a reader sees it (``pq.read_schema`` of the file)."""
    problems = []
    for name, d in run.datasets():
        files = sorted((run.dir / name).rglob("*.parquet")) if not name.endswith(".parquet") else [run.dir / name]
        first = pq.read_schema(files[0])
        problems += [f"{f}: schema differs from {files[0]}" for f in files[1:] if not pq.read_schema(f).equals(first)]
        on_disk = [{"name": f.name, "type": str(f.type)} for f in first]
        if d["schema"] != on_disk:
            problems.append(f"{name}: manifest schema {d['schema']} != Parquet schema {on_disk}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# every dataset in every reader


def read_pyarrow(run: Run, name: str):
    """(rows, {id column: (null count, type matches)}) with pyarrow.dataset (hive partitioning)."""
    t = ds.dataset(run.path(name), format="parquet",
                   partitioning=None if name.endswith(".parquet") else "hive").to_table()
    return t.num_rows, {c: (t[c].null_count, t[c].type == run.id_type, str(t[c].type))
                        for c in ID_COLUMNS[name]}


def _pandas_type_ok(s: pd.Series, id_type: pa.DataType) -> bool:
    if pa.types.is_integer(id_type):
        return s.dtype == np.dtype(id_type.to_pandas_dtype())
    # strings: pandas 3's str dtype, or object holding only str
    return pd.api.types.is_string_dtype(s.dtype) and all(isinstance(v, str) for v in s.head(1000))


def read_pandas(run: Run, name: str):
    df = pd.read_parquet(run.path(name))
    return len(df), {c: (int(df[c].isna().sum()), _pandas_type_ok(df[c], run.id_type), str(df[c].dtype))
                     for c in ID_COLUMNS[name]}


DUCKDB_TYPES = {pa.int64(): "BIGINT", pa.int32(): "INTEGER", pa.string(): "VARCHAR"}


def read_duckdb(run: Run, name: str):
    src = (f"read_parquet('{run.glob(name)}')" if name.endswith(".parquet")
           else f"read_parquet('{run.glob(name)}', hive_partitioning=true)")
    con = duckdb.connect()
    rows = con.sql(f"SELECT count(*) FROM {src}").fetchall()[0][0]
    types = {r[0]: r[1] for r in con.sql(f"DESCRIBE SELECT * FROM {src}").fetchall()}
    ids = {}
    for c in ID_COLUMNS[name]:
        nulls = con.sql(f"SELECT count(*) FROM {src} WHERE {c} IS NULL").fetchall()[0][0]
        ids[c] = (nulls, types[c] == DUCKDB_TYPES[run.id_type], types[c])
    con.close()
    return rows, ids


POLARS_TYPES = {pa.int64(): pl.Int64, pa.int32(): pl.Int32, pa.string(): pl.String}


def read_polars(run: Run, name: str):
    lf = pl.scan_parquet(run.glob(name), hive_partitioning=True)
    schema = lf.collect_schema()
    counts = lf.select(pl.len().alias("rows"), *[pl.col(c).null_count().alias(c) for c in ID_COLUMNS[name]]).collect()
    return counts["rows"][0], {c: (counts[c][0], schema[c] == POLARS_TYPES[run.id_type], str(schema[c]))
                               for c in ID_COLUMNS[name]}


READERS = {"pyarrow": read_pyarrow, "pandas": read_pandas, "duckdb": read_duckdb, "polars": read_polars}


def check_reader(run: Run, reader) -> list[str]:
    """Every Parquet dataset of the manifest through ``reader``; one line per problem (all of them)."""
    problems = []
    for name, d in run.datasets():
        try:
            rows, ids = reader(run, name)
        except Exception as exc:  # noqa: BLE001  (a reader that cannot read a dataset is what we report)
            problems.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        if rows != d["rows"]:
            problems.append(f"{name}: {rows} rows, the manifest says {d['rows']}")
        for col, (nulls, type_ok, type_name) in ids.items():
            if nulls:
                problems.append(f"{name}.{col}: {nulls} null ids")
            if not type_ok:
                problems.append(f"{name}.{col}: type {type_name}, the input ids are {run.id_type}")
    return problems


@pytest.mark.parametrize("reader", list(READERS))
def test_every_dataset_reads_right(run, reader):
    problems = check_reader(run, READERS[reader])
    assert not problems, f"{reader} on run {run.dir.name}:\n" + "\n".join(problems)


def test_output_ids_are_the_input_ids(string_ids):
    """String ids under ``uid``/``iid`` come out as ``user_id``/``item_id`` strings, the same values."""
    files = sorted(Path(string_ids.manifest["config"]["input"]["path"]).glob("dt=*/*.parquet"))
    log = pa.concat_tables(pq.read_table(f, columns=["uid", "iid"]) for f in files)
    users = pq.read_table(string_ids.dir / "ids/users.parquet")["user_id"]
    items = pq.read_table(string_ids.dir / "ids/items.parquet")["item_id"]
    assert set(users.to_pylist()) == set(pc.unique(log["uid"]).to_pylist())
    assert set(items.to_pylist()) == set(pc.unique(log["iid"]).to_pylist())
    lists = ds.dataset(string_ids.dir / "similar_items", format="parquet", partitioning="hive").to_table()
    assert set(pc.unique(lists["neighbour_id"]).to_pylist()) <= set(items.to_pylist())


# ---------------------------------------------------------------------------------------------
# the original bug: one directory held lists of different row shapes


@pytest.mark.parametrize("name", RUNS)
def test_duckdb_where_item_id_gives_only_item_item_rows(request, name):
    run = request.getfixturevalue(name)
    path = run.dir / "similar_items"
    item = pq.read_table(run.dir / "ids/items.parquet")["item_id"][0].as_py()
    cols = ["item_id", "neighbour_id", "rank", "score", "objective", "scaling", "metric"]
    got = duckdb.connect().execute(
        f"SELECT {', '.join(cols)} FROM read_parquet('{path}/**/*.parquet', hive_partitioning=true) "
        "WHERE item_id = ? ORDER BY objective, scaling, metric, rank", [item]).fetchall()
    t = ds.dataset(path, format="parquet", partitioning="hive").to_table(filter=ds.field("item_id") == item)
    t = t.select(cols).sort_by([("objective", "ascending"), ("scaling", "ascending"), ("metric", "ascending"),
                                ("rank", "ascending")])
    ref = [tuple(r.values()) for r in t.to_pylist()]
    assert got and len(got) == len(ref)
    assert [r[:3] + r[4:] for r in got] == [r[:3] + r[4:] for r in ref]
    np.testing.assert_array_equal([r[3] for r in got], [r[3] for r in ref])
    all_items = set(pq.read_table(run.dir / "ids/items.parquet")["item_id"].to_pylist())
    assert all(r[0] == item and r[1] in all_items for r in got)  # item-item rows, not user rows
    top_n = run.manifest["config"]["neighbours"]["top_n"]
    lists = {r[4:]: [] for r in got}
    for r in got:
        lists[r[4:]].append(r[2])
    assert all(ranks == list(range(1, len(ranks) + 1)) and len(ranks) <= top_n for ranks in lists.values())


@pytest.mark.parametrize("name", INT_RUNS)
def test_pandas_similar_items_ids_are_int64_without_nan(request, name):
    run = request.getfixturevalue(name)
    df = pd.read_parquet(run.dir / "similar_items")
    assert len(df) == run.manifest["datasets"]["similar_items"]["rows"]
    for c in ("item_id", "neighbour_id"):
        assert df[c].dtype == np.int64 and not df[c].isna().any(), c
    assert "user_id" not in df.columns


# ---------------------------------------------------------------------------------------------
# report.html: one self-contained file


class _Links(HTMLParser):
    ATTRS = {"src", "href", "srcset", "data", "poster", "action", "xlink:href"}

    def __init__(self):
        super().__init__()
        self.links: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.links += [(tag, k, v or "") for k, v in attrs if k in self.ATTRS]


def test_report_is_self_contained(run):
    text = (run.dir / "report.html").read_text()
    parser = _Links()
    parser.feed(text)
    outside = [(tag, k, v[:80]) for tag, k, v in parser.links if not (v.startswith("data:") or v.startswith("#"))]
    assert not outside, f"report.html points outside itself: {outside}"
    assert any(tag == "img" and v.startswith("data:image/") for tag, _, v in parser.links), "no inline figure"
    assert not re.search(r"url\((?!\s*['\"]?(data:|#))", text) and "@import" not in text
    assert list(run.dir.glob("*.png")) == [] and not (run.dir / "report").exists()


# ---------------------------------------------------------------------------------------------
# Spark (optional: pip install -e '.[spark]' and Java)


@pytest.fixture(scope="module")
def spark():
    try:
        import pyspark  # noqa: F401
    except ImportError:
        pytest.skip("pyspark is not installed (pip install -e '.[spark]')")
    if shutil.which("java") is None:
        pytest.skip("java is not on PATH: Spark needs a JVM")
    from pyspark.sql import SparkSession

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # local mode on the loopback only
    session = (SparkSession.builder.master("local[1]").appName("mfsim-readers")
               .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
               .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "1")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def test_spark_reads_every_dataset(run, spark):
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    spark_type = {pa.int64(): T.LongType(), pa.int32(): T.IntegerType(), pa.string(): T.StringType()}[run.id_type]
    problems = []
    for name, d in run.datasets():
        df = spark.read.parquet(run.path(name))
        row = df.agg(F.count(F.lit(1)).alias("rows"),
                     *[F.sum(F.col(c).isNull().cast("long")).alias(c) for c in ID_COLUMNS[name]]).collect()[0]
        if row["rows"] != d["rows"]:
            problems.append(f"{name}: {row['rows']} rows, the manifest says {d['rows']}")
        for c in ID_COLUMNS[name]:
            if row[c]:
                problems.append(f"{name}.{c}: {row[c]} null ids")
            if df.schema[c].dataType != spark_type:
                problems.append(f"{name}.{c}: type {df.schema[c].dataType}, the input ids are {run.id_type}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# the README's reading examples, run


EXAMPLE = re.compile(r"<!-- readme-example: (?P<name>[\w-]+) -->\s*\n```(?P<lang>\w+)\n(?P<code>.*?)\n```", re.S)
EXAMPLES = {m["name"]: (m["lang"], m["code"]) for m in EXAMPLE.finditer(README.read_text())}


def test_the_readme_has_its_examples():
    assert {"latest", "duckdb-similar-items", "pandas", "polars", "pyarrow", "spark"} <= set(EXAMPLES)
    outputs = README.read_text().split("## Outputs", 1)[1].split("\n## ", 1)[0]
    for old in ("neighbours/kind=", "factors/", "report/index.html", "detail.parquet"):
        assert old not in outputs, old


def _n_rows(value) -> int:
    if isinstance(value, (int, np.integer)):
        return int(value)
    if hasattr(value, "num_rows"):  # pyarrow
        return value.num_rows
    if hasattr(value, "rdd"):  # Spark
        return value.count()
    return len(value)  # pandas, polars


def _exec_python(code: str):
    """Run the block; the value of its last line when that is an expression."""
    tree = ast.parse(code)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    ns: dict = {}
    exec(compile(tree, "<README>", "exec"), ns)
    return eval(compile(ast.Expression(last.value), "<README>", "eval"), ns) if last else None


@pytest.mark.parametrize("run_name", INT_RUNS)  # item 50 and user 7 exist in both (simulated: ids 0..59, 0..199)
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_readme_example(request, name, run_name):
    readme_run = request.getfixturevalue(run_name)
    lang, code = EXAMPLES[name]
    if name.startswith("spark"):
        request.getfixturevalue("spark")  # skips without pyspark or Java; the block's getOrCreate() gets it
    code = code.replace("runs/<run_id>", f"{readme_run.root}/{readme_run.dir.name}")
    code = code.replace('"runs"', f'"{readme_run.root}"')
    assert "<run_id>" not in code and '"runs"' not in code, code
    if lang == "sql":
        con = duckdb.connect()
        for statement in filter(str.strip, code.split(";")):
            assert con.sql(statement).fetchall(), f"no rows: {statement}"
        con.close()
    else:
        assert lang == "python", lang
        assert _n_rows(_exec_python(code)) > 0
