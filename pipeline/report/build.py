"""``report.html`` of a run: which figures apply and why the others do not, each figure with its sample and caption,
the summary, the headline, the published tables and the run's own tables.

The figures show Steck et al. (2024)'s point about Eq. 1 at a glance: its equally good solutions
``(A D, B D^-1)`` share the model score ``A B^T`` (Section 2) but not their cosines. Cosine against
model score of random item pairs under the two most different solutions; the rank displacement
of top-N lists under the audit's first random D; the audit's Jaccards; Fig. 1-style heatmaps with
a difference panel; the spectrum with the shrinkage of Eq. 1 and Eq. 2; the lambda sweep.
Samples (``report.pairs``, ``report.rank_items``) keep every figure O(sample x p k), never p x p.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Mapping

import numpy as np
import pyarrow as pa

from mfsim.pipeline import outputs
from mfsim.pipeline.config import Config, ReportSection
from mfsim.pipeline.ingest import IngestResult
from mfsim.pipeline.inputs import ItemTruth
from mfsim.pipeline.lists.audit import AuditResult, random_diagonals
from mfsim.pipeline.lists.evaluate import list_length
from mfsim.pipeline.lists.neighbours import plan_lists
from mfsim.pipeline.model.factors import scaled_columns
from mfsim.pipeline.model.fit import Fit
from mfsim.pipeline.progress import progress
from mfsim.pipeline.report.figures import displacement_png, heatmap_grid_png, histogram_png, lambda_sweep_png, \
    pair_scatter_png, spectrum_png
from mfsim.pipeline.report.page import flatten_config, render_report
from mfsim.pipeline.shared import runner
from mfsim.pipeline.report.samples import audit_jaccards, cluster_boundaries, cluster_order, cosine_matrix, \
    headline, item_order, most_different, off_diagonal, pair_sample, pair_scores, quantile_limits, rank_sample, \
    rescaling_displacement, select_items

# k-means clusters that order the heatmaps without cluster truth: 8 groups of ~125 of 1,000 items
# are large enough to show as blocks and few enough that their boundary lines do not crowd a panel
HEATMAP_CLUSTERS = 8
TABLE_TITLES = (("cluster_precision", "Cluster precision@N (the paper's Fig. 1 in numbers)"),
                ("evaluation", "Held-out recall@N and NDCG@N"), ("audit", "Cosine audit: stability"))
SWEEP_TITLE = "Lambda sweep: held-out metrics per lambda tried"
CONFIG_KEYS = ("input.path", "preprocess.binarize", "preprocess.column_weighting", "svd.rank", "svd.solver",
               "objectives.eq1.lambda", "objectives.eq1.scalings", "objectives.eq2.lambda", "objectives.cosine.lambda",
               "neighbours.top_n", "neighbours.item_item", "evaluation.holdout", "evaluation.cutoffs",
               "audit.draws", "audit.spread", "audit.top_n", "audit.max_items", "report.heatmap_items",
               "report.pairs", "report.rank_items", "report.seed")

@dataclass(frozen=True)
class Png:
    """A figure's PNG to draw: ``fn(*args, **kwargs)`` of ``report.figures`` on data already sampled (small: at most
    ``report.heatmap_items`` rows per panel, ``report.pairs`` pairs), so it can be drawn on a worker."""

    fn: Callable[..., bytes]
    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


def draw_png(png: Png) -> bytes:
    """One figure drawn (a task on a worker, or a call here)."""
    return png.fn(*png.args, **png.kwargs)


Drawing = Callable[[], tuple[Png, str]]  # one figure: its data sampled, (the PNG to draw, caption)

#: The figures whose data is sampled first (the rest follow in the page's order): the heat-map grid takes longest
#: to draw (0.66 s of 1.7 s of drawing at 200k x 50k), so on a client it is drawn while the others are sampled. The
#: pair figure precedes it: it picks the pair the heat maps show (``FigureInputs.found``).
DRAWN_FIRST = {"pairs": 0, "heatmaps": 1}


PAPER = ("Steck, Ekanadham and Kallus (2024), \u201cIs Cosine-Similarity of Embeddings Really About "
         "Similarity?\u201d (ACM Web Conference 2024 Companion; arXiv:2403.05440), show that a matrix factorization "
         "trained with the denoising objective (their Eq. 1: min ||X - X A B^T||^2 + lambda ||A B^T||^2) has a "
         "family of equally good solutions: with any diagonal D, (A D, B D^-1) fits exactly as well. The model "
         "scores A B^T are the same for all of them, but the cosine similarity of the embeddings A or B is not: "
         "it depends on the arbitrary D, so cosine neighbour lists of such embeddings can come out almost any "
         "way. The usual objective (Eq. 2, lambda (||X A||^2 + ||B||^2)) has one solution, whose cosines are "
         "fixed but shaped by the regularization. What is safe: the model scores themselves (the dot product "
         "A B^T, or X A B^T for a user), the cosine in the projected space (of the rows of A B^T or X A B^T), "
         "or a model trained with cosine similarity. This report measures how much this run's cosine lists "
         "move and says which of its lists to read.")


def list_guide(pairs: list[tuple[str, str]], cfg: Config, audit_summary: Mapping[str, Any] | None
               ) -> list[dict[str, str]]:
    """Which of the run's lists to read (``use``), read with care, or not read as a similarity, and why: one row per
    list kind, objective, scaling label and metric the run published, with the call that reads it."""
    n = cfg.neighbours
    cos = ((audit_summary or {}).get("metrics") or {}).get("cosine") or {}
    moved = "the audit measures how far"
    if cos.get("mean_jaccard_mean") is not None:
        moved = (f"here Eq. 1's item-item cosine lists share {cos['mean_jaccard_mean']:.0%} of their items on "
                 f"average between equally good solutions (audit, Jaccard@{audit_summary.get('top_n')})")
    calls = {"item_item": "similar_items", "user_item": "recommend", "user_user": "similar_users"}
    rows: dict[tuple, dict[str, str]] = {}
    for g in plan_lists(pairs, n.item_item, n.user_item, n.user_user, cfg.list_scalings()):
        for label in g.outputs.values():
            kind, o, s, m = label.kind, label.objective, label.scaling, label.metric
            named = s not in ("invariant", "unique")
            if o == "eq1" and not named:
                verdict, why = "use", {"model": "Eq. 1's model scores A B^T: the same for every equally good solution",
                                       "projected_cosine": "cosine of the rows of A B^T (items) or X A B^T (users): "
                                                           "the same for every equally good solution",
                                       "dot": "the model score (X A B^T)_ui: the same for every solution"}[m]
            elif o == "eq1":
                verdict = "do not use as a similarity"
                why = f"{m} of Eq. 1's embeddings under one arbitrary scaling D: it changes with D; {moved}"
            elif o == "cosine" and m == "cosine":
                verdict, why = "use", "the cosine-trained model's own scores: what it was trained for"
            elif o == "cosine":
                verdict, why = "use with care", ("the cosine-trained model scores with cosines: the norms a dot "
                                                 "product adds are not part of what it learned")
            elif m in ("model", "projected_cosine") or (kind == "user_item" and m == "dot"):
                verdict, why = "use", "Eq. 2's model scores, or the cosine of their rows (its solution is unique)"
            else:
                verdict, why = "use with care", ("Eq. 2's solution is unique, so its cosines are too, but the "
                                                 "regularization shapes them (the paper's Section 3)")
            key = (verdict, kind, o, m, "" if named else s)
            if key in rows:  # another named scaling of the same list
                rows[key]["list"] = rows[key]["list"].replace("}", f", {s}}}")
                continue
            call = f"run.{calls[kind]}(id, objective=\"{o}\", metric=\"{m}\"" + (
                f", scaling=\"{s}\")" if named else ")")
            rows[key] = {"verdict": verdict,
                         "list": f"{outputs.LIST_DATASETS[kind]}/objective={o}/scaling="
                                 + ("{" + s + "}" if named else s) + f"/metric={m}",
                         "read it with": call, "why": why}
    order = {"use": 0, "use with care": 1, "do not use as a similarity": 2}
    # a stable sort: within a verdict the lists stay as planned (Eq. 1, Eq. 2, cosine; items, then users)
    return sorted(rows.values(), key=lambda r: order[r["verdict"]])


@dataclass
class Figures:
    """The report's figures as they are drawn: ``inputs`` (what they read, and what one hands on to the next),
    ``drawn`` (name -> PNG bytes, or a future of them on a client), ``captions`` (name -> text)."""

    inputs: FigureInputs
    run: Any  # where the drawing runs (``pipeline.shared.runner``)
    drawn: dict[str, Any] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)

    def draw(self, figures: list[tuple[str, Drawing]]) -> None:
        """Sample and submit each figure of ``figures`` not drawn yet (``DRAWN_FIRST`` first): on a client each is
        drawn on a worker while the next one's data is sampled here; here one after another."""
        for name, draw in sorted(figures, key=lambda f: DRAWN_FIRST.get(f[0], len(DRAWN_FIRST))):
            if name in self.drawn:
                continue
            png, self.captions[name] = draw()  # its data, sampled here
            self.drawn[name] = self.run.submit(draw_png, png)
            del png


