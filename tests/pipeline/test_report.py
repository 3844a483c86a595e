"""The report: item order and subset against brute-force references, figures decoded back from
their PNG bytes, the HTML page parsed back (escaping, references, no external resources)."""

from __future__ import annotations

import base64

import io
import re
from html.parser import HTMLParser

import matplotlib
import numpy as np
import pyarrow as pa
import pytest
from matplotlib.image import imread
from sklearn.metrics.pairwise import cosine_similarity

from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.report import (
    HEATMAP_CMAP,
    PNG_MAGIC,
    cluster_boundaries,
    cosine_heatmap_png,
    cosine_matrix,
    heatmap_grid_png,
    histogram_png,
    item_order,
    render_report,
    select_items,
    shrinkage_weights,
    spectrum_png,
)


def decode(png: bytes) -> np.ndarray:
    """The RGBA pixels of a PNG (floats in [0, 1]), after checking the signature."""
    assert isinstance(png, bytes) and png[:8] == PNG_MAGIC
    img = imread(io.BytesIO(png), format="png")
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert img.shape[0] > 100 and img.shape[1] > 100
    # a drawn figure, not a blank canvas: many distinct colours
    assert len(np.unique(img[..., :3].reshape(-1, 3), axis=0)) > 20
    return img


def count_colour(img: np.ndarray, rgb, tol: float = 0.03) -> int:
    """Pixels within tol (per channel; PNG quantises to 1/255) of one colour."""
    return int(np.sum(np.all(np.abs(img[..., :3] - np.asarray(rgb)[:3]) <= tol, axis=-1)))


# ---------------------------------------------------------------------------------------------
# item_order, select_items, cluster_boundaries


def test_item_order_cluster_then_popularity_hand_case():
    cluster = np.array([2, 0, 1, 0, 2, 1])
    pop = np.array([5, 1, 3, 7, 9, 3])
    # cluster 0: items 1 (pop 1), 3 (pop 7) -> 3, 1; cluster 1: 2, 5 tie at 3 -> index order;
    # cluster 2: 0 (pop 5), 4 (pop 9) -> 4, 0
    np.testing.assert_array_equal(item_order(cluster=cluster, popularity=pop), [3, 1, 2, 5, 4, 0])
    # without popularity: by cluster, ties in index order
    np.testing.assert_array_equal(item_order(cluster=cluster), [1, 3, 2, 5, 0, 4])


def test_item_order_matches_python_sort_with_ties():
    rng = np.random.default_rng(3)
    p = 300
    cluster = rng.integers(0, 5, p)
    pop = rng.integers(0, 8, p).astype(np.float32)  # many ties
    expect = sorted(range(p), key=lambda i: (cluster[i], -pop[i], i))
    got = item_order(cluster=cluster, popularity=pop)
    np.testing.assert_array_equal(got, expect)
    assert got.dtype == np.int64


def test_item_order_v1_seriation_is_sign_invariant():
    v1 = np.array([-0.1, -0.5, -0.3, -0.2, -0.3])
    # oriented so the largest |entry| is positive: [0.1, 0.5, 0.3, 0.2, 0.3]; descending, ties by index
    np.testing.assert_array_equal(item_order(v1=v1), [1, 2, 4, 3, 0])
    np.testing.assert_array_equal(item_order(v1=-v1), [1, 2, 4, 3, 0])
    mixed = np.array([0.2, -0.6, 0.1, 0.4])  # largest |entry| negative -> flipped: [-0.2, 0.6, -0.1, -0.4]
    np.testing.assert_array_equal(item_order(v1=mixed), [1, 2, 0, 3])


def test_item_order_identity_and_errors():
    np.testing.assert_array_equal(item_order(n_items=4), [0, 1, 2, 3])
    with pytest.raises(MfsimError, match="needs cluster, popularity, v1 or n_items"):
        item_order()
    with pytest.raises(MfsimError, match="cluster has 4 entries but 3 items"):
        item_order(cluster=np.zeros(4), popularity=np.ones(3))
    with pytest.raises(MfsimError, match="v1 has 3 entries but 5 items"):
        item_order(v1=np.ones(3), n_items=5)
    with pytest.raises(MfsimError, match="finite"):
        item_order(v1=np.array([0.1, np.nan]))


