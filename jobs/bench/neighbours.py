"""``bench neighbours``: exact item-item top-N (cosine and dot) against faiss and the bare gemm, in one run.

One seeded set of clustered gaussian item embeddings (P x k float32, norms spread like item
popularity), every item a query against all items, self excluded, N neighbours per list:

- ``mfsim``: ``kernels.topn.topn_symmetric`` with both metrics, as the pipeline computes item-item
  lists: only the score tiles on and above the diagonal (the scores are a Gram matrix), one sgemm
  per tile, both lists of its row block and of its column block selected from it;
- ``mfsim full kernel``: ``kernels.topn.topn_blocked``, every tile (what a query subset runs), for
  comparison; its lists must equal the symmetric ones;
- ``faiss``: ``faiss.IndexFlatIP`` exact search for dot, then a second index and search on
  ``faiss.normalize_L2`` copies for cosine (k = N + 1, the self hit dropped); faiss is an optional
  extra (``pip install faiss-cpu``), skipped with a note when absent;
- ``bare gemm``: the same sgemm tiles with no selection, the bound for any gemm-based exact
  method on this machine. Timed both ways mfsim could run it: one multi-threaded BLAS call per
  tile, and the query rows split among threads each running single-threaded BLAS (as mfsim does);
  the faster is the bound.

Every method gets the same number of threads (default: all cores). Then a slice of a larger
catalog (``slice_queries`` queries against ``slice_items`` candidates, default 20,000 x 1,000,000)
is timed for mfsim and the bare gemm and extrapolated linearly to all ``slice_items`` queries: the
work per query is the same for every query.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np


def clustered_embeddings(items: int, rank: int, *, seed: int = 0, clusters: int = 100) -> np.ndarray:
    """(items x rank) float32: gaussian clusters, each row scaled by a log-normal "popularity" norm.

    The norm spread makes dot and cosine lists differ, as they do for MF embeddings.
    """
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, rank))
    x = centers[rng.integers(0, clusters, items)] + 0.6 * rng.standard_normal((items, rank))
    x *= np.exp(0.5 * rng.standard_normal(items))[:, None]
    return x.astype(np.float32)


def _set_threads(threads: int) -> None:
    import numba

    numba.set_num_threads(threads)


def _mfsim_symmetric(emb: np.ndarray, top_n: int, threads: int):
    from mfsim.kernels.topn import topn_symmetric

    t0 = time.perf_counter()
    out = topn_symmetric(emb, top_n, metrics=("dot", "cosine"), n_threads=threads)
    return out, time.perf_counter() - t0


def _mfsim(emb: np.ndarray, queries: int, top_n: int, query_chunk: int, candidate_block: int, threads: int):
    from mfsim.kernels.topn import topn_blocked

    t0 = time.perf_counter()
    out = topn_blocked(emb[:queries], emb, top_n, metrics=("dot", "cosine"), query_offset=0, exclude_self=True,
                       query_chunk=query_chunk, candidate_block=candidate_block, n_threads=threads)
    return out, time.perf_counter() - t0


def _bare_gemm(emb: np.ndarray, queries: int, query_chunk: int, candidate_block: int, threads: int) -> dict[str, float]:
    """Seconds for the sgemm tiles alone, two ways: BLAS-threaded tiles of ``query_chunk`` rows, and
    mfsim's own tiling (``tile_rows`` rows per tile, rows split over threads, single-threaded BLAS)."""
    from threadpoolctl import threadpool_limits

    from mfsim.kernels.topn import tile_rows

    p = emb.shape[0]
    cb = min(candidate_block, p)
    local = threading.local()

    def tiles(q: np.ndarray, rows: int) -> None:
        if getattr(local, "buf", None) is None or local.buf.size < rows * cb:
            local.buf = np.empty(rows * cb, dtype=np.float32)  # one per thread, as in mfsim
        buf = local.buf
        for a in range(0, q.shape[0], rows):
            qa = q[a : a + rows]
            for c0 in range(0, p, cb):
                c = emb[c0 : c0 + cb]
                np.matmul(qa, c.T, out=buf[: qa.shape[0] * c.shape[0]].reshape(qa.shape[0], c.shape[0]))

    q = emb[:queries]
    with threadpool_limits(threads, user_api="blas"):
        t0 = time.perf_counter()
        tiles(q, query_chunk)
        blas_threads = time.perf_counter() - t0
    rows = tile_rows(queries, query_chunk, cb, threads)
    with threadpool_limits(1, user_api="blas"):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda a: tiles(q[a : a + rows], rows), range(0, queries, rows)))
        split_rows = time.perf_counter() - t0
    return {"blas_threads": blas_threads, "split_rows": split_rows}


def _faiss(emb: np.ndarray, top_n: int, threads: int):
    """(dot ids, cosine ids, seconds) from two IndexFlatIP searches, or None when faiss is absent."""
    try:
        import faiss
    except ImportError:
        print("faiss is not installed: skipping it. Install the optional benchmark extra with "
              "`pip install faiss-cpu` (or `pip install -e '.[bench]'`) in a separate environment.")
        return None
    faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    _, dot_ids = index.search(emb, top_n + 1)
    unit = emb.copy()
    faiss.normalize_L2(unit)
    index_cos = faiss.IndexFlatIP(emb.shape[1])
    index_cos.add(unit)
    _, cos_ids = index_cos.search(unit, top_n + 1)
    seconds = time.perf_counter() - t0
    return _drop_self(dot_ids, top_n), _drop_self(cos_ids, top_n), seconds


