"""``bench svd``: mfsim's randomized SVD against scikit-learn and dask.array, timed in one run.

One seeded power-law matrix (``mfsim.pipeline.simulate.power_law_matrix``), the same k,
oversampling and power iterations for every method:

- ``mfsim``: ``pipeline.model.svd.randomized_svd`` on in-process row blocks (numba over every core);
- ``mfsim-dask``: the same on a Dask client (default: a local cluster of 2 workers x 1 thread),
  blocks scattered to the workers beforehand (in the pipeline they already live there);
- ``sklearn``: ``sklearn.utils.extmath.randomized_svd`` on the scipy CSR matrix;
- ``dask-svd_compressed``: ``dask.array.linalg.svd_compressed`` on a dask array whose chunks are
  the scipy CSR row blocks (sparse chunks work for its products; nothing is densified), on the
  same Dask client.

Per method: wall time, ratio to sklearn, peak resident memory above the start
(``measure.timed``: a 10 ms sampler of ``VmRSS`` in this process, and in each worker for the Dask
methods), and the singular values' accuracy: against ``scipy.sparse.linalg.svds`` when
nnz <= ``svds_max_nnz``, else against the largest value any method found for each index (every
method takes Ritz values from a subspace, and those never exceed the true singular values, so the
largest is the closest).
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp

from mfsim.jobs.bench.measure import Timing, local_client, timed
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.simulate import power_law_matrix

METHODS = ("krylov", "krylov-dask", "mfsim", "mfsim-dask", "sklearn", "dask-svd_compressed")
# "mfsim" is the subspace iteration (svd.solver: subspace), "krylov" the default solver (svd.solver: krylov)


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
    methods: tuple[str, ...] = METHODS,
    sklearn_power_iterations: int | None = None,
) -> dict:
    """Time the four SVD methods on one power-law matrix; print one line each; return the numbers.

    Parameters
    ----------
    users, items, nnz : int
        Shape and number of nonzeros of the matrix (``power_law_matrix``).
    rank, oversample : int
        k and the oversampling, the same for every method.
    power_iterations : int, optional
        q of the subspace iterations (mfsim, mfsim-dask, dask); default ``SvdSection().power_iterations``.
    sklearn_power_iterations : int, optional
        sklearn's n_iter (default: ``power_iterations``); krylov runs at the config defaults
        (``svd.block_size``, ``svd.tol``, ``svd.max_blocks``).
    client_factory : callable, optional
        Returns a ``distributed.Client`` for the Dask methods (closed by the caller); default: a
        local cluster of 2 worker processes x 1 thread on 127.0.0.1, closed at the end.
    block_rows : int, optional
        Rows per block; default ``IngestSection().block_rows``.
    methods : tuple of str
        Which of ``METHODS`` to run (always in the order mfsim, mfsim-dask, dask-svd_compressed,
        sklearn); an unknown name raises ``MfsimError``.

    Returns
    -------
    dict
        ``matrix`` (shape, nnz, seconds to build) and per method ``seconds``, ``ratio_vs_sklearn``,
        ``peak_rss`` (bytes above the start, this process), ``worker_peak_rss`` (largest worker),
        ``sigma_max_rel_err`` and ``sigma`` (against svds or the per-index maximum, ``reference``).
    """
    from mfsim.pipeline.blocks import RowBlocks
    from mfsim.pipeline.config import IngestSection, SvdSection
    from mfsim.pipeline.model.svd import krylov_svd, randomized_svd

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise MfsimError(f"unknown --methods {', '.join(unknown) or '(none given)'}: choose from {', '.join(METHODS)}")
    q = SvdSection().power_iterations if power_iterations is None else int(power_iterations)
    q_sk = q if sklearn_power_iterations is None else int(sklearn_power_iterations)
    d = SvdSection()

    def krylov(blocks):
        return krylov_svd(blocks, rank, block_size=d.block_size, tol=d.tol, max_blocks=d.max_blocks, seed=seed)
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

    def record(name: str, r: Timing, sigma: np.ndarray, extra: str = "", passes: float | None = None) -> None:
        results[name] = dict(seconds=r.seconds, peak_rss=r.extra_rss, worker_peak_rss=r.worker_extra_rss,
                             sigma=np.asarray(sigma, dtype=np.float64)[:rank], note=extra, passes=passes)
        print(f"  {name:<20s} {r.seconds:8.2f}s", flush=True)

    def subspace_passes(qq: int) -> float:
        return round(min(rank + oversample, *x.shape) * (2 * qq + 2) / (rank + 10), 2)

    if "krylov" in methods:
        local = RowBlocks.from_scipy(x, block_rows)
        r = timed(lambda: krylov(local))
        dg = r.result.diagnostics
        record("krylov", r, r.result.sigma, f"block {dg['block_size']}, {dg['blocks']} blocks, estimate "
               f"{dg['estimated_error']:.1e}, phases {_phases(r.result)}", dg["passes"])
        del local
    if "mfsim" in methods:
        local = RowBlocks.from_scipy(x, block_rows)
        r = timed(lambda: randomized_svd(local, rank, oversample=oversample, power_iterations=q, seed=seed))
        record("mfsim", r, r.result.sigma, f"subspace q={q}; phases {_phases(r.result)}", subspace_passes(q))
        del local
    with ExitStack() as stack:  # closes the default cluster; a client_factory's client is the caller's
        client = None
        if {"mfsim-dask", "krylov-dask", "dask-svd_compressed"} & set(methods):
            client = client_factory() if client_factory is not None else stack.enter_context(local_client(2))
        if "krylov-dask" in methods:
            from distributed import wait

            krylov(RowBlocks.from_scipy(warm.gather(), 512, client))  # loads the kernels on the workers
            blocks = RowBlocks.from_scipy(x, block_rows, client)
            wait(blocks.parts)
            r = timed(lambda: krylov(blocks), client)
            dg = r.result.diagnostics
            record("krylov-dask", r, r.result.sigma, f"{dg['n_workers']} workers; phases {_phases(r.result)}",
                   dg["passes"])
            r.result = None  # its V on the workers first: cancelling blocks that a wanted V depends on trips the scheduler
            client.cancel(blocks.parts)
            del blocks
        if "mfsim-dask" in methods:
            from distributed import wait

            t = time.perf_counter()
            randomized_svd(RowBlocks.from_scipy(warm.gather(), 512, client), 8, power_iterations=1)
            print(f"  warm-up on the workers {time.perf_counter() - t:.1f}s (not counted)", flush=True)
            t = time.perf_counter()
            blocks = RowBlocks.from_scipy(x, block_rows, client)
            wait(blocks.parts)
            t_scatter = time.perf_counter() - t
            r = timed(lambda: randomized_svd(blocks, rank, oversample=oversample, power_iterations=q, seed=seed),
                      client)
            record("mfsim-dask", r, r.result.sigma,
                   f"{r.result.diagnostics['n_workers']} workers; scatter {t_scatter:.1f}s not counted; "
                   f"phases {_phases(r.result)}", subspace_passes(q))
            client.cancel(blocks.parts)
            del blocks
        if "dask-svd_compressed" in methods:
            try:
                r = timed(lambda: _svd_compressed(x, block_rows, rank, oversample, q, seed), client)
            except np.linalg.LinAlgError as exc:  # its power iterations overflow without re-orthonormalization
                print(f"dask-svd_compressed failed at power_iterations={q}: {exc} (its 'power' iterator does not "
                      "re-orthonormalize, so large q overflows); not timed", flush=True)
            else:
                record("dask-svd_compressed", r, r.result[0],
                       "scipy.sparse CSR chunks; its default 'power' iterator does not re-orthonormalize "
                       "between products, so the smaller values are lost to rounding")
    if "sklearn" in methods:
        r = timed(lambda: _sklearn(x, rank, oversample, q_sk, seed))
        record("sklearn", r, r.result[0], f"n_iter={q_sk}", subspace_passes(q_sk))

    if x.nnz <= svds_max_nnz:
        from scipy.sparse.linalg import svds

        t = time.perf_counter()
        ref = np.sort(svds(x.astype(np.float64), k=rank, solver="arpack", tol=1e-10, return_singular_vectors=False))[::-1]
        reference = f"scipy.sparse.linalg.svds ({time.perf_counter() - t:.1f}s)"
    else:  # svds would take too long: a Krylov run far past the default tolerance, and every method's values
        t = time.perf_counter()
        deep = krylov_svd(RowBlocks.from_scipy(x, block_rows), rank, block_size=d.block_size, tol=1e-10,
                          max_blocks=4 * d.max_blocks, seed=seed + 1)
        # Ritz values never exceed the truth in exact arithmetic, so the per-index maximum is the best known;
        # only mfsim's solvers (float64 sums) take part: sklearn and dask work in X's float32, and their values
        # exceed the truth by rounding (on the 1M x 200k matrix sklearn's sigma_2 lies 2.3e-6 above it)
        ref = np.max([deep.sigma] + [res["sigma"] for name, res in results.items()
                                     if name in ("krylov", "krylov-dask", "mfsim", "mfsim-dask")], axis=0)
        reference = (f"krylov at tol 1e-10 ({deep.diagnostics['passes']} passes, {time.perf_counter() - t:.1f}s) and "
                     "mfsim's other solvers, the largest value per index (Ritz values never exceed the truth)")
    base = results.get("sklearn", {}).get("seconds")
    print(f"accuracy reference: {reference}")
    for name, res in results.items():
        res["sigma_max_rel_err"] = float(np.max(np.abs(res["sigma"] - ref) / ref))
        res["ratio_vs_sklearn"] = res["seconds"] / base if base else None
        ratio = f"{res['ratio_vs_sklearn']:.2f}x sklearn" if base else "-"
        passes = f"{res['passes']:6.1f} passes" if res.get("passes") is not None else " " * 12
        print(f"{name:<20s} {res['seconds']:8.2f}s  {passes}  {ratio:>14s}  peak RSS +{res['peak_rss'] / 2**20:7.0f} MiB"
              f" (worker +{res['worker_peak_rss'] / 2**20:6.0f} MiB)  max rel err sigma {res['sigma_max_rel_err']:.2e}"
              f"  {res['note']}")
    if "mfsim" in results and "mfsim-dask" in results:
        print(f"mfsim-dask / mfsim = {results['mfsim-dask']['seconds'] / results['mfsim']['seconds']:.2f}x (target <= 1.3x)")
    if "mfsim" in results and base and q_sk == q:  # the same q on both sides: the subspace iteration's own speed
        print(f"sklearn / mfsim = {base / results['mfsim']['seconds']:.2f}x at q = {q} (target >= 2x)")
    if "krylov" in results and "mfsim" in results:
        print(f"krylov / subspace q={q} = {results['krylov']['seconds'] / results['mfsim']['seconds']:.2f}x "
              "(target <= 0.25x at q = 32)")
    if "krylov" in results and base:
        print(f"krylov / sklearn n_iter={q_sk} = {results['krylov']['seconds'] / base:.2f}x (target <= 0.5x at n_iter = 4)")
    return dict(matrix=dict(shape=x.shape, nnz=int(x.nnz), build_seconds=t_build), reference=reference,
                power_iterations=q, results=results)


def _phases(res) -> str:
    return " ".join(f"{k}={v:.2f}s" for k, v in res.diagnostics["seconds"].items())
