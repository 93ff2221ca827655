"""Figures of head importance by ablation (:mod:`headclass.scores.ablation`).

Like :mod:`headclass.report.plots`: data first, columns by name, a ``go.Figure`` returned and
never shown, plotly imported only when a function runs, one colour per label everywhere.

Examples
--------
>>> tax = headclass.classify(model, ablation=True)
>>> fig = fig_importance_by_label(tax.table)                        # one panel per probe
>>> fig = fig_importance_by_label(tax.table, labels=["copy"], x="relative_depth")
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from headclass.errors import MissingDependencyError, ScoreError
from headclass.taxonomy.schema import ABLATION_COLUMNS

__all__ = ["fig_importance_by_label", "importance_by_label"]

_TITLES = {
    "ablation_induction_dloss": "induction loss (repeated tokens)",
    "ablation_text_dloss": "next-token loss (text)",
}
_X = ("layer", "relative_depth")


def importance_by_label(table: Any, *, x: str = "layer", labels: Optional[Sequence[str]] = None) -> Any:
    """Mean ablation ``dloss`` of the heads of each primary label, per layer (tidy).

    Parameters
    ----------
    table
        A taxonomy table (or a :class:`~headclass.taxonomy.HeadTaxonomy`) with columns
        ``layer, head, primary_label`` and at least one of ``ablation_induction_dloss``,
        ``ablation_text_dloss``; ``relative_depth`` too when ``x="relative_depth"``.
    x
        ``"layer"`` or ``"relative_depth"`` (the layer's centre in (0, 1), to compare models).
    labels
        Keep only these primary labels; ``None`` keeps all.

    Returns
    -------
    pandas.DataFrame
        One row per (score, label, layer): ``score``, ``primary_label``, ``layer``, ``x``,
        ``mean_dloss``, ``n_heads``, ``heads`` (``"L3H1 L3H4"``). Heads whose ``dloss`` is NaN
        (not ablated) are left out; a (label, layer) with none left has no row.
    """
    import pandas as pd

    frame = getattr(table, "table", table)
    if not isinstance(frame, pd.DataFrame):
        raise ScoreError(f"table must be a DataFrame or a HeadTaxonomy; got {type(table).__name__}.")
    if x not in _X:
        raise ScoreError(f"The 'x' parameter must be one of {list(_X)}. Got {x!r}.")
    scores = [c for c in ABLATION_COLUMNS if c in frame.columns]
    needed = {"layer", "head", "primary_label"} | ({x} if x != "layer" else set())
    missing = sorted(needed - set(frame.columns))
    if missing or not scores:
        raise ScoreError(
            "importance by label needs columns layer, head, primary_label and an ablation score "
            f"({', '.join(ABLATION_COLUMNS)}); missing: {missing or list(ABLATION_COLUMNS)}. "
            "Run headclass.classify(model, ablation=True)."
        )
    if labels is not None:
        frame = frame[frame["primary_label"].isin(list(labels))]
    rows = []
    for score in scores:
        valid = frame[frame[score].notna()]
        for (label, layer), group in valid.groupby(["primary_label", "layer"], sort=True):
            rows.append(
                {
                    "score": score,
                    "primary_label": str(label),
                    "layer": int(layer),
                    "x": float(group[x].iloc[0]) if x != "layer" else int(layer),
                    "mean_dloss": float(group[score].mean()),
                    "n_heads": int(len(group)),
                    "heads": " ".join(f"L{int(la)}H{int(h)}" for la, h in zip(group["layer"], group["head"])),
                }
            )
    columns = ["score", "primary_label", "layer", "x", "mean_dloss", "n_heads", "heads"]
    return pd.DataFrame(rows, columns=columns)


def fig_importance_by_label(
    table: Any,
    *,
    x: str = "layer",
    labels: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
) -> Any:
    """Mean ablation importance of each label's heads, per layer: one line per primary label.

    One panel per ablation score present (induction loss, text loss); y is the mean loss
    increase (nats per token) of the layer's heads carrying that primary label, marker area
    grows with their number, hover lists them. "Are copy heads in early layers as important
    as copy heads in late layers?" is the ``copy`` line read left to right.

    Parameters
    ----------
    table, x, labels
        As in :func:`importance_by_label`.
    title
        Figure title; a default names the model when the table has a ``model`` column.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    data = importance_by_label(table, x=x, labels=labels)
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:  # pragma: no cover - plotly is a core dependency
        raise MissingDependencyError("figures need plotly: pip install plotly") from None
    from headclass.report.plots import label_color

    frame = getattr(table, "table", table)
    scores = [c for c in ABLATION_COLUMNS if c in frame.columns]
    fig = make_subplots(
        rows=1,
        cols=len(scores),
        shared_xaxes=True,
        subplot_titles=[_TITLES[s] for s in scores],
        horizontal_spacing=0.08,
    )
    for col, score in enumerate(scores, start=1):
        part = data[data["score"] == score]
        for label, group in part.groupby("primary_label", sort=True):
            fig.add_trace(
                go.Scatter(
                    x=group["x"],
                    y=group["mean_dloss"],
                    mode="lines+markers",
                    name=str(label),
                    legendgroup=str(label),
                    showlegend=col == 1,
                    line=dict(color=label_color(str(label))),
                    marker=dict(size=[6 + 3 * math.sqrt(n) for n in group["n_heads"]], color=label_color(str(label))),
                    customdata=list(zip(group["n_heads"], group["heads"], group["layer"])),
                    hovertemplate=(
                        f"{label}<br>layer %{{customdata[2]}}: mean dloss %{{y:.4f}}"
                        "<br>%{customdata[0]} head(s): %{customdata[1]}<extra></extra>"
                    ),
                ),
                row=1,
                col=col,
            )
        fig.add_hline(y=0.0, line=dict(color="#bbbbbb", width=1), row=1, col=col)
        fig.update_xaxes(title_text="relative depth" if x == "relative_depth" else "layer", row=1, col=col)
    fig.update_yaxes(title_text="mean loss increase when ablated (nats/token)", row=1, col=1)
    if title is None:
        model = str(frame["model"].iloc[0]) if "model" in frame.columns and len(frame) else None
        title = "Head importance by label" + (f" — {model}" if model else "")
    fig.update_layout(
        title=title,
        legend_title_text="primary label",
        template="plotly_white",
        height=420,
        width=max(520, 480 * len(scores)),
    )
    return fig