def new_figures(cfg: Config, fit: Fit, client: Any = None) -> Figures:
    """The ``Figures`` of a run, none drawn yet (``client``: drawn as tasks on its workers, else here)."""
    p, k = fit.V.shape
    inputs = FigureInputs(fit, fit.factors.of("eq1"), rcfg=cfg.report, spread=cfg.audit.spread,
                          d=random_diagonals(k, 1, cfg.audit.spread, cfg.audit.seed)[0],  # the audit's first random D
                          top_n=list_length(cfg.audit.top_n or cfg.neighbours.top_n, p - 1))
    return Figures(inputs, runner(client))


def _planned(figures: Figures, cfg: Config, data: IngestResult, *, truth: ItemTruth | None, labels: np.ndarray | None,
             audit: AuditResult | None, sweep: pa.Table | None) -> tuple[list[tuple[str, Drawing]], dict[str, str]]:
    """``plan_figures`` of a run: the figures that apply in the page's order, and the ones left out."""
    inputs = figures.inputs
    heatmap = partial(heatmaps_figure, inputs, labels=labels, item_counts=data.item_counts,
                      popularity=partial(truth_popularity, truth, cfg, data.item_ids))
    return plan_figures(inputs, audit=audit, audit_summary=dict(getattr(audit, "summary", None) or {}),
                        heatmap=heatmap, lambdas=objective_lambdas(inputs.fit), sweep=sweep,
                        select_metric=cfg.evaluation.select_metric)


