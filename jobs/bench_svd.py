"""``bench svd``: mfsim's randomized SVD against scikit-learn and dask.array, timed in one run.

One seeded power-law matrix (``power_law_matrix``), the same k, oversampling and power iterations
for every method:

- ``mfsim``: ``pipeline.svd.randomized_svd`` on in-process row blocks (numba over every core);
- ``mfsim-dask``: the same on a Dask client (default: a local cluster of 2 workers x 1 thread),
  blocks scattered to the workers beforehand (in the pipeline they already live there);
- ``sklearn``: ``sklearn.utils.extmath.randomized_svd`` on the scipy CSR matrix;
- ``dask-svd_compressed``: ``dask.array.linalg.svd_compressed`` on a dask array whose chunks are
  the scipy CSR row blocks (sparse chunks work for its products; nothing is densified), on the
  same Dask client.

Per method: wall time, ratio to sklearn, peak resident memory above the start (a 10 ms sampler of
``VmRSS`` in this process, and in each worker for the Dask methods), and the singular values'
accuracy: against ``scipy.sparse.linalg.svds`` when nnz <= ``svds_max_nnz``, else against the
largest value any method found for each index (every method takes Ritz values from a subspace,
and those never exceed the true singular values, so the largest is the closest).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp


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
    Vectorized; O(nnz log nnz) time (the CSR build sorts), about 40 bytes per draw of memory.
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


# ---------------------------------------------------------------------------------------------
# memory


def _rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Samples this process's VmRSS every 10 ms; ``peak - base`` is the extra memory used."""

    def __init__(self) -> None:
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "PeakRSS":
        self.base = self.peak = _rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss())

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, _rss())
        return self.peak - self.base

    def __enter__(self) -> "PeakRSS":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


_WORKER_SAMPLER: dict[str, PeakRSS] = {}


def _worker_sampler_start() -> int:
    _WORKER_SAMPLER["s"] = PeakRSS().start()
    return _WORKER_SAMPLER["s"].base


def _worker_sampler_stop() -> int:
    sampler = _WORKER_SAMPLER.pop("s", None)
    return sampler.stop() if sampler is not None else 0


# ---------------------------------------------------------------------------------------------
# the methods


def _timed(fn: Callable[[], Any], client: Any = None) -> tuple[Any, float, int, int]:
    """(result, seconds, extra peak RSS here, largest extra peak RSS on a worker)."""
    if client is not None:
        client.run(_worker_sampler_start)
    with PeakRSS() as mem:
        t = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t
    worker_peak = max(client.run(_worker_sampler_stop).values()) if client is not None else 0
    return out, seconds, mem.peak - mem.base, worker_peak


def _sklearn(x: sp.csr_matrix, rank: int, oversample: int, q: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.utils.extmath import randomized_svd

    _, s, vt = randomized_svd(x, rank, n_oversamples=oversample, n_iter=q, random_state=seed)
    return s, vt.T


def _svd_compressed(x: sp.csr_matrix, block_rows: int, rank: int, oversample: int, q: int, seed: int):
    import dask
    import dask.array as da

    pieces = [x[lo : lo + block_rows] for lo in range(0, x.shape[0], block_rows)]
    a = da.concatenate([da.from_array(b, chunks=b.shape, asarray=False) for b in pieces], axis=0)
    _, s, vt = da.linalg.svd_compressed(a, rank, n_power_iter=q, n_oversamples=oversample, seed=seed)
    s, vt = dask.compute(s, vt)
    return np.asarray(s), np.asarray(vt).T


def _default_cluster():
    from distributed import Client, LocalCluster

    from mfsim.pipeline.cluster import worker_thread_env

    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
        env=worker_thread_env(1),
    )
    return cluster, Client(cluster)


