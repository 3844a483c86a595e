"""The registry of names: consistent with the kernels, the config and the planner that read it."""

from __future__ import annotations

import pytest

from mfsim.kernels.topn import METRICS as KERNEL_METRICS
from mfsim.pipeline import registry
from mfsim.pipeline.config import NeighboursSection, validate_config
from mfsim.pipeline.errors import MfsimError


def test_every_list_runs_on_a_kernel_metric_and_known_embeddings():
    embeddings = {"A", "B", "G", "A_proj", "P", "P_proj"}  # the names documented in the registry's docstring
    for (kind, metric), spec in registry.LISTS.items():
        assert kind in registry.KINDS
        assert spec.kernel_metric in KERNEL_METRICS
        assert {spec.queries, spec.candidates} <= embeddings
        # item lists query items, user lists query users (P = X A): "P" never names an item embedding
        assert spec.queries.startswith("P") == kind.startswith("user")


def test_config_defaults_and_validation_come_from_the_registry():
    section = NeighboursSection()
    for kind in registry.KINDS:  # every metric of a kind by default, but user-user lists (n^2 k) only when asked for
        assert tuple(getattr(section, kind)) == (() if kind == "user_user" else registry.metrics_of(kind))
    assert NeighboursSection(user_user=list(registry.metrics_of("user_user"))).user_user == ["cosine", "projected_cosine"]
    with pytest.raises(MfsimError, match="unknown metric 'model'; valid: dot, cosine"):
        validate_config({"neighbours": {"user_item": ["model"]}})
    names = [n for n in registry.EQ1_SCALINGS]
    with pytest.raises(MfsimError, match="unknown eq1 scaling 'nope'; valid: " + ", ".join(names)):
        validate_config({"objectives": {"eq1": {"scalings": ["nope"]}}})


def test_invariant_audit_metrics_are_the_scaling_invariant_item_lists():
    # Section 2 of the paper: a_i . b_j and the cosine of rows of A B^T do not depend on D; cos(b_i, b_j) does
    assert registry.INVARIANT_METRICS == ("model", "projected_cosine")
    assert not registry.LISTS[("item_item", "cosine")].scaling_invariant