def test_select_items_keeps_order_and_size():
    rng = np.random.default_rng(1)
    order = rng.permutation(103)
    for seed in (0, 7, None):
        sub = select_items(order, 10, seed=seed)
        assert sub.shape == (10,)
        pos = np.argsort(order)[sub]  # positions of the kept items in the order
        assert np.all(np.diff(pos) > 0)  # a subsequence: strictly increasing positions
    np.testing.assert_array_equal(select_items(order, 10, seed=5), select_items(order, 10, seed=5))
    np.testing.assert_array_equal(select_items(order, 200), order)  # p <= m: all of them
    # seed=None: middle of each stride; p=10, m=4: t=2.5, u=1.25 -> floor(1.25, 3.75, 6.25, 8.75)
    np.testing.assert_array_equal(select_items(np.arange(10) * 10, 4, seed=None), [10, 30, 60, 80])
    with pytest.raises(MfsimError, match="max_items must be >= 1"):
        select_items(order, 0)


def test_select_items_equal_inclusion_and_cluster_shares():
    p, m = 10, 4
    counts = np.zeros(p)
    n_seeds = 2000
    for seed in range(n_seeds):
        counts[select_items(np.arange(p), m, seed=seed)] += 1
    # each item is kept with probability m/p = 0.4; binomial sd sqrt(0.24/2000) = 0.011, 0.05 is 4.5 sd
    np.testing.assert_allclose(counts / n_seeds, m / p, atol=0.05)
    # clusters of the order keep their share within one item (systematic sampling)
    cluster = np.repeat([0, 1, 2, 3, 4], [400, 50, 300, 7, 243])
    order = item_order(cluster=cluster)
    sub = select_items(order, 97, seed=3)
    share = np.bincount(cluster[sub], minlength=5)
    assert np.all(np.abs(share - 97 * np.bincount(cluster) / cluster.size) <= 1.0)


def test_cluster_boundaries_hand_case():
    np.testing.assert_array_equal(cluster_boundaries(np.array([0, 0, 1, 1, 1, 3, 4, 4])), [2, 5, 6])
    assert cluster_boundaries(np.array([2, 2, 2])).size == 0


# ---------------------------------------------------------------------------------------------
# numbers behind the pictures


def test_cosine_matrix_matches_sklearn_zero_rows_zero():
    rng = np.random.default_rng(2)
    B = rng.standard_normal((40, 6)).astype(np.float32)
    B[[3, 17]] = 0.0
    C = cosine_matrix(B)
    ref = cosine_similarity(B.astype(np.float64))  # sklearn: zero rows normalise to zero rows
    np.testing.assert_allclose(C, ref, atol=1e-12)  # both float64 of float32 inputs: round-off only
    assert np.all(C[3] == 0) and np.all(C[:, 17] == 0)
    assert C.min() >= -1 and C.max() <= 1
    # cosine is invariant to row scaling (not to column scaling D, the paper's point)
    np.testing.assert_allclose(cosine_matrix(B * rng.uniform(0.1, 10, (40, 1))), C, atol=1e-12)
    with pytest.raises(MfsimError, match="at most"):
        cosine_matrix(np.zeros((5000, 2)))


def test_shrinkage_weights_closed_forms():
    s = np.array([4.0, 2.0, 1.0, 0.0])
    w = shrinkage_weights(s, {"eq1": 4.0, "eq2": 2.0})
    # Eq. 1: s^2/(s^2+4) = 16/20, 4/8, 1/5, 0 (s=0 -> 0); 1/2 exactly at s = sqrt(lambda_1) = 2
    np.testing.assert_allclose(w["eq1"], [0.8, 0.5, 0.2, 0.0], rtol=1e-15)
    # Eq. 2: (1 - 2/s)_+ = 0.5, 0, 0, 0
    np.testing.assert_allclose(w["eq2"], [0.5, 0.0, 0.0, 0.0], rtol=1e-15)
    # Eq. 2 weight = product of the paper's A and B scales sqrt((1/s)(1-lam/s)_+) sqrt(s (1-lam/s)_+)
    rng = np.random.default_rng(0)
    s = np.sort(rng.uniform(0.1, 20, 30))[::-1]
    lam = 5.0
    a = np.sqrt((1 / s) * np.maximum(1 - lam / s, 0))
    b = np.sqrt(s * np.maximum(1 - lam / s, 0))
    np.testing.assert_allclose(shrinkage_weights(s, {"eq2": lam})["eq2"], a * b, rtol=1e-12, atol=1e-15)
    with pytest.raises(MfsimError, match="valid: eq1, eq2"):
        shrinkage_weights(s, {"eq3": 1.0})
    with pytest.raises(MfsimError, match=">= 0"):
        shrinkage_weights(s, {"eq1": -1.0})


