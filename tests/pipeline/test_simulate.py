"""The Section 4 simulator: the generative model against its definition, the sampler against
exact enumeration, and the Parquet writer round trip."""

from __future__ import annotations

import datetime as dt
import itertools
import os

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from scipy import optimize, stats

from mfsim.pipeline.config import SimulateSection
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.simulate import (
    ITEMS_TRUTH,
    Simulation,
    alias_table,
    sample_without_replacement,
    simulate,
    write_simulation,
)

# Chi-square tests below pass with probability 1 - 1e-4 for a correct sampler and a random
# seed; the seeds are fixed, so a pass is reproducible and a wrong distribution (which moves
# the statistic by orders of magnitude at these sample sizes) fails.
P_FLOOR = 1e-4


def small_cfg(**kw) -> SimulateSection:
    base = dict(n_users=400, n_items=120, n_clusters=4, n_days=7, seed=3)
    base.update(kw)
    return SimulateSection(**base)


# ---------------------------------------------------------------------------------------------
# shapes, determinism, invariants


def test_shapes_and_dtypes():
    cfg = small_cfg()
    sim = simulate(cfg)
    nnz = len(sim.user)
    assert sim.user.dtype == np.int64 and sim.item.dtype == np.int64 and sim.day.dtype == np.int32
    assert sim.item.shape == sim.day.shape == (nnz,)
    assert sim.item_cluster.dtype == np.int32 and sim.item_cluster.shape == (cfg.n_items,)
    assert sim.item_popularity.dtype == np.float64 and sim.item_popularity.shape == (cfg.n_items,)
    assert sim.cluster_betas.shape == sim.cluster_probs.shape == (cfg.n_clusters,)
    assert sim.user_cluster_prefs.shape == (cfg.n_users, cfg.n_clusters)
    assert (sim.n_users, sim.n_items) == (cfg.n_users, cfg.n_items)
    assert sim.user.min() >= 0 and sim.user.max() < cfg.n_users
    assert sim.item.min() >= 0 and sim.item.max() < cfg.n_items
    assert sim.day.min() >= 0 and sim.day.max() < cfg.n_days
    assert sim.item_cluster.min() >= 0 and sim.item_cluster.max() < cfg.n_clusters
    assert np.all((sim.cluster_betas >= cfg.item_beta_low) & (sim.cluster_betas <= cfg.item_beta_high))
    np.testing.assert_allclose(sim.cluster_probs, np.full(cfg.n_clusters, 1 / cfg.n_clusters))
    np.testing.assert_allclose(sim.user_cluster_prefs.sum(axis=1), 1.0, rtol=1e-12)
    # popularity sums to 1 within each non-empty cluster
    sums = np.bincount(sim.item_cluster, weights=sim.item_popularity, minlength=cfg.n_clusters)
    nonempty = np.bincount(sim.item_cluster, minlength=cfg.n_clusters) > 0
    np.testing.assert_allclose(sums[nonempty], 1.0, rtol=1e-12)


def test_same_seed_same_output_other_seed_differs():
    a, b, c = simulate(small_cfg()), simulate(small_cfg()), simulate(small_cfg(seed=4))
    for name in Simulation.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert not np.array_equal(a.item_cluster, c.item_cluster)
    assert len(a.user) != len(c.user) or not np.array_equal(a.item, c.item)
    assert not np.array_equal(a.day[:50], c.day[:50])


def test_rows_sorted_without_duplicates():
    sim = simulate(small_cfg(n_users=2000, n_items=300))
    key = sim.user * sim.n_items + sim.item
    assert np.all(np.diff(key) > 0)  # strictly increasing: sorted by (user, item), no repeats


@pytest.mark.parametrize(
    "kw",
    [
        dict(),  # default k_max = p
        dict(min_items_per_user=5, max_items_per_user=60),  # both bounds bind
        dict(user_beta=0.0, min_items_per_user=120, max_items_per_user=120),  # everyone takes all items
    ],
)
def test_items_per_user_follow_the_rank_power_law(kw):
    cfg = small_cfg(**kw)
    sim = simulate(cfg)
    counts = np.bincount(sim.user, minlength=cfg.n_users)
    k_max = cfg.max_items_per_user or cfg.n_items
    # the documented law over ranks 1..n, computed here independently
    ranks = np.arange(1, cfg.n_users + 1, dtype=np.float64)
    expected = np.clip(np.ceil(k_max * ranks ** (-cfg.user_beta)), cfg.min_items_per_user, k_max)
    np.testing.assert_array_equal(np.sort(counts), np.sort(expected).astype(np.int64))
    assert counts.min() >= cfg.min_items_per_user  # every user present
    assert counts.max() <= min(k_max, cfg.n_items)


