"""Figures of a head taxonomy: plotly, built from the tidy table, never shown here.

(About 700 lines: one module per figure family would each re-declare the label colours, the
table checks and the hover text that every figure here shares.)

Every function takes the data first (a :class:`~headclass.taxonomy.HeadTaxonomy`, its
``table`` DataFrame, or a model for the attention-pattern figures), refers to columns by name and
returns a ``plotly.graph_objects.Figure``; call ``.show()`` or ``write_html`` yourself. plotly is
imported when a function runs, not when headclass is imported.

Colours are fixed per label (:data:`LABEL_COLORS`), so a label looks the same in the grid, the
bar chart and every report.

Examples
--------
>>> from headclass.report import plots
>>> fig = plots.head_grid(taxonomy)                     # layer x head, coloured by primary_label
>>> fig = plots.score_heatmap(taxonomy, "induction")    # one score, layer x head
>>> fig = plots.label_counts_by_layer(taxonomy)         # stacked label counts per layer
>>> fig = plots.attention_pattern(model, "The cat sat. The cat sat.", layer=3, head=1)
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

from headclass.errors import HeadclassError, MissingDependencyError, ProbeError, ScoreError
from headclass.scores.patterns import BUDGET_CLASSES
from headclass.taxonomy.rules import BUDGET_ROLE
from headclass.taxonomy.schema import ABLATION_COLUMNS, ID_COLUMNS, SCORE_COLUMNS

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import plotly.graph_objects as go
    from torch import Tensor

__all__ = [
    "LABEL_COLORS",
    "label_color",
    "head_grid",
    "score_heatmap",
    "score_heatmaps",
    "score_columns",
    "headline_columns",
    "label_counts_by_layer",
    "attention_budget",
    "BUDGET_COLORS",
    "attention_pattern",
    "attention_pattern_circuitsvis",
    "singular_value_spectra",
]

#: One colour per label, the same in every figure (keys: :data:`headclass.taxonomy.LABELS`
#: plus ``unclassified``). Other labels get a stable colour from :data:`_SPARE_COLORS`, chosen
#: by a hash of the label's name.
LABEL_COLORS: dict[str, str] = {
    "copy": "#2ca02c",
    "previous-token": "#1f77b4",
    "induction": "#d62728",
    "bos": "#7f7f7f",
    "diffuse": "#bcbd22",
    "duplicate-token": "#ff7f0e",
    "current-token": "#17becf",
    "fixed-offset": "#9467bd",
    "copy-suppression": "#8c564b",
    "local": "#aec7e8",
    "delimiter": "#e377c2",
    "content": "#98df8a",
    "successor": "#ffbb78",
    "no-op": "#c7c7c7",
    "transform": "#c5b0d5",
    "mixed": "#f7b6d2",
    "unclassified": "#e4e4e4",
}
_SPARE_COLORS = (
    "#393b79",
    "#637939",
    "#8c6d31",
    "#843c39",
    "#7b4173",
    "#3182bd",
    "#e6550d",
    "#31a354",
    "#756bb1",
    "#636363",
    "#6baed6",
)
_NO_LABEL = "unclassified"


def label_color(label: str) -> str:
    """The colour of ``label`` in every headclass figure."""
    if label in LABEL_COLORS:
        return LABEL_COLORS[label]
    digest = hashlib.sha1(str(label).encode("utf-8")).digest()
    return _SPARE_COLORS[digest[0] % len(_SPARE_COLORS)]


def _go() -> Any:
    try:
        import plotly.graph_objects as go
    except ImportError:  # pragma: no cover - plotly is a core dependency
        raise MissingDependencyError("figures need plotly: pip install plotly") from None
    return go


def _as_table(data: Any) -> "pd.DataFrame":
    """A taxonomy's table, or the DataFrame itself; checked for ``layer`` and ``head``."""
    import pandas as pd

    table = getattr(data, "table", data)
    if not isinstance(table, pd.DataFrame):
        raise HeadclassError(f"expected a HeadTaxonomy or its table (a pandas DataFrame); got {type(data).__name__}.")
    missing = [c for c in ("layer", "head") if c not in table.columns]
    if missing:
        raise ScoreError(f"the head table needs columns 'layer' and 'head'; it lacks {missing}.")
    if table.empty:
        raise ScoreError("the head table is empty: there is no head to plot.")
    return table


