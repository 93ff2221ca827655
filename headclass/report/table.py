"""``HeadTaxonomy``: the tidy table of labelled heads, its summaries and its exports.

A :class:`HeadTaxonomy` holds only a :class:`pandas.DataFrame` (one row per head) and a plain
``metadata`` dict. It never refers to the model it came from, so taxonomies of several models
can be kept and compared while each model is loaded, classified and freed in turn.

The table schema (column order as listed; :data:`TABLE_COLUMNS`):

=========================  =========  ==============================================================
column                     dtype      meaning
=========================  =========  ==============================================================
``model``                  str        model display name (same on every row)
``layer``                  int64      0-based layer
``head``                   int64      0-based head within the layer
``relative_depth``         float64    ``layer / (n_layers - 1)``: 0 first layer, 1 last (0 if 1 layer)
``primary_label``          str        one of :data:`LABELS` or ``"unclassified"``
``margin``                 float64    normalised margin of the primary label (< 0 if unclassified)
``labels``                 str        every label the head has, comma-separated ("" if none)
``is_<label>``             bool       one flag per label, e.g. ``is_previous_token``, ``is_copy``
score columns              float64    :data:`SCORE_COLUMNS`; NaN = could not be computed
``fixed_offset_k``         Int64      the offset k >= 2 behind ``fixed_offset`` (<NA> if none)
ablation columns           float64    ``ablation_induction_dloss``, ``ablation_text_dloss``; only
                                      present when ``classify(..., ablation=True)``
further scores             float64    any other ``[layer, head]`` score the score modules return
                           / bool     (``ov_norm``, ``writes_nothing``...), after the above
=========================  =========  ==============================================================

Flags, scores and the primary rule: see :mod:`headclass.taxonomy` and ``docs/labels.md``.

``metadata`` keys written by :func:`headclass.classify`: ``model``, ``n_layers``, ``n_heads``,
``n_params``, ``backend``, ``architecture``, ``config`` (the whole config as a JSON-able dict),
``probe_seed``, ``versions`` (headclass, torch, transformer_lens, transformers, pandas),
``date`` (ISO 8601, UTC), ``ablation`` (bool).
"""

from __future__ import annotations

import html as _html
import math
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd

from headclass.errors import HeadclassError

__all__ = [
    "HeadTaxonomy",
    "LABELS",
    "CORE_LABELS",
    "UNCLASSIFIED",
    "PRIORITY",
    "FALLBACK_LABELS",
    "LABEL_SCORE",
    "SCORE_COLUMNS",
    "ABLATION_COLUMNS",
    "TABLE_COLUMNS",
    "flag_column",
]

#: The five core labels.
CORE_LABELS: tuple[str, ...] = ("copy", "previous-token", "induction", "bos", "diffuse")

#: Every label a head can carry, in table / display order.
LABELS: tuple[str, ...] = CORE_LABELS + (
    "duplicate-token",
    "current-token",
    "fixed-offset",
    "copy-suppression",
)

#: The ``primary_label`` of heads with no label.
UNCLASSIFIED = "unclassified"

#: Tie-break order for the primary label (first wins when normalised margins are equal):
#: specific mechanisms before generic attention habits.
PRIORITY: tuple[str, ...] = (
    "induction",
    "copy-suppression",
    "duplicate-token",
    "previous-token",
    "fixed-offset",
    "current-token",
    "copy",
    "bos",
    "diffuse",
)

#: The score that ranks heads within a label (``summary().best_head``, plots).
LABEL_SCORE: dict[str, str] = {
    "copy": "copy_topk",
    "previous-token": "previous_token",
    "induction": "induction",
    "bos": "bos",
    "diffuse": "diffuse_entropy",
    "duplicate-token": "duplicate_token",
    "current-token": "current_token",
    "fixed-offset": "fixed_offset",
    "copy-suppression": "copy_suppression_topk",
}

#: Labels that describe where a head parks attention rather than a mechanism: they are a
#: head's primary label only when it has no other label.
FALLBACK_LABELS: tuple[str, ...] = ("bos", "diffuse")

#: Pattern scores (from :mod:`headclass.scores.patterns`), all float in [0, 1].
PATTERN_SCORE_COLUMNS: tuple[str, ...] = (
    "previous_token",
    "current_token",
    "bos",
    "induction",
    "duplicate_token",
    "fixed_offset",
    "diffuse_entropy",
    "max_attention",
)
#: Weight scores (from :mod:`headclass.scores.weights`): ``copy_eigen`` in [-1, 1], the rest [0, 1].
WEIGHT_SCORE_COLUMNS: tuple[str, ...] = ("copy_eigen", "copy_topk", "copy_suppression_topk")
#: Every float score column that is always present.
SCORE_COLUMNS: tuple[str, ...] = PATTERN_SCORE_COLUMNS + WEIGHT_SCORE_COLUMNS
#: Optional ablation columns (only with ``classify(..., ablation=True)``).
ABLATION_COLUMNS: tuple[str, ...] = ("ablation_induction_dloss", "ablation_text_dloss")


