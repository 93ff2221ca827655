"""Reference implementations that exist only to check the fast paths (not used by the package).

:func:`detect_head_scores` runs TransformerLens' own ``detect_head`` on exactly the token ids
headclass scores, so the tests can hold :func:`headclass.scores.patterns.pattern_scores`
(``convention="detect_head"``) to it. It reaches into the model's ``tl_model``, which the
scores never do.

:func:`ablation_scores_reference` and :func:`ablation_dloss_reference` compute the ablation
scores the slow, obvious way (one full forward pass per ablated head, no residual caching),
against which :mod:`headclass.scores.ablation`'s exact mode is tested and timed.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from headclass.config import HeadclassConfig, load_config
from headclass.errors import ScoreError
from headclass.loading.head_model import hook_name
from headclass.scores.ablation import (
    HeadList,
    _ablation_hook,
    _bar,
    _check_method,
    _check_targets,
    _heads_by_layer,
    _losses,
    _per_probe,
    _store_mean,
)

__all__ = ["detect_head_scores", "FixedTokens", "ablation_scores_reference", "ablation_dloss_reference"]

_HEAD_TYPES = {
    "previous_token": "previous_token_head",
    "duplicate_token": "duplicate_token_head",
    "induction": "induction_head",
}


def detect_head_scores(
    model: Any,
    tokens: Tensor,
    head_type: str,
    *,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
) -> Tensor:
    """TransformerLens' ``detect_head(..., error_measure="mul")`` on exactly these tokens.

    ``detect_head`` only takes strings and tokenises them itself; this feeds it a stand-in
    model whose ``to_tokens`` returns rows of ``tokens`` instead, so both sides see the same
    ids. It runs one cached forward pass per sequence, as ``detect_head`` does for a list.

    Parameters
    ----------
    model
        A :class:`~headclass.HeadModel` (its ``tl_model`` is what ``detect_head`` runs).
    tokens
        ``[batch, pos]`` ids, ``1 < pos < n_ctx`` (``detect_head``'s own limit).
    head_type
        ``"previous_token"``, ``"duplicate_token"`` or ``"induction"``.

    Returns
    -------
    Tensor
        ``Float[Tensor, "layer head"]``, the mean over sequences.
    """
    from transformer_lens.head_detector import detect_head

    if head_type not in _HEAD_TYPES:
        raise ScoreError(f"head_type must be one of {sorted(_HEAD_TYPES)}; got {head_type!r}.")
    tokens = model.check_tokens(tokens) if hasattr(model, "check_tokens") else tokens
    stand_in = FixedTokens(model.tl_model, tokens)
    labels = [str(i) for i in range(tokens.shape[0])]
    with torch.no_grad():
        return detect_head(
            stand_in,  # type: ignore[arg-type]  # a duck-typed stand-in: run_with_cache and to_tokens
            labels,
            _HEAD_TYPES[head_type],  # type: ignore[arg-type]  # one of detect_head's literal names
            exclude_bos=exclude_bos,
            exclude_current_token=exclude_current_token,
            error_measure="mul",
        )


class FixedTokens:
    """A TransformerLens model whose ``to_tokens("i")`` is row ``i`` of a fixed batch."""

    def __init__(self, tl_model: Any, tokens: Tensor):
        self._tl_model, self._tokens = tl_model, tokens

    @property
    def cfg(self) -> Any:
        return self._tl_model.cfg

    def to_tokens(self, seq: Union[str, Sequence[str]]) -> Tensor:
        if isinstance(seq, str):
            return self._tokens[int(seq)][None]
        return self._tokens[[int(s) for s in seq]]

    def run_with_cache(self, *args: Any, **kwargs: Any) -> Any:
        return self._tl_model.run_with_cache(*args, **kwargs)


# -- ablation: one full forward pass per head ---------------------------------------------------


def ablation_scores_reference(
    model: Any,
    *,
    config: Union[None, HeadclassConfig, Mapping[str, Any], str] = None,
    probes: Optional[Mapping[str, Any]] = None,
    method: Optional[str] = None,
    heads: HeadList = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """:func:`ablation_scores` the slow, obvious way: one full forward pass per head.

    Same parameters and result as :func:`headclass.scores.ablation.ablation_scores` in exact mode (no ``mode``); no
    residual caching, no batching of heads. For tests and for timing the fast path.
    """
    cfg = load_config(config)
    method = _check_method(method if method is not None else cfg.ablation.method)
    return _per_probe(
        model,
        cfg,
        probes,
        heads,
        lambda probe, pairs: ablation_dloss_reference(
            model,
            probe.tokens,
            targets=probe.targets,
            method=method,
            heads=pairs,
            progress=progress,
        ),
    )


def ablation_dloss_reference(
    model: Any,
    tokens: Tensor,
    *,
    targets: Optional[Tensor] = None,
    method: str = "mean",
    heads: HeadList = None,
    progress: bool = False,
) -> Tensor:
    """:func:`headclass.scores.ablation.ablation_dloss` with one full forward pass per head (the slow reference)."""
    method = _check_method(method)
    tokens = model.check_tokens(tokens)
    targets = _check_targets(tokens, targets)
    heads_by_layer = _heads_by_layer(model, heads)
    layers = sorted(heads_by_layer)
    with torch.no_grad():
        means: dict[int, Tensor] = {}
        hooks = (
            [(hook_name(layer, "hook_z"), _store_mean(means, layer)) for layer in layers] if method == "mean" else []
        )
        clean = _losses(model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits"), tokens, targets)[0]
        out = torch.full((model.n_layers, model.n_heads), float("nan"))
        bar = _bar(progress, sum(len(h) for h in heads_by_layer.values()), "ablation (reference)")
        for layer in layers:
            for head in heads_by_layer[layer]:
                hook = _ablation_hook([head], tokens.shape[0], means.get(layer))
                logits = model.run_with_hooks(
                    tokens, fwd_hooks=[(hook_name(layer, "hook_z"), hook)], return_type="logits"
                )
                out[layer, head] = float(_losses(logits, tokens, targets)[0] - clean)
                bar.update(1)
        bar.close()
    return out
