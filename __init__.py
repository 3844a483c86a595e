"""mfsim: interaction logs -> MF embeddings and neighbour lists, with an audit of when their cosine
similarity is meaningful (Steck, Ekanadham & Kallus 2024, "Is Cosine-Similarity of Embeddings
Really About Similarity?").

The installed import name is ``mfsim``; its subpackages live in the repository's top-level
folders: ``mfsim.pipeline`` (``pipeline/``, the stages), ``mfsim.kernels`` (``kernels/``, numba
kernels on plain arrays) and ``mfsim.jobs`` (``jobs/``, the command line and the orchestration).
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("mfsim")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