def test_invalid_k_bounds_are_user_errors():
    with pytest.raises(MfsimError, match="max_items_per_user"):
        simulate(small_cfg(max_items_per_user=121))
    with pytest.raises(MfsimError, match="min_items_per_user"):
        simulate(small_cfg(min_items_per_user=50, max_items_per_user=10))


# ---------------------------------------------------------------------------------------------
# the generative model


def test_item_popularity_is_a_zipf_law_within_each_cluster():
    sim = simulate(small_cfg(n_items=2000, n_clusters=5))
    for c in range(5):
        pop = np.sort(sim.item_popularity[sim.item_cluster == c])[::-1]
        r = np.arange(1, len(pop) + 1, dtype=np.float64)
        zipf = r ** -sim.cluster_betas[c]
        np.testing.assert_allclose(pop, zipf / zipf.sum(), rtol=1e-10)


def test_cluster_shares_match_cluster_probs():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    cfg = small_cfg(n_users=10, n_items=20_000, n_clusters=4, cluster_probs=probs.tolist())
    sim = simulate(cfg)
    counts = np.bincount(sim.item_cluster, minlength=4)
    # each count is Binomial(p, p_c): allow 4 standard deviations
    sd = np.sqrt(cfg.n_items * probs * (1 - probs))
    assert np.all(np.abs(counts - cfg.n_items * probs) < 4 * sd), (counts, cfg.n_items * probs)
    np.testing.assert_allclose(sim.cluster_probs, probs)


def _zipf_mle(ranks: np.ndarray, counts: np.ndarray, n_ranks: int) -> tuple[float, float]:
    """MLE of beta for counts ~ Multinomial(N, r^-beta / sum_{j<=n} j^-beta), and its s.e."""
    log_r = np.log(np.arange(1, n_ranks + 1))
    s = float(np.sum(counts * np.log(ranks)))
    total = counts.sum()

    def nll(beta):
        return beta * s + total * np.log(np.exp(-beta * log_r).sum())

    beta = optimize.minimize_scalar(nll, bounds=(-1.0, 5.0), method="bounded", options={"xatol": 1e-8}).x
    q = np.exp(-beta * log_r)
    q /= q.sum()
    var_log_r = np.sum(q * log_r**2) - np.sum(q * log_r) ** 2
    return beta, 1.0 / np.sqrt(total * var_log_r)  # Fisher information N Var(log r)


def test_item_counts_follow_each_clusters_power_law():
    # One item per user: given its cluster, a user's item is exactly Multinomial(p_i), so the
    # counts of a cluster's items are Multinomial(N_c, r^-beta_c / H) in the true ranks.
    cfg = small_cfg(n_users=60_000, n_items=3_000, n_clusters=3, user_beta=0.0, max_items_per_user=1, seed=11)
    sim = simulate(cfg)
    counts = np.bincount(sim.item, minlength=cfg.n_items)
    for c in range(3):
        members = np.flatnonzero(sim.item_cluster == c)
        ranks = np.empty(len(members))
        ranks[np.argsort(-sim.item_popularity[members], kind="stable")] = np.arange(1, len(members) + 1)
        beta, se = _zipf_mle(ranks, counts[members], len(members))
        # the MLE is asymptotically normal: 5 standard errors (se ~ 0.01 here)
        assert abs(beta - sim.cluster_betas[c]) < 5 * se, (c, beta, sim.cluster_betas[c], se)


def test_users_pick_clusters_with_their_preferences():
    # With one item per user, P(cluster of u's item = c) = p_uc exactly.
    cfg = small_cfg(n_users=20_000, n_items=500, n_clusters=5, user_beta=0.0, max_items_per_user=1,
                    user_pref_concentration=0.5)
    sim = simulate(cfg)
    chosen = sim.item_cluster[sim.item]
    probs = sim.user_cluster_prefs[sim.user]
    observed = np.bincount(chosen, minlength=5)
    expected = probs.sum(axis=0)
    var = (probs * (1 - probs)).sum(axis=0)  # sum of independent Bernoulli variances
    assert np.all(np.abs(observed - expected) < 4.5 * np.sqrt(var)), (observed, expected)
    # and the deviation is tied to each user's own preferences, not the average ones
    assert np.mean(probs[np.arange(len(chosen)), chosen]) > np.mean(probs) + 0.1


