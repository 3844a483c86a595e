"""Every name a config, a list or a table uses, in one place: objectives, scalings, list kinds and metrics.

Steck, Ekanadham & Kallus (2024), Section 2: Eq. 1 has a family of equally good solutions
``(A D, B D^-1)``; the named ``EQ1_SCALINGS`` are choices of D. Eq. 2's solution is unique. A list
is a (kind, metric) pair (``LISTS``); those whose scores, or ranking, are the same for every Eq. 1
solution are ``scaling_invariant`` and are computed once, labelled ``scaling=invariant``.

The embeddings a list is computed from, by name (``ListSpec.queries`` / ``.candidates``):

- ``A``, ``B``: the factors (p x k), with ``A B^T`` the model of Eq. 1 / Eq. 2;
- ``G``: ``A diag(sqrt(|b| / |a|))``, with ``G G^T = A B^T`` (``pipeline.lists.neighbours.gram_factor``), so the
  model scores are one embedding's Gram matrix and their item-item lists are symmetric;
- ``A_proj``: ``A diag(|b|)``, whose rows have the inner products, hence the cosines, of the rows
  of ``A B^T`` (``pipeline.lists.neighbours.projected``);
- ``P``: the user embeddings ``P = X A`` (n x k), whose dot product with ``b_i`` is ``(X A B^T)_ui``;
- ``P_proj``: ``P diag(|b|)``, with the cosines of the rows of ``X A B^T``.

Config validation (``pipeline.config``), the list planner (``pipeline.lists.neighbours``), the audit
(``pipeline.lists.audit``) and the factors (``pipeline.model.factors``) take their names from here;
``ListSpec.kernel_metric`` is one of the top-N kernel's own metrics (``kernels.topn.METRICS``).
"""

from __future__ import annotations

from typing import NamedTuple

OBJECTIVES = ("eq1", "eq2", "cosine")

#: Label of the lists of Eq. 1 that are the same for every scaling (computed once).
INVARIANT = "invariant"
#: Label of Eq. 2's one solution.
UNIQUE = "unique"

#: Eq. 1 scaling name -> (alpha, beta): ``B = V diag(w^alpha s^beta)``, ``A = V diag(w^(1-alpha) s^-beta)``,
#: so that ``A B^T = V W V^T`` for every choice; ``custom`` takes them from ``objectives.eq1.custom``.
EQ1_SCALINGS: dict[str, tuple[float, float] | None] = {
    "symmetric": (0.5, 0.0),  # A = B = V W^1/2: the paper's Eq. 5 choice
    "item_orthonormal": (0.0, 0.0),  # B = V_k (orthonormal columns), A = V W
    "user_orthonormal": (1.0, 0.0),  # A = V_k (orthonormal columns), B = V W; X A = U_k S_k
    "eq2_like": (0.5, 0.5),  # D = diag(s^-1/2): B = V (W S)^1/2, A = V (W S^-1)^1/2, as in Eq. 2
    "custom": None,
}

KINDS = ("item_item", "user_item", "user_user")


class ListSpec(NamedTuple):
    """How one (kind, metric) list is computed: query and candidate embeddings, kernel metric."""

    queries: str
    candidates: str
    kernel_metric: str
    scaling_invariant: bool


#: (kind, metric) -> ListSpec, in the order lists are planned and documented.
LISTS: dict[tuple[str, str], ListSpec] = {
    ("item_item", "cosine"): ListSpec("B", "B", "cosine", False),  # cos(b_i, b_j): changes with D
    ("item_item", "dot"): ListSpec("B", "B", "dot", False),
    ("item_item", "model"): ListSpec("G", "G", "dot", True),  # g_i . g_j = (A B^T)_ij
    ("item_item", "projected_cosine"): ListSpec("A_proj", "A_proj", "cosine", True),  # cosine of rows of A B^T
    ("user_item", "dot"): ListSpec("P", "B", "dot", True),  # p_u . b_i = (X A B^T)_ui
    ("user_item", "cosine"): ListSpec("P", "B", "cosine", False),
    ("user_user", "cosine"): ListSpec("P", "P", "cosine", False),
    ("user_user", "projected_cosine"): ListSpec("P_proj", "P_proj", "cosine", True),  # cosine of rows of X A B^T
}


#: Lists that an objective does not have. The cosine-trained model (``pipeline.model.cosine_model``) scores with
#: ``gamma cos(x_u A, b_i)``, which is not a product ``A B^T`` linear in X: it has no item-item score matrix, so
#: no ``model`` and ``projected_cosine`` lists. Its cosine lists are its own scores, unique by construction, and
#: published once, under ``metric=cosine``: its embeddings all have length gamma^1/2 (a user without a direction:
#: none, ``users_without_cosine_list``), so their ``dot`` lists would be the same lists, scores times gamma.
UNDEFINED_LISTS: dict[str, frozenset[tuple[str, str]]] = {
    "cosine": frozenset({("item_item", "model"), ("item_item", "projected_cosine"),
                         ("user_user", "projected_cosine"), ("item_item", "dot"), ("user_item", "dot")}),
}


def list_defined(objective: str, kind: str, metric: str) -> bool:
    """Whether ``objective`` has the (kind, metric) list (see ``UNDEFINED_LISTS``)."""
    return (kind, metric) not in UNDEFINED_LISTS.get(objective, frozenset())


def metrics_of(kind: str) -> tuple[str, ...]:
    """The metrics of one list kind, in ``LISTS`` order."""
    return tuple(m for k, m in LISTS if k == kind)


#: Item-item metrics the cosine audit compares between equally good Eq. 1 solutions.
AUDIT_METRICS = ("cosine", "model", "projected_cosine")
#: Those of them that must come out identical for every solution (the audit's self-check).
INVARIANT_METRICS = tuple(m for m in AUDIT_METRICS if LISTS[("item_item", m)].scaling_invariant)


def check_names(names: list[str], valid: tuple[str, ...] | dict, what: str) -> list[str]:
    """``names`` without repeats, in order; a ``ValueError`` naming ``what`` and the valid names otherwise."""
    for name in names:
        if name not in valid:
            raise ValueError(f"unknown {what} {name!r}; valid: {', '.join(valid)}")
    return list(dict.fromkeys(names))

