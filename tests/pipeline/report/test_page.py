"""The report's HTML page parsed back (escaping, references, no external resources, the order of its sections)
and the flattened configuration."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pytest

from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.report.figures import cosine_heatmap_png, histogram_png
from mfsim.pipeline.report.page import flatten_config, render_report


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


def test_flatten_config():
    cfg = {"svd": {"rank": 64, "seed": 0}, "objectives": {"eq1": {"lambda": "auto", "scalings": ["a", "b"]},
                                                          "eq2": None}, "empty": {}}
    assert flatten_config(cfg) == {"svd.rank": 64, "svd.seed": 0, "objectives.eq1.lambda": "auto",
                                   "objectives.eq1.scalings": ["a", "b"], "objectives.eq2": None, "empty": {}}


def test_render_report_headline_skipped_and_run_sections(pngs):
    out = render_report(
        title="t", headline="Top-100 cosine lists share 56% <of> their items", summary_lines=["line"],
        tables={"metrics": [{"a": 1}]}, images=pngs, captions={"heat": "cap", "Versions": "installed"},
        skipped={"cluster precision": "no item truth"},
        run_info={"Versions": [{"package": "numpy", "version": "2.0"}], "Stage timings (s)": [{"stage": "svd",
                                                                                               "seconds": 1.5}]},
        config={"svd": {"rank": 64}, "audit": {"top_n": None}}, intro="What the <paper> found.",
        guide=[{"verdict": "use", "list": "similar_items/x"}, {"verdict": "do not use as a similarity", "list": "y"}],
        warnings=["cosine model: not converged"])
    page = out.decode()
    assert '<p class="headline"><b>This run:</b> Top-100 cosine lists share 56% &lt;of&gt; their items</p>' in page
    assert '<p class="intro">What the &lt;paper&gt; found.</p>' in page
    assert '<tr class="use">' in page and '<tr class="do-not-use-as-a-similarity">' in page
    # what the paper found, what this run found, which lists to use, the warnings; then the summary, skipped,
    # figures, tables, the run
    marks = [page.index(s) for s in ('class="intro"', 'class="headline"', 'id="which-lists"', "not converged",
                                     "<li>line</li>", "no item truth", 'id="figures"', 'id="table-0"', 'id="run"',
                                     "<details>")]
    assert marks == sorted(marks)
    assert "<b>Figure 1</b> (heat.png). cap" in page and "<b>Figure 2</b> (jaccard.png)" in page
    parser = _Page()
    parser.feed(page)
    assert "svd.rank" in parser.cells and "64" in parser.cells and "null" in parser.cells
    assert "numpy" in parser.cells and "1.5" in parser.cells and "installed" in page