def score_columns(data: Any) -> list[str]:
    """Float score columns of the table: :data:`~headclass.taxonomy.schema.SCORE_COLUMNS` and
    ablation columns first (those present), then any further float scores (``ov_norm``...)."""
    import pandas as pd

    table = _as_table(data)
    known = [c for c in SCORE_COLUMNS + ABLATION_COLUMNS if c in table.columns]
    extra = [
        c for c in table.columns if c not in ID_COLUMNS and c not in known and pd.api.types.is_float_dtype(table[c])
    ]
    return known + extra


def _primary_labels(table: "pd.DataFrame") -> "pd.Series":
    if "primary_label" not in table.columns:
        raise ScoreError("the head table has no 'primary_label' column to colour heads by.")
    return table["primary_label"].fillna(_NO_LABEL).astype(str).replace("", _NO_LABEL)


def _label_order(labels: Sequence[str]) -> list[str]:
    """Labels present, known ones in :data:`LABEL_COLORS` order, then others alphabetically."""
    present = set(labels)
    known = [label for label in LABEL_COLORS if label in present]
    return known + sorted(present - set(known))


def _grid_shape(table: "pd.DataFrame") -> tuple[int, int]:
    return int(table["layer"].max()) + 1, int(table["head"].max()) + 1


def _model_name(data: Any, table: "pd.DataFrame") -> str:
    meta = getattr(data, "metadata", None) or {}
    if isinstance(meta, Mapping) and meta.get("model"):
        return str(meta["model"])
    if "model" in table.columns and table["model"].nunique() == 1:
        return str(table["model"].iloc[0])
    return ""


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.3f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "-"
    return str(value)


def _is_missing(value: Any) -> bool:
    import pandas as pd

    return value is None or bool(pd.isna(value))


def _hover_text(row: Any, columns: Sequence[str]) -> str:
    lines = [f"<b>L{int(row['layer'])}H{int(row['head'])}</b>"]
    if "primary_label" in row.index:
        lines.append(f"primary: <b>{_format_value(row['primary_label'])}</b>")
    if "margin" in row.index:
        lines.append(f"margin: {_format_value(row['margin'])}")
    if "labels" in row.index:
        lines.append(f"labels: {_format_value(row['labels']) or '-'}")
    if "attention_role" in row.index:
        roles = row.get("attention_roles", "")
        named = f" ({roles})" if roles and roles != row["attention_role"] else ""
        lines.append(f"attention: <b>{row['attention_role']}</b>{named}")
    if "output_role" in row.index:
        lines.append(f"output: <b>{row['output_role']}</b>")
    if "confidence" in row.index and not _is_missing(row["confidence"]):
        lines.append(f"confidence: {row['confidence']:.2f}")
    if "borderline" in row.index and row["borderline"]:
        lines.append(f"<i>borderline: {row['borderline']}</i>")
    if "fixed_offset_k" in row.index and not _is_missing(row["fixed_offset_k"]):
        lines.append(f"fixed_offset_k: {row['fixed_offset_k']}")
    lines += [f"{c}: {_format_value(row[c])}" + _se_text(row, c) for c in columns]
    return "<br>".join(lines)


def _se_text(row: Any, column: str) -> str:
    se = row.get(f"{column}_se")
    return "" if se is None or _is_missing(se) else f" ± {se:.3f}"


def headline_columns(data: Any) -> list[str]:
    """The scores worth a heatmap or a hover line: the labelling scores, the budget shares,
    the positional consistency and the ablation columns present (not SEs, base rates, lifts)."""
    table = _as_table(data)
    budget = [f"budget_{c}" for c in BUDGET_CLASSES] + [f"budget_rep_{c}" for c in BUDGET_CLASSES]
    wanted = list(SCORE_COLUMNS) + budget + ["positional_consistency", "positional_consistency_rep"]
    wanted += list(ABLATION_COLUMNS)
    return [c for c in wanted if c in table.columns and not table[c].isna().all()]


