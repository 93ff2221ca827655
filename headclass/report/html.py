"""The self-contained HTML report of a head taxonomy: one file that opens offline.

The page holds, in order: the headline and per-label summary, the layer x head grid (a plotly
figure in ``<div id="head-grid">``), every head's card (:mod:`headclass.report.cards`, one
element ``id="head-L{layer}H{head}"`` each, hidden until opened) with a search box, label counts
per layer, every score as a layer x head heatmap (one figure, a menu picks the score), any extra
figures, the per-layer table, the full head table (click a column header to sort), the label
definitions, and the metadata (model, config, library versions). plotly.js is embedded once,
inline, so the file needs no network.

A click on a cell of the grid, on a row of the full head table or on a search result opens
that head's card (so does a link to ``#head-L17H3``); the search box finds heads by id
(``L17H3``, ``17.3``) or by role and label (``induction``). All of it is in the page's own
script: no server.

Examples
--------
>>> from headclass.report.html import write_html_report
>>> write_html_report(taxonomy, "smollm2.html")
>>> write_html_report(taxonomy, "smollm2.html",
...                   figures={"L18H6 on a repeated prompt": plots.attention_pattern(model, p, 18, 6)})
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

from headclass.atomic import write_text
from headclass.errors import HeadclassError
from headclass.taxonomy import LABEL_MEANINGS, LABELS, RULES, UNCLASSIFIED, HeadTaxonomy

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["write_html_report", "render_html_report", "GRID_DIV_ID", "CARDS_DIV_ID", "SEARCH_ID"]

#: DOM id of the layer x head grid figure (stable: tests and users may look it up).
GRID_DIV_ID = "head-grid"
#: DOM id of the element holding every head card (each ``id="head-L{layer}H{head}"``).
CARDS_DIV_ID = "head-cards"
#: DOM id of the head search box.
SEARCH_ID = "head-search"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       color: #222; background: #fafafa; }
main { max-width: 1200px; margin: 0 auto; padding: 1em 2em 4em; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin-top: 0; }
nav a { margin-right: 1em; }
.figure { background: white; border: 1px solid #e4e4e4; border-radius: 6px; margin: 1em 0;
          padding: 0.5em; }
table { border-collapse: collapse; font-size: 0.85em; background: white; }
th, td { border: 1px solid #e0e0e0; padding: 0.25em 0.5em; text-align: right; }
th { background: #f0f0f0; position: sticky; top: 0; cursor: pointer; }
td.text, th.text { text-align: left; }
.scroll { max-height: 36em; overflow: auto; border: 1px solid #ddd; }
.label { white-space: nowrap; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; border-radius: 2px;
          vertical-align: middle; margin-right: 0.4em; border: 1px solid #999; }
pre { background: white; border: 1px solid #e0e0e0; padding: 0.8em; overflow: auto; font-size: 0.85em; }
code { background: #f0f0f0; padding: 0 0.2em; }
tr.head-row { cursor: pointer; } tr.head-row:hover td { background: #fff8e1; }
tr.head-row.selected td { background: #ffecb3; }
#head-search { font-size: 1em; padding: 0.3em 0.5em; width: 22em; }
#head-search-results a { margin-right: 0.6em; white-space: nowrap; }
#head-cards .hc-card { max-width: none; box-shadow: 0 1px 4px rgba(0,0,0,0.12); }
"""

