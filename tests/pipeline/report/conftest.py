"""Fixtures shared by the report's tests."""

from __future__ import annotations

import pyarrow as pa
import pytest


@pytest.fixture
def sweep_table() -> pa.Table:
    """A small ``evaluation/lambda_sweep.parquet``: two objectives, lambdas out of order, one chosen each."""
    return pa.table({"objective": ["eq1", "eq1", "eq1", "eq2", "eq2"],
                     "lambda": [100.0, 10.0, 1000.0, 2.0, 0.0],
                     "chosen": [True, False, False, False, True],
                     "n_users": pa.array([50] * 5, pa.int64()),
                     "recall@20": [0.2, 0.1, 0.15, 0.3, 0.31],
                     "ndcg@20": [0.25, 0.12, 0.2, 0.33, 0.35]})
