"""Workflows that chain the layers for several models: load -> classify -> compare.

They sit above the report layer (they call :func:`headclass.report.compare.compare`), beside
:mod:`headclass.sweep`, and below the CLI.
"""

from __future__ import annotations

import gc
from typing import Any, Sequence

from headclass.loading import load_model
from headclass.report.compare import Comparison, compare
from headclass.taxonomy import classify

__all__ = ["compare_models"]


def compare_models(
    sources: Sequence[Any],
    config: Any = None,
    *,
    n_bins: int = 10,
    progress: bool = True,
    **load_kwargs: Any,
) -> Comparison:
    """Load, classify and free each model in turn, then :func:`compare` their taxonomies.

    Only one model is in memory at a time. ``sources`` are anything
    :func:`headclass.load_model` takes; ``load_kwargs`` (``device``, ``dtype``, ``backend``)
    are passed to it; ``config`` to :func:`headclass.classify`.
    """
    if isinstance(sources, (str, bytes)):
        sources = [sources]
    taxonomies = []
    for source in sources:
        model = load_model(source, **load_kwargs)
        try:
            taxonomies.append(classify(model, config, progress=progress))
        finally:
            del model
            gc.collect()
    return compare(taxonomies, n_bins=n_bins)