# ---------------------------------------------------------------------------------------------
# figures


def test_cosine_heatmap_png_draws_the_signs_with_fixed_colour_scale():
    cmap = matplotlib.colormaps[HEATMAP_CMAP]
    e1 = np.array([[1.0, 0.0]])
    same = decode(cosine_heatmap_png(np.vstack([e1, e1]), "all +1"))  # C = [[1, 1], [1, 1]]
    anti = decode(cosine_heatmap_png(np.vstack([e1, -e1]), "+1 and -1"))  # C = [[1, -1], [-1, 1]]
    weak = decode(cosine_heatmap_png(np.vstack([e1, 0.1 * e1 - 0.995 * np.array([[0, 1]])]), "near 0"))
    blue, red = cmap(0.0), cmap(1.0)  # the colours of -1 and +1 on the fixed [-1, 1] scale
    # off-diagonal quadrants (half the panel) are -1 only in `anti`; `same` has -1 only at the
    # bottom of the colour bar
    assert count_colour(anti, blue) > 10 * count_colour(same, blue) + 1000
    assert count_colour(same, red) > 1.5 * count_colour(anti, red)
    # cosine 0.1 is drawn near white, not stretched to the ends of the scale
    assert count_colour(weak, blue) < count_colour(anti, blue) / 10
    assert same.shape == anti.shape  # same figure size whatever the data


def test_heatmap_png_boundaries_and_determinism():
    rng = np.random.default_rng(4)
    cluster = np.repeat(np.arange(5), 12)
    B = rng.standard_normal((5, 8))[cluster] + 0.3 * rng.standard_normal((60, 8))
    bnd = cluster_boundaries(cluster)
    png = cosine_heatmap_png(B, "Eq. 1, symmetric", bnd)
    decode(png)
    assert png == cosine_heatmap_png(B, "Eq. 1, symmetric", bnd)  # same input, same bytes
    with pytest.raises(MfsimError, match="boundaries must lie in 1..59"):
        cosine_heatmap_png(B, "t", [0, 12])


def test_heatmap_grid_png_panels_side_by_side():
    rng = np.random.default_rng(5)
    B = rng.standard_normal((50, 6))
    D = np.exp(rng.standard_normal(6))
    one = decode(heatmap_grid_png([("Eq. 1", B)]))
    three = decode(heatmap_grid_png([("Eq. 1", B), ("Eq. 1, B D^-1", B / D), ("Eq. 2", B[:, :4])],
                                    boundaries=[10, 30]))
    assert three.shape[1] > 2 * one.shape[1]  # three panels in one row
    assert three.shape[0] < 1.5 * one.shape[0]
    with pytest.raises(MfsimError, match="same displayed items"):
        heatmap_grid_png([("a", B), ("b", B[:40])])
    with pytest.raises(MfsimError, match="at least one"):
        heatmap_grid_png([])


def test_spectrum_png():
    rng = np.random.default_rng(6)
    sigma = np.sort(rng.exponential(10, 40))[::-1]
    decode(spectrum_png(sigma, {"eq1": 25.0, "eq2": 5.0}))
    decode(spectrum_png(np.array([3.0, 1.0, 0.0]), {"eq1": 0.0}))  # zero s and lambda: no log of 0
    with pytest.raises(MfsimError, match="finite and >= 0"):
        spectrum_png(np.array([1.0, -1.0]), {})


