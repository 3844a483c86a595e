"""The run report's figures as PNG bytes: Fig. 1-style cosine heatmaps, the spectrum, histograms, scatters.

Steck, Ekanadham & Kallus (2024), Fig. 1: on simulated data with item clusters, the item-item
cosine similarity of the item embeddings B of Eq. 1 shows a different block structure for each of
its equally good solutions ``(A D, B D^-1)``, while the unique solution of Eq. 2 gives one
picture. Besides those heatmaps: the spectrum with the shrinkage of Eq. 1 and Eq. 2, histograms of
the audit's Jaccards, cosine against model score of item pairs, rank displacement of top-N lists,
and the lambda sweep.

Figures are drawn with matplotlib's object API (``Figure`` + ``FigureCanvasAgg``): no pyplot, no
global backend state, safe inside worker threads. PNGs carry no timestamp or version metadata, so
the same input gives the same bytes.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.report.samples import check_boundaries, check_lambdas, check_sigma, cosine_matrix, \
    displacement_counts, off_diagonal, quantile_limits, shrinkage_weights, sweep_series

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DPI = 110  # ~440 px per 4-inch heatmap panel: a 1,000-item panel is downsampled ~2.3x, still readable
HEATMAP_CMAP = "RdBu_r"  # diverging: -1 blue, 0 white, +1 red; [-1, 1] unless limits are given
DIFF_CMAP = "PuOr_r"  # diverging, unlike HEATMAP_CMAP: a difference panel is not read as a cosine
HIST_BINS = 20  # width 0.05 on [0, 1]
MAX_GRID_COLS = 4  # heatmap panels and histogram small multiples per row, at most
CELL = 3.7  # inches of one heatmap panel with its tick labels and title
PANEL = 2.8  # inches of a heatmap panel's square
SIDE = 4.6  # inches of the difference panel's column: its cell and colour bar



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
    b = check_boundaries(boundaries, C.shape[0])
    fig = Figure(figsize=(5.6, 4.8))
    ax = _axes_at(fig, 0.75, 0.55, 3.85, 3.85)
    im = _draw_heatmap(ax, C, title, b, axis_label)
    cb = fig.colorbar(im, cax=_axes_at(fig, 4.75, 0.55 + 0.05 * 3.85, 0.15, 0.9 * 3.85))
    cb.set_label("cosine similarity")
    return _png(fig)


def heatmap_grid_png(
    panels: Sequence[tuple[str, np.ndarray]],
    boundaries: Sequence[int] | np.ndarray | None = None,
    *,
    axis_label: str = "item (display order)",
    limits: tuple[float, float] = (-1.0, 1.0),
    difference: tuple[str, np.ndarray, np.ndarray] | None = None,
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
    limits : (vmin, vmax), default (-1, 1)
        Colour limits shared by the panels (values outside take the end colours), e.g.
        :func:`quantile_limits` of the off-diagonal cosines with ``center=0``.
    difference : (title, B_a, B_b), optional
        Adds a last panel with the difference ``C_a - C_b`` of the cosines of two embeddings of the
        same displayed items (two of the panels, or a solution not shown, such as a random
        rescaling), with its own colour bar symmetric about 0 at the 1st / 99th percentile of its
        off-diagonal entries (:func:`quantile_limits`).

    Returns
    -------
    bytes of a PNG with one shared colour bar (and one for the difference panel).

    Notes
    -----
    O(P m^2 k) time and O(P m^2) memory for P panels (each cosine matrix is kept as float32
    until the figure is rendered: 4 MB per 1,000-item panel).
    """
    panels = list(panels)
    if not panels:
        raise MfsimError("heatmap_grid_png needs at least one (title, embeddings) panel, got none")
    vmin, vmax = (float(x) for x in limits)
    if not (math.isfinite(vmin) and math.isfinite(vmax) and vmin < vmax):
        raise MfsimError(f"limits must be finite with vmin < vmax, got {limits}")
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
    diff = None
    if difference is not None:
        d_title, B_a, B_b = difference
        C_a, C_b = cosine_matrix(B_a), cosine_matrix(B_b)
        if not C_a.shape == C_b.shape == (m, m):
            raise MfsimError(f"the difference panel needs embeddings of the same {m} displayed items, got "
                             f"{C_a.shape[0]} and {C_b.shape[0]} rows")
        D = (C_a - C_b).astype(np.float32)  # C_a - C_b
        lo, hi = quantile_limits(off_diagonal(D), center=0.0)
        diff = (str(d_title), D, lo, hi)
    b = check_boundaries(boundaries, m)
    n = len(mats)
    nrows = math.ceil(n / MAX_GRID_COLS)
    ncols = math.ceil(n / nrows)  # balanced rows: 5 panels -> 3 + 2, not 4 + 1
    width = CELL * ncols + 0.9  # the grid, then its colour bar and label
    height = CELL * nrows + 0.2
    fig = Figure(figsize=(width + SIDE * (diff is not None), height))

    def panel(x0: float, row: int):  # a square in its cell: tick labels and axis label left and below, title above
        return _axes_at(fig, x0 + 0.65, height - 0.1 - (row + 1) * CELL + 0.5, PANEL, PANEL)

    def colour_bar(im, x0: float, rows: int, label: str) -> None:  # beside the panels of `rows` rows, 85% as tall
        bottom, top = height - 0.1 - rows * CELL + 0.5, height - 0.1 - CELL + 0.5 + PANEL
        cb = fig.colorbar(im, cax=_axes_at(fig, x0, bottom + 0.075 * (top - bottom), 0.15, 0.85 * (top - bottom)))
        cb.set_label(label)

    if diff is not None:  # the difference in a column of its own, right of the grid, with its own colour bar
        title, D, lo, hi = diff
        im_d = _draw_heatmap(panel(width, 0), D, title, b, axis_label, lo, hi, cmap=DIFF_CMAP)
        colour_bar(im_d, width + 0.65 + PANEL + 0.12, 1, "difference of cosines")
    im = None
    for idx, (title, C) in enumerate(mats):
        r, c = divmod(idx, ncols)
        label = axis_label if (r == nrows - 1 or idx + ncols >= n) and c == 0 else None
        im = _draw_heatmap(panel(c * CELL, r), C, title, b, label, vmin, vmax)
    colour_bar(im, CELL * ncols + 0.1, nrows, "cosine similarity" if (vmin, vmax) == (-1.0, 1.0)
               else f"cosine similarity (limits {vmin:.2g} .. {vmax:.2g})")
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
    s = check_sigma(sigma)
    weights = shrinkage_weights(s, lambdas)
    lams = check_lambdas(lambdas)
    idx = np.arange(1, s.shape[0] + 1)
    fig = Figure(figsize=(7.5, 6.0))
    ax, axw = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    _margins(fig, 2, 1, left=0.8, right=0.15, bottom=0.55, top=0.4, hgap=0.45)
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


