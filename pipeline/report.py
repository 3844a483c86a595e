"""The run report: item-item cosine heatmaps (the paper's Fig. 1), the spectrum, audit histograms.

Steck, Ekanadham & Kallus (2024), "Is Cosine-Similarity of Embeddings Really About Similarity?",
Fig. 1: on simulated data with item clusters, the item-item cosine similarity of the item
embeddings B of Eq. 1 shows a different block structure for each of its equally good solutions
``(A D, B D^-1)``, while the unique solution of Eq. 2 gives one picture. This module draws those
pictures for a run and assembles them, with the run's tables, into one HTML page.

Every function is pure: arrays in, ``bytes`` out (PNG images, or the page). Nothing here writes
files; the caller stores the page as ``report.html`` in the run.

Figures are drawn with matplotlib's object API (``Figure`` + ``FigureCanvasAgg``): no pyplot, no
global backend state, safe inside worker threads. PNGs carry no timestamp or version metadata, so
the same input gives the same bytes.

The page (:func:`render_report`) is self-contained: inline CSS, no scripts, no external fonts or
style sheets, and each figure inline as a ``data:image/png;base64`` URI, so ``report.html`` sent
alone shows everything.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mfsim.kernels.topn import TopN, topn_blocked
from mfsim.pipeline.lists.audit import sample_rows, without_self
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.model.factors import scaled_columns
from mfsim.pipeline.model.svd import flip_signs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DPI = 110  # ~440 px per 4-inch heatmap panel: a 1,000-item panel is downsampled ~2.3x, still readable
HEATMAP_CMAP = "RdBu_r"  # diverging: -1 blue, 0 white, +1 red; [-1, 1] unless limits are given
DIFF_CMAP = "PuOr_r"  # diverging, unlike HEATMAP_CMAP: a difference panel is not read as a cosine
# Dense m x m cosine matrices are drawn in full; 4,096 items cost 4096^2 * 8 B = 128 MiB per
# panel, far more pixels than a panel has. Beyond that the caller must subsample (select_items).
MAX_HEATMAP_ITEMS = 4096
HIST_BINS = 20  # width 0.05 on [0, 1]
MAX_GRID_COLS = 4  # heatmap panels and histogram small multiples per row, at most
LAMBDA_KEYS = ("eq1", "eq2")  # keys of the lambdas of spectrum_png, as in objectives.*
# k-means clusters that order the heatmaps without cluster truth: 8 groups of ~125 of 1,000 items
# are large enough to show as blocks and few enough that their boundary lines do not crowd a panel
HEATMAP_CLUSTERS = 8
# Named streams of report.seed, so that the pairs and the rank sample do not share draws
_STREAM_PAIRS = 1
_STREAM_RANK_ITEMS = 2
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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
    return np.clip(Bn @ Bn.T, -1.0, 1.0)  # C = N B B^T N; clip float64 round-off past +-1


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
    s = _check_sigma(sigma)
    lams = _check_lambdas(lambdas)
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

    def column(name: str) -> np.ndarray:
        return np.asarray(detail[name].cast(pa.string()).to_pylist(), dtype=object)

    keep = np.ones(detail.num_rows, dtype=bool)
    for name, value in (("objective", "eq1"), ("kind", "item_item")):
        if name in detail.column_names:
            keep &= column(name) == value
    metric, s_a, s_b = column("metric")[keep], column("scaling_a")[keep], column("scaling_b")[keep]
    jac = np.asarray(detail["jaccard"].to_numpy(zero_copy_only=False), np.float64)[keep]
    is_random = np.asarray([str(x).startswith("random") for x in s_b], dtype=bool)
    out: dict[str, np.ndarray] = {}
    for random in (False, True):
        for m in dict.fromkeys(["cosine", *metric.tolist()]):
            sel = (is_random == random) & (metric == m)
            if not sel.any():
                continue
            c = len(set(zip(s_a[sel], s_b[sel])))
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
    ``sklearn.cluster.KMeans(n_clusters, n_init=4, random_state=seed)``. Clusters are shown
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
        from sklearn.cluster import KMeans  # imported here: only the report draws clusters

        labels = KMeans(n_clusters=c, n_init=4, random_state=int(seed)).fit_predict(En).astype(np.int64)
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
    v = v[np.isfinite(v)]
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
        row per (objective, lambda) tried.
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


def flatten_config(resolved: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested configuration as ``{"section.key": value}`` (lists kept whole), in the given order."""
    out: dict[str, Any] = {}
    for key, value in resolved.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, name + "."))
        else:
            out[name] = value
    return out


