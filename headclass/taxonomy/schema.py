"""The head table's schema: every column, its dtype and where its name is declared.

Score names are declared once, next to the code that computes them: the pattern-score registry
(:data:`headclass.scores.patterns.SCORE_NAMES`), the weight-score registry
(:data:`headclass.scores.weights.WEIGHT_SCORE_KEYS`) and the ablation columns
(:data:`headclass.scores.ablation.SCORE_KEYS`). The column lists here are derived from them.

=========================  =========  ==============================================================
column                     dtype      meaning
=========================  =========  ==============================================================
``model``                  str        model display name (same on every row)
``layer``                  int64      0-based layer
``head``                   int64      0-based head within the layer
``relative_depth``         float64    ``layer / (n_layers - 1)``: 0 first layer, 1 last (0 if 1 layer)
``primary_label``          str        one of :data:`~headclass.taxonomy.rules.LABELS` or ``"unclassified"``
``margin``                 float64    normalised margin of the primary label (< 0 if unclassified)
``labels``                 str        every label the head has, comma-separated ("" if none)
``attention_role``         str        where it attends: one of :data:`~headclass.taxonomy.rules.ATTENTION_ROLES`,
                                      ``"mixed"`` or ``"unclassified"``
``attention_roles``        str        every attention role that holds, the role's own first ("" if none)
``attention_margin``       float64    normalised margin of the attention role
``output_role``            str        what it writes: one of :data:`~headclass.taxonomy.rules.OUTPUT_ROLES`
``output_margin``          float64    normalised margin of the output role
``confidence``             float64    fraction of bootstrap resamples of the probe sequences in which
                                      the head keeps its attention role (NaN: not computed)
``borderline``             str        the head's labels with a score within ``uncertainty.borderline_se``
                                      standard errors of its threshold ("" if none)
``is_<label>``             bool       one flag per label, e.g. ``is_previous_token``, ``is_copy``
score columns              float64    :data:`SCORE_COLUMNS`; NaN = could not be computed
``fixed_offset_k``         Int64      the offset k >= 2 behind ``fixed_offset`` (<NA> if none)
ablation columns           float64    :data:`ABLATION_COLUMNS`; only present when
                                      ``classify(..., ablation=True)``
further scores             float64    any other ``[layer, head]`` score the score modules return
                           / bool     (``ov_norm``, ``writes_nothing``...), after the above
=========================  =========  ==============================================================
"""

from __future__ import annotations

import pandas as pd

from headclass.errors import HeadclassError
from headclass.scores.ablation import SCORE_KEYS as _ABLATION_KEYS
from headclass.scores.patterns import SCORE_NAMES as _PATTERN_NAMES
from headclass.scores.weights import WEIGHT_SCORE_KEYS as _WEIGHT_KEYS
from headclass.taxonomy.rules import ATTENTION_ROLES, LABELS, MIXED, OUTPUT_ROLES, RULES, UNCLASSIFIED, flag_column

__all__ = [
    "PATTERN_SCORE_COLUMNS",
    "WEIGHT_SCORE_COLUMNS",
    "SCORE_COLUMNS",
    "ABLATION_COLUMNS",
    "FLAG_COLUMNS",
    "ID_COLUMNS",
    "LABEL_COLUMNS",
    "TABLE_COLUMNS",
    "CORE_SCORES",
    "normalise_table",
    "label_mask",
]

_RULE_SCORES = {cond.score for rule in RULES.values() for cond in rule.conditions}

#: Pattern scores (all float in [0, 1]), in the pattern registry's order.
PATTERN_SCORE_COLUMNS: tuple[str, ...] = tuple(_PATTERN_NAMES)
#: The weight scores the labelling rules read (the other weight scores ride along as further
#: columns): ``copy_eigen`` in [-1, 1], the top-k scores in [0, 1].
WEIGHT_SCORE_COLUMNS: tuple[str, ...] = tuple(k for k in _WEIGHT_KEYS if k in _RULE_SCORES)
#: Every float score column that is always present.
SCORE_COLUMNS: tuple[str, ...] = PATTERN_SCORE_COLUMNS + WEIGHT_SCORE_COLUMNS
#: Optional ablation columns (only with ``classify(..., ablation=True)``).
ABLATION_COLUMNS: tuple[str, ...] = tuple(_ABLATION_KEYS)

FLAG_COLUMNS: tuple[str, ...] = tuple(flag_column(label) for label in LABELS)

#: The columns that name a head and state its labels and roles, in table order.
LABEL_COLUMNS: tuple[str, ...] = (
    "model",
    "layer",
    "head",
    "relative_depth",
    "primary_label",
    "margin",
    "labels",
    "attention_role",
    "attention_roles",
    "attention_margin",
    "output_role",
    "output_margin",
    "confidence",
    "borderline",
)

#: Columns that identify or label a head rather than score it.
ID_COLUMNS: tuple[str, ...] = LABEL_COLUMNS + ("fixed_offset_k",)

#: The fixed columns of every table, in order (ablation columns follow when present).
TABLE_COLUMNS: tuple[str, ...] = LABEL_COLUMNS + FLAG_COLUMNS + SCORE_COLUMNS + ("fixed_offset_k",)

_STR_COLUMNS = ("model", "primary_label", "labels", "attention_role", "attention_roles", "output_role", "borderline")
_INT_COLUMNS = ("layer", "head")
_FLOAT_COLUMNS = (
    ("relative_depth", "margin", "attention_margin", "output_margin", "confidence") + SCORE_COLUMNS + ABLATION_COLUMNS
)

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


def label_mask(table: pd.DataFrame, label: str, *, primary: bool = False) -> pd.Series:
    """Which heads (rows of ``table``) have ``label``: the one answer to that question.

    ``unclassified`` heads are those whose primary label it is; any other label is read from
    its ``is_<label>`` flag, or from ``primary_label`` with ``primary=True``.
    """
    if label == UNCLASSIFIED or primary:
        if label != UNCLASSIFIED:
            flag_column(label)  # an unknown label is an error, not an empty mask
        return table["primary_label"] == label
    return table[flag_column(label)].astype(bool)


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
            f"the head table lacks column(s) {', '.join(missing)}; see headclass.taxonomy.schema for the schema."
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
    for col, allowed in (
        ("primary_label", LABELS + (UNCLASSIFIED,)),
        ("attention_role", ATTENTION_ROLES + (MIXED, UNCLASSIFIED)),
        ("output_role", OUTPUT_ROLES),
    ):
        bad = set(out[col]) - set(allowed)
        if bad:
            raise HeadclassError(f"unknown {col} value(s) {sorted(bad)}; allowed: {', '.join(allowed)}.")
    extra_ablation = [c for c in ABLATION_COLUMNS if c in out.columns]
    rest = [c for c in out.columns if c not in TABLE_COLUMNS and c not in ABLATION_COLUMNS]
    out = out[list(TABLE_COLUMNS) + extra_ablation + rest]
    return out.sort_values(["layer", "head"], kind="stable").reset_index(drop=True)
