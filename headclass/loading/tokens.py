"""The one token validator: every token batch headclass runs is checked here, once.

:meth:`HeadModel.check_tokens <headclass.loading.head_model.HeadModel.check_tokens>`, the probe
factories (:mod:`headclass.probes`) and :meth:`Probe.check <headclass.probes.Probe.check>` all
call :func:`check_token_ids`, so the same bad input gets the same message wherever it enters.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from headclass.errors import ProbeError

__all__ = ["check_token_ids", "as_token_tensor"]


def check_token_ids(
    tokens: Any,
    *,
    d_vocab: Optional[int] = None,
    n_ctx: Optional[int] = None,
    name: str = "tokens",
    model_name: str = "?",
) -> Tensor:
    """Validate a token batch ``Int[Tensor, "batch pos"]``; return it as ``torch.long``.

    Checks, in order: a tensor, 2-D, non-empty, integer dtype, ids in ``[0, d_vocab)`` and
    length ``<= n_ctx`` (the last two when given). Raises :class:`ProbeError` naming the probe
    (``name``), the model and what to do.
    """
    if not isinstance(tokens, Tensor):
        raise ProbeError(f"probe {name!r}: tokens must be a torch.Tensor of ids; got {type(tokens).__name__}.")
    if tokens.ndim != 2:
        hint = " (a single sequence? use tokens[None])" if tokens.ndim == 1 else ""
        raise ProbeError(f"probe {name!r}: tokens must have shape [batch, pos]; got shape {tuple(tokens.shape)}{hint}.")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ProbeError(
            f"probe {name!r} is empty (shape {tuple(tokens.shape)}); give at least one sequence of at least one token."
        )
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ProbeError(f"probe {name!r}: token ids must be integers; got dtype {tokens.dtype}.")
    if d_vocab is not None:
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= d_vocab:
            raise ProbeError(
                f"probe {name!r}: token ids must lie in [0, {d_vocab - 1}] for model "
                f"{model_name!r}; got ids in [{low}, {high}]."
            )
    if n_ctx is not None and tokens.shape[1] > int(n_ctx):
        raise ProbeError(
            f"probe {name!r}: sequences of {tokens.shape[1]} tokens exceed the context of model "
            f"{model_name!r} ({n_ctx} tokens)."
        )
    return tokens.to(dtype=torch.long)


def as_token_tensor(tokens: Any, name: str = "tokens") -> Tensor:
    """A ``[batch, pos]`` tensor from a tensor or a list of equal-length id sequences."""
    if isinstance(tokens, Tensor):
        return tokens
    if isinstance(tokens, (list, tuple)):
        if not tokens:
            raise ProbeError(f"probe {name!r} is empty (no sequences); give at least one sequence.")
        rows = [t if isinstance(t, Tensor) else torch.as_tensor(t) for t in tokens]
        if any(r.ndim != 1 for r in rows):
            raise ProbeError(
                f"probe {name!r}: each sequence must be a 1-D list or tensor of ids; got shapes "
                f"{[tuple(r.shape) for r in rows][:5]}."
            )
        lengths = [int(r.shape[0]) for r in rows]
        if len(set(lengths)) > 1:
            raise ProbeError(
                f"probe {name!r}: sequences have mismatched lengths {sorted(set(lengths))[:8]}; a "
                "batch needs one length. Cut them to the shortest (e.g. [t[:n] for t in seqs]) or "
                "use probes.text(...), which does that."
            )
        return torch.stack(rows)
    raise ProbeError(
        f"probe {name!r}: tokens must be a [batch, pos] tensor of ids or a list of id sequences; "
        f"got {type(tokens).__name__}."
    )