def objective_lambdas(fit: Fit) -> dict[str, float]:
    """``{"eq1": lambda_1, "eq2": lambda_2}`` of the fit's closed-form objectives (either left out when skipped)."""
    meta = fit.manifest_meta()
    return {o: meta[o]["lambda"] for o in ("eq1", "eq2") if o in meta}


def start_figures(cfg: Config, fit: Fit, data: IngestResult, *, truth: ItemTruth | None, labels: np.ndarray | None,
                  sweep: pa.Table | None, client: Any) -> Figures:
    """The figures that need no audit (all but the audit's histograms) sampled here and submitted to ``client``'s
    workers now, so that they are drawn beside the stages that run before the report (``build_report`` adds the
    rest and gathers them all)."""
    figures = new_figures(cfg, fit, client)
    figures.draw(_planned(figures, cfg, data, truth=truth, labels=labels, audit=None, sweep=sweep)[0])
    return figures


def build_report(cfg: Config, fit: Fit, data: IngestResult, *, title: str, truth: ItemTruth | None,
                 labels: np.ndarray | None, audit: AuditResult | None, tables: Mapping[str, pa.Table],
                 manifest: Mapping[str, Any], timings: Mapping[str, float], versions: Mapping[str, str],
                 warnings: list[str] | None = None, client: Any = None, started: Figures | None = None) -> bytes:
    """The run's ``report.html`` as UTF-8 bytes (``render_report``).

    ``labels``: the true cluster of each item (-1: none) when the item truth is known; ``audit``: the audit's
    result, None when it did not run; ``tables``: the published tables by name (``lambda_sweep``,
    ``evaluation``, ``cluster_precision``, ``audit``); ``manifest``: the manifest entries of the stages so far
    (``input``, ``evaluation``); ``timings``: seconds per stage; ``versions``: package -> version; ``client``: the
    figures are drawn as tasks on its workers (matplotlib's drawing is most of a report's time), else here;
    ``started``: figures already submitted (``start_figures``), of the same fit: only the others are drawn now.
    """
    audit_summary = dict(getattr(audit, "summary", None) or {})
    sweep = tables.get("lambda_sweep")
    figures = started if started is not None else new_figures(cfg, fit, client)
    inputs = figures.inputs
    planned, skipped = _planned(figures, cfg, data, truth=truth, labels=labels, audit=audit, sweep=sweep)
    figures.draw(planned)
    names = [name for name, _ in planned]  # the page's order
    images = dict(zip(names, list(progress(_in_order(figures.run, [figures.drawn[n] for n in names]), len(names),
                                           "report figures"))))
    skipped.update(skipped_parts(cfg, truth=truth, audit=audit))
    skipped.update(manifest.get("skipped", {}))  # what the job left out (``jobs.stages.cosine_within_size``)
    page_tables: dict[str, Any] = {t: tables[key] for key, t in TABLE_TITLES if key in tables}
    if sweep is not None:
        page_tables[SWEEP_TITLE] = sweep
    resolved = cfg.resolved()
    lambdas = objective_lambdas(fit)
    return render_report(title=title, headline=headline(audit_summary) or rescaling_finding(inputs),
                         intro=PAPER, guide=list_guide(list(fit.factors), cfg, audit_summary),
                         warnings=list(warnings or []),
                         tables=page_tables, images=images, captions=figures.captions,
                         summary_lines=summary_lines(data.counts, len(fit.sigma), manifest.get("evaluation"),
                                                     audit_summary if audit is not None else None),
                         skipped=skipped, config=resolved,
                         run_info=run_info(resolved, lambdas, source=manifest.get("input", {}),
                                           input_path=cfg.input.path, counts=data.counts, timings=timings,
                                           versions=versions))