def _drop_self(ids: np.ndarray, top_n: int) -> np.ndarray:
    """Remove each row's own id from a (q, N + 1) result (or its last entry when self is absent)."""
    rows = np.arange(ids.shape[0])[:, None]
    is_self = ids == rows
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), top_n)
    keep = np.ones(ids.shape, dtype=bool)
    keep[np.arange(ids.shape[0]), drop] = False
    return ids[keep].reshape(ids.shape[0], top_n)


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean fraction of shared ids per row of two (q, N) id lists (1.0 up to float32 near-ties)."""
    hits = sum(np.intersect1d(x, y).size for x, y in zip(a, b))
    return hits / a.size


def run_bench_neighbours(
    items: int = 100_000,
    rank: int = 64,
    top_n: int = 100,
    seed: int = 0,
    slice_items: int | None = None,
    *,
    slice_queries: int = 20_000,
    threads: int | None = None,
    query_chunk: int = 2048,
    candidate_block: int = 4096,
) -> dict[str, Any]:
    """Time item-item cosine + dot top-N for mfsim, faiss and the bare gemm; print a summary.

    Parameters
    ----------
    items, rank, top_n, seed : int
        P, k, N and the seed of ``clustered_embeddings``.
    slice_items : int, optional
        Catalog size of the slice: ``slice_queries`` queries against ``slice_items`` candidates
        are timed (mfsim and bare gemm) and extrapolated to all ``slice_items`` queries. Default
        1,000,000; 0 skips the slice.
    threads : int, optional
        Threads for every method (numba, BLAS, faiss OpenMP); default all cores.
    query_chunk, candidate_block : int
        mfsim's tiling, also used for the bare gemm.

    Returns
    -------
    dict with the seconds of each method, the ratios, and the list agreement with faiss.
    """
    threads = threads or os.cpu_count() or 1
    _set_threads(threads)
    emb = clustered_embeddings(items, rank, seed=seed)
    print(f"{items:,} items x rank {rank}, top {top_n}, {threads} threads, tiles {query_chunk} x {candidate_block}")
    _mfsim(emb[:2000], 200, 10, query_chunk, candidate_block, threads)  # compile / load the kernels first
    _mfsim_symmetric(emb[:2000], 10, threads)

    out, t_mfsim = _mfsim_symmetric(emb, top_n, threads)
    full, t_full = _mfsim(emb, items, top_n, query_chunk, candidate_block, threads)
    same = {m: bool(np.array_equal(out[m].indices, full[m].indices)) for m in out}
    agree = {m: float(np.mean(out[m].indices == full[m].indices)) for m in out}
    gemm = _bare_gemm(emb, items, query_chunk, candidate_block, threads)
    t_gemm = min(gemm.values())
    res: dict[str, Any] = {"items": items, "rank": rank, "top_n": top_n, "threads": threads,
                           "query_chunk": query_chunk, "candidate_block": candidate_block,
                           "mfsim_s": t_mfsim, "mfsim_full_kernel_s": t_full, "symmetric_equals_full": same,
                           "symmetric_agreement_with_full": agree, "bare_gemm_s": t_gemm, "bare_gemm_variants_s": gemm}
    print(f"  mfsim cosine + dot (half gemm)    {t_mfsim:8.2f}s")
    print(f"  mfsim full kernel (every tile)    {t_full:8.2f}s  (lists equal to the half-gemm ones: "
          + ", ".join(f"{m} {'yes' if same[m] else f'{agree[m]:.7f} of entries'}" for m in out) + ")")
    print(f"  bare gemm, same tiles            {t_gemm:8.2f}s  (BLAS-threaded {gemm['blas_threads']:.2f}s, "
          f"rows split over threads {gemm['split_rows']:.2f}s)")
    fa = _faiss(emb, top_n, threads)
    if fa is not None:
        dot_ids, cos_ids, t_faiss = fa
        res["faiss_s"] = t_faiss
        res["agreement_dot"] = _agreement(out["dot"].indices, dot_ids)
        res["agreement_cosine"] = _agreement(out["cosine"].indices, cos_ids)
        print(f"  faiss IndexFlatIP dot + cosine   {t_faiss:8.2f}s  (lists agree with mfsim: dot "
              f"{res['agreement_dot']:.5f}, cosine {res['agreement_cosine']:.5f})")
        res["mfsim_over_faiss"] = t_mfsim / t_faiss
        print(f"mfsim / faiss = {res['mfsim_over_faiss']:.2f}x (target <= 0.3)")
    res["mfsim_over_bare_gemm"] = t_mfsim / t_gemm
    print(f"mfsim / bare gemm = {res['mfsim_over_bare_gemm']:.2f}x (target <= 1.0)")

    if slice_items is None:
        slice_items = 1_000_000
    if slice_items:
        big = clustered_embeddings(slice_items, rank, seed=seed + 1)
        nq = min(slice_queries, slice_items)
        _, t_slice = _mfsim(big, nq, top_n, query_chunk, candidate_block, threads)
        g = _bare_gemm(big, nq, query_chunk, candidate_block, threads)
        scale = slice_items / nq
        res["slice"] = {"items": slice_items, "queries": nq, "mfsim_s": t_slice, "bare_gemm_s": min(g.values()),
                        "extrapolated_full_mfsim_s": t_slice * scale,
                        "extrapolated_full_bare_gemm_s": min(g.values()) * scale}
        print(f"slice: {nq:,} queries x {slice_items:,} candidates: mfsim full kernel {t_slice:.1f}s, bare gemm "
              f"{min(g.values()):.1f}s; all {slice_items:,} queries: mfsim ~{t_slice * scale / 60:.1f} min, "
              f"bare gemm ~{min(g.values()) * scale / 60:.1f} min")
    return res
