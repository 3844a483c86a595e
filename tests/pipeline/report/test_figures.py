"""The report's figures decoded back from their PNG bytes: colours, panels, determinism, errors."""

from __future__ import annotations

import io

import matplotlib
import numpy as np
import pytest
from matplotlib.image import imread

from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.report.figures import (
    HEATMAP_CMAP,
    PNG_MAGIC,
    cosine_heatmap_png,
    displacement_png,
    heatmap_grid_png,
    histogram_png,
    lambda_sweep_png,
    pair_scatter_png,
    spectrum_png,
)
from mfsim.pipeline.report.samples import cluster_boundaries


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
# the figures of data without cluster truth


def test_heatmap_grid_png_limits_and_difference_panel():
    cmap = matplotlib.colormaps[HEATMAP_CMAP]
    e1, e2 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    B = np.vstack([e1, 0.995 * e2 + 0.0999 * e1])  # off-diagonal cosine ~0.1
    red = cmap(1.0)
    full = decode(heatmap_grid_png([("a", B)]))
    tight = decode(heatmap_grid_png([("a", B)], limits=(-0.1, 0.1)))
    # cosine 0.1 is near white on [-1, 1] but the end colour on [-0.1, 0.1]: the off-diagonal half turns red
    assert count_colour(tight, red) > count_colour(full, red) + 10_000
    rng = np.random.default_rng(18)
    X = rng.standard_normal((40, 4))
    d = np.exp(rng.standard_normal(4))
    two = decode(heatmap_grid_png([("a", X), ("b", X / d)]))
    three = decode(heatmap_grid_png([("a", X), ("b", X / d)], difference=("a minus b", X, X / d)))
    assert three.shape[1] > 1.3 * two.shape[1]  # one more panel, with its own colour bar
    with pytest.raises(MfsimError, match="vmin < vmax"):
        heatmap_grid_png([("a", X)], limits=(0.5, 0.5))
    with pytest.raises(MfsimError, match="same 40 displayed items"):
        heatmap_grid_png([("a", X)], difference=("d", X, X[:30]))


def test_pair_scatter_and_displacement_and_sweep_pngs(sweep_table):
    rng = np.random.default_rng(19)
    x = rng.uniform(-1, 1, 500)
    decode(pair_scatter_png(x, np.clip(x + 0.3 * rng.standard_normal(500), -1, 1), x, x, ("eq1 / a", "eq1 / b")))
    with pytest.raises(MfsimError, match="same non-zero length"):
        pair_scatter_png(x, x[:10], x, x, ("a", "b"))
    disp = np.where(rng.uniform(size=(30, 10)) < 0.4, np.inf, rng.integers(-9, 10, (30, 10)).astype(float))
    one = decode(displacement_png({"cosine": disp}, 10, "t"))
    two = decode(displacement_png({"cosine": disp, "model": np.zeros((30, 10))}, 10, "t"))
    assert two.shape[1] > 1.7 * one.shape[1]
    decode(lambda_sweep_png(sweep_table, "ndcg@20"))  # eq2 has a lambda 0: left off the log axis
    with pytest.raises(MfsimError, match="select_metric"):
        lambda_sweep_png(sweep_table, "recall@5")