def run_bench_svd(
    users: int = 1_000_000,
    items: int = 200_000,
    nnz: int = 50_000_000,
    rank: int = 64,
    oversample: int = 10,
    power_iterations: int | None = None,
    seed: int = 0,
    client_factory: Callable[[], Any] | None = None,
    *,
    block_rows: int | None = None,
    svds_max_nnz: int = 2_000_000,
    methods: tuple[str, ...] = ("mfsim", "mfsim-dask", "sklearn", "dask-svd_compressed"),
) -> dict:
    """Time the four SVD methods on one power-law matrix; print one line each; return the numbers.

    Parameters
    ----------
    users, items, nnz : int
        Shape and number of nonzeros of the matrix (``power_law_matrix``).
    rank, oversample : int
        k and the oversampling, the same for every method.
    power_iterations : int, optional
        q for every method; default ``SvdSection().power_iterations``.
    client_factory : callable, optional
        Returns a ``distributed.Client`` for the Dask methods (closed by the caller); default: a
        local cluster of 2 worker processes x 1 thread on 127.0.0.1, closed at the end.
    block_rows : int, optional
        Rows per block; default ``IngestSection().block_rows``.

    Returns
    -------
    dict
        ``matrix`` (shape, nnz, seconds to build) and per method ``seconds``, ``ratio_vs_sklearn``,
        ``peak_rss`` (bytes above the start, this process), ``worker_peak_rss`` (largest worker),
        ``sigma_max_rel_err`` and ``sigma`` (against svds or the per-index maximum, ``reference``).
    """
    from mfsim.pipeline.blocks import RowBlocks
    from mfsim.pipeline.config import IngestSection, SvdSection
    from mfsim.pipeline.svd import randomized_svd

    q = SvdSection().power_iterations if power_iterations is None else int(power_iterations)
    block_rows = block_rows or IngestSection().block_rows
    t = time.perf_counter()
    x = power_law_matrix(users, items, nnz, seed=seed)
    t_build = time.perf_counter() - t
    print(f"matrix {x.shape[0]:,} x {x.shape[1]:,}, nnz {x.nnz:,} (built in {t_build:.1f}s); "
          f"k={rank} oversample={oversample} power_iterations={q} block_rows={block_rows}", flush=True)
    results: dict[str, dict] = {}
    # one small SVD first, in this process and on the workers, so that loading the cached numba
    # kernels (a one-time cost per process, ~1-3 s) is not counted against either mfsim path
    warm = RowBlocks.from_scipy(power_law_matrix(2000, 500, 20_000, seed=seed), 512)
    t = time.perf_counter()
    randomized_svd(warm, 8, power_iterations=1)
    print(f"  warm-up in-process {time.perf_counter() - t:.1f}s (not counted)", flush=True)

    def record(name: str, out: tuple, extra: str = "") -> None:
        (s, v), seconds, peak, wpeak = out
        results[name] = dict(seconds=seconds, peak_rss=peak, worker_peak_rss=wpeak,
                             sigma=np.asarray(s, dtype=np.float64)[:rank], note=extra)
        print(f"  {name:<20s} {seconds:8.2f}s", flush=True)

    if "mfsim" in methods:
        local = RowBlocks.from_scipy(x, block_rows)
        r = _timed(lambda: randomized_svd(local, rank, oversample=oversample, power_iterations=q, seed=seed))
        record("mfsim", ((r[0].sigma, r[0].V), *r[1:]), f"phases {_phases(r[0])}")
        del local
    client = cluster = None
    if "mfsim-dask" in methods or "dask-svd_compressed" in methods:
        if client_factory is not None:
            client = client_factory()
        else:
            cluster, client = _default_cluster()
    try:
        if "mfsim-dask" in methods:
            from distributed import wait

            t = time.perf_counter()
            randomized_svd(RowBlocks.from_scipy(warm.gather(), 512, client), 8, power_iterations=1)
            print(f"  warm-up on the workers {time.perf_counter() - t:.1f}s (not counted)", flush=True)
            t = time.perf_counter()
            blocks = RowBlocks.from_scipy(x, block_rows, client)
            wait(blocks.parts)
            t_scatter = time.perf_counter() - t
            r = _timed(lambda: randomized_svd(blocks, rank, oversample=oversample, power_iterations=q, seed=seed),
                       client)
            record("mfsim-dask", ((r[0].sigma, r[0].V), *r[1:]),
                   f"{r[0].diagnostics['n_workers']} workers; scatter {t_scatter:.1f}s not counted; phases {_phases(r[0])}")
            client.cancel(blocks.parts)
            del blocks
        if "dask-svd_compressed" in methods:
            try:
                r = _timed(lambda: _svd_compressed(x, block_rows, rank, oversample, q, seed), client)
            except np.linalg.LinAlgError as exc:  # its power iterations overflow without re-orthonormalization
                print(f"dask-svd_compressed failed at power_iterations={q}: {exc} (its 'power' iterator does not "
                      "re-orthonormalize, so large q overflows); not timed", flush=True)
            else:
                record("dask-svd_compressed", r, "scipy.sparse CSR chunks; its default 'power' iterator does not "
                       "re-orthonormalize between products, so the smaller values are lost to rounding")
    finally:
        if cluster is not None:
            client.close()
            cluster.close()
    if "sklearn" in methods:
        r = _timed(lambda: _sklearn(x, rank, oversample, q, seed))
        record("sklearn", r)

    if x.nnz <= svds_max_nnz:
        from scipy.sparse.linalg import svds

        t = time.perf_counter()
        ref = np.sort(svds(x.astype(np.float64), k=rank, solver="arpack", tol=1e-10, return_singular_vectors=False))[::-1]
        reference = f"scipy.sparse.linalg.svds ({time.perf_counter() - t:.1f}s)"
    else:
        ref = np.max([res["sigma"] for res in results.values()], axis=0)
        reference = "the largest value any method found per index (Ritz values never exceed the truth)"
    base = results.get("sklearn", {}).get("seconds")
    print(f"accuracy reference: {reference}")
    for name, res in results.items():
        res["sigma_max_rel_err"] = float(np.max(np.abs(res["sigma"] - ref) / ref))
        res["ratio_vs_sklearn"] = res["seconds"] / base if base else None
        ratio = f"{res['ratio_vs_sklearn']:.2f}x sklearn" if base else "-"
        print(f"{name:<20s} {res['seconds']:8.2f}s  {ratio:>14s}  peak RSS +{res['peak_rss'] / 2**20:7.0f} MiB"
              f" (worker +{res['worker_peak_rss'] / 2**20:6.0f} MiB)  max rel err sigma {res['sigma_max_rel_err']:.2e}"
              f"  {res['note']}")
    if "mfsim" in results and "mfsim-dask" in results:
        print(f"mfsim-dask / mfsim = {results['mfsim-dask']['seconds'] / results['mfsim']['seconds']:.2f}x (target <= 1.3x)")
    if "mfsim" in results and base:
        print(f"sklearn / mfsim = {base / results['mfsim']['seconds']:.2f}x (target >= 2x)")
    return dict(matrix=dict(shape=x.shape, nnz=int(x.nnz), build_seconds=t_build), reference=reference,
                power_iterations=q, results=results)


def _phases(res) -> str:
    return " ".join(f"{k}={v:.2f}s" for k, v in res.diagnostics["seconds"].items())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--nnz", type=int, default=50_000_000)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--oversample", type=int, default=10)
    ap.add_argument("--power-iterations", type=int, default=None)
    ap.add_argument("--block-rows", type=int, default=None)
    ap.add_argument("--methods", default="mfsim,mfsim-dask,sklearn,dask-svd_compressed")
    ap.add_argument("--json", default=None, help="write the returned numbers to this file")
    a = ap.parse_args(argv)
    out = run_bench_svd(a.users, a.items, a.nnz, a.rank, a.oversample, a.power_iterations,
                        block_rows=a.block_rows, methods=tuple(a.methods.split(",")))
    if a.json:
        for res in out["results"].values():
            res["sigma"] = res["sigma"].tolist()
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)


if __name__ == "__main__":
    from mfsim.jobs.bench_svd import main as _main  # run from the importable module, so workers can find its functions

    _main()
