"""Head cards: the evidence behind one head's roles, in Jupyter, in the HTML report and on the CLI.

A label is a claim; a card shows why. :meth:`HeadTaxonomy.card(layer, head)
<headclass.taxonomy.HeadTaxonomy.card>` returns a :class:`HeadCard`, which renders itself in
Jupyter (``_repr_html_``) and as an HTML fragment (:meth:`HeadCard.to_html`, the element
``<div id="head-L{layer}H{head}">``). It shows, from the table row and the evidence
:func:`headclass.classify` collected (:mod:`headclass.scores.examples`):

* both roles (attention, output) with their margins, the confidence and the borderline labels;
* every score with its standard error, and the attention budget as one bar;
* the strongest attention examples (query token -> key token, weight, context with the two
  highlighted), on the natural-text probe first, away from the first position;
* what the head looks for (the keys each example query prefers) and what it writes (for a few
  source tokens, the tokens its OV circuit raises and lowers most, with ``copy_eigen``);
* its strongest Q-, K- and V-composition partners among earlier heads ("not computed" and why,
  otherwise), its ablation effect when computed, and a heatmap of its pattern on a short prompt.

Nothing here needs the model: a taxonomy read back with ``read_json`` gives the same cards.
:func:`explain` adds the head's live pattern on a prompt of yours (circuitsvis when installed,
plotly otherwise); ``headclass explain MODEL L.H`` writes both to one HTML file.

Examples
--------
>>> card = taxonomy.card(5, 1)
>>> card                                    # in Jupyter: the card
>>> card.to_html()[:40]
'<div class="hc-card" id="head-L5H1" ...'
"""

from __future__ import annotations

import html
import math
from typing import Any, Mapping, Optional

from headclass.errors import HeadclassError
from headclass.scores.patterns import BUDGET_CLASSES
from headclass.taxonomy import LABEL_MEANINGS, HeadTaxonomy
from headclass.taxonomy.schema import ID_COLUMNS

__all__ = ["HeadCard", "CARD_CSS", "DEFAULT_PROMPT", "card_id", "explain", "Explanation", "explain_page", "parse_head"]

#: Styles of a card (prefixed ``hc-``, so they never clash with a notebook's or a page's).
CARD_CSS = """
.hc-card { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
           background: white; border: 1px solid #ddd; border-radius: 6px; padding: 0.8em 1em;
           margin: 0.6em 0; max-width: 1100px; font-size: 14px; }
.hc-card h3 { margin: 0 0 0.3em; } .hc-card h4 { margin: 0.9em 0 0.3em; font-size: 1em; }
.hc-card .hc-sub { color: #666; margin: 0.2em 0; }
.hc-card table { border-collapse: collapse; font-size: 0.9em; }
.hc-card th, .hc-card td { border: 1px solid #e4e4e4; padding: 0.15em 0.45em; text-align: left;
                           vertical-align: top; }
.hc-card td.hc-num, .hc-scores td + td { text-align: right; font-variant-numeric: tabular-nums; }
.hc-role { display: inline-block; padding: 0.1em 0.5em; border-radius: 3px; margin-right: 0.4em;
           border: 1px solid #999; }
.hc-border { color: #b35900; font-weight: bold; }
.hc-bar { display: flex; height: 1.2em; width: 100%; max-width: 640px; border: 1px solid #999; }
.hc-bar span { display: block; height: 100%; }
.hc-legend span { margin-right: 0.8em; font-size: 0.85em; white-space: nowrap; }
.hc-legend i { display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.25em;
               border: 1px solid #999; vertical-align: middle; }
.hc-ctx { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.9em; white-space: pre-wrap; }
.hc-ctx .hc-q { background: #ffd54f; border-radius: 2px; }
.hc-ctx .hc-k { background: #81d4fa; border-radius: 2px; }
.hc-ctx .hc-gap { color: #999; }
.hc-ctx span { border-right: 1px solid #e2e2e2; padding: 0 1px; }
.hc-tok { font-family: ui-monospace, Menlo, Consolas, monospace; background: #f3f3f3;
          padding: 0 0.2em; border-radius: 2px; white-space: pre; }
.hc-cols { display: flex; flex-wrap: wrap; gap: 1.5em; }
.hc-nothing { color: #555; font-style: italic; }
"""