def test_histogram_png():
    rng = np.random.default_rng(7)
    img = decode(histogram_png({"eq1/symmetric vs D": rng.beta(2, 3, 200), "eq2": rng.beta(8, 1, 200),
                                "empty": np.array([])}, "Jaccard@10", "Jaccard@10"))
    one = decode(histogram_png({"a": rng.uniform(size=10)}, "t", "x"))
    assert img.shape[1] > 2 * one.shape[1]  # small multiples in one row
    with pytest.raises(MfsimError, match=r"in \[0, 1\]"):
        histogram_png({"a": np.array([0.5, 1.5])}, "t", "x")


# ---------------------------------------------------------------------------------------------
# the page


class _Page(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.starts: list[tuple[str, dict]] = []
        self.cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        self.starts.append((tag, dict(attrs)))
        if tag in ("td", "th"):
            self._in_cell = True
            self.cells.append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells[-1] += data


@pytest.fixture(scope="module")
def pngs():
    rng = np.random.default_rng(8)
    return {"heat": cosine_heatmap_png(rng.standard_normal((20, 3)), "h"),
            "jaccard.png": histogram_png({"a": rng.uniform(size=30)}, "j", "x")}


def test_render_report_references_escaping_and_no_network(pngs):
    evil = "<script>alert('x')</script>"
    tables = {
        "metrics": pa.table({"objective": ["eq1/symmetric", evil], "recall@10": [0.123456, 123456.7],
                             "n": pa.array([1, 2], pa.int64())}),
        "rows & <cols>": [{"a": 1 / 3, "b": "x"}, {"c": [1.5, 2.0 / 3.0], "a": None}],
    }
    out = render_report(title="Run <1>", summary_lines=["k = 20 & lambda = 10", evil], tables=tables,
                        images=pngs, captions={"heat": "Fig. 1 <analogue>", "metrics": "per objective"})
    assert isinstance(out, bytes)
    page = out.decode("utf-8")
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "&lt;script&gt;" in page
    parser = _Page()
    parser.feed(page)
    tags = [t for t, _ in parser.starts]
    assert "script" not in tags and "link" not in tags and "iframe" not in tags
    # self-contained: every resource is an inline data URI holding the very PNG bytes given
    refs = [a[k] for _, a in parser.starts for k in ("src", "href") if k in a]
    assert len(refs) == 2 and all(r.startswith("data:image/png;base64,") for r in refs)
    assert sorted(base64.b64decode(r.split(",", 1)[1]) for r in refs) == sorted([pngs["heat"], pngs["jaccard.png"]])
    assert tags.count("img") == 2
    # cells, after the browser's unescaping, show the text as given; floats with 4 significant digits
    cells = parser.cells
    assert evil in cells
    assert ["objective", "recall@10", "n"] == cells[:3]
    assert "0.1235" in cells and "1.235e+05" in cells
    assert ["a", "b", "c"] == cells[cells.index("a"):cells.index("a") + 3]  # union of row keys
    assert "0.3333" in cells and "[1.5, 0.6667]" in cells
    text = re.sub(r"<[^>]+>", "", page)
    assert "Run <1>" not in page and "Run &lt;1&gt;" in page
    assert "Fig. 1 &lt;analogue&gt;" in page and "per objective" in text


def test_render_report_row_limit_and_errors(pngs):
    t = pa.table({"x": np.arange(30, dtype=np.float64) / 7})
    out = render_report(title="t", summary_lines=[], tables={"big": t}, images={}, max_table_rows=5)
    page = out.decode()
    parser = _Page()
    parser.feed(page)
    assert len(parser.cells) == 1 + 5 and "First 5 of 30 rows" in page
    assert "<img" not in page
    with pytest.raises(MfsimError, match="plain file name"):
        render_report(title="t", summary_lines=[], tables={}, images={"../x": pngs["heat"]})
    with pytest.raises(MfsimError, match="not PNG"):
        render_report(title="t", summary_lines=[], tables={}, images={"x": b"GIF89a"})
    with pytest.raises(MfsimError, match="captions for unknown"):
        render_report(title="t", summary_lines=[], tables={}, images=pngs, captions={"nope": "c"})
    with pytest.raises(MfsimError, match="distinct names"):
        render_report(title="t", summary_lines=[], tables={}, images={"a": pngs["heat"], "a.png": pngs["heat"]})