# --------------------------------------------------------------------------------------------
# Figures


def cosine_heatmap_png(
    B_sub: np.ndarray,
    title: str,
    boundaries: Sequence[int] | np.ndarray | None = None,
    *,
    axis_label: str = "item (display order)",
) -> bytes:
    """PNG of the item-item cosine similarity of the rows of ``B_sub`` (one panel of Fig. 1).

    Parameters
    ----------
    B_sub : (m, k) array
        Item embeddings of the displayed items, rows in display order
        (``B[select_items(item_order(...), max_items)]``).
    title : str
        Panel title, e.g. ``"Eq. 1, symmetric"``.
    boundaries : sequence of int, optional
        Positions 1..m-1 at which to draw cluster boundary lines (:func:`cluster_boundaries`).
    axis_label : str
        Label of both axes.

    Returns
    -------
    bytes of a PNG: heatmap with a diverging colour map fixed to [-1, 1] and a colour bar.

    Notes
    -----
    O(m^2 k) time and O(m^2) memory for the cosine matrix (m <= MAX_HEATMAP_ITEMS), plus the
    rendering, ~0.1-0.5 s.
    """
    C = cosine_matrix(B_sub)
    b = _check_boundaries(boundaries, C.shape[0])
    fig = Figure(figsize=(5.6, 4.8), layout="constrained")
    ax = fig.add_subplot()
    im = _draw_heatmap(ax, C, title, b, axis_label)
    cb = fig.colorbar(im, ax=ax, shrink=0.9)
    cb.set_label("cosine similarity")
    return _png(fig)


def heatmap_grid_png(
    panels: Sequence[tuple[str, np.ndarray]],
    boundaries: Sequence[int] | np.ndarray | None = None,
    *,
    axis_label: str = "item (display order)",
    limits: tuple[float, float] = (-1.0, 1.0),
    difference: tuple[str, np.ndarray, np.ndarray] | None = None,
) -> bytes:
    """PNG of several cosine heatmaps side by side, one per (objective, scaling), as in Fig. 1.

    Parameters
    ----------
    panels : list of (title, B_sub)
        B_sub (m, k_j) item embeddings of the same m items in the same display order for every
        panel (k_j may differ). Up to MAX_GRID_COLS panels per row; more wrap into balanced rows.
    boundaries : sequence of int, optional
        Cluster boundary positions shared by all panels (:func:`cluster_boundaries`).
    axis_label : str
        Label of the axes of the bottom-left panel.
    limits : (vmin, vmax), default (-1, 1)
        Colour limits shared by the panels (values outside take the end colours), e.g.
        :func:`quantile_limits` of the off-diagonal cosines with ``center=0``.
    difference : (title, B_a, B_b), optional
        Adds a last panel with the difference ``C_a - C_b`` of the cosines of two embeddings of the
        same displayed items (two of the panels, or a solution not shown, such as a random
        rescaling), with its own colour bar symmetric about 0 at the 1st / 99th percentile of its
        off-diagonal entries (:func:`quantile_limits`).

    Returns
    -------
    bytes of a PNG with one shared colour bar (and one for the difference panel).

    Notes
    -----
    O(P m^2 k) time and O(P m^2) memory for P panels (each cosine matrix is kept as float32
    until the figure is rendered: 4 MB per 1,000-item panel).
    """
    panels = list(panels)
    if not panels:
        raise MfsimError("heatmap_grid_png needs at least one (title, embeddings) panel, got none")
    vmin, vmax = (float(x) for x in limits)
    if not (math.isfinite(vmin) and math.isfinite(vmax) and vmin < vmax):
        raise MfsimError(f"limits must be finite with vmin < vmax, got {limits}")
    m = None
    mats = []
    for title, B in panels:
        C = cosine_matrix(B)
        if m is None:
            m = C.shape[0]
        elif C.shape[0] != m:
            raise MfsimError(
                f"panel {title!r} has {C.shape[0]} items but the first panel has {m}; "
                "pass the embeddings of the same displayed items to every panel"
            )
        mats.append((str(title), C.astype(np.float32)))
    diff = None
    if difference is not None:
        d_title, B_a, B_b = difference
        C_a, C_b = cosine_matrix(B_a), cosine_matrix(B_b)
        if not C_a.shape == C_b.shape == (m, m):
            raise MfsimError(f"the difference panel needs embeddings of the same {m} displayed items, got "
                             f"{C_a.shape[0]} and {C_b.shape[0]} rows")
        D = (C_a - C_b).astype(np.float32)  # C_a - C_b
        lo, hi = quantile_limits(off_diagonal(D), center=0.0)
        diff = (str(d_title), D, lo, hi)
    b = _check_boundaries(boundaries, m)
    n = len(mats)
    nrows = math.ceil(n / MAX_GRID_COLS)
    ncols = math.ceil(n / nrows)  # balanced rows: 5 panels -> 3 + 2, not 4 + 1
    width = 3.7 * ncols + 0.9
    fig = Figure(figsize=(width + 4.6 * (diff is not None), 3.7 * nrows + 0.2), layout="constrained")
    grid = fig
    if diff is not None:  # the difference in a column of its own, right of the grid, with its own colour bar
        grid, side = fig.subfigures(1, 2, width_ratios=(width, 4.6), wspace=0.02)
        ax_d = side.subplots(1, 1)
        title, D, lo, hi = diff
        im_d = _draw_heatmap(ax_d, D, title, b, axis_label, lo, hi, cmap=DIFF_CMAP)
        side.colorbar(im_d, ax=ax_d, shrink=0.85 if nrows == 1 else 0.5).set_label("difference of cosines")
    axes = grid.subplots(nrows, ncols, squeeze=False)
    im = None
    for idx, ax in enumerate(axes.ravel()):
        if idx >= n:
            ax.set_axis_off()
            continue
        r, c = divmod(idx, ncols)
        label = axis_label if (r == nrows - 1 or idx + ncols >= n) and c == 0 else None
        title, C = mats[idx]
        im = _draw_heatmap(ax, C, title, b, label, vmin, vmax)
    cb = grid.colorbar(im, ax=axes.ravel().tolist(), shrink=0.85 if nrows == 1 else 0.6)
    cb.set_label("cosine similarity" if (vmin, vmax) == (-1.0, 1.0)
                 else f"cosine similarity (limits {vmin:.2g} .. {vmax:.2g})")
    return _png(fig)