def _grid_layout(fig: Any, n_layers: int, n_heads: int, title: str) -> None:
    height = min(2000, max(320, 26 * n_layers + 140))
    fig.update_layout(
        title=title,
        height=height,
        plot_bgcolor="white",
        margin=dict(l=60, r=20, t=60, b=50),
        legend=dict(title="label", itemsizing="constant"),
        showlegend=True,  # plotly hides a legend of one entry (a model with one label)
    )
    fig.update_xaxes(
        title="head",
        tickmode="linear",
        dtick=1 if n_heads <= 32 else 4,
        range=[-0.5, n_heads - 0.5],
        showgrid=False,
        zeroline=False,
    )
    fig.update_yaxes(
        title="layer",
        tickmode="linear",
        dtick=1 if n_layers <= 36 else 4,
        range=[n_layers - 0.5, -0.5],
        showgrid=False,
        zeroline=False,
    )


def head_grid(data: Any, *, title: Optional[str] = None) -> "go.Figure":
    """Layer x head grid, each cell coloured by the head's ``primary_label``.

    Parameters
    ----------
    data
        A :class:`~headclass.taxonomy.HeadTaxonomy` or its ``table`` (columns ``layer``,
        ``head``, ``primary_label``; every numeric score column is shown on hover).
    title
        Figure title; defaults to ``"Attention heads of <model>"``.

    Returns
    -------
    plotly.graph_objects.Figure
        A heatmap (layer 0 at the top) plus one legend entry per label present.
    """
    go = _go()
    table = _as_table(data)
    labels = _primary_labels(table)
    order = _label_order(labels.tolist())
    index = {label: i for i, label in enumerate(order)}
    n_layers, n_heads = _grid_shape(table)
    scores = headline_columns(table)

    z: list[list[Optional[float]]] = [[None] * n_heads for _ in range(n_layers)]
    text: list[list[str]] = [[""] * n_heads for _ in range(n_layers)]
    for (_, row), label in zip(table.iterrows(), labels):
        layer, head = int(row["layer"]), int(row["head"])
        z[layer][head] = index[label]
        text[layer][head] = _hover_text(row, scores)

    # A stepped colour scale: value i (label i) gets exactly that label's colour.
    n = len(order)
    colorscale = []
    for i, label in enumerate(order):
        colorscale += [[i / n, label_color(label)], [(i + 1) / n, label_color(label)]]
    fig = go.Figure()
    fig.add_trace(
        go.Heatmap(
            z=z,
            text=text,
            x=list(range(n_heads)),
            y=list(range(n_layers)),
            zmin=-0.5,
            zmax=n - 0.5,
            colorscale=colorscale,
            showscale=False,
            hovertemplate="%{text}<extra></extra>",
            xgap=1,
            ygap=1,
            name="heads",
        )
    )
    for label in order:  # legend only: invisible points with the label's colour
        count = int((labels == label).sum())
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                name=f"{label} ({count})",
                marker=dict(symbol="square", size=12, color=label_color(label)),
                hoverinfo="skip",
            )
        )
    name = _model_name(data, table)
    _grid_layout(fig, n_layers, n_heads, title or f"Attention heads{' of ' + name if name else ''}")
    return fig


def _score_trace(go: Any, table: "pd.DataFrame", score: str, n_layers: int, n_heads: int) -> Any:
    if score not in table.columns:
        raise ScoreError(f"the head table has no score column {score!r}; score columns: {score_columns(table)}.")
    values = table[score].astype(float)
    z: list[list[Optional[float]]] = [[None] * n_heads for _ in range(n_layers)]
    for layer, head, value in zip(table["layer"], table["head"], values):
        z[int(layer)][int(head)] = None if math.isnan(value) else float(value)
    present = values.dropna()
    low = float(present.min()) if len(present) else 0.0
    high = float(present.max()) if len(present) else 1.0
    if low < 0:
        bound = 1.0 if -1 <= low and high <= 1 else max(abs(low), abs(high))
        scale = dict(colorscale="RdBu", zmid=0.0, zmin=-bound, zmax=bound)
    else:
        scale = dict(colorscale="Viridis", zmin=0.0, zmax=1.0 if high <= 1 else high)
    return go.Heatmap(
        z=z,
        x=list(range(n_heads)),
        y=list(range(n_layers)),
        xgap=1,
        ygap=1,
        name=score,
        colorbar=dict(title=score),
        hovertemplate="L%{y}H%{x}<br>" + score + ": %{z:.3f}<extra></extra>",
        **scale,
    )