# Open a head's card: from a grid click (plotly_click), a table row, a search result or the
# URL hash (#head-L17H3); the search box filters the full table and lists matching heads.
_CARDS_JS = """
(function () {
  var shown = null, content = null;
  function fill(card) {
    if (card.dataset.filled) return;
    if (content === null) {
      var blob = document.getElementById("head-card-content");
      content = blob ? JSON.parse(blob.textContent) : {};
    }
    card.innerHTML = content[card.dataset.head] || "";
    card.dataset.filled = "1";
  }
  function openCard(id, scroll) {
    var card = document.getElementById(id);
    if (!card || !card.classList.contains("hc-card")) return false;
    fill(card);
    if (shown && shown !== card) shown.hidden = true;
    card.hidden = false; shown = card;
    document.querySelectorAll("tr.head-row.selected").forEach(function (r) { r.classList.remove("selected"); });
    document.querySelectorAll('tr.head-row[data-head="' + card.dataset.head + '"]').forEach(
      function (r) { r.classList.add("selected"); });
    var none = document.getElementById("head-cards-empty"); if (none) none.hidden = true;
    if (scroll !== false) card.scrollIntoView({block: "start"});
    return true;
  }
  window.headclassOpenCard = openCard;
  function fromHash() {
    var h = decodeURIComponent(location.hash.slice(1));
    if (/^head-L\\d+H\\d+$/.test(h)) openCard(h);
  }
  window.addEventListener("hashchange", fromHash);
  document.querySelectorAll("tr.head-row").forEach(function (row) {
    row.addEventListener("click", function () { openCard("head-" + row.dataset.head); });
  });
  var grid = document.getElementById("%(grid)s");
  if (grid && grid.on) {
    grid.on("plotly_click", function (data) {
      var p = data && data.points && data.points[0];
      if (p && p.x !== null && p.y !== null && p.x !== undefined) openCard("head-L" + p.y + "H" + p.x);
    });
  }
  var box = document.getElementById("%(search)s"), results = document.getElementById("head-search-results");
  function norm(t) { return t.toLowerCase().replace(/^\\s+|\\s+$/g, ""); }
  function matches(query) {
    var q = norm(query), m = q.match(/^l?(\\d+)[.h](\\d+)$/);
    var rows = Array.from(document.querySelectorAll("tr.head-row"));
    if (!q) return rows;
    if (m) return rows.filter(function (r) { return r.dataset.head === "L" + (+m[1]) + "H" + (+m[2]); });
    return rows.filter(function (r) { return r.dataset.search.indexOf(q) >= 0; });
  }
  function search() {
    var q = box.value, found = matches(q), set = new Set(found);
    document.querySelectorAll("tr.head-row").forEach(function (r) { r.hidden = !set.has(r); });
    if (!norm(q)) { results.textContent = ""; return found; }
    results.innerHTML = "";
    var head = document.createElement("span");
    head.textContent = found.length + " head" + (found.length === 1 ? "" : "s") + ": ";
    results.appendChild(head);
    found.slice(0, 60).forEach(function (r) {
      var a = document.createElement("a"); a.href = "#head-" + r.dataset.head; a.textContent = r.dataset.head;
      a.title = r.dataset.roles; results.appendChild(a);
    });
    if (found.length > 60) results.appendChild(document.createTextNode("..."));
    return found;
  }
  if (box) {
    box.addEventListener("input", search);
    box.addEventListener("keydown", function (e) {
      if (e.key === "Enter") { var f = search(); if (f.length) openCard("head-" + f[0].dataset.head); }
    });
  }
  window.headclassSearch = function (q) {
    box.value = q;
    return search().map(function (r) { return r.dataset.head; });
  };
  fromHash();
  window.addEventListener("load", fromHash);  // again once the figures are drawn: the card stays in view
})();
""" % {"grid": GRID_DIV_ID, "search": SEARCH_ID}

