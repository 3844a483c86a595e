"""Evaluation: held-out splits of X, ranking metrics of user-item lists, cluster precision of item lists.

The pipeline fits the embeddings twice: on all of X (the published lists) and on a train split,
whose user-item lists are scored against the held-out entries. Item-item lists are scored against
known item clusters (the simulation of Steck, Ekanadham & Kallus 2024, Fig. 1, in numbers: how
many of an item's cosine neighbours share its cluster, for each objective and scaling).

1. ``split_block`` / ``split_holdout``: per-user holdout, ``random`` (a hash of (seed, user,
   item) decides the order, so the split depends neither on block boundaries nor on the number of
   workers) or ``temporal`` (each user's latest entries).
2. ``ranking_metrics`` / ``ranking_sums``: normalized recall@N and NDCG@N (binary relevance),
   with their standard errors; ``held_out_rows`` and ``sample_users``: the users they average
   over at scale (a seeded sample of ``evaluation.max_users`` of the users with held-out items).
3. ``cluster_precision`` / ``cluster_sums`` and ``chance_level``.
4. ``raw_cosine_topn``: the baseline of no factorization at all, item-item cosine of the raw
   columns of X, in chunks of items with sparse products.

Metric functions come in two forms: one that takes every row at once and returns the averages,
and a ``*_sums`` form that returns a ``MetricSums`` for one chunk of query rows, so the caller can
stream over chunks (or Dask tasks), ``merge_sums`` the parts and ``finish`` once.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np
import scipy.sparse as sp

from mfsim.kernels.topn import TopN, empty_state, finalize_state, select_tile
from mfsim.pipeline.blocks import CSRBlock, RowBlocks
from mfsim.pipeline.errors import MfsimError

SPLIT_MODES = ("random", "temporal")

log = logging.getLogger("mfsim.evaluation")

# ---------------------------------------------------------------------------------------------
# holdout split

# splitmix64 (Steele, Lea & Flood 2014, "Fast splittable pseudorandom number generators"): the
# golden-ratio increment and the two multipliers of its output function
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 output function, in place on a uint64 array (wrapping arithmetic): a bijection."""
    tmp = np.empty_like(z)
    for shift, mult in ((30, _MIX1), (27, _MIX2)):
        np.right_shift(z, np.uint64(shift), out=tmp)
        np.bitwise_xor(z, tmp, out=z)
        np.multiply(z, mult, out=z)
    np.right_shift(z, np.uint64(31), out=tmp)
    np.bitwise_xor(z, tmp, out=z)
    return z


# entries hashed at once: the temporaries of 2^18 uint64 (2 MiB each) stay in cache, which makes
# the hash about 3x faster than whole-array passes over tens of millions of entries
_HASH_CHUNK = 1 << 18