def flag_column(label: str) -> str:
    """The boolean column of a label: ``"previous-token"`` -> ``"is_previous_token"``."""
    if label not in LABELS:
        raise HeadclassError(f"unknown label {label!r}; labels are {', '.join(LABELS)}.")
    return "is_" + label.replace("-", "_")


FLAG_COLUMNS: tuple[str, ...] = tuple(flag_column(label) for label in LABELS)

#: The fixed columns of every table, in order (ablation columns follow when present).
TABLE_COLUMNS: tuple[str, ...] = (
    ("model", "layer", "head", "relative_depth", "primary_label", "margin", "labels")
    + FLAG_COLUMNS
    + SCORE_COLUMNS
    + ("fixed_offset_k",)
)

_STR_COLUMNS = ("model", "primary_label", "labels")
_INT_COLUMNS = ("layer", "head")
_FLOAT_COLUMNS = ("relative_depth", "margin") + SCORE_COLUMNS + ABLATION_COLUMNS

#: Scores averaged per layer by :meth:`HeadTaxonomy.per_layer` (those behind the core labels).
CORE_SCORES: tuple[str, ...] = (
    "copy_eigen",
    "copy_topk",
    "previous_token",
    "induction",
    "bos",
    "diffuse_entropy",
    "max_attention",
)


def normalise_table(table: pd.DataFrame) -> pd.DataFrame:
    """Check a head table against the schema and return a copy with canonical dtypes and order.

    Rows are sorted by (layer, head); columns follow :data:`TABLE_COLUMNS`, then the ablation
    columns present, then any other columns (kept as they are).
    """
    if not isinstance(table, pd.DataFrame):
        raise HeadclassError(f"a head table must be a pandas DataFrame; got {type(table).__name__}.")
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise HeadclassError(
            f"the head table lacks column(s) {', '.join(missing)}; see headclass.report.table "
            "for the schema."
        )
    out = table.copy()
    for col in _STR_COLUMNS:
        out[col] = out[col].astype(str)
    for col in _INT_COLUMNS:
        out[col] = out[col].astype("int64")
    for col in FLAG_COLUMNS:
        if out[col].isna().any():
            raise HeadclassError(f"column {col!r} must be True/False; it has missing values.")
        out[col] = out[col].astype(bool)
    for col in _FLOAT_COLUMNS:
        if col in out.columns:
            out[col] = out[col].astype("float64")
    out["fixed_offset_k"] = out["fixed_offset_k"].astype("Int64")
    if out.duplicated(["layer", "head"]).any():
        dup = out.loc[out.duplicated(["layer", "head"]), ["layer", "head"]].iloc[0]
        raise HeadclassError(f"the head table has layer {dup['layer']} head {dup['head']} twice.")
    bad = set(out["primary_label"]) - set(LABELS) - {UNCLASSIFIED}
    if bad:
        raise HeadclassError(f"unknown primary_label value(s) {sorted(bad)}; labels are {', '.join(LABELS)}.")
    extra_ablation = [c for c in ABLATION_COLUMNS if c in out.columns]
    rest = [c for c in out.columns if c not in TABLE_COLUMNS and c not in ABLATION_COLUMNS]
    out = out[list(TABLE_COLUMNS) + extra_ablation + rest]
    return out.sort_values(["layer", "head"], kind="stable").reset_index(drop=True)