# Click a header to sort its table (numbers numerically, blanks last).
_SORT_JS = """
document.querySelectorAll("table.sortable th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0];
    var rows = Array.from(body.rows);
    var asc = th.dataset.order !== "asc";
    th.closest("tr").querySelectorAll("th").forEach(function (o) { delete o.dataset.order; });
    th.dataset.order = asc ? "asc" : "desc";
    function key(r) { var t = r.cells[col].textContent.trim(); var n = parseFloat(t);
                      return t === "" ? null : (isNaN(n) ? t : n); }
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === null) return 1; if (y === null) return -1;
      var c = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def write_html_report(
    taxonomy: Any,
    path: Union[str, os.PathLike],
    *,
    figures: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write the self-contained HTML report of ``taxonomy`` to ``path``, atomically.

    Parameters
    ----------
    taxonomy
        A :class:`~headclass.taxonomy.HeadTaxonomy`.
    path
        The ``.html`` file to write; its folder must exist. The page is written to a temporary
        file beside it and renamed, so ``path`` is never half-written.
    figures
        Extra plotly figures, by section title, shown after the built-in ones.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    target = Path(path).expanduser()
    if not target.parent.is_dir():
        raise HeadclassError(f"cannot write {str(target)!r}: folder {str(target.parent)!r} does not exist.")
    return write_text(target, render_html_report(taxonomy, figures=figures))


def render_html_report(taxonomy: Any, *, figures: Optional[Mapping[str, Any]] = None) -> str:
    """The report of :func:`write_html_report` as one HTML string."""
    from headclass.report import plots

    if not isinstance(taxonomy, HeadTaxonomy):
        raise HeadclassError(f"the HTML report needs a HeadTaxonomy; got {type(taxonomy).__name__}.")
    for title, fig in (figures or {}).items():
        if not hasattr(fig, "to_html"):
            raise HeadclassError(f"figure {title!r} must be a plotly Figure; got {type(fig).__name__}.")
    table = taxonomy.table
    name = taxonomy.model_name
    shown = plots.headline_columns(table)

    figure_sections = [
        (
            "grid",
            "Layer x head grid",
            plots.head_grid(taxonomy),
            GRID_DIV_ID,
            "Each cell is a head, coloured by its primary label; hover for every score.",
        ),
        (
            "by-layer",
            "Labels per layer",
            plots.label_counts_by_layer(taxonomy),
            "labels-per-layer",
            "Primary labels of each layer's heads.",
        ),
        *_budget_sections(taxonomy),
        (
            "scores",
            "Scores",
            plots.score_heatmaps(taxonomy, shown),
            "score-heatmaps",
            "Every score as a layer x head heatmap; pick the score in the menu. Blank: not computed (NaN).",
        ),
    ]
    for i, (title, fig) in enumerate((figures or {}).items()):
        figure_sections.append((f"extra-{i}", str(title), fig, f"extra-figure-{i}", ""))

    parts = [_head(name), "<main>", _intro(taxonomy), _nav(figure_sections)]
    parts.append(_section("summary", "Summary", _summary_html(taxonomy)))
    for i, (anchor, title, fig, div_id, caption) in enumerate(figure_sections):
        body = (f'<p class="sub">{html.escape(caption)}</p>' if caption else "") + _figure_html(
            fig, div_id, include_plotlyjs=(i == 0)
        )
        parts.append(_section(anchor, title, body))
        if anchor == "grid":
            parts.append(_section("cards", "Head cards", _cards_html(taxonomy)))
    parts.append(_section("per-layer", "Per layer", _per_layer_html(taxonomy)))
    parts.append(_section("heads", "All heads", _full_table_html(table)))
    parts.append(_section("labels", "Label definitions", _definitions_html(taxonomy)))
    parts.append(_section("metadata", "Metadata", _metadata_html(taxonomy)))
    parts.append(f"</main><script>{_SORT_JS}</script><script>{_CARDS_JS}</script></body></html>")
    return "\n".join(parts)


def _cards_html(taxonomy: Any) -> str:
    """The search box and every head's card (hidden until opened)."""
    from headclass.report.cards import CARD_CSS, HeadCard

    evidence = taxonomy._evidence or {}
    heads = evidence.get("heads") or {}
    t = taxonomy._table
    roles = {(int(la), int(h)): str(r) for la, h, r in zip(t["layer"], t["head"], t["attention_role"])}
    shells, inner = [], {}
    for row in taxonomy.table.to_dict("records"):
        key = f"L{int(row['layer'])}H{int(row['head'])}"
        card = HeadCard(row, heads.get(key), document=evidence, model=taxonomy.model_name, roles=roles)
        shells.append(card.element_open(hidden=True) + "</div>")
        inner[key] = card.inner_html()
    # The cards' content waits in one JSON string (parsed on the first click, not at load:
    # hundreds of cards would otherwise be parsed into the DOM before the page opens).
    blob = json.dumps(inner, ensure_ascii=False).replace("</", "<\\/")
    note = (
        ""
        if evidence
        else '<p class="sub">This taxonomy holds no card evidence (examples, OV effects, composition): '
        "classify with <code>evidence=True</code> (the default) for full cards.</p>"
    )
    return (
        f"<style>{CARD_CSS}</style>"
        '<p class="sub">Click a cell of the grid above, a row of the table of all heads, or search: '
        "a head id (<code>L5H1</code>, <code>5.1</code>) or a role / label (<code>induction</code>).</p>"
        f'<p><input id="{SEARCH_ID}" type="search" placeholder="search heads: L5H1, induction, copy ..." '
        'aria-label="search heads"> <span id="head-search-results"></span></p>'
        + note
        + '<p id="head-cards-empty" class="sub">No card open yet.</p>'
        f'<div id="{CARDS_DIV_ID}">' + "".join(shells) + "</div>"
        f'<script type="application/json" id="head-card-content">{blob}</script>'
    )


