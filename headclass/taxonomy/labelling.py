"""Labelling: a pure function from per-head score grids to the head table.

:func:`label_heads` applies :data:`~headclass.taxonomy.rules.RULES` to ``{score: [layer, head]}``
grids and builds the tidy table (schema in :mod:`headclass.taxonomy.schema`);
:func:`scores_from_table` turns a table back into grids, so a taxonomy read from a file can be
relabelled without the model.

A head may carry several labels (``is_<label>`` columns). Its ``primary_label`` is the label
with the largest *normalised margin* among its *mechanism* labels (all but ``bos`` and
``diffuse``); only a head whose labels are all among :data:`FALLBACK_LABELS` gets ``bos`` or
``diffuse`` as primary label (many heads park on BOS whatever they otherwise do: an induction
head that puts 45% of its attention on the induction target and 55% on BOS is an induction
head). For ``score >= t`` on a score ranging over [lo, hi],

    margin = (score - t) / (hi - t)   if score >= t   (0 at the threshold, 1 at the top)
    margin = (score - t) / (t - lo)   if score <  t   (-1 at the bottom)

(mirrored for ``<=``), and for a label with several conditions the smallest of its conditions'
margins. Margins thus lie in [-1, 1] whatever the score's scale, so labels compare. Ties go to
the first label in :data:`PRIORITY`. A head with no label is ``unclassified`` and its
``margin`` is its largest (negative) margin: how far it is from its nearest label.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Union

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from headclass.config import HeadclassConfig, Thresholds, load_config
from headclass.errors import ScoreError
from headclass.taxonomy.rules import (
    ATTENTION_ROLES,
    BUDGET_ROLE,
    FALLBACK_LABELS,
    LABELS,
    MIXED,
    OUTPUT_ROLES,
    PRIORITY,
    RULES,
    SUBSUMES,
    UNCLASSIFIED,
    flag_column,
)
from headclass.taxonomy.schema import ABLATION_COLUMNS, SCORE_COLUMNS, TABLE_COLUMNS, normalise_table

__all__ = [
    "label_heads",
    "label_margins",
    "scores_from_table",
    "resolve_thresholds",
    "ThresholdSource",
    "EVIDENCE",
    "FREE_SHARES",
]

ThresholdSource = Union[None, Thresholds, Mapping[str, float], HeadclassConfig]


def resolve_thresholds(thresholds: ThresholdSource) -> dict[str, float]:
    """Every threshold as a plain dict: from None (defaults), a config, ``config.thresholds`` or a
    partial mapping over the defaults (validated: bad keys or values raise ConfigError)."""
    if thresholds is None:
        return load_config().thresholds.model_dump()
    if isinstance(thresholds, HeadclassConfig):
        return thresholds.thresholds.model_dump()
    if isinstance(thresholds, Thresholds):
        return thresholds.model_dump()
    # A (partial) mapping: validated through the config, so bad keys and values fail clearly.
    return load_config({"thresholds": dict(thresholds)}).thresholds.model_dump()


#: Evidence the attention rules read, each from the natural-text probe, or from the repeated
#: probe where the model has no text (no tokenizer): ``name -> (text key, repeated key)``.
#: ``share_<class>`` are the budget shares as measured; ``free_attention`` is what a head does
#: not park on the first position (``1 - share_first``).
EVIDENCE: dict[str, tuple[str, str]] = {
    "delimiter_lift": ("budget_lift_delimiter", "budget_rep_lift_delimiter"),
    "consistency": ("positional_consistency", "positional_consistency_rep"),
    **{f"share_{c}": (f"budget_{c}", f"budget_rep_{c}") for c in BUDGET_ROLE},
}

#: Budget shares *of the free attention* (``share_<class> / free_attention``), the evidence of
#: the local, delimiter and content rules and of the budget-mix step. Many heads park spare
#: attention on the first token whatever else they do (an attention sink); measuring a class
#: against the attention left over keeps a head's role from changing with how much it parks.
#: Heads with less than ``thresholds.min_free_attention`` free attention get NaN (too little
#: left to say where it goes): they are sinks (``bos``) and nothing else.
FREE_SHARES: dict[str, str] = {
    "local_share": "local",
    "delimiter_share": "delimiter",
    "content_share": "other",
    **{f"free_{c}": c for c in BUDGET_ROLE if c != "first"},
}


def label_margins(scores: Mapping[str, Any], thresholds: ThresholdSource = None) -> dict[str, np.ndarray]:
    """Each label's normalised margin per head, ``{label: float64 [layer, head]}``.

    ``margin >= 0`` exactly where the label holds; NaN where a score it needs is NaN.
    ``scores`` as for :func:`label_heads`.
    """
    t = resolve_thresholds(thresholds)
    return _decide(_score_grids(scores, t), t, _precisions(scores))[1]


def label_heads(
    scores: Mapping[str, Any],
    thresholds: ThresholdSource = None,
    *,
    model: str = "model",
    replicates: Optional[Mapping[str, Any]] = None,
    borderline_se: float = 2.0,
) -> pd.DataFrame:
    """Label every head from its scores: the pure core of :func:`~headclass.classify`.

    Parameters
    ----------
    scores
        ``{name: Float[Tensor, "layer head"]}`` (tensors or arrays) with every name in
        :data:`~headclass.taxonomy.schema.SCORE_COLUMNS`; ``fixed_offset`` may instead be
        ``[layer, head, offset]`` (index i is offset k = i + 1), or come with
        ``fixed_offset_per_k`` of that shape; otherwise ``fixed_offset_k`` must be given too
        (and heads whose best offset is 1 get a NaN ``fixed_offset``). Every further
        ``[layer, head]`` tensor (budgets, standard errors ``<score>_se``, ``ov_norm``,
        ``writes_nothing``, ablation columns...) becomes a column after the fixed ones (float64,
        or bool for bool tensors); other shapes are ignored. NaN means "could not be computed":
        labels that need it do not hold.
    thresholds
        ``config.thresholds``, a whole config, a partial mapping over the defaults, or ``None``.
    model
        Value of the ``model`` column.
    replicates
        Bootstrap replicates of the pattern scores, ``{name: [replicate, layer, head]}``
        (:meth:`headclass.scores.patterns.PatternMeasurement.bootstrap`): ``confidence`` is the
        fraction of replicates in which a head keeps its attention role. ``None``: NaN.
    borderline_se
        A label is *borderline* for a head when one of its conditions' scores lies within this
        many standard errors (``<score>_se``) of its threshold.

    Returns
    -------
    pandas.DataFrame
        The head table, one row per head, schema in :mod:`headclass.taxonomy.schema`.
    """
    t = resolve_thresholds(thresholds)
    precision = _precisions(scores)
    grids = _score_grids(scores, t)
    flags, margins = _decide(grids, t, precision)
    n_layers, n_heads = grids["copy_eigen"].shape
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")

    primary, margin = _primary(flags, margins)
    attention, attention_list, attention_margin = _attention_roles(flags, margins, grids, t)
    output, output_margin = _output_roles(flags, margins)
    confidence = _confidence(scores, replicates, t, precision, attention)
    borderline = _borderline(grids, t, flags, precision, borderline_se)
    labels_text = _join([flags[lab] for lab in LABELS], LABELS)
    data: dict[str, Any] = {
        "model": model,
        "layer": layer.ravel(),
        "head": head.ravel(),
        # layer / (n_layers - 1): first layer 0, last layer 1 (a 1-layer model is all 0)
        "relative_depth": layer.ravel() / max(n_layers - 1, 1),
        "primary_label": primary.ravel(),
        "margin": margin.ravel(),
        "labels": labels_text,
        "attention_role": attention.ravel(),
        "attention_roles": attention_list.ravel(),
        "attention_margin": attention_margin.ravel(),
        "output_role": output.ravel(),
        "output_margin": output_margin.ravel(),
        "confidence": confidence.ravel(),
        "borderline": borderline.ravel(),
    }
    for label in LABELS:
        data[flag_column(label)] = flags[label].ravel()
    for name in SCORE_COLUMNS:
        data[name] = grids[name].ravel()
    k = grids["fixed_offset_k"].ravel()
    data["fixed_offset_k"] = pd.array([int(x) if x >= 2 else pd.NA for x in k], dtype="Int64")
    for name in ABLATION_COLUMNS:
        if name in grids:
            data[name] = grids[name].ravel()
    for name, value in scores.items():  # further scores (budgets, SEs, ov_norm...) ride along
        extra = _extra_column(name, value, (n_layers, n_heads))
        if extra is not None and name not in data and name != "fixed_offset_k":
            data[name] = extra
    return normalise_table(pd.DataFrame(data))


def scores_from_table(table: pd.DataFrame) -> dict[str, np.ndarray]:
    """The ``[layer, head]`` score grids behind a head table, for relabelling without the model.

    Returns every score column (``fixed_offset`` with ``fixed_offset_k``), the ablation columns
    and any extra float / bool columns, each as a ``[n_layers, n_heads]`` array.
    """
    table = normalise_table(table)
    n_layers, n_heads = int(table["layer"].max()) + 1, int(table["head"].max()) + 1
    if len(table) != n_layers * n_heads:
        raise ScoreError(
            f"the table has {len(table)} heads, not a full grid of {n_layers} layers x {n_heads} heads; "
            "relabelling needs every head."
        )
    fixed = set(TABLE_COLUMNS) - set(SCORE_COLUMNS)
    out: dict[str, np.ndarray] = {}
    for col in table.columns:
        if col in fixed and col != "fixed_offset_k":
            continue
        values = table[col]
        if col == "fixed_offset_k":
            values = values.astype("float64")  # <NA> -> NaN: "no offset >= 2"
        elif not (pd.api.types.is_float_dtype(values) or pd.api.types.is_bool_dtype(values)):
            continue
        out[col] = values.to_numpy().reshape(n_layers, n_heads)
    return out


# -- the rules, applied ------------------------------------------------------------------------


def _decide(
    grids: Mapping[str, np.ndarray], t: Mapping[str, float], precision: Mapping[str, torch.dtype]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Flags and margins of every label, ``{label: [layer, head]}`` each.

    Labels that describe what a head writes (``needs_output``) never hold for a head flagged
    ``writes_nothing``. ``transform`` holds for a head that is not ``no-op`` and has none of
    the other output roles; its margin is the negated largest margin among them (how far the
    head is from copying, suppressing or stepping).
    """
    shape = grids["copy_eigen"].shape
    silent = np.nan_to_num(grids.get("writes_nothing", np.zeros(shape)), nan=0.0) != 0
    flags: dict[str, np.ndarray] = {}
    margins: dict[str, np.ndarray] = {}
    for label, rule in RULES.items():
        if not rule.conditions:
            continue
        hold = np.ones(shape, dtype=bool)
        parts = []
        for cond in rule.conditions:
            value = grids.get(cond.score, np.full(shape, np.nan))
            threshold = _at_precision(t[cond.threshold], precision.get(cond.score, torch.float64))
            hold &= cond.holds(value, threshold)
            parts.append(cond.margin(value, threshold))
        margin = np.minimum.reduce(parts) if len(parts) > 1 else parts[0]
        if rule.needs_output:
            hold, margin = hold & ~silent, np.where(silent, -1.0, margin)
        flags[label], margins[label] = hold, margin
    writing = [label for label in OUTPUT_ROLES if RULES[label].conditions and label != "no-op"]
    flags["transform"] = ~flags["no-op"] & ~np.logical_or.reduce([flags[label] for label in writing])
    nearest = np.nanmax(np.stack([np.nan_to_num(margins[label], nan=-1.0) for label in writing]), axis=0)
    margins["transform"] = np.where(flags["no-op"], -1.0, -nearest)
    return flags, margins


