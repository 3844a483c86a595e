"""Publishing a run on an output root: the roots (``root``: one bookkeeping; ``posix``: a directory; ``object_store``:
an fsspec URL; ``roots.open_root``: the one way in), the run writers (``writer``), run ids and states (``records``),
the lock, storage (``storage``: where workers write their parts), and reading a published run (``results``)."""
