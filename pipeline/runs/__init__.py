"""Publishing a run on an output root: the run writers, the roots (a POSIX directory, an object-store prefix), run states, the lock, storage, and reading a published run."""