def card_id(layer: int, head: int) -> str:
    """The DOM id of a head's card: ``head-L17H3``."""
    return f"head-L{int(layer)}H{int(head)}"


class HeadCard:
    """One head's card: its row of the taxonomy and its evidence (no model).

    Build it with :meth:`HeadTaxonomy.card` or :meth:`from_taxonomy`.

    Attributes
    ----------
    layer, head
        The head.
    row
        Its table row (a dict).
    evidence
        Its part of the evidence document (``examples``, ``writes``, ``composition``,
        ``pattern``; see :mod:`headclass.scores.examples`), ``{}`` when none was collected.
    tokens
        ``{"<id>": string}`` for every token the evidence names.
    """

    def __init__(
        self,
        row: Mapping[str, Any],
        evidence: Optional[Mapping[str, Any]] = None,
        *,
        document: Optional[Mapping[str, Any]] = None,
        model: str = "",
        roles: Optional[Mapping[tuple[int, int], str]] = None,
    ):
        self.row = dict(row)
        self.layer, self.head = int(self.row["layer"]), int(self.row["head"])
        self.evidence = dict(evidence or {})
        document = document or {}
        self.tokens: dict[str, str] = dict(document.get("tokens") or {})
        self._document = {k: v for k, v in document.items() if k != "heads"}
        self.model = model
        self._roles = dict(roles or {})

    @classmethod
    def from_taxonomy(cls, taxonomy: HeadTaxonomy, layer: int, head: int) -> "HeadCard":
        """The card of head ``(layer, head)`` of ``taxonomy`` (a :class:`HeadclassError` names the
        valid range for a head that does not exist)."""
        if not isinstance(taxonomy, HeadTaxonomy):
            raise HeadclassError(f"a head card needs a HeadTaxonomy; got {type(taxonomy).__name__}.")
        row = taxonomy.head(int(layer), int(head))
        document = taxonomy._evidence or {}
        return cls(
            row,
            (document.get("heads") or {}).get(f"L{int(layer)}H{int(head)}"),
            document=document,
            model=taxonomy.model_name,
            roles=_roles(taxonomy),
        )

    # -- what it holds ----------------------------------------------------------------------
    @property
    def id(self) -> str:
        """``head-L{layer}H{head}``."""
        return card_id(self.layer, self.head)

    def examples(self, probe: Optional[str] = None) -> list[dict[str, Any]]:
        """The attention examples of ``probe`` (default: ``text`` when there is one, else the first)."""
        by_probe = self.evidence.get("examples") or {}
        if probe is None:
            probe = "text" if "text" in by_probe else next(iter(by_probe), None)
        return list(by_probe.get(probe, [])) if probe is not None else []

    def token(self, token_id: Any) -> str:
        """A token's string as the evidence recorded it (its id otherwise)."""
        return self.tokens.get(str(int(token_id)), str(int(token_id)))

    @property
    def writes_nothing(self) -> bool:
        """The head's output is negligible (output role ``no-op``, or ``writes_nothing``)."""
        return self.row.get("output_role") == "no-op" or bool(self.row.get("writes_nothing"))

    def raised_tokens(self) -> list[tuple[str, list[str]]]:
        """``[(source token, [raised tokens, most raised first])]``."""
        return [
            (self.token(w["source"]), [self.token(i) for i, _ in w["raises"]])
            for w in self.evidence.get("writes") or []
        ]

    # -- rendering --------------------------------------------------------------------------
    def __repr__(self) -> str:
        r = self.row
        return (
            f"HeadCard(L{self.layer}H{self.head} of {self.model!r}: attention {r.get('attention_role')}, "
            f"output {r.get('output_role')})"
        )

    def _repr_html_(self) -> str:
        return self.to_html()

    def to_html(self) -> str:
        """The card as a self-contained HTML fragment (its styles included):
        ``<div class="hc-card" id="head-L{layer}H{head}">``."""
        return f"<style>{CARD_CSS}</style>" + self.body_html()

    def body_html(self) -> str:
        """The card's element without the styles (a page holds :data:`CARD_CSS` once)."""
        return self.element_open() + self.inner_html() + "</div>"

    def element_open(self, *, hidden: bool = False) -> str:
        """The card element's opening tag: ``<div class="hc-card" id="head-L5H1" data-head="L5H1">``."""
        attrs = f' id="{self.id}" data-head="L{self.layer}H{self.head}"' + (" hidden" if hidden else "")
        return f'<div class="hc-card"{attrs}>'

    def inner_html(self) -> str:
        """What the card element holds (the report fills an empty card element with it on opening)."""
        return "".join(
            [
                self._header(),
                self._budget(),
                self._examples_html(),
                self._looks_for(),
                self._writes(),
                self._composition(),
                self._ablation(),
                self._pattern(),
                self._scores(),
            ]
        )

    # -- sections ---------------------------------------------------------------------------
    def _header(self) -> str:
        r = self.row
        borderline = {b.strip() for b in str(r.get("borderline") or "").split(",") if b.strip()}

        def role(axis: str, name: str, margin: Any) -> str:
            mark = (
                (' <span class="hc-border" title="borderline: a score within 2 SE of its threshold">borderline</span>')
                if name in borderline
                else ""
            )
            return (
                f'<span class="hc-role" title="{html.escape(LABEL_MEANINGS.get(name, ""))}">{axis}: '
                f"<b>{html.escape(str(name))}</b> (margin {_fmt(margin)}){mark}</span>"
            )

        roles = str(r.get("attention_roles") or "")
        extra = (
            f'<p class="hc-sub">attention roles that hold: {html.escape(roles)}</p>'
            if roles and roles != r.get("attention_role")
            else ""
        )
        others = sorted(borderline - {r.get("attention_role"), r.get("output_role")})
        border = (
            f'<p class="hc-sub"><span class="hc-border">borderline</span>: {html.escape(", ".join(others))}</p>'
            if others
            else ""
        )
        labels = str(r.get("labels") or "") or "none"
        return (
            f"<h3>L{self.layer}H{self.head}"
            + (f' <span class="hc-sub">· {html.escape(self.model)}</span>' if self.model else "")
            + "</h3>"
            + "<p>"
            + role("attention", r.get("attention_role", "?"), r.get("attention_margin"))
            + role("output", r.get("output_role", "?"), r.get("output_margin"))
            + f"confidence {_fmt(r.get('confidence'))}</p>"
            + extra
            + border
            + f'<p class="hc-sub">primary label <b>{html.escape(str(r.get("primary_label")))}</b> · '
            f"labels: {html.escape(labels)}</p>"
        )

    def _budget(self) -> str:
        from headclass.report.plots import BUDGET_COLORS

        for prefix, probe in (("budget", "text"), ("budget_rep", "repeated tokens")):  # noqa: B007 (used below)
            shares = [(c, self.row.get(f"{prefix}_{c}")) for c in BUDGET_CLASSES]
            if all(_finite(v) for _, v in shares):
                break
        else:
            return '<h4>Attention budget</h4><p class="hc-nothing">not measured</p>'
        values = [(c, float(v if v is not None else 0.0)) for c, v in shares]  # all finite (checked above)
        total = sum(max(0.0, v) for _, v in values) or 1.0
        bar = "".join(
            f'<span style="width:{100 * max(0.0, v) / total:.2f}%;background:{BUDGET_COLORS[c]}" '
            f'title="{c}: {v:.3f}"></span>'
            for c, v in values
        )
        legend = "".join(
            f'<span><i style="background:{BUDGET_COLORS[c]}"></i>{c} {v:.2f}</span>' for c, v in values if v >= 0.005
        )
        return (
            f'<h4>Attention budget <span class="hc-sub">({probe})</span></h4>'
            f'<div class="hc-bar">{bar}</div><div class="hc-legend">{legend}</div>'
        )

    def _examples_html(self) -> str:
        by_probe = self.evidence.get("examples") or {}
        if not by_probe:
            return '<h4>Strongest attention</h4><p class="hc-nothing">no examples collected</p>'
        out = []
        for probe in sorted(by_probe, key=lambda p: (p != "text", p)):
            rows = []
            for ex in by_probe[probe]:
                rows.append(
                    f'<tr class="hc-example"><td><span class="hc-tok">{self._tok(ex["query_token"])}</span> '
                    f'({ex["query"]}) &rarr; <span class="hc-tok">{self._tok(ex["key_token"])}</span> '
                    f"({ex['key']})</td>"
                    f'<td class="hc-num">{ex["weight"]:.3f}</td><td class="hc-num">{ex["offset"]}</td>'
                    f'<td>{html.escape(ex["relation"])}</td><td class="hc-ctx">{self._context(ex)}</td></tr>'
                )
            out.append(
                f"<h4>Strongest attention on the {html.escape(probe)} probe "
                '<span class="hc-sub">(away from the first position)</span></h4>'
                '<table class="hc-examples" data-probe="' + html.escape(probe) + '"><thead><tr>'
                "<th>query &rarr; key (position)</th><th>weight</th><th>offset</th><th>key is</th>"
                "<th>context (query, key)</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
            )
        return "".join(out)

    def _context(self, ex: Mapping[str, Any]) -> str:
        pieces = []
        for i, (start, ids) in enumerate(ex["context"]):
            if i:
                pieces.append('<span class="hc-gap"> … </span>')
            for pos, tid in enumerate(ids, start=int(start)):
                cls = "hc-q" if pos == ex["query"] else "hc-k" if pos == ex["key"] else ""
                pieces.append(
                    f'<span class="{cls}">{self._tok(tid)}</span>' if cls else f"<span>{self._tok(tid)}</span>"
                )
        return "".join(pieces)

    def _looks_for(self) -> str:
        examples = self.examples()
        if not examples:
            return ""
        rows = "".join(
            f'<tr><td><span class="hc-tok">{self._tok(ex["query_token"])}</span> ({ex["query"]})</td><td>'
            + ", ".join(f'<span class="hc-tok">{self._tok(t)}</span> ({k}) {w:.2f}' for k, t, w in ex["prefers"])
            + "</td></tr>"
            for ex in examples
        )
        return (
            '<h4>What it looks for <span class="hc-sub">(keys each example query prefers, '
            "first position included)</span></h4><table><thead><tr><th>query</th><th>preferred keys "
            f"(position) weight</th></tr></thead><tbody>{rows}</tbody></table>"
        )

    def _writes(self) -> str:
        embedding = self._document.get("embedding")
        head = (
            f'<h4>What it writes <span class="hc-sub">(OV circuit through '
            f"{'the effective embedding' if embedding == 'effective' else 'W_E'}; "
            f"copy_eigen {_fmt(self.row.get('copy_eigen'))})</span></h4>"
        )
        if self.writes_nothing:
            return head + (
                f'<p class="hc-nothing hc-writes-nothing">This head writes nothing: its OV output '
                f"is negligible (ov_gain_relative {_fmt(self.row.get('ov_gain_relative'))}, output "
                f"role {html.escape(str(self.row.get('output_role')))}); the tokens below are noise.</p>"
                + self._writes_table()
            )
        return head + self._writes_table()

    def _writes_table(self) -> str:
        writes = self.evidence.get("writes") or []
        if not writes:
            return '<p class="hc-nothing">not collected</p>'
        rows = "".join(
            f'<tr><td><span class="hc-tok">{self._tok(w["source"])}</span></td><td class="hc-raises">'
            + " ".join(f'<span class="hc-tok">{self._tok(i)}</span>' for i, _ in w["raises"])
            + "</td><td>"
            + " ".join(f'<span class="hc-tok">{self._tok(i)}</span>' for i, _ in w["lowers"])
            + "</td></tr>"
            for w in writes
        )
        return (
            '<table class="hc-writes"><thead><tr><th>attending to</th><th>raises most</th>'
            f"<th>lowers most</th></tr></thead><tbody>{rows}</tbody></table>"
        )

    def _composition(self) -> str:
        partners = self.evidence.get("composition")
        status = self._document.get("composition") or {}
        if not partners or not any(partners.values()):
            if self.layer == 0 and (status.get("computed") or partners):
                why = "a first-layer head has no earlier heads"
            else:
                why = status.get("reason") or "not computed"
            return f'<h4>Composition partners</h4><p class="hc-nothing">{html.escape(why)}</p>'
        cols = []
        for kind in ("q", "k", "v"):
            items = "".join(
                f'<li>L{la}H{ha} {s:.3f} <span class="hc-sub">{html.escape(self._roles.get((la, ha), ""))}</span></li>'
                for la, ha, s in partners.get(kind, [])
            )
            cols.append(f"<div><b>{kind.upper()}-composition</b><ol>{items}</ol></div>")
        return (
            '<h4>Composition partners <span class="hc-sub">(earlier heads whose output this head\'s '
            "queries, keys and values read; their attention role)</span></h4>"
            f'<div class="hc-cols hc-composition">{"".join(cols)}</div>'
        )

    def _ablation(self) -> str:
        found = [(k, v) for k, v in self.row.items() if k.startswith("ablation_") and not k.endswith("_se")]
        if not found:
            return (
                '<h4>Ablation</h4><p class="hc-nothing">not computed '
                "(classify(model, ablation=True) or headclass classify --ablation)</p>"
            )
        rows = "".join(f'<tr><td>{html.escape(k)}</td><td class="hc-num">{_fmt(v)}</td></tr>' for k, v in found)
        return (
            f'<h4>Ablation <span class="hc-sub">(loss change when the head is ablated)</span></h4><table>{rows}</table>'
        )

    def _pattern(self) -> str:
        grid = self.evidence.get("pattern") or []
        prompt = (self._document.get("pattern_prompt") or {}).get("tokens") or []
        if not grid or not prompt:
            return ""
        n = len(grid)
        cell, pad = 14, 70
        size = pad + n * cell
        levels: dict[int, list[str]] = {}  # one path per shade (8 levels): a small SVG
        for q, row in enumerate(grid):
            for k, w in enumerate(row):
                if w >= 0.02:
                    level = min(7, int(float(w) * 8))
                    levels.setdefault(level, []).append(f"M{pad + k * cell} {pad + q * cell}h{cell}v{cell}h-{cell}z")
        rects = [
            f'<path fill="rgb({int(235 - 200 * (lv + 1) / 8)},{int(240 - 170 * (lv + 1) / 8)},255)" '
            f'd="{"".join(cells)}"/>'
            for lv, cells in sorted(levels.items())
        ]
        labels = []
        for i, tid in enumerate(prompt[:n]):
            text = html.escape(self.token(tid)[:8])
            labels.append(f'<text x="{pad - 4}" y="{pad + i * cell + 11}" text-anchor="end">{text}</text>')
            labels.append(f'<text transform="translate({pad + i * cell + 10},{pad - 4}) rotate(-60)">{text}</text>')
        probe = (self._document.get("pattern_prompt") or {}).get("probe") or ""
        return (
            f'<h4>Pattern on a short prompt <span class="hc-sub">(first {n} tokens of the {html.escape(probe)} '
            "probe; query down, key across)</span></h4>"
            f'<svg class="hc-pattern" width="{size}" height="{size}" font-size="9" '
            f'xmlns="http://www.w3.org/2000/svg"><rect x="{pad}" y="{pad}" width="{n * cell}" '
            f'height="{n * cell}" fill="none" stroke="#ccc"/>{"".join(rects)}{"".join(labels)}</svg>'
        )

    def _scores(self) -> str:
        rows = []
        for key, value in self.row.items():
            if key in ID_COLUMNS or key.endswith("_se") or key.startswith(("is_", "ablation_")):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            se = self.row.get(f"{key}_se")
            rows.append(
                f"<tr><td>{html.escape(key)}</td><td>{_fmt(value)}</td>"
                f"<td>{_fmt(se) if se is not None else ''}</td></tr>"
            )
        return (
            "<details><summary><b>Every score</b> (with its standard error)</summary>"
            '<table class="hc-scores"><thead><tr><th>score</th><th>value</th><th>SE</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></details>"
        )

    def _tok(self, token_id: Any) -> str:
        return html.escape(self.token(token_id))


