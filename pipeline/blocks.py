"""X as CSR row blocks: plain arrays for the kernels, held on the Dask workers between stages.

A block is a ``CSRBlock`` (int64 ``indptr``, int32 ``indices``, float32 ``data``): the kernels take
these arrays directly. ``RowBlocks`` is the whole matrix: one block per contiguous range of rows,
each either a concrete ``CSRBlock`` (in-process) or a Dask future resolving to one (on a cluster).
Only ``gather`` brings every block into one process, for small data and tests. ``tree_reduce``
is the one reduction over per-block (or per-worker) partial results, in-process or on the client.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import scipy.sparse as sp

from mfsim.pipeline.shared import runner


@dataclass(frozen=True)
class CSRBlock:
    """Rows ``[row_start, row_start + n_rows)`` of X in CSR form, columns in ``[0, n_cols)``."""

    indptr: np.ndarray  # int64, (n_rows + 1,)
    indices: np.ndarray  # int32, (nnz,), sorted within each row, no duplicates
    data: np.ndarray  # float32, (nnz,)
    n_cols: int
    ts: np.ndarray | None = None  # int64 (nnz,): latest timestamp (us) of each entry, when kept

    @property
    def n_rows(self) -> int:
        """Number of rows in the block."""
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        """Number of stored entries."""
        return int(self.indptr[-1])

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_rows, n_cols)``."""
        return (self.n_rows, self.n_cols)

    def column_cumsum(self) -> np.ndarray:
        """int64 (n_cols + 1,): cumulative stored entries per column (``csr_t_matmat``'s panel split), computed once
        and kept with the block (a block's arrays never change; the cosine model's products read it at every
        evaluation)."""
        cum = self.__dict__.get("_column_cumsum")
        if cum is None:
            cum = np.zeros(self.n_cols + 1, dtype=np.int64)
            if self.n_cols and self.nnz:
                np.cumsum(np.bincount(self.indices[: self.nnz], minlength=self.n_cols), out=cum[1:])
            object.__setattr__(self, "_column_cumsum", cum)
        return cum

    def row_norms(self) -> np.ndarray:
        """float64 (n_rows,): the Euclidean norm of each row, computed once per block and kept with it."""
        norms = self.__dict__.get("_row_norms")
        if norms is None:
            data = self.data[: self.nnz].astype(np.float64)
            rows = np.repeat(np.arange(self.n_rows), np.diff(self.indptr))
            norms = np.sqrt(np.bincount(rows, weights=data * data, minlength=self.n_rows))
            object.__setattr__(self, "_row_norms", norms)
        return norms

    def to_scipy(self) -> sp.csr_matrix:
        """The block as a scipy CSR matrix sharing its arrays (no copy)."""
        return sp.csr_matrix((self.data, self.indices, self.indptr), shape=self.shape)

    @classmethod
    def from_scipy(cls, m: sp.spmatrix) -> "CSRBlock":
        """A block from any scipy sparse matrix: duplicates summed, indices sorted, dtypes cast."""
        m = sp.csr_matrix(m)
        m.sum_duplicates()
        m.sort_indices()
        return cls(
            indptr=m.indptr.astype(np.int64),
            indices=m.indices.astype(np.int32),
            data=m.data.astype(np.float32),
            n_cols=int(m.shape[1]),
        )

    def with_data(self, data: np.ndarray) -> "CSRBlock":
        """Same sparsity pattern, new values (used by preprocessing)."""
        return CSRBlock(self.indptr, self.indices, np.ascontiguousarray(data, dtype=np.float32), self.n_cols, self.ts)