def score_heatmap(data: Any, score: str, *, title: Optional[str] = None) -> "go.Figure":
    """One score for every head, as a layer x head heatmap.

    Scores that can be negative (``copy_eigen`` is in [-1, 1]) get a diverging scale centred
    on 0; the others a sequential scale from 0. NaN (not computed for that head) stays blank.

    Parameters
    ----------
    data
        A HeadTaxonomy or its table.
    score
        The column to draw, e.g. ``"induction"``.
    """
    go = _go()
    table = _as_table(data)
    n_layers, n_heads = _grid_shape(table)
    fig = go.Figure(_score_trace(go, table, score, n_layers, n_heads))
    name = _model_name(data, table)
    _grid_layout(fig, n_layers, n_heads, title or f"{score}{' - ' + name if name else ''}")
    return fig


def score_heatmaps(data: Any, scores: Optional[Sequence[str]] = None, *, title: Optional[str] = None) -> "go.Figure":
    """Several scores as layer x head heatmaps in one figure, a drop-down menu picking the score.

    Parameters
    ----------
    scores
        Score columns, in menu order; by default every column of :func:`score_columns`.
    """
    go = _go()
    table = _as_table(data)
    chosen = list(score_columns(table) if scores is None else scores)
    if not chosen:
        raise ScoreError("no score column to draw; give scores=[...] with columns of the table.")
    n_layers, n_heads = _grid_shape(table)
    fig = go.Figure()
    for i, score in enumerate(chosen):
        trace = _score_trace(go, table, score, n_layers, n_heads)
        trace.visible = i == 0
        fig.add_trace(trace)
    name = _model_name(data, table)
    buttons = [
        dict(
            label=score,
            method="update",
            args=[
                {"visible": [j == i for j in range(len(chosen))]},
                {"title.text": f"{score}{' - ' + name if name else ''}"},
            ],
        )
        for i, score in enumerate(chosen)
    ]
    _grid_layout(fig, n_layers, n_heads, title or f"{chosen[0]}{' - ' + name if name else ''}")
    fig.update_layout(
        updatemenus=[
            dict(buttons=buttons, direction="down", x=1.0, xanchor="right", y=1.12, yanchor="bottom", showactive=True)
        ],
        margin=dict(t=90),
    )
    return fig


def label_counts_by_layer(data: Any, *, title: Optional[str] = None) -> "go.Figure":
    """Stacked bars: how many heads of each layer carry each primary label."""
    go = _go()
    table = _as_table(data)
    labels = _primary_labels(table)
    n_layers, _ = _grid_shape(table)
    counts = labels.groupby(table["layer"].astype(int)).value_counts().unstack(fill_value=0)
    counts = counts.reindex(range(n_layers), fill_value=0)
    fig = go.Figure()
    for label in _label_order(labels.tolist()):
        fig.add_trace(
            go.Bar(
                x=list(range(n_layers)),
                y=counts[label].tolist(),
                name=label,
                marker=dict(color=label_color(label), line=dict(width=0.5, color="#444")),
                hovertemplate=f"layer %{{x}}<br>{label}: %{{y}}<extra></extra>",
            )
        )
    name = _model_name(data, table)
    fig.update_layout(
        barmode="stack",
        title=title or f"Primary labels per layer{' - ' + name if name else ''}",
        xaxis=dict(title="layer", tickmode="linear", dtick=1 if n_layers <= 36 else 4),
        yaxis=dict(title="heads"),
        legend=dict(title="label", traceorder="normal"),
        plot_bgcolor="white",
        margin=dict(l=60, r=20, t=60, b=50),
    )
    return fig


#: Colours of the attention-budget classes (:data:`headclass.scores.patterns.BUDGET_CLASSES`),
#: each the colour of the attention role it stands for.
BUDGET_COLORS: dict[str, str] = {cls: LABEL_COLORS[role] for cls, role in BUDGET_ROLE.items()}


