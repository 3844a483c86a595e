"""mfsim: interaction logs -> MF embeddings and neighbour lists, with an audit of when their cosine
similarity is meaningful (Steck, Ekanadham & Kallus 2024, "Is Cosine-Similarity of Embeddings
Really About Similarity?").

The installed import name is ``mfsim``; its subpackages live in the repository's top-level
folders: ``mfsim.pipeline`` (``pipeline/``, the stages), ``mfsim.kernels`` (``kernels/``, numba
kernels on plain arrays) and ``mfsim.jobs`` (``jobs/``, the command line and the orchestration).

The Python API: ``mfsim.open_run(path)`` reads a published run (``pipeline/runs/results.py``) and
``mfsim.run_pipeline(config, **overrides)`` runs the job (``jobs/api.py``). Both are imported on
first use, so ``import mfsim`` stays cheap (no Dask, no pyarrow).
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("mfsim")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

# public name -> the module that defines it, imported on first attribute access (PEP 562)
_LAZY = {
    "open_run": "mfsim.pipeline.runs.results",
    "Run": "mfsim.pipeline.runs.results",
    "run_pipeline": "mfsim.jobs.api",
    "Model": "mfsim.jobs.estimator",
    "MfsimError": "mfsim.pipeline.errors",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'mfsim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
