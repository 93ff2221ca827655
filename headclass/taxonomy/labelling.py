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

from typing import Any, Mapping, Optional, Union

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from headclass.config import HeadclassConfig, Thresholds, load_config
from headclass.errors import ScoreError
from headclass.taxonomy.rules import FALLBACK_LABELS, LABELS, PRIORITY, RULES, UNCLASSIFIED, Condition, flag_column
from headclass.taxonomy.schema import ABLATION_COLUMNS, SCORE_COLUMNS, TABLE_COLUMNS, normalise_table

__all__ = ["label_heads", "label_margins", "scores_from_table", "resolve_thresholds", "ThresholdSource"]

ThresholdSource = Union[None, Thresholds, Mapping[str, float], HeadclassConfig]


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


def label_margins(
    scores: Mapping[str, Any],
    thresholds: ThresholdSource = None,
) -> dict[str, np.ndarray]:
    """Each label's normalised margin per head, ``{label: float64 [layer, head]}``.

    ``margin >= 0`` exactly where the label holds; NaN where a score it needs is NaN.
    ``scores`` as for :func:`label_heads`.
    """
    t = resolve_thresholds(thresholds)
    grids = _score_grids(scores)
    silent = _writes_nothing(scores, grids["copy_eigen"].shape)
    out = {}
    for label, rule in RULES.items():
        parts = [cond.margin(grids[cond.score], _threshold(cond, t, scores)) for cond in rule.conditions]
        margin = np.minimum.reduce(parts) if len(parts) > 1 else parts[0]
        out[label] = np.where(silent, -1.0, margin) if rule.needs_output else margin
    return out


def _writes_nothing(scores: Mapping[str, Any], shape: tuple[int, int]) -> np.ndarray:
    """The ``writes_nothing`` weight score as a bool ``[layer, head]`` mask (all False if absent)."""
    if "writes_nothing" not in scores:
        return np.zeros(shape, dtype=bool)
    value = _as_grid("writes_nothing", scores["writes_nothing"], shape)
    return np.nan_to_num(value, nan=0.0) != 0


def _threshold(cond: Condition, thresholds: Mapping[str, float], scores: Mapping[str, Any]) -> float:
    return _at_precision(thresholds[cond.threshold], _precision(scores[cond.score]))


def _score_grids(scores: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Check and convert the score dict to ``{column: float64 [layer, head]}`` (+ ``fixed_offset_k``)."""
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
    grids["fixed_offset"], grids["fixed_offset_k"] = _fixed_offset(scores, shape)
    for name in ABLATION_COLUMNS:
        if name in scores:
            grids[name] = _as_grid(name, scores[name], shape)
    return grids


def label_heads(
    scores: Mapping[str, Any],
    thresholds: ThresholdSource = None,
    *,
    model: str = "model",
) -> pd.DataFrame:
    """Label every head from its scores: the pure core of :func:`classify`.

    Parameters
    ----------
    scores
        ``{name: Float[Tensor, "layer head"]}`` (tensors or arrays) with every name in
        :data:`~headclass.taxonomy.schema.SCORE_COLUMNS`; ``fixed_offset`` may instead be
        ``[layer, head, offset]`` (index i is offset k = i + 1), or come with
        ``fixed_offset_per_k`` of that shape; otherwise ``fixed_offset_k`` must be given too
        (and heads whose best offset is 1 get a NaN ``fixed_offset``). Optional: ``ablation_induction_dloss``, ``ablation_text_dloss``.
        NaN means "could not be computed": labels that need it do not hold. Any further
        ``[layer, head]`` tensor (e.g. ``ov_norm``, ``writes_nothing``) becomes an extra column
        after the fixed ones (float64, or bool for bool tensors); other shapes are ignored.
    thresholds
        ``config.thresholds``, a whole config, a partial mapping over the defaults, or ``None``
        for the defaults.
    model
        Value of the ``model`` column.

    Returns
    -------
    pandas.DataFrame
        The head table, one row per head, schema in :mod:`headclass.taxonomy.schema`.

    Examples
    --------
    >>> label_heads({**scores, "induction": torch.tensor([[0.9, 0.1]])})["primary_label"]
    """
    grids = _score_grids(scores)
    margins = label_margins(scores, thresholds)
    t = resolve_thresholds(thresholds)
    n_layers, n_heads = grids["copy_eigen"].shape
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")

    silent = _writes_nothing(scores, (n_layers, n_heads))
    flags = {}
    for label, rule in RULES.items():
        hold = np.ones((n_layers, n_heads), dtype=bool)
        for cond in rule.conditions:
            hold &= cond.holds(grids[cond.score], _threshold(cond, t, scores))
        flags[label] = hold & ~silent if rule.needs_output else hold

    primary, margin = _primary(flags, margins)
    labels_text = np.array(
        [", ".join(lab for lab in LABELS if flags[lab][i, j]) for i, j in zip(layer.ravel(), head.ravel())],
        dtype=object,
    )
    data: dict[str, Any] = {
        "model": model,
        "layer": layer.ravel(),
        "head": head.ravel(),
        # layer / (n_layers - 1): first layer 0, last layer 1 (a 1-layer model is all 0)
        "relative_depth": layer.ravel() / max(n_layers - 1, 1),
        "primary_label": primary.ravel(),
        "margin": margin.ravel(),
        "labels": labels_text,
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
    for name, value in scores.items():  # further scores (ov_norm, writes_nothing...) ride along
        extra = _extra_column(name, value, (n_layers, n_heads))
        if extra is not None and name not in data and name != "fixed_offset_k":
            data[name] = extra
    return normalise_table(pd.DataFrame(data))


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


def _primary(flags: dict[str, np.ndarray], margins: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Primary label and its margin per head.

    The largest margin among the head's mechanism labels; only when it has none, among its
    :data:`FALLBACK_LABELS` (bos, diffuse); ties by :data:`PRIORITY`. Heads with no label:
    ``unclassified`` with their largest (negative) margin.
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