def _in_order(run, drawn: list):
    """Each drawn figure's PNG, in order (values here, futures gathered on a client)."""
    for fut in drawn:
        yield run.gather(fut)


@dataclass
class FigureInputs:
    """What the figures read: the fit, its Eq. 1 solutions (scaling -> (A, B), built when read), the audit's first
    random diagonal ``d`` (log-normal, sd ``spread``), the list length ``top_n`` and the report section;
    ``found``: what one figure hands on to a later one (``pair``) and to the headline (``kept``)."""

    fit: Fit
    eq1: Mapping[str, tuple[np.ndarray, np.ndarray]]
    rcfg: ReportSection
    spread: float
    d: np.ndarray
    top_n: int
    found: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """The Eq. 1 scalings, in the fit's order."""
        return list(self.eq1)

    @property
    def rescaled(self) -> str | None:
        """The name of the first scaling as ``(A D, B D^-1)``; None without Eq. 1."""
        return f"{self.names[0]} x random D" if self.names else None

    def b_rows(self, name: str, items: np.ndarray) -> np.ndarray:
        """Rows ``items`` of B of a named Eq. 1 scaling, or of ``B D^-1`` for ``rescaled``."""
        if name == self.rescaled:
            return self.fit.factors.b_rows(("eq1", self.names[0]), items) / self.d
        return self.fit.factors.b_rows(("eq1", name), items)


def plan_figures(inputs: FigureInputs, *, audit: AuditResult | None, audit_summary: Mapping[str, Any],
                 heatmap: Drawing, lambdas: Mapping[str, float], sweep: pa.Table | None,
                 select_metric: str) -> tuple[list[tuple[str, Drawing]], dict[str, str]]:
    """The figures that apply, in the page's order, each a name and its drawing; and the ones left out, with why."""
    p = inputs.fit.V.shape[0]
    figures: list[tuple[str, Drawing]] = []
    skipped: dict[str, str] = {}
    if inputs.names and p >= 2:
        figures += [("pairs", partial(pairs_figure, inputs)),
                    ("rank_displacement", partial(displacement_figure, inputs))]
    else:
        skipped["pair scatter and rank displacement"] = ("one item only: no pairs" if inputs.names
                                                         else "no Eq. 1 solution (objectives.eq1 is null)")
    if audit is not None and audit.detail.num_rows and "cosine" in (audit_summary.get("metrics") or {}):
        figures.append(("audit_jaccard", partial(audit_figure, audit.detail, audit_summary.get("top_n", inputs.top_n))))
    elif audit is not None:
        skipped["audit histograms"] = audit_summary.get("verdict") or "the audit compared nothing"
    if list(inputs.fit.factors):
        figures.append(("heatmaps", heatmap))
    figures.append(("spectrum", partial(spectrum_figure, inputs.fit.sigma, lambdas)))
    if sweep is not None and select_metric in sweep.column_names:
        figures.append(("lambda_sweep", partial(sweep_figure, sweep, select_metric)))
    elif sweep is not None:
        skipped["lambda sweep figure"] = (f"evaluation.select_metric {select_metric!r} is not a column of the sweep "
                                          f"({', '.join(c for c in sweep.column_names if '@' in c)})")
    else:
        skipped["lambda sweep"] = "every lambda was given as a number (no objectives.*.lambda: auto)"
    return figures, skipped


