"""The simulated interaction data of the paper's Section 4, and its Parquet writer.

Steck, Ekanadham & Kallus (2024), Section 4, generate a binary user-item matrix X (n users x
p items) in which items fall into C clusters. The generative process, and the choices this
module makes where the paper leaves them open:

1. **Clusters.** Each item is assigned to cluster c independently with probability p_c
   (``simulate.cluster_probs``; default: uniform, p_c = 1/C). Clusters may come out empty on
   small catalogues; they then simply contribute no items.
2. **Item popularity.** Each cluster draws a power-law exponent beta_c ~ U(item_beta_low,
   item_beta_high) (paper: U(0.25, 1.5)). The items of cluster c get a uniformly random rank
   r_i = 1..n_c within their cluster and baseline popularity
   ``p_i = r_i^(-beta_c) / sum_{j=1..n_c} j^(-beta_c)``, a Zipf law *normalised within the
   cluster*: ``sum_{i in c} p_i = 1`` for every non-empty cluster. This is
   ``Simulation.item_popularity``.
3. **User preferences.** Each user draws cluster preferences p_u ~ Dirichlet(alpha * 1_C)
   (alpha = ``user_pref_concentration``; alpha = 1 is uniform on the simplex). Entries that
   underflow to 0 (alpha << 1) are raised to the smallest normal float, so every item keeps a
   positive probability and any k_u <= p can be drawn.
4. **User-item probabilities** ``p_ui = p_uc(cluster(i)) * p_i / Z_u`` (paper: "p_ui ∝ p_uc p_i").
   Because p_i sums to 1 in each cluster, Z_u = sum of p_uc over non-empty clusters (= 1 when
   none is empty): a user first picks a cluster with probability p_uc, then an item with p_i.
5. **Items per user.** The paper draws k_u from "a power law with beta_user = 0.5". Here users
   get a uniformly random activity rank r_u = 1..n and
   ``k_u = clip(ceil(k_max * r_u^(-beta_user)), min_items_per_user, k_max)`` with
   k_max = ``max_items_per_user`` (default: p, the whole catalogue). The rank-frequency form
   mirrors step 2; for beta_user = 0.5 the implied tail is P(k_u >= k) ∝ k^-2. With the
   default, the mean k_u is about 2 p / sqrt(n) (14 for the paper's 20,000 x 1,000).
6. **Interactions.** User u's k_u items are drawn *without replacement* from p_ui (successive
   draws proportional to p_ui among the items not yet drawn). See
   :func:`sample_without_replacement` for the exact, vectorised algorithm.
7. **Days.** Each interaction gets a day offset uniform on [0, n_days); the writer adds a
   uniform millisecond within that day. Neither is in the paper (X is binary and timeless);
   they exist so that the simulated log looks like a real one to ingest.

Randomness comes from one ``numpy.random.SeedSequence(seed)`` split into independent streams
(items, users, sampling, days, timestamps), so the output is a pure function of the
configuration; the chunking of the sampler is a function of (n, p, k) only, never of the
machine.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from mfsim.pipeline.config import SimulateSection
from mfsim.pipeline.errors import MfsimError

ITEMS_TRUTH = "items_truth.parquet"
METADATA = "_simulation.json"
SUCCESS = "_SUCCESS"
PART_NAME = "part-0.parquet"
MS_PER_DAY = 86_400_000

# Sampler tuning (see sample_without_replacement). A dense row costs about one exponential
# draw, a log and a partition step per item (measured ~10 ns); a sparse draw costs three
# uniforms, C - 1 comparisons, an alias lookup and a share of a sort (measured ~65 ns, ~100 ns
# per accepted item). A user therefore goes dense once its with-replacement draws would
# exceed p / 8, where both methods cost about the same.
DRAW_BUDGET_FRACTION = 1 / 8
SPARSE_CHUNK_ITEMS = 1 << 16  # sum of k_u per sparse chunk: ~ 2^16 * 1.5 draws * ~60 B = 6 MB
# (small enough that the round buffers are reused from the heap instead of freshly mapped)
DENSE_CHUNK_BYTES = 1 << 26  # one float64 key block of users x p: 64 MB
CLUSTER_SCAN_MAX = 16  # up to this many clusters, C-1 vector comparisons beat a binary search
FIRST_ROUND_OVERSAMPLE = 1.5  # draws per still-missing item in the first round
MAX_OVERSAMPLE = 16.0  # cap on the adaptive oversampling of later rounds


@dataclass(frozen=True, eq=False)
class Simulation:
    """A simulated interaction log and the ground truth that generated it.

    Attributes
    ----------
    user, item : ndarray of int64, shape (nnz,)
        The interactions, sorted by (user, item), without duplicates. Users are 0..n-1 and
        all present; items are 0..p-1 (an item nobody drew is absent).
    day : ndarray of int32, shape (nnz,)
        Day offset of each interaction in [0, n_days).
    item_cluster : ndarray of int32, shape (p,)
        Cluster of each item.
    item_popularity : ndarray of float64, shape (p,)
        Baseline popularity p_i, a Zipf law in the item's random within-cluster rank,
        normalised to sum to 1 within each cluster (so it sums to the number of non-empty
        clusters overall).
    cluster_probs : ndarray of float64, shape (C,)
        The cluster assignment probabilities p_c used (normalised).
    cluster_betas : ndarray of float64, shape (C,)
        The power-law exponent beta_c of each cluster.
    user_cluster_prefs : ndarray of float64, shape (n, C)
        Each user's cluster preferences p_uc (rows sum to 1 up to the underflow floor).
    n_users, n_items : int
        n and p, the shape of X.
    """

    user: np.ndarray
    item: np.ndarray
    day: np.ndarray
    item_cluster: np.ndarray
    item_popularity: np.ndarray
    cluster_probs: np.ndarray
    cluster_betas: np.ndarray
    user_cluster_prefs: np.ndarray
    n_users: int
    n_items: int


# ---------------------------------------------------------------------------------------------
# the generative model


def _streams(seed: int) -> dict[str, np.random.SeedSequence]:
    if seed < 0:
        raise MfsimError(f"simulate.seed must be a non-negative integer, got {seed}; pass e.g. --set simulate.seed=0")
    names = ("items", "users", "sample", "days", "times")
    return dict(zip(names, np.random.SeedSequence(seed).spawn(len(names))))


def items_per_user(n_users: int, k_max: int, k_min: int, beta: float, rng: np.random.Generator) -> np.ndarray:
    """Draw k_u = clip(ceil(k_max * r_u^-beta), k_min, k_max) over a random user rank r_u.

    Parameters
    ----------
    n_users : int
        n.
    k_max, k_min : int
        Largest and smallest number of items per user; the rank-1 user gets k_max.
    beta : float
        Power-law exponent beta_user (paper: 0.5).
    rng : numpy.random.Generator
        Draws the random permutation of ranks 1..n.

    Returns
    -------
    k : ndarray of int64, shape (n,)
        The multiset of values is fixed by (n, k_max, k_min, beta); only its order is random.

    Notes
    -----
    O(n) time and memory.
    """
    rank = rng.permutation(n_users).astype(np.float64) + 1.0
    k = np.ceil(k_max * rank ** (-beta))  # k_u = ceil(k_max r_u^-beta)
    return np.clip(k, k_min, k_max).astype(np.int64)


def item_structure(
    n_items: int, cluster_probs: np.ndarray, beta_low: float, beta_high: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Assign items to clusters and give them power-law popularities (steps 1-2 above).

    Returns
    -------
    item_cluster : ndarray of int32, shape (p,)
    cluster_betas : ndarray of float64, shape (C,)
        beta_c ~ U(beta_low, beta_high).
    log_popularity : ndarray of float64, shape (p,)
        log p_i = -beta_c log r_i - log sum_{j<=n_c} j^-beta_c, computed in logs so that large
        exponents cannot underflow the sampler (the float64 ``exp`` of it may).

    Notes
    -----
    O(p log p) time (one stable sort), O(p) memory.
    """
    n_clusters = len(cluster_probs)
    item_cluster = rng.choice(n_clusters, size=n_items, p=cluster_probs).astype(np.int32)
    betas = rng.uniform(beta_low, beta_high, size=n_clusters)
    # a random order, then grouped by cluster: position within the group is a random rank
    perm = rng.permutation(n_items)
    grouped = perm[np.argsort(item_cluster[perm], kind="stable")]
    counts = np.bincount(item_cluster, minlength=n_clusters)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.arange(n_items) - np.repeat(starts, counts) + 1
    log_w = -betas[item_cluster[grouped]] * np.log(rank)  # log r^-beta_c
    nonempty = counts > 0
    # log-sum-exp per cluster (the maximum is at rank 1 for beta >= 0, anywhere otherwise)
    peak = np.maximum.reduceat(log_w, starts[nonempty]) if n_items else np.zeros(0)
    peak_full = np.zeros(n_clusters)
    peak_full[nonempty] = peak
    sums = np.add.reduceat(np.exp(log_w - np.repeat(peak_full, counts)), starts[nonempty])
    log_z = np.zeros(n_clusters)
    log_z[nonempty] = np.log(sums) + peak
    log_pop = np.empty(n_items)
    log_pop[grouped] = log_w - np.repeat(log_z, counts)
    return item_cluster, betas, log_pop