def spectrum_png(sigma: np.ndarray, lambdas: Mapping[str, float]) -> bytes:
    """PNG of the singular values of X with the thresholds of Eq. 1 and Eq. 2, and the weights.

    Top panel: ``s_i`` against the component index on a log axis, with a horizontal line at
    ``lambda_2`` (Eq. 2 keeps the components with ``s_i > lambda_2``) and one at
    ``sqrt(lambda_1)`` (Eq. 1's weight ``w_i = s_i^2 / (s_i^2 + lambda_1)`` is 1/2 there).
    Bottom panel: the weights of :func:`shrinkage_weights` per component.

    Parameters
    ----------
    sigma : (k,) array
        Singular values of X (finite, >= 0), in SVD order. Zeros are not drawn on the log axis.
    lambdas : dict
        ``{"eq1": lambda_1, "eq2": lambda_2}``, either key optional (skipped objectives).

    Returns
    -------
    bytes of a PNG.
    """
    s = _check_sigma(sigma)
    weights = shrinkage_weights(s, lambdas)
    lams = _check_lambdas(lambdas)
    idx = np.arange(1, s.shape[0] + 1)
    fig = Figure(figsize=(7.5, 6.0), layout="constrained")
    ax, axw = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    pos = s > 0
    marker = "o" if s.shape[0] <= 60 else None
    ax.plot(idx[pos], s[pos], color="0.15", marker=marker, ms=3, lw=1.2, label=r"singular value $s_i$")
    if np.any(pos):
        ax.set_yscale("log")
    styles = {"eq1": dict(color="tab:orange", ls="--"), "eq2": dict(color="tab:blue", ls="-.")}
    if "eq2" in lams:
        lam2 = lams["eq2"]
        kept = int(np.sum(s > lam2))
        if lam2 > 0:
            ax.axhline(lam2, lw=1.2, **styles["eq2"],
                       label=rf"Eq. 2: $\lambda_2$ = {lam2:.4g} (keeps $s_i > \lambda_2$: {kept} of {s.size})")
    if "eq1" in lams:
        lam1 = lams["eq1"]
        if lam1 > 0:
            ax.axhline(math.sqrt(lam1), lw=1.2, **styles["eq1"],
                       label=rf"Eq. 1: $\sqrt{{\lambda_1}}$ = {math.sqrt(lam1):.4g} ($w_i$ = 1/2)")
    ax.set_ylabel(r"$s_i$")
    ax.set_title("Spectrum of X and the shrinkage of Eq. 1 and Eq. 2")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    names = {"eq1": r"Eq. 1: $w_i = s_i^2/(s_i^2+\lambda_1)$", "eq2": r"Eq. 2: $w_i = (1-\lambda_2/s_i)_+$"}
    for key, w in weights.items():
        axw.plot(idx, w, marker=marker, ms=3, lw=1.2, label=names[key], **styles[key])
    axw.axhline(0.5, color="0.5", lw=0.8, ls=":")
    axw.set_ylim(-0.03, 1.03)
    axw.set_xlabel("component i")
    axw.set_ylabel(r"weight $w_i$")
    axw.set_title(r"weights of $A B^T = V_k\,\mathrm{diag}(w)\,V_k^T$", fontsize=9)
    axw.xaxis.set_major_locator(MaxNLocator(integer=True))
    axw.grid(True, alpha=0.3)
    if weights:
        axw.legend(loc="upper right", fontsize=8, framealpha=0.9)
    return _png(fig)


