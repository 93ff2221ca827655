"""The label vocabulary and the labelling rules: which scores, which thresholds, what they mean.

Everything a label *is* is declared here once: its name, its conditions (``score >=
thresholds.<key>``, or ``<=``), whether it describes what a head writes, its tie-break rank,
the score that ranks heads within it and a one-line meaning. :mod:`headclass.taxonomy.labelling`
applies the rules; the report, the docs table and the CLI read them from here.

Rules
-----
A label holds when every one of its conditions holds (thresholds from ``config.thresholds``):

==================  =====================================================================
label               conditions
==================  =====================================================================
copy                ``copy_eigen >= copy_eigen`` AND ``copy_topk >= copy_topk``
previous-token      ``previous_token >= previous_token``
induction           ``induction >= induction``
bos                 ``bos >= bos``
diffuse             ``diffuse_entropy >= diffuse_entropy`` AND
                    ``max_attention <= diffuse_max_attention``
duplicate-token     ``duplicate_token >= duplicate_token``
current-token       ``current_token >= current_token``
fixed-offset        ``fixed_offset >= fixed_offset``, the best offset k >= 2 (k = 1 is
                    previous-token)
copy-suppression    ``copy_suppression_topk >= copy_suppression_topk``
==================  =====================================================================

``copy`` and ``copy-suppression`` describe what a head writes (``needs_output``), so a head the
weight scores flag ``writes_nothing`` has neither. The primary-label rule and the margins are
documented in :mod:`headclass.taxonomy.labelling` and ``docs/labels.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from headclass.errors import HeadclassError

__all__ = [
    "Condition",
    "LabelRule",
    "RULES",
    "LABELS",
    "CORE_LABELS",
    "UNCLASSIFIED",
    "PRIORITY",
    "FALLBACK_LABELS",
    "LABEL_SCORE",
    "LABEL_MEANINGS",
    "flag_column",
]


@dataclass(frozen=True)
class Condition:
    """``score >= thresholds.<threshold>`` (or ``<=``), the score ranging over [low, high]."""

    score: str
    threshold: str
    op: str = ">="
    low: float = 0.0
    high: float = 1.0

    def holds(self, value: np.ndarray, t: float) -> np.ndarray:
        """True where the condition holds; False for NaN scores."""
        with np.errstate(invalid="ignore"):
            return (value >= t) if self.op == ">=" else (value <= t)

    def margin(self, value: np.ndarray, t: float) -> np.ndarray:
        """Normalised margin in [-1, 1]: >= 0 exactly where the condition holds; NaN for NaN."""
        value = np.asarray(value, dtype=np.float64)
        signed = (value - t) if self.op == ">=" else (t - value)  # >= 0 where it holds
        # Room on the passing side and on the failing side of the threshold.
        room_pass = (self.high - t) if self.op == ">=" else (t - self.low)
        room_fail = (t - self.low) if self.op == ">=" else (self.high - t)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(
                signed >= 0,
                signed / room_pass if room_pass > 0 else 0.0,
                signed / room_fail if room_fail > 0 else -1.0,
            )
        return np.clip(out, -1.0, 1.0)


@dataclass(frozen=True)
class LabelRule:
    """A label: all its conditions must hold; its margin is the smallest condition margin.

    ``needs_output``: the label describes what the head writes (its OV circuit), so a head
    flagged ``writes_nothing`` by the weight scores cannot have it (margin -1).
    ``rank_score``: the score that ranks heads within the label (``summary().best_head``).
    ``meaning``: one line for reports.
    """

    label: str
    conditions: tuple[Condition, ...]
    rank_score: str
    meaning: str
    needs_output: bool = False


#: The labelling rules, one per label, in table / display order (see the module docstring).
RULES: dict[str, LabelRule] = {
    rule.label: rule
    for rule in (
        LabelRule("copy", (Condition("copy_eigen", "copy_eigen", low=-1.0),
                           Condition("copy_topk", "copy_topk")), "copy_topk",
                  "Its OV circuit maps a token to itself: whatever token it attends to, it raises "
                  "that token's logit (Elhage et al. 2021; the eigenvalue and top-k copying scores).",
                  needs_output=True),
        LabelRule("previous-token", (Condition("previous_token", "previous_token"),), "previous_token",
                  "Attends from each position to the position just before it."),
        LabelRule("induction", (Condition("induction", "induction"),), "induction",
                  "On a repeated segment, attends to the token after the earlier copy of the "
                  "current token ([A][B] ... [A] -> [B]; Olsson et al. 2022)."),
        LabelRule("bos", (Condition("bos", "bos"),), "bos",
                  "Parks most of its attention on the first (BOS) token, an attention sink; a "
                  "fallback label: primary only when the head has no mechanism label."),
        LabelRule("diffuse", (Condition("diffuse_entropy", "diffuse_entropy"),
                              Condition("max_attention", "diffuse_max_attention", op="<=")),
                  "diffuse_entropy",
                  "Spreads attention evenly over the context (high entropy, no dominant key); a "
                  "fallback label."),
        LabelRule("duplicate-token", (Condition("duplicate_token", "duplicate_token"),), "duplicate_token",
                  "Attends to earlier occurrences of the current token."),
        LabelRule("current-token", (Condition("current_token", "current_token"),), "current_token",
                  "Attends to its own position."),
        LabelRule("fixed-offset", (Condition("fixed_offset", "fixed_offset"),), "fixed_offset",
                  "Attends k >= 2 positions back (the offset is in fixed_offset_k)."),
        LabelRule("copy-suppression", (Condition("copy_suppression_topk", "copy_suppression_topk"),),
                  "copy_suppression_topk",
                  "Its OV circuit lowers the logit of the token it attends to (McDougall et al. 2023).",
                  needs_output=True),
    )
}

#: Every label a head can carry, in table / display order.
LABELS: tuple[str, ...] = tuple(RULES)

#: The five core labels.
CORE_LABELS: tuple[str, ...] = ("copy", "previous-token", "induction", "bos", "diffuse")

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

#: Labels that describe where a head parks attention rather than a mechanism: they are a
#: head's primary label only when it has no other label.
FALLBACK_LABELS: tuple[str, ...] = ("bos", "diffuse")

#: The score that ranks heads within a label (``summary().best_head``, plots).
LABEL_SCORE: dict[str, str] = {label: rule.rank_score for label, rule in RULES.items()}

#: One line per label (and ``unclassified``): what a head with that label does.
LABEL_MEANINGS: dict[str, str] = {
    **{label: rule.meaning for label, rule in RULES.items()},
    UNCLASSIFIED: "No label's conditions hold; margin says how far the head is from its nearest label.",
}


def flag_column(label: str) -> str:
    """The boolean column of a label: ``"previous-token"`` -> ``"is_previous_token"``."""
    if label not in RULES:
        raise HeadclassError(f"unknown label {label!r}; labels are {', '.join(LABELS)}.")
    return "is_" + label.replace("-", "_")