# ---------------------------------------------------------------------------------------------
# the sampler against exact enumeration


def exact_subset_probs(w: np.ndarray, k: int) -> dict[tuple[int, ...], float]:
    """P(set) for k successive draws without replacement, each proportional to w."""
    out: dict[tuple[int, ...], float] = {}
    for seq in itertools.permutations(range(len(w)), k):
        prob, left = 1.0, w.sum()
        for i in seq:
            prob *= w[i] / left
            left -= w[i]
        key = tuple(sorted(seq))
        out[key] = out.get(key, 0.0) + prob
    return out


CLUSTER5 = np.array([0, 1, 0, 1, 1])
POP5 = np.array([0.5, 0.3, 0.1, 0.05, 0.05])
PREF2 = np.array([0.8, 0.2])


@pytest.mark.parametrize("mode, budget", [("sparse", 10**6), ("dense", 0), ("sparse then dense", 4)])
@pytest.mark.parametrize("k", [2, 3])
def test_sampler_matches_exact_without_replacement_probabilities(mode, budget, k):
    n = 30_000
    log_pref = np.tile(np.log(PREF2), (n, 1))
    user, item = sample_without_replacement(
        log_pref, CLUSTER5, np.log(POP5), np.full(n, k), seed=5, draw_budget=budget
    )
    assert len(user) == n * k
    np.testing.assert_array_equal(np.bincount(user), np.full(n, k))
    sets = item.reshape(n, k)  # sorted by (user, item)
    assert np.all(np.diff(sets, axis=1) > 0)
    exact = exact_subset_probs(PREF2[CLUSTER5] * POP5, k)
    keys = list(exact)
    code = {s: i for i, s in enumerate(keys)}
    observed = np.bincount([code[tuple(row)] for row in sets.tolist()], minlength=len(keys))
    expected = n * np.array([exact[s] for s in keys])
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert stats.chi2.sf(chi2, len(keys) - 1) > P_FLOOR, (mode, observed, expected.round())