# -- pieces ------------------------------------------------------------------------------------


def _budget_sections(taxonomy: Any) -> list[tuple[str, str, Any, str, str]]:
    """The attention-budget figure of each probe the taxonomy has a budget for."""
    from headclass.errors import ScoreError
    from headclass.report import plots

    sections = []
    for probe, anchor in (("text", "budget"), ("repeated", "budget-rep")):
        try:
            fig = plots.attention_budget(taxonomy, probe=probe)
        except ScoreError:  # no such budget (e.g. no tokenizer: no text)
            continue
        sections.append(
            (
                anchor,
                f"Attention budget ({probe})",
                fig,
                f"attention-{anchor}",
                "Where each head's attention goes, one bar per head: first position, self, "
                "previous token, local window, earlier copies, induction targets, delimiters, "
                "other. Pick a layer in the menu; hover for the lift over a uniform head.",
            )
        )
    return sections


def _head(name: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>headclass report: {html.escape(name)}</title><style>{_CSS}</style></head><body>"
    )


def _intro(taxonomy: Any) -> str:
    meta = taxonomy.metadata
    facts = [f"{taxonomy.n_layers} layers x {taxonomy.n_heads} heads = {len(taxonomy)} heads"]
    if meta.get("n_params"):
        facts.append(f"{int(meta['n_params']) / 1e6:.1f}M parameters")
    if meta.get("architecture"):
        facts.append(str(meta["architecture"]))
    if meta.get("date"):
        facts.append(f"classified {meta['date']}")
    version = (meta.get("versions") or {}).get("headclass")
    facts.append(f"headclass {version}" if version else "headclass")
    return (
        f"<h1>Attention heads of {html.escape(taxonomy.model_name)}</h1>"
        f'<p class="sub">{html.escape(" · ".join(facts))}</p>'
    )


def _nav(figure_sections: list) -> str:
    links = (
        [("summary", "Summary")]
        + [(a, t) for a, t, *_ in figure_sections]
        + [
            ("per-layer", "Per layer"),
            ("heads", "All heads"),
            ("labels", "Label definitions"),
            ("metadata", "Metadata"),
        ]
    )
    return "<nav>" + "".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in links) + "</nav>"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def _figure_html(fig: Any, div_id: str, *, include_plotlyjs: bool) -> str:
    inner = fig.to_html(
        full_html=False,
        include_plotlyjs=include_plotlyjs,
        div_id=div_id,
        config={"responsive": True, "displaylogo": False},
    )
    return f'<div class="figure">{inner}</div>'


def _swatch(label: str) -> str:
    from headclass.report.plots import label_color

    return (
        f'<span class="label"><span class="swatch" style="background:{label_color(label)}"></span>'
        f"{html.escape(label)}</span>"
    )


def _cell(value: Any) -> str:
    import pandas as pd

    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return "✓" if value else ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def _html_table(
    df: "pd.DataFrame", *, label_columns: tuple = (), sortable: bool = True, head_rows: bool = False
) -> str:
    import pandas as pd

    text_columns = {
        c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c])
    }
    head = "".join(f'<th class="{"text" if c in text_columns else ""}">{html.escape(str(c))}</th>' for c in df.columns)
    rows = []
    for record in df.itertuples(index=False):
        cells = []
        for column, value in zip(df.columns, record):
            content = _swatch(str(value)) if column in label_columns else _cell(value)
            cls = "text" if column in text_columns else ""
            cells.append(f'<td class="{cls}">{content}</td>')
        rows.append(_row_open(df.columns, record) if head_rows else "<tr>")
        rows[-1] += "".join(cells) + "</tr>"
    klass = "sortable" if sortable else ""
    return f'<table class="{klass}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _summary_html(taxonomy: Any) -> str:
    summary = taxonomy.summary()
    summary = summary.rename(columns={"count": "heads", "primary_count": "primary"})
    return (
        '<p class="sub">heads: with the label (a head may have several); primary: heads whose '
        "primary label it is; best head: highest score among the label's heads.</p>"
        + _html_table(summary, label_columns=("label",))
    )


