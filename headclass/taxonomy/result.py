"""``HeadTaxonomy``: the result of :func:`headclass.classify`, a tidy table plus metadata.

A :class:`HeadTaxonomy` holds only a :class:`pandas.DataFrame` (one row per head, schema in
:mod:`headclass.taxonomy.schema`) and a plain ``metadata`` dict. It never refers to the model
it came from, so taxonomies of several models can be kept and compared while each model is
loaded, classified and freed in turn.

Exports (``to_csv``, ``to_json``, ``to_html``...) call the report layer lazily, as pandas'
``DataFrame.to_parquet`` imports its writer: :mod:`headclass.report` reads this module and is
never imported by it at module level.

``metadata`` keys written by :func:`headclass.classify`: ``model``, ``n_layers``, ``n_heads``,
``n_params``, ``backend``, ``architecture``, ``config`` (the whole config as a JSON-able dict),
``probe_seed``, ``versions`` (headclass, torch, transformer_lens, transformers, pandas),
``date`` (ISO 8601, UTC), ``ablation`` (bool).

``evidence`` (from ``classify(..., evidence=True)``, the default) is what the head cards show
beyond the table: a plain JSON-able document (:func:`headclass.scores.examples.head_evidence`:
attention examples, OV effects, composition partners, a pattern sample), token strings
included, never the model. JSON and parquet exports keep it; :meth:`HeadTaxonomy.card` reads it.
"""

from __future__ import annotations

import copy
import html as _html
import math
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd

from headclass.errors import HeadclassError
from headclass.taxonomy.labelling import label_heads, resolve_thresholds, scores_from_table
from headclass.taxonomy.rules import ATTENTION_ROLES, LABEL_SCORE, LABELS, MIXED, OUTPUT_ROLES, UNCLASSIFIED
from headclass.taxonomy.schema import CORE_SCORES, label_mask, normalise_table

__all__ = ["HeadTaxonomy"]


