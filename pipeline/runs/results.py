"""Reading a published run from Python: neighbour lists, embeddings and the audit (``mfsim.open_run``).

Pure reading: nothing is written. A lookup is one ``pyarrow.dataset`` scan of the list's dataset
(``similar_items``, ``recommendations``, ``similar_users``) with the hive partition keys
(objective, scaling, metric), the query id and ``rank <= n`` pushed down as filters, so only the
files of the chosen list are opened and only row groups that can hold the id are decoded; no
lookup reads every list into memory. The layout is ``pipeline.outputs``'s; the valid names are
``pipeline.registry``'s, and an error lists the names this run actually has.

A run is a local directory or an fsspec URL (``s3://bucket/root/<run_id>``), or ``<root>/LATEST``
for the newest run (``roots.resolve_run``); each file is read through its root (``Root.arrow_source``): a
local path, or for a URL the filesystem of ``fsspec.core.url_to_fs`` passed to pyarrow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from mfsim.pipeline import outputs, registry

from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.runs.roots import locate_run, read_manifest, resolve_run

#: The query side of each list kind: the ids file and id column a query id is looked up in.
QUERY_SIDE = {"item_item": "items", "user_item": "users", "user_user": "users"}
IDS_FILES = {"items": outputs.ITEMS_IDS, "users": outputs.USERS_IDS}
ID_COLUMNS = {"items": outputs.ITEM_ID, "users": outputs.USER_ID}
LIST_COLUMNS = ("rank", "score")
N_EXAMPLES = 5  # ids shown in an unknown-id error
DEFAULT_N = 10  # entries per query a lookup returns when n is not given (at most the published length)


def open_run(path: str | Path) -> "Run":
    """The published run at ``path``: a run directory, ``<root>/LATEST``, or a URL of either
    (``s3://bucket/root/LATEST``, ``file:///abs/runs/<run_id>``).

    Raises ``MfsimError`` when ``path`` is not a published run (no ``_manifest.json``).
    """
    run = resolve_run(path)
    return Run(run, read_manifest(run))


class ListLookups:
    """Lookups in neighbour lists (``similar_items``, ``recommend``, ``similar_users``, ``neighbour_lists``) over
    list datasets partitioned by (objective, scaling, metric) as ``pipeline.outputs`` writes them: ``Run`` reads a
    published run's Parquet, ``mfsim.Model`` lists it computed in memory; the same choices, filters and errors.

    A subclass gives ``run_id``, ``manifest`` (its ``config`` and ``counts``), ``_partitions(dataset, keys)``
    (the lists that exist), ``_list_source(kind, combos)`` (a ``pyarrow.dataset.Dataset`` holding at least those
    lists, with the partition keys as columns) and ``_ids(side)`` (the ids in index order).
    """

    run_id: str
    manifest: dict[str, Any]

    # -- neighbour lists ----------------------------------------------------------------------
    def similar_items(self, item_id: Any, n: int | None = None, metric: str | None = None, objective: str = "eq1",
                      scaling: str | None = None) -> pd.DataFrame:
        """The ``n`` items most similar to ``item_id`` (an id, or a list/array of ids: one read, one frame):
        columns ``item_id``, ``neighbour_id``, ``rank``, ``score``.

        Unnamed, ``metric`` and ``scaling`` pick the meaningful list of ``objective`` (``DEFAULT_METRICS``): for
        Eq. 1 the ``projected_cosine`` (the cosine of the rows of ``A B^T``, the same for every equally good
        solution, labelled ``scaling="invariant"``); for Eq. 2 and the cosine-trained model their one solution's
        (``"unique"``). ``metric="cosine"`` of Eq. 1 is the cosine of B, which changes with the arbitrary scaling
        D (Steck et al. 2024, Section 2): its scaling defaults to the first the run has (``symmetric``).
        """
        return self._one_list("item_item", item_id, n, objective, scaling, metric)

    def recommend(self, user_id: Any, n: int | None = None, metric: str | None = None, objective: str = "eq1",
                  scaling: str | None = None) -> pd.DataFrame:
        """The ``n`` items recommended to ``user_id`` (an id or a list of ids; its own items excluded): columns
        ``user_id``, ``item_id``, ``rank``, ``score``. Unnamed, the ``dot`` list: the model score ``(X A B^T)_ui``,
        the same for every Eq. 1 solution."""
        return self._one_list("user_item", user_id, n, objective, scaling, metric)

    def similar_users(self, user_id: Any, n: int | None = None, metric: str | None = None, objective: str = "eq1",
                      scaling: str | None = None) -> pd.DataFrame:
        """The ``n`` users most similar to ``user_id`` (an id or a list of ids): columns ``user_id``,
        ``neighbour_id``, ``rank``, ``score``. Unnamed, ``projected_cosine``: the cosine of the rows of
        ``X A B^T`` (scaling-invariant). Computed only when the run's ``neighbours.user_user`` asked for it."""
        return self._one_list("user_user", user_id, n, objective, scaling, metric)

    def lists(self, kind: str) -> list[tuple[str, str, str]]:
        """The (objective, scaling, metric) lists of ``kind``, sorted; ``kind`` by either name: ``item_item`` or
        ``similar_items``, ``user_item`` or ``recommendations``, ``user_user`` or ``similar_users``."""
        return sorted(self._partitions(_list_dataset(list_kind(kind)), outputs.PARTITION_KEYS))

    def neighbour_lists(self, kind: str, query_id: Any, n: int | None = None, *, objectives: Iterable[str] = (),
                        scalings: Iterable[str] = (), metrics: Iterable[str] = ()) -> pd.DataFrame:
        """Every list of ``kind`` (either name, as ``lists``) for one query (or a list of them), restricted to the
        given objectives, scalings and metrics (empty: all), sorted by objective, scaling, metric, query, rank:
        columns ``objective``, ``scaling``, ``metric``, the query id, the neighbour id, ``rank``, ``score``."""
        kind = list_kind(kind)
        name = _list_dataset(kind)
        combos = self._partitions(name, outputs.PARTITION_KEYS)
        wanted = {k: [v] if isinstance(v, str) else list(v)
                  for k, v in (("objective", objectives), ("scaling", scalings), ("metric", metrics))}
        for i, key in enumerate(outputs.PARTITION_KEYS):
            have = sorted({c[i] for c in combos})
            for value in wanted[key]:
                if value not in have:
                    raise MfsimError(f"{name} of run {self.run_id} has no {key} {value!r}; {key}s here: "
                                     f"{', '.join(have)}")
        chosen = {c for c in combos if all(not wanted[k] or c[i] in wanted[k]
                                           for i, k in enumerate(outputs.PARTITION_KEYS))}
        if not chosen:
            raise MfsimError(f"{name} of run {self.run_id} has no list with " + ", ".join(
                f"{k} in {v}" for k, v in wanted.items() if v) + "; lists here (objective/scaling/metric): "
                + ", ".join("/".join(c) for c in sorted(combos)))
        return self._scan(kind, query_id, n, chosen, keep_partitions=True)

    def choose_list(self, kind: str, objective: str = "eq1", metric: str | None = None,
                    scaling: str | None = None) -> tuple[str, str, str]:
        """The (objective, scaling, metric) list a lookup reads (``similar_items`` and the others): the given
        values, and for those left out (None) the first the run has in ``DEFAULT_METRICS`` / ``SCALING_ORDER``.
        A named Eq. 1 scaling of a scaling-invariant metric reads its one ``invariant`` list (the same for every
        scaling). An ``MfsimError`` says what exists, and the config key that would make a missing list."""
        kind = list_kind(kind)
        name = _list_dataset(kind)
        what = f"{name} of run {self.run_id}"
        combos = self._partitions(name, outputs.PARTITION_KEYS)
        objectives = sorted({c[0] for c in combos})
        if objective not in objectives:
            hint = (f" (the run's config had no objectives.{objective})" if objective in registry.OBJECTIVES
                    else f" (objectives: {', '.join(registry.OBJECTIVES)})")
            raise MfsimError(f"{what} has no objective {objective!r}; valid: {', '.join(objectives)}{hint}")
        combos = {c for c in combos if c[0] == objective}
        # the run's named scalings: those its config produced (their lists only with neighbours.eq1_scalings)
        produced = ((self.manifest.get("config") or {}).get("objectives") or {}).get("eq1") or {}
        eq1_scalings = {c[1] for c in combos if c[1] != registry.INVARIANT} | set(produced.get("scalings") or [])
        if metric is not None:
            have = sorted({c[2] for c in combos})
            if metric not in have:
                raise MfsimError(f"{what} has no metric {metric!r} for objective {objective}; valid: "
                                 f"{', '.join(have)}{_metric_hint(kind, objective, metric)}")
            combos = {c for c in combos if c[2] == metric}
        if scaling is not None:
            matching = {c for c in combos if c[1] == scaling or (
                c[1] == registry.INVARIANT and objective == "eq1" and scaling in eq1_scalings)}
            if not matching:
                have = sorted({c[1] for c in combos})
                where = f" for objective {objective}" + (f", metric {metric}" if metric else "")
                raise MfsimError(f"{what} has no scaling {scaling!r}{where}; valid: {', '.join(have)}"
                                 f"{_scaling_hint(kind, objective, metric, scaling)}")
            combos = matching
        return min(combos, key=lambda c: (_order(DEFAULT_METRICS[kind], c[2]), _order(SCALING_ORDER, c[1]), c))

    def _one_list(self, kind: str, query_id: Any, n: int | None, objective: str, scaling: str | None,
                  metric: str | None) -> pd.DataFrame:
        chosen = self.choose_list(kind, objective, metric, scaling)
        return self._scan(kind, query_id, n, {chosen}, keep_partitions=False)

    def _scan(self, kind: str, query_id: Any, n: int | None, combos: set[tuple[str, ...]], *,
              keep_partitions: bool) -> pd.DataFrame:
        """The rows of ``combos``' lists for one query with ``rank <= n``: one filtered dataset scan."""
        n = self.list_n(kind, n)
        q_col, n_col = outputs.NEIGHBOUR_COLUMNS[kind]
        dataset = self._list_source(kind, combos)
        id_type = dataset.schema.field(q_col).type
        many = _is_many(query_id)
        keys = [self._cast_id(QUERY_SIDE[kind], q, id_type) for q in (query_id if many else [query_id])]
        if not keys:
            raise MfsimError("no ids given: pass an id or a non-empty list of ids")
        flt = pc.field(q_col).isin(pa.array([k.as_py() for k in keys], type=id_type)) & (pc.field("rank") <= int(n))
        for i, part in enumerate(outputs.PARTITION_KEYS):
            flt = flt & pc.field(part).isin(sorted({c[i] for c in combos}))
        columns = [*(outputs.PARTITION_KEYS if keep_partitions else ()), q_col, n_col, *LIST_COLUMNS]
        table = dataset.to_table(columns=columns, filter=flt)
        found = set(table[q_col].unique().to_pylist()) if table.num_rows else set()
        missing = [k for k in keys if k.as_py() not in found]
        if missing:
            raise self._no_list(kind, missing, combos)
        position = {k.as_py(): i for i, k in reversed(list(enumerate(keys)))}  # the order the ids were given
        table = table.append_column("_query_order", pa.array([position[v] for v in table[q_col].to_pylist()],
                                                             pa.int64()))
        order = [*((k, "ascending") for k in outputs.PARTITION_KEYS if keep_partitions), ("_query_order", "ascending"),
                 ("rank", "ascending")]
        return table.sort_by(order).drop_columns(["_query_order"]).to_pandas()

    def list_n(self, kind: str, n: int | None) -> int:
        """The entries per query a lookup of ``kind`` returns: ``n``, or ``DEFAULT_N`` within the published length
        when None; an ``MfsimError`` for a non-positive ``n`` or one beyond the length (it says the length)."""
        longest = self.list_length(kind)
        if n is None:
            return min(DEFAULT_N, longest)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise MfsimError(f"n must be a positive integer (the list length to return), got {n!r}")
        if n > longest:
            raise MfsimError(f"n={n} is longer than the lists of run {self.run_id}: {_list_dataset(kind)} holds at "
                             f"most {longest} entries per query (neighbours.top_n={self._top_n()}); ask for n <= "
                             f"{longest}, or rerun with a larger neighbours.top_n")
        return int(n)

    def list_length(self, kind: str) -> int:
        """The most entries a list of ``kind`` holds per query: ``neighbours.top_n``, at most the candidates."""
        counts = self.manifest.get("counts", {})
        candidates = counts.get("n_users" if list_kind(kind) == "user_user" else "n_items")
        top_n = self._top_n()
        return top_n if candidates is None else max(1, min(top_n, int(candidates)))

    def _top_n(self) -> int:
        return int(self.manifest.get("config", {}).get("neighbours", {}).get("top_n", 10**9))

    def _cast_id(self, side: str, value: Any, id_type: pa.DataType) -> pa.Scalar:
        """``value`` as a scalar of the run's id type (int64 or string ids); an ``MfsimError`` when it is not one."""
        what = side[:-1]
        try:
            if value is None or isinstance(value, (bool, np.bool_)):
                raise TypeError
            key = pa.scalar(value).cast(id_type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, TypeError, ValueError):
            raise MfsimError(f"{what} id {value!r} cannot be cast to the {what} ids of run {self.run_id}, which are "
                             f"{id_type} (e.g. {self._examples(side)}; all in {IDS_FILES[side]})") from None
        return key

    def _examples(self, side: str) -> str:
        return ", ".join(repr(v) for v in self._ids(side)[:N_EXAMPLES].to_pylist())

    def _no_list(self, kind: str, keys: list[pa.Scalar], combos: set[tuple[str, ...]]) -> MfsimError:
        """The error for queries a scan found nothing for: unknown ids, or known ones whose list is empty."""
        side = QUERY_SIDE[kind]
        ids = self._ids(side)
        known = pc.is_in(pa.array([k.as_py() for k in keys], type=ids.type), value_set=ids).to_pylist()
        unknown = [k.as_py() for k, ok in zip(keys, known) if not ok]
        if unknown:
            shown = ", ".join(repr(v) for v in unknown[:N_EXAMPLES]) + (f" and {len(unknown) - N_EXAMPLES} more"
                                                                      if len(unknown) > N_EXAMPLES else "")
            return MfsimError(f"unknown {side[:-1]} id{'s' * (len(unknown) > 1)} {shown}: run {self.run_id} has "
                              f"{len(ids):,} {side} (e.g. {self._examples(side)}; all in {IDS_FILES[side]})")
        empty = ", ".join(repr(k.as_py()) for k in keys[:N_EXAMPLES])
        lists = ", ".join("/".join(c) for c in sorted(combos))
        return MfsimError(f"{side[:-1]} {empty} of run {self.run_id} has no entries in {_list_dataset(kind)} "
                          f"{lists}: its embedding is zero, it is outside neighbours.users, or no candidate is left")

    def _list_source(self, kind: str, combos: set[tuple[str, ...]]) -> ds.Dataset:
        raise NotImplementedError

    def _partitions(self, name: str, keys: tuple[str, ...]) -> set[tuple[str, ...]]:
        raise NotImplementedError

    def _ids(self, side: str) -> pa.Array:
        raise NotImplementedError


class Run(ListLookups):
    """One published run, read lazily: each method reads only the files it needs.

    ``path`` is the run directory (a ``Path``) or its URL (a ``str``); ``manifest`` is its
    ``_manifest.json`` (config, counts, timings, ``datasets``).
    """

    def __init__(self, path: str | Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest
        self._root, self._name = locate_run(path)
        self._datasets: dict[str, ds.Dataset] = {}

    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]

    def __repr__(self) -> str:
        c = self.manifest.get("counts", {})
        return f"<mfsim run {self.run_id!r} at {self.path}: {c.get('n_users')} users, {c.get('n_items')} items>"

    # -- embeddings and the audit ---------------------------------------------------------------
    def embedding_sets(self) -> list[tuple[str, str]]:
        """The (objective, scaling) pairs of the run's item embeddings, sorted: what ``item_embeddings`` reads."""
        return sorted(self._partitions(outputs.EMBEDDING_DATASETS["items"], ("objective", "scaling")))

    def item_embeddings(self, objective: str, scaling: str) -> tuple[pa.Array, np.ndarray]:
        """(item ids, B): the item embeddings of one solution in ``ids/items.parquet`` index order, B float32 (p, k)."""
        return self._embeddings("items", objective, scaling)

    def user_embeddings(self, objective: str, scaling: str) -> tuple[pa.Array, np.ndarray]:
        """(user ids, P = X A): the user embeddings of one solution in ``ids/users.parquet`` index order, P float32
        (n, k); ``P @ B.T`` are the user-item ``dot`` scores."""
        return self._embeddings("users", objective, scaling)

    def _embeddings(self, side: str, objective: str, scaling: str) -> tuple[pa.Array, np.ndarray]:
        name = outputs.EMBEDDING_DATASETS[side]
        keys = ("objective", "scaling")
        hint = (f" ('{registry.INVARIANT}' labels lists only: embeddings exist per named scaling, and the "
                "scaling-invariant lists are computed from any of them)" if scaling == registry.INVARIANT else "")
        o, s = _narrow(self._partitions(name, keys), keys, {"objective": objective, "scaling": scaling},
                       f"{name} of run {self.run_id}", hints={"scaling": hint})
        id_col = ID_COLUMNS[side]
        table = self._dataset(name, keys).to_table(
            columns=[id_col, "embedding"], filter=(pc.field("objective") == o) & (pc.field("scaling") == s))
        ids = self._ids(side)
        rows = pc.index_in(ids, value_set=table[id_col])  # embedding row of each id, in index order
        if table.num_rows != len(ids) or rows.null_count:
            raise MfsimError(f"{name}/objective={o}/scaling={s} of run {self.run_id} has {table.num_rows} rows for "
                             f"{len(ids)} ids in {IDS_FILES[side]}: the run is damaged; rerun it")
        emb = table["embedding"].combine_chunks().take(rows)
        k = emb.type.list_size
        return ids, np.asarray(emb.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(ids), k)

    def metrics(self) -> pd.DataFrame:
        """The held-out evaluation (``evaluation/metrics.parquet``): recall@N and NDCG@N of every user-item list of
        the fit on the train split, with their standard errors."""
        if outputs.EVALUATION_METRICS not in self.manifest.get("datasets", {}):
            raise MfsimError(f"run {self.run_id} has no held-out evaluation ({outputs.EVALUATION_METRICS}): it ran "
                             "with evaluation.holdout: none; rerun with evaluation.holdout: random or temporal")
        return self._read_table(outputs.EVALUATION_METRICS).to_pandas()

    def audit(self) -> pd.DataFrame:
        """The cosine audit's stability table (``audit/stability.parquet``): Jaccard@N of each metric's lists
        between equally good Eq. 1 solutions (``jaccard_mean`` 1.0: the list does not depend on the scaling)."""
        if outputs.AUDIT_STABILITY not in self.manifest.get("datasets", {}):
            raise MfsimError(f"run {self.run_id} has no audit ({outputs.AUDIT_STABILITY}): it ran with "
                             "audit.enabled: false or without Eq. 1; rerun with the audit enabled")
        return self._read_table(outputs.AUDIT_STABILITY).to_pandas()

    # -- files ----------------------------------------------------------------------------------
    def _source(self, relative: str) -> tuple[str, Any]:
        """(path, filesystem) of a file or directory of the run for pyarrow: a local path and None, or
        the path inside the URL's fsspec filesystem and that filesystem."""
        return self._root.arrow_source(f"{self._name}/{relative}")

    def _read_table(self, relative: str, columns: list[str] | None = None) -> pa.Table:
        path, fs = self._source(relative)
        return pq.read_table(path, columns=columns, filesystem=fs)

    def _dataset(self, name: str, keys: tuple[str, ...]) -> ds.Dataset:
        """The hive-partitioned dataset ``name`` (discovered once per run object: a directory listing)."""
        if name not in self._datasets:
            if name not in self.manifest.get("datasets", {}):
                kinds = {dataset: kind for kind, dataset in outputs.LIST_DATASETS.items()}
                ask = (f"; rerun with neighbours.{kinds[name]} set (e.g. --set neighbours.{kinds[name]}="
                       f"[{registry.metrics_of(kinds[name])[-1]}])" if name in kinds else "")
                raise MfsimError(f"run {self.run_id} has no {name}/ (its config did not ask for it{ask}); datasets "
                                 f"here: {', '.join(sorted(self.manifest.get('datasets', {})))}")
            path, fs = self._source(name)
            partitioning = ds.partitioning(pa.schema([(k, pa.string()) for k in keys]), flavor="hive")
            self._datasets[name] = ds.dataset(path, format="parquet", partitioning=partitioning, filesystem=fs)
        return self._datasets[name]

    def _list_source(self, kind: str, combos: set[tuple[str, ...]]) -> ds.Dataset:
        return self._dataset(_list_dataset(kind), outputs.PARTITION_KEYS)

    def _partitions(self, name: str, keys: tuple[str, ...]) -> set[tuple[str, ...]]:
        """The partition values (one tuple per directory) of a dataset, from its file paths (nothing is read)."""
        out = set()
        for fragment in self._dataset(name, keys).get_fragments():
            values = ds.get_partition_keys(fragment.partition_expression)
            out.add(tuple(values[k] for k in keys))
        return out

    def _ids(self, side: str) -> pa.Array:
        """The ids of ``ids/<side>.parquet`` in index order."""
        id_col = ID_COLUMNS[side]
        t = self._read_table(IDS_FILES[side], columns=["index", id_col]).sort_by("index")
        return t[id_col].combine_chunks()

#: The metric a lookup reads when none is named, by list kind, in order of preference: first the scores that are
#: the same for every equally good Eq. 1 solution (the paper's remedies), then the embeddings' own.
DEFAULT_METRICS = {"item_item": ("projected_cosine", "model", "cosine", "dot"), "user_item": ("dot", "cosine"),
                   "user_user": ("projected_cosine", "cosine")}
#: The scaling a lookup reads when none is named: the one list of a scaling-invariant metric, an objective's one
#: solution, then Eq. 1's named scalings in the config's order of ``registry.EQ1_SCALINGS``.
SCALING_ORDER = (registry.INVARIANT, registry.UNIQUE, *registry.EQ1_SCALINGS)


def list_kind(name: str) -> str:
    """A list kind from either of its names: ``item_item`` / ``similar_items``, ``user_item`` /
    ``recommendations``, ``user_user`` / ``similar_users``."""
    for kind, dataset in outputs.LIST_DATASETS.items():
        if name in (kind, dataset):
            return kind
    raise MfsimError(f"unknown list kind {name!r}; valid: " + ", ".join(
        f"{kind} ({dataset})" for kind, dataset in outputs.LIST_DATASETS.items()))


def _order(preferred: tuple[str, ...], value: str) -> int:
    return preferred.index(value) if value in preferred else len(preferred)


def _is_many(query: Any) -> bool:
    """Whether a query is several ids (a list, tuple, set, 1-d array, Series or Arrow array), not one."""
    if isinstance(query, (list, tuple, set, frozenset, pd.Series, pd.Index, pa.Array, pa.ChunkedArray)):
        return True
    return isinstance(query, np.ndarray) and query.ndim == 1


def _metric_hint(kind: str, objective: str, metric: str) -> str:
    """Why a list has no such metric: not a metric of the kind, not defined for the objective, or not computed."""
    if metric not in registry.metrics_of(kind):
        return f" ({kind} metrics: {', '.join(registry.metrics_of(kind))})"
    if not registry.list_defined(objective, kind, metric):
        return f" (the {objective} model has no {metric} list: see pipeline/registry.py's UNDEFINED_LISTS)"
    if objective == "eq1" and not registry.LISTS[(kind, metric)].scaling_invariant:
        return (f" (Eq. 1's {metric} changes with its arbitrary scaling, so runs publish it only for the scalings "
                "named in neighbours.eq1_scalings, none by default; set it, e.g. to all, and rerun)")
    return f" (not computed: add {metric} to neighbours.{kind} and rerun)"


def _list_dataset(kind: str) -> str:
    return outputs.LIST_DATASETS[list_kind(kind)]


def _narrow(combos: set[tuple[str, ...]], keys: tuple[str, ...], wanted: dict[str, str], what: str,
            hints: dict[str, str] | None = None) -> tuple[str, ...]:
    """The one combination of ``combos`` (tuples in ``keys`` order) with the ``wanted`` values, checked in
    ``wanted``'s order; an ``MfsimError`` naming the first value that does not exist, the valid ones and
    ``hints[key]``."""
    chosen: dict[str, str] = {}
    for key, value in wanted.items():
        i = keys.index(key)
        have = sorted({c[i] for c in combos})
        if value not in have:
            where = (" for " + ", ".join(f"{k} {v}" for k, v in chosen.items())) if chosen else ""
            raise MfsimError(f"{what} has no {key} {value!r}{where}; valid: {', '.join(have) or 'none'}"
                             f"{(hints or {}).get(key, '')}")
        chosen[key] = value
        combos = {c for c in combos if c[i] == value}
    (combo,) = combos
    return combo


def _scaling_hint(kind: str, objective: str, metric: str, scaling: str) -> str:
    """Why a list has no such scaling: Eq. 2 has one solution; a scaling-dependent metric has no ``invariant``
    list; a scaling-invariant one has only that."""
    spec = registry.LISTS.get((kind, metric))
    if objective == "eq2":
        return f" (Eq. 2's solution is unique: pass scaling='{registry.UNIQUE}')"
    if spec is None:
        return ""
    if scaling == registry.INVARIANT and not spec.scaling_invariant:
        return (f" ({metric} changes with the arbitrary scaling of Eq. 1, so it has a list per named scaling "
                f"and none labelled '{registry.INVARIANT}')")
    if scaling not in (registry.INVARIANT, registry.UNIQUE) and spec.scaling_invariant:
        return (f" ({metric} is the same for every Eq. 1 solution, so it is written once, under "
                f"scaling='{registry.INVARIANT}')")
    if objective == "eq1" and scaling in registry.EQ1_SCALINGS:
        return (f" (Eq. 1's {metric} lists are published only for the scalings named in neighbours.eq1_scalings "
                "and produced by objectives.eq1.scalings)")
    return ""
