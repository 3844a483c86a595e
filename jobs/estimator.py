"""``mfsim.Model``: the pipeline's fit and neighbour lists in memory, from a ``scipy.sparse`` matrix or a table.

For notebooks and services, in the manner of implicit and scikit-learn: no Parquet, no cluster. ``fit`` runs the
run's own stages in this process (``jobs.stages.fit_stage``: the lambda sweep, the SVD, the closed forms of Eq. 1
and Eq. 2, the cosine-trained model; the same config sections), so a list of the model equals the run's on the
same log, ids and ranks exactly. Lists are computed when first read, a gemm group at a time
(``pipeline.lists.neighbours``, the tasks the neighbours stage runs), and kept; lookups are ``ListLookups``'s, as
on a published run. ``recommend`` also takes candidate filters, and ``recommend_new`` a new user's interactions:
the user embedding ``x_u A`` is linear in the user's row, so folding a user in is exact (a training user's
fold-in equals their published recommendations).
"""

from __future__ import annotations

import logging
import pickle
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import scipy.sparse as sp

import mfsim
from mfsim.jobs.api import build_config
from mfsim.jobs.stages import StageContext, audit_stage, fit_stage
from mfsim.kernels.topn import topn_blocked
from mfsim.pipeline import outputs, registry
from mfsim.pipeline.blocks import CSRBlock, RowBlocks
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.ingest import IngestResult, _minimum_support, check_float32_range
from mfsim.pipeline.lists.evaluate import list_length
from mfsim.pipeline.lists.neighbours import GemmGroup, GroupInputs, group_inputs, plan_lists, run_symmetric, run_topn
from mfsim.pipeline.model.factors import user_embeddings_blocks
from mfsim.pipeline.model.preprocess import apply_preprocess
from mfsim.pipeline.runs.results import ListLookups, _is_many, list_kind
from mfsim.pipeline.runs.writer import timed_into

log = logging.getLogger("mfsim.model")

SAVE_FORMAT = "mfsim-model-1"
#: Query rows of one scoring call at least (copies of the first row fill up): numpy computes a float32 product of 1
#: or 2 rows with gemv and of more with sgemm, whose sums round differently (ml-100k, k = 64: a user's scores alone
#: differ from the same user's in the published 943-row lists by 1 ulp at 1 and 2 rows, equal from 4 rows on).
MIN_GEMM_ROWS = 8


class MemoryRun:
    """What the fit and audit stages write through (``RunWriter``'s ``stage`` and ``write_table``), kept here."""

    run_id = "in-memory"

    def __init__(self) -> None:
        self.tables: dict[str, pa.Table] = {}
        self.timings: dict[str, float] = {}

    def stage(self, name: str):
        return timed_into(self.timings, name)

    def set_stage(self, name: str, place: str) -> None:
        pass

    def write_table(self, relative: str, table: pa.Table) -> str:
        self.tables[relative] = table
        return relative


class Here:
    """Where a model's stages run: this process (``get`` gives no client, so every stage takes its in-process
    path, whatever the data's size)."""

    started = False

    def get(self) -> None:
        return None