class HeadTaxonomy:
    """What every attention head of one model does: a tidy table plus metadata.

    Build one with :func:`headclass.classify` (or :meth:`from_table` / :func:`read_json`).

    Parameters
    ----------
    table
        One row per head, schema in :mod:`headclass.taxonomy.schema`; checked and put in
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
    >>> tax.card(5, 1)                             # the evidence behind its roles (Jupyter, HTML)
    >>> tax.to_json("smollm2.json"); headclass.read_json("smollm2.json")
    """

    def __init__(
        self,
        table: pd.DataFrame,
        metadata: Optional[Mapping[str, Any]] = None,
        *,
        replicates: Optional[Mapping[str, Any]] = None,
        evidence: Optional[Mapping[str, Any]] = None,
    ):
        self._table = normalise_table(table)
        self._metadata = dict(metadata or {})
        # what the head cards show beyond the table (headclass.scores.examples: examples, OV
        # effects, composition partners, pattern sample): plain JSON-able data, no model
        self._evidence = dict(evidence) if evidence else None
        # bootstrap replicates of the pattern scores ([replicate, layer, head] each), kept in
        # memory only, so that relabel() can recompute confidence; not written by exports
        self._replicates = dict(replicates) if replicates else None

    @classmethod
    def from_table(
        cls,
        table: pd.DataFrame,
        metadata: Optional[Mapping[str, Any]] = None,
        *,
        evidence: Optional[Mapping[str, Any]] = None,
    ) -> "HeadTaxonomy":
        """Rebuild a taxonomy from a table (e.g. read back from a file), its metadata and its
        cards' evidence."""
        return cls(table, metadata, evidence=evidence)

    # -- data ------------------------------------------------------------------------------
    @property
    def table(self) -> pd.DataFrame:
        """The head table (one row per head). A copy: edit it freely."""
        return self._table.copy()

    @property
    def metadata(self) -> dict[str, Any]:
        """Model, shapes, backend, config, probe seed, library versions, date (a copy)."""
        return copy.deepcopy(self._metadata)

    @property
    def evidence(self) -> Optional[dict[str, Any]]:
        """What the head cards show beyond the table (a copy; ``None`` when not collected):
        the document of :func:`headclass.scores.examples.head_evidence`."""
        return copy.deepcopy(self._evidence)

    def card(self, layer: int, head: int) -> Any:
        """The head's card (:class:`headclass.report.cards.HeadCard`): its roles, scores,
        attention examples, what it writes and reads; renders in Jupyter, ``.to_html()``."""
        from headclass.report.cards import HeadCard

        return HeadCard.from_taxonomy(self, layer, head)

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
        mask = label_mask(self._table, label, primary=primary)
        return self._table[mask].sort_values("margin", ascending=False, kind="stable").reset_index(drop=True)

    def relabel(self, thresholds: Any) -> "HeadTaxonomy":
        """The same heads labelled with other thresholds, from the stored scores (no model needed).

        ``thresholds``: a partial mapping (``{"induction": 0.3}``) over the thresholds this
        taxonomy was made with, ``config.thresholds`` or a whole config. The metadata's
        ``config.thresholds`` is updated. ``confidence`` is recomputed when this taxonomy still
        holds its bootstrap replicates (one made by :func:`~headclass.classify` in this
        session); one read from a file has none, and gets NaN.
        """
        if isinstance(thresholds, Mapping):
            current = (self._metadata.get("config") or {}).get("thresholds") or {}
            thresholds = {**current, **thresholds}
        values = resolve_thresholds(thresholds)
        borderline_se = ((self._metadata.get("config") or {}).get("uncertainty") or {}).get("borderline_se", 2.0)
        table = label_heads(
            scores_from_table(self._table),
            values,
            model=self.model_name,
            replicates=self._replicates,
            borderline_se=borderline_se,
        )
        metadata = self.metadata
        metadata.setdefault("config", {})["thresholds"] = values
        return HeadTaxonomy(table, metadata, replicates=self._replicates, evidence=self._evidence)

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
                count = int(label_mask(group, label).sum())
                primary = int((group["primary_label"] == label).sum())
                rows.append(
                    {
                        "layer": int(layer),
                        "relative_depth": depth,
                        "label": label,
                        "count": count,
                        "fraction": count / n,
                        "primary_count": primary,
                        "primary_fraction": primary / n,
                        **means,
                    }
                )
        out = pd.DataFrame(rows)
        if out.empty:
            return out
        out["label"] = out["label"].astype(str)
        return out

    def role_counts(self) -> pd.DataFrame:
        """Heads per role on each axis: one row per (axis, role) present.

        Columns: ``axis`` (``attention`` or ``output``), ``role``, ``count``, ``fraction`` (of
        all heads), ``mean_confidence`` (of the attention role; NaN for the output axis and when
        not computed). Attention roles first, each axis in display order.
        """
        t = self._table
        rows = []
        for axis, column, order in (
            ("attention", "attention_role", ATTENTION_ROLES + (MIXED, UNCLASSIFIED)),
            ("output", "output_role", OUTPUT_ROLES),
        ):
            for role in order:
                mask = t[column] == role
                if not mask.any():
                    continue
                confidence = float(t.loc[mask, "confidence"].mean()) if axis == "attention" else math.nan
                rows.append(
                    {
                        "axis": axis,
                        "role": role,
                        "count": int(mask.sum()),
                        "fraction": float(mask.mean()),
                        "mean_confidence": confidence,
                    }
                )
        return pd.DataFrame(rows, columns=["axis", "role", "count", "fraction", "mean_confidence"])

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
            mask = label_mask(t, label)
            sub = t[mask]
            best = ""
            if len(sub):
                key = sub["margin"] if label == UNCLASSIFIED else sub[LABEL_SCORE[label]]
                top = sub.loc[key.idxmax()] if key.notna().any() else sub.iloc[0]
                best = f"L{int(top['layer'])}H{int(top['head'])}"
            rows.append(
                {
                    "label": label,
                    "count": int(mask.sum()),
                    "fraction": float(mask.sum()) / n if n else math.nan,
                    "primary_count": int((t["primary_label"] == label).sum()),
                    "first_layer": int(sub["layer"].min()) if len(sub) else pd.NA,
                    "mean_relative_depth": float(sub["relative_depth"].mean()) if len(sub) else math.nan,
                    "best_head": best,
                }
            )
        out = pd.DataFrame(rows)
        out["label"] = out["label"].astype(str)
        out["best_head"] = out["best_head"].astype(str)
        out["first_layer"] = out["first_layer"].astype("Int64")
        return out

    # -- display ---------------------------------------------------------------------------
    def _headline(self) -> str:
        return f"HeadTaxonomy({self.model_name!r}: {self.n_layers} layers x {self.n_heads} heads = {len(self)} heads)"

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
        return (
            f"<div><p><b>{_html.escape(self._headline())}</b></p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
        )

    # -- comparison ------------------------------------------------------------------------
    def equals(self, other: "HeadTaxonomy") -> bool:
        """Same table (values and dtypes), same metadata and same card evidence."""
        return (
            isinstance(other, HeadTaxonomy)
            and self._table.equals(other._table)
            and list(self._table.dtypes) == list(other._table.dtypes)
            and self._metadata == other._metadata
            and self._evidence == other._evidence
        )

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