def histogram_png(values_by_label: Mapping[str, np.ndarray], title: str, xlabel: str, unit: str = "items") -> bytes:
    """PNG of one histogram on [0, 1] per label (small multiples), e.g. per-item Jaccard@N.

    Each panel has HIST_BINS bins of equal width on [0, 1], a dashed line at the median, and
    notes the number of values (``unit``: what one value is, e.g. ``items``), their mean and median in its title.
    Panels share the x range; the y axis counts ``unit``.

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
    fig = Figure(figsize=(3.6 * ncols + 0.4, 2.9 * nrows + 0.5))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    _margins(fig, nrows, ncols, left=0.7, right=0.15, bottom=0.5, top=1.05, wgap=0.6, hgap=0.8)
    bins = np.linspace(0.0, 1.0, HIST_BINS + 1)
    for idx, ax in enumerate(axes.ravel()):
        if idx >= n:
            ax.set_axis_off()
            continue
        label, v = data[idx]
        ax.hist(v, bins=bins, color="tab:blue", edgecolor="white", linewidth=0.5)
        ax.set_xlim(0.0, 1.0)
        if v.size:  # statistics in the title, where they cannot cover a bar
            stats = f"{v.size:,} {unit}\nmean {v.mean():.3f}, median {np.median(v):.3f}"
            ax.axvline(float(np.median(v)), color="tab:red", lw=1.0, ls="--")
        else:
            stats = f"no {unit}"
        ax.set_title(textwrap.fill(label, 44) + "\n" + stats, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        r, c = divmod(idx, ncols)
        if c == 0:
            ax.set_ylabel(unit)
        if r == nrows - 1 or idx + ncols >= n:
            ax.set_xlabel(xlabel, fontsize=9)
            ax.tick_params(labelbottom=True)
    fig.suptitle(title)
    return _png(fig)


def pair_scatter_png(cos_a: np.ndarray, cos_b: np.ndarray, model_a: np.ndarray, model_b: np.ndarray,
                     names: tuple[str, str]) -> bytes:
    """PNG of two scatter plots of the same item pairs under two solutions: cosine (left), model score (right).

    Left: ``cos(b_i, b_j)`` under solution ``names[0]`` (x) against ``names[1]`` (y); right: the model
    score ``a_i . b_j`` under the same two. Both panels have equal x and y ranges and the diagonal
    y = x; their titles give the Pearson correlation and the mean and largest ``|y - x|``. For two
    equally good solutions of Eq. 1 the model scores lie on the diagonal, the cosines do not.

    Parameters
    ----------
    cos_a, cos_b, model_a, model_b : (n,) arrays
        Per pair: cosine and model score under each solution (:func:`pair_cosine`, :func:`pair_model`).
    names : (str, str)
        Labels of the two solutions, e.g. ``("eq1 / symmetric", "eq1 / eq2_like")``.

    Returns
    -------
    bytes of a PNG.
    """
    series = [np.asarray(x, np.float64).ravel() for x in (cos_a, cos_b, model_a, model_b)]
    n = series[0].size
    if n == 0 or any(x.size != n for x in series):
        raise MfsimError(f"expected four arrays of the same non-zero length (one value per pair), got lengths "
                         f"{[x.size for x in series]}")
    if not all(np.all(np.isfinite(x)) for x in series):
        raise MfsimError("pair scores contain NaN or inf; check the factors")
    fig = Figure(figsize=(10.0, 4.9))
    axes = fig.subplots(1, 2)
    _margins(fig, 1, 2, left=0.7, right=0.2, bottom=0.5, top=0.85, wgap=0.9)
    size = 4 if n <= 2000 else 2
    for ax, (x, y), what in zip(axes, ((series[0], series[1]), (series[2], series[3])),
                                ("cosine $\\cos(b_i, b_j)$", "model score $a_i \\cdot b_j = (AB^T)_{ij}$")):
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        pad = 0.04 * (hi - lo) if hi > lo else 1.0
        lo, hi = lo - pad, hi + pad
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls="--", zorder=1)
        ax.scatter(x, y, s=size, alpha=0.35, color="tab:blue", linewidths=0, rasterized=True, zorder=2)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        gap = np.abs(y - x)
        r = float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else float("nan")
        ax.set_title(f"{what}\nr = {r:.3f}, mean |diff| {gap.mean():.3g}, max {gap.max():.3g}", fontsize=10)
        ax.set_xlabel(f"under {names[0]}", fontsize=9)
        ax.set_ylabel(f"under {names[1]}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"{n} random item pairs under two equally good solutions")
    return _png(fig)


def displacement_png(panels: Mapping[str, np.ndarray], n: int, title: str) -> bytes:
    """PNG of bar charts of rank displacement (:func:`rank_displacement`), one panel per label.

    Each bar is the share of list entries whose ``|rank_b - rank_a|`` falls in a bin of
    :func:`displacement_bins`; the last (red) bar is the share that left the top n. Panels share
    the y axis (0 to 1); titles give how many entries kept their rank exactly and how many left.

    Parameters
    ----------
    panels : dict label -> (q, n) array
        Displacements per list entry (+inf: left the list; NaN: no entry).
    n : int
        List length.
    title : str
        Figure title.
    """
    items = list(panels.items())
    if not items:
        raise MfsimError("displacement_png needs at least one labelled array of displacements, got none")
    fig = Figure(figsize=(5.2 * len(items) + 0.4, 4.0))
    axes = fig.subplots(1, len(items), squeeze=False, sharey=True)[0]
    _margins(fig, 1, len(items), left=0.65, right=0.15, bottom=0.95, top=0.85, wgap=0.3)
    for ax, (label, disp) in zip(axes, items):
        labels, counts = displacement_counts(disp, n)
        total = int(counts.sum())
        share = counts / total if total else counts.astype(np.float64)
        colors = ["tab:blue"] * (len(labels) - 1) + ["tab:red"]
        x = np.arange(len(labels))
        ax.bar(x, share, color=colors, edgecolor="white", linewidth=0.5)
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0.0, 1.0)
        ax.set_xlabel("|rank change| of an item of the list", fontsize=9)
        stay = share[0] if total else 0.0
        ax.set_title(f"{textwrap.fill(label, 56)}\n{total} entries: {stay:.0%} same rank, {share[-1]:.0%} left",
                     fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("share of list entries")
    fig.suptitle(title)
    return _png(fig)


def lambda_sweep_png(table: pa.Table, metric: str) -> bytes:
    """PNG of the held-out ``metric`` against lambda (log axis), one panel per objective, chosen lambda marked.

    Parameters
    ----------
    table : pyarrow.Table
        The lambda sweep (:func:`sweep_series`): ``objective``, ``lambda``, ``chosen``, and the
        metric column.
    metric : str
        E.g. ``"ndcg@20"`` (``evaluation.select_metric``).

    Returns
    -------
    bytes of a PNG. Lambdas <= 0 cannot sit on a log axis; the panel's title says how many were
    left out.
    """
    series = sweep_series(table, metric)
    if not series:
        raise MfsimError("the lambda sweep table has no rows; nothing to draw")
    n = len(series)
    fig = Figure(figsize=(4.6 * n + 0.5, 3.8))
    axes = fig.subplots(1, n, squeeze=False, sharey=True)[0]
    _margins(fig, 1, n, left=0.8, right=0.15, bottom=0.55, top=0.65, wgap=0.25)
    for ax, (obj, (lam, val, chosen)) in zip(axes, series.items()):
        pos = lam > 0
        ax.plot(lam[pos], val[pos], color="tab:blue", marker="o", ms=4, lw=1.2)
        if np.any(pos):
            ax.set_xscale("log")
        title = obj
        if np.any(~pos):
            title += f" ({int(np.sum(~pos))} lambda <= 0 not drawn)"
        for c in chosen:
            if c > 0:
                v = val[np.flatnonzero(lam == c)[0]]
                ax.axvline(c, color="tab:red", lw=0.9, ls=":")
                ax.plot([c], [v], marker="*", ms=14, color="tab:red", zorder=3,
                        label=f"chosen: lambda = {c:.4g}, {metric} = {v:.4f}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("lambda (log scale)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        if np.any(chosen > 0):
            ax.legend(loc="best", fontsize=8, framealpha=0.9)
    axes[0].set_ylabel(f"held-out {metric}")
    fig.suptitle(f"Held-out {metric} of each lambda tried")
    return _png(fig)


# --------------------------------------------------------------------------------------------
# Helpers


def _margins(fig: Figure, nrows: int, ncols: int, *, left: float, right: float, bottom: float, top: float,
             wgap: float = 0.0, hgap: float = 0.0) -> None:
    """A grid of subplots placed by fixed margins and gaps in inches (room for its tick labels, titles, suptitle).

    No layout engine: matplotlib's constrained layout measures every text of a figure in one more pass before it
    draws it, ~45% of the report's drawing time (ml-100k's report: 3.4 s)."""
    w, h = fig.get_size_inches()
    axes_w = (w - left - right - (ncols - 1) * wgap) / ncols
    axes_h = (h - bottom - top - (nrows - 1) * hgap) / nrows
    fig.subplots_adjust(left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h,
                        wspace=wgap / axes_w, hspace=hgap / axes_h)


def block_mean_factor(m: int) -> int:
    """The block size by which an m x m heatmap is averaged before drawing: the largest that keeps at least the
    panel's pixels (``PANEL`` x ``DPI``, 308) per side. A 1,000-item panel (3 items per pixel) is drawn from
    334 x 334 block means: the same picture, as the renderer averages them too, with a ninth of its resampling."""
    return max(1, m // int(PANEL * DPI))


def block_mean(C: np.ndarray, f: int) -> np.ndarray:
    """Means of the f x f blocks of the square C (the last blocks partial when f does not divide its side)."""
    m = C.shape[0]
    starts = np.arange(0, m, f)
    sizes = np.diff(np.append(starts, m)).astype(np.float64)
    sums = np.add.reduceat(np.add.reduceat(np.asarray(C, np.float64), starts, axis=0), starts, axis=1)
    return (sums / np.outer(sizes, sizes)).astype(np.float32)


def _axes_at(fig: Figure, x: float, y: float, width: float, height: float):
    """Axes whose box starts at (x, y) inches from the figure's lower left corner."""
    w, h = fig.get_size_inches()
    return fig.add_axes((x / w, y / h, width / w, height / h))


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)  # attaches an Agg canvas: no pyplot, no global backend
    buf = io.BytesIO()
    # no version stamp; zlib level 1: 2-3% larger files than the default 6, written in ~60% of the time
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None}, pil_kwargs={"compress_level": 1})
    return buf.getvalue()


def _draw_heatmap(ax, C: np.ndarray, title: str, boundaries: np.ndarray, axis_label: str | None,
                  vmin: float = -1.0, vmax: float = 1.0, cmap: str = HEATMAP_CMAP):
    m = C.shape[0]
    f = block_mean_factor(m)
    shown = block_mean(C, f) if f > 1 else C
    mp = shown.shape[0] * f  # m rounded up to blocks of f
    im = ax.imshow(shown, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="antialiased",
                   origin="upper", extent=(-0.5, mp - 0.5, mp - 0.5, -0.5))
    ax.set_xlim(-0.5, m - 0.5)
    ax.set_ylim(m - 0.5, -0.5)
    for b in boundaries:  # line between positions b-1 and b
        ax.axhline(b - 0.5, color="k", lw=0.6, alpha=0.8)
        ax.axvline(b - 0.5, color="k", lw=0.6, alpha=0.8)
    ax.set_title(textwrap.fill(title, 40), fontsize=10)
    if axis_label:
        ax.set_xlabel(axis_label, fontsize=9)
        ax.set_ylabel(axis_label, fontsize=9)
    ax.tick_params(labelsize=8)
    return im