class Model(ListLookups):
    """Matrix factorization of an interaction matrix (Steck et al. 2024: Eq. 1, Eq. 2, the cosine-trained model)
    with the pipeline's config, fit in memory; its lists are the published run's.

    ``Model(config=None, overrides=None, **dotted)`` takes the config as ``run_pipeline`` does (a YAML path or a
    mapping over ``conf/default.yaml``'s defaults, dotted keys on top); ``fit(X)`` returns the model. Then
    ``similar_items``, ``recommend``, ``similar_users``, ``lists``, ``choose_list``, ``neighbour_lists`` as on a run
    (``mfsim.Run``), ``recommend_new`` for a user not in X, ``item_embeddings``/``user_embeddings``, ``audit()``,
    ``save(path)`` and ``Model.load(path)``.
    """

    def __init__(self, config: str | Path | Mapping[str, Any] | None = None,
                 overrides: Mapping[str, Any] | None = None, **dotted: Any):
        self.cfg = build_config(config, overrides, dotted)
        self.cfg.svd.warm_start = None  # no output root to read a previous basis from
        self._ctx: StageContext | None = None
        self._lists: dict[tuple[str, tuple[str, str, str]], pa.Table] = {}
        self._inputs: dict[tuple[str, str, str], GroupInputs] = {}
        self.manifest: dict[str, Any] = {}

    run_id = "in-memory"

    def __repr__(self) -> str:
        if self._ctx is None:
            return "<mfsim.Model, not fitted>"
        c = self.manifest["counts"]
        return f"<mfsim.Model: {c['n_users']} users, {c['n_items']} items, {c['nnz']} non-zeros>"

    # -- fitting ----------------------------------------------------------------------------------------
    def fit(self, X: Any, *, user_ids: Any = None, item_ids: Any = None) -> "Model":
        """Fit on X: a ``scipy.sparse`` matrix (users x items; ``user_ids``/``item_ids`` name its rows and columns,
        default 0..n-1 and 0..p-1), or a pandas DataFrame / pyarrow Table of interactions with the config's
        ``input.user_col``, ``input.item_col`` and ``input.weight_col`` (ids sorted as ingest sorts them,
        duplicate pairs summed). Raises ``MfsimError`` for bad input."""
        data = in_memory_data(X, self.cfg, user_ids, item_ids)
        ctx = StageContext(self.cfg.model_copy(deep=True), Here(), MemoryRun(), data=data)
        t0 = time.perf_counter()
        result = fit_stage(ctx)
        self._ctx, self._lists, self._inputs = ctx, {}, {}
        self.manifest = {"run_id": self.run_id, "config": ctx.cfg.resolved(), "counts": dict(data.counts),
                         **result.manifest, "warnings": list(ctx.warnings), "timings": dict(ctx.run.timings)}
        for w in ctx.warnings:
            log.warning("%s", w)
        log.info("model: fit in %.1fs: %d users x %d items, %d non-zeros", time.perf_counter() - t0,
                 data.counts["n_users"], data.counts["n_items"], data.counts["nnz"])
        return self

    @property
    def fitted(self) -> bool:
        return self._ctx is not None

    def _context(self) -> StageContext:
        if self._ctx is None:
            raise MfsimError("this Model is not fitted: call model.fit(X) first (or Model.load(path))")
        return self._ctx

    # -- lists (ListLookups reads them) ---------------------------------------------------------------
    def _groups(self) -> list[GemmGroup]:
        ctx = self._context()
        n = ctx.cfg.neighbours
        return plan_lists(list(ctx.fit.factors), n.item_item, n.user_item, n.user_user, ctx.cfg.list_scalings())

    def _partitions(self, name: str, keys: tuple[str, ...]) -> set[tuple[str, ...]]:
        kind = list_kind(name)
        have = {(label.objective, label.scaling, label.metric)
                for g in self._groups() if g.kind == kind for label in g.outputs.values()}
        if not have:
            metric = registry.metrics_of(kind)[-1]
            raise MfsimError(f"this model has no {name} lists: its config's neighbours.{kind} is empty; set it "
                             f"(e.g. Model(config, **{{'neighbours.{kind}': ['{metric}']}})) and fit again")
        return have

    def _list_source(self, kind: str, combos: set[tuple[str, ...]]) -> ds.Dataset:
        return ds.dataset(pa.concat_tables([self._list_table(kind, c) for c in sorted(combos)]))

    def _ids(self, side: str) -> pa.Array:
        data = self._context().data
        return data.item_ids if side == "items" else data.user_ids

    def _group_of(self, kind: str, combo: tuple[str, str, str]) -> tuple[GemmGroup, str]:
        for g in self._groups():
            for km, label in g.outputs.items():
                if (label.kind, (label.objective, label.scaling, label.metric)) == (kind, combo):
                    return g, km
        raise MfsimError(f"this model has no {kind} list {'/'.join(combo)}")

    def _group_inputs(self, g: GemmGroup) -> GroupInputs:
        key = (g.kind, g.objective, g.scaling, g.queries, g.candidates)
        if key not in self._inputs:
            ctx = self._context()
            fit, data = ctx.fit, ctx.data
            A, B = fit.factors.pair((g.objective, g.scaling), None)
            user_parts = fit.users((g.objective, g.scaling)) if g.kind != "item_item" else []
            self._inputs[key] = group_inputs(None, g, A, B, user_parts, X=data.X, user_ids=data.user_ids,
                                             item_ids=data.item_ids, subset=None,
                                             cosine_norm_floor=ctx.cfg.neighbours.cosine_norm_floor)
        return self._inputs[key]

    def _list_table(self, kind: str, combo: tuple[str, str, str]) -> pa.Table:
        """One list as the run publishes it (``outputs.neighbour_table`` rows, with its partition keys), computed
        with its gemm group by the neighbours stage's tasks, in this process; the group's other lists are kept."""
        if (kind, combo) in self._lists:
            return self._lists[(kind, combo)]
        g, _ = self._group_of(kind, combo)
        ncfg = self._context().cfg.neighbours
        inputs = self._group_inputs(g)
        n = list_length(ncfg.top_n, len(inputs.candidate_ids))
        p = len(inputs.candidate_ids) if g.kind == "item_item" else len(self._ids("items"))
        if g.kind == "item_item" and g.queries == g.candidates:
            results = run_symmetric(None, inputs.candidates, p, n, tuple(g.outputs),
                                    candidate_block=ncfg.candidate_block, cosine_norm_floor=ncfg.cosine_norm_floor,
                                    label=f"model lists {g.kind} {g.objective}/{g.scaling}")
        else:
            results = run_topn(None, inputs.queries, inputs.candidates, n, tuple(g.outputs),
                               rows_per_task=ncfg.query_chunk, candidate_block=ncfg.candidate_block,
                               scale=inputs.scale)
        pieces: dict[str, list[pa.Table]] = {km: [] for km in g.outputs}
        for rng, lists in results:
            ids = inputs.candidate_ids if g.kind == "item_item" else inputs.query_id_parts[rng.part]
            qids = ids.slice(rng.start, rng.stop - rng.start)
            for km, label in g.outputs.items():
                top = lists[km]
                pieces[km].append(outputs.neighbour_table(label.kind, qids, inputs.candidate_ids, top.indices,
                                                          top.scores, top.counts))
        for km, label in g.outputs.items():
            table = pa.concat_tables(pieces[km])
            for key, value in zip(outputs.PARTITION_KEYS, (label.objective, label.scaling, label.metric)):
                table = table.append_column(key, pa.array([value] * table.num_rows, pa.string()))
            self._lists[(label.kind, (label.objective, label.scaling, label.metric))] = table
        return self._lists[(kind, combo)]

    # -- recommendations with filters, and for new users ---------------------------------------------
    def recommend(self, user_id: Any, n: int | None = None, metric: str | None = None, objective: str = "eq1",
                  scaling: str | None = None, *, filter_already_liked_items: bool = True,
                  items: Any = None) -> pd.DataFrame:
        """As ``Run.recommend``; ``filter_already_liked_items=False`` lets the user's own items be listed, and
        ``items`` (ids) restricts the candidates to those items. Either computes the lists of these users now
        (the same kernel and scores as the published lists)."""
        if filter_already_liked_items and items is None:
            return super().recommend(user_id, n, metric, objective, scaling)
        ctx = self._context()
        rows = self._rows("users", user_id)
        X = ctx.data.X.here()
        block = _csr_rows(X, rows)
        return self._score_rows(block, self._ids("users").take(pa.array(rows)), n, metric, objective, scaling,
                                exclude_own=filter_already_liked_items, items=items)

    def recommend_new(self, interactions: Any, n: int | None = None, metric: str | None = None,
                      objective: str = "eq1", scaling: str | None = None, *, filter_already_liked_items: bool = True,
                      items: Any = None) -> pd.DataFrame:
        """Recommendations for a user not in X, from their interactions: a mapping ``{item_id: weight}``, a list or
        array of item ids (weight 1 each), or a ``scipy.sparse`` row of X's width. The user embedding is
        ``x_u A`` (after the fit's preprocessing), exact fold-in: for a training user's own row it equals their
        published list. Columns ``item_id``, ``rank``, ``score``."""
        block = self._new_row(interactions)
        frame = self._score_rows(block, pa.array([None], self._ids("users").type), n, metric, objective, scaling,
                                 exclude_own=filter_already_liked_items, items=items)
        return frame.drop(columns=[outputs.USER_ID])

    def _new_row(self, interactions: Any) -> CSRBlock:
        p = len(self._ids("items"))
        if sp.issparse(interactions):
            row = sp.csr_matrix(interactions)
            if row.shape != (1, p):
                raise MfsimError(f"a new user's row must be 1 x {p} (the model's items), got {row.shape}")
            return CSRBlock.from_scipy(row)
        if isinstance(interactions, Mapping):
            ids, weights = list(interactions), np.asarray(list(interactions.values()), np.float32)
        else:
            ids = list(interactions)
            weights = np.ones(len(ids), np.float32)
        if not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise MfsimError("a new user's weights must be finite and >= 0")
        cols = self._rows("items", ids) if ids else np.zeros(0, np.int64)
        row = sp.csr_matrix((weights, (np.zeros(len(cols), np.int64), cols)), shape=(1, p))
        return CSRBlock.from_scipy(row)

    def _rows(self, side: str, wanted: Any) -> np.ndarray:
        """Index positions of ids (one or several) on ``side``; an ``MfsimError`` naming the unknown ones."""
        ids = self._ids(side)
        values = list(wanted) if _is_many(wanted) else [wanted]
        keys = [self._cast_id(side, v, ids.type).as_py() for v in values]
        pos = pc.index_in(pa.array(keys, ids.type), value_set=ids).to_numpy(zero_copy_only=False)
        unknown = [k for k, i in zip(keys, pos) if i is None or (isinstance(i, float) and np.isnan(i))]
        if unknown:
            raise MfsimError(f"unknown {side[:-1]} ids {', '.join(repr(u) for u in unknown[:5])}: the model has "
                             f"{len(ids):,} {side} (e.g. {self._examples(side)})")
        return np.asarray(pos, np.int64)

    def _score_rows(self, block: CSRBlock, query_ids: pa.Array, n: int | None, metric: str | None, objective: str,
                    scaling: str | None, *, exclude_own: bool, items: Any) -> pd.DataFrame:
        """User-item lists of raw rows of X (``block``): preprocessed as the fit's X, ``P = x A``, scored against
        the candidates with the group's norm floors (the published lists' kernel), own items and items outside
        ``items`` excluded."""
        ctx = self._context()
        combo = self.choose_list("user_item", objective, metric, scaling)
        g, km = self._group_of("user_item", combo)
        inputs = self._group_inputs(g)
        fit = ctx.fit
        n = self.list_n("user_item", n)
        rows = RowBlocks([block], np.array([0, block.n_rows], np.int64), block.n_cols)
        prepped = apply_preprocess(rows, fit.prep)
        A = fit.factors.pair((g.objective, g.scaling), None)[0]
        P = user_embeddings_blocks(prepped, A, fit.prep.col_offset, fit.factors.user_scales.get((g.objective,
                                                                                                 g.scaling)))[0]
        P = np.asarray(P, np.float32)
        if inputs.scale is not None:
            P = P * inputs.scale
        excluded = [set(block.indices[block.indptr[r]:block.indptr[r + 1]].tolist()) if exclude_own else set()
                    for r in range(block.n_rows)]
        if items is not None:
            allowed = set(self._rows("items", items).tolist())
            outside = set(range(len(inputs.candidate_ids))) - allowed
            excluded = [e | outside for e in excluded]
        rows_asked = P.shape[0]
        if rows_asked < MIN_GEMM_ROWS:  # numpy hands a product of 1 or 2 rows to gemv, whose sums round otherwise
            P = np.vstack([P, np.repeat(P[:1], MIN_GEMM_ROWS - rows_asked, axis=0)])
            excluded = excluded + [set()] * (MIN_GEMM_ROWS - rows_asked)
        indptr = np.concatenate([[0], np.cumsum([len(e) for e in excluded])]).astype(np.int64)
        indices = np.array([i for e in excluded for i in sorted(e)], np.int32)
        top = topn_blocked(P, np.asarray(inputs.candidates, np.float32), n, metrics=(km,),
                           exclude_indptr=indptr, exclude_indices=indices, query_chunk=P.shape[0],
                           candidate_block=ctx.cfg.neighbours.candidate_block,
                           cosine_min_norm=inputs.queries.cosine_min_norm)[km]
        return outputs.neighbour_table("user_item", query_ids, inputs.candidate_ids, top.indices[:rows_asked],
                                       top.scores[:rows_asked], top.counts[:rows_asked]).to_pandas()

    # -- embeddings, audit, saving -----------------------------------------------------------------------
    def item_embeddings(self, objective: str, scaling: str) -> tuple[pa.Array, np.ndarray]:
        """(item ids, B float32 (p, k)) of one solution, as ``Run.item_embeddings``."""
        ctx = self._context()
        return ctx.data.item_ids, np.asarray(ctx.fit.factors.pair(self._solution(objective, scaling), None)[1],
                                             np.float32)

    def user_embeddings(self, objective: str, scaling: str) -> tuple[pa.Array, np.ndarray]:
        """(user ids, P = X A float32 (n, k)) of one solution, as ``Run.user_embeddings``."""
        ctx = self._context()
        parts = ctx.fit.users(self._solution(objective, scaling))
        return ctx.data.user_ids, np.vstack([np.asarray(part, np.float32) for part in parts])

    def _solution(self, objective: str, scaling: str) -> tuple[str, str]:
        have = sorted(self._context().fit.factors)
        if (objective, scaling) not in have:
            raise MfsimError(f"this model has no solution {objective}/{scaling}; solutions: "
                             f"{', '.join('/'.join(s) for s in have)}")
        return objective, scaling

    def audit(self) -> pd.DataFrame:
        """The cosine audit's stability table, as ``Run.audit``: Jaccard@N of each metric's item lists between
        equally good Eq. 1 solutions (computed on first call)."""
        ctx = self._context()
        if outputs.AUDIT_STABILITY not in ctx.run.tables:
            if not any(o == "eq1" for o, _ in ctx.fit.factors):
                raise MfsimError("this model has no Eq. 1 solution to audit (objectives.eq1 is null)")
            ctx.results["audit"] = audit_stage(ctx)
        return ctx.run.tables[outputs.AUDIT_STABILITY].to_pandas()

    def save(self, path: str | Path) -> Path:
        """The fitted model in one file (Python's pickle: load only files you trust); ``Model.load`` reads it."""
        ctx = self._context()
        path = Path(path)
        state = {"format": SAVE_FORMAT, "version": mfsim.__version__, "cfg": ctx.cfg, "data": ctx.data,
                 "fit": ctx.fit, "warnings": ctx.warnings, "manifest": self.manifest, "tables": ctx.run.tables}
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            pickle.dump(state, f, protocol=5)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Model":
        """A model saved by ``save``."""
        try:
            with open(path, "rb") as f:
                state = pickle.load(f)
        except (OSError, pickle.UnpicklingError, EOFError) as exc:
            raise MfsimError(f"cannot read a saved model from {path}: {exc}") from None
        if not isinstance(state, dict) or state.get("format") != SAVE_FORMAT:
            raise MfsimError(f"{path} is not a model saved by mfsim.Model.save")
        model = cls.__new__(cls)
        model.cfg = state["cfg"]
        ctx = StageContext(state["cfg"].model_copy(deep=True), Here(), MemoryRun(), data=state["data"])
        ctx.fit, ctx.warnings, ctx.run.tables = state["fit"], state["warnings"], state["tables"]
        model._ctx, model._lists, model._inputs, model.manifest = ctx, {}, {}, state["manifest"]
        return model


