"""The run report's HTML page: one self-contained file.

:func:`render_report` lays out the headline (``samples.headline``, the audit's finding), the summary,
what was skipped and why, the figures, the tables and the run's own tables. The page uses inline
CSS, has no scripts and no external fonts or style sheets, and holds each figure inline as a
``data:image/png;base64`` URI, so ``report.html`` sent alone shows everything. Nothing here
writes files; the caller stores the page as ``report.html`` in the run.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.report.figures import PNG_MAGIC

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def flatten_config(resolved: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested configuration as ``{"section.key": value}`` (lists kept whole), in the given order."""
    out: dict[str, Any] = {}
    for key, value in resolved.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, name + "."))
        else:
            out[name] = value
    return out



def render_report(
    *,
    title: str,
    summary_lines: Sequence[str],
    tables: Mapping[str, pa.Table | Sequence[Mapping[str, Any]]],
    images: Mapping[str, bytes],
    captions: Mapping[str, str] | None = None,
    max_table_rows: int = 1000,
    headline: str | None = None,
    skipped: Mapping[str, str] | None = None,
    run_info: Mapping[str, pa.Table | Sequence[Mapping[str, Any]]] | None = None,
    config: Mapping[str, Any] | None = None,
    intro: str | None = None,
    guide: Sequence[Mapping[str, Any]] | None = None,
    warnings: Sequence[str] | None = None,
) -> bytes:
    """A self-contained HTML report, as UTF-8 bytes: one file, nothing beside it needed.

    The page has, in this order: the title; ``intro`` (what the paper found, one paragraph); the headline
    in a box (what this run found); ``guide``, the table of which lists to use and which not (rows with a
    ``verdict``); the run's ``warnings`` in a box; the summary lines as a list;
    what was skipped and why; each image (numbered figures, with their captions); each table (in
    the given order); the run's own tables (input, configuration, versions, timings) and the full
    configuration, folded (``<details>``). All text is escaped with ``html.escape``; floats
    are shown with 4 significant digits. Styling is inline CSS; there are no scripts and no
    external resources: each image is inline, a ``data:image/png;base64`` URI, so the page can
    be mailed or opened from an object store on its own.

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
    headline : str, optional
        The finding in one sentence (``samples.headline``), boxed at the top.
    skipped : dict of what -> why, optional
        Parts of the run or the report that were left out, and the reason (``"cluster precision":
        "no item truth"``).
    run_info : dict of name -> table, optional
        Tables about the run itself, shown last under "Run".
    config : dict, optional
        The resolved configuration (nested), shown flattened (:func:`flatten_config`) and folded.

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

    run_info = dict(run_info or {})
    known = {k for f, k in img_entries} | {f for f, _ in img_entries} | {str(t) for t in tables} \
        | {str(t) for t in run_info}
    unknown = sorted(set(map(str, captions)) - known)
    if unknown:
        raise MfsimError(f"captions for unknown images or tables: {unknown}; valid names: {sorted(known)}")

    esc = html.escape
    rows = int(max_table_rows)
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
    if intro:
        parts.append(f'<p class="intro">{esc(str(intro))}</p>')
    if headline:
        parts.append(f'<p class="headline"><b>This run:</b> {esc(str(headline))}</p>')
    if guide:
        parts.append('<section id="which-lists">')
        parts.append("<h2>Which lists to use</h2>")
        parts.append(_table_html(list(guide), len(guide), "which lists", row_class="verdict"))
        parts.append("</section>")
    if warnings:
        parts.append('<div class="warnings"><b>Warnings of this run</b><ul>')
        parts.extend(f"<li>{esc(str(w))}</li>" for w in warnings)
        parts.append("</ul></div>")
    if summary_lines:
        parts.append('<ul class="summary">')
        parts.extend(f"<li>{esc(str(line))}</li>" for line in summary_lines if line)
        parts.append("</ul>")
    if skipped:
        parts.append('<section id="skipped">')
        parts.append('<p class="skipped">Not in this report:</p>')
        parts.append('<ul class="skipped">')
        parts.extend(f"<li><b>{esc(str(what))}</b>: {esc(str(why))}</li>" for what, why in skipped.items())
        parts.append("</ul>")
        parts.append("</section>")
    if img_entries:
        parts.append('<section id="figures">')
        parts.append("<h2>Figures</h2>")
        for number, (fname, key) in enumerate(img_entries, start=1):
            cap = caption_of(key, fname)
            alt = cap if cap is not None else key
            parts.append(f'<figure id="{esc(fname[:-4])}">')
            data_uri = "data:image/png;base64," + base64.b64encode(files[fname]).decode("ascii")
            parts.append(f'<img src="{data_uri}" alt="{esc(str(alt))}">')
            text = f" {esc(str(cap))}" if cap is not None else ""
            parts.append(f"<figcaption><b>Figure {number}</b> ({esc(fname)}).{text}</figcaption>")
            parts.append("</figure>")
        parts.append("</section>")

    def table_section(sid: str, name: str, table, level: str) -> None:
        parts.append(f'<section id="{sid}">')
        parts.append(f"<{level}>{esc(str(name))}</{level}>")
        cap = caption_of(str(name))
        if cap is not None:
            parts.append(f'<p class="caption">{esc(str(cap))}</p>')
        parts.append(_table_html(table, rows, str(name)))
        parts.append("</section>")

    for i, (name, table) in enumerate(tables.items()):
        table_section(f"table-{i}", name, table, "h2")
    if run_info or config:
        parts.append('<section id="run">')
        parts.append("<h2>Run</h2>")
        parts.append('<div class="runinfo">')
        for i, (name, table) in enumerate(run_info.items()):
            table_section(f"run-{i}", name, table, "h3")
        parts.append("</div>")
        if config:
            flat = flatten_config(config)
            parts.append(f"<details><summary>Resolved configuration: all {len(flat)} keys</summary>")
            parts.append(_table_html([{"key": k, "value": "null" if v is None else v} for k, v in flat.items()],
                                     max(rows, len(flat)),
                                     "configuration"))
            parts.append("</details>")
        parts.append("</section>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts).encode("utf-8")


_CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;"
    "margin:1.5em auto;max-width:1240px;padding:0 1em;color:#222;line-height:1.4}"
    "p.intro{max-width:62em}"
    "tr.use td:first-child{background:#e6f4e6}tr.use-with-care td:first-child{background:#fff6e5}"
    "tr.do-not-use-as-a-similarity td:first-child{background:#fde8e8}"
    "div.warnings{background:#fde8e8;border:1px solid #d08080;border-left:6px solid #c03030;padding:.5em 1em;"
    "margin:.8em 0 1em}div.warnings ul{margin:.3em 0 0}"
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
    "p.headline{font-size:1.15em;background:#fff6e5;border:1px solid #e0b050;border-left:6px solid #d08000;"
    "padding:.6em 1em;margin:.8em 0 1em}"
    "p.skipped{margin:.6em 0 .1em;color:#555}ul.skipped{color:#555;margin-top:0}ul.skipped li{margin:.15em 0}"
    "div.table{overflow-x:auto;max-width:100%}"
    "div.runinfo{display:flex;flex-wrap:wrap;gap:0 2.5em;align-items:flex-start}"
    "details{margin:.5em 0 2em}summary{cursor:pointer;color:#335}"
)


# --------------------------------------------------------------------------------------------
# Helpers


def _css_class(value: Any) -> str:
    """``value`` as a CSS class name: letters and digits, the rest as ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", str(value).lower()).strip("-")


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


def _table_html(table, max_rows: int, name: str, row_class: str | None = None) -> str:
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
    out = ['<div class="table"><table>', "<thead><tr>" + "".join(f"<th>{esc(str(c))}</th>" for c in columns) + "</tr></thead>", "<tbody>"]
    for row in rows:
        cells = []
        for c in columns:
            text, num = _fmt(row.get(c))
            cls = ' class="num"' if num else ""
            cells.append(f"<td{cls}>{esc(text)}</td>")
        cls = f' class="{_css_class(row.get(row_class))}"' if row_class else ""
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    if n_total > len(rows):
        out.append(f'<p class="note">First {len(rows)} of {n_total} rows.</p>')
    if n_total == 0:
        out.append('<p class="note">No rows.</p>')
    return "\n".join(out)