def pairs_figure(inputs: FigureInputs) -> tuple[Png, str]:
    """Cosine and model score of ``report.pairs`` random item pairs under the two Eq. 1 solutions (the named
    scalings and the first one as ``(A D, B D^-1)``) whose cosines differ most; records them in ``found["pair"]``."""
    p, rcfg, d = inputs.fit.V.shape[0], inputs.rcfg, inputs.d
    i, j = pair_sample(p, rcfg.pairs, rcfg.seed)
    items, at = np.unique(np.concatenate([i, j]), return_inverse=True)  # only the pairs' rows of each solution
    i, j = at[: len(i)], at[len(i):]
    solutions = {name: inputs.fit.factors.rows(("eq1", name), items) for name in inputs.names}
    cos, model = pair_scores(solutions, i, j)
    A, B = solutions[inputs.names[0]]
    more = pair_scores({inputs.rescaled: (scaled_columns(A, d), scaled_columns(B, 1 / d))}, i, j)
    del A, B, solutions
    cos.update(more[0])
    model.update(more[1])
    a, b = most_different(cos)
    inputs.found["pair"] = (a, b)
    png = Png(pair_scatter_png, (cos[a], cos[b], model[a], model[b], (f"eq1 / {a}", f"eq1 / {b}")))
    return png, (f"Cosine cos(b_i, b_j) (left) and model score a_i . b_j = (A B^T)_ij (right) of {len(i)} random "
                 f"item pairs under Eq. 1's {a} (x) and {b} (y): of the named scalings and the first one rescaled "
                 "by the audit's random D, the two whose cosines differ most on this sample. Both have the same "
                 "A B^T, so the scores lie on the diagonal while the cosines scatter around it.")


def displacement_figure(inputs: FigureInputs) -> tuple[Png, str]:
    """Rank displacement of the top-N lists of ``report.rank_items`` random items under ``(A D, B D^-1)``;
    records the share of each list kept in ``found["kept"]``."""
    p, rcfg, top_n = inputs.fit.V.shape[0], inputs.rcfg, inputs.top_n
    rows = rank_sample(p, rcfg.rank_items, rcfg.seed)
    s = inputs.names[0]
    A, B = inputs.eq1[s]
    disp = rescaling_displacement(A, B, rows, inputs.d, top_n)
    del A, B
    finite = {m: v[~np.isnan(v)] for m, v in disp.items()}
    inputs.found["kept"] = {m: float(np.mean(np.isfinite(v))) if v.size else float("nan") for m, v in finite.items()}
    inputs.found["rank_items"], inputs.found["rank_scaling"] = len(rows), s
    panels = {f"cosine lists, cos(b_i, b_j), eq1 / {s}": disp["cosine"],
              f"model-score lists, a_i . b_j, eq1 / {s}": disp["model"]}
    png = Png(displacement_png, (panels, top_n, f"Top-{top_n} lists of {len(rows)} random items: rank change "
                                                f"under (A D, B D^-1), a random D"))
    return png, (f"Each item of the top-{top_n} lists of {len(rows)} random items under eq1 / {s}, by how many "
                 f"ranks it moves when the solution becomes (A D, B D^-1) with the audit's first random diagonal "
                 f"D (log-normal, sd {inputs.spread:g}); red: it leaves the list. The model scores, and so their "
                 "lists, are the same for every D; the cosine lists are reshuffled.")


def audit_figure(detail: pa.Table, n: int) -> tuple[Png, str]:
    """Histograms of the audit's per-item Jaccard@n (``audit/items.parquet``), by comparison group and metric."""
    png = Png(histogram_png, (audit_jaccards(detail), f"Per-item Jaccard@{n} between equally good solutions, by list "
                              f"metric", f"Jaccard@{n} per item"), {"unit": "item x comparison pairs"})
    return png, (f"Per-item Jaccard@{n} of the item-item lists of two equally good Eq. 1 solutions, pooled over "
                 "the comparisons: between the named scalings (top) and against random rescalings (A D, B D^-1) "
                 "(bottom); 1.0 is the same list. The cosine lists move; the model and projected_cosine lists, "
                 "whose scores are the same for every solution, do not.")