def _attention_roles(
    flags: Mapping[str, np.ndarray],
    margins: Mapping[str, np.ndarray],
    grids: Mapping[str, np.ndarray],
    t: Mapping[str, float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each head's attention role, the roles behind it, and its margin.

    1. The attention roles that hold, fallback roles (``bos``, ``diffuse``) and roles another
       holding role subsumes (:data:`~headclass.taxonomy.rules.SUBSUMES`) aside: exactly one
       is the role; two or more make the head ``mixed``.
    2. Else a fallback role that holds (the larger margin if both).
    3. Else, when the two largest classes of the attention budget each take at least
       ``thresholds.mixed_min_share`` and together ``thresholds.mixed_min_total`` of the
       head's attention, ``mixed``, named by those classes' roles (:data:`BUDGET_ROLE`).
    4. Else ``unclassified``: no role's evidence is strong enough.

    ``attention_roles`` lists every role that holds (comma-separated; for step 3 the two
    budget classes' roles), the role's own first. The margin is the role's (the smallest of the
    roles named for ``mixed``; for ``unclassified`` the largest negative margin).
    """
    parts = _role_parts(flags, margins, grids, t)
    order, held, marg, specific, n_specific = parts.order, parts.held, parts.margin, parts.specific, parts.n_specific
    role = _role_of(parts)
    shape = role.shape
    roles = np.full(shape, "", dtype=object)
    margin = np.full(shape, np.nan)
    for i, j in np.ndindex(shape):
        named = [order[r] for r in np.flatnonzero(held[:, i, j])]
        if n_specific[i, j] >= 2:
            margin[i, j] = marg[specific[:, i, j], i, j].min()
            named = [n for n in named if n not in FALLBACK_LABELS] + [n for n in named if n in FALLBACK_LABELS]
        elif role[i, j] == MIXED:  # step 3: the two largest budget classes
            named = [BUDGET_ROLE[parts.classes[c]] for c in parts.top2[:, i, j]]
            share_margin = (parts.second[i, j] - t["mixed_min_share"]) / max(1.0 - t["mixed_min_share"], 1e-12)
            margin[i, j] = float(np.clip(share_margin, 0.0, 1.0))
        elif role[i, j] == UNCLASSIFIED:
            margin[i, j] = marg[:, i, j].max()
        else:
            margin[i, j] = marg[order.index(role[i, j]), i, j]
            named.remove(role[i, j])
            named.insert(0, role[i, j])
        roles[i, j] = ", ".join(named)
    return role, roles, margin


class _RoleParts(NamedTuple):
    """What :func:`_attention_roles` decides from, every head at once."""

    order: list[str]  # the attention roles
    held: np.ndarray  # [role, layer, head] bool: the role holds
    margin: np.ndarray  # [role, layer, head]: its margin, NaN as -1
    specific: np.ndarray  # [role, layer, head] bool: holds, not a fallback, not subsumed
    n_specific: np.ndarray  # [layer, head]
    classes: list[str]  # the attention budget's classes (the first position aside)
    top2: np.ndarray  # [2, layer, head]: the two largest classes
    second: np.ndarray  # [layer, head]: the second largest share
    budget_mix: np.ndarray  # [layer, head] bool: step 3's mix of two classes


def _role_parts(
    flags: Mapping[str, np.ndarray],
    margins: Mapping[str, np.ndarray],
    grids: Mapping[str, np.ndarray],
    t: Mapping[str, float],
) -> _RoleParts:
    """The :class:`_RoleParts` of these flags, margins and attention-budget shares."""
    order = [label for label in ATTENTION_ROLES]
    held = np.stack([flags[label] for label in order])  # [role, layer, head]
    marg = np.stack([np.nan_to_num(margins[label], nan=-1.0) for label in order])
    fallback = np.array([label in FALLBACK_LABELS for label in order])[:, None, None]
    specific = held & ~fallback
    for label, loose in SUBSUMES.items():  # a precise role holding: its looser descriptions do not count
        for other in loose:
            specific[order.index(other)] &= ~held[order.index(label)]
    n_specific = specific.sum(0)
    classes = [c for c in BUDGET_ROLE if c != "first"]  # parking on the first token is not a kind
    shares = np.stack([np.nan_to_num(grids[f"free_{c}"], nan=0.0) for c in classes])  # [class, L, H]
    top2 = np.argsort(-shares, axis=0, kind="stable")[:2]
    first, second = np.take_along_axis(shares, top2, axis=0)
    budget_mix = (
        (first >= t["mixed_min_share"]) & (second >= t["mixed_min_share"]) & (first + second >= t["mixed_min_total"])
    )
    return _RoleParts(order, held, marg, specific, n_specific, classes, top2, second, budget_mix)


def _role_of(parts: _RoleParts) -> np.ndarray:
    """The attention role per head (steps 1-4 of :func:`_attention_roles`), for all heads at
    once: the bootstrap decides it 200 times, where a loop over heads took ~1 s (SmolLM2)."""
    names = np.array(parts.order, dtype=object)
    # step 1: the one specific role; step 2: the held (fallback) role with the largest margin,
    # the first in order on a tie
    held_best = names[np.where(parts.held, parts.margin, -np.inf).argmax(0)]
    return np.select(
        [parts.n_specific == 1, parts.n_specific >= 2, parts.held.any(0), parts.budget_mix],
        [names[parts.specific.argmax(0)], MIXED, held_best, MIXED],
        default=UNCLASSIFIED,
    ).astype(object)


def _output_roles(flags: Mapping[str, np.ndarray], margins: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Each head's output role and its margin: ``no-op`` when it holds, else the output role
    with the largest margin among ``copy``, ``copy-suppression``, ``successor``, else
    ``transform`` (exactly one of them per head)."""
    order = [label for label in OUTPUT_ROLES if label not in ("no-op", "transform")]
    stacked = np.stack([np.where(flags[label], np.nan_to_num(margins[label], nan=-1.0), -np.inf) for label in order])
    best = stacked.argmax(0)
    any_role = np.stack([flags[label] for label in order]).any(0)
    names = np.array(order, dtype=object)[best]
    role = np.where(flags["no-op"], "no-op", np.where(any_role, names, "transform")).astype(object)
    margin = np.where(
        flags["no-op"],
        margins["no-op"],
        np.where(any_role, np.take_along_axis(stacked, best[None], 0)[0], margins["transform"]),
    )
    return role, margin


def _primary(flags: Mapping[str, np.ndarray], margins: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Primary label and its margin per head.

    The largest margin among the head's labels in :data:`PRIORITY` that are not fallback
    labels; only when it has none, among its :data:`FALLBACK_LABELS` (bos, diffuse); ties by
    :data:`PRIORITY`. ``no-op`` and ``transform`` only describe the output and are never
    primary. Heads with none: ``unclassified`` with their largest (negative) margin.
    """
    order = list(PRIORITY)
    stacked = np.stack([margins[label] for label in order])  # [label, layer, head]
    flagged = np.stack([flags[label] for label in order])
    fallback = np.array([label in FALLBACK_LABELS for label in order])[:, None, None]
    filled = np.where(np.isnan(stacked), -np.inf, stacked)
    specific = flagged & ~fallback
    candidates = np.where(specific.any(axis=0, keepdims=True), specific, flagged)
    # argmax returns the first of equal maxima: the priority order breaks ties.
    best_flagged = np.where(candidates, filled, -np.inf).argmax(axis=0)
    any_flag = flagged.any(axis=0)
    nearest = filled.argmax(axis=0)
    pick = np.where(any_flag, best_flagged, nearest)
    margin = np.take_along_axis(stacked, pick[None], axis=0)[0]
    names = np.array(order, dtype=object)[pick]
    primary = np.where(any_flag, names, UNCLASSIFIED).astype(object)
    return primary, margin


def _confidence(
    scores: Mapping[str, Any],
    replicates: Optional[Mapping[str, Any]],
    t: Mapping[str, float],
    precision: Mapping[str, torch.dtype],
    role: np.ndarray,
) -> np.ndarray:
    """Fraction of bootstrap replicates whose attention role equals ``role``; NaN without them."""
    if not replicates:
        return np.full(role.shape, np.nan)
    arrays = {
        name: np.asarray(value.detach().cpu().numpy() if isinstance(value, Tensor) else value, dtype=np.float64)
        for name, value in replicates.items()
    }
    n = min(len(a) for a in arrays.values())
    if n == 0:
        return np.full(role.shape, np.nan)
    kept = np.zeros(role.shape)
    for b in range(n):
        grids = _score_grids({**scores, **{name: a[b] for name, a in arrays.items()}}, t)
        flags, margins = _decide(grids, t, precision)
        kept += _role_of(_role_parts(flags, margins, grids, t)) == role
    return kept / n


def _borderline(
    grids: Mapping[str, np.ndarray],
    t: Mapping[str, float],
    flags: Mapping[str, np.ndarray],
    precision: Mapping[str, torch.dtype],
    k: float,
) -> np.ndarray:
    """The labels, among those a head has, with a condition within ``k`` SE of its threshold."""
    shape = grids["copy_eigen"].shape
    marks = []
    for label in LABELS:
        near = np.zeros(shape, dtype=bool)
        for cond in RULES[label].conditions:
            se = grids.get(f"{cond.score}_se")
            if se is None:
                continue
            threshold = _at_precision(t[cond.threshold], precision.get(cond.score, torch.float64))
            with np.errstate(invalid="ignore"):
                near |= np.abs(grids[cond.score] - threshold) < k * se
        marks.append(near & flags[label])
    return _join(marks, LABELS).reshape(shape)


def _join(masks: list[np.ndarray], names: tuple[str, ...]) -> np.ndarray:
    """Per head, the names whose mask is true, comma-separated (flattened)."""
    stacked = np.stack([m.ravel() for m in masks])
    return np.array(
        [", ".join(names[i] for i in np.flatnonzero(stacked[:, h])) for h in range(stacked.shape[1])], dtype=object
    )


# -- scores in ---------------------------------------------------------------------------------


def _precision(value: Any) -> torch.dtype:
    """The floating dtype a score was computed in (float64 for ints and Python numbers)."""
    if isinstance(value, Tensor) and value.dtype.is_floating_point:
        return value.dtype
    if isinstance(value, np.ndarray) and value.dtype in (np.float16, np.float32):
        return {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}[value.dtype]
    return torch.float64


def _at_precision(threshold: float, dtype: torch.dtype) -> float:
    """``threshold`` rounded to ``dtype``, so a float32 score equal to float32(0.3) meets 0.3."""
    return float(torch.tensor(threshold, dtype=torch.float64).to(dtype).double())


def _as_grid(name: str, value: Any, shape: Optional[tuple[int, int]]) -> np.ndarray:
    """A score as a float64 ``[layer, head]`` array, shape-checked."""
    if isinstance(value, Tensor):
        value = value.detach().to("cpu", torch.float64).numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ScoreError(f"score {name!r} must be a tensor or array of numbers; got {type(value).__name__}.") from None
    if arr.ndim != 2:
        raise ScoreError(f"score {name!r} must have shape [layer, head]; got shape {tuple(arr.shape)}.")
    if shape is not None and arr.shape != shape:
        raise ScoreError(
            f"score {name!r} has shape {tuple(arr.shape)} but the other scores have {shape}; "
            "every score must cover the same [layer, head] grid."
        )
    return arr


def _fixed_offset(scores: Mapping[str, Any], shape: Optional[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """The best fixed-offset score over offsets k >= 2, and that k (0 where unknown).

    Accepts, in this order of preference: ``fixed_offset_per_k`` ``[layer, head, offset]``
    (index i is k = i + 1); ``fixed_offset`` of that shape; or ``fixed_offset`` ``[layer, head]``
    with ``fixed_offset_k`` ``[layer, head]``. In the last form a best offset of k = 1 says
    nothing about k >= 2, so the score becomes NaN there.
    """
    value = scores["fixed_offset_per_k"] if "fixed_offset_per_k" in scores else scores["fixed_offset"]
    if isinstance(value, Tensor):
        value = value.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 3:
        if shape is not None and arr.shape[:2] != shape:
            raise ScoreError(f"score 'fixed_offset' has shape {tuple(arr.shape)}; expected {shape} + [offset].")
        if arr.shape[2] < 2:
            nan = np.full(arr.shape[:2], np.nan)
            return nan, np.zeros(arr.shape[:2], dtype=np.int64)
        beyond = arr[:, :, 1:]  # k = 2, 3, ...
        filled = np.where(np.isnan(beyond), -np.inf, beyond)
        idx = filled.argmax(axis=2)
        best = np.take_along_axis(beyond, idx[..., None], axis=2)[..., 0]
        k = np.where(np.isnan(best), 0, idx + 2).astype(np.int64)
        return best, k
    best = _as_grid("fixed_offset", arr, shape)
    if "fixed_offset_k" not in scores:
        raise ScoreError(
            "a [layer, head] 'fixed_offset' score needs 'fixed_offset_k' (the offset behind it); "
            "or give 'fixed_offset' as [layer, head, offset]."
        )
    k = _as_grid("fixed_offset_k", scores["fixed_offset_k"], best.shape)
    k = np.where(np.isnan(k), 0, k).astype(np.int64)
    best = np.where(k >= 2, best, np.nan)
    return best, np.where(k >= 2, k, 0)


def _precisions(scores: Mapping[str, Any]) -> dict[str, torch.dtype]:
    return {name: _precision(value) for name, value in scores.items()} if isinstance(scores, Mapping) else {}


def _score_grids(scores: Mapping[str, Any], t: Mapping[str, float]) -> dict[str, np.ndarray]:
    """Check and convert the score dict to ``{name: float64 [layer, head]}``: the fixed score
    columns, ``fixed_offset_k``, every further ``[layer, head]`` score, and the
    :data:`EVIDENCE` the attention rules read."""
    if not isinstance(scores, Mapping):
        raise ScoreError(f"scores must be a mapping of name -> [layer, head] tensor; got {type(scores).__name__}.")
    missing = [name for name in SCORE_COLUMNS if name not in scores]
    if missing:
        raise ScoreError(
            f"score(s) {', '.join(missing)} missing; labelling needs {', '.join(SCORE_COLUMNS)} "
            "(NaN values are allowed where a score cannot be computed)."
        )
    shape: Optional[tuple[int, int]] = None
    grids: dict[str, np.ndarray] = {}
    for name in SCORE_COLUMNS:
        if name == "fixed_offset":
            continue
        grids[name] = _as_grid(name, scores[name], shape)
        shape = grids[name].shape
    if shape is None:  # SCORE_COLUMNS is never fixed_offset alone; this keeps the type checker honest
        raise ScoreError("labelling needs at least one [layer, head] score besides fixed_offset.")
    grids["fixed_offset"], grids["fixed_offset_k"] = _fixed_offset(scores, shape)
    for name, value in scores.items():
        if name in grids or name in ("fixed_offset_per_k", "fixed_offset_k"):
            continue
        if isinstance(value, (Tensor, np.ndarray)) and tuple(value.shape) == shape:
            grids[name] = _as_grid(name, value, shape)
    nan = np.full(shape, np.nan)
    for name, (text_key, rep_key) in EVIDENCE.items():
        for suffix in ("", "_se"):
            text, rep = grids.get(text_key + suffix, nan), grids.get(rep_key + suffix, nan)
            grids[name + suffix] = np.where(np.isnan(text), rep, text)
    grids["free_attention"] = 1.0 - grids["share_first"]
    with np.errstate(invalid="ignore", divide="ignore"):
        for name, cls in FREE_SHARES.items():
            for suffix in ("", "_se"):
                grids[name + suffix] = grids[f"share_{cls}{suffix}"] / grids["free_attention"]
    return _without_parked_shares(grids, t)


def _without_parked_shares(grids: dict[str, np.ndarray], t: Mapping[str, float]) -> dict[str, np.ndarray]:
    """``grids`` with NaN free shares (:data:`FREE_SHARES`) where a head parks nearly all its attention.

    For the rules, the budget-mix step and the bootstrap alike: a head that parks everything
    (``free_attention`` 0 in float32) would otherwise divide rounding noise by zero.
    """
    with np.errstate(invalid="ignore"):
        parked = grids["free_attention"] < t["min_free_attention"]  # NaN free attention: not parked
    names = [name + suffix for name in FREE_SHARES for suffix in ("", "_se")]
    return {**grids, **{name: np.where(parked, np.nan, grids[name]) for name in names}}


def _extra_column(name: str, value: Any, shape: tuple[int, int]) -> Optional[np.ndarray]:
    """A further ``[layer, head]`` score as a flat column (bool kept bool); None if not per head."""
    if not isinstance(name, str) or not isinstance(value, (Tensor, np.ndarray)) or tuple(value.shape) != shape:
        return None
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        return value.numpy().ravel().astype(bool) if value.dtype == torch.bool else value.double().numpy().ravel()
    if value.dtype == bool:
        return value.ravel().copy()
    return value.astype(np.float64).ravel()
