"""Progress of long stages, for the jobs: the mechanism lives in ``pipeline.progress`` (the SVD and the audit use it too)."""

from mfsim.pipeline.progress import Progress, progress

__all__ = ["Progress", "progress"]