def histogram_png(values_by_label: Mapping[str, np.ndarray], title: str, xlabel: str) -> bytes:
    """PNG of one histogram on [0, 1] per label (small multiples), e.g. per-item Jaccard@N.

    Each panel has HIST_BINS bins of equal width on [0, 1], a dashed line at the median, and
    notes the number of values, their mean and median in its title. Panels share the x range; the y axis counts items.

    Parameters
    ----------
    values_by_label : dict of label -> (n,) array
        Values in [0, 1] (NaN not allowed), one comparison per label.
    title : str
        Figure title.
    xlabel : str
        Label of the x axes, e.g. ``"Jaccard@100 of the item's cosine neighbours"``.

    Returns
    -------
    bytes of a PNG.
    """
    items = list(values_by_label.items())
    if not items:
        raise MfsimError("histogram_png needs at least one labelled array of values, got none")
    data = []
    for label, vals in items:
        v = np.asarray(vals, dtype=np.float64).ravel()
        if not np.all(np.isfinite(v)) or np.any((v < 0) | (v > 1)):
            raise MfsimError(
                f"values of {label!r} must be finite and in [0, 1], got range "
                f"[{np.nanmin(v) if v.size else 0:g}, {np.nanmax(v) if v.size else 0:g}]; "
                "pass Jaccard similarities (or another measure on [0, 1])"
            )
        data.append((str(label), v))
    n = len(data)
    nrows = math.ceil(n / MAX_GRID_COLS)
    ncols = math.ceil(n / nrows)
    fig = Figure(figsize=(3.6 * ncols + 0.4, 2.9 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    bins = np.linspace(0.0, 1.0, HIST_BINS + 1)
    for idx, ax in enumerate(axes.ravel()):
        if idx >= n:
            ax.set_axis_off()
            continue
        label, v = data[idx]
        ax.hist(v, bins=bins, color="tab:blue", edgecolor="white", linewidth=0.5)
        ax.set_xlim(0.0, 1.0)
        if v.size:  # statistics in the title, where they cannot cover a bar
            stats = f"n = {v.size}, mean {v.mean():.3f}, median {np.median(v):.3f}"
            ax.axvline(float(np.median(v)), color="tab:red", lw=1.0, ls="--")
        else:
            stats = "n = 0"
        ax.set_title(textwrap.fill(label, 48) + "\n" + stats, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        r, c = divmod(idx, ncols)
        if c == 0:
            ax.set_ylabel("items")
        if r == nrows - 1 or idx + ncols >= n:
            ax.set_xlabel(xlabel, fontsize=9)
            ax.tick_params(labelbottom=True)
    fig.suptitle(title)
    return _png(fig)


def pair_scatter_png(cos_a: np.ndarray, cos_b: np.ndarray, model_a: np.ndarray, model_b: np.ndarray,
                     names: tuple[str, str]) -> bytes:
    """PNG of two scatter plots of the same item pairs under two solutions: cosine (left), model score (right).

    Left: ``cos(b_i, b_j)`` under solution ``names[0]`` (x) against ``names[1]`` (y); right: the model
    score ``a_i . b_j`` under the same two. Both panels have equal x and y ranges and the diagonal
    y = x; their titles give the Pearson correlation and the mean and largest ``|y - x|``. For two
    equally good solutions of Eq. 1 the model scores lie on the diagonal, the cosines do not.

    Parameters
    ----------
    cos_a, cos_b, model_a, model_b : (n,) arrays
        Per pair: cosine and model score under each solution (:func:`pair_cosine`, :func:`pair_model`).
    names : (str, str)
        Labels of the two solutions, e.g. ``("eq1 / symmetric", "eq1 / eq2_like")``.

    Returns
    -------
    bytes of a PNG.
    """
    series = [np.asarray(x, np.float64).ravel() for x in (cos_a, cos_b, model_a, model_b)]
    n = series[0].size
    if n == 0 or any(x.size != n for x in series):
        raise MfsimError(f"expected four arrays of the same non-zero length (one value per pair), got lengths "
                         f"{[x.size for x in series]}")
    if not all(np.all(np.isfinite(x)) for x in series):
        raise MfsimError("pair scores contain NaN or inf; check the factors")
    fig = Figure(figsize=(10.0, 4.9), layout="constrained")
    axes = fig.subplots(1, 2)
    size = 4 if n <= 2000 else 2
    for ax, (x, y), what in zip(axes, ((series[0], series[1]), (series[2], series[3])),
                                ("cosine $\\cos(b_i, b_j)$", "model score $a_i \\cdot b_j = (AB^T)_{ij}$")):
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        pad = 0.04 * (hi - lo) if hi > lo else 1.0
        lo, hi = lo - pad, hi + pad
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls="--", zorder=1)
        ax.scatter(x, y, s=size, alpha=0.35, color="tab:blue", linewidths=0, rasterized=True, zorder=2)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        gap = np.abs(y - x)
        r = float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else float("nan")
        ax.set_title(f"{what}\nr = {r:.3f}, mean |diff| {gap.mean():.3g}, max {gap.max():.3g}", fontsize=10)
        ax.set_xlabel(f"under {names[0]}", fontsize=9)
        ax.set_ylabel(f"under {names[1]}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"{n} random item pairs under two equally good solutions")
    return _png(fig)


def displacement_png(panels: Mapping[str, np.ndarray], n: int, title: str) -> bytes:
    """PNG of bar charts of rank displacement (:func:`rank_displacement`), one panel per label.

    Each bar is the share of list entries whose ``|rank_b - rank_a|`` falls in a bin of
    :func:`displacement_bins`; the last (red) bar is the share that left the top n. Panels share
    the y axis (0 to 1); titles give how many entries kept their rank exactly and how many left.

    Parameters
    ----------
    panels : dict label -> (q, n) array
        Displacements per list entry (+inf: left the list; NaN: no entry).
    n : int
        List length.
    title : str
        Figure title.
    """
    items = list(panels.items())
    if not items:
        raise MfsimError("displacement_png needs at least one labelled array of displacements, got none")
    fig = Figure(figsize=(5.2 * len(items) + 0.4, 4.0), layout="constrained")
    axes = fig.subplots(1, len(items), squeeze=False, sharey=True)[0]
    for ax, (label, disp) in zip(axes, items):
        labels, counts = displacement_counts(disp, n)
        total = int(counts.sum())
        share = counts / total if total else counts.astype(np.float64)
        colors = ["tab:blue"] * (len(labels) - 1) + ["tab:red"]
        x = np.arange(len(labels))
        ax.bar(x, share, color=colors, edgecolor="white", linewidth=0.5)
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0.0, 1.0)
        ax.set_xlabel("|rank change| of an item of the list", fontsize=9)
        stay = share[0] if total else 0.0
        ax.set_title(f"{textwrap.fill(label, 56)}\n{total} entries: {stay:.0%} same rank, {share[-1]:.0%} left",
                     fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("share of list entries")
    fig.suptitle(title)
    return _png(fig)


def lambda_sweep_png(table: pa.Table, metric: str) -> bytes:
    """PNG of the held-out ``metric`` against lambda (log axis), one panel per objective, chosen lambda marked.

    Parameters
    ----------
    table : pyarrow.Table
        The lambda sweep (:func:`sweep_series`): ``objective``, ``lambda``, ``chosen``, and the
        metric column.
    metric : str
        E.g. ``"ndcg@20"`` (``evaluation.select_metric``).

    Returns
    -------
    bytes of a PNG. Lambdas <= 0 cannot sit on a log axis; the panel's title says how many were
    left out.
    """
    series = sweep_series(table, metric)
    if not series:
        raise MfsimError("the lambda sweep table has no rows; nothing to draw")
    n = len(series)
    fig = Figure(figsize=(4.6 * n + 0.5, 3.8), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False, sharey=True)[0]
    for ax, (obj, (lam, val, chosen)) in zip(axes, series.items()):
        pos = lam > 0
        ax.plot(lam[pos], val[pos], color="tab:blue", marker="o", ms=4, lw=1.2)
        if np.any(pos):
            ax.set_xscale("log")
        title = obj
        if np.any(~pos):
            title += f" ({int(np.sum(~pos))} lambda <= 0 not drawn)"
        for c in chosen:
            if c > 0:
                v = val[np.flatnonzero(lam == c)[0]]
                ax.axvline(c, color="tab:red", lw=0.9, ls=":")
                ax.plot([c], [v], marker="*", ms=14, color="tab:red", zorder=3,
                        label=f"chosen: lambda = {c:.4g}, {metric} = {v:.4f}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("lambda (log scale)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        if np.any(chosen > 0):
            ax.legend(loc="best", fontsize=8, framealpha=0.9)
    axes[0].set_ylabel(f"held-out {metric}")
    fig.suptitle(f"Held-out {metric} of each lambda tried")
    return _png(fig)


# --------------------------------------------------------------------------------------------
# The page


def render_report(
    *,
    title: str,
    summary_lines: Sequence[str],
    tables: Mapping[str, pa.Table | Sequence[Mapping[str, Any]]],
    images: Mapping[str, bytes],
    captions: Mapping[str, str] | None = None,
    max_table_rows: int = 1000,
    headline: str | None = None,
    skipped: Mapping[str, str] | None = None,
    run_info: Mapping[str, pa.Table | Sequence[Mapping[str, Any]]] | None = None,
    config: Mapping[str, Any] | None = None,
) -> bytes:
    """A self-contained HTML report, as UTF-8 bytes: one file, nothing beside it needed.

    The page has, in this order: the title; the headline in a box; the summary lines as a list;
    what was skipped and why; each image (numbered figures, with their captions); each table (in
    the given order); the run's own tables (input, configuration, versions, timings) and the full
    configuration, folded (``<details>``). All text is escaped with ``html.escape``; floats
    are shown with 4 significant digits. Styling is inline CSS; there are no scripts and no
    external resources: each image is inline, a ``data:image/png;base64`` URI, so the page can
    be mailed or opened from an object store on its own.

    Parameters
    ----------
    title : str
        Page heading and ``<title>``.
    summary_lines : list of str
        One bullet each.
    tables : dict of name -> pyarrow.Table or list of dict rows
        For row dicts, the columns are the union of the keys in first-seen order (missing cells
        are empty). Tables longer than ``max_table_rows`` show their first rows and say so.
    images : dict of name -> PNG bytes
        Name: letters, digits, ``_ . -`` (``.png`` optional); it is the figure's label.
    captions : dict of name -> str, optional
        Caption of the image or table of that name (image names with or without ``.png``).
    max_table_rows : int, default 1000
        Rows shown per table.
    headline : str, optional
        The finding in one sentence (:func:`headline`), boxed at the top.
    skipped : dict of what -> why, optional
        Parts of the run or the report that were left out, and the reason (``"cluster precision":
        "no item truth"``).
    run_info : dict of name -> table, optional
        Tables about the run itself, shown last under "Run".
    config : dict, optional
        The resolved configuration (nested), shown flattened (:func:`flatten_config`) and folded.

    Returns
    -------
    bytes: the HTML page (UTF-8).
    """
    captions = dict(captions or {})
    if int(max_table_rows) < 1:
        raise MfsimError(f"max_table_rows must be >= 1, got {max_table_rows}")
    files: dict[str, bytes] = {}
    img_entries: list[tuple[str, str]] = []  # (file name, key as given)
    for key, data in images.items():
        fname = str(key) if str(key).endswith(".png") else f"{key}.png"
        if not _SAFE_NAME.match(fname):
            raise MfsimError(
                f"image name {key!r} is not a plain file name; use letters, digits, '_', '.', '-'"
            )
        if fname in files:
            raise MfsimError(f"two images map to the file {fname!r}; give them distinct names")
        if not isinstance(data, (bytes, bytearray)) or not bytes(data).startswith(PNG_MAGIC):
            raise MfsimError(f"image {key!r} is not PNG bytes; pass the output of the *_png functions")
        files[fname] = bytes(data)
        img_entries.append((fname, str(key)))

    def caption_of(*names: str) -> str | None:
        for nm in names:
            if nm in captions:
                return captions[nm]
        return None

    run_info = dict(run_info or {})
    known = {k for f, k in img_entries} | {f for f, _ in img_entries} | {str(t) for t in tables} \
        | {str(t) for t in run_info}
    unknown = sorted(set(map(str, captions)) - known)
    if unknown:
        raise MfsimError(f"captions for unknown images or tables: {unknown}; valid names: {sorted(known)}")

    esc = html.escape
    rows = int(max_table_rows)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(str(title))}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(str(title))}</h1>",
    ]
    if headline:
        parts.append(f'<p class="headline">{esc(str(headline))}</p>')
    if summary_lines:
        parts.append('<ul class="summary">')
        parts.extend(f"<li>{esc(str(line))}</li>" for line in summary_lines if line)
        parts.append("</ul>")
    if skipped:
        parts.append('<section id="skipped">')
        parts.append('<p class="skipped">Not in this report:</p>')
        parts.append('<ul class="skipped">')
        parts.extend(f"<li><b>{esc(str(what))}</b>: {esc(str(why))}</li>" for what, why in skipped.items())
        parts.append("</ul>")
        parts.append("</section>")
    if img_entries:
        parts.append('<section id="figures">')
        parts.append("<h2>Figures</h2>")
        for number, (fname, key) in enumerate(img_entries, start=1):
            cap = caption_of(key, fname)
            alt = cap if cap is not None else key
            parts.append(f'<figure id="{esc(fname[:-4])}">')
            data_uri = "data:image/png;base64," + base64.b64encode(files[fname]).decode("ascii")
            parts.append(f'<img src="{data_uri}" alt="{esc(str(alt))}">')
            text = f" {esc(str(cap))}" if cap is not None else ""
            parts.append(f"<figcaption><b>Figure {number}</b> ({esc(fname)}).{text}</figcaption>")
            parts.append("</figure>")
        parts.append("</section>")

    def table_section(sid: str, name: str, table, level: str) -> None:
        parts.append(f'<section id="{sid}">')
        parts.append(f"<{level}>{esc(str(name))}</{level}>")
        cap = caption_of(str(name))
        if cap is not None:
            parts.append(f'<p class="caption">{esc(str(cap))}</p>')
        parts.append(_table_html(table, rows, str(name)))
        parts.append("</section>")

    for i, (name, table) in enumerate(tables.items()):
        table_section(f"table-{i}", name, table, "h2")
    if run_info or config:
        parts.append('<section id="run">')
        parts.append("<h2>Run</h2>")
        parts.append('<div class="runinfo">')
        for i, (name, table) in enumerate(run_info.items()):
            table_section(f"run-{i}", name, table, "h3")
        parts.append("</div>")
        if config:
            flat = flatten_config(config)
            parts.append(f"<details><summary>Resolved configuration: all {len(flat)} keys</summary>")
            parts.append(_table_html([{"key": k, "value": "null" if v is None else v} for k, v in flat.items()],
                                     max(rows, len(flat)),
                                     "configuration"))
            parts.append("</details>")
        parts.append("</section>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts).encode("utf-8")


_CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;"
    "margin:1.5em auto;max-width:1500px;padding:0 1em;color:#222;line-height:1.4}"
    "h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:.2em}"
    "h2{font-size:1.2em;margin-top:1.6em}"
    "ul.summary li{margin:.15em 0}"
    "table{border-collapse:collapse;font-size:.85em;margin:.4em 0 1em}"
    "th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}"
    "th{background:#f2f2f2}"
    "td.num{text-align:right;font-variant-numeric:tabular-nums}"
    "tr:nth-child(even) td{background:#fafafa}"
    "figure{margin:1em 0 2em}"
    "img{max-width:100%;height:auto;border:1px solid #eee}"
    "figcaption,p.caption,p.note{color:#555;font-size:.9em}"
    "p.headline{font-size:1.15em;background:#fff6e5;border:1px solid #e0b050;border-left:6px solid #d08000;"
    "padding:.6em 1em;margin:.8em 0 1em}"
    "p.skipped{margin:.6em 0 .1em;color:#555}ul.skipped{color:#555;margin-top:0}ul.skipped li{margin:.15em 0}"
    "div.table{overflow-x:auto;max-width:100%}"
    "div.runinfo{display:flex;flex-wrap:wrap;gap:0 2.5em;align-items:flex-start}"
    "details{margin:.5em 0 2em}summary{cursor:pointer;color:#335}"
)


# --------------------------------------------------------------------------------------------
# Helpers


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)  # attaches an Agg canvas: no pyplot, no global backend
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})  # no version stamp
    return buf.getvalue()