def _roles(taxonomy: HeadTaxonomy) -> dict[tuple[int, int], str]:
    t = taxonomy._table
    return {(int(la), int(h)): str(r) for la, h, r in zip(t["layer"], t["head"], t["attention_role"])}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


# -- explain: a card plus the live pattern on a prompt ---------------------------------------------

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog."


class Explanation:
    """A head's card plus its live attention pattern on a prompt (what :func:`explain` returns).

    In Jupyter it shows the card, then the pattern: circuitsvis' interactive view when
    circuitsvis is installed, the plotly heatmap otherwise. :meth:`to_html` is a whole,
    self-contained page (plotly inline), what ``headclass explain --out`` writes.
    """

    def __init__(self, card: HeadCard, figure: Any, circuitsvis: Any = None):
        self.card, self.figure, self.circuitsvis = card, figure, circuitsvis

    def __repr__(self) -> str:
        return f"Explanation({self.card!r})"

    def _ipython_display_(self) -> None:
        """In Jupyter: the card, then circuitsvis' view (or the plotly figure, through plotly's own
        notebook renderer, which works offline)."""
        from IPython.display import HTML, display

        display(HTML(self.card.to_html() + "<h4>Live pattern on your prompt</h4>"))
        display(self.circuitsvis if self.circuitsvis is not None else self.figure)

    def _repr_html_(self) -> str:
        """One HTML string (front ends without ``_ipython_display_``; plotly.js from its CDN)."""
        live = (
            str(self.circuitsvis)
            if self.circuitsvis is not None
            else self.figure.to_html(full_html=False, include_plotlyjs="cdn")
        )
        return self.card.to_html() + f"<h4>Live pattern on your prompt</h4>{live}"

    def to_html(self) -> str:
        return explain_page(self.card, self.figure)


