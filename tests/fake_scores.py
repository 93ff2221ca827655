"""Score dicts built by hand, to test the labelling rule without running a model.

``neutral_scores`` gives every head scores that carry no label (and are far from every
threshold); tests then raise single scores to plant a behaviour. ``random_taxonomy`` gives a
realistic-looking :class:`HeadTaxonomy` for report and comparison tests.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from headclass.taxonomy import SCORE_COLUMNS, HeadTaxonomy, label_heads


def neutral_scores(n_layers: int = 2, n_heads: int = 3, max_offset: int = 4) -> dict[str, torch.Tensor]:
    """Scores with no label anywhere: pattern scores 0, max_attention 1, copy_eigen -1."""
    scores = {name: torch.zeros(n_layers, n_heads) for name in SCORE_COLUMNS}
    scores["max_attention"] = torch.ones(n_layers, n_heads)
    scores["copy_eigen"] = torch.full((n_layers, n_heads), -1.0)
    scores["fixed_offset"] = torch.zeros(n_layers, n_heads, max_offset)
    scores["ov_gain_relative"] = torch.ones(n_layers, n_heads)  # writes like a typical head: transform
    return scores


def random_scores(n_layers: int, n_heads: int, seed: int = 0, *, ablation: bool = False) -> dict[str, Any]:
    """Uniform random scores in their ranges (a few heads get several labels, some none)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen)

    scores: dict[str, Any] = {name: rand(n_layers, n_heads) ** 2 for name in SCORE_COLUMNS}
    scores["copy_eigen"] = rand(n_layers, n_heads) * 2 - 1
    scores["max_attention"] = 1 - scores["diffuse_entropy"] * 0.9
    scores["fixed_offset"] = rand(n_layers, n_heads, 6) ** 3
    scores["ov_gain_relative"] = rand(n_layers, n_heads) * 2
    if ablation:
        scores["ablation_induction_dloss"] = rand(n_layers, n_heads) * 0.1
        scores["ablation_text_dloss"] = rand(n_layers, n_heads) * 0.1
    return scores


def random_taxonomy(
    n_layers: int = 4,
    n_heads: int = 3,
    seed: int = 0,
    model: str = "random",
    metadata: Optional[dict] = None,
    ablation: bool = False,
) -> HeadTaxonomy:
    table = label_heads(random_scores(n_layers, n_heads, seed, ablation=ablation), model=model)
    meta = {
        "model": model,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "probe_seed": seed,
        "config": {"thresholds": {"induction": 0.4}},
        "versions": {"torch": torch.__version__},
        "date": "2025-01-01T00:00:00+00:00",
    }
    meta.update(metadata or {})
    return HeadTaxonomy(table, meta)


def grid(values: list[list[float]]) -> torch.Tensor:
    return torch.tensor(np.asarray(values, dtype=np.float32))
