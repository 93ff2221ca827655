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
    "ATTENTION_ROLES",
    "OUTPUT_ROLES",
    "MIXED",
    "BUDGET_ROLE",
    "SUBSUMES",
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

    ``axis``: ``"attention"`` (where the head attends, from its patterns: the QK side) or
    ``"output"`` (what it writes, from its OV weights).
    ``needs_output``: the label describes what the head writes, so a head flagged
    ``writes_nothing`` by the weight scores cannot have it (margin -1).
    ``rank_score``: the score that ranks heads within the label (``summary().best_head``).
    ``meaning``: one line for reports; ``source``: where the idea comes from.
    """

    label: str
    axis: str
    conditions: tuple[Condition, ...]
    rank_score: str
    meaning: str
    source: str = ""
    needs_output: bool = False


def _rule(
    label: str,
    axis: str,
    conditions: tuple[Condition, ...],
    meaning: str,
    source: str,
    *,
    rank: str = "",
    needs_output: bool = False,
) -> LabelRule:
    return LabelRule(label, axis, conditions, rank or conditions[0].score, meaning, source, needs_output)


#: The labelling rules, one per label, in table / display order: the attention roles, then the
#: output roles. ``transform`` has no conditions of its own: it is the output role of a head
#: that writes (not ``no-op``) and has none of the other output roles (see
#: :mod:`headclass.taxonomy.labelling`).
RULES: dict[str, LabelRule] = {
    rule.label: rule
    for rule in (
        # -- attention roles (QK side, from the patterns) --
        _rule(
            "previous-token",
            "attention",
            (Condition("previous_token", "previous_token"),),
            "Attends from each position to the position just before it.",
            "Olsson et al. 2022; Wang et al. 2022 (IOI)",
        ),
        _rule(
            "current-token",
            "attention",
            (Condition("current_token", "current_token"),),
            "Attends to its own position.",
            "Clark et al. 2019",
        ),
        _rule(
            "fixed-offset",
            "attention",
            (Condition("fixed_offset", "fixed_offset"),),
            "Attends k >= 2 positions back (the offset is in fixed_offset_k).",
            "Voita et al. 2019",
        ),
        _rule(
            "local",
            "attention",
            (Condition("local_share", "local"), Condition("fixed_offset", "local_max_single_offset", op="<=")),
            "Spreads its attention over a short recent window (offsets 2..patterns.local_window), "
            "no single offset dominating.",
            "Voita et al. 2019 (positional heads)",
            rank="budget_local",
        ),
        _rule(
            "bos",
            "attention",
            (Condition("bos", "bos"),),
            "Parks most of its attention on the first (BOS) token, an attention sink; a fallback "
            "role: the attention role only when the head has no other.",
            "Xiao et al. 2023 (attention sinks)",
        ),
        _rule(
            "induction",
            "attention",
            (Condition("induction", "induction"),),
            "On a repeated segment, attends to the token after the earlier copy of the current "
            "token ([A][B] ... [A] -> [B]).",
            "Olsson et al. 2022",
        ),
        _rule(
            "duplicate-token",
            "attention",
            (Condition("duplicate_token", "duplicate_token"),),
            "Attends to earlier occurrences of the current token.",
            "Wang et al. 2022 (IOI)",
        ),
        _rule(
            "delimiter",
            "attention",
            (Condition("delimiter_share", "delimiter"), Condition("delimiter_lift", "delimiter_lift", high=10.0)),
            "Attends to punctuation, newline and separator tokens far above their frequency.",
            "Clark et al. 2019 (attention to [SEP] and punctuation)",
            rank="budget_delimiter",
        ),
        _rule(
            "content",
            "attention",
            (Condition("content_share", "content"), Condition("consistency", "content_max_consistency", op="<=")),
            "Attends to keys chosen by which tokens are present, not by position: its pattern "
            "moves with the tokens (low positional consistency) and lands on keys that are "
            "neither positional, repeats, delimiters nor the first token.",
            "Elhage et al. 2021 (QK circuit); Voita et al. 2019",
            rank="budget_other",
        ),
        _rule(
            "diffuse",
            "attention",
            (
                Condition("diffuse_entropy", "diffuse_entropy"),
                Condition("max_attention", "diffuse_max_attention", op="<="),
            ),
            "Spreads attention evenly over the context (high entropy, no dominant key); a fallback role.",
            "Clark et al. 2019 (entropy per head)",
        ),
        # -- output roles (OV side, from the weights) --
        _rule(
            "copy",
            "output",
            (Condition("copy_eigen", "copy_eigen", low=-1.0), Condition("copy_topk", "copy_topk")),
            "Its OV circuit maps a token to itself: whatever token it attends to, it raises that token's logit.",
            "Elhage et al. 2021 (eigenvalue copying score); Wang et al. 2022",
            rank="copy_topk",
            needs_output=True,
        ),
        _rule(
            "copy-suppression",
            "output",
            (Condition("copy_suppression_topk", "copy_suppression_topk"),),
            "Its OV circuit lowers the logit of the token it attends to.",
            "McDougall et al. 2023",
            needs_output=True,
        ),
        _rule(
            "successor",
            "output",
            (Condition("successor", "successor"),),
            "Its OV circuit raises the next item of an ordinal sequence (1 -> 2, Monday -> Tuesday, March -> April).",
            "Gould et al. 2023 (successor heads)",
            needs_output=True,
        ),
        _rule(
            "no-op",
            "output",
            (Condition("ov_gain_relative", "no_op_max_gain", op="<=", high=2.0),),
            "Writes nearly nothing: its OV output is a small fraction of a typical head's.",
            "Elhage et al. 2021 (OV circuit norm)",
        ),
        LabelRule(
            "transform",
            "output",
            (),
            "ov_gain_relative",
            "Writes a substantial output that neither copies, suppresses nor steps the token it "
            "attends to: it transforms what it reads.",
            "Elhage et al. 2021 (OV circuit)",
        ),
    )
}

#: Every label a head can carry, in table / display order.
LABELS: tuple[str, ...] = tuple(RULES)
#: The attention roles (QK axis) and output roles (OV axis), in display order.
ATTENTION_ROLES: tuple[str, ...] = tuple(label for label, rule in RULES.items() if rule.axis == "attention")
OUTPUT_ROLES: tuple[str, ...] = tuple(label for label, rule in RULES.items() if rule.axis == "output")

#: The attention role of a head in which two or more attention roles hold, or whose attention
#: two budget classes share (see :mod:`headclass.taxonomy.labelling`).
MIXED = "mixed"

#: The five core labels.
CORE_LABELS: tuple[str, ...] = ("copy", "previous-token", "induction", "bos", "diffuse")

#: The ``primary_label`` of heads with no label.
UNCLASSIFIED = "unclassified"

#: Tie-break order for the primary label (first wins when normalised margins are equal):
#: specific mechanisms before generic attention habits. ``no-op`` and ``transform`` describe
#: only the output, so they are never a primary label.
PRIORITY: tuple[str, ...] = (
    "induction",
    "copy-suppression",
    "successor",
    "duplicate-token",
    "previous-token",
    "fixed-offset",
    "current-token",
    "delimiter",
    "local",
    "content",
    "copy",
    "bos",
    "diffuse",
)

#: Labels that describe where a head parks attention rather than a mechanism: they are a
#: head's primary label (and attention role) only when it has no other.
FALLBACK_LABELS: tuple[str, ...] = ("bos", "diffuse")

#: Roles that describe the same attention more precisely than another: when the left role holds,
#: the roles on the right do not count towards ``mixed`` (they stay listed in
#: ``attention_roles``). An induction or duplicate-token head's text attention *is* decided by
#: the tokens present, as is a delimiter head's; a previous-token head's window is local.
SUBSUMES: dict[str, tuple[str, ...]] = {
    "induction": ("content",),
    "duplicate-token": ("content",),
    "delimiter": ("content",),
    "previous-token": ("local",),
    "fixed-offset": ("local",),
}

#: Which budget class stands for which attention role (:data:`headclass.scores.patterns.BUDGET_CLASSES`),
#: for heads whose attention two classes share (``mixed``).
BUDGET_ROLE: dict[str, str] = {
    "first": "bos",
    "self": "current-token",
    "previous": "previous-token",
    "local": "local",
    "duplicate": "duplicate-token",
    "induction": "induction",
    "delimiter": "delimiter",
    "other": "content",
}

#: The score that ranks heads within a label (``summary().best_head``, plots).
LABEL_SCORE: dict[str, str] = {label: rule.rank_score for label, rule in RULES.items()}

#: One line per label (and ``mixed``, ``unclassified``): what a head with that label does.
LABEL_MEANINGS: dict[str, str] = {
    **{label: rule.meaning for label, rule in RULES.items()},
    MIXED: "Two kinds of attention share the head: two roles hold, or two attention-budget classes "
    "together take most of its attention (attention_roles names them).",
    UNCLASSIFIED: "No label's conditions hold; margin says how far the head is from its nearest label.",
}


def flag_column(label: str) -> str:
    """The boolean column of a label: ``"previous-token"`` -> ``"is_previous_token"``."""
    if label not in RULES:
        raise HeadclassError(f"unknown label {label!r}; labels are {', '.join(LABELS)}.")
    return "is_" + label.replace("-", "_")