def _draw_heatmap(ax, C: np.ndarray, title: str, boundaries: np.ndarray, axis_label: str | None,
                  vmin: float = -1.0, vmax: float = 1.0, cmap: str = HEATMAP_CMAP):
    m = C.shape[0]
    im = ax.imshow(C, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="antialiased",
                   origin="upper", extent=(-0.5, m - 0.5, m - 0.5, -0.5))
    for b in boundaries:  # line between positions b-1 and b
        ax.axhline(b - 0.5, color="k", lw=0.6, alpha=0.8)
        ax.axvline(b - 0.5, color="k", lw=0.6, alpha=0.8)
    ax.set_title(textwrap.fill(title, 40), fontsize=10)
    if axis_label:
        ax.set_xlabel(axis_label, fontsize=9)
        ax.set_ylabel(axis_label, fontsize=9)
    ax.tick_params(labelsize=8)
    return im


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


def _check_boundaries(boundaries, m: int) -> np.ndarray:
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


def _check_sigma(sigma) -> np.ndarray:
    s = np.asarray(sigma, dtype=np.float64)
    if s.ndim != 1:
        raise MfsimError(f"expected singular values of shape (k,), got shape {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise MfsimError("singular values must be finite and >= 0; check the SVD")
    return s


def _check_lambdas(lambdas: Mapping[str, float]) -> dict[str, float]:
    out = {}
    for key, lam in lambdas.items():
        if key not in LAMBDA_KEYS:
            raise MfsimError(f"unknown objective {key!r} in lambdas; valid: {', '.join(LAMBDA_KEYS)}")
        lam = float(lam)
        if not math.isfinite(lam) or lam < 0:
            raise MfsimError(f"lambda of {key} must be a finite number >= 0, got {lam!r}; set objectives.{key}.lambda")
        out[key] = lam
    return out


def _fmt(v: Any) -> tuple[str, bool]:
    """(text, is_number) of one table cell; floats with 4 significant digits."""
    if v is None:
        return "", False
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v)).lower(), False
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}", True
    if isinstance(v, (int, np.integer)):
        return str(int(v)), True
    if isinstance(v, (list, tuple, np.ndarray)):
        return "[" + ", ".join(_fmt(x)[0] for x in v) + "]", False
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)[0]}" for k, x in v.items()) + "}", False
    if isinstance(v, bytes):
        return v.hex(), False
    return str(v), False


