"""Preprocess: normalize X before learning (the paper's Section 3 remedies), block-wise, never dense.

Steck, Ekanadham & Kallus (2024), Section 3, name normalizing or reweighting the data *before*
learning as a remedy for arbitrary embedding scales. This stage implements, in this order:

1. ``binarize``: every stored non-zero becomes 1 (explicit zeros stay 0).
2. ``column_weighting`` (one of):

   - ``idf``: ``x'_ij = idf_j x_ij`` with ``idf_j = log(n / df_j)`` (natural log, no smoothing:
     Sparck Jones 1972); ``df_j`` = number of users with a non-zero in column j, ``n`` = all
     users (empty rows included). An item every user has gets weight 0; an empty column gets 0.
   - ``bm25``: Okapi BM25 with document = user row, term = item (Robertson et al. 1994, "Okapi
     at TREC-3"; Robertson & Zaragoza 2009, "The Probabilistic Relevance Framework: BM25 and
     Beyond", Found. Trends IR 3(4)), with the IDF above in place of the Robertson/Sparck Jones
     weight ``log((n - df + 0.5)/(df + 0.5))``, which turns negative for items most users have)::

         x'_ij = idf_j * x_ij (k1 + 1) / (x_ij + k1 (1 - b + b len_i / avglen))

     ``len_i`` = sum of row i (after binarize: its number of items), ``avglen`` = sum of X / n.
     Requires non-negative data.
   - ``popularity_power``: ``x'_ij = x_ij pop_j^-beta``, ``pop_j = df_j`` (users with the item),
     ``beta = popularity_beta`` (0.75: the word2vec unigram exponent, Mikolov et al. 2013, that
     the paper cites). Empty columns get factor 0.

3. ``center_columns`` / ``standardize_columns``: *implicit*. With mu_j and sd_j the mean and the
   population standard deviation (divide by n) of column j of the weighted X from steps 1-2, the
   operator is ``X_eff = X diag(d) - 1 c^T``:

   - center: ``d = 1`` (not stored), ``c = mu``;
   - standardize (implies centering): ``d_j = 1/sd_j``, ``c_j = mu_j d_j``; a column with zero
     variance (constant, e.g. empty or held by every user under ``binarize``) gets ``d_j = 0``,
     ``c_j = 0``, i.e. an exact zero column, which is its centered value; dividing it by 0 has
     no meaning.

   ``d`` is folded into the block values; ``c`` (``Preprocessor.col_offset``) is handed to the
   SVD and to the user embeddings, which apply ``- 1 (c^T M)`` to their products. The sparsity
   pattern never changes (a weight of 0 leaves a stored 0).

Statistics come from one pass over the blocks (per-block partial sums, reduced pairwise in a
fixed order by ``blocks.tree_reduce``, so a local run and a Dask run give bitwise identical
results); only ``bm25``
combined with centering needs a second pass, because BM25 values depend on ``avglen``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mfsim.pipeline.blocks import CSRBlock, RowBlocks, tree_reduce
from mfsim.pipeline.config import PreprocessSection
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.shared import share

# A column is treated as constant when its variance from E[x^2] - mu^2 is below this fraction of
# E[x^2]: the float64 cancellation error of that formula is a few eps64 (2.2e-16) times E[x^2], and
# float32 input values carry relative error 6e-8, so 1e-10 separates "constant" from real spread.
ZERO_VARIANCE_RTOL = 1e-10

# ---------------------------------------------------------------------------------------------
# per-block pieces (pure functions, run on the workers)


@dataclass(frozen=True)
class ColumnStats:
    """Sums over the rows of X (after binarize and, for the second pass, the weighting)."""

    n_rows: int
    df: np.ndarray  # int64 (p,), non-zeros per column
    col_sum: np.ndarray  # float64 (p,)
    col_sumsq: np.ndarray  # float64 (p,)
    total: float  # sum of all values
    min_value: float  # smallest stored value (+inf when X has no entries)


def _values(block: CSRBlock, binarize: bool) -> np.ndarray:
    """Block values in float64, set to 1 where non-zero when ``binarize``."""
    x = block.data.astype(np.float64)
    if binarize:
        x = (x != 0).astype(np.float64)
    return x


def block_column_stats(block: CSRBlock, binarize: bool = False) -> ColumnStats:
    """Column statistics of one block. O(nnz + p) time, O(p) memory."""
    p = block.n_cols
    x = _values(block, binarize)
    nz = x != 0
    return ColumnStats(
        n_rows=block.n_rows,
        df=np.bincount(block.indices[nz], minlength=p).astype(np.int64),
        col_sum=np.bincount(block.indices, weights=x, minlength=p),
        col_sumsq=np.bincount(block.indices, weights=x * x, minlength=p),
        total=float(x.sum()),
        min_value=float(x.min()) if x.size else float("inf"),
    )


def add_column_stats(a: ColumnStats, b: ColumnStats) -> ColumnStats:
    """Sum of two partial statistics."""
    return ColumnStats(
        n_rows=a.n_rows + b.n_rows,
        df=a.df + b.df,
        col_sum=a.col_sum + b.col_sum,
        col_sumsq=a.col_sumsq + b.col_sumsq,
        total=a.total + b.total,
        min_value=min(a.min_value, b.min_value),
    )


def _bm25_saturate(block: CSRBlock, x: np.ndarray, k1: float, b: float, avglen: float) -> np.ndarray:
    """x (k1 + 1) / (x + k1 (1 - b + b len_i / avglen)) per entry, 0 where x == 0."""
    counts = np.diff(block.indptr)
    row_of = np.repeat(np.arange(block.n_rows), counts)
    row_len = np.bincount(row_of, weights=x, minlength=block.n_rows)  # len_i
    norm = k1 * (1.0 - b + b * row_len / avglen) if avglen > 0 else np.full(block.n_rows, k1)
    denom = x + norm[row_of]
    out = np.zeros_like(x)
    np.divide(x * (k1 + 1.0), denom, out=out, where=x != 0)  # x > 0 here, so denom > 0
    return out


def transform_block(
    block: CSRBlock,
    binarize: bool,
    bm25: tuple[float, float, float] | None,
    col_factor: np.ndarray | None,
) -> CSRBlock:
    """Preprocessed values of one block (same sparsity pattern).

    Parameters
    ----------
    block : CSRBlock
        Rows of X.
    binarize : bool
        Set every non-zero to 1 first.
    bm25 : (k1, b, avglen) or None
        Apply the BM25 saturation ``x (k1+1) / (x + k1 (1 - b + b len_i/avglen))`` per row.
    col_factor : (p,) float64 or None
        Per-column factor applied last (IDF or popularity weight times the scale ``d``).

    Notes
    -----
    O(nnz + n_rows) time and memory; values computed in float64 and stored as float32.
    """
    if not binarize and bm25 is None and col_factor is None:
        return block
    x = _values(block, binarize)
    if bm25 is not None:
        x = _bm25_saturate(block, x, *bm25)
    if col_factor is not None:
        x = x * col_factor[block.indices]  # x'_ij = x_ij g_j d_j
    return block.with_data(x)


def weighted_block_column_stats(
    block: CSRBlock, binarize: bool, bm25: tuple[float, float, float] | None, col_factor: np.ndarray | None
) -> ColumnStats:
    """Column statistics of the transformed block (second pass, used with BM25)."""
    return block_column_stats(transform_block(block, binarize, bm25, col_factor), binarize=False)


# ---------------------------------------------------------------------------------------------
# reduction over blocks (local or on the client)


def _reduce_stats(blocks: RowBlocks, parts: list[Any]) -> ColumnStats:
    """Sum of per-block statistics, pairwise in a fixed order (``tree_reduce``, fan-in 2)."""
    if not parts:
        p = blocks.n_cols
        z = np.zeros(p)
        return ColumnStats(0, np.zeros(p, np.int64), z, z.copy(), 0.0, float("inf"))
    return tree_reduce(parts, add_column_stats, client=blocks.client)


def _broadcast(blocks: RowBlocks, arr: np.ndarray | None) -> Any:
    """``arr`` shared with the block tasks on a client (recomputed on worker loss: ``pipeline.shared``), else itself."""
    if arr is None or blocks.client is None:
        return arr
    return share(blocks.client, arr, "column-factor")


def column_stats(blocks: RowBlocks, *, binarize: bool = False) -> ColumnStats:
    """Column statistics of X (one pass). O(nnz + n_blocks p) time, O(p) memory per task."""
    return _reduce_stats(blocks, blocks.map(block_column_stats, binarize))


# ---------------------------------------------------------------------------------------------
# fitting and applying


@dataclass(frozen=True)
class Preprocessor:
    """What ``apply_preprocess`` does to X; small vectors only.

    The effective operator is ``X_eff = T(X) diag(col_scale) - 1 col_offset^T`` where ``T`` is
    binarize, BM25 saturation and ``col_weight``, all folded into the block values.
    """

    n_rows: int
    n_cols: int
    binarize: bool = False
    column_weighting: str = "none"
    col_weight: np.ndarray | None = None  # float64 (p,): idf_j or pop_j^-beta
    bm25: tuple[float, float, float] | None = None  # (k1, b, avglen)
    col_scale: np.ndarray | None = None  # float32 (p,): d_j = 1/sd_j (standardize)
    col_offset: np.ndarray | None = None  # float64 (p,): c_j, subtracted from every row implicitly

    @property
    def is_identity(self) -> bool:
        """True when applying it leaves the block values unchanged (an offset may remain)."""
        return not self.binarize and self.col_weight is None and self.bm25 is None and self.col_scale is None

    @property
    def col_factor(self) -> np.ndarray | None:
        """The per-column factor folded into the values: col_weight * col_scale (float64)."""
        if self.col_weight is None and self.col_scale is None:
            return None
        g = np.ones(self.n_cols) if self.col_weight is None else self.col_weight
        d = np.ones(self.n_cols) if self.col_scale is None else self.col_scale.astype(np.float64)
        return g * d

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for the run manifest."""
        out: dict[str, Any] = {"binarize": self.binarize, "column_weighting": self.column_weighting}
        if self.bm25 is not None:
            out["bm25"] = {"k1": self.bm25[0], "b": self.bm25[1], "avglen": self.bm25[2]}
        if self.col_scale is not None:
            out["zero_variance_columns"] = int(np.count_nonzero(self.col_scale == 0))
        out["col_offset"] = self.col_offset is not None
        return out


