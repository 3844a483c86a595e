"""The ``mfsim bench`` benchmarks (``ingest``, ``svd``, ``neighbours``) and their shared measuring helpers."""
