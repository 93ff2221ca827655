"""The sweep's comparison report: role fractions by relative depth, parameter count and training step.

Every figure takes the sweep's tidy tables first (the merged head table, one row per head of
every model, and the per-model table) and returns a plotly figure without showing it.
:func:`write_report` puts them in one self-contained HTML file.

* :func:`fig_depth` -- fraction of heads with each label vs relative depth, one line per model
  (checkpoints other than each series' last are left out, so the lines stay readable);
* :func:`fig_families` -- fraction of heads with each label vs parameter count, for each family
  with at least two sizes;
* :func:`fig_training` -- for each checkpoint series: the best induction and previous-token
  scores over heads, and the in-context loss (loss on the second repeat minus the first), vs
  training step: the phase change of Olsson et al. (2022).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd

__all__ = ["training_curves", "family_fractions", "fig_depth", "fig_families", "fig_training", "write_report"]

#: Labels drawn against parameter count.
FAMILY_LABELS = ("previous-token", "induction", "copy", "copy-suppression", "duplicate-token", "bos")


def training_curves(table: pd.DataFrame) -> pd.DataFrame:
    """One row per checkpoint: ``series``, ``step``, ``model``, the best ``induction`` and
    ``previous_token`` scores over the model's heads, and ``in_context_loss``; by series, step."""
    rows = table[table["step"].notna() & table["series"].notna()]
    if rows.empty:
        return pd.DataFrame(columns=["series", "step", "model", "induction", "previous_token", "in_context_loss"])
    out = (
        rows.groupby(["series", "step", "model"], sort=False)
        .agg(
            induction=("induction", "max"),
            previous_token=("previous_token", "max"),
            in_context_loss=("in_context_loss", "first"),
        )
        .reset_index()
    )
    out["step"] = out["step"].astype("int64")
    return out.sort_values(["series", "step"], kind="stable").reset_index(drop=True)


def family_fractions(table: pd.DataFrame, labels: Sequence[str] = FAMILY_LABELS) -> pd.DataFrame:
    """Fraction of each model's heads per label, for families with >= 2 parameter counts
    (checkpoints left out): ``family``, ``model``, ``n_params``, ``label``, ``fraction``."""
    from headclass.taxonomy import flag_column

    rows = table[table["family"].notna() & table["step"].isna()]
    out = []
    for family, sub in rows.groupby("family", sort=False):
        if sub["n_params"].nunique() < 2:
            continue
        for model, heads in sub.groupby("model", sort=False):
            for label in labels:
                column = flag_column(label)
                out.append(
                    {
                        "family": family,
                        "model": model,
                        "n_params": int(heads["n_params"].iloc[0]),
                        "label": label,
                        "fraction": float(heads[column].mean()),
                    }
                )
    return pd.DataFrame(out, columns=["family", "model", "n_params", "label", "fraction"])


def fig_depth(taxonomies: Sequence[Any], table: pd.DataFrame, n_bins: int = 10) -> Optional[Any]:
    """Role fractions vs relative depth (:meth:`Comparison.fig_label_fractions`), one line per
    model; of each checkpoint series only the last step is drawn."""
    from headclass.report.compare import compare

    last = set()
    curves = training_curves(table)
    for _, series in curves.groupby("series", sort=False):
        last.add(series["model"].iloc[-1])
    checkpoint_models = set(curves["model"])
    chosen = [t for t in taxonomies if t.model_name not in checkpoint_models or t.model_name in last]
    if not chosen:
        return None
    return compare(chosen, n_bins=n_bins).fig_label_fractions(
        labels=["previous-token", "induction", "copy", "copy-suppression", "duplicate-token", "bos"]
    )


def fig_families(table: pd.DataFrame) -> Optional[Any]:
    """Fraction of heads per label vs parameter count (log axis), one facet per family."""
    data = family_fractions(table)
    if data.empty:
        return None
    import plotly.express as px

    fig = px.line(
        data.sort_values("n_params"),
        x="n_params",
        y="fraction",
        color="label",
        facet_col="family",
        markers=True,
        log_x=True,
        hover_data={"model": True},
        labels={"n_params": "parameters", "fraction": "fraction of heads"},
        title="Head labels by model size (one facet per family)",
    )
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    return fig


def fig_training(table: pd.DataFrame) -> Optional[Any]:
    """Induction and previous-token scores (best head) and in-context loss vs training step."""
    curves = training_curves(table)
    if curves.empty:
        return None
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08,
        subplot_titles=("best head score", "in-context loss (2nd repeat - 1st), nats"),
    )
    dash = {"induction": "solid", "previous_token": "dot"}
    for series, rows in curves.groupby("series", sort=False):
        for score in ("induction", "previous_token"):
            fig.add_trace(
                go.Scatter(
                    x=rows["step"],
                    y=rows[score],
                    mode="lines+markers",
                    name=f"{series}: {score.replace('_', '-')}",
                    line={"dash": dash[score]},
                    hovertext=rows["model"],
                ),
                row=1,
                col=1,
            )
        fig.add_trace(
            go.Scatter(
                x=rows["step"],
                y=rows["in_context_loss"],
                mode="lines+markers",
                name=f"{series}: in-context loss",
                hovertext=rows["model"],
            ),
            row=2,
            col=1,
        )
    fig.update_yaxes(range=[0, 1.02], row=1, col=1)
    fig.update_xaxes(title_text="training step", row=2, col=1)
    fig.update_layout(title="Training dynamics: induction heads form as the in-context loss drops", height=650)
    return fig


def write_report(
    path: Path,
    *,
    table: pd.DataFrame,
    models: pd.DataFrame,
    taxonomies: Sequence[Any],
    failures: Sequence[dict[str, Any]],
    n_bins: int,
) -> Path:
    """The self-contained ``sweep.html``: summary, failures, and the three kinds of figure."""
    from headclass.atomic import write_text

    sections = []
    shown = [
        c
        for c in ("name", "status", "source", "revision", "step", "n_params", "in_context_loss", "seconds", "error")
        if c in models.columns
    ]
    sections.append("<h2>Models</h2>" + models[shown].to_html(index=False, border=0, na_rep="", float_format="%.3f"))
    if failures:
        sections.append(
            f"<h2>Failed ({len(failures)})</h2><ul>"
            + "".join(
                f"<li><b>{html.escape(f['name'])}</b> ({html.escape(str(f['source']))}): "
                f"{html.escape(str(f['error_type']))}: {html.escape(str(f['error']))}</li>"
                for f in failures
            )
            + "</ul>"
        )
    figures = [
        ("Role fractions by relative depth", fig_depth(taxonomies, table, n_bins) if len(table) else None),
        ("Role fractions by parameter count", fig_families(table) if len(table) else None),
        ("Training dynamics", fig_training(table) if len(table) else None),
    ]
    first = True
    for i, (title, fig) in enumerate(figures):
        if fig is None:
            continue
        body = fig.to_html(full_html=False, include_plotlyjs=first, div_id=f"sweep-{i}")
        first = False
        sections.append(f"<h2>{html.escape(title)}</h2>{body}")
    n_done = int((models["status"] != "failed").sum()) if len(models) else 0
    text = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>headclass sweep</title></head>"
        "<body style='font-family: sans-serif; max-width: 1200px; margin: auto'>"
        f"<h1>headclass sweep: {n_done} of {len(models)} models</h1>" + "".join(sections) + "</body></html>"
    )
    return write_text(path, text)