def simulate(cfg: SimulateSection) -> Simulation:
    """Simulate the paper's Section 4 data set (see the module docstring for the model).

    Parameters
    ----------
    cfg : SimulateSection
        n_users, n_items, n_clusters, cluster_probs (None: uniform), item_beta_low/high,
        user_beta, min_items_per_user, max_items_per_user (None: n_items),
        user_pref_concentration, n_days, seed. start_date is used by :func:`write_simulation`.

    Returns
    -------
    Simulation
        Rows sorted by (user, item); every user has between min_items_per_user and
        max_items_per_user distinct items.

    Raises
    ------
    MfsimError
        If max_items_per_user exceeds n_items, min_items_per_user exceeds the effective
        maximum, or the seed is negative.

    Notes
    -----
    Deterministic in ``cfg``. Time O(nnz log nnz + n C + p log p) plus the sampler's cost (see
    :func:`sample_without_replacement`); memory O(nnz + n C + p) plus bounded chunk buffers
    (about 200 MB). Measured on one core: 0.1 s for the paper's 20,000 x 1,000 (2.9 x 10^5
    interactions); 30-47 s and 5.6 GB peak memory for 10^6 users x 10^5 items with the default
    k_max = p (2.0 x 10^8 interactions, 4 GB of which are the returned arrays).
    """
    n, p, n_clusters = cfg.n_users, cfg.n_items, cfg.n_clusters
    k_max = p if cfg.max_items_per_user is None else cfg.max_items_per_user
    k_min = cfg.min_items_per_user
    if k_max > p:
        raise MfsimError(
            f"simulate.max_items_per_user={k_max} exceeds simulate.n_items={p}: a user cannot interact with more "
            "distinct items than exist; lower max_items_per_user or raise n_items"
        )
    if k_min > k_max:
        raise MfsimError(
            f"simulate.min_items_per_user={k_min} exceeds the largest number of items per user ({k_max}); "
            "lower min_items_per_user or raise max_items_per_user / n_items"
        )
    if float(n) * float(p) >= 2.0**62:
        raise MfsimError(f"n_users x n_items = {n} x {p} is too large (user*p+item must fit in int64); shrink one")
    streams = _streams(cfg.seed)

    if cfg.cluster_probs is None:
        probs = np.full(n_clusters, 1.0 / n_clusters)
    else:
        probs = np.asarray(cfg.cluster_probs, dtype=np.float64)
        probs = probs / probs.sum()
    rng_items = np.random.default_rng(streams["items"])
    item_cluster, betas, log_pop = item_structure(p, probs, cfg.item_beta_low, cfg.item_beta_high, rng_items)

    rng_users = np.random.default_rng(streams["users"])
    prefs = rng_users.dirichlet(np.full(n_clusters, cfg.user_pref_concentration), size=n)
    np.maximum(prefs, np.finfo(np.float64).tiny, out=prefs)  # keep every p_ui > 0 (see step 3)
    k = items_per_user(n, k_max, k_min, cfg.user_beta, rng_users)

    user, item = sample_without_replacement(np.log(prefs), item_cluster, log_pop, k, streams["sample"])
    day = np.random.default_rng(streams["days"]).integers(0, cfg.n_days, size=len(user), dtype=np.int32)
    return Simulation(
        user=user,
        item=item,
        day=day,
        item_cluster=item_cluster,
        item_popularity=np.exp(log_pop),
        cluster_probs=probs,
        cluster_betas=betas,
        user_cluster_prefs=prefs,
        n_users=n,
        n_items=p,
    )