def entry_keys(seed: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """A pseudo-random uint64 per entry, a function of (seed, global row, column) only.

    ``key = mix(mix(mix(seed) + golden (row + 1)) + golden (col + 1))`` with splitmix64's ``mix``:
    counter-based, so any block of rows computes the same keys as the whole matrix would.
    ``rows`` and ``cols`` are aligned per-entry arrays (global row index, column).
    """
    s = _mix64(np.array([seed % (1 << 64)], dtype=np.uint64))[0]
    rows = np.asarray(rows)
    cols = np.asarray(cols)
    out = np.empty(rows.shape[0], dtype=np.uint64)
    for a in range(0, rows.shape[0], _HASH_CHUNK):
        b = min(a + _HASH_CHUNK, rows.shape[0])
        z = rows[a:b].astype(np.uint64)
        z += np.uint64(1)
        z *= _GOLDEN
        z += s
        _mix64(z)  # the row's stream
        c = cols[a:b].astype(np.uint64)
        c += np.uint64(1)
        c *= _GOLDEN
        z += c
        out[a:b] = _mix64(z)
    return out


def holdout_counts(m: np.ndarray, fraction: float) -> np.ndarray:
    """Entries each user holds out: ``min(round(fraction * m), m - 1)``, rounding halves up.

    A user keeps at least one training entry, so a user with one item keeps it in train and is
    not evaluated (with ``fraction < 0.5`` the clamp matters only for ``m = 1``). Halves round up
    (``floor(f m + 0.5)``), not to even, so that ``f = 0.5, m = 3`` holds out 2, like ``m = 5``
    holds out 3.
    """
    m = np.asarray(m, dtype=np.int64)
    h = np.floor(fraction * m + 0.5).astype(np.int64)
    return np.clip(h, 0, np.maximum(m - 1, 0))


def _check_split(mode: str, fraction: float) -> None:
    if mode not in SPLIT_MODES:
        raise MfsimError(
            f"holdout mode must be one of {', '.join(SPLIT_MODES)}; received {mode!r}. "
            "With evaluation.holdout: none there is nothing to split; skip the evaluation instead."
        )
    if not (isinstance(fraction, (float, int, np.floating)) and 0.0 < float(fraction) < 1.0):
        raise MfsimError(f"holdout fraction must be a number in (0, 1); received {fraction!r}.")


def _sub_block(block: CSRBlock, rows: np.ndarray, keep: np.ndarray) -> CSRBlock:
    """The entries ``keep`` (a mask over the block's entries) as a block of the same shape.

    Per-entry fields beside ``indices`` and ``data`` (arrays of length nnz, e.g. timestamps) are
    masked the same way; other fields are copied.
    """
    counts = np.bincount(rows[keep], minlength=block.n_rows)
    indptr = np.zeros(block.n_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    nnz = block.nnz
    changes: dict[str, Any] = {"indptr": indptr}
    for f in dataclasses.fields(block):
        value = getattr(block, f.name)
        if f.name in ("indices", "data") or (f.name != "indptr" and isinstance(value, np.ndarray)
                                             and value.shape == (nnz,)):
            changes[f.name] = np.ascontiguousarray(value[:nnz][keep])
    return dataclasses.replace(block, **changes)


# the packed sort key of the temporal split: at most this many bits, else a lexsort
_PACK_BITS = 64


def _latest_first(rows: np.ndarray, indptr: np.ndarray, cols: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Order of the entries by row, then timestamp descending, then column descending.

    One sort of a packed uint64 key (row | dense rank of ts from the latest | position from the
    row's end, which orders like the column because columns are sorted within rows) when the
    three fit in ``_PACK_BITS`` bits, else a three-key lexsort (about 6x slower: 19 s against 3 s
    for 20M entries).
    """
    nnz = rows.shape[0]
    uniq, ts_rank = np.unique(ts, return_inverse=True)
    lengths = np.diff(indptr)
    bits_r = max(int(rows[-1]).bit_length() if nnz else 0, 1)
    bits_t = max(int(len(uniq) - 1).bit_length(), 1)
    bits_p = max(int(lengths.max(initial=1) - 1).bit_length(), 1)
    if bits_r + bits_t + bits_p > _PACK_BITS:
        # latest first: ~t reverses the int64 order without overflow; ties: larger column first
        return np.lexsort((~cols.astype(np.int64), ~ts, rows))
    latest = (len(uniq) - 1 - ts_rank.ravel()).astype(np.uint64)
    from_end = (indptr[rows + 1] - 1 - np.arange(nnz, dtype=np.int64)).astype(np.uint64)
    key = (rows.astype(np.uint64) << np.uint64(bits_t + bits_p)) | (latest << np.uint64(bits_p)) | from_end
    return np.argsort(key)  # keys are distinct: any sort algorithm gives the same order


def split_block(
    block: CSRBlock,
    row_start: int,
    mode: str,
    fraction: float,
    seed: int,
    ts: np.ndarray | None = None,
) -> tuple[CSRBlock, CSRBlock]:
    """Split one row block of X into (train, test): each user holds out a share of its entries.

    Parameters
    ----------
    block : CSRBlock
        Rows ``row_start .. row_start + n_rows`` of X.
    row_start : int
        Global index of the block's first row: the random order of a user's entries is a function
        of (seed, global row, column), so the split does not depend on block boundaries.
    mode : {"random", "temporal"}
        ``random``: a user with m entries holds out the ``h = holdout_counts(m, fraction)``
        entries with the smallest keys ``entry_keys(seed, row, col)`` (the top 32 bits; equal keys,
        about ``m^2 / 2^33`` likely per user, go to the smaller column). ``temporal``: the ``h``
        latest entries by ``ts``; among equal timestamps the larger column index counts as the
        later entry.
    fraction : float in (0, 1)
        Share of each user's entries held out (the config's ``evaluation.fraction``).
    seed : int
        Seed of the random order (unused by ``temporal``).
    ts : int64 (nnz,), optional
        Per-entry timestamps aligned with ``block.indices`` (microseconds), required by
        ``temporal``; when omitted, a ``ts`` field of the block is used if it has one.

    Returns
    -------
    train, test : CSRBlock
        Same shape as ``block``, disjoint entries whose union is ``block``, indices still sorted
        within rows and values unchanged.

    Notes
    -----
    Time O(nnz log nnz) for one stable sort of the entries by (row, key); memory O(nnz): keys
    (8 bytes per entry), the order (8) and the masks. Vectorized, no per-user Python loop.
    """
    _check_split(mode, fraction)
    n_rows, nnz = block.n_rows, block.nnz
    if n_rows >= 1 << 32:
        raise MfsimError(f"a block must have fewer than 2^32 rows to be split; received {n_rows}. Use smaller blocks.")
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(block.indptr))
    cols = block.indices[:nnz]
    if mode == "random":
        keys = entry_keys(seed, rows + int(row_start), cols)
        # (row, top 32 key bits) in one uint64; the stable sort keeps the column order on ties
        composite = (rows.astype(np.uint64) << np.uint64(32)) | (keys >> np.uint64(32))
        order = np.argsort(composite, kind="stable")
    else:
        if ts is None:
            ts = getattr(block, "ts", None)
        if ts is None:
            raise MfsimError(
                "holdout 'temporal' needs a timestamp per entry; received none. Ingest with the "
                "timestamp column kept, or use holdout: random."
            )
        ts = np.asarray(ts)
        if ts.shape != (nnz,):
            raise MfsimError(
                f"ts must hold one timestamp per entry of the block, shape ({nnz},); received shape "
                f"{ts.shape}. Pass the timestamps aligned with block.indices."
            )
        order = _latest_first(rows, block.indptr, cols, ts.astype(np.int64, copy=False))
    h = holdout_counts(np.diff(block.indptr), fraction)
    sorted_rows = rows[order]
    rank = np.arange(nnz, dtype=np.int64) - block.indptr[sorted_rows]  # position within the row
    held = np.zeros(nnz, dtype=bool)
    held[order] = rank < h[sorted_rows]
    return _sub_block(block, rows, ~held), _sub_block(block, rows, held)


def split_holdout(
    blocks: RowBlocks,
    mode: str,
    fraction: float,
    seed: int,
    ts_parts: Sequence[Any] | None = None,
) -> tuple[RowBlocks, RowBlocks]:
    """(train, test) row blocks of X: ``split_block`` on every block, locally or as Dask tasks.

    ``ts_parts[b]`` (arrays, or futures on the blocks' client) holds the timestamps of block b
    aligned with its indices; needed by ``mode="temporal"`` unless the blocks carry ``ts``. On a
    client there is one task per block; the two halves are picked from its result by two small
    tasks, so nothing comes back to the caller. The result is the same for every block layout
    and worker count.
    """
    _check_split(mode, fraction)
    if ts_parts is not None and len(ts_parts) != blocks.n_blocks:
        raise MfsimError(
            f"ts_parts must hold one timestamp array per block ({blocks.n_blocks}); received "
            f"{len(ts_parts)}. Pass the timestamps of the same row blocks."
        )
    starts = [int(s) for s in blocks.row_offsets[:-1]]
    ts_list = list(ts_parts) if ts_parts is not None else [None] * blocks.n_blocks
    offsets = blocks.row_offsets
    if blocks.client is None:
        pairs = [split_block(part, s, mode, fraction, seed, t) for part, s, t in zip(blocks.parts, starts, ts_list)]
        train = [p[0] for p in pairs]
        test = [p[1] for p in pairs]
        return (RowBlocks(train, offsets.copy(), blocks.n_cols, None, sum(b.nnz for b in train)),
                RowBlocks(test, offsets.copy(), blocks.n_cols, None, sum(b.nnz for b in test)))
    client = blocks.client
    pairs = [client.submit(split_block, part, s, mode, fraction, seed, t)
             for part, s, t in zip(blocks.parts, starts, ts_list)]
    train = [client.submit(operator.itemgetter(0), p) for p in pairs]
    test = [client.submit(operator.itemgetter(1), p) for p in pairs]
    return (RowBlocks(train, offsets.copy(), blocks.n_cols, client),
            RowBlocks(test, offsets.copy(), blocks.n_cols, client))


# ---------------------------------------------------------------------------------------------
# metric sums


class MetricSums(NamedTuple):
    """Per-cutoff sums of per-row metric values (and of their squares) over a set of rows, and how many rows."""

    cutoffs: tuple[int, ...]
    totals: dict[str, np.ndarray]  # metric name -> float64 (len(cutoffs),) sums
    count: int
    squares: dict[str, np.ndarray] | None = None  # metric name -> sums of the squared values (None: not kept)

    def merge(self, other: "MetricSums") -> "MetricSums":
        """The sums of both chunks (the same metrics and cutoffs); squares only when both kept them."""
        if self.cutoffs != other.cutoffs or set(self.totals) != set(other.totals):
            raise MfsimError(
                f"only sums of the same metrics and cutoffs add up; received {sorted(self.totals)} at "
                f"{self.cutoffs} and {sorted(other.totals)} at {other.cutoffs}."
            )
        squares = None
        if self.squares is not None and other.squares is not None:
            squares = {k: v + other.squares[k] for k, v in self.squares.items()}
        return MetricSums(self.cutoffs, {k: v + other.totals[k] for k, v in self.totals.items()},
                          self.count + other.count, squares)

    def finish(self) -> dict[str, dict[int, float]]:
        """Means per metric and cutoff; NaN when no row was evaluated."""
        return {name: {c: (float(t[i] / self.count) if self.count else float("nan"))
                       for i, c in enumerate(self.cutoffs)}
                for name, t in self.totals.items()}

    def standard_errors(self) -> dict[str, dict[int, float]]:
        """Standard error of each mean, ``sd / sqrt(n)`` with the sample sd (ddof 1) of the n rows' values.

        ``sd^2 = (sum x^2 - (sum x)^2 / n) / (n - 1)`` from the sums (clipped at 0 against rounding);
        NaN for n < 2. Needs the squares (``ranking_sums`` keeps them).
        """
        if self.squares is None:
            raise MfsimError("standard errors need the sums of squares; these sums were made without them.")
        n = self.count
        out = {}
        for name, t in self.totals.items():
            if n < 2:
                out[name] = {c: float("nan") for c in self.cutoffs}
                continue
            var = np.maximum(self.squares[name] - t * t / n, 0.0) / (n - 1)
            out[name] = {c: float(np.sqrt(var[i] / n)) for i, c in enumerate(self.cutoffs)}
        return out


def merge_sums(parts: Iterable[MetricSums]) -> MetricSums:
    """The sum of several ``MetricSums`` (e.g. of the query chunks or Dask tasks of one list)."""
    parts = list(parts)
    if not parts:
        raise MfsimError("merge_sums needs at least one MetricSums; received none.")
    out = parts[0]
    for p in parts[1:]:
        out = out.merge(p)
    return out


def _check_cutoffs(cutoffs: Sequence[int]) -> tuple[int, ...]:
    cut = list(cutoffs) if not isinstance(cutoffs, (int, np.integer)) else [cutoffs]
    if not cut or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1 for c in cut):
        raise MfsimError(f"cutoffs must be a non-empty list of integers >= 1; received {cutoffs!r}.")
    return tuple(sorted({int(c) for c in cut}))


def _check_lists(indices: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.asarray(indices)
    cnt = np.asarray(counts)
    if idx.ndim != 2 or cnt.shape != (idx.shape[0],):
        raise MfsimError(
            f"lists must be indices of shape (q, N) and counts of shape (q,); received {idx.shape} and "
            f"{cnt.shape}. Pass the fields of one TopN."
        )
    if cnt.size and (cnt.min() < 0 or cnt.max() > idx.shape[1]):
        raise MfsimError(f"counts must lie in [0, {idx.shape[1]}] (the list width); received "
                         f"{cnt.min()} .. {cnt.max()}.")
    valid = np.arange(idx.shape[1])[None, :] < cnt[:, None]
    if np.any(idx[valid] < 0):
        raise MfsimError("lists hold -1 before their count; pass counts that match the indices (TopN.counts).")
    return idx.astype(np.int64), cnt.astype(np.int64)


def _check_csr_rows(indptr: np.ndarray, indices: np.ndarray, q: int) -> tuple[np.ndarray, np.ndarray]:
    """(indptr from 0, indices of those rows); a slice ``indptr[a:b + 1]`` of a larger CSR is fine."""
    ptr = np.asarray(indptr, dtype=np.int64)
    ind = np.asarray(indices)
    if ptr.shape != (q + 1,):
        raise MfsimError(
            f"test_indptr must have one entry per list row plus one ({q + 1}); received shape {ptr.shape}. "
            "Slice the CSR indptr as indptr[first:last + 1] for the rows of the lists."
        )
    if np.any(np.diff(ptr) < 0) or ptr[0] < 0 or ptr[-1] > ind.shape[0]:
        raise MfsimError(f"test_indptr must be non-decreasing within [0, {ind.shape[0]}]; "
                         f"received {ptr[0]} .. {ptr[-1]}.")
    return ptr - ptr[0], ind[ptr[0] : ptr[-1]].astype(np.int64)


# ---------------------------------------------------------------------------------------------
# ranking metrics


def ranking_per_user(
    indices: np.ndarray,
    counts: np.ndarray,
    test_indptr: np.ndarray,
    test_indices: np.ndarray,
    cutoffs: Sequence[int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-user normalized recall@N and NDCG@N of ranked lists against held-out items.

    Parameters
    ----------
    indices : int (q, L)
        Ranked item ids per user (a ``TopN.indices``), ``-1`` after ``counts[u]``.
    counts : int (q,)
        List lengths.
    test_indptr, test_indices : CSR of the q users' held-out items
        Row u holds ``test_indices[test_indptr[u]:test_indptr[u + 1]]`` (repeats count once).
    cutoffs : sequence of int >= 1
        N values; they may exceed L (a list shorter than N is scored as it is).

    Returns
    -------
    evaluated : bool (q,)
        Users with at least one held-out item; the others get NaN.
    n_test : int64 (q,)
        Distinct held-out items per user.
    recall, ndcg : float64 (q, C)
        For C = len(sorted cutoffs). With ``hits_N`` the held-out items among the first
        ``min(N, count)`` entries: ``recall@N = hits_N / min(N, |test_u|)`` (Liang et al. 2018,
        "Variational autoencoders for collaborative filtering", Eq. 10; Steck 2019), which reaches
        1 when every one of the first N entries is a hit or every held-out item is found;
        ``NDCG@N = DCG@N / IDCG@N`` with ``DCG@N = sum_{j < N, hit j} 1 / log2(j + 2)`` and
        ``IDCG@N = sum_{j < min(N, |test_u|)} 1 / log2(j + 2)``.

    Notes
    -----
    Membership by one sorted search of (user, item) keys: time O((q L + t) log t) for t held-out
    entries, memory O(q L + t) (a few (q, L) arrays of 8 bytes).
    """
    idx, cnt = _check_lists(indices, counts)
    cut = _check_cutoffs(cutoffs)
    q, width = idx.shape
    ptr, tind = _check_csr_rows(test_indptr, test_indices, q)
    if tind.size and tind.min() < 0:
        raise MfsimError(f"test_indices must be item ids >= 0; received {tind.min()}.")
    base = max(int(idx.max(initial=-1)), int(tind.max(initial=-1))) + 1  # key = user * base + item
    trow = np.repeat(np.arange(q, dtype=np.int64), np.diff(ptr))
    tkeys = np.unique(trow * base + tind)
    n_test = np.bincount(tkeys // base, minlength=q).astype(np.int64) if base else np.zeros(q, np.int64)
    valid = np.arange(width)[None, :] < cnt[:, None]
    lkeys = np.arange(q, dtype=np.int64)[:, None] * base + idx
    pos = np.searchsorted(tkeys, lkeys)
    hit = valid & (tkeys[np.minimum(pos, max(tkeys.size - 1, 0))] == lkeys) if tkeys.size else np.zeros_like(valid)
    evaluated, recall, ndcg = _metrics_of_hits(hit, n_test, cut)
    return evaluated, n_test, recall, ndcg


def _metrics_of_hits(hit: np.ndarray, n_test: np.ndarray, cut: list[int]) -> tuple[np.ndarray, ...]:
    """``ranking_per_user``'s (evaluated, recall, ndcg) from the hits (q x list width, bool) and the distinct
    held-out items per user."""
    q, width = hit.shape
    disc = 1.0 / np.log2(np.arange(2, max(width, max(cut)) + 2))  # 1 / log2(rank + 1), rank from 1
    cum_hits = np.cumsum(hit, axis=1, dtype=np.int64)
    cum_dcg = np.cumsum(hit * disc[:width], axis=1)
    cum_disc = np.cumsum(disc)
    evaluated = n_test > 0
    recall = np.full((q, len(cut)), np.nan)
    ndcg = np.full((q, len(cut)), np.nan)
    e = np.flatnonzero(evaluated)
    for k, c in enumerate(cut):
        m = min(c, width)
        hits = cum_hits[e, m - 1] if m else np.zeros(e.size)
        dcg = cum_dcg[e, m - 1] if m else np.zeros(e.size)
        denom = np.minimum(c, n_test[e])
        recall[e, k] = hits / denom  # hits_N / min(N, |test_u|)
        ndcg[e, k] = dcg / cum_disc[denom - 1]  # DCG@N / IDCG over min(N, |test_u|)
    return evaluated, recall, ndcg


def rank_sums(ranks: np.ndarray, test_indptr: np.ndarray, test_indices: np.ndarray, width: int,
              cutoffs: Sequence[int]) -> MetricSums:
    """``ranking_sums`` of lists of length ``width`` from the positions of the held-out items in them
    (``kernels.ranks.held_out_ranks``, aligned with ``test_indices``; at or beyond ``width``: not in the list): the
    same hits, hence the same sums bit for bit, without the lists."""
    cut = _check_cutoffs(cutoffs)
    ptr, tind = _check_csr_rows(test_indptr, test_indices, len(test_indptr) - 1)
    q = len(ptr) - 1
    rows = np.repeat(np.arange(q, dtype=np.int64), np.diff(ptr))
    base = int(tind.max(initial=-1)) + 1
    n_test = np.bincount(np.unique(rows * base + tind) // base, minlength=q).astype(np.int64) if base \
        else np.zeros(q, np.int64)
    ranks = np.asarray(ranks)[: len(rows)]
    listed = ranks < width
    hit = np.zeros((q, width), dtype=bool)
    hit[rows[listed], ranks[listed]] = True
    evaluated, recall, ndcg = _metrics_of_hits(hit, n_test, cut)
    return _sums_of(evaluated, recall, ndcg, cut)


def ranking_sums(
    indices: np.ndarray,
    counts: np.ndarray,
    test_indptr: np.ndarray,
    test_indices: np.ndarray,
    cutoffs: Sequence[int],
) -> MetricSums:
    """Sums of recall@N and NDCG@N and of their squares over one chunk of users with held-out items
    (see ``ranking_per_user``)."""
    evaluated, _, recall, ndcg = ranking_per_user(indices, counts, test_indptr, test_indices, cutoffs)
    return _sums_of(evaluated, recall, ndcg, _check_cutoffs(cutoffs))


def _sums_of(evaluated: np.ndarray, recall: np.ndarray, ndcg: np.ndarray, cut: tuple[int, ...]) -> MetricSums:
    """The ``MetricSums`` of per-user recall and NDCG (``ranking_per_user``'s) over the evaluated users."""
    r, g = recall[evaluated], ndcg[evaluated]
    return MetricSums(cut, {"recall": r.sum(axis=0), "ndcg": g.sum(axis=0)},
                      int(evaluated.sum()), {"recall": (r * r).sum(axis=0), "ndcg": (g * g).sum(axis=0)})


def ranking_metrics(
    indices: np.ndarray,
    counts: np.ndarray,
    test_indptr: np.ndarray,
    test_indices: np.ndarray,
    cutoffs: Sequence[int],
) -> dict[str, Any]:
    """Mean normalized recall@N and NDCG@N over the users with at least one held-out item.

    Returns ``{"recall": {N: value}, "ndcg": {N: value}, "recall_se": ..., "ndcg_se": ...,
    "n_users": int}`` (NaN means when no user has held-out items; the ``_se`` entries are
    ``MetricSums.standard_errors``). Definitions in ``ranking_per_user``; users whose list is
    empty but who have held-out items count with 0. Same cost as ``ranking_per_user``; for many
    users, stream ``ranking_sums`` over query chunks, ``merge_sums`` and ``finish``.
    """
    sums = ranking_sums(indices, counts, test_indptr, test_indices, cutoffs)
    se = {f"{name}_se": v for name, v in sums.standard_errors().items()}
    return {**sums.finish(), **se, "n_users": sums.count}


def _has_entries(block: CSRBlock) -> np.ndarray:
    """Per row of the block: True when it holds at least one entry."""
    return np.diff(block.indptr) > 0


def held_out_rows(test: RowBlocks) -> np.ndarray:
    """Sorted global rows of the users with at least one held-out entry (one small task per block on a client)."""
    if test.client is None:
        flags = [_has_entries(b) for b in test.parts]
    else:
        flags = test.client.gather([test.client.submit(_has_entries, part, pure=False) for part in test.parts])
    if not flags:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate(flags)).astype(np.int64)


# the stream of evaluation.seed that draws the users' sample (the split uses splitmix64 keys of the seed)
_USER_SAMPLE_STREAM = 1


def sample_users(rows: np.ndarray, max_users: int, seed: int) -> np.ndarray:
    """The users the held-out metrics average over: all ``rows`` when at most ``max_users``, else a sample.

    The sample is ``max_users`` of ``rows`` (the users with held-out items, ``held_out_rows``)
    drawn uniformly without replacement by ``default_rng([seed mod 2^64, 1]).choice``, sorted:
    a function of (rows, max_users, seed) only, the same for every block layout and worker count.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if isinstance(max_users, bool) or not isinstance(max_users, (int, np.integer)) or max_users < 1:
        raise MfsimError(f"max_users must be an integer >= 1; received {max_users!r}.")
    if rows.size <= max_users:
        return rows
    rng = np.random.default_rng([int(seed) % (1 << 64), _USER_SAMPLE_STREAM])
    return np.sort(rows[rng.choice(rows.size, size=int(max_users), replace=False)])


# ---------------------------------------------------------------------------------------------
# cluster precision


def cluster_per_query(
    indices: np.ndarray,
    counts: np.ndarray,
    query_cluster: np.ndarray,
    candidate_cluster: np.ndarray,
    cutoffs: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the share of its first ``min(N, count)`` neighbours in the query's own cluster.

    Parameters
    ----------
    indices, counts : int (q, L), int (q,)
        Neighbour lists (a ``TopN``).
    query_cluster : int (q,)
        Cluster label of each query row.
    candidate_cluster : int (p,)
        Cluster label of each candidate id.
    cutoffs : sequence of int >= 1

    Returns
    -------
    evaluated : bool (q,)
        Queries with at least one neighbour; the others get NaN.
    precision : float64 (q, C)
        ``#{j < min(N, count): cluster(list_j) == cluster(query)} / min(N, count)``: over the
        entries the list has, so a short list is not penalized for its length.

    Notes
    -----
    Time and memory O(q L).
    """
    idx, cnt = _check_lists(indices, counts)
    cut = _check_cutoffs(cutoffs)
    q, width = idx.shape
    qc = np.asarray(query_cluster)
    cc = np.asarray(candidate_cluster)
    if qc.shape != (q,) or cc.ndim != 1:
        raise MfsimError(
            f"query_cluster must have one label per list row ({q},) and candidate_cluster be 1-D; "
            f"received {qc.shape} and {cc.shape}."
        )
    if idx.size and idx.max(initial=-1) >= cc.shape[0]:
        raise MfsimError(
            f"candidate_cluster has {cc.shape[0]} labels but the lists name candidate {idx.max()}; "
            "pass one label per candidate id."
        )
    valid = np.arange(width)[None, :] < cnt[:, None]
    same = valid & (cc[np.where(valid, idx, 0)] == qc[:, None]) if cc.size else np.zeros_like(valid)
    cum = np.cumsum(same, axis=1, dtype=np.int64)
    evaluated = cnt > 0
    e = np.flatnonzero(evaluated)
    precision = np.full((q, len(cut)), np.nan)
    for k, c in enumerate(cut):
        m = np.minimum(c, cnt[e])  # >= 1 for evaluated queries
        precision[e, k] = cum[e, m - 1] / m
    return evaluated, precision


def cluster_sums(
    indices: np.ndarray,
    counts: np.ndarray,
    query_cluster: np.ndarray,
    candidate_cluster: np.ndarray,
    cutoffs: Sequence[int],
) -> MetricSums:
    """Sums of cluster precision@N over one chunk of queries (see ``cluster_per_query``)."""
    evaluated, precision = cluster_per_query(indices, counts, query_cluster, candidate_cluster, cutoffs)
    return MetricSums(_check_cutoffs(cutoffs), {"precision": precision[evaluated].sum(axis=0)},
                      int(evaluated.sum()))


def cluster_precision(
    indices: np.ndarray,
    counts: np.ndarray,
    query_cluster: np.ndarray,
    candidate_cluster: np.ndarray,
    cutoffs: Sequence[int],
) -> dict[int, float]:
    """Mean share of same-cluster neighbours among the first ``min(N, count)``, per cutoff N.

    Queries with an empty list are skipped (NaN when all are). Compare with ``chance_level``:
    a list drawn at random from the other items scores that on average.
    """
    return cluster_sums(indices, counts, query_cluster, candidate_cluster, cutoffs).finish()["precision"]


def chance_level(cluster: np.ndarray) -> float:
    """Probability that a uniformly random other item is in an item's cluster, averaged over items.

    ``sum_c n_c (n_c - 1) / (p (p - 1))`` for p items and n_c items in cluster c: the expected
    cluster precision of a random neighbour list. Time O(p log p).
    """
    labels = np.asarray(cluster).ravel()
    p = labels.shape[0]
    if p < 2:
        raise MfsimError(f"the chance level needs at least 2 items; received {p}.")
    _, n_c = np.unique(labels, return_counts=True)
    n_c = n_c.astype(np.float64)
    return float(np.sum(n_c * (n_c - 1.0)) / (float(p) * (p - 1.0)))


# ---------------------------------------------------------------------------------------------
# raw cosine baseline


def raw_cosine_topn(X: sp.spmatrix, n: int, item_chunk: int = 2048) -> TopN:
    """Item-item top-N by cosine of the raw columns of X (no factorization), in chunks of items.

    ``cos(i, j) = (X^T X)_ij / (||x_i|| ||x_j||)`` for columns ``x_i`` of X: the baseline against
    which the embedding cosines of Eq. 1 and Eq. 2 are compared (``objective=raw``,
    ``scaling=none``).

    Parameters
    ----------
    X : scipy sparse (n_users, p)
        The interactions (after preprocessing, if any). Never densified.
    n : int >= 1
        List length N.
    item_chunk : int, default 2048
        Items per chunk: the chunk's Gram rows ``X[:, chunk]^T X`` are one sparse product, then
        one dense float32 tile ``item_chunk x p`` is scanned by the selection kernel of
        ``kernels.topn``. Lower it for large catalogs (the tile is ``4 item_chunk p`` bytes:
        800 MB for 2048 x 100k).

    Returns
    -------
    TopN
        indices int32 (p, N), scores float32 (p, N), counts int32 (p,), with the kernels' rules:
        no item is its own neighbour, a zero column has no neighbours and is no one's neighbour,
        items without co-occurrence score 0 and still qualify (smallest ids first) when fewer than
        N items score above 0, sorted by score descending then index ascending, ``-1`` / ``-inf``
        padding.

    Notes
    -----
    The Gram entries are accumulated in float64 (a pair of items may share millions of users) and
    rounded to float32; ``cos = (g_ij * inv_i) * inv_j`` in float32 with float32 inverse norms
    from float64 norms, as in ``kernels.topn``. Time: the sparse products, sum over users of
    (items of the user)^2 in all, plus an O(p) scan per item. Memory O(nnz) for a float64 copy
    of X and its transpose, the chunk's product (at most ``item_chunk x p`` entries) and the tile;
    never O(p^2).
    """
    if not sp.issparse(X):
        raise MfsimError(f"X must be a scipy sparse matrix; received {type(X).__name__}. Pass blocks.gather().")
    for name, value in (("n", n), ("item_chunk", item_chunk)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise MfsimError(f"{name} must be an integer >= 1; received {value!r}.")
    n, item_chunk = int(n), int(item_chunk)
    Xc = sp.csc_matrix(X, dtype=np.float64)
    p = Xc.shape[1]
    if p > np.iinfo(np.int32).max:
        raise MfsimError(f"at most 2^31 - 1 items are supported (int32 ids); received {p}.")
    Xr = Xc.tocsr()
    Xt = Xc.T.tocsr()  # (p, n_users): row i is column i of X
    norms = np.sqrt(np.asarray(Xc.multiply(Xc).sum(axis=0)).ravel())
    inv = np.zeros(p, dtype=np.float32)
    inv[norms > 0] = (1.0 / norms[norms > 0]).astype(np.float32)

    out = TopN(np.full((p, n), -1, dtype=np.int32), np.full((p, n), -np.inf, dtype=np.float32),
               np.zeros(p, dtype=np.int32))
    chunk = min(item_chunk, max(p, 1))
    buf = np.empty(chunk * p, dtype=np.float32)
    no_ex_ptr, no_ex_idx = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
    no_dot = empty_state(0, n)
    for a in range(0, p, chunk):
        b = min(a + chunk, p)
        gram = (Xt[a:b] @ Xr).tocsr()  # (X^T X)[a:b, :], float64 sums
        tile = buf[: (b - a) * p].reshape(b - a, p)
        tile.fill(0.0)
        tile[np.repeat(np.arange(b - a), np.diff(gram.indptr)), gram.indices] = gram.data  # rounded to float32
        cos = empty_state(b - a, n)
        self_ids = np.arange(a, b, dtype=np.int64)
        select_tile(tile, 0, self_ids, inv[a:b], inv, no_ex_ptr, no_ex_idx, *no_dot, *cos)
        counts, idx, sc = finalize_state(*cos)
        out.indices[a:b], out.scores[a:b], out.counts[a:b] = idx, sc, counts
    return out


# ---------------------------------------------------------------------------------------------
# the pipeline's scorers


def holdout_sums(lists: dict[str, TopN], rng, test: CSRBlock, cutoffs: tuple[int, ...]) -> dict[str, MetricSums]:
    """Ranking sums of one range of users' lists (rows ``rng.start:rng.stop`` of ``test``) against their held-out items.

    Runs inside the top-N task (``run_topn(..., then=...)``), so only the sums travel.
    """
    indptr = test.indptr[rng.start : rng.stop + 1]
    return {m: ranking_sums(top.indices, top.counts, indptr, test.indices, cutoffs) for m, top in lists.items()}


def cluster_cutoffs(cutoffs: list[int], top_n: int) -> list[int]:
    """The cutoffs that item-item lists of length ``top_n`` can serve (``[top_n]`` when none can)."""
    usable = [c for c in cutoffs if c <= top_n] or [top_n]
    skipped = [c for c in cutoffs if c > top_n]
    if skipped:
        log.warning("cluster precision: cutoffs %s exceed neighbours.top_n=%d; using %s", skipped, top_n, usable)
    return usable


def list_length(asked: int, candidates: int) -> int:
    """The length of a top-N list: ``asked`` (``neighbours.top_n``, ``audit.top_n``, a largest cutoff), at most the
    ``candidates`` a row can have, at least 1 (top_n = 100000 on 1,682 items allocates 1,682 per row, not 1e5)."""
    return max(1, min(int(asked), int(candidates)))


def cluster_range_sums(labels: np.ndarray, cutoffs: list[int], first_row: int, indices: np.ndarray,
                       counts: np.ndarray) -> "MetricSums | None":
    """Cluster-precision sums of the item-item lists of query rows ``first_row ..`` (None: no labelled query)."""
    q = labels[first_row : first_row + len(counts)]
    keep = q >= 0
    if not keep.any():
        return None
    return cluster_sums(indices[keep], counts[keep], q[keep], labels, cutoffs)


class ClusterScorer:
    """Cluster precision@N of item-item lists, summed chunk by chunk as the lists are written.

    Only items with a known cluster (label >= 0) are queries; a neighbour without a known
    cluster counts as a miss, and the chance level accounts for that: a random other item (of
    all p - 1) is in a labelled query's cluster c with probability (n_c - 1) / (p - 1), so
    chance = sum_c n_c (n_c - 1) / (k (p - 1)) over the k labelled items (the usual chance level
    when every item is labelled).
    """

    def __init__(self, labels: np.ndarray, cutoffs: list[int]):
        self.labels = labels
        self.cutoffs = cutoffs
        self.sums: dict[tuple[str, str, str], MetricSums] = {}
        known = labels[labels >= 0]
        p = len(labels)
        self.chance = chance_level(known) * (len(known) - 1) / (p - 1) if len(known) >= 2 else float("nan")

    def add(self, key: tuple[str, str, str], first_row: int, indices: np.ndarray, counts: np.ndarray) -> None:
        """Add the lists of query rows ``first_row ..`` of list ``key`` = (objective, scaling, metric)."""
        self.add_sums(key, cluster_range_sums(self.labels, self.cutoffs, first_row, indices, counts))

    def add_sums(self, key: tuple[str, str, str], sums: "MetricSums | None") -> None:
        """Add sums that ``cluster_range_sums`` computed elsewhere (in the task that made the lists); in row order."""
        if sums is not None:
            self.sums[key] = self.sums[key].merge(sums) if key in self.sums else sums

    def add_raw_baseline(self, X: sp.spmatrix) -> None:
        """The cosine of the raw columns of X (no factorization) as list ``("raw", "none", "cosine")``."""
        p = max(1, X.shape[1])
        raw = raw_cosine_topn(X, max(self.cutoffs), item_chunk=max(1, min(2048, RAW_TILE_BYTES // (4 * p))))
        self.add(("raw", "none", "cosine"), 0, raw.indices, raw.counts)

    def rows(self) -> list[dict[str, Any]]:
        """One row per list and cutoff, the raw baseline first: objective, scaling, metric, top_n, precision, chance."""
        rows = []
        for objective, scaling, metric in sorted(self.sums, key=lambda key: (key[0] != "raw", key)):
            prec = self.sums[(objective, scaling, metric)].finish()["precision"]
            for c in self.cutoffs:
                rows.append({"objective": objective, "scaling": scaling, "metric": metric, "top_n": c,
                             "cluster_precision": prec[c], "chance": self.chance})
        return rows


# the raw-cosine baseline's dense tile (item_chunk x p float32) stays under this many bytes
RAW_TILE_BYTES = 256 * 2**20
