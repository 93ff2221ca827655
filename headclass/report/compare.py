"""Compare head taxonomies across models of different depths.

Models with different numbers of layers are aligned by *relative depth*: layer ``l`` of an
``L``-layer model sits at ``l / (L - 1)`` in [0, 1] (first layer 0, last layer 1), and depths
are cut into ``n_bins`` equal bins (the last bin is closed). For each model, bin and label the
tidy table counts the heads with that label and the fraction of the bin's heads they are, so a
12-layer and a 30-layer model share an x axis.

A :class:`~headclass.taxonomy.HeadTaxonomy` holds only its table, so models can be
loaded, classified and freed one after another (:func:`headclass.workflows.compare_models`
does exactly that) and compared at the end without two models in memory at once.

Examples
--------
>>> from headclass.report.compare import compare
>>> cmp = compare([tax_small, tax_large], n_bins=10)
>>> cmp.table                       # model, bin, depth_low, depth_high, depth_mid, label, ...
>>> cmp.counts_per_label()          # model x label counts
>>> cmp.fig_label_fractions()       # plotly figure, one facet per label
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from headclass.errors import HeadclassError
from headclass.taxonomy import LABELS, UNCLASSIFIED, HeadTaxonomy, label_mask

__all__ = ["Comparison", "compare"]

_ALL_LABELS = LABELS + (UNCLASSIFIED,)


class Comparison:
    """Label counts of several models by relative depth.

    Build with :func:`compare`. Attributes: ``table`` (tidy, one row per model x depth bin x
    label), ``taxonomies`` (the compared :class:`HeadTaxonomy` objects, by model name),
    ``n_bins``.
    """

    def __init__(self, table: pd.DataFrame, taxonomies: Mapping[str, HeadTaxonomy], n_bins: int):
        self.table = table
        self.taxonomies = dict(taxonomies)
        self.n_bins = n_bins

    @property
    def models(self) -> list[str]:
        """Model names, in the order given."""
        return list(self.taxonomies)

    def counts_per_label(self) -> pd.DataFrame:
        """Heads per label (a head with several labels counts for each): rows are models, columns
        are labels then ``unclassified`` and ``n_heads``."""
        rows = []
        for name, tax in self.taxonomies.items():
            t = tax.table
            row: dict[str, Any] = {"model": name}
            for label in _ALL_LABELS:
                row[label] = int(label_mask(t, label).sum())
            row["n_heads"] = len(t)
            rows.append(row)
        out = pd.DataFrame(rows).set_index("model")
        out.columns.name = "label"
        return out

    def fig_label_fractions(self, labels: Optional[Sequence[str]] = None) -> Any:
        """Fraction of heads with each label vs relative depth: one facet per label, one line per
        model. Returns a ``plotly.graph_objects.Figure`` (not shown)."""
        px = _plotly_express()
        data = self._rows_for(labels)
        fig = px.line(
            data,
            x="depth_mid",
            y="fraction",
            color="model",
            facet_col="label",
            facet_col_wrap=3,
            markers=True,
            category_orders={"label": _label_order(data), "model": self.models},
            hover_data={"count": True, "n_heads": True, "depth_low": ":.2f", "depth_high": ":.2f"},
            labels={"depth_mid": "relative depth", "fraction": "fraction of heads"},
            title="Head labels by relative depth",
        )
        fig.update_xaxes(range=[0, 1])
        fig.update_yaxes(range=[0, 1.02])
        fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
        return fig

    def fig_label_counts(self, *, fraction: bool = False, labels: Optional[Sequence[str]] = None) -> Any:
        """Grouped bars: heads per label, one bar per model (``fraction=True``: share of the
        model's heads). Returns a ``plotly.graph_objects.Figure`` (not shown)."""
        px = _plotly_express()
        wide = self.counts_per_label()
        n = wide.pop("n_heads")
        if fraction:
            wide = wide.div(n, axis=0)
        long = wide.reset_index().melt(id_vars="model", var_name="label", value_name="value")
        if labels is not None:
            _check_labels(labels)
            long = long[long["label"].isin(labels)]
        y = "fraction of heads" if fraction else "heads"
        fig = px.bar(
            long,
            x="label",
            y="value",
            color="model",
            barmode="group",
            category_orders={"label": _label_order(long), "model": self.models},
            labels={"value": y},
            title=f"Heads per label ({y})",
        )
        return fig

    def _rows_for(self, labels: Optional[Sequence[str]]) -> pd.DataFrame:
        if labels is None:
            return self.table
        _check_labels(labels)
        return self.table[self.table["label"].isin(labels)]

    def __repr__(self) -> str:
        return f"Comparison({len(self.taxonomies)} models: {', '.join(self.models)}; {self.n_bins} depth bins)"


def _check_labels(labels: Sequence[str]) -> None:
    bad = [label for label in labels if label not in _ALL_LABELS]
    if bad:
        raise HeadclassError(f"unknown label(s) {bad}; labels are {', '.join(_ALL_LABELS)}.")


def _label_order(data: pd.DataFrame) -> list[str]:
    present = set(data["label"])
    return [label for label in _ALL_LABELS if label in present]


def _plotly_express() -> Any:
    try:
        import plotly.express as px
    except ImportError:
        from headclass.errors import MissingDependencyError

        raise MissingDependencyError("figures need plotly: pip install plotly.") from None
    return px


def _unique_names(taxonomies: Sequence[HeadTaxonomy]) -> list[str]:
    names: list[str] = []
    for tax in taxonomies:
        base = tax.model_name
        name, i = base, 2
        while name in names:
            name, i = f"{base} #{i}", i + 1
        names.append(name)
    return names


def compare(taxonomies: Sequence[HeadTaxonomy], *, n_bins: int = 10) -> Comparison:
    """Align taxonomies by relative depth and count labels per depth bin.

    Parameters
    ----------
    taxonomies
        One :class:`HeadTaxonomy` per model (at least one). Models with the same name are told
        apart as ``"name #2"``...
    n_bins
        Equal relative-depth bins over [0, 1]. A head's relative depth is
        ``layer / (n_layers - 1)``; bins holding no layer of a model are left out for that
        model.

    Returns
    -------
    Comparison
        ``table`` columns: ``model``, ``bin`` (0-based), ``depth_low``, ``depth_high``,
        ``depth_mid``, ``label`` (every label plus ``unclassified``), ``count`` (heads in the
        bin with the label; for ``unclassified``, heads with no label), ``n_heads`` (heads in
        the bin), ``fraction`` (``count / n_heads``), ``n_layers`` (of the model).
    """
    if isinstance(taxonomies, HeadTaxonomy):
        taxonomies = [taxonomies]
    taxonomies = list(taxonomies)
    if not taxonomies:
        raise HeadclassError("compare needs at least one HeadTaxonomy; got none.")
    for i, tax in enumerate(taxonomies):
        if not isinstance(tax, HeadTaxonomy):
            raise HeadclassError(f"compare takes HeadTaxonomy objects; item {i} is a {type(tax).__name__}.")
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise HeadclassError(f"The 'n_bins' parameter must be an int >= 1. Got {n_bins!r}.")
    n_bins = int(n_bins)
    names = _unique_names(taxonomies)
    rows = []
    for name, tax in zip(names, taxonomies):
        t = tax.table
        bins = np.minimum((t["relative_depth"].to_numpy() * n_bins).astype(int), n_bins - 1)
        for b in sorted(set(bins.tolist())):
            sub = t[bins == b]
            n = len(sub)
            for label in _ALL_LABELS:
                count = int(label_mask(sub, label).sum())
                rows.append(
                    {
                        "model": name,
                        "bin": b,
                        "depth_low": b / n_bins,
                        "depth_high": (b + 1) / n_bins,
                        "depth_mid": (b + 0.5) / n_bins,
                        "label": label,
                        "count": count,
                        "n_heads": n,
                        "fraction": count / n,
                        "n_layers": tax.n_layers,
                    }
                )
    table = pd.DataFrame(rows)
    table["model"] = table["model"].astype(str)
    table["label"] = table["label"].astype(str)
    return Comparison(table, dict(zip(names, taxonomies)), n_bins)
