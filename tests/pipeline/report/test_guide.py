"""The report's table of which lists to use (``build.list_guide``), against the paper's reading of each list."""

from mfsim.pipeline.config import load_config
from mfsim.pipeline.report.build import list_guide


def test_which_lists_to_use_follows_the_paper():
    cfg = load_config(None, ["objectives.eq1.scalings=[symmetric,item_orthonormal]", "objectives.eq1.lambda=10",
                             "objectives.eq2.lambda=5", "neighbours.eq1_scalings=all"])
    pairs = [("eq1", "symmetric"), ("eq1", "item_orthonormal"), ("eq2", "unique"), ("cosine", "unique")]
    audit = {"top_n": 100, "metrics": {"cosine": {"mean_jaccard_mean": 0.48}}}
    rows = list_guide(pairs, cfg, audit)
    verdicts = {r["list"]: r["verdict"] for r in rows}
    assert verdicts == {
        # Eq. 1: the scores of A B^T, and the cosine of its rows, are the same for every solution
        "similar_items/objective=eq1/scaling=invariant/metric=model": "use",
        "similar_items/objective=eq1/scaling=invariant/metric=projected_cosine": "use",
        "recommendations/objective=eq1/scaling=invariant/metric=dot": "use",
        # the embeddings of one arbitrary D: each named scaling is one of them
        "similar_items/objective=eq1/scaling={symmetric, item_orthonormal}/metric=cosine": "do not use as a similarity",
        "similar_items/objective=eq1/scaling={symmetric, item_orthonormal}/metric=dot": "do not use as a similarity",
        "recommendations/objective=eq1/scaling={symmetric, item_orthonormal}/metric=cosine":
            "do not use as a similarity",
        # Eq. 2: unique, its scores to use, its cosines with care; the cosine-trained model: its cosines (its
        # dot lists are the same lists: not published)
        "similar_items/objective=eq2/scaling=unique/metric=model": "use",
        "similar_items/objective=eq2/scaling=unique/metric=projected_cosine": "use",
        "recommendations/objective=eq2/scaling=unique/metric=dot": "use",
        "similar_items/objective=eq2/scaling=unique/metric=cosine": "use with care",
        "similar_items/objective=eq2/scaling=unique/metric=dot": "use with care",
        "recommendations/objective=eq2/scaling=unique/metric=cosine": "use with care",
        "similar_items/objective=cosine/scaling=unique/metric=cosine": "use",
        "recommendations/objective=cosine/scaling=unique/metric=cosine": "use",
    }
    assert [r["verdict"] for r in rows] == sorted((r["verdict"] for r in rows),
                                                  key=["use", "use with care", "do not use as a similarity"].index)
    moved = next(r for r in rows if r["list"].startswith("similar_items/objective=eq1/scaling={"))
    assert "48%" in moved["why"] and moved["read it with"] == (
        'run.similar_items(id, objective="eq1", metric="cosine", scaling="symmetric")')


def test_by_default_no_list_of_one_arbitrary_eq1_scaling_is_published():
    """``neighbours.eq1_scalings`` defaults to none: the guide (the run's published lists) then holds Eq. 1's
    invariant lists and no list of a named scaling; naming one scaling publishes that one's."""
    pairs = [("eq1", "symmetric"), ("eq1", "item_orthonormal"), ("eq2", "unique")]
    scalings = ["objectives.eq1.scalings=[symmetric,item_orthonormal]", "objectives.eq1.lambda=10",
                "objectives.eq2.lambda=5"]
    listed = {r["list"] for r in list_guide(pairs, load_config(None, scalings), None)}
    eq1 = {name for name in listed if "objective=eq1" in name}
    assert eq1 == {"similar_items/objective=eq1/scaling=invariant/metric=model",
                   "similar_items/objective=eq1/scaling=invariant/metric=projected_cosine",
                   "recommendations/objective=eq1/scaling=invariant/metric=dot"}
    assert "similar_items/objective=eq2/scaling=unique/metric=cosine" in listed
    one_scaling = load_config(None, [*scalings, "neighbours.eq1_scalings=[item_orthonormal]"])
    one = {r["list"] for r in list_guide(pairs, one_scaling, None)}
    assert one - listed == {"similar_items/objective=eq1/scaling={item_orthonormal}/metric=cosine",
                            "similar_items/objective=eq1/scaling={item_orthonormal}/metric=dot",
                            "recommendations/objective=eq1/scaling={item_orthonormal}/metric=cosine"}