def _per_layer_html(taxonomy: Any) -> str:
    per_layer = taxonomy.per_layer()
    if per_layer.empty:
        return "<p>No heads.</p>"
    counts = per_layer.pivot(index="layer", columns="label", values="count")
    labels = [label for label in per_layer["label"].drop_duplicates() if counts[label].sum() > 0]
    means = [c for c in per_layer.columns if c.startswith("mean_")]
    firsts = per_layer.groupby("layer", sort=True)[["relative_depth"] + means].first()
    wide = firsts[["relative_depth"]].join(counts[labels]).join(firsts[means]).reset_index()
    return (
        '<p class="sub">Heads per layer with each label (flags; a head may count for several '
        "labels, unclassified: heads with none), then the layer's mean scores.</p>"
        '<div class="scroll">' + _html_table(wide) + "</div>"
    )


def _full_table_html(table: "pd.DataFrame") -> str:
    flags = [c for c in table.columns if c.startswith("is_")]
    shown = table.drop(columns=flags + (["model"] if "model" in table.columns else []))
    return (
        f'<p class="sub">{len(table)} heads, one row per head; click a header to sort. Label '
        "flags (is_&lt;label&gt;) are summed up in the labels column; the CSV/JSON exports "
        "have every column.</p>"
        '<div class="scroll">' + _html_table(shown, label_columns=("primary_label",), head_rows=True) + "</div>"
    )


def _row_open(columns: Any, record: Any) -> str:
    """``<tr>`` of one head of the full table: ``data-head`` (opens its card) and the text the
    search box looks in (id, roles, labels)."""
    row = dict(zip(columns, record))
    key = f"L{int(row['layer'])}H{int(row['head'])}"
    roles = " ".join(
        str(row.get(c) or "") for c in ("attention_role", "attention_roles", "output_role", "primary_label", "labels")
    )
    search = f"{key} {row['layer']}.{row['head']} {roles}".lower().replace(",", " ")
    return (
        f'<tr class="head-row" data-head="{key}" data-search="{html.escape(search)}" '
        f'data-roles="{html.escape(str(row.get("attention_role")))} / {html.escape(str(row.get("output_role")))}">'
    )


def _definitions_html(taxonomy: Any) -> str:
    # The thresholds this taxonomy was labelled with, exactly as recorded; never defaults in
    # their place (a report must not show thresholds that were not used).
    values = (taxonomy.metadata.get("config") or {}).get("thresholds") or {}
    rows = []
    for label in LABELS + (UNCLASSIFIED,):
        rule = RULES.get(label)
        if rule is None:
            condition = "no label holds"
        else:
            condition = " and ".join(
                f"<code>{c.score} {html.escape(c.op)} {_threshold_text(values, c.threshold)}</code>"
                for c in rule.conditions
            )
            if rule.needs_output:
                condition += " (and the head writes something)"
        rows.append(
            f'<tr><td class="text">{_swatch(label)}</td><td class="text">{condition}</td>'
            f'<td class="text">{html.escape(LABEL_MEANINGS.get(label, ""))}</td></tr>'
        )
    recorded = "" if values else " (this taxonomy's metadata records no thresholds: shown as ?)"
    return (
        f'<p class="sub">A head has a label when all its conditions hold (thresholds used for '
        f"this report{recorded}). The primary label is the mechanism label with the largest normalised "
        "margin; bos and diffuse are primary only for heads with no other label. Full "
        "definitions, scores and references: <code>docs/labels.md</code> in the headclass "
        "repository.</p>"
        '<table><thead><tr><th class="text">label</th><th class="text">rule</th>'
        f'<th class="text">meaning</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def _threshold_text(values: Mapping[str, Any], key: str) -> str:
    value = values.get(key)
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"


def _metadata_html(taxonomy: Any) -> str:
    meta = taxonomy.metadata
    simple = {k: v for k, v in meta.items() if not isinstance(v, (dict, list))}
    nested = {k: v for k, v in meta.items() if isinstance(v, (dict, list))}
    rows = "".join(
        f'<tr><th class="text">{html.escape(str(k))}</th><td class="text">{html.escape(str(v))}</td></tr>'
        for k, v in simple.items()
    )
    out = f"<table><tbody>{rows}</tbody></table>"
    for key, value in nested.items():
        out += (
            f"<h3>{html.escape(str(key))}</h3><pre>"
            f"{html.escape(json.dumps(value, indent=2, sort_keys=True, default=str))}</pre>"
        )
    return out
