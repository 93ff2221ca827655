"""The taxonomy layer: from per-head scores to labels, and the result type.

* :mod:`~headclass.taxonomy.rules` -- the label vocabulary and rules (what each label means);
* :mod:`~headclass.taxonomy.schema` -- the head table's columns, derived from the score registries;
* :mod:`~headclass.taxonomy.labelling` -- :func:`label_heads`, a pure function of score grids;
* :mod:`~headclass.taxonomy.result` -- :class:`HeadTaxonomy`, the tidy table plus metadata;
* :mod:`~headclass.taxonomy.classification` -- :func:`classify`, which gathers the scores and labels.

The report layer (:mod:`headclass.report`) reads these; nothing here imports it at module level.
"""

from headclass.taxonomy.classification import classify
from headclass.taxonomy.labelling import label_heads, label_margins, resolve_thresholds, scores_from_table
from headclass.taxonomy.result import HeadTaxonomy
from headclass.taxonomy.rules import (
    ATTENTION_ROLES,
    BUDGET_ROLE,
    CORE_LABELS,
    FALLBACK_LABELS,
    LABEL_MEANINGS,
    LABEL_SCORE,
    LABELS,
    MIXED,
    OUTPUT_ROLES,
    PRIORITY,
    RULES,
    UNCLASSIFIED,
    Condition,
    LabelRule,
    flag_column,
)
from headclass.taxonomy.schema import (
    ABLATION_COLUMNS,
    SCORE_COLUMNS,
    TABLE_COLUMNS,
    label_mask,
    normalise_table,
)

__all__ = [
    "classify",
    "label_heads",
    "label_margins",
    "scores_from_table",
    "resolve_thresholds",
    "HeadTaxonomy",
    "RULES",
    "LabelRule",
    "Condition",
    "LABELS",
    "ATTENTION_ROLES",
    "OUTPUT_ROLES",
    "MIXED",
    "BUDGET_ROLE",
    "CORE_LABELS",
    "PRIORITY",
    "FALLBACK_LABELS",
    "LABEL_SCORE",
    "LABEL_MEANINGS",
    "UNCLASSIFIED",
    "SCORE_COLUMNS",
    "ABLATION_COLUMNS",
    "TABLE_COLUMNS",
    "flag_column",
    "label_mask",
    "normalise_table",
]
