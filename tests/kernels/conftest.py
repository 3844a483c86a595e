"""Fixtures shared by the top-N kernel tests."""

from __future__ import annotations

import pytest

import mfsim.kernels.topn as topn_module


@pytest.fixture(params=["unseeded", "seeded"])
def seeding(request, monkeypatch):
    """Runs a test without and with the sampled floor (forced on small data: every 3rd candidate)."""
    if request.param == "seeded":
        monkeypatch.setattr(topn_module, "_SEED_STRIDE", 3)
        monkeypatch.setattr(topn_module, "_SEED_MIN_SAMPLE", 1)
    else:
        monkeypatch.setattr(topn_module, "_SEED_MIN_SAMPLE", 10**12)
    return request.param