def idf_weights(df: np.ndarray, n_rows: int) -> np.ndarray:
    """``idf_j = log(n / df_j)``, 0 for empty columns. float64 (p,)."""
    out = np.zeros(df.shape, dtype=np.float64)
    np.log(n_rows / np.maximum(df, 1), out=out, where=df > 0)
    return out


def popularity_weights(df: np.ndarray, beta: float) -> np.ndarray:
    """``pop_j^-beta`` with ``pop_j = df_j``, 0 for empty columns. float64 (p,)."""
    out = np.zeros(df.shape, dtype=np.float64)
    np.power(np.maximum(df, 1).astype(np.float64), -beta, out=out, where=df > 0)
    return out


def fit_preprocess(blocks: RowBlocks, cfg: PreprocessSection) -> Preprocessor:
    """Statistics of X and the preprocessing they define (Section 3 remedies).

    Parameters
    ----------
    blocks : RowBlocks
        X (n x p), local or on a Dask client.
    cfg : PreprocessSection
        ``binarize``, ``column_weighting`` (none | idf | bm25 | popularity_power), ``bm25_k1``,
        ``bm25_b``, ``popularity_beta``, ``center_columns``, ``standardize_columns``.

    Returns
    -------
    Preprocessor
        Per-column vectors; pass it to ``apply_preprocess`` and its ``col_offset`` to the SVD.

    Notes
    -----
    One pass over the blocks (two for ``bm25`` with centering): O(nnz + n_blocks p) time,
    O(p) memory per task and on the client. Sums are in float64.
    """
    n, p = blocks.shape
    center = cfg.center_columns or cfg.standardize_columns
    identity = not cfg.binarize and cfg.column_weighting == "none" and not center
    if identity:
        return Preprocessor(n, p)
    if n == 0:
        raise MfsimError(
            f"preprocessing needs at least one row of X, got shape {blocks.shape}; "
            "check the ingest filters or set preprocess options to their defaults"
        )
    stats = column_stats(blocks, binarize=cfg.binarize)

    col_weight = None
    bm25 = None
    if cfg.column_weighting == "idf":
        col_weight = idf_weights(stats.df, n)
    elif cfg.column_weighting == "popularity_power":
        col_weight = popularity_weights(stats.df, cfg.popularity_beta)
    elif cfg.column_weighting == "bm25":
        if stats.min_value < 0:
            raise MfsimError(
                f"preprocess.column_weighting=bm25 needs non-negative values in X, got a minimum of "
                f"{stats.min_value:g}; use idf or popularity_power, or set preprocess.binarize=true"
            )
        col_weight = idf_weights(stats.df, n)
        bm25 = (float(cfg.bm25_k1), float(cfg.bm25_b), stats.total / n)
    elif cfg.column_weighting != "none":
        raise MfsimError(
            f"unknown preprocess.column_weighting {cfg.column_weighting!r}; valid: none, idf, bm25, popularity_power"
        )

    col_scale = None
    col_offset = None
    if center:
        if bm25 is not None:  # BM25 values depend on avglen: a second pass over the weighted blocks
            parts = blocks.map(weighted_block_column_stats, cfg.binarize, bm25, _broadcast(blocks, col_weight))
            w = _reduce_stats(blocks, parts)
            s1, s2 = w.col_sum, w.col_sumsq
        else:  # a column factor g_j scales the sums: sum(g x) = g sum(x), sum((g x)^2) = g^2 sum(x^2)
            g = np.ones(p) if col_weight is None else col_weight
            s1, s2 = g * stats.col_sum, g * g * stats.col_sumsq
        mu = s1 / n  # mu_j = E[x_j]
        if cfg.standardize_columns:
            msq = s2 / n
            var = np.maximum(msq - mu * mu, 0.0)  # sd_j^2 = E[x_j^2] - mu_j^2 (population)
            constant = var <= ZERO_VARIANCE_RTOL * msq
            d = np.zeros(p, dtype=np.float64)
            np.divide(1.0, np.sqrt(var), out=d, where=~constant)  # d_j = 1/sd_j, 0 if constant
            col_scale = d.astype(np.float32)
            col_offset = mu * col_scale.astype(np.float64)  # c_j = mu_j d_j with the stored d_j
        else:
            col_offset = mu
    return Preprocessor(
        n_rows=n,
        n_cols=p,
        binarize=cfg.binarize,
        column_weighting=cfg.column_weighting,
        col_weight=col_weight,
        bm25=bm25,
        col_scale=col_scale,
        col_offset=col_offset,
    )


def apply_preprocess(blocks: RowBlocks, prep: Preprocessor) -> RowBlocks:
    """X with binarize, weighting and column scale folded into the values (offset stays implicit).

    Returns ``blocks`` itself when there is nothing to fold in. The result has the same rows,
    columns and sparsity pattern; on a client its blocks are futures on the workers.
    O(nnz) time, O(nnz of one block) extra memory per task.
    """
    if blocks.n_cols != prep.n_cols:
        raise MfsimError(
            f"the preprocessor was fitted on X with {prep.n_cols} columns but is applied to X of shape "
            f"{blocks.shape}; fit and apply it on the same matrix"
        )
    if not prep.binarize and prep.bm25 is None and prep.col_factor is None:
        return blocks
    return blocks.map_blocks(transform_block, prep.binarize, prep.bm25, _broadcast(blocks, prep.col_factor))


def preprocess(blocks: RowBlocks, cfg: PreprocessSection) -> tuple[RowBlocks, Preprocessor]:
    """``fit_preprocess`` then ``apply_preprocess``: (X with values folded in, the preprocessor)."""
    prep = fit_preprocess(blocks, cfg)
    return apply_preprocess(blocks, prep), prep