@pytest.mark.parametrize("n_clusters", [5, 20])  # C-1 comparisons, and the binary search path
def test_sampler_single_draw_is_the_mixture_distribution(n_clusters):
    rng = np.random.default_rng(0)
    p = 40
    # clusters 0 and the last are empty, plus one in the middle
    allowed = np.setdiff1d(np.arange(n_clusters), [0, n_clusters // 2, n_clusters - 1])
    cluster = rng.choice(allowed, size=p)
    pop = rng.uniform(0.1, 1.0, size=p)
    n = 40_000
    # two kinds of users with different preferences
    prefs = rng.dirichlet(np.ones(n_clusters), size=2)
    kind = np.arange(n) % 2
    user, item = sample_without_replacement(np.log(prefs[kind]), cluster, np.log(pop), np.ones(n, int), seed=1)
    for t in range(2):
        w = prefs[t][cluster] * pop
        expected = (n // 2) * w / w.sum()
        observed = np.bincount(item[kind[user] == t], minlength=p)
        chi2 = ((observed - expected) ** 2 / expected).sum()
        assert stats.chi2.sf(chi2, p - 1) > P_FLOOR


def test_sampler_edge_counts():
    # k = 0 gives nothing, k = p gives every item, whatever the method
    log_pref = np.log(np.tile(PREF2, (4, 1)))
    for budget in (0, 2, 10**6):
        user, item = sample_without_replacement(log_pref, CLUSTER5, np.log(POP5), np.array([0, 5, 1, 5]), 0,
                                                draw_budget=budget)
        np.testing.assert_array_equal(user, [1] * 5 + [2] + [3] * 5)
        np.testing.assert_array_equal(item[:5], np.arange(5))
        np.testing.assert_array_equal(item[6:], np.arange(5))


def test_sampler_survives_vanishing_weights():
    # a cluster with weight e^-800 (a Dirichlet underflow) is still reachable once the others
    # are exhausted, and never before
    log_pref = np.tile([0.0, -800.0], (50, 1))
    user, item = sample_without_replacement(log_pref, CLUSTER5, np.log(POP5), np.full(50, 3), seed=2)
    sets = item.reshape(50, 3)  # rows sorted: 0, then one of cluster 1's items in 1 or 3-4, 2
    assert np.all(sets[:, 0] == 0) and np.all(np.isin(sets, [0, 2]).sum(axis=1) == 2)
    assert len(set(sets[~np.isin(sets, [0, 2])])) == 3  # all of cluster 1 occurs, at random


def test_alias_table_reproduces_the_weights():
    w = np.array([0.0, 1.0, 2.0, 7.0, 0.5])
    accept, alias = alias_table(w)
    # probability of index i = (accept[i] + sum of (1 - accept[j]) over columns j aliased to i) / m
    prob = accept.copy()
    np.add.at(prob, alias, 1.0 - accept)
    np.testing.assert_allclose(prob / len(w), w / w.sum(), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# writing


def read_log(path) -> pa.Table:
    dataset = ds.dataset(path, format="parquet", partitioning="hive", ignore_prefixes=[".", "_", "items_truth"])
    return dataset.to_table()


def test_write_round_trip(tmp_path):
    cfg = small_cfg(n_days=5, start_date=dt.date(2024, 2, 27))
    sim = simulate(cfg)
    out = tmp_path / "sim"
    summary = write_simulation(sim, out, cfg)
    assert summary == {"n_users": cfg.n_users, "n_items": cfg.n_items, "n_interactions": len(sim.user),
                       "n_days": len(np.unique(sim.day)), "path": str(out)}
    assert (out / "_SUCCESS").is_file()
    parts = sorted(p.name for p in out.iterdir() if p.name.startswith("dt="))
    assert parts == [f"dt={(cfg.start_date + dt.timedelta(days=int(d))).isoformat()}" for d in np.unique(sim.day)]
    one = pq.read_schema(out / parts[0] / "part-0.parquet")
    assert one.names == ["user_id", "item_id", "weight", "ts"]  # dt is the directory only
    assert one.field("user_id").type == pa.int64() and one.field("item_id").type == pa.int64()
    assert one.field("weight").type == pa.float32() and one.field("ts").type == pa.timestamp("ms")

    table = read_log(out)
    user = table["user_id"].to_numpy()
    item = table["item_id"].to_numpy()
    order = np.lexsort((item, user))
    np.testing.assert_array_equal(user[order], sim.user)
    np.testing.assert_array_equal(item[order], sim.item)
    np.testing.assert_array_equal(table["weight"].to_numpy(), 1.0)
    date = np.array([dt.date.fromisoformat(str(s)) for s in table["dt"].to_pylist()], dtype="datetime64[D]")
    day = (date - np.datetime64(cfg.start_date, "D")).astype(np.int64)
    np.testing.assert_array_equal(day[order], sim.day)
    ts = table["ts"].to_numpy().astype("datetime64[ms]")
    assert np.all(ts >= date.astype("datetime64[ms]"))
    assert np.all(ts < (date + np.timedelta64(1, "D")).astype("datetime64[ms]"))
    # spread over the day, not all at midnight
    assert len(np.unique(ts - date.astype("datetime64[ms]"))) > len(ts) // 2

    truth = pq.read_table(out / ITEMS_TRUTH)
    assert truth.schema.types == [pa.int64(), pa.int32(), pa.float64()]
    np.testing.assert_array_equal(truth["item_id"].to_numpy(), np.arange(cfg.n_items))
    np.testing.assert_array_equal(truth["cluster"].to_numpy(), sim.item_cluster)
    np.testing.assert_array_equal(truth["popularity"].to_numpy(), sim.item_popularity)


def test_write_refuses_a_non_empty_out_dir(tmp_path):
    cfg = small_cfg()
    sim = simulate(cfg)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MfsimError, match="choose another --out or remove it"):
        write_simulation(sim, out, cfg)
    assert sorted(os.listdir(out)) == ["keep.txt"]
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(MfsimError, match="not an empty directory"):
        write_simulation(sim, tmp_path / "a_file", cfg)
    empty = tmp_path / "empty"
    empty.mkdir()
    write_simulation(sim, empty, cfg)  # an empty directory is replaced
    assert (empty / "_SUCCESS").is_file()


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    cfg = small_cfg()
    sim = simulate(cfg)
    real = pq.write_table
    calls = []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(*args, **kw)

    monkeypatch.setattr(pq, "write_table", failing)
    out = tmp_path / "sim"
    with pytest.raises(OSError, match="disk full"):
        write_simulation(sim, out, cfg)
    assert len(calls) == 3  # two partitions were written before the failure
    assert os.listdir(tmp_path) == []  # neither out nor the temporary sibling
