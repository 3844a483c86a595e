"""The Python API (``mfsim.open_run``, ``mfsim.run_pipeline``) and ``mfsim neighbours`` on real runs.

References are independent of ``pipeline.runs.results``: the Parquet files read by hand with pyarrow,
dense NumPy products of the embeddings, the simulated log itself.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import mfsim
from mfsim.pipeline.config import load_config
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.simulate import simulate, write_simulation

MFSIM = str(Path(sys.executable).parent / "mfsim")
README = Path(__file__).resolve().parents[2] / "README.md"
RANK, TOP_N = 5, 6
SCALINGS = ["symmetric", "item_orthonormal"]
CONFIG = {  # a mapping over the defaults, as a YAML file's would be
    "svd": {"rank": RANK, "power_iterations": 8},
    "objectives": {"eq1": {"lambda": 2.0, "scalings": SCALINGS}, "eq2": {"lambda": 10.0}, "cosine": None},
    # off by default: user-user lists, and the lists of named Eq. 1 scalings (these tests read them all)
    "neighbours": {"user_user": ["cosine", "projected_cosine"], "eq1_scalings": "all"},
    "evaluation": {"holdout": "none"},
    "report": {"enabled": False},
}


@pytest.fixture(scope="module")
def api_run(tmp_path_factory, client):
    """(run, root): one small simulated run made with run_pipeline (a dict config and dotted overrides)."""
    root = tmp_path_factory.mktemp("api")
    sim_cfg = load_config(None, ["simulate.n_users=150", "simulate.n_items=60", "simulate.seed=5"])
    write_simulation(simulate(sim_cfg.simulate), root / "sim", sim_cfg.simulate)
    run = mfsim.run_pipeline(CONFIG, input=root / "sim", output=root / "runs", run_id="first", client=client,
                             **{"neighbours.top_n": TOP_N, "audit.draws": 1})
    return run, root


def _log(root: Path) -> pd.DataFrame:
    return ds.dataset(sorted(str(f) for f in (root / "sim").glob("dt=*/*.parquet")), format="parquet").to_table(
        columns=["user_id", "item_id"]).to_pandas()


def _ids(run, side: str) -> np.ndarray:
    t = pq.read_table(Path(run.path) / f"ids/{side}.parquet").sort_by("index")
    return t[f"{side[:-1]}_id"].to_numpy()


def test_run_pipeline_merges_the_dict_and_the_overrides_over_the_defaults(api_run):
    run, root = api_run
    assert isinstance(run, mfsim.Run) and run.run_id == "first" and Path(run.path) == root / "runs" / "first"
    cfg = run.manifest["config"]
    assert cfg["svd"]["rank"] == RANK and cfg["svd"]["power_iterations"] == 8 and cfg["svd"]["oversample"] == 10
    assert cfg["objectives"]["eq1"]["scalings"] == SCALINGS and cfg["objectives"]["eq1"]["lambda"] == 2.0
    assert cfg["neighbours"]["top_n"] == TOP_N and cfg["audit"]["draws"] == 1
    assert cfg["input"]["path"] == str(root / "sim") and cfg["ingest"]["block_rows"] == 65536  # a default


@pytest.mark.parametrize("kind, method, q_col, dataset", [
    ("item_item", "similar_items", "item_id", "similar_items"),
    ("user_item", "recommend", "user_id", "recommendations"),
    ("user_user", "similar_users", "user_id", "similar_users"),
])
def test_lists_equal_the_parquet_rows_filtered_by_hand(api_run, kind, method, q_col, dataset):
    run, _ = api_run
    combos = run.lists(kind)
    on_disk = {tuple(p.split("=", 1)[1] for p in d.relative_to(Path(run.path) / dataset).parts)
               for d in (Path(run.path) / dataset).glob("*/*/*")}
    assert set(combos) == on_disk and len(combos) >= 3
    ids = _ids(run, "items" if kind == "item_item" else "users")
    for objective, scaling, metric in combos:
        ref_all = pq.read_table(Path(run.path) / f"{dataset}/objective={objective}/scaling={scaling}/"
                                                  f"metric={metric}").to_pandas()
        queries = ids[[len(ids) - 1, 0, 7]]
        for n in (3, TOP_N):  # shorter than the list, and all of it
            singles = []
            for query in queries:
                got = getattr(run, method)(query, n=n, metric=metric, objective=objective, scaling=scaling)
                ref = ref_all[(ref_all[q_col] == query) & (ref_all["rank"] <= n)].sort_values("rank")
                pd.testing.assert_frame_equal(got, ref.reset_index(drop=True))
                assert len(got) == n
                singles.append(got)
            # several ids at once: one frame, the ids in the order given, each one's rows as asked alone
            many = getattr(run, method)(list(queries), n=n, metric=metric, objective=objective, scaling=scaling)
            pd.testing.assert_frame_equal(many, pd.concat(singles, ignore_index=True))
        with pytest.raises(MfsimError, match=rf"n={TOP_N + 5} is longer .* at most {TOP_N} entries .*top_n={TOP_N}"):
            getattr(run, method)(queries[0], n=TOP_N + 5, metric=metric, objective=objective, scaling=scaling)
    # every list of one query at once: the same rows, with the partition keys
    query = ids[7]
    both = run.neighbour_lists(kind, query, TOP_N)
    assert [tuple(k) for k in both[["objective", "scaling", "metric"]].drop_duplicates().values] == combos
    o, s, m = combos[0]
    one = getattr(run, method)(query, n=TOP_N, metric=m, objective=o, scaling=s)
    first = both[(both["objective"] == o) & (both["scaling"] == s) & (both["metric"] == m)]
    pd.testing.assert_frame_equal(first.drop(columns=["objective", "scaling", "metric"]).reset_index(drop=True), one)


def _check_top(got_ids, got_scores, ref_row, cand_ids, tol):
    """A list is the top of ``ref_row`` (admissible candidates finite, others -inf), up to near-ties."""
    pos = np.searchsorted(cand_ids, got_ids)
    assert (cand_ids[pos] == got_ids).all()
    np.testing.assert_allclose(got_scores, ref_row[pos], atol=tol)  # the score of what is listed
    best = np.sort(ref_row[np.isfinite(ref_row)])[::-1][:len(got_ids)]
    np.testing.assert_allclose(got_scores, best, atol=tol)  # and the best scores
    assert np.isfinite(ref_row[pos]).all()


def test_dot_lists_and_recommendations_match_numpy_on_the_returned_embeddings(api_run):
    run, root = api_run
    item_ids, B = run.item_embeddings("eq1", "symmetric")
    item_ids = item_ids.to_numpy()
    S = B.astype(np.float64) @ B.T.astype(np.float64)
    np.fill_diagonal(S, -np.inf)  # no item is its own neighbour
    tol = 1e-5 * np.abs(S[np.isfinite(S)]).max()  # float32 gemm of k = 5 terms
    for i, item in enumerate(item_ids):
        got = run.similar_items(item, n=TOP_N, metric="dot", scaling="symmetric")
        _check_top(got["neighbour_id"].to_numpy(), got["score"].to_numpy(), S[i], item_ids, tol)
    # (X A B^T)_ui = p_u . b_i is the same for every Eq. 1 scaling: the invariant list, from another one's P and B
    user_ids, P = run.user_embeddings("eq1", "item_orthonormal")
    user_ids = user_ids.to_numpy()
    _, B2 = run.item_embeddings("eq1", "item_orthonormal")
    R = P.astype(np.float64) @ B2.T.astype(np.float64)
    log = _log(root)
    seen = {u: set(g) for u, g in log.groupby("user_id")["item_id"]}
    tol = 1e-4 * np.abs(R).max()
    for u, user in enumerate(user_ids):
        if len(seen[user]) == len(item_ids):  # a user who has every item gets no list, and says so
            with pytest.raises(MfsimError, match=rf"user {user} of run first has no entries in recommendations"):
                run.recommend(user, n=TOP_N)
            continue
        got = run.recommend(user, n=TOP_N)
        assert not set(got["item_id"]) & seen[user], f"user {user} is recommended an item of their own"
        assert len(got) == min(TOP_N, len(item_ids) - len(seen[user]))
        row = np.where(np.isin(item_ids, list(seen[user])), -np.inf, R[u])
        _check_top(got["item_id"].to_numpy(), got["score"].to_numpy(), row, item_ids, tol)


@pytest.mark.parametrize("kind, method", [("item_item", "similar_items"), ("user_item", "recommend"),
                                          ("user_user", "similar_users")])
def test_every_one_argument_change_gives_a_list_or_says_why_none_exists(api_run, kind, method):
    """Each lookup with one argument changed from its defaults returns the list when the run has one that fits
    (judged from the dataset's directories: a named Eq. 1 scaling fits the one list of a scaling-invariant metric),
    and otherwise raises one MfsimError that names the valid values."""
    run, _ = api_run
    dataset = {"item_item": "similar_items", "user_item": "recommendations", "user_user": "similar_users"}[kind]
    on_disk = {tuple(p.split("=", 1)[1] for p in d.relative_to(Path(run.path) / dataset).parts)
               for d in (Path(run.path) / dataset).glob("*/*/*")}
    eq1_scalings = {s for o, s, _ in on_disk if o == "eq1" and s != "invariant"}
    query = _ids(run, "items" if kind == "item_item" else "users")[3]
    default = {"objective": "eq1", "metric": None, "scaling": None}
    changes = ([("metric", m) for m in ("dot", "cosine", "model", "projected_cosine", "euclid")]
               + [("objective", o) for o in ("eq2", "cosine", "eq3")]
               + [("scaling", s) for s in ("invariant", "unique", "symmetric", "item_orthonormal", "user_orthonormal",
                                           "eq2_like", "custom", "nonsense")])

    def fits(o, m, sc, combo):
        return (combo[0] == o and (m is None or combo[2] == m)
                and (sc is None or combo[1] == sc or (combo[1] == "invariant" and o == "eq1" and sc in eq1_scalings)))

    answered = 0
    for key, value in changes:
        args = {**default, key: value}
        exists = any(fits(args["objective"], args["metric"], args["scaling"], c) for c in on_disk)
        if exists:
            got = getattr(run, method)(query, **args)
            assert len(got) == min(10, TOP_N) and list(got["rank"]) == list(range(1, TOP_N + 1)), (key, value)
            answered += 1
        else:
            with pytest.raises(MfsimError, match="; valid: "):
                getattr(run, method)(query, **args)
    assert answered >= 6
    # the other arguments: ids as a string, a list, an array; n up to the published length, beyond it an error
    assert getattr(run, method)(str(query)).equals(getattr(run, method)(query))
    assert getattr(run, method)([query]).equals(getattr(run, method)(query))
    assert getattr(run, method)(np.array([query, query])).equals(getattr(run, method)(query))
    assert len(getattr(run, method)(query, n=1)) == 1 and len(getattr(run, method)(query, n=TOP_N)) == TOP_N
    with pytest.raises(MfsimError, match=f"at most {TOP_N} entries"):
        getattr(run, method)(query, n=TOP_N + 1)
    assert run.lists(kind) == run.lists(dataset)  # either name of a list kind


def test_embeddings_are_in_index_order_and_equal_the_files(api_run):
    run, _ = api_run
    for side, method, id_col in (("items", run.item_embeddings, "item_id"), ("users", run.user_embeddings, "user_id")):
        for objective, scaling in [("eq1", s) for s in SCALINGS] + [("eq2", "unique")]:
            ids, E = method(objective, scaling)
            np.testing.assert_array_equal(ids.to_numpy(), _ids(run, side))
            assert E.dtype == np.float32 and E.shape == (len(ids), RANK)
            t = pq.read_table(Path(run.path) / f"{side[:-1]}_embeddings/objective={objective}/scaling={scaling}")
            by_id = dict(zip(t[id_col].to_pylist(), t["embedding"].to_pylist()))
            np.testing.assert_array_equal(E, np.array([by_id[i] for i in ids.to_pylist()], dtype=np.float32))
    audit = run.audit()
    assert set(audit["metric"]) >= {"cosine", "model", "projected_cosine"}
    assert (audit[audit["metric"] == "model"]["jaccard_mean"] == 1.0).all()  # scaling-invariant


def test_errors_say_what_exists(api_run, tmp_path):
    run, root = api_run
    items = _ids(run, "items")
    with pytest.raises(MfsimError, match=rf"unknown item id 100000: run first has {len(items)} items .*ids/items"):
        run.similar_items(100000)
    with pytest.raises(MfsimError, match=r"unknown user id -3: run first has \d+ users .*ids/users\.parquet"):
        run.recommend(-3)
    with pytest.raises(MfsimError, match=r"item id 'abc' cannot be cast .* int64"):
        run.similar_items("abc")
    assert run.similar_items(str(items[0])).equals(run.similar_items(int(items[0])))  # cast to the id type
    with pytest.raises(MfsimError, match=r"no metric 'euclid' .*valid: cosine, dot, model, projected_cosine"):
        run.similar_items(items[0], metric="euclid")
    with pytest.raises(MfsimError, match=r"no metric 'model' for objective eq1; valid: cosine, dot \(user_item "):
        run.recommend(0, metric="model")
    with pytest.raises(MfsimError, match=r"no scaling 'eq2_like' .*valid: item_orthonormal, symmetric"):
        run.similar_items(items[0], metric="cosine", scaling="eq2_like")  # a scaling the run was not asked for
    with pytest.raises(MfsimError, match=r"no scaling 'invariant' .*cosine changes with the arbitrary scaling"):
        run.similar_items(items[0], metric="cosine", scaling="invariant")
    with pytest.raises(MfsimError, match=r"no scaling 'symmetric' for objective eq2.*valid: unique.*unique"):
        run.similar_items(items[0], objective="eq2", scaling="symmetric")
    with pytest.raises(MfsimError, match=r"no objective 'eq3'.*valid: eq1, eq2 \(objectives: eq1, eq2, cosine\)"):
        run.similar_users(0, objective="eq3")
    with pytest.raises(MfsimError, match=r"no objective 'cosine'.*had no objectives\.cosine"):
        run.similar_items(items[0], objective="cosine")
    with pytest.raises(MfsimError, match=r"unknown item ids 100000, -1: run first has"):
        run.similar_items([items[0], 100000, -1])
    with pytest.raises(MfsimError, match=r"unknown list kind 'items'; valid: item_item \(similar_items\), "):
        run.lists("items")
    with pytest.raises(MfsimError, match=r"no held-out evaluation .*evaluation\.holdout: none; rerun with"):
        run.metrics()
    with pytest.raises(MfsimError, match=r"item_embeddings .*no scaling 'invariant'.*valid: item_orthonormal, sym"):
        run.item_embeddings("eq1", "invariant")
    with pytest.raises(MfsimError, match="n must be a positive integer"):
        run.similar_items(items[0], n=0)
    with pytest.raises(MfsimError, match=r"no _manifest\.json"):
        mfsim.open_run(tmp_path)
    with pytest.raises(MfsimError, match="output root, not a run"):
        mfsim.open_run(root / "runs")


def test_run_pipeline_refuses_bad_overrides_before_starting_anything(tmp_path):
    with pytest.raises(MfsimError, match=r"'svd\.rank' in run_pipeline override svd\.rank=true"):
        mfsim.run_pipeline(CONFIG, **{"svd.rank": True})
    with pytest.raises(MfsimError, match=r"unknown config key 'svd\.rnak' in run_pipeline override"):
        mfsim.run_pipeline(CONFIG, overrides={"svd.rnak": 3})
    with pytest.raises(MfsimError, match=r"unknown config key 'svd\.rnak' in the config mapping"):
        mfsim.run_pipeline({"svd": {"rnak": 3}})
    with pytest.raises(MfsimError, match=r"'rank' is not a dotted config key"):
        mfsim.run_pipeline(CONFIG, overrides={"rank": 3})
    with pytest.raises(MfsimError, match=r"'run\.output' is given twice"):
        mfsim.run_pipeline(CONFIG, output=tmp_path, **{"run.output": str(tmp_path)})
    assert not any(tmp_path.iterdir())


def test_latest_is_the_newest_run_and_urls_read_the_same(api_run):
    """A second run from a YAML file on the embedded one-worker cluster; LATEST, file:// and memory:// forms."""
    import fsspec

    run, root = api_run
    overrides = {"cluster.n_workers": 1, "cluster.dashboard_address": None, "svd.rank": RANK,
                 "svd.power_iterations": 8, "objectives.eq1.lambda": 2.0, "objectives.eq2.lambda": 10.0,
                 "objectives.cosine": None, "neighbours.top_n": TOP_N,
                 "neighbours.user_user": [], "audit.enabled": False, "report.enabled": False,
                 "evaluation.holdout": "none"}
    second = mfsim.run_pipeline(README.parent / "conf" / "default.yaml", input=root / "sim", output=root / "runs",
                                run_id="second", overrides=overrides)
    assert second.manifest["config"]["cluster"]["n_workers"] == 1
    latest = mfsim.open_run(root / "runs" / "LATEST")
    assert latest.run_id == "second" and latest.path == second.path and latest.manifest == second.manifest
    item = _ids(run, "items")[3]
    expect = run.similar_items(item, n=TOP_N)
    # the same data and model (a YAML file with overrides, or the dict): the same list, up to float rounding
    pd.testing.assert_frame_equal(second.similar_items(item, n=TOP_N), expect, atol=1e-5)
    with pytest.raises(MfsimError, match=r"run second has no similar_users/ .*--set neighbours\.user_user="):
        second.similar_users(0)
    # file:// URL of a run and of LATEST
    assert mfsim.open_run(f"file://{root}/runs/LATEST").run_id == "second"
    pd.testing.assert_frame_equal(mfsim.open_run(f"file://{root}/runs/first").similar_items(item, n=TOP_N), expect)
    # an fsspec store (memory://): the run's files copied below a root with its LATEST object
    fs = fsspec.filesystem("memory")
    try:
        fs.put(str(Path(run.path)), "/api-test/runs/first", recursive=True)
        fs.pipe_file("/api-test/runs/LATEST", b"first\n")
        remote = mfsim.open_run("memory://api-test/runs/LATEST")
        assert remote.run_id == "first" and remote.manifest == run.manifest
        pd.testing.assert_frame_equal(remote.similar_items(item, n=TOP_N), expect)
        pd.testing.assert_frame_equal(remote.recommend(7), run.recommend(7))
        for got, ref in zip(remote.item_embeddings("eq2", "unique"), run.item_embeddings("eq2", "unique")):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
        pd.testing.assert_frame_equal(remote.audit(), run.audit())
        with pytest.raises(MfsimError, match="unknown item id 100000"):
            remote.similar_items(100000)
        with pytest.raises(MfsimError, match="not a published run"):
            mfsim.open_run("memory://api-test/runs/nothing")
        # a lookup opens only its own list's files (partition filters pushed down): another list's damaged
        # file goes unread
        fs.pipe_file("/api-test/runs/first/similar_items/objective=eq2/scaling=unique/metric=dot/part-00000.parquet",
                     b"not parquet")
        fresh = mfsim.open_run("memory://api-test/runs/first")
        pd.testing.assert_frame_equal(fresh.similar_items(item, n=TOP_N), expect)
        with pytest.raises(Exception, match="(?i)parquet"):
            fresh.similar_items(item, objective="eq2", scaling="unique", metric="dot")
    finally:
        fs.rm("/api-test", recursive=True)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MFSIM, "neighbours", *args], capture_output=True, text=True, timeout=120)


