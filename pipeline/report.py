"""The run report: item-item cosine heatmaps (the paper's Fig. 1), the spectrum, audit histograms.

Steck, Ekanadham & Kallus (2024), "Is Cosine-Similarity of Embeddings Really About Similarity?",
Fig. 1: on simulated data with item clusters, the item-item cosine similarity of the item
embeddings B of Eq. 1 shows a different block structure for each of its equally good solutions
``(A D, B D^-1)``, while the unique solution of Eq. 2 gives one picture. This module draws those
pictures for a run and assembles them, with the run's tables, into one HTML page.

Every function is pure: arrays in, ``bytes`` out (PNG images, or the page). Nothing here writes
files; the caller stores the page as ``report.html`` in the run.

Figures are drawn with matplotlib's object API (``Figure`` + ``FigureCanvasAgg``): no pyplot, no
global backend state, safe inside worker threads. PNGs carry no timestamp or version metadata, so
the same input gives the same bytes.

The page (:func:`render_report`) is self-contained: inline CSS, no scripts, no external fonts or
style sheets, and each figure inline as a ``data:image/png;base64`` URI, so ``report.html`` sent
alone shows everything.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.svd import flip_signs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DPI = 110  # ~440 px per 4-inch heatmap panel: a 1,000-item panel is downsampled ~2.3x, still readable
HEATMAP_CMAP = "RdBu_r"  # diverging: -1 blue, 0 white, +1 red; fixed to [-1, 1] in every panel
# Dense m x m cosine matrices are drawn in full; 4,096 items cost 4096^2 * 8 B = 128 MiB per
# panel, far more pixels than a panel has. Beyond that the caller must subsample (select_items).
MAX_HEATMAP_ITEMS = 4096
HIST_BINS = 20  # width 0.05 on [0, 1]
MAX_GRID_COLS = 4  # heatmap panels and histogram small multiples per row, at most
LAMBDA_KEYS = ("eq1", "eq2")  # keys of the lambdas of spectrum_png, as in objectives.*
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# --------------------------------------------------------------------------------------------
# Item order and subset


def item_order(
    *,
    cluster: np.ndarray | None = None,
    popularity: np.ndarray | None = None,
    v1: np.ndarray | None = None,
    n_items: int | None = None,
) -> np.ndarray:
    """Display order of the items in the heatmaps: a permutation of ``0..p-1``.

    Keys, in precedence order, each used when given:

    1. ``cluster`` ascending (ground truth, e.g. the simulator's items_truth),
    2. ``popularity`` descending (most popular item of each cluster first, as in Fig. 1),
    3. ``v1`` descending: a seriation by the first right singular vector. Its sign is arbitrary
       in an SVD, so it is first oriented to make its largest-magnitude entry positive; for a
       non-negative X, v1 is then non-negative (Perron-Frobenius) and the order runs from the
       items with the largest loading on the top component down,
    4. the item index (ties keep their index order: the sort is stable).

    With no key at all the order is the identity of length ``n_items``.

    Parameters
    ----------
    cluster : (p,) array, optional
        Cluster label per item (any sortable dtype).
    popularity : (p,) array, optional
        Popularity per item (e.g. interaction count); finite.
    v1 : (p,) array, optional
        First right singular vector of X (``V[:, 0]``); finite.
    n_items : int, optional
        p; needed only when no key is given, checked against the keys otherwise.

    Returns
    -------
    (p,) int64 array: ``order[j]`` is the item shown at position j.

    Notes
    -----
    O(p log p) time, O(p) memory.
    """
    keys: list[np.ndarray] = []  # np.lexsort: last key is the primary one
    p = n_items
    for name, arr, sign in (("v1", v1, -1.0), ("popularity", popularity, -1.0), ("cluster", cluster, None)):
        if arr is None:
            continue
        a = np.asarray(arr)
        if a.ndim != 1:
            raise MfsimError(f"{name} must be a 1-D array with one entry per item, got shape {a.shape}")
        if p is None:
            p = a.shape[0]
        elif a.shape[0] != p:
            raise MfsimError(
                f"{name} has {a.shape[0]} entries but {p} items were expected; "
                "pass cluster, popularity and v1 for the same items (and n_items = their count)"
            )
        if sign is None:  # cluster: any sortable labels, ascending
            keys.append(a)
            continue
        a = a.astype(np.float64)
        if not np.all(np.isfinite(a)):
            raise MfsimError(f"{name} must be finite, got {int(np.sum(~np.isfinite(a)))} NaN or inf entries")
        if name == "v1" and a.size:
            a = flip_signs(a[:, None])[0][:, 0]  # orient: largest |v1| entry positive
        keys.append(sign * a)  # descending
    if p is None:
        raise MfsimError("item_order needs cluster, popularity, v1 or n_items; got none of them")
    if int(p) < 0:
        raise MfsimError(f"n_items must be >= 0, got {p}")
    if not keys:
        return np.arange(int(p), dtype=np.int64)
    return np.lexsort(keys).astype(np.int64)  # lexsort is stable: ties keep the index order


def select_items(order: np.ndarray, max_items: int, seed: int | None = 0) -> np.ndarray:
    """At most ``max_items`` items of ``order``, evenly spread along it and in the same order.

    Systematic sampling: with p = len(order) > m = max_items and stride ``t = p / m``, the kept
    positions are ``floor(u + j t)`` for ``j = 0..m-1``, with one offset ``u`` drawn uniformly
    from ``[0, t)`` by ``numpy.random.default_rng(seed)`` (``seed=None``: ``u = t / 2``, the
    middle of each stride, no randomness). Every item is kept with the same probability m / p,
    the kept positions are strictly increasing (t > 1), and each stretch of the order (each
    cluster, when ordered by cluster) keeps its share of the panel, within one item.

    Parameters
    ----------
    order : (p,) int array
        Item indices in display order (from :func:`item_order`).
    max_items : int
        m >= 1, e.g. ``report.heatmap_items``.
    seed : int or None, default 0
        Seed of the offset u.

    Returns
    -------
    (min(p, m),) int64 array: a subsequence of ``order`` (``order`` itself when p <= m).

    Notes
    -----
    O(m) time and memory (plus the copy of ``order`` when it is returned whole).
    """
    order = np.asarray(order)
    if order.ndim != 1:
        raise MfsimError(f"order must be a 1-D array of item indices, got shape {order.shape}")
    m = int(max_items)
    if m < 1:
        raise MfsimError(f"max_items must be >= 1, got {max_items}; set report.heatmap_items >= 2")
    p = order.shape[0]
    if p <= m:
        return order.astype(np.int64, copy=True)
    t = p / m
    u = t / 2 if seed is None else float(np.random.default_rng(seed).uniform(0.0, t))
    pos = np.floor(u + np.arange(m) * t).astype(np.int64)  # < u + (m-1) t < m t = p
    np.minimum(pos, p - 1, out=pos)  # guard against rounding of u + (m-1) t up to p
    return order[pos].astype(np.int64)


def cluster_boundaries(labels_in_order: np.ndarray) -> np.ndarray:
    """Positions ``j`` (1..m-1) where the label changes between display position j-1 and j.

    Pass ``cluster[items]`` for the displayed ``items``; the result is the ``boundaries``
    argument of the heatmap functions (lines are drawn between j-1 and j).
    """
    lab = np.asarray(labels_in_order)
    if lab.ndim != 1:
        raise MfsimError(f"labels must be a 1-D array, got shape {lab.shape}")
    return (np.flatnonzero(lab[1:] != lab[:-1]) + 1).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Numbers behind the pictures


def cosine_matrix(B: np.ndarray) -> np.ndarray:
    """Item-item cosine similarity of the rows of B: ``C = N B B^T N``, ``N = diag(1/||b_i||)``.

    A zero row has similarity 0 with every row, itself included (it has no direction).

    Parameters
    ----------
    B : (m, k) array
        Embeddings of the m displayed items (m <= MAX_HEATMAP_ITEMS).

    Returns
    -------
    (m, m) float64 array in [-1, 1].

    Notes
    -----
    O(m^2 k) time, O(m^2) memory: dense, for a displayed subset only (never the catalogue).
    """
    B = np.asarray(B)
    if B.ndim != 2:
        raise MfsimError(f"expected item embeddings of shape (m, k), got shape {B.shape}")
    if B.shape[0] > MAX_HEATMAP_ITEMS:
        raise MfsimError(
            f"a heatmap draws at most {MAX_HEATMAP_ITEMS} items, got {B.shape[0]}; "
            "subsample with select_items (report.heatmap_items)"
        )
    B = B.astype(np.float64)
    if not np.all(np.isfinite(B)):
        raise MfsimError("item embeddings contain NaN or inf; check the factors of this objective")
    norms = np.linalg.norm(B, axis=1)
    inv = np.zeros_like(norms)
    np.divide(1.0, norms, out=inv, where=norms > 0)  # zero rows -> zero direction
    Bn = B * inv[:, None]
    return np.clip(Bn @ Bn.T, -1.0, 1.0)  # C = N B B^T N; clip float64 round-off past +-1


def shrinkage_weights(sigma: np.ndarray, lambdas: Mapping[str, float]) -> dict[str, np.ndarray]:
    """Per-component weights of ``A B^T = V_k diag(w) V_k^T`` for each objective in ``lambdas``.

    - ``"eq1"`` (Eq. 1): ``w_i = s_i^2 / (s_i^2 + lambda_1)``, 1/2 at ``s_i = sqrt(lambda_1)``.
    - ``"eq2"`` (Eq. 2): ``w_i = (1 - lambda_2 / s_i)_+`` (the product of the A and B scales,
      ``sqrt((1/s)(1 - lam/s)_+) * sqrt(s (1 - lam/s)_+)``), 0 for ``s_i <= lambda_2``.

    Components with ``s_i = 0`` get weight 0.

    Returns
    -------
    dict with the keys of ``lambdas``, each a (k,) float64 array in [0, 1].
    """
    s = _check_sigma(sigma)
    lams = _check_lambdas(lambdas)
    out: dict[str, np.ndarray] = {}
    live = s > 0
    for key, lam in lams.items():
        w = np.zeros_like(s)
        if key == "eq1":
            s2 = s * s
            np.divide(s2, s2 + lam, out=w, where=live)  # w = s^2 / (s^2 + lam)
        else:
            np.divide(lam, s, out=w, where=live)
            w = np.where(live, np.maximum(1.0 - w, 0.0), 0.0)  # w = (1 - lam/s)_+
        out[key] = w
    return out


# --------------------------------------------------------------------------------------------
# Figures


def cosine_heatmap_png(
    B_sub: np.ndarray,
    title: str,
    boundaries: Sequence[int] | np.ndarray | None = None,
    *,
    axis_label: str = "item (display order)",
) -> bytes:
    """PNG of the item-item cosine similarity of the rows of ``B_sub`` (one panel of Fig. 1).

    Parameters
    ----------
    B_sub : (m, k) array
        Item embeddings of the displayed items, rows in display order
        (``B[select_items(item_order(...), max_items)]``).
    title : str
        Panel title, e.g. ``"Eq. 1, symmetric"``.
    boundaries : sequence of int, optional
        Positions 1..m-1 at which to draw cluster boundary lines (:func:`cluster_boundaries`).
    axis_label : str
        Label of both axes.

    Returns
    -------
    bytes of a PNG: heatmap with a diverging colour map fixed to [-1, 1] and a colour bar.

    Notes
    -----
    O(m^2 k) time and O(m^2) memory for the cosine matrix (m <= MAX_HEATMAP_ITEMS), plus the
    rendering, ~0.1-0.5 s.
    """
    C = cosine_matrix(B_sub)
    b = _check_boundaries(boundaries, C.shape[0])
    fig = Figure(figsize=(5.6, 4.8), layout="constrained")
    ax = fig.add_subplot()
    im = _draw_heatmap(ax, C, title, b, axis_label)
    cb = fig.colorbar(im, ax=ax, shrink=0.9)
    cb.set_label("cosine similarity")
    return _png(fig)


def heatmap_grid_png(
    panels: Sequence[tuple[str, np.ndarray]],
    boundaries: Sequence[int] | np.ndarray | None = None,
    *,
    axis_label: str = "item (display order)",
) -> bytes:
    """PNG of several cosine heatmaps side by side, one per (objective, scaling), as in Fig. 1.

    Parameters
    ----------
    panels : list of (title, B_sub)
        B_sub (m, k_j) item embeddings of the same m items in the same display order for every
        panel (k_j may differ). Up to MAX_GRID_COLS panels per row; more wrap into balanced rows.
    boundaries : sequence of int, optional
        Cluster boundary positions shared by all panels (:func:`cluster_boundaries`).
    axis_label : str
        Label of the axes of the bottom-left panel.

    Returns
    -------
    bytes of a PNG with one shared colour bar on [-1, 1].

    Notes
    -----
    O(P m^2 k) time and O(P m^2) memory for P panels (each cosine matrix is kept as float32
    until the figure is rendered: 4 MB per 1,000-item panel).
    """
    panels = list(panels)
    if not panels:
        raise MfsimError("heatmap_grid_png needs at least one (title, embeddings) panel, got none")
    m = None
    mats = []
    for title, B in panels:
        C = cosine_matrix(B)
        if m is None:
            m = C.shape[0]
        elif C.shape[0] != m:
            raise MfsimError(
                f"panel {title!r} has {C.shape[0]} items but the first panel has {m}; "
                "pass the embeddings of the same displayed items to every panel"
            )
        mats.append((str(title), C.astype(np.float32)))
    b = _check_boundaries(boundaries, m)
    n = len(mats)
    nrows = math.ceil(n / MAX_GRID_COLS)
    ncols = math.ceil(n / nrows)  # balanced rows: 5 panels -> 3 + 2, not 4 + 1
    fig = Figure(figsize=(3.7 * ncols + 0.9, 3.7 * nrows + 0.2), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    im = None
    for idx, ax in enumerate(axes.ravel()):
        if idx >= n:
            ax.set_axis_off()
            continue
        r, c = divmod(idx, ncols)
        title, C = mats[idx]
        label = axis_label if (r == nrows - 1 or idx + ncols >= n) and c == 0 else None
        im = _draw_heatmap(ax, C, title, b, label)
    cb = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.85 if nrows == 1 else 0.6)
    cb.set_label("cosine similarity")
    return _png(fig)


def spectrum_png(sigma: np.ndarray, lambdas: Mapping[str, float]) -> bytes:
    """PNG of the singular values of X with the thresholds of Eq. 1 and Eq. 2, and the weights.

    Top panel: ``s_i`` against the component index on a log axis, with a horizontal line at
    ``lambda_2`` (Eq. 2 keeps the components with ``s_i > lambda_2``) and one at
    ``sqrt(lambda_1)`` (Eq. 1's weight ``w_i = s_i^2 / (s_i^2 + lambda_1)`` is 1/2 there).
    Bottom panel: the weights of :func:`shrinkage_weights` per component.

    Parameters
    ----------
    sigma : (k,) array
        Singular values of X (finite, >= 0), in SVD order. Zeros are not drawn on the log axis.
    lambdas : dict
        ``{"eq1": lambda_1, "eq2": lambda_2}``, either key optional (skipped objectives).

    Returns
    -------
    bytes of a PNG.
    """
    s = _check_sigma(sigma)
    weights = shrinkage_weights(s, lambdas)
    lams = _check_lambdas(lambdas)
    idx = np.arange(1, s.shape[0] + 1)
    fig = Figure(figsize=(7.5, 6.0), layout="constrained")
    ax, axw = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    pos = s > 0
    marker = "o" if s.shape[0] <= 60 else None
    ax.plot(idx[pos], s[pos], color="0.15", marker=marker, ms=3, lw=1.2, label=r"singular value $s_i$")
    if np.any(pos):
        ax.set_yscale("log")
    styles = {"eq1": dict(color="tab:orange", ls="--"), "eq2": dict(color="tab:blue", ls="-.")}
    if "eq2" in lams:
        lam2 = lams["eq2"]
        kept = int(np.sum(s > lam2))
        if lam2 > 0:
            ax.axhline(lam2, lw=1.2, **styles["eq2"],
                       label=rf"Eq. 2: $\lambda_2$ = {lam2:.4g} (keeps $s_i > \lambda_2$: {kept} of {s.size})")
    if "eq1" in lams:
        lam1 = lams["eq1"]
        if lam1 > 0:
            ax.axhline(math.sqrt(lam1), lw=1.2, **styles["eq1"],
                       label=rf"Eq. 1: $\sqrt{{\lambda_1}}$ = {math.sqrt(lam1):.4g} ($w_i$ = 1/2)")
    ax.set_ylabel(r"$s_i$")
    ax.set_title("Spectrum of X and the shrinkage of Eq. 1 and Eq. 2")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    names = {"eq1": r"Eq. 1: $w_i = s_i^2/(s_i^2+\lambda_1)$", "eq2": r"Eq. 2: $w_i = (1-\lambda_2/s_i)_+$"}
    for key, w in weights.items():
        axw.plot(idx, w, marker=marker, ms=3, lw=1.2, label=names[key], **styles[key])
    axw.axhline(0.5, color="0.5", lw=0.8, ls=":")
    axw.set_ylim(-0.03, 1.03)
    axw.set_xlabel("component i")
    axw.set_ylabel(r"weight $w_i$")
    axw.set_title(r"weights of $A B^T = V_k\,\mathrm{diag}(w)\,V_k^T$", fontsize=9)
    axw.xaxis.set_major_locator(MaxNLocator(integer=True))
    axw.grid(True, alpha=0.3)
    if weights:
        axw.legend(loc="upper right", fontsize=8, framealpha=0.9)
    return _png(fig)


def histogram_png(values_by_label: Mapping[str, np.ndarray], title: str, xlabel: str) -> bytes:
    """PNG of one histogram on [0, 1] per label (small multiples), e.g. per-item Jaccard@N.

    Each panel has HIST_BINS bins of equal width on [0, 1], a dashed line at the median, and
    notes the number of values, their mean and median in its title. Panels share the x range; the y axis counts items.

    Parameters
    ----------
    values_by_label : dict of label -> (n,) array
        Values in [0, 1] (NaN not allowed), one comparison per label.
    title : str
        Figure title.
    xlabel : str
        Label of the x axes, e.g. ``"Jaccard@100 of the item's cosine neighbours"``.

    Returns
    -------
    bytes of a PNG.
    """
    items = list(values_by_label.items())
    if not items:
        raise MfsimError("histogram_png needs at least one labelled array of values, got none")
    data = []
    for label, vals in items:
        v = np.asarray(vals, dtype=np.float64).ravel()
        if not np.all(np.isfinite(v)) or np.any((v < 0) | (v > 1)):
            raise MfsimError(
                f"values of {label!r} must be finite and in [0, 1], got range "
                f"[{np.nanmin(v) if v.size else 0:g}, {np.nanmax(v) if v.size else 0:g}]; "
                "pass Jaccard similarities (or another measure on [0, 1])"
            )
        data.append((str(label), v))
    n = len(data)
    nrows = math.ceil(n / MAX_GRID_COLS)
    ncols = math.ceil(n / nrows)
    fig = Figure(figsize=(3.6 * ncols + 0.4, 2.9 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    bins = np.linspace(0.0, 1.0, HIST_BINS + 1)
    for idx, ax in enumerate(axes.ravel()):
        if idx >= n:
            ax.set_axis_off()
            continue
        label, v = data[idx]
        ax.hist(v, bins=bins, color="tab:blue", edgecolor="white", linewidth=0.5)
        ax.set_xlim(0.0, 1.0)
        if v.size:  # statistics in the title, where they cannot cover a bar
            stats = f"n = {v.size}, mean {v.mean():.3f}, median {np.median(v):.3f}"
            ax.axvline(float(np.median(v)), color="tab:red", lw=1.0, ls="--")
        else:
            stats = "n = 0"
        ax.set_title(textwrap.fill(label, 48) + "\n" + stats, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        r, c = divmod(idx, ncols)
        if c == 0:
            ax.set_ylabel("items")
        if r == nrows - 1 or idx + ncols >= n:
            ax.set_xlabel(xlabel, fontsize=9)
            ax.tick_params(labelbottom=True)
    fig.suptitle(title)
    return _png(fig)


# --------------------------------------------------------------------------------------------
# The page


def render_report(
    *,
    title: str,
    summary_lines: Sequence[str],
    tables: Mapping[str, pa.Table | Sequence[Mapping[str, Any]]],
    images: Mapping[str, bytes],
    captions: Mapping[str, str] | None = None,
    max_table_rows: int = 1000,
) -> bytes:
    """A self-contained HTML report, as UTF-8 bytes: one file, nothing beside it needed.

    The page has the title, the summary lines as a list, each table (in the given order) and
    each image with its caption. All text is escaped with ``html.escape``; floats are shown with
    4 significant digits. Styling is inline CSS; there are no scripts and no external
    resources: each image is inline, a ``data:image/png;base64`` URI, so the page can be mailed
    or opened from an object store on its own.

    Parameters
    ----------
    title : str
        Page heading and ``<title>``.
    summary_lines : list of str
        One bullet each.
    tables : dict of name -> pyarrow.Table or list of dict rows
        For row dicts, the columns are the union of the keys in first-seen order (missing cells
        are empty). Tables longer than ``max_table_rows`` show their first rows and say so.
    images : dict of name -> PNG bytes
        Name: letters, digits, ``_ . -`` (``.png`` optional); it is the figure's label.
    captions : dict of name -> str, optional
        Caption of the image or table of that name (image names with or without ``.png``).
    max_table_rows : int, default 1000
        Rows shown per table.

    Returns
    -------
    bytes: the HTML page (UTF-8).
    """
    captions = dict(captions or {})
    if int(max_table_rows) < 1:
        raise MfsimError(f"max_table_rows must be >= 1, got {max_table_rows}")
    files: dict[str, bytes] = {}
    img_entries: list[tuple[str, str]] = []  # (file name, key as given)
    for key, data in images.items():
        fname = str(key) if str(key).endswith(".png") else f"{key}.png"
        if not _SAFE_NAME.match(fname):
            raise MfsimError(
                f"image name {key!r} is not a plain file name; use letters, digits, '_', '.', '-'"
            )
        if fname in files:
            raise MfsimError(f"two images map to the file {fname!r}; give them distinct names")
        if not isinstance(data, (bytes, bytearray)) or not bytes(data).startswith(PNG_MAGIC):
            raise MfsimError(f"image {key!r} is not PNG bytes; pass the output of the *_png functions")
        files[fname] = bytes(data)
        img_entries.append((fname, str(key)))

    def caption_of(*names: str) -> str | None:
        for nm in names:
            if nm in captions:
                return captions[nm]
        return None

    known = {k for f, k in img_entries} | {f for f, _ in img_entries} | {str(t) for t in tables}
    unknown = sorted(set(map(str, captions)) - known)
    if unknown:
        raise MfsimError(f"captions for unknown images or tables: {unknown}; valid names: {sorted(known)}")

    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(str(title))}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(str(title))}</h1>",
    ]
    if summary_lines:
        parts.append('<ul class="summary">')
        parts.extend(f"<li>{esc(str(line))}</li>" for line in summary_lines)
        parts.append("</ul>")
    for i, (name, table) in enumerate(tables.items()):
        parts.append(f'<section id="table-{i}">')
        parts.append(f"<h2>{esc(str(name))}</h2>")
        cap = caption_of(str(name))
        if cap is not None:
            parts.append(f'<p class="caption">{esc(str(cap))}</p>')
        parts.append(_table_html(table, int(max_table_rows), str(name)))
        parts.append("</section>")
    if img_entries:
        parts.append('<section id="figures">')
        parts.append("<h2>Figures</h2>")
        for fname, key in img_entries:
            cap = caption_of(key, fname)
            alt = cap if cap is not None else key
            parts.append("<figure>")
            data_uri = "data:image/png;base64," + base64.b64encode(files[fname]).decode("ascii")
            parts.append(f'<img src="{data_uri}" alt="{esc(str(alt))}">')
            label = f"{fname}: {cap}" if cap is not None else fname
            parts.append(f"<figcaption>{esc(str(label))}</figcaption>")
            parts.append("</figure>")
        parts.append("</section>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts).encode("utf-8")


_CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;"
    "margin:1.5em auto;max-width:1500px;padding:0 1em;color:#222;line-height:1.4}"
    "h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:.2em}"
    "h2{font-size:1.2em;margin-top:1.6em}"
    "ul.summary li{margin:.15em 0}"
    "table{border-collapse:collapse;font-size:.85em;margin:.4em 0 1em}"
    "th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}"
    "th{background:#f2f2f2}"
    "td.num{text-align:right;font-variant-numeric:tabular-nums}"
    "tr:nth-child(even) td{background:#fafafa}"
    "figure{margin:1em 0 2em}"
    "img{max-width:100%;height:auto;border:1px solid #eee}"
    "figcaption,p.caption,p.note{color:#555;font-size:.9em}"
)


# --------------------------------------------------------------------------------------------
# Helpers


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)  # attaches an Agg canvas: no pyplot, no global backend
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})  # no version stamp
    return buf.getvalue()


def _draw_heatmap(ax, C: np.ndarray, title: str, boundaries: np.ndarray, axis_label: str | None):
    m = C.shape[0]
    im = ax.imshow(C, cmap=HEATMAP_CMAP, vmin=-1.0, vmax=1.0, interpolation="antialiased",
                   origin="upper", extent=(-0.5, m - 0.5, m - 0.5, -0.5))
    for b in boundaries:  # line between positions b-1 and b
        ax.axhline(b - 0.5, color="k", lw=0.6, alpha=0.8)
        ax.axvline(b - 0.5, color="k", lw=0.6, alpha=0.8)
    ax.set_title(textwrap.fill(title, 40), fontsize=10)
    if axis_label:
        ax.set_xlabel(axis_label, fontsize=9)
        ax.set_ylabel(axis_label, fontsize=9)
    ax.tick_params(labelsize=8)
    return im


def _check_boundaries(boundaries, m: int) -> np.ndarray:
    if boundaries is None:
        return np.zeros(0, dtype=np.int64)
    b = np.asarray(boundaries)
    if b.ndim != 1 or (b.size and not np.issubdtype(b.dtype, np.integer)):
        raise MfsimError(f"boundaries must be a 1-D array of integer positions, got {b.dtype} shape {b.shape}")
    if b.size and (b.min() < 1 or b.max() > m - 1):
        raise MfsimError(
            f"boundaries must lie in 1..{m - 1} for {m} items, got [{b.min()}, {b.max()}]; "
            "compute them with cluster_boundaries on the displayed items"
        )
    return b.astype(np.int64)


def _check_sigma(sigma) -> np.ndarray:
    s = np.asarray(sigma, dtype=np.float64)
    if s.ndim != 1:
        raise MfsimError(f"expected singular values of shape (k,), got shape {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise MfsimError("singular values must be finite and >= 0; check the SVD")
    return s


def _check_lambdas(lambdas: Mapping[str, float]) -> dict[str, float]:
    out = {}
    for key, lam in lambdas.items():
        if key not in LAMBDA_KEYS:
            raise MfsimError(f"unknown objective {key!r} in lambdas; valid: {', '.join(LAMBDA_KEYS)}")
        lam = float(lam)
        if not math.isfinite(lam) or lam < 0:
            raise MfsimError(f"lambda of {key} must be a finite number >= 0, got {lam!r}; set objectives.{key}.lambda")
        out[key] = lam
    return out


def _fmt(v: Any) -> tuple[str, bool]:
    """(text, is_number) of one table cell; floats with 4 significant digits."""
    if v is None:
        return "", False
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v)).lower(), False
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}", True
    if isinstance(v, (int, np.integer)):
        return str(int(v)), True
    if isinstance(v, (list, tuple, np.ndarray)):
        return "[" + ", ".join(_fmt(x)[0] for x in v) + "]", False
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)[0]}" for k, x in v.items()) + "}", False
    if isinstance(v, bytes):
        return v.hex(), False
    return str(v), False


def _table_html(table, max_rows: int, name: str) -> str:
    if isinstance(table, pa.Table):
        columns = list(table.column_names)
        n_total = table.num_rows
        rows = table.slice(0, max_rows).to_pylist()
    elif isinstance(table, Sequence) and not isinstance(table, (str, bytes)):
        columns = []
        seen = set()
        for row in table:
            if not isinstance(row, Mapping):
                raise MfsimError(
                    f"table {name!r} must be a pyarrow.Table or a list of dict rows, got a row of type "
                    f"{type(row).__name__}"
                )
            for k in row:
                if k not in seen:
                    seen.add(k)
                    columns.append(k)
        n_total = len(table)
        rows = list(table[:max_rows])
    else:
        raise MfsimError(f"table {name!r} must be a pyarrow.Table or a list of dict rows, got {type(table).__name__}")
    esc = html.escape
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{esc(str(c))}</th>" for c in columns) + "</tr></thead>", "<tbody>"]
    for row in rows:
        cells = []
        for c in columns:
            text, num = _fmt(row.get(c))
            cls = ' class="num"' if num else ""
            cells.append(f"<td{cls}>{esc(text)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    if n_total > len(rows):
        out.append(f'<p class="note">First {len(rows)} of {n_total} rows.</p>')
    if n_total == 0:
        out.append('<p class="note">No rows.</p>')
    return "\n".join(out)