def attention_budget(data: Any, *, probe: str = "text", title: Optional[str] = None) -> "go.Figure":
    """Stacked bars of the attention budget: one bar per head, one segment per destination class.

    Parameters
    ----------
    data
        A :class:`~headclass.taxonomy.HeadTaxonomy` or its table, with the ``budget_<class>``
        columns (``probe="text"``) or ``budget_rep_<class>`` (``probe="repeated"``).
    probe
        ``"text"`` (natural text) or ``"repeated"`` (repeated random tokens).
    title
        Figure title.

    Returns
    -------
    plotly.graph_objects.Figure
        Bars ``L{layer}H{head}`` (shares summing to 1), a menu choosing one layer or all of them;
        hover shows each share and its lift over a uniform head.
    """
    go = _go()
    table = _as_table(data)
    if probe not in ("text", "repeated"):
        raise HeadclassError(f"The 'probe' parameter must be 'text' or 'repeated'. Got {probe!r}.")
    prefix = "budget" if probe == "text" else "budget_rep"
    columns = [f"{prefix}_{cls}" for cls in BUDGET_CLASSES]
    missing = [c for c in columns if c not in table.columns]
    if missing or table[columns].isna().all().all():
        raise ScoreError(
            f"the table has no {probe} attention budget (columns {columns[0]}...); classify "
            "a model with a tokenizer for the text budget, or use probe='repeated'."
        )
    names = [f"L{int(r.layer)}H{int(r.head)}" for r in table.itertuples(index=False)]
    fig = go.Figure()
    for cls, column in zip(BUDGET_CLASSES, columns):
        lift = table.get(f"{prefix}_lift_{cls}")
        custom = lift.tolist() if lift is not None else [math.nan] * len(table)
        fig.add_trace(
            go.Bar(
                x=names,
                y=table[column].tolist(),
                name=cls,
                customdata=custom,
                marker=dict(color=BUDGET_COLORS[cls], line=dict(width=0.3, color="#444")),
                hovertemplate=f"%{{x}}<br>{cls}: %{{y:.3f}} (lift %{{customdata:.2f}})<extra></extra>",
            )
        )
    layers = sorted(set(int(x) for x in table["layer"]))
    ranges = {
        layer: [
            names.index(f"L{layer}H0") - 0.5 if f"L{layer}H0" in names else 0,
            max(i for i, n in enumerate(names) if n.startswith(f"L{layer}H")) + 0.5,
        ]
        for layer in layers
    }
    buttons = [dict(label="all layers", method="relayout", args=[{"xaxis.range": [-0.5, len(names) - 0.5]}])]
    buttons += [
        dict(label=f"layer {layer}", method="relayout", args=[{"xaxis.range": ranges[layer]}]) for layer in layers
    ]
    name = _model_name(data, table)
    fig.update_layout(
        barmode="stack",
        plot_bgcolor="white",
        margin=dict(l=60, r=20, t=80, b=60),
        title=title or f"Attention budget ({probe}){' - ' + name if name else ''}",
        yaxis=dict(title="share of attention", range=[0, 1.0001]),
        xaxis=dict(title="head", tickangle=-90),
        legend=dict(title="destination", traceorder="normal"),
        updatemenus=[dict(buttons=buttons, direction="down", x=1.0, xanchor="right", y=1.15, yanchor="top")],
    )
    return fig


# -- attention patterns -----------------------------------------------------------------------


def _check_head(model: Any, layer: int, head: int) -> None:
    if not 0 <= int(layer) < model.n_layers:
        raise HeadclassError(f"layer must be in [0, {model.n_layers - 1}] for {model.name!r}; got {layer}.")
    if not 0 <= int(head) < model.n_heads:
        raise HeadclassError(f"head must be in [0, {model.n_heads - 1}] for {model.name!r}; got {head}.")


def _prompt_tokens(model: Any, prompt: Union[str, "Tensor", Sequence[int]]) -> "Tensor":
    """1-D token ids of a prompt (text is tokenised with BOS as the model expects)."""
    import torch

    if isinstance(prompt, str):
        tokens = model.to_tokens(prompt)[0]
    else:
        tokens = torch.as_tensor(prompt, dtype=torch.long)
        if tokens.ndim == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
    if tokens.ndim != 1 or tokens.numel() == 0:
        raise ProbeError(f"prompt must be a text or a 1-D sequence of token ids; got shape {tuple(tokens.shape)}.")
    return tokens