def in_memory_data(X: Any, cfg, user_ids: Any = None, item_ids: Any = None) -> IngestResult:
    """X and its id maps as ingest hands them on (``IngestResult``, X's row blocks in this process): from a scipy
    sparse matrix with optional ids, or from a table of interactions (ids sorted, duplicate pairs summed);
    ``ingest.min_user_interactions`` / ``min_item_interactions`` applied as ingest applies them."""
    icfg = cfg.input
    if isinstance(X, pd.DataFrame):
        X = pa.Table.from_pandas(X, preserve_index=False)
    if isinstance(X, pa.Table):
        cols = [icfg.user_col, icfg.item_col] + ([icfg.weight_col] if icfg.weight_col else [])
        missing = [c for c in cols if c not in X.column_names]
        if missing:
            raise MfsimError(f"the table has no column {missing[0]!r} (columns: {X.column_names}); set "
                             "input.user_col / input.item_col / input.weight_col")
        for role, col in (("user", icfg.user_col), ("item", icfg.item_col)):
            if X[col].null_count:
                raise MfsimError(f"column {col!r} ({role} ids) has null ids; drop those rows")
        users = pc.unique(X[icfg.user_col]).sort()
        items = pc.unique(X[icfg.item_col]).sort()
        rows = pc.index_in(X[icfg.user_col], value_set=users).to_numpy(zero_copy_only=False)
        cols_ = pc.index_in(X[icfg.item_col], value_set=items).to_numpy(zero_copy_only=False)
        w = (X[icfg.weight_col].to_numpy(zero_copy_only=False).astype(np.float32) if icfg.weight_col
             else np.ones(X.num_rows, np.float32))
        m = sp.csr_matrix((w, (rows, cols_)), shape=(len(users), len(items)))
        user_ids, item_ids = users.combine_chunks() if isinstance(users, pa.ChunkedArray) else users, items
    elif sp.issparse(X):
        m = sp.csr_matrix(X, dtype=np.float32)
        n, p = m.shape
        user_ids = pa.array(np.arange(n)) if user_ids is None else pa.array(user_ids)
        item_ids = pa.array(np.arange(p)) if item_ids is None else pa.array(item_ids)
        if len(user_ids) != n or len(item_ids) != p:
            raise MfsimError(f"user_ids ({len(user_ids)}) and item_ids ({len(item_ids)}) must match X's shape "
                             f"{m.shape}")
    else:
        raise MfsimError(f"Model.fit takes a scipy.sparse matrix or a pandas/pyarrow table, got {type(X).__name__}")
    m.sum_duplicates()
    m.sort_indices()
    if m.nnz and (not np.all(np.isfinite(m.data)) or m.data.min() < 0):
        raise MfsimError("X has NaN, inf or negative weights; clean them (mfsim reads weights >= 0)")
    check_float32_range(float(np.max(m.data)) if m.nnz else 0.0, m.nnz, icfg.weight_col, "X")
    blocks = RowBlocks.from_scipy(m, cfg.ingest.block_rows)
    blocks, user_ids, item_ids, user_counts, item_counts, support, _ = _minimum_support(
        None, blocks, user_ids, item_ids, cfg.ingest.min_user_interactions, cfg.ingest.min_item_interactions)
    nnz = int(user_counts.sum())
    if nnz == 0:
        raise MfsimError("X has no non-zero entry (after the minimum-support filter)")
    blocks.nnz = nnz
    counts = {**support, "n_users": len(user_ids), "n_items": len(item_ids), "nnz": nnz}
    return IngestResult(X=blocks, user_ids=user_ids, item_ids=item_ids, user_counts=user_counts,
                        item_counts=item_counts, files=[], counts=counts, ran_on="driver")


def _csr_rows(X: RowBlocks, rows: np.ndarray) -> CSRBlock:
    """Rows of X (here) as one CSR block, in the order given."""
    return CSRBlock.from_scipy(sp.vstack([_row(X, int(r)) for r in rows], format="csr"))


def _row(X: RowBlocks, r: int) -> sp.csr_matrix:
    b = int(np.searchsorted(X.row_offsets, r, side="right") - 1)
    part = X.parts[b]
    local = r - int(X.row_offsets[b])
    lo, hi = part.indptr[local], part.indptr[local + 1]
    return sp.csr_matrix((part.data[lo:hi], part.indices[lo:hi], np.array([0, hi - lo])), shape=(1, X.n_cols))
