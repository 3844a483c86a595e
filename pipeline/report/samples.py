"""The numbers behind the run report's figures: item orders and subsets, seeded samples, statistics.

Steck, Ekanadham & Kallus (2024), "Is Cosine-Similarity of Embeddings Really About Similarity?":
Eq. 1 has the equally good solutions ``(A D, B D^-1)`` for every diagonal D, which share the
model score ``A B^T`` but not the cosines of their embeddings. This module measures that on
samples: item-item cosines (``cosine_matrix``), the shrinkage of Eq. 1 and Eq. 2 per component
(``shrinkage_weights``), seeded item pairs and their scores, the rank displacement of top-N lists
under a random rescaling, the audit's Jaccards per group, the k-means order of items without
cluster truth, colour limits, the lambda sweep per objective, and the audit's finding in one
sentence (``headline``).

Every function is pure: nothing here draws or writes; samples of ``report.pairs`` and
``report.rank_items`` keep every figure O(sample x p k), never p x p.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mfsim.kernels.topn import TopN, topn_blocked
from mfsim.pipeline.lists.audit import sample_rows, without_self
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.model.factors import scaled_columns
from mfsim.pipeline.model.svd import flip_signs

# Dense m x m cosine matrices are drawn in full; 4,096 items cost 4096^2 * 8 B = 128 MiB per
# panel, far more pixels than a panel has. Beyond that the caller must subsample (select_items).
MAX_HEATMAP_ITEMS = 4096
LAMBDA_KEYS = ("eq1", "eq2")  # keys of the lambdas of spectrum_png, as in objectives.*
# Named streams of report.seed, so that the pairs and the rank sample do not share draws
_STREAM_PAIRS = 1
_STREAM_RANK_ITEMS = 2


# --------------------------------------------------------------------------------------------
# Item order and subset


def item_order(
    *,
    cluster: np.ndarray | None = None,
    popularity: np.ndarray | None = None,
    v1: np.ndarray | None = None,
    n_items: int | None = None,
) -> np.ndarray:
    """Display order of the items in the heatmaps: a permutation of ``0..p-1``.

    Keys, in precedence order, each used when given:

    1. ``cluster`` ascending (ground truth, e.g. the simulator's items_truth),
    2. ``popularity`` descending (most popular item of each cluster first, as in Fig. 1),
    3. ``v1`` descending: a seriation by the first right singular vector. Its sign is arbitrary
       in an SVD, so it is first oriented to make its largest-magnitude entry positive; for a
       non-negative X, v1 is then non-negative (Perron-Frobenius) and the order runs from the
       items with the largest loading on the top component down,
    4. the item index (ties keep their index order: the sort is stable).

    With no key at all the order is the identity of length ``n_items``.

    Parameters
    ----------
    cluster : (p,) array, optional
        Cluster label per item (any sortable dtype).
    popularity : (p,) array, optional
        Popularity per item (e.g. interaction count); finite.
    v1 : (p,) array, optional
        First right singular vector of X (``V[:, 0]``); finite.
    n_items : int, optional
        p; needed only when no key is given, checked against the keys otherwise.

    Returns
    -------
    (p,) int64 array: ``order[j]`` is the item shown at position j.

    Notes
    -----
    O(p log p) time, O(p) memory.
    """
    keys: list[np.ndarray] = []  # np.lexsort: last key is the primary one
    p = n_items
    for name, arr, sign in (("v1", v1, -1.0), ("popularity", popularity, -1.0), ("cluster", cluster, None)):
        if arr is None:
            continue
        a = np.asarray(arr)
        if a.ndim != 1:
            raise MfsimError(f"{name} must be a 1-D array with one entry per item, got shape {a.shape}")
        if p is None:
            p = a.shape[0]
        elif a.shape[0] != p:
            raise MfsimError(
                f"{name} has {a.shape[0]} entries but {p} items were expected; "
                "pass cluster, popularity and v1 for the same items (and n_items = their count)"
            )
        if sign is None:  # cluster: any sortable labels, ascending
            keys.append(a)
            continue
        a = a.astype(np.float64)
        if not np.all(np.isfinite(a)):
            raise MfsimError(f"{name} must be finite, got {int(np.sum(~np.isfinite(a)))} NaN or inf entries")
        if name == "v1" and a.size:
            a = flip_signs(a[:, None])[0][:, 0]  # orient: largest |v1| entry positive
        keys.append(sign * a)  # descending
    if p is None:
        raise MfsimError("item_order needs cluster, popularity, v1 or n_items; got none of them")
    if int(p) < 0:
        raise MfsimError(f"n_items must be >= 0, got {p}")
    if not keys:
        return np.arange(int(p), dtype=np.int64)
    return np.lexsort(keys).astype(np.int64)  # lexsort is stable: ties keep the index order


def select_items(order: np.ndarray, max_items: int, seed: int | None = 0) -> np.ndarray:
    """At most ``max_items`` items of ``order``, evenly spread along it and in the same order.

    Systematic sampling: with p = len(order) > m = max_items and stride ``t = p / m``, the kept
    positions are ``floor(u + j t)`` for ``j = 0..m-1``, with one offset ``u`` drawn uniformly
    from ``[0, t)`` by ``numpy.random.default_rng(seed)`` (``seed=None``: ``u = t / 2``, the
    middle of each stride, no randomness). Every item is kept with the same probability m / p,
    the kept positions are strictly increasing (t > 1), and each stretch of the order (each
    cluster, when ordered by cluster) keeps its share of the panel, within one item.

    Parameters
    ----------
    order : (p,) int array
        Item indices in display order (from :func:`item_order`).
    max_items : int
        m >= 1, e.g. ``report.heatmap_items``.
    seed : int or None, default 0
        Seed of the offset u.

    Returns
    -------
    (min(p, m),) int64 array: a subsequence of ``order`` (``order`` itself when p <= m).

    Notes
    -----
    O(m) time and memory (plus the copy of ``order`` when it is returned whole).
    """
    order = np.asarray(order)
    if order.ndim != 1:
        raise MfsimError(f"order must be a 1-D array of item indices, got shape {order.shape}")
    m = int(max_items)
    if m < 1:
        raise MfsimError(f"max_items must be >= 1, got {max_items}; set report.heatmap_items >= 2")
    p = order.shape[0]
    if p <= m:
        return order.astype(np.int64, copy=True)
    t = p / m
    u = t / 2 if seed is None else float(np.random.default_rng(seed).uniform(0.0, t))
    pos = np.floor(u + np.arange(m) * t).astype(np.int64)  # < u + (m-1) t < m t = p
    np.minimum(pos, p - 1, out=pos)  # guard against rounding of u + (m-1) t up to p
    return order[pos].astype(np.int64)


def cluster_boundaries(labels_in_order: np.ndarray) -> np.ndarray:
    """Positions ``j`` (1..m-1) where the label changes between display position j-1 and j.

    Pass ``cluster[items]`` for the displayed ``items``; the result is the ``boundaries``
    argument of the heatmap functions (lines are drawn between j-1 and j).
    """
    lab = np.asarray(labels_in_order)
    if lab.ndim != 1:
        raise MfsimError(f"labels must be a 1-D array, got shape {lab.shape}")
    return (np.flatnonzero(lab[1:] != lab[:-1]) + 1).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Numbers behind the pictures


def cosine_matrix(B: np.ndarray) -> np.ndarray:
    """Item-item cosine similarity of the rows of B: ``C = N B B^T N``, ``N = diag(1/||b_i||)``.

    A zero row has similarity 0 with every row, itself included (it has no direction).

    Parameters
    ----------
    B : (m, k) array
        Embeddings of the m displayed items (m <= MAX_HEATMAP_ITEMS).

    Returns
    -------
    (m, m) float64 array in [-1, 1].

    Notes
    -----
    O(m^2 k) time, O(m^2) memory: dense, for a displayed subset only (never the catalogue).
    """
    B = np.asarray(B)
    if B.ndim != 2:
        raise MfsimError(f"expected item embeddings of shape (m, k), got shape {B.shape}")
    if B.shape[0] > MAX_HEATMAP_ITEMS:
        raise MfsimError(
            f"a heatmap draws at most {MAX_HEATMAP_ITEMS} items, got {B.shape[0]}; "
            "subsample with select_items (report.heatmap_items)"
        )
    B = B.astype(np.float64)
    if not np.all(np.isfinite(B)):
        raise MfsimError("item embeddings contain NaN or inf; check the factors of this objective")
    norms = np.linalg.norm(B, axis=1)
    inv = np.zeros_like(norms)
    np.divide(1.0, norms, out=inv, where=norms > 0)  # zero rows -> zero direction
    Bn = B * inv[:, None]
    C = Bn @ Bn.T  # C = N B B^T N
    return np.clip(C, -1.0, 1.0, out=C)  # float64 round-off past +-1


def shrinkage_weights(sigma: np.ndarray, lambdas: Mapping[str, float]) -> dict[str, np.ndarray]:
    """Per-component weights of ``A B^T = V_k diag(w) V_k^T`` for each objective in ``lambdas``.

    - ``"eq1"`` (Eq. 1): ``w_i = s_i^2 / (s_i^2 + lambda_1)``, 1/2 at ``s_i = sqrt(lambda_1)``.
    - ``"eq2"`` (Eq. 2): ``w_i = (1 - lambda_2 / s_i)_+`` (the product of the A and B scales,
      ``sqrt((1/s)(1 - lam/s)_+) * sqrt(s (1 - lam/s)_+)``), 0 for ``s_i <= lambda_2``.

    Components with ``s_i = 0`` get weight 0.

    Returns
    -------
    dict with the keys of ``lambdas``, each a (k,) float64 array in [0, 1].
    """
    s = check_sigma(sigma)
    lams = check_lambdas(lambdas)
    out: dict[str, np.ndarray] = {}
    live = s > 0
    for key, lam in lams.items():
        w = np.zeros_like(s)
        if key == "eq1":
            s2 = s * s
            np.divide(s2, s2 + lam, out=w, where=live)  # w = s^2 / (s^2 + lam)
        else:
            np.divide(lam, s, out=w, where=live)
            w = np.where(live, np.maximum(1.0 - w, 0.0), 0.0)  # w = (1 - lam/s)_+
        out[key] = w
    return out


# --------------------------------------------------------------------------------------------
# Samples, orders and comparisons for data without cluster truth


def pair_sample(p: int, n_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded sample of ``n_pairs`` item pairs ``(i, j)``, ``i < j``, uniform over the p (p - 1) / 2 pairs.

    Draws ``i`` uniform on ``0..p-1`` and ``j`` uniform on the other p - 1 items (``j' ~ U{0..p-2}``,
    ``j = j' + [j' >= i]``), from ``numpy.random.default_rng([seed, 1])``, then orders each pair. Every
    ordered pair has probability 1 / (p (p - 1)), so every unordered one 2 / (p (p - 1)). Pairs are
    drawn with replacement (repeats are rare once p^2 >> n_pairs).

    Returns
    -------
    (i, j): two (n_pairs,) int64 arrays with ``0 <= i < j < p``.

    Notes
    -----
    O(n_pairs) time and memory, whatever p (never p x p).
    """
    _check_count(p, "p (the number of items)", 2)
    _check_count(n_pairs, "n_pairs", 1)
    _check_count(seed, "seed", 0)
    rng = np.random.default_rng([int(seed), _STREAM_PAIRS])
    i = rng.integers(0, p, size=int(n_pairs), dtype=np.int64)
    j = rng.integers(0, p - 1, size=int(n_pairs), dtype=np.int64)
    j += j >= i  # skip i itself: j uniform on the other p - 1 items
    return np.minimum(i, j), np.maximum(i, j)


def rank_sample(p: int, m: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded sample of at most m of p items (all when p <= m), uniform without
    replacement: ``audit.sample_rows`` on its own stream 2 of ``seed`` (the pairs use stream 1)."""
    return sample_rows(int(p), int(m), int(seed), stream=_STREAM_RANK_ITEMS, name="report.rank_items")


def pair_cosine(B: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """``cos(b_i, b_j)`` for each pair (rows of B), in float64; 0 when either row is zero.

    O(n k) time and memory for n pairs: only the 2n rows are read.
    """
    i, j = _check_pairs(B, i, j, "B")
    bi, bj = _rows(B, i, "B"), _rows(B, j, "B")
    num = np.einsum("ij,ij->i", bi, bj)
    den = np.linalg.norm(bi, axis=1) * np.linalg.norm(bj, axis=1)
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den > 0)  # b_i . b_j / (|b_i| |b_j|)
    return np.clip(out, -1.0, 1.0)


def pair_model(A: np.ndarray, B: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """The model score ``(A B^T)_ij = a_i . b_j`` for each pair, in float64. O(n k) for n pairs."""
    _check_pairs(A, i, j, "A")
    i, j = _check_pairs(B, i, j, "B")
    ai, bj = _rows(A, i, "A"), _rows(B, j, "B")
    if ai.shape[1] != bj.shape[1]:
        raise MfsimError(f"A and B must have the same k; got {ai.shape[1]} and {bj.shape[1]} columns")
    return np.einsum("ij,ij->i", ai, bj)  # a_i . b_j


def most_different(values: Mapping[str, np.ndarray]) -> tuple[str, str]:
    """The two names whose values differ most: the largest mean ``|x_a - x_b|`` (ties: first in order).

    ``values``: name -> (n,) array, e.g. the cosines of the same item pairs under each Eq. 1 scaling.
    """
    names = list(values)
    if len(names) < 2:
        raise MfsimError(f"most_different needs at least two named arrays, got {names}")
    best, pair = -1.0, (names[0], names[1])
    for x in range(len(names)):
        for y in range(x + 1, len(names)):
            gap = float(np.mean(np.abs(np.asarray(values[names[x]], np.float64)
                                       - np.asarray(values[names[y]], np.float64))))
            if gap > best:
                best, pair = gap, (names[x], names[y])
    return pair


def sampled_item_lists(queries: np.ndarray, candidates: np.ndarray, rows: np.ndarray, n: int,
                       metric: str) -> TopN:
    """Top-``n`` item-item lists of the sampled items ``rows`` against all candidates, the item itself left out.

    Parameters
    ----------
    queries : (q, k) array
        Query embeddings of the sampled items, in the order of ``rows`` (``B[rows]`` for cosine
        lists, ``A[rows]`` for the model scores ``a_i . b_j``).
    candidates : (p, k) array
        Candidate embeddings, one row per item (B).
    rows : (q,) int array
        Item index of each query row (its own candidate, which is left out).
    n : int
        List length, 1 <= n <= p - 1.
    metric : {"dot", "cosine"}
        Score of ``kernels.topn.topn_blocked``.

    Returns
    -------
    TopN with (q, n) indices and scores, sorted by score descending, then smaller index.

    Notes
    -----
    ``topn_blocked`` in this process: O(q p k) time, O(q n) memory for the lists plus one
    candidate tile (never q x p, never p x p).
    """
    rows = np.asarray(rows, dtype=np.int64)
    p = np.shape(candidates)[0]
    _check_count(n, "n (the list length)", 1)
    if n > p - 1:
        raise MfsimError(f"a list of {n} other items needs at least {n + 1} items, got {p}; lower the list length")
    top = topn_blocked(np.asarray(queries, np.float32), np.asarray(candidates, np.float32), n + 1,
                       metrics=(metric,))[metric]
    return without_self(top, rows, n)


def pair_scores(solutions: Mapping[str, tuple[np.ndarray, np.ndarray]], i: np.ndarray, j: np.ndarray
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Cosine ``cos(b_i, b_j)`` and model score ``a_i . b_j`` of the pairs under each solution.

    ``solutions``: name -> (A, B), each read once (a mapping that builds its pairs on access, such
    as ``Factors.of("eq1")``, holds one pair at a time). Returns ``(cosine, model)``: dicts
    name -> (n,) float64. O(s n k) time for s solutions and n pairs.
    """
    cos: dict[str, np.ndarray] = {}
    model: dict[str, np.ndarray] = {}
    for name in solutions:
        A, B = solutions[name]
        cos[name], model[name] = pair_cosine(B, i, j), pair_model(A, B, i, j)
        del A, B
    return cos, model


def rescaling_displacement(A: np.ndarray, B: np.ndarray, rows: np.ndarray, d: np.ndarray, n: int
                           ) -> dict[str, np.ndarray]:
    """Rank displacement of the sampled items' top-n lists when ``(A, B)`` becomes ``(A D, B D^-1)``.

    Steck et al. (2024), Section 2: ``(A D)(B D^-1)^T = A B^T`` for every invertible diagonal D,
    so the model scores, and their lists, stay; the cosines of the rows of ``B D^-1`` do not.

    Parameters
    ----------
    A, B : (p, k) arrays
        One solution's factors.
    rows : (q,) int array
        Sampled query items.
    d : (k,) array
        Diagonal of D, entries > 0 (``audit.random_diagonals``).
    n : int
        List length, 1 <= n <= p - 1.

    Returns
    -------
    dict with ``"cosine"`` (lists of ``cos(b_i, b_j)``) and ``"model"`` (lists of ``a_i . b_j``),
    each the (q, n) :func:`rank_displacement` of the rescaled lists against the given ones.

    Notes
    -----
    Four :func:`sampled_item_lists`, O(q p k) each; memory: B and ``B D^-1`` (p x k float32) and
    the q rows of A, besides the caller's A.
    """
    d = np.asarray(d, dtype=np.float64)
    if d.shape != (np.shape(B)[1],) or not np.all(np.isfinite(d)) or np.any(d <= 0):
        raise MfsimError(f"d must be {np.shape(B)[1]} finite entries > 0 (one per dimension), got shape {d.shape}")
    rows = np.asarray(rows, dtype=np.int64)
    Aq = np.ascontiguousarray(np.asarray(A)[rows], np.float32)
    base_cos = sampled_item_lists(B[rows], B, rows, n, "cosine")
    base_model = sampled_item_lists(Aq, B, rows, n, "dot")
    Bd = scaled_columns(np.asarray(B), 1.0 / d)  # B D^-1
    moved_cos = sampled_item_lists(Bd[rows], Bd, rows, n, "cosine")
    moved_model = sampled_item_lists(scaled_columns(Aq, d), Bd, rows, n, "dot")  # rows of A D against B D^-1
    return {metric: rank_displacement(x.indices, x.counts, y.indices, y.counts)
            for metric, x, y in (("cosine", base_cos, moved_cos), ("model", base_model, moved_model))}


def audit_jaccards(detail: pa.Table) -> dict[str, np.ndarray]:
    """Per-item Jaccards of the Eq. 1 audit, pooled per (comparison group, metric), for :func:`histogram_png`.

    ``detail``: the audit's per-item table (columns ``metric``, ``scaling_b``, ``jaccard``; rows of
    other objectives or kinds than ``eq1`` / ``item_item`` are ignored when those columns are there).
    Groups: between the named scalings, and against random rescalings (``scaling_b`` starting
    with ``random``). Keys, group by group with ``cosine`` first in each, then the other metrics
    in first-seen order: ``"<metric>, between named scalings (<c> comparisons)"`` and
    ``"<metric>, against random D (<c> scalings)"``.
    """
    need = ("metric", "scaling_a", "scaling_b", "jaccard")
    missing = [c for c in need if c not in detail.column_names]
    if missing:
        raise MfsimError(f"the audit's per-item table lacks the columns {missing}; got {detail.column_names}")

    def codes(name: str) -> tuple[np.ndarray, list]:
        """The column as codes into its distinct values, in first-seen order (in Arrow: no Python string per row;
        a null reads as "None")."""
        enc = pc.dictionary_encode(pc.fill_null(detail[name].cast(pa.string()), "None").combine_chunks())
        return enc.indices.to_numpy(zero_copy_only=False), enc.dictionary.to_pylist()

    keep = np.ones(detail.num_rows, dtype=bool)
    for name, value in (("objective", "eq1"), ("kind", "item_item")):
        if name in detail.column_names:
            code, values = codes(name)
            keep &= np.isin(code, [i for i, v in enumerate(values) if v == value])
    (metric, metrics), (s_a, _), (s_b, names_b) = codes("metric"), codes("scaling_a"), codes("scaling_b")
    metric, s_a, s_b = metric[keep], s_a[keep].astype(np.int64), s_b[keep]
    jac = np.asarray(detail["jaccard"].to_numpy(zero_copy_only=False), np.float64)[keep]
    is_random = np.asarray([x.startswith("random") for x in names_b], dtype=bool)[s_b]
    first_seen = metric[np.sort(np.unique(metric, return_index=True)[1])]  # among the kept rows
    out: dict[str, np.ndarray] = {}
    for random in (False, True):
        for m in dict.fromkeys(["cosine", *(metrics[i] for i in first_seen)]):
            sel = (is_random == random) & (metric == (metrics.index(m) if m in metrics else -1))
            if not sel.any():
                continue
            c = np.unique(s_a[sel] * len(names_b) + s_b[sel]).size  # distinct (scaling_a, scaling_b) pairs
            label = (f"{m}, against random D ({c} scaling{'s' * (c != 1)})" if random
                     else f"{m}, between named scalings ({c} comparison{'s' * (c != 1)})")
            values = jac[sel]
            out[label] = values[np.isfinite(values)]
    return out


def rank_displacement(idx_a: np.ndarray, cnt_a: np.ndarray, idx_b: np.ndarray, cnt_b: np.ndarray) -> np.ndarray:
    """For each entry of list a, how many ranks it moved in list b: ``rank_b - rank_a``.

    Parameters
    ----------
    idx_a, idx_b : (q, N_a), (q, N_b) int arrays
        Candidate ids per row (``TopN.indices``); only the first ``cnt`` entries of a row count.
    cnt_a, cnt_b : (q,) int arrays
        Valid entries per row (``TopN.counts``).

    Returns
    -------
    (q, N_a) float64: ``rank_b - rank_a`` (0-based ranks; > 0: moved down) where the id is in both
    lists, ``+inf`` where it is not in list b (it left the top N), NaN after ``cnt_a[r]`` (no
    entry). An id listed twice in b counts at its first rank.

    Notes
    -----
    Vectorised with sorted keys ``row * stride + id`` and one binary search: O(q N log(q N))
    time, O(q N) memory.
    """
    idx_a, cnt_a = _check_topn(idx_a, cnt_a, "a")
    idx_b, cnt_b = _check_topn(idx_b, cnt_b, "b")
    q, na = idx_a.shape
    if idx_b.shape[0] != q:
        raise MfsimError(f"both lists must have the same rows; got {q} and {idx_b.shape[0]}. "
                         "Compare lists of the same query items")
    out = np.full((q, na), np.nan)
    valid_a = np.arange(na)[None, :] < cnt_a[:, None]
    valid_b = np.arange(idx_b.shape[1])[None, :] < cnt_b[:, None]
    if not valid_a.any():
        return out
    stride = 1 + max(int(idx_a[valid_a].max()), int(idx_b[valid_b].max(initial=0)))
    rb, pb = np.nonzero(valid_b)
    kb = rb * stride + idx_b[rb, pb].astype(np.int64)
    order = np.argsort(kb, kind="stable")  # equal keys keep rank order: the first rank is found first
    kb, pb = kb[order], pb[order]
    ra, pa_ = np.nonzero(valid_a)
    ka = ra * stride + idx_a[ra, pa_].astype(np.int64)
    pos = np.searchsorted(kb, ka)
    found = pos < kb.size
    found[found] = kb[pos[found]] == ka[found]
    shift = np.full(ka.shape, np.inf)
    shift[found] = pb[pos[found]] - pa_[found]  # rank_b - rank_a
    out[ra, pa_] = shift
    return out


def displacement_bins(n: int) -> list[tuple[int, int]]:
    """Bins of ``|rank_b - rank_a|`` for lists of length n: ``[lo, hi]`` inclusive, 0 and 1 alone, then
    widths growing about 2.5x per bin (2-4, 5-9, 10-19, 20-49, 50-99, ...), the last one ending at n - 1.
    """
    _check_count(n, "n (the list length)", 1)
    edges = [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
    while edges[-1] < n:
        edges.append(edges[-1] * 2)
    edges = [e for e in edges if e < n] + [n]
    return [(lo, hi - 1) for lo, hi in zip(edges[:-1], edges[1:])]


def displacement_counts(disp: np.ndarray, n: int) -> tuple[list[str], np.ndarray]:
    """Counts of the entries of :func:`rank_displacement` per bin of ``|shift|``, and of those that left.

    Returns
    -------
    (labels, counts): one label and count per bin of :func:`displacement_bins` (``"0"``, ``"1"``,
    ``"2-4"``, ...), then ``"left top-<n>"`` for the +inf entries; NaN entries (no item) are not
    counted. ``counts`` is int64.
    """
    d = np.asarray(disp, dtype=np.float64).ravel()
    d = d[~np.isnan(d)]
    left = np.isinf(d)
    a = np.abs(d[~left])
    if a.size and a.max() > n - 1:
        raise MfsimError(f"a shift of {a.max():g} ranks does not fit lists of length {n}; pass their length")
    bins = displacement_bins(n)
    labels = [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in bins] + [f"left top-{n}"]
    counts = [int(np.sum((a >= lo) & (a <= hi))) for lo, hi in bins] + [int(left.sum())]
    return labels, np.asarray(counts, dtype=np.int64)


def cluster_order(E: np.ndarray, n_clusters: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Display order of m items grouped by k-means on the directions of their embeddings.

    The rows of E are scaled to unit length (zero rows stay zero), then clustered by
    ``kmeans_labels(n_clusters, n_init=4, seed)``. Clusters are shown
    largest first (ties: smaller label); within a cluster, items by cosine to their cluster's
    centroid, highest first (ties: smaller index). So items with similar directions sit next to
    each other and a heatmap of their similarities shows blocks, as the true clusters would.

    Parameters
    ----------
    E : (m, k) array
        Embeddings of the displayed items; pass embeddings that are the same for every solution
        (e.g. ``V_k diag(sigma)``), so that every panel gets the same order.
    n_clusters : int
        Clusters, >= 1; at most the number of distinct directions is used.
    seed : int
        k-means initialisation seed.

    Returns
    -------
    (order, labels): ``order`` (m,) int64, a permutation of 0..m-1 (position -> item row of E);
    ``labels`` (m,) int64, the cluster of each displayed position, renumbered 0, 1, ... in
    display order (pass it to :func:`cluster_boundaries`).

    Notes
    -----
    O(m k n_clusters) per k-means iteration; O(m k) memory. Meant for the displayed items
    (m <= a few thousand), not the catalogue.
    """
    E = np.asarray(E, dtype=np.float64)
    if E.ndim != 2:
        raise MfsimError(f"expected embeddings of shape (m, k), got shape {E.shape}")
    if not np.all(np.isfinite(E)):
        raise MfsimError("embeddings contain NaN or inf; check the factors")
    _check_count(n_clusters, "n_clusters", 1)
    _check_count(seed, "seed", 0)
    m = E.shape[0]
    if m == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    norms = np.linalg.norm(E, axis=1)
    inv = np.zeros_like(norms)
    np.divide(1.0, norms, out=inv, where=norms > 0)
    En = E * inv[:, None]  # unit rows: k-means on directions
    c = min(int(n_clusters), len(np.unique(np.round(En, 9), axis=0)))  # directions equal up to round-off count once
    if c <= 1:
        labels = np.zeros(m, np.int64)
    else:
        labels = kmeans_labels(En, c, n_init=4, seed=int(seed))
    sizes = np.bincount(labels, minlength=c)
    rank = np.empty(c, np.int64)
    rank[np.lexsort((np.arange(c), -sizes))] = np.arange(c)  # largest cluster first
    cent = np.zeros((c, E.shape[1]))
    np.add.at(cent, labels, En)
    cn = np.linalg.norm(cent, axis=1)
    cent /= np.where(cn > 0, cn, 1.0)[:, None]
    to_centroid = np.einsum("ij,ij->i", En, cent[labels])  # cos(e_i, centroid of its cluster)
    order = np.lexsort((np.arange(m), -to_centroid, rank[labels])).astype(np.int64)
    return order, rank[labels][order]


def kmeans_labels(E: np.ndarray, n_clusters: int, *, n_init: int = 4, seed: int = 0,
                  max_iterations: int = 300) -> np.ndarray:
    """k-means (Lloyd's algorithm from k-means++ seeds, Arthur & Vassilvitskii 2007) of the rows of E: the labels
    (int64, 0..n_clusters-1) of the best of ``n_init`` starts by inertia (sum of squared distances to the centres).

    What ``sklearn.cluster.KMeans(n_clusters, n_init=n_init)`` computes, in a few NumPy lines, without importing
    scikit-learn (~0.85 s of a report's ~4 s on ml-100k for a 0.05 s fit of a few thousand rows). Deterministic
    for a seed. O(m k n_clusters) per iteration.
    """
    E = np.asarray(E, dtype=np.float64)
    m = E.shape[0]
    rng = np.random.default_rng(seed)
    sq = np.einsum("ij,ij->i", E, E)
    best, best_inertia = np.zeros(m, np.int64), np.inf
    for _ in range(n_init):
        centres = np.empty((n_clusters, E.shape[1]))
        centres[0] = E[rng.integers(m)]
        d2 = np.maximum(sq - 2 * E @ centres[0] + centres[0] @ centres[0], 0.0)
        for c in range(1, n_clusters):  # k-means++: the next seed with probability proportional to d^2
            total = d2.sum()
            pick = rng.choice(m, p=d2 / total) if total > 0 else rng.integers(m)
            centres[c] = E[pick]
            d2 = np.minimum(d2, np.maximum(sq - 2 * E @ centres[c] + centres[c] @ centres[c], 0.0))
        labels = None
        for _ in range(max_iterations):
            dist = sq[:, None] - 2 * E @ centres.T + np.einsum("ij,ij->i", centres, centres)[None, :]
            new = np.argmin(dist, axis=1).astype(np.int64)
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
            counts = np.bincount(labels, minlength=n_clusters)
            sums = np.zeros_like(centres)
            np.add.at(sums, labels, E)
            filled = counts > 0  # an emptied cluster keeps its centre
            centres[filled] = sums[filled] / counts[filled, None]
        inertia = float(np.sum((E - centres[labels]) ** 2))
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def quantile_limits(values: np.ndarray, lower: float = 0.01, upper: float = 0.99, *,
                    center: float | None = None) -> tuple[float, float]:
    """Colour limits from the data's own quantiles: ``(q_lower, q_upper)`` of the finite values.

    With ``center`` (e.g. 0 for a diverging colour map) the limits are symmetric about it:
    ``center -+ max(|q_lower - center|, |q_upper - center|)``. Quantiles by linear interpolation
    (``numpy.quantile``). Degenerate data (no finite value, or all equal) give limits of width 2
    around the value (or the center), so a colour map can always be drawn.

    Notes
    -----
    O(n) time (``numpy.quantile`` partitions), one copy of the finite values.
    """
    lo_q, hi_q = float(lower), float(upper)
    if not (0.0 <= lo_q < hi_q <= 1.0):
        raise MfsimError(f"quantiles must satisfy 0 <= lower < upper <= 1, got lower={lower}, upper={upper}")
    v = np.asarray(values, dtype=np.float64).ravel()
    finite = np.isfinite(v)
    if not finite.all():
        v = v[finite]
    mid = 0.0 if center is None else float(center)
    if v.size == 0:
        return mid - 1.0, mid + 1.0
    lo, hi = (float(x) for x in np.quantile(v, [lo_q, hi_q]))
    if center is not None:
        half = max(abs(lo - mid), abs(hi - mid))
        lo, hi = mid - half, mid + half
    if not hi > lo:  # all values equal
        lo, hi = lo - 1.0, hi + 1.0
    return lo, hi


def off_diagonal(C: np.ndarray) -> np.ndarray:
    """The m (m - 1) entries of a square matrix off its diagonal, as a flat array (self-similarity excluded)."""
    C = np.asarray(C)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise MfsimError(f"expected a square matrix, got shape {C.shape}")
    return C[~np.eye(C.shape[0], dtype=bool)]


def sweep_series(table: pa.Table, metric: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per objective of a lambda sweep table, its lambdas (ascending), their ``metric`` and the chosen lambdas.

    Parameters
    ----------
    table : pyarrow.Table
        Columns ``objective``, ``lambda``, ``chosen`` (bool) and ``metric`` (e.g. ``ndcg@20``), one
        row per (objective, lambda) tried; with a ``rank`` column of several ranks (``svd.rank: auto``), the
        rows of the chosen rank.
    metric : str
        The column to draw, ``evaluation.select_metric``.

    Returns
    -------
    dict objective -> (lambdas, values, chosen): float64 arrays, rows sorted by lambda; ``chosen``
    holds the lambdas marked chosen (usually one). Objectives in first-seen order; rows with a
    null metric are left out.
    """
    if not isinstance(table, pa.Table):
        raise MfsimError(f"the lambda sweep must be a pyarrow.Table, got {type(table).__name__}")
    need = ("objective", "lambda", "chosen", metric)
    missing = [c for c in need if c not in table.column_names]
    if missing:
        metrics = [c for c in table.column_names if "@" in c]
        raise MfsimError(f"the lambda sweep table lacks {missing}; its metric columns are {metrics}; "
                         "set evaluation.select_metric to one of them")
    if "rank" in table.column_names and len(set(table["rank"].to_pylist())) > 1:  # svd.rank: auto: the chosen rank's
        chosen_ranks = {r for r, c in zip(table["rank"].to_pylist(), table["chosen"].to_pylist()) if c}
        table = table.filter(pa.array([r in chosen_ranks for r in table["rank"].to_pylist()]))
    d = table.select(list(need)).to_pydict()
    out: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for obj in dict.fromkeys(d["objective"]):
        rows = [r for r in range(table.num_rows) if d["objective"][r] == obj and d[metric][r] is not None]
        lam = np.asarray([d["lambda"][r] for r in rows], np.float64)
        val = np.asarray([d[metric][r] for r in rows], np.float64)
        chosen = np.asarray(sorted(d["lambda"][r] for r in rows if d["chosen"][r]), np.float64)
        s = np.argsort(lam, kind="stable")
        out[str(obj)] = (lam[s], val[s], chosen)
    return out


def headline(audit_summary: Mapping[str, Any] | None) -> str | None:
    """The report's finding in one sentence, from the Eq. 1 audit's summary (``AuditResult.summary``).

    E.g. "Top-100 cosine lists of Eq. 1 have on average 57% of their items in common across equally
    good solutions (Jaccard@100, over 10 comparisons; lowest 32%, eq2_like vs random_sd=1.0); model
    and projected_cosine lists are identical." The percentage is the mean Jaccard: the items in
    both lists as a share of the items in either. None when the summary has no cosine comparison
    (then the audit's own ``verdict`` says why).
    """
    if not audit_summary:
        return None
    cos = (audit_summary.get("metrics") or {}).get("cosine")
    n = audit_summary.get("top_n")
    if not cos or n is None or audit_summary.get("trivial"):
        return None
    mean, low = cos.get("mean_jaccard_mean"), cos.get("min_jaccard_mean")
    if mean is None or not math.isfinite(mean):
        return None
    text = (f"Top-{n} cosine lists of Eq. 1 have on average {mean:.0%} of their items in common across equally "
            f"good solutions (Jaccard@{n}, over {cos.get('comparisons', '?')} comparisons")
    if low is not None and "lowest" in cos:
        a, b = cos["lowest"]
        text += f"; lowest {low:.0%}, {a} vs {b}"
    text += ")"
    inv = audit_summary.get("invariance") or {}
    names = " and ".join(inv.get("metrics") or ("model", "projected_cosine"))
    inv_mean = inv.get("min_jaccard_mean")
    if inv_mean is None or not math.isfinite(inv_mean):
        return text + "."
    if inv_mean == 1.0:
        return text + f"; {names} lists are identical."
    if inv.get("passed"):
        return text + f"; {names} lists are the same but for float32 near-ties (Jaccard {inv_mean:.3f} or more)."
    return (text + f"; {names} lists, whose scores are the same for every solution, come out at Jaccard "
            f"{inv_mean:.3f} (the audit's self-check failed: see its verdict).")


# --------------------------------------------------------------------------------------------
# Helpers


def _check_count(value: Any, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise MfsimError(f"{name} must be an integer >= {low}, got {value!r}")


def _rows(X: np.ndarray, idx: np.ndarray, name: str) -> np.ndarray:
    rows = np.asarray(X)[idx].astype(np.float64)
    if not np.all(np.isfinite(rows)):
        raise MfsimError(f"{name} contains NaN or inf in the sampled rows; check the factors")
    return rows


def _check_pairs(X: np.ndarray, i: np.ndarray, j: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Pair indices ``i, j`` checked against the rows of the 2-D array ``X``."""
    if np.ndim(X) != 2:
        raise MfsimError(f"{name} must be a 2-D array (items x k), got shape {np.shape(X)}")
    p = np.shape(X)[0]
    i, j = np.asarray(i), np.asarray(j)
    if i.ndim != 1 or i.shape != j.shape or not (np.issubdtype(i.dtype, np.integer)
                                                  and np.issubdtype(j.dtype, np.integer)):
        raise MfsimError(f"pair indices must be two 1-D integer arrays of one length, got {i.dtype} {i.shape} "
                         f"and {j.dtype} {j.shape}; use pair_sample")
    if i.size and (min(i.min(), j.min()) < 0 or max(i.max(), j.max()) >= p):
        raise MfsimError(f"pair indices must lie in 0..{p - 1} (the rows of {name}), got "
                         f"[{min(i.min(), j.min())}, {max(i.max(), j.max())}]")
    return i, j


def _check_topn(idx: np.ndarray, cnt: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    idx, cnt = np.asarray(idx), np.asarray(cnt)
    if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
        raise MfsimError(f"idx_{name} must be a 2-D integer array (rows x N), got {idx.dtype} {idx.shape}")
    if cnt.shape != (idx.shape[0],) or not np.issubdtype(cnt.dtype, np.integer):
        raise MfsimError(f"cnt_{name} must hold one integer count per row ({idx.shape[0]}), got {cnt.dtype} "
                         f"{cnt.shape}; pass TopN.counts with TopN.indices")
    if cnt.size and (cnt.min() < 0 or cnt.max() > idx.shape[1]):
        raise MfsimError(f"cnt_{name} must lie in [0, {idx.shape[1]}] (the list width), got {cnt.min()}..{cnt.max()}")
    valid = np.arange(idx.shape[1])[None, :] < cnt[:, None]
    if valid.any() and idx[valid].min() < 0:
        raise MfsimError(f"list {name} has a negative id within its counts; -1 marks padding after the count")
    return idx, cnt.astype(np.int64)

def check_boundaries(boundaries, m: int) -> np.ndarray:
    """Boundary positions (``cluster_boundaries``) checked against m displayed items, as int64; none for None."""
    if boundaries is None:
        return np.zeros(0, dtype=np.int64)
    b = np.asarray(boundaries)
    if b.ndim != 1 or (b.size and not np.issubdtype(b.dtype, np.integer)):
        raise MfsimError(f"boundaries must be a 1-D array of integer positions, got {b.dtype} shape {b.shape}")
    if b.size and (b.min() < 1 or b.max() > m - 1):
        raise MfsimError(
            f"boundaries must lie in 1..{m - 1} for {m} items, got [{b.min()}, {b.max()}]; "
            "compute them with cluster_boundaries on the displayed items"
        )
    return b.astype(np.int64)


def check_sigma(sigma) -> np.ndarray:
    """Singular values as a (k,) float64 array, checked finite and >= 0."""
    s = np.asarray(sigma, dtype=np.float64)
    if s.ndim != 1:
        raise MfsimError(f"expected singular values of shape (k,), got shape {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise MfsimError("singular values must be finite and >= 0; check the SVD")
    return s


def check_lambdas(lambdas: Mapping[str, float]) -> dict[str, float]:
    """The lambdas of ``LAMBDA_KEYS`` as floats, checked finite and >= 0."""
    out = {}
    for key, lam in lambdas.items():
        if key not in LAMBDA_KEYS:
            raise MfsimError(f"unknown objective {key!r} in lambdas; valid: {', '.join(LAMBDA_KEYS)}")
        lam = float(lam)
        if not math.isfinite(lam) or lam < 0:
            raise MfsimError(f"lambda of {key} must be a finite number >= 0, got {lam!r}; set objectives.{key}.lambda")
        out[key] = lam
    return out
