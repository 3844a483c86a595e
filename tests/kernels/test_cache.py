"""A new process loads the list kernels from numba's on-disk cache instead of compiling them again.

Every ``mfsim`` command and every Dask worker is a new process; a kernel that misses the cache costs a
compile (~2.5 s for ``select_tile``) in each of them. numba keys a cached version by the argument types, and an
omitted argument with an array default is typed by that array object, which is new in every process: such a kernel
never hits its cache. Two fresh interpreters run the same calls; the second must compile nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import json, sys
import numpy as np
from numba.core.registry import CPUDispatcher
from mfsim.kernels.topn import topn_blocked, topn_symmetric

rng = np.random.default_rng(0)
q = rng.standard_normal((50, 8)).astype(np.float32)
c = (rng.standard_normal((300, 8)) * rng.uniform(0.1, 3.0, (300, 1))).astype(np.float32)
indptr = np.arange(0, 51, dtype=np.int64)
indices = np.arange(50, dtype=np.int32)
topn_blocked(q, c, 5, metrics=("dot", "cosine"), candidate_block=64, query_chunk=16, n_threads=1)
topn_blocked(q, c, 5, metrics=("dot",), candidate_block=64, query_chunk=16, n_threads=1,
             exclude_indptr=indptr, exclude_indices=indices)
topn_symmetric(c, 5, metrics=("dot", "cosine"), tile=64, n_threads=1)
kernels = {id(f): f for name, mod in list(sys.modules.items()) if name.startswith("mfsim.")
           for f in list(vars(mod).values()) if isinstance(f, CPUDispatcher)}
hits = sum(sum(f.stats.cache_hits.values()) for f in kernels.values())
missed = sorted(f.__qualname__ for f in kernels.values() if sum(f.stats.cache_misses.values()))
print(json.dumps({"hits": hits, "missed": missed}))
"""


def _run() -> dict:
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_list_kernels_load_from_the_cache_in_a_new_process():
    _run()  # fills the cache where it is cold (a fresh clone)
    second = _run()
    assert second["missed"] == [], "compiled again in a new process"
    assert second["hits"] > 0  # the kernels were called and came from the cache