def _token_strings(model: Any, tokens: "Tensor") -> list[str]:
    """Readable token strings (spaces shown as-is, newlines as ``\\n``); ids without a tokenizer."""
    tok = getattr(model, "tokenizer", None)
    ids = [int(i) for i in tokens]
    if tok is None:
        return [str(i) for i in ids]
    out = []
    for i in ids:
        try:
            piece = tok.decode([i])
        except Exception:  # any tokenizer failure: show the id
            piece = str(i)
        out.append(piece.replace("\n", "\\n").replace("\t", "\\t") or f"[{i}]")
    return out


def _head_pattern(model: Any, tokens: "Tensor", layer: int) -> "Tensor":
    """The layer's attention pattern ``[head, query, key]`` for one prompt."""
    found: dict[int, Any] = {}

    def keep(layer_index: int, pattern: "Tensor") -> None:
        found[layer_index] = pattern[0].float().cpu().clone()

    model.run_with_patterns(tokens[None, :], keep, layers=[int(layer)])
    return found[int(layer)]


def attention_pattern(
    model: Any,
    prompt: Union[str, "Tensor", Sequence[int]],
    layer: int,
    head: int,
    *,
    title: Optional[str] = None,
) -> "go.Figure":
    """One head's attention pattern on a prompt: query tokens down, key tokens across.

    Parameters
    ----------
    model
        A :class:`~headclass.HeadModel` (anything with ``run_with_patterns``).
    prompt
        Text (tokenised with BOS as the model expects) or a 1-D sequence of token ids.
    layer, head
        The head to show.
    """
    go = _go()
    _check_head(model, layer, head)
    tokens = _prompt_tokens(model, prompt)
    pattern = _head_pattern(model, tokens, layer)[int(head)]  # [query, key]
    strings = _token_strings(model, tokens)
    n = len(strings)
    ticks = [f"{s} ({i})" if n <= 64 else s for i, s in enumerate(strings)]
    z = pattern.numpy().copy()
    z[~_causal_mask(n)] = float("nan")  # future keys: blank, not 0
    hover = [[f"query {q}: {strings[q]!r}<br>key {k}: {strings[k]!r}" for k in range(n)] for q in range(n)]
    fig = go.Figure(
        go.Heatmap(
            z=z.tolist(),
            x=list(range(n)),
            y=list(range(n)),
            text=hover,
            zmin=0.0,
            zmax=1.0,
            colorscale="Blues",
            colorbar=dict(title="attention"),
            hovertemplate="%{text}<br>attention: %{z:.3f}<extra></extra>",
        )
    )
    size = min(900, max(360, 18 * n + 200))
    fig.update_layout(
        title=title or f"L{layer}H{head} attention - {getattr(model, 'name', '')}",
        width=size + 80,
        height=size,
        plot_bgcolor="white",
        margin=dict(l=120, r=20, t=60, b=120),
    )
    step = max(1, math.ceil(n / 64))
    fig.update_xaxes(
        title="key",
        tickmode="array",
        tickvals=list(range(0, n, step)),
        ticktext=ticks[::step],
        tickangle=-60,
        showgrid=False,
    )
    fig.update_yaxes(
        title="query",
        tickmode="array",
        tickvals=list(range(0, n, step)),
        ticktext=ticks[::step],
        autorange="reversed",
        showgrid=False,
    )
    return fig


def _causal_mask(n: int) -> Any:
    import numpy as np

    return np.tril(np.ones((n, n), dtype=bool))