# ---------------------------------------------------------------------------------------------
# weighted sampling without replacement, vectorised over users


@dataclass(frozen=True)
class _Items:
    """Items laid out grouped by cluster: cluster c occupies positions offsets[c]:offsets[c+1]."""

    order: np.ndarray  # (p,) item id at each grouped position
    offsets: np.ndarray  # (C+1,)
    log_pop: np.ndarray  # (p,) log weight at each grouped position
    accept: np.ndarray  # (p,) alias-table acceptance probability of each position
    alias: np.ndarray  # (p,) alias position (same cluster) used when not accepted
    log_mass: np.ndarray  # (C,) log of the total weight of each cluster, -inf if empty
    last_nonempty: int


def alias_table(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker's alias table (Vose's construction) for sampling an index with probability ∝ w.

    Draw i uniform on 0..m-1 and U uniform on [0, 1): the sample is i if U < accept[i], else
    alias[i]. O(m) time and memory (a Python loop over m, about 0.3 us per entry).

    Parameters
    ----------
    weights : ndarray of float64, shape (m,)
        Non-negative, positive sum.

    Returns
    -------
    accept : ndarray of float64, shape (m,)
    alias : ndarray of int64, shape (m,)
    """
    m = len(weights)
    scaled = weights * (m / weights.sum())  # mean 1
    accept = scaled.tolist()
    alias = list(range(m))
    small = [i for i in range(m) if accept[i] < 1.0]
    large = [i for i in range(m) if accept[i] >= 1.0]
    while small and large:
        s, g = small.pop(), large[-1]
        alias[s] = g  # column s: s with accept[s], the rest of its unit mass goes to g
        accept[g] -= 1.0 - accept[s]
        if accept[g] < 1.0:
            small.append(large.pop())
    for i in small + large:  # left over only through rounding: they fill their column
        accept[i] = 1.0
    return np.asarray(accept), np.asarray(alias, dtype=np.int64)


def _group_items(item_cluster: np.ndarray, log_pop: np.ndarray, n_clusters: int) -> _Items:
    order = np.argsort(item_cluster, kind="stable")
    counts = np.bincount(item_cluster, minlength=n_clusters)
    offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    lp = log_pop[order]
    accept = np.empty(len(order))
    alias = np.empty(len(order), np.int64)
    log_mass = np.full(n_clusters, -np.inf)
    for c in np.flatnonzero(counts):  # C iterations
        lo, hi = offsets[c], offsets[c + 1]
        top = lp[lo:hi].max()
        w = np.exp(lp[lo:hi] - top)
        log_mass[c] = top + np.log(w.sum())
        accept[lo:hi], a = alias_table(w)
        alias[lo:hi] = a + lo
    return _Items(order, offsets, lp, accept, alias, log_mass, int(np.flatnonzero(counts)[-1]))


def sample_without_replacement(
    log_pref: np.ndarray,
    item_cluster: np.ndarray,
    log_pop: np.ndarray,
    k: np.ndarray,
    seed: np.random.SeedSequence | int,
    *,
    draw_budget: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """For every user u, draw k_u distinct items with weights w_ui = p_uc(cluster(i)) * p_i.

    "Without replacement" means successive draws, each proportional to w_ui among the items
    not drawn yet (the paper's Section 4 sampling of k_u items from p_ui).

    Parameters
    ----------
    log_pref : ndarray of float64, shape (n, C)
        log p_uc; must be finite.
    item_cluster : ndarray of int, shape (p,)
        Cluster of each item, in [0, C).
    log_pop : ndarray of float64, shape (p,)
        log p_i; must be finite. Need not be normalised within clusters.
    k : ndarray of int, shape (n,)
        Items per user, 0 <= k_u <= p.
    seed : SeedSequence or int
        Root of the sampler's random streams.
    draw_budget : int, optional
        With-replacement draws allowed per user before it switches to the dense method
        (default ``max(1, ceil(p / 8))``). Users with k_u >= draw_budget go dense at once.
        Exposed so that tests can force either method; it changes the random numbers but not
        the distribution.

    Returns
    -------
    user, item : ndarray of int64, shape (sum k,)
        The pairs, sorted by (user, item).

    Notes
    -----
    Two exact methods, chosen per user by cost:

    * **Sparse** (most users): draw items *with* replacement (a cluster c by inverse CDF of
      p_uc * sum_{i in c} p_i, then an item of c from Walker's alias table of p_i) and keep
      the first k_u distinct ones in order of first appearance. The sequence of first
      appearances of an i.i.d. sequence is exactly a weighted draw without replacement: given
      the items seen so far, the next new item is proportional to w among the unseen. Draws
      come in rounds (the first asks for 1.5 draws per missing item, later ones scale by the observed
      draws per distinct item, at most 16x); duplicates are removed with one integer sort of
      ``(user, item, draw index)`` keys per round.
    * **Dense** (users with k_u >= budget, and users still short after ``budget`` draws): the
      Efraimidis-Spirakis keys log(E_i) - log w_ui with E_i ~ Exp(1) over all p items; the k
      smallest keys are a weighted sample without replacement. A user that falls back keeps
      the items it already has and draws the missing ones from the remaining items, which is
      exact because the next new items are independent of how many repeats preceded the first
      ones. Rows are processed in blocks of about 64 MB.

    Cost: sparse O(draws log draws), about 1.5 sum k draws for typical weights; dense O(p) per
    dense user with O(rows x p) working memory per block. Memory is O(sum k) for the output
    plus about 200 MB of buffers; no n x p array is formed.

    References
    ----------
    Efraimidis & Spirakis (2006), "Weighted random sampling with a reservoir", IPL 97(5).
    """
    n, n_clusters = log_pref.shape
    p = len(item_cluster)
    k = np.asarray(k, dtype=np.int64)
    if len(k) != n or len(log_pop) != p:
        raise ValueError(
            f"shapes disagree: log_pref {log_pref.shape}, k {k.shape}, item_cluster ({p},), log_pop ({len(log_pop)},)"
        )
    if n == 0 or k.sum() == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if k.min() < 0 or k.max() > p:
        raise ValueError(f"k must lie in [0, {p}], got [{k.min()}, {k.max()}]")
    items = _group_items(np.asarray(item_cluster), np.asarray(log_pop, dtype=np.float64), n_clusters)
    budget = max(1, int(np.ceil(p * DRAW_BUDGET_FRACTION))) if draw_budget is None else int(draw_budget)
    seed = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    sparse_seed, dense_seed = seed.spawn(2)

    sparse_users = np.flatnonzero((k > 0) & (k < budget))
    # chunks by sum of k (deterministic in k); users*p*2^bits must stay below 2^63 in the keys
    max_users = max(1, (1 << 36) // p)
    bounds = _chunk_bounds(k[sparse_users], SPARSE_CHUNK_ITEMS, max_users)
    chunk_seeds = sparse_seed.spawn(len(bounds) - 1)
    keys, short_u, short_j, short_need = [], [], [], []  # keys: user * p + item
    for ci in range(len(bounds) - 1):
        users = sparse_users[bounds[ci] : bounds[ci + 1]]
        b, j, need = _sparse_chunk(log_pref[users], k[users], items, budget, np.random.default_rng(chunk_seeds[ci]))
        keys.append(users[b] * p + items.order[j])
        short = need > 0
        if short.any():
            short_u.append(users[short])
            short_need.append(need[short])
            has = short[b]
            short_j.append((users[b[has]], j[has]))

    dense_users = np.flatnonzero(k >= budget)
    d_users = np.concatenate([dense_users] + short_u)
    d_need = np.concatenate([k[dense_users]] + short_need)
    if len(d_users):
        if short_j:
            ex_u = np.concatenate([s[0] for s in short_j])
            ex_j = np.concatenate([s[1] for s in short_j])
        else:
            ex_u = ex_j = np.zeros(0, np.int64)
        b, j = _dense(log_pref, d_users, d_need, ex_u, ex_j, items, np.random.default_rng(dense_seed))
        keys.append(b * p + items.order[j])

    key = np.concatenate(keys)
    del keys
    key.sort()
    user = key // p
    return user, np.remainder(key, p, out=key)


def _chunk_bounds(weights: np.ndarray, target: int, max_len: int) -> np.ndarray:
    """Split 0..len(weights) into consecutive chunks of total weight about ``target``."""
    if len(weights) == 0:
        return np.zeros(1, np.int64)
    cum = np.cumsum(weights)
    bounds = [0]
    while bounds[-1] < len(weights):
        start = bounds[-1]
        base = cum[start - 1] if start else 0
        end = int(np.searchsorted(cum, base + target, side="right"))
        bounds.append(min(max(end, start + 1), start + max_len, len(weights)))
    return np.asarray(bounds, np.int64)


def _sparse_chunk(
    log_pref: np.ndarray, k: np.ndarray, items: _Items, budget: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """With-replacement rounds for one chunk of users.

    Returns (local user, grouped item position) of the accepted items, in order of first
    appearance per user, and the number still missing per user (> 0 for users that ran out of
    budget; they continue in :func:`_dense`).
    """
    n_users, n_clusters = log_pref.shape
    p = len(items.order)
    # user b's cluster probabilities p_uc * (sum of p_i in c), cumulated; empty ones get zero width
    log_w = log_pref + items.log_mass
    w = np.exp(log_w - log_w.max(axis=1, keepdims=True))
    cum = np.cumsum(w, axis=1)
    cum /= cum[:, -1:]  # trailing entries exactly 1.0
    if n_clusters > CLUSTER_SCAN_MAX:  # one binary search in lanes b + cum[b]
        lanes = (np.arange(n_users)[:, None] + cum).ravel()
    else:  # C - 1 comparisons against columns
        cum_cols = np.ascontiguousarray(cum[:, :-1].T)
    sizes = np.diff(items.offsets)

    need = k.copy()
    drawn = np.zeros(n_users, np.int64)
    acc_b: list[np.ndarray] = []
    acc_j: list[np.ndarray] = []
    active = np.arange(n_users)
    first = True
    while len(active):
        if first:
            factor = FIRST_ROUND_OVERSAMPLE
        else:  # draws per distinct item so far, a little inflated
            have = k[active] - need[active]
            factor = np.minimum(FIRST_ROUND_OVERSAMPLE * drawn[active] / np.maximum(have, 1), MAX_OVERSAMPLE)
        m = np.minimum(np.ceil(need[active] * factor).astype(np.int64) + 4, budget - drawn[active])
        active = active[m > 0]
        m = m[m > 0]
        if not len(active):
            break
        bb = np.repeat(active, m)
        n_draws = len(bb)
        # cluster c with cum[b, c-1] <= U < cum[b, c] (inverse CDF of p_uc)
        u = rng.random(n_draws)
        if n_clusters > CLUSTER_SCAN_MAX:
            pos = np.searchsorted(lanes, bb + u, side="right")  # side="right" skips empty clusters
            c = np.minimum(pos - bb * n_clusters, items.last_nonempty)  # b + U may round up to b + 1
        else:
            c = np.zeros(n_draws, np.int64)
            for col in cum_cols:
                c += u >= col.take(bb)
        # item within the cluster from its alias table
        j = items.offsets[c] + np.minimum((rng.random(n_draws) * sizes[c]).astype(np.int64), sizes[c] - 1)
        j = np.where(rng.random(n_draws) < items.accept.take(j), j, items.alias.take(j))
        drawn[active] += m

        # keys (b, item, draw index + 1); earlier accepted items of active users get index 0
        bits = int(n_draws).bit_length()
        if (n_users * p) >> (62 - bits):
            raise ValueError(f"sampler keys overflow int64: {n_users} users x {p} items x 2^{bits} draws")
        key_new = ((bb * p + j) << bits) | np.arange(1, n_draws + 1)
        if acc_b:
            old_b = np.concatenate(acc_b)
            old_j = np.concatenate(acc_j)
            is_active = np.zeros(n_users, bool)
            is_active[active] = True
            keep = is_active[old_b]
            key_old = (old_b[keep] * p + old_j[keep]) << bits
            keys = np.concatenate((key_old, key_new))
        else:
            keys = key_new
        keys.sort()
        pair = keys >> bits
        firsts = np.ones(len(keys), bool)
        firsts[1:] = pair[1:] != pair[:-1]
        idx = keys[firsts] & ((1 << bits) - 1)
        idx = np.sort(idx[idx > 0]) - 1  # new distinct items, by draw order (grouped by user)
        nb, nj = bb[idx], j[idx]
        # keep the first need_b of them per user
        counts = np.bincount(nb, minlength=n_users)
        start = np.cumsum(counts) - counts
        rank = np.arange(len(nb)) - start[nb]
        ok = rank < need[nb]
        acc_b.append(nb[ok])
        acc_j.append(nj[ok])
        need -= np.bincount(nb[ok], minlength=n_users)
        active = active[need[active] > 0]
        first = False
    b = np.concatenate(acc_b) if acc_b else np.zeros(0, np.int64)
    j = np.concatenate(acc_j) if acc_j else np.zeros(0, np.int64)
    return b, j, need


def _dense(
    log_pref: np.ndarray,
    users: np.ndarray,
    need: np.ndarray,
    ex_user: np.ndarray,
    ex_pos: np.ndarray,
    items: _Items,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Efraimidis-Spirakis keys over all items for ``users``, excluding (ex_user, ex_pos).

    Returns (user, grouped item position) with need[i] pairs for users[i].
    """
    p = len(items.order)
    n_clusters = log_pref.shape[1]
    order = np.argsort(-need, kind="stable")  # similar needs share a block
    users, need = users[order], need[order]
    ex_order = np.argsort(ex_user, kind="stable")
    ex_user, ex_pos = ex_user[ex_order], ex_pos[ex_order]
    rows = max(1, DENSE_CHUNK_BYTES // (8 * p))
    out_u, out_j = [], []
    for s in range(0, len(users), rows):
        u, nd = users[s : s + rows], need[s : s + rows]
        keys = rng.standard_exponential((len(u), p))
        np.log(keys, out=keys)
        keys -= items.log_pop  # log E - log p_i - log p_uc: the k smallest are the sample
        lp = log_pref[u]
        for c in range(n_clusters):
            lo, hi = items.offsets[c], items.offsets[c + 1]
            if hi > lo:
                keys[:, lo:hi] -= lp[:, c : c + 1]
        # items a user already has (from its sparse rounds) are not drawn again
        lo = np.searchsorted(ex_user, u, side="left")
        hi = np.searchsorted(ex_user, u, side="right")
        if (hi > lo).any():
            cnt = hi - lo
            r = np.repeat(np.arange(len(u)), cnt)
            e = np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt - lo, cnt)  # lo[r] .. hi[r]-1
            keys[r, ex_pos[e]] = np.inf
        kmax = int(nd.max())
        if kmax < p:
            part = np.argpartition(keys, kmax - 1, axis=1)[:, :kmax]
        else:
            part = np.broadcast_to(np.arange(p), keys.shape)
        vals = np.take_along_axis(keys, part, axis=1)
        sel = np.take_along_axis(part, np.argsort(vals, axis=1, kind="stable"), axis=1)
        mask = np.arange(kmax) < nd[:, None]
        out_u.append(np.repeat(u, nd))
        out_j.append(sel[mask])
    return np.concatenate(out_u), np.concatenate(out_j)


# ---------------------------------------------------------------------------------------------
# writing


def event_timestamps(day: np.ndarray, cfg: SimulateSection) -> np.ndarray:
    """Timestamps (datetime64[ms]) uniform within each interaction's day.

    ``start_date + day`` at midnight plus a uniform millisecond of the day, from the seed's
    "times" stream. O(nnz) time and memory.
    """
    rng = np.random.default_rng(_streams(cfg.seed)["times"])
    ms = rng.integers(0, MS_PER_DAY, size=len(day), dtype=np.int64)
    start = np.datetime64(cfg.start_date, "ms").astype(np.int64)
    return (start + day.astype(np.int64) * MS_PER_DAY + ms).astype("datetime64[ms]")


def write_simulation(sim: Simulation, out_dir: str | Path, cfg: SimulateSection) -> dict[str, Any]:
    """Write the simulated log as hive-partitioned Parquet, plus the item ground truth.

    Layout of ``out_dir`` (created atomically: written into a hidden sibling, then renamed)::

        dt=YYYY-MM-DD/part-0.parquet   user_id int64, item_id int64, weight float32 (1.0),
                                       ts timestamp[ms] (no time zone; UTC wall clock)
        items_truth.parquet            item_id int64, cluster int32, popularity float64
        _simulation.json               the simulate config, cluster_probs, cluster_betas, counts
        _SUCCESS                       empty, written last

    One partition per day that has interactions (days without any get no directory); rows
    within a partition are sorted by (user_id, item_id). ``dt`` is only the directory name,
    not a column. Readers of the log should skip ``items_truth.parquet`` (for example
    ``pyarrow.dataset.dataset(out_dir, partitioning="hive", ignore_prefixes=[".", "_",
    "items_truth"])``).

    Parameters
    ----------
    sim : Simulation
    out_dir : str or Path
        Must not exist, or be an empty directory.
    cfg : SimulateSection
        start_date (day 0) and seed (for the timestamps' stream).

    Returns
    -------
    dict
        n_users, n_items, n_interactions, n_days (partitions written), path.

    Raises
    ------
    MfsimError
        If ``out_dir`` exists and is not an empty directory, or cannot be created. Nothing is
        left at ``out_dir`` when writing fails.

    Notes
    -----
    O(nnz) time and memory beyond ``sim`` (one permutation by day and the timestamps).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MfsimError(
            f"output {out} already exists and is not an empty directory; choose another --out or remove it"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        tmp.mkdir()
    except OSError as exc:
        raise MfsimError(f"cannot create {out}: {exc.strerror}; choose a writable --out") from exc
    try:
        ts = event_timestamps(sim.day, cfg)
        order = np.argsort(sim.day, kind="stable")  # grouped by day, (user, item) order kept
        per_day = np.bincount(sim.day, minlength=1)
        ends = np.cumsum(per_day)
        written = 0
        for d in np.flatnonzero(per_day):
            rows = order[ends[d] - per_day[d] : ends[d]]
            date = cfg.start_date + dt.timedelta(days=int(d))
            part = tmp / f"dt={date.isoformat()}"
            part.mkdir()
            table = pa.table(
                {
                    "user_id": pa.array(sim.user[rows], pa.int64()),
                    "item_id": pa.array(sim.item[rows], pa.int64()),
                    "weight": pa.array(np.ones(len(rows), np.float32), pa.float32()),
                    "ts": pa.array(ts[rows], pa.timestamp("ms")),
                }
            )
            pq.write_table(table, part / PART_NAME, compression="zstd")
            written += 1
        truth = pa.table(
            {
                "item_id": pa.array(np.arange(sim.n_items, dtype=np.int64)),
                "cluster": pa.array(sim.item_cluster.astype(np.int32)),
                "popularity": pa.array(sim.item_popularity.astype(np.float64)),
            }
        )
        pq.write_table(truth, tmp / ITEMS_TRUTH, compression="zstd")
        summary = {
            "n_users": int(sim.n_users),
            "n_items": int(sim.n_items),
            "n_interactions": int(len(sim.user)),
            "n_days": written,
            "path": str(out),
        }
        meta = {
            "config": cfg.model_dump(mode="json"),
            "cluster_probs": sim.cluster_probs.tolist(),
            "cluster_betas": sim.cluster_betas.tolist(),
            **{key: summary[key] for key in ("n_users", "n_items", "n_interactions", "n_days")},
        }
        (tmp / METADATA).write_text(json.dumps(meta, indent=2))
        (tmp / SUCCESS).write_bytes(b"")
        try:
            os.rename(tmp, out)  # atomic; replaces an empty directory on POSIX
        except OSError as exc:
            raise MfsimError(
                f"could not move the simulation into {out}: {exc.strerror}; choose another --out or remove it"
            ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def power_law_matrix(
    users: int,
    items: int,
    nnz: int,
    *,
    seed: int = 0,
    clusters: int = 5,
    user_beta: float = 0.5,
    item_beta: tuple[float, float] = (0.25, 1.5),
    cluster_affinity: float = 0.7,
) -> sp.csr_matrix:
    """A binary, simulator-like power-law interaction matrix with exactly ``nnz`` ones (or fewer
    when ``users * items`` cannot hold them), shape (users, items), float32 CSR.

    Items fall into ``clusters`` groups; within group c, popularity is a Zipf law
    ``r^-beta_c`` over a random rank r with ``beta_c ~ U(item_beta)``. User activity is Zipf
    with exponent ``user_beta`` over a random rank. Each interaction picks its user by activity,
    then the user's own cluster with probability ``cluster_affinity`` (else a uniform cluster),
    then an item of that cluster by popularity; repeats collapse to one. Ids are shuffled, so
    neither rows nor columns are sorted by popularity.

    Notes
    -----
    Not the paper's process (:func:`simulate`): a fast stand-in with a chosen ``nnz``, for the
    SVD tests and ``mfsim bench svd``. Vectorized; O(nnz log nnz) time (the CSR build sorts),
    about 40 bytes per draw of memory.
    """
    rng = np.random.default_rng(seed)
    nnz = int(min(nnz, users * items))
    # items: cluster, Zipf weight within the cluster, one CDF per cluster over its items
    item_cluster = rng.integers(0, clusters, items)
    betas = rng.uniform(item_beta[0], item_beta[1], clusters)
    members = [np.flatnonzero(item_cluster == c) for c in range(clusters)]
    cdfs = []
    for c in range(clusters):
        w = np.arange(1, len(members[c]) + 1, dtype=np.float64) ** -betas[c]  # r^-beta_c, r = rank
        rng.shuffle(members[c])  # rank -> random item id
        cdfs.append(np.cumsum(w) / w.sum() if len(w) else w)
    activity = rng.permutation(users).astype(np.float64) + 1.0
    activity = activity**-user_beta  # r_u^-beta_user
    activity /= activity.sum()
    user_cluster = rng.integers(0, clusters, users)

    def draw(count: int) -> tuple[np.ndarray, np.ndarray]:
        per_user = rng.multinomial(count, activity)
        u = np.repeat(np.arange(users, dtype=np.int64), per_user)
        own = rng.random(count) < cluster_affinity
        cl = np.where(own, user_cluster[u], rng.integers(0, clusters, count))
        it = np.empty(count, dtype=np.int64)
        for c in range(clusters):
            sel = np.flatnonzero(cl == c)
            if len(members[c]) == 0:  # an empty cluster sends its draws to a uniform item
                it[sel] = rng.integers(0, items, len(sel))
                continue
            r = np.minimum(np.searchsorted(cdfs[c], rng.random(len(sel))), len(members[c]) - 1)
            it[sel] = members[c][r]
        return u, it

    keys = np.zeros(0, dtype=np.int64)
    want = nnz
    for _ in range(8):  # top up the repeats that collapsed, a few rounds
        before = len(keys)
        u, it = draw(want)
        keys = np.concatenate([keys, u * items + it])
        keys.sort()  # sort + neighbour compare: numpy's hash-based np.unique is far slower here
        keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
        if len(keys) >= nnz:
            break
        new_per_draw = max((len(keys) - before) / want, 0.01)  # the yield of the last round
        want = int((nnz - len(keys)) / new_per_draw * 1.1) + 1
    if len(keys) > nnz:
        keys = np.sort(rng.choice(keys, nnz, replace=False))
    rows = keys // items
    cols = (keys % items).astype(np.int32)
    indptr = np.zeros(users + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=users), out=indptr[1:])
    return sp.csr_matrix((np.ones(len(keys), dtype=np.float32), cols, indptr), shape=(users, items))