def explain_page(card: HeadCard, figure: Any) -> str:
    """One self-contained page: the card, then ``figure`` (plotly.js inline, no network)."""
    live = figure.to_html(full_html=False, include_plotlyjs=True, div_id="live-pattern", config={"displaylogo": False})
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>headclass: L{card.layer}H{card.head} of {html.escape(card.model)}</title>"
        f"<style>{CARD_CSS} body {{ margin: 1em 2em; }}</style></head><body>"
        f"{card.body_html()}<h4>Live pattern on your prompt</h4>{live}</body></html>"
    )


def explain(
    model: Any,
    layer: int,
    head: int,
    *,
    taxonomy: Optional[HeadTaxonomy] = None,
    prompt: Any = None,
    config: Any = None,
    progress: bool = False,
) -> Explanation:
    """One head's card and its live attention pattern on ``prompt``.

    Parameters
    ----------
    model
        A :class:`~headclass.HeadModel` (or any :func:`headclass.load_model` source).
    layer, head
        The head.
    taxonomy
        The model's taxonomy, when you have it; otherwise the model is classified here.
    prompt
        Text, or token ids (default: a sentence said twice; random repeated ids without a tokenizer).
    """
    from headclass.report import plots
    from headclass.taxonomy import classify

    if not hasattr(model, "run_with_patterns"):
        from headclass.loading import load_model

        model = load_model(model)
    plots._check_head(model, layer, head)
    if taxonomy is None:
        taxonomy = classify(model, config, progress=progress)
    prompt = _default_prompt(model) if prompt is None else prompt
    figure = plots.attention_pattern(model, prompt, int(layer), int(head))
    live = None
    try:
        import circuitsvis  # noqa: F401

        live = plots.attention_pattern_circuitsvis(model, prompt, int(layer), heads=[int(head)])
    except ImportError:
        pass
    return Explanation(taxonomy.card(int(layer), int(head)), figure, live)