class HeadTaxonomy:
    """What every attention head of one model does: a tidy table plus metadata.

    Build one with :func:`headclass.classify` (or :meth:`from_table` / :func:`read_json`).

    Parameters
    ----------
    table
        One row per head, schema in :mod:`headclass.report.table`; checked and put in
        canonical column order and dtypes.
    metadata
        Plain JSON-able facts: ``model``, ``n_layers``, ``n_heads``, ``n_params``, ``backend``,
        ``config`` (the config as a dict), ``probe_seed``, ``versions``, ``date``...

    Examples
    --------
    >>> tax = headclass.classify(model)
    >>> tax.table.query("is_induction")            # every induction head
    >>> tax.summary()                              # one row per label
    >>> tax.head(5, 1)["primary_label"]
    >>> tax.to_json("smollm2.json"); headclass.read_json("smollm2.json")
    """

    def __init__(self, table: pd.DataFrame, metadata: Optional[Mapping[str, Any]] = None):
        self._table = normalise_table(table)
        self._metadata = dict(metadata or {})

    @classmethod
    def from_table(cls, table: pd.DataFrame, metadata: Optional[Mapping[str, Any]] = None) -> "HeadTaxonomy":
        """Rebuild a taxonomy from a table (e.g. read back from a file) and its metadata."""
        return cls(table, metadata)

    # -- data ------------------------------------------------------------------------------
    @property
    def table(self) -> pd.DataFrame:
        """The head table (one row per head). A copy: edit it freely."""
        return self._table.copy()

    @property
    def metadata(self) -> dict[str, Any]:
        """Model, shapes, backend, config, probe seed, library versions, date (a copy)."""
        import copy

        return copy.deepcopy(self._metadata)

    @property
    def model_name(self) -> str:
        name = self._metadata.get("model")
        if name is None and len(self._table):
            name = str(self._table["model"].iloc[0])
        return str(name)

    @property
    def n_layers(self) -> int:
        n = self._metadata.get("n_layers")
        return int(n) if n is not None else int(self._table["layer"].max()) + 1

    @property
    def n_heads(self) -> int:
        """Heads per layer."""
        n = self._metadata.get("n_heads")
        return int(n) if n is not None else int(self._table["head"].max()) + 1

    def __len__(self) -> int:
        return len(self._table)

    def head(self, layer: int, head: int) -> dict[str, Any]:
        """One head's row as a dict (``layer``, ``head``, scores, flags, ``primary_label``...)."""
        rows = self._table[(self._table["layer"] == layer) & (self._table["head"] == head)]
        if rows.empty:
            raise HeadclassError(
                f"no head at layer {layer} head {head}; the model has layers 0..{self.n_layers - 1} "
                f"and heads 0..{self.n_heads - 1}."
            )
        return {k: _python(v) for k, v in rows.iloc[0].to_dict().items()}

    def heads_with(self, label: str, *, primary: bool = False) -> pd.DataFrame:
        """The rows of heads carrying ``label`` (as a flag, or as primary label), best margin first."""
        if label == UNCLASSIFIED:
            mask = self._table["primary_label"] == UNCLASSIFIED
        elif primary:
            flag_column(label)
            mask = self._table["primary_label"] == label
        else:
            mask = self._table[flag_column(label)]
        return self._table[mask].sort_values("margin", ascending=False, kind="stable").reset_index(drop=True)

    def relabel(self, thresholds: Any) -> "HeadTaxonomy":
        """The same heads labelled with other thresholds, from the stored scores (no model needed).

        ``thresholds``: a partial mapping (``{"induction": 0.3}``) over the thresholds this
        taxonomy was made with, ``config.thresholds`` or a whole config. The metadata's
        ``config.thresholds`` is updated.
        """
        from headclass.taxonomy import label_heads, resolve_thresholds, scores_from_table

        if isinstance(thresholds, Mapping):
            current = (self._metadata.get("config") or {}).get("thresholds") or {}
            thresholds = {**current, **thresholds}
        values = resolve_thresholds(thresholds)
        table = label_heads(scores_from_table(self._table), values, model=self.model_name)
        metadata = self.metadata
        metadata.setdefault("config", {})["thresholds"] = values
        return HeadTaxonomy(table, metadata)

    # -- summaries -------------------------------------------------------------------------
    def per_layer(self) -> pd.DataFrame:
        """Tidy per-layer counts: one row per layer x label (labels plus ``unclassified``).

        Columns: ``layer``, ``relative_depth``, ``label``, ``count`` (heads of the layer with the
        label as a flag; heads may have several), ``fraction`` (``count / n_heads``),
        ``primary_count`` and ``primary_fraction`` (heads whose primary label it is; these sum to
        the layer's heads), then ``mean_<score>`` for each score behind the core labels (the
        layer's mean, repeated on each of its rows).
        """
        t = self._table
        rows = []
        for layer, group in t.groupby("layer", sort=True):
            n = len(group)
            means = {f"mean_{s}": float(group[s].mean()) for s in CORE_SCORES}
            depth = float(group["relative_depth"].iloc[0])
            for label in LABELS + (UNCLASSIFIED,):
                if label == UNCLASSIFIED:
                    count = int((group["primary_label"] == UNCLASSIFIED).sum())
                else:
                    count = int(group[flag_column(label)].sum())
                primary = int((group["primary_label"] == label).sum())
                rows.append({"layer": int(layer), "relative_depth": depth, "label": label,
                             "count": count, "fraction": count / n,
                             "primary_count": primary, "primary_fraction": primary / n, **means})
        out = pd.DataFrame(rows)
        if out.empty:
            return out
        out["label"] = out["label"].astype(str)
        return out

    def summary(self) -> pd.DataFrame:
        """One row per label (plus ``unclassified``): how many heads, where, and the best one.

        Columns: ``label``, ``count`` (heads with the flag), ``fraction`` (of all heads),
        ``primary_count``, ``first_layer`` (first layer with such a head; <NA> if none),
        ``mean_relative_depth`` (NaN if none), ``best_head`` (``"L5H1"``: the flagged head with
        the highest :data:`LABEL_SCORE`; for ``unclassified`` the one closest to a label; ""
        if none).
        """
        t = self._table
        n = len(t)
        rows = []
        for label in LABELS + (UNCLASSIFIED,):
            if label == UNCLASSIFIED:
                mask = t["primary_label"] == UNCLASSIFIED
            else:
                mask = t[flag_column(label)]
            sub = t[mask]
            best = ""
            if len(sub):
                key = sub["margin"] if label == UNCLASSIFIED else sub[LABEL_SCORE[label]]
                top = sub.loc[key.idxmax()] if key.notna().any() else sub.iloc[0]
                best = f"L{int(top['layer'])}H{int(top['head'])}"
            rows.append({
                "label": label,
                "count": int(mask.sum()),
                "fraction": float(mask.sum()) / n if n else math.nan,
                "primary_count": int((t["primary_label"] == label).sum()),
                "first_layer": int(sub["layer"].min()) if len(sub) else pd.NA,
                "mean_relative_depth": float(sub["relative_depth"].mean()) if len(sub) else math.nan,
                "best_head": best,
            })
        out = pd.DataFrame(rows)
        out["label"] = out["label"].astype(str)
        out["best_head"] = out["best_head"].astype(str)
        out["first_layer"] = out["first_layer"].astype("Int64")
        return out

    # -- display ---------------------------------------------------------------------------
    def _headline(self) -> str:
        return (f"HeadTaxonomy({self.model_name!r}: {self.n_layers} layers x {self.n_heads} heads "
                f"= {len(self)} heads)")

    def __repr__(self) -> str:
        s = self.summary()
        lines = [self._headline()]
        for row in s.itertuples(index=False):
            if row.count == 0 and row.label != UNCLASSIFIED:
                continue
            where = f", first at layer {row.first_layer}" if row.label != UNCLASSIFIED else ""
            best = f", best {row.best_head}" if row.best_head and row.label != UNCLASSIFIED else ""
            noun = "head" if row.count == 1 else "heads"
            lines.append(f"  {row.label:<17} {row.count:>4} {noun}{where}{best}")
        none = [label for label, c in zip(s["label"], s["count"]) if c == 0 and label != UNCLASSIFIED]
        if none:
            lines.append(f"  (no {', '.join(none)} heads)")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        s = self.summary()
        head = "".join(f"<th>{_html.escape(c)}</th>" for c in ("label", "heads", "primary", "first layer", "best head"))
        body = []
        for row in s.itertuples(index=False):
            first = "" if pd.isna(row.first_layer) else str(row.first_layer)
            body.append(
                f"<tr><td>{_html.escape(row.label)}</td><td>{row.count}</td><td>{row.primary_count}</td>"
                f"<td>{first}</td><td>{_html.escape(row.best_head)}</td></tr>"
            )
        return (f"<div><p><b>{_html.escape(self._headline())}</b></p>"
                f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")

    # -- comparison ------------------------------------------------------------------------
    def equals(self, other: "HeadTaxonomy") -> bool:
        """Same table (values and dtypes) and same metadata."""
        return (isinstance(other, HeadTaxonomy) and self._table.equals(other._table)
                and list(self._table.dtypes) == list(other._table.dtypes)
                and self._metadata == other._metadata)

    # -- export ----------------------------------------------------------------------------
    def save(self, path: Any, format: Optional[str] = None) -> "Any":
        """Write to ``path`` in ``format`` (csv, json, parquet, markdown, html; default: from
        the file suffix). Atomic: a failure leaves no partial file. Returns the path."""
        from headclass.report.export import write

        return write(self, path, format=format)

    def to_csv(self, path: Any) -> Any:
        """The head table as CSV (no metadata). Returns the path."""
        return self.save(path, "csv")

    def to_json(self, path: Any) -> Any:
        """Records plus metadata and dtypes; :func:`headclass.report.export.read_json` reads it
        back to an equal taxonomy. Returns the path."""
        return self.save(path, "json")

    def to_parquet(self, path: Any) -> Any:
        """Parquet (needs ``pyarrow``); metadata kept in the file's schema metadata."""
        return self.save(path, "parquet")

    def to_markdown(self, path: Any) -> Any:
        """A readable Markdown report: metadata, per-label summary, every head."""
        return self.save(path, "markdown")

    def to_html(self, path: Any) -> Any:
        """The self-contained HTML report (:func:`headclass.report.html.write_html_report`)."""
        return self.save(path, "html")


def _python(value: Any) -> Any:
    """numpy / pandas scalars -> plain Python (NA -> None)."""
    if value is pd.NA or value is None:
        return None
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value
