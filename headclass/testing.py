"""Reference implementations that exist only to check the fast paths (not used by the package).

:func:`detect_head_scores` runs TransformerLens' own ``detect_head`` on exactly the token ids
headclass scores, so the tests can hold :func:`headclass.scores.patterns.pattern_scores`
(``convention="detect_head"``) to it. It reaches into the model's ``tl_model``, which the
scores never do.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import torch
from torch import Tensor

from headclass.errors import ScoreError

__all__ = ["detect_head_scores", "FixedTokens"]

_HEAD_TYPES = {"previous_token": "previous_token_head", "duplicate_token": "duplicate_token_head",
               "induction": "induction_head"}


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
        return detect_head(stand_in, labels, _HEAD_TYPES[head_type], exclude_bos=exclude_bos,  # type: ignore[arg-type]
                           exclude_current_token=exclude_current_token, error_measure="mul")


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