def attention_pattern_circuitsvis(
    model: Any,
    prompt: Union[str, "Tensor", Sequence[int]],
    layer: int,
    heads: Optional[Sequence[int]] = None,
) -> Any:
    """circuitsvis' interactive ``attention_heads`` view of a layer's heads on a prompt.

    Returns circuitsvis' render object, which displays itself in Jupyter (its ``str()`` is
    HTML). Needs the optional package circuitsvis: ``pip install 'headclass[viz]'``.

    Parameters
    ----------
    heads
        Heads of ``layer`` to show; all of them by default.
    """
    try:
        import circuitsvis as cv
    except ImportError:
        raise MissingDependencyError(
            "attention_pattern_circuitsvis needs the optional package circuitsvis: "
            "pip install 'headclass[viz]' (or pip install circuitsvis); "
            "plots.attention_pattern draws the same pattern with plotly."
        ) from None
    chosen = list(range(model.n_heads)) if heads is None else [int(h) for h in heads]
    for head in chosen:
        _check_head(model, layer, head)
    tokens = _prompt_tokens(model, prompt)
    pattern = _head_pattern(model, tokens, layer)[chosen]  # [head, query, key]
    return cv.attention.attention_heads(
        attention=pattern,
        tokens=_token_strings(model, tokens),
        attention_head_names=[f"L{layer}H{h}" for h in chosen],
    )


# -- weights ------------------------------------------------------------------------------------


def singular_value_spectra(
    spectra: Union["Tensor", Mapping[str, "Tensor"]],
    heads: Sequence[tuple[int, int]],
    *,
    normalize: bool = False,
    log_y: bool = True,
    title: Optional[str] = None,
) -> "go.Figure":
    """Singular values of chosen heads' OV (and/or QK) circuits, largest first, one line per head.

    A head whose OV circuit copies (close to a scaled projection) has a flat spectrum over its
    ``d_head`` directions; a low-rank head drops off after a few values.

    Parameters
    ----------
    spectra
        ``Float[Tensor, "layer head d_head"]`` (e.g. the OV spectra from
        :mod:`headclass.scores.weights`), or a mapping of names to such tensors, e.g.
        ``{"OV": ov, "QK": qk}``, drawn side by side.
    heads
        ``(layer, head)`` pairs to draw.
    normalize
        Divide each head's spectrum by its largest value (compare shapes, not scales).
    log_y
        Logarithmic y axis.
    """
    go = _go()
    from plotly.subplots import make_subplots

    named = dict(spectra) if isinstance(spectra, Mapping) else {"singular values": spectra}
    if not named:
        raise ScoreError("spectra is empty: give a [layer, head, d_head] tensor or a mapping of them.")
    pairs = [(int(layer), int(head)) for layer, head in heads]
    if not pairs:
        raise HeadclassError("heads is empty: give (layer, head) pairs to draw, e.g. [(5, 1), (5, 5)].")
    for name, values in named.items():
        if getattr(values, "ndim", None) != 3:
            raise ScoreError(
                f"spectra {name!r} must have shape [layer, head, d_head]; got {tuple(getattr(values, 'shape', ()))}."
            )
        n_layers, n_heads = int(values.shape[0]), int(values.shape[1])
        for layer, head in pairs:
            if not (0 <= layer < n_layers and 0 <= head < n_heads):
                raise HeadclassError(
                    f"head L{layer}H{head} is outside spectra {name!r} ({n_layers} layers x {n_heads} heads)."
                )
    fig = make_subplots(rows=1, cols=len(named), subplot_titles=list(named))
    for col, (name, values) in enumerate(named.items(), start=1):
        for i, (layer, head) in enumerate(pairs):
            ys = values[layer, head].detach().float().cpu().sort(descending=True).values
            if normalize and float(ys[0]) > 0:
                ys = ys / ys[0]
            fig.add_trace(
                go.Scatter(
                    x=list(range(1, len(ys) + 1)),
                    y=ys.tolist(),
                    mode="lines+markers",
                    marker=dict(size=4),
                    name=f"L{layer}H{head}",
                    legendgroup=f"L{layer}H{head}",
                    showlegend=col == 1,
                    line=dict(color=_SPARE_COLORS[i % len(_SPARE_COLORS)]),
                    hovertemplate=f"L{layer}H{head} {name}<br>#%{{x}}: %{{y:.4g}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text="index (largest first)", row=1, col=col)
        fig.update_yaxes(
            title_text="singular value" + (" / largest" if normalize else ""),
            type="log" if log_y else "linear",
            row=1,
            col=col,
        )
    fig.update_layout(
        title=title or "Singular value spectra", height=420, plot_bgcolor="white", legend=dict(title="head")
    )
    return fig