def truth_popularity(truth: ItemTruth | None, cfg: Config, item_ids: pa.Array) -> np.ndarray | None:
    """The item truth's popularity column per item (``evaluation.truth_popularity_col``), None when it has none."""
    pop_col = cfg.evaluation.truth_popularity_col
    if truth is None or not pop_col or pop_col not in truth.table.column_names:
        return None
    return truth.column_by_item(item_ids, cfg.input.item_col, pop_col, -np.inf)


def heatmaps_figure(inputs: FigureInputs, *, labels: np.ndarray | None, item_counts: np.ndarray,
                    popularity: Callable[[], np.ndarray | None]) -> tuple[Png, str]:
    """Fig. 1: the item-item cosine of B of every solution on at most ``report.heatmap_items`` items, ordered by
    true cluster and popularity (or by k-means on ``V_k diag(sigma)`` without truth), with a difference panel of
    ``found["pair"]`` (the first scaling and its rescaling when the pair figure did not run)."""
    fit, rcfg = inputs.fit, inputs.rcfg
    m = min(rcfg.heatmap_items, fit.V.shape[0])
    if labels is not None and (labels >= 0).any():
        items = select_items(item_order(cluster=labels, popularity=popularity()), m, seed=0)
        boundaries = cluster_boundaries(labels[items])
        ordering = f"{len(items)} items sorted by true cluster (lines), then by popularity"
    else:
        items = item_order(popularity=item_counts)[:m]  # the most popular: the best-estimated directions
        order, groups = cluster_order(fit.V[items] * fit.sigma, HEATMAP_CLUSTERS, rcfg.seed)
        items, boundaries = items[order], cluster_boundaries(groups)
        ordering = (f"the {len(items)} most popular items grouped by k-means (lines) on their SVD coordinates "
                    "V_k diag(sigma), the same for every solution")
    keys = list(fit.factors)
    panels = [(_panel_title(key), fit.factors.b_rows(key, items)) for key in keys]
    limits = quantile_limits(np.concatenate([off_diagonal(cosine_matrix(B)) for _, B in panels]), center=0.0)
    pair = inputs.found.get("pair") or ((inputs.names[0], inputs.rescaled) if inputs.names else ())
    diff = (f"eq1: {pair[0]} minus {pair[1]}", inputs.b_rows(pair[0], items), inputs.b_rows(pair[1], items)) \
        if pair else None
    png = Png(heatmap_grid_png, (panels, boundaries), {"limits": limits, "difference": diff})
    text = (f"Cosine of the item embeddings B, {ordering}; colours end at +-{limits[1]:.2f}, the 1st or 99th "
            "percentile of the off-diagonal cosines, whichever is further from 0"
            + (f", and the last panel is {pair[0]} minus {pair[1]}" if diff else "")
            + ". Eq. 1's scalings have the same A B^T but different cosines; Eq. 2's solution is unique")
    if any(key[0] == "cosine" for key in keys):
        text += ", and cosine / unique is trained with cosine similarity, so its cosine is what it was fit for"
    return png, text + "."


def _panel_title(key: tuple[str, str]) -> str:
    return f"{key[0]} / {key[1]}" + (" (trained with cosine)" if key[0] == "cosine" else "")


def spectrum_figure(sigma: np.ndarray, lambdas: Mapping[str, float]) -> tuple[Png, str]:
    """The singular values with the lambda thresholds of Eq. 1 and Eq. 2 and each objective's weights."""
    return Png(spectrum_png, (sigma, dict(lambdas))), (
        "Singular values of X with the lambda thresholds of Eq. 1 and Eq. 2 (as fitted), and the weight each "
        "objective gives each component.")


def sweep_figure(sweep: pa.Table, select_metric: str) -> tuple[Png, str]:
    """Held-out ``select_metric`` of each lambda the sweep tried, the chosen one marked."""
    return Png(lambda_sweep_png, (sweep, select_metric)), (
        f"Held-out {select_metric} on the train/test split for each lambda tried (log axis); the star marks "
        "the lambda the run chose (lambda: auto). Eq. 1's lambda acts on s^2 and Eq. 2's on s, hence one "
        "panel each.")