def test_cli_formats_parse_back_to_the_api_rows(api_run):
    run, root = api_run
    user, item = _ids(run, "users")[7], _ids(run, "items")[4]
    r = _cli(str(root / "runs" / "first"), "--user", str(user), "--format", "json")
    assert r.returncode == 0, r.stderr
    expect = run.neighbour_lists("user_item", user)  # as many as the lists hold, up to 10: all 6
    assert json.loads(r.stdout) == expect.to_dict("records")  # scores exact: float32 -> JSON double -> float32
    assert set(expect["metric"]) == {"dot", "cosine"} and len(expect) > 10
    r = _cli(str(root / "runs" / "first"), "--item", str(item), "--metric", "cosine", "--metric", "model",
             "--objective", "eq1", "--top", "4", "--format", "csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    expect = run.neighbour_lists("item_item", item, 4, objectives=["eq1"], metrics=["cosine", "model"])
    assert {(x["objective"], x["scaling"], x["metric"]) for x in rows} == {
        ("eq1", "symmetric", "cosine"), ("eq1", "item_orthonormal", "cosine"), ("eq1", "invariant", "model")}
    types = {"item_id": int, "neighbour_id": int, "rank": int, "score": float}
    assert [{k: types.get(k, str)(v) for k, v in x.items()} for x in rows] == expect.to_dict("records")
    # the table, reading LATEST: a column per list, "id (score)" cells
    r = _cli(str(root / "runs" / "LATEST"), "--user", str(user), "--scaling", "invariant", "--top", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].split() == ["rank", "eq1/invariant/dot"]
    first = mfsim.open_run(root / "runs" / "LATEST").recommend(user, n=3)
    assert [ln.split()[:2] for ln in lines[2:]] == [[str(k), str(i)] for k, i in zip(first["rank"], first["item_id"])]


def test_cli_unknown_metric_exits_2_naming_the_valid_ones(api_run):
    _, root = api_run
    r = _cli(str(root / "runs" / "first"), "--item", "1", "--metric", "euclid")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: similar_items of run first has no metric 'euclid'; metrics here: cosine, dot, model, projected_cosine"]
    r = _cli(str(root / "runs" / "first"), "--item", "1", "--user", "2")
    assert r.returncode == 2 and "one of them" in r.stderr


def test_import_mfsim_imports_neither_dask_nor_pyarrow():
    code = ("import sys, mfsim\n"
            "heavy = lambda: sorted({m.split('.')[0] for m in sys.modules}\n"
            "                       & {'dask', 'distributed', 'pyarrow', 'numba'})\n"
            "assert heavy() == [], heavy()\n"
            "mfsim.open_run, mfsim.run_pipeline\n"
            "assert not {'dask', 'distributed'} & set(sys.modules), heavy()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert {"open_run", "run_pipeline", "Run", "MfsimError"} <= set(dir(mfsim))


def test_the_readme_python_api_example_runs(api_run):
    _, root = api_run
    section = README.read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)\n```", section, re.S)[0]  # the reading example
    ns: dict = {}
    exec(compile(code.replace('"runs/LATEST"', repr(f"{root}/runs/first")), "<README>", "exec"), ns)
    assert ns["run"].run_id == "first" and ns["B"].shape[1] == RANK


def test_run_pipeline_in_a_script_without_a_main_guard_runs_or_fails_at_once(api_run, tmp_path):
    """A script that calls run_pipeline at its top level: on a log this small the run happens in the script's own
    process (no cluster started) and logs its progress; held to the workers, the spawned worker processes import
    the script again, and the call fails within seconds, saying what to add (it used to hang)."""
    _, root = api_run
    script = tmp_path / "script.py"
    template = ("import mfsim\n"
                "run = mfsim.run_pipeline({config!r}, input={input!r}, output={output!r}, **{extra!r})\n"
                "print('published', run.run_id)\n")
    args = dict(config=CONFIG, input=str(root / "sim"), output=str(tmp_path / "runs"))
    script.write_text(template.format(**args, extra={"cluster.n_workers": 1}))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and "published" in r.stdout, r.stderr
    assert "stage ingest: start" in r.stderr and "stage neighbours: done" in r.stderr  # progress, unasked
    script.write_text(template.format(**args, extra={"cluster.n_workers": 1, "cluster.small_data_here": False}))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode != 0 and "published" not in r.stdout
    assert 'put the call under `if __name__ == "__main__":`' in r.stderr.splitlines()[-1], r.stderr[-2000:]