@dataclass
class RowBlocks:
    """X (n x p) as a list of row blocks, local or on a Dask client.

    ``parts[b]`` holds rows ``row_offsets[b]:row_offsets[b+1]``; it is a ``CSRBlock`` when
    ``client`` is None, else a ``distributed.Future`` resolving to one.
    """

    parts: list[Any]
    row_offsets: np.ndarray  # int64, (n_blocks + 1,)
    n_cols: int
    client: Any = None
    nnz: int = field(default=-1)

    @property
    def n_rows(self) -> int:
        """Number of rows of X."""
        return int(self.row_offsets[-1])

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_rows, n_cols)`` of X."""
        return (self.n_rows, self.n_cols)

    @property
    def n_blocks(self) -> int:
        """Number of row blocks."""
        return len(self.parts)

    def map(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """``[fn(block, *args) for block in blocks]``: futures on the client (pure tasks: the same call, the same
        key), values locally.

        Large ``args`` should be shared first (``pipeline.shared.share``) so that they travel to
        each worker once and are recomputed, not lost, with a worker.
        """
        run = runner(self.client)
        return [run.submit(fn, part, *args, pure=True, **kwargs) for part in self.parts]

    def map_blocks(self, fn: Callable[..., CSRBlock], *args: Any) -> "RowBlocks":
        """A new RowBlocks with ``fn`` applied to each block (same rows, same columns)."""
        return RowBlocks(self.map(fn, *args), self.row_offsets.copy(), self.n_cols, self.client, self.nnz)

    def local_parts(self) -> list[CSRBlock]:
        """The blocks as ``CSRBlock``s in this process (gathered from the workers on a client)."""
        if self.client is None:
            return list(self.parts)
        return self.client.gather(self.parts)

    def stored(self) -> int:
        """Number of stored entries of X: ``nnz`` when known, else counted over the blocks (one round of tasks on a
        client) and kept."""
        if self.nnz < 0:
            self.nnz = int(sum(runner(self.client).gather(self.map(_block_nnz))))
        return self.nnz

    def here(self) -> "RowBlocks":
        """The same blocks in this process: gathered from the workers on a client, itself without one."""
        if self.client is None:
            return self
        return RowBlocks(self.local_parts(), self.row_offsets.copy(), self.n_cols, None, self.nnz)

    def gather(self) -> sp.csr_matrix:
        """All blocks as one scipy CSR matrix (for small data and tests)."""
        blocks = self.local_parts()
        if not blocks:
            return sp.csr_matrix((0, self.n_cols), dtype=np.float32)
        return sp.vstack([b.to_scipy() for b in blocks], format="csr").astype(np.float32)

    @classmethod
    def from_scipy(cls, m: sp.spmatrix, block_rows: int, client: Any = None) -> "RowBlocks":
        """Split a scipy matrix into row blocks of ``block_rows`` rows (scattered when a client is given).

        For tests and benchmarks: scattered blocks have no lineage, so they do not survive the loss
        of the worker that holds them (a run's blocks come from ``ingest``, task by task).
        """
        m = sp.csr_matrix(m)
        n = m.shape[0]
        starts = list(range(0, n, max(1, block_rows))) or [0]
        offsets = np.array(starts + [n], dtype=np.int64)
        parts = [CSRBlock.from_scipy(m[offsets[i] : offsets[i + 1]]) for i in range(len(starts))]
        if client is not None:
            parts = client.scatter(parts, hash=False)
        return cls(parts, offsets, int(m.shape[1]), client, int(m.nnz))


def _block_nnz(block: CSRBlock) -> int:
    return block.nnz


#: Iterative stages (the cosine model's L-BFGS evaluations) make one round of tasks over X's row blocks per step.
#: A round costs a Dask round trip and a transfer of its inputs whatever its size, and a cluster speeds it up
#: only as far as X has blocks (``ingest.block_rows`` = 65,536 users each); its arithmetic grows with
#: ``nnz x width`` (width: the columns of its products, 5k for a cosine-model evaluation). Up to this much work
#: per round the rounds run in this process, on X's blocks gathered once (12 bytes per non-zero), and cost only
#: their arithmetic. Measured on the 2-core machine, one cosine-model evaluation (k = 50) in process against a
#: round on the embedded 2-worker cluster: nnz 282k (1 block) 0.063 s vs 0.087 s; 935k (1 block) 0.23 vs 0.26;
#: 2.8M (4 blocks) 0.81 vs 0.88; 7.4M (7 blocks) 2.39 vs 2.16: the two cost the same at about 1.2e9
#: (nnz x width), and in process X is at most ~4M non-zeros (48 MB) on the driver below it.
ROUNDS_HERE_MAX_WORK = 1e9


#: Rounds whose work is dense top-N lists (the lambda sweep's held-out lists: users x items x k multiply-adds of
#: float32 gemm, one thread in this process, as on a worker) run in this process up to this much dense work per
#: round, beside the sparse limit above. Measured on the 2-core machine: ml-100k's sweep (943 users x 1,682 items x
#: 64, 1e8 per lambda) 4.0 s in process against 4.8 s as rounds of tasks on 2 workers; ``make run``'s (20,000
#: held-out users x 1,000 items x 50, 1e9 per lambda) 14.8 s against 14.1 s: one thread here is as fast as two
#: workers there at 1e9, so the limit is 1e9 (above it the workers' parallel gemm can only gain more).
LIST_ROUNDS_HERE_MAX_WORK = 1e9


#: A log of at most this many rows is read in this process (``ingest``'s ``here_max_rows``; its X's blocks then stay
#: here, and with them every later stage whose work is small): reading and encoding it costs less than the tasks'
#: round trips and the workers' first imports. Measured on the 2-core machine (in process against 2 workers):
INGEST_HERE_MAX_ROWS = 2_000_000


@contextmanager
def held_to_workers() -> Iterator[None]:
    """Inside, every stage runs on the workers whatever its size (``cluster.small_data_here: false``): the three
    limits above set below any size, as for data above them; restored on exit. The same results either way."""
    global INGEST_HERE_MAX_ROWS, ROUNDS_HERE_MAX_WORK, LIST_ROUNDS_HERE_MAX_WORK
    saved = INGEST_HERE_MAX_ROWS, ROUNDS_HERE_MAX_WORK, LIST_ROUNDS_HERE_MAX_WORK
    INGEST_HERE_MAX_ROWS, ROUNDS_HERE_MAX_WORK, LIST_ROUNDS_HERE_MAX_WORK = -1, -1.0, -1.0
    try:
        yield
    finally:
        INGEST_HERE_MAX_ROWS, ROUNDS_HERE_MAX_WORK, LIST_ROUNDS_HERE_MAX_WORK = saved


def lists_here(dense_work: float) -> bool:
    """Whether top-N lists of ``dense_work`` multiply-adds (queries x candidates x k) run in this process rather than
    as tasks (``LIST_ROUNDS_HERE_MAX_WORK``); the same lists bit for bit either way."""
    return dense_work <= LIST_ROUNDS_HERE_MAX_WORK


def rounds_where(X: RowBlocks, width: int, dense_work: float = 0.0) -> tuple[RowBlocks, str]:
    """``(X, where)`` for many rounds of ``width``-column products over X's blocks (and ``dense_work`` multiply-adds
    of top-N lists per round): X gathered into this process (``"driver"``) when a round's sparse work
    ``nnz x width`` is at most ``ROUNDS_HERE_MAX_WORK`` and its dense work at most ``LIST_ROUNDS_HERE_MAX_WORK``,
    else X as it is (``"workers"`` on a client). Results are the same bit for bit either way (each block's sums on
    one thread, combined in ``tree_reduce``'s fixed order; top-N ranges on one thread)."""
    if X.client is None:
        return X, "driver"
    if X.stored() * int(width) <= ROUNDS_HERE_MAX_WORK and lists_here(dense_work):
        return X.here(), "driver"
    return X, "workers"


def tree_reduce(parts: list[Any], combine: Callable[..., Any], *, client: Any = None, fan_in: int = 2,
                gather: bool = True) -> Any:
    """Reduce ``parts`` to one value with ``combine``, in a tree of fan-in ``fan_in``.

    Order of combination (fixed by ``len(parts)`` and ``fan_in`` alone, so a float reduction
    rounds the same in-process and on any number of workers): each level splits the list into
    consecutive groups of ``fan_in`` and replaces every group of two or more by
    ``combine(*group)``; a trailing group of one passes to the next level unchanged. With
    ``fan_in=2`` and parts 0..4 that is ``((0 + 1) + (2 + 3)) + 4``. One part is returned as it
    is, so ``combine`` must accept from 2 to ``fan_in`` arguments and each part must already be
    a value of the result's kind.

    Parameters
    ----------
    parts : list
        The partial results, at least one: values, or futures when ``client`` is given.
    combine : callable
        ``combine(*group) -> part``, pure.
    client : distributed.Client, optional
        When given, every ``combine`` is a task on it (``pure=False``) that takes its arguments
        where they are; only partial results travel, and the root's value is gathered.
    fan_in : int, default 2
        Parts per ``combine``, at least 2. Keep 2 for float sums (the order above); an exact
        reduction (a set union) can take more per task.
    gather : bool, default True
        On a client: gather the root's value (True), or return the root's future (False), for
        tasks that read the result with its lineage (``ingest``'s id maps).

    Returns
    -------
    The reduced value (gathered into this process when ``client`` is given and ``gather``).

    Notes
    -----
    Cost: about ``(len(parts) - 1) / (fan_in - 1)`` calls of ``combine`` in
    ``ceil(log_fan_in(len(parts)))`` levels; on a client the calls of a level run in parallel.
    Memory: a level's results; a task holds its ``fan_in`` inputs and its output.
    """
    if not parts:
        raise ValueError("tree_reduce needs at least one part, got an empty list")
    if fan_in < 2:
        raise ValueError(f"tree_reduce needs fan_in >= 2, got {fan_in}")

    run = runner(client)

    def apply(group: list[Any]) -> Any:
        return group[0] if len(group) == 1 else run.submit(combine, *group)

    while len(parts) > 1:
        parts = [apply(parts[i : i + fan_in]) for i in range(0, len(parts), fan_in)]
    return run.gather(parts[0]) if gather else parts[0]