def rescaling_finding(inputs: FigureInputs) -> str | None:
    """The headline without an audit's: the share of the rank-displacement figure's cosine and model-score lists
    kept under ``(A D, B D^-1)``; None when that figure was not drawn."""
    found = inputs.found
    if "kept" not in found:
        return None
    return (f"Under a random rescaling (A D, B D^-1), which leaves every score of Eq. 1 unchanged, the top-"
            f"{inputs.top_n} cosine lists of {found['rank_items']} random items keep "
            f"{found['kept']['cosine']:.0%} of their items; their model-score lists keep "
            f"{found['kept']['model']:.0%}.")


def skipped_parts(cfg: Config, *, truth: ItemTruth | None, audit: AuditResult | None) -> dict[str, str]:
    """The parts of the run that did not run, and why."""
    skipped: dict[str, str] = {}
    if truth is None:
        skipped["cluster precision (Fig. 1 in numbers)"] = (
            "no item truth: evaluation.item_truth is null and there is no items_truth.parquet beside the input; "
            "the heatmaps are grouped by k-means instead of true clusters")
    if cfg.evaluation.holdout == "none":
        skipped["held-out evaluation"] = "evaluation.holdout is none"
    if audit is None:
        skipped["cosine audit"] = ("audit.enabled is false" if not cfg.audit.enabled
                                   else "no Eq. 1 solution to audit (objectives.eq1 is null)")
    return skipped


def summary_lines(counts: Mapping[str, Any], rank: int, evaluation: Mapping[str, Any] | None,
                  audit_summary: Mapping[str, Any] | None) -> list[str]:
    """The page's summary: the data and rank, the users of the held-out metrics, the audit's sample and verdict."""
    c = counts
    summary = [f"{c['n_users']} users x {c['n_items']} items, {c['nnz']} non-zeros; SVD rank {rank}."]
    if evaluation is not None:
        ev = evaluation
        summary.append(f"Held-out metrics over {ev['n_users_evaluated']} of the {ev['n_users_held_out']} users with "
                       "held-out items" + (" (a seeded sample of evaluation.max_users)" if ev["sampled"] else "")
                       + "; recall_se and ndcg_se are their standard errors.")
    if audit_summary is not None:
        if "n_items_sampled" in audit_summary:
            summary.append(f"Cosine audit over {audit_summary['n_items_sampled']} of the {audit_summary['n_items']} "
                           "items" + (" (a seeded sample of audit.max_items)" if audit_summary.get("sampled") else "")
                           + ", every item a candidate; jaccard_se is the standard error of jaccard_mean.")
        summary.append(audit_summary.get("verdict", ""))
    return summary


def run_info(resolved: Mapping[str, Any], lambdas: Mapping[str, float], *, source: Mapping[str, Any],
             input_path: str | None, counts: Mapping[str, Any], timings: Mapping[str, float],
             versions: Mapping[str, str]) -> dict[str, list[dict[str, Any]]]:
    """The run's own tables: its input (``source``: ingest's manifest entry, ``input_path`` when it has no path),
    the main configuration keys (``auto`` with the lambda it chose), the package versions and the stage timings."""
    flat = flatten_config(resolved)
    config_rows = []
    for key in CONFIG_KEYS:
        if key in flat:
            value = flat[key]
            objective = key.split(".")[1] if key.startswith("objectives.") else None
            if objective in lambdas and key.endswith(".lambda") and value == "auto":
                value = f"auto: {lambdas[objective]:.4g}"
            config_rows.append({"key": key, "value": "null" if value is None else value})
    files = source.get("files") or []
    return {
        "Input": [{"path": source.get("path", input_path), "files": len(files),
                   "bytes": sum(int(f.get("size") or 0) for f in files),
                   "rows read": sum(int(f.get("rows") or 0) for f in files),
                   "users": counts["n_users"], "items": counts["n_items"], "non-zeros": counts["nnz"]}],
        "Configuration (summary)": config_rows,
        "Versions": [{"package": name, "version": v} for name, v in versions.items()],
        "Stage timings (s)": [{"stage": name, "seconds": t} for name, t in timings.items()],
    }