def _table_html(table, max_rows: int, name: str) -> str:
    if isinstance(table, pa.Table):
        columns = list(table.column_names)
        n_total = table.num_rows
        rows = table.slice(0, max_rows).to_pylist()
    elif isinstance(table, Sequence) and not isinstance(table, (str, bytes)):
        columns = []
        seen = set()
        for row in table:
            if not isinstance(row, Mapping):
                raise MfsimError(
                    f"table {name!r} must be a pyarrow.Table or a list of dict rows, got a row of type "
                    f"{type(row).__name__}"
                )
            for k in row:
                if k not in seen:
                    seen.add(k)
                    columns.append(k)
        n_total = len(table)
        rows = list(table[:max_rows])
    else:
        raise MfsimError(f"table {name!r} must be a pyarrow.Table or a list of dict rows, got {type(table).__name__}")
    esc = html.escape
    out = ['<div class="table"><table>', "<thead><tr>" + "".join(f"<th>{esc(str(c))}</th>" for c in columns) + "</tr></thead>", "<tbody>"]
    for row in rows:
        cells = []
        for c in columns:
            text, num = _fmt(row.get(c))
            cls = ' class="num"' if num else ""
            cells.append(f"<td{cls}>{esc(text)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    if n_total > len(rows):
        out.append(f'<p class="note">First {len(rows)} of {n_total} rows.</p>')
    if n_total == 0:
        out.append('<p class="note">No rows.</p>')
    return "\n".join(out)