def _default_prompt(model: Any) -> Any:
    if getattr(model, "tokenizer", None) is not None:
        return DEFAULT_PROMPT
    from headclass.probes import repeated

    return repeated(model, 1, 8, 2, seed=0).tokens[0]


def parse_head(text: str, n_layers: Optional[int] = None, n_heads: Optional[int] = None) -> tuple[int, int]:
    """``"17.3"`` (or ``"L17H3"``) -> ``(17, 3)``; a :class:`HeadclassError` says the form otherwise."""
    import re

    found = re.fullmatch(r"\s*(?:L(\d+)H(\d+)|(\d+)\.(\d+))\s*", str(text), flags=re.IGNORECASE)
    if not found:
        raise HeadclassError(f"a head is written LAYER.HEAD (e.g. 17.3) or L17H3; got {text!r}.")
    layer, head = (int(g) for g in (found.group(1) or found.group(3), found.group(2) or found.group(4)))
    if n_layers is not None and not 0 <= layer < n_layers:
        raise HeadclassError(f"layer must be in [0, {n_layers - 1}]; got {layer} in {text!r}.")
    if n_heads is not None and not 0 <= head < n_heads:
        raise HeadclassError(f"head must be in [0, {n_heads - 1}]; got {head} in {text!r}.")
    return layer, head
