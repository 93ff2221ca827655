"""Fixtures for report tests: a synthetic head table to the taxonomy schema, and a real one."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

SCORES = ("previous_token", "current_token", "bos", "induction", "duplicate_token", "fixed_offset",
          "diffuse_entropy", "diffuse_max_attention", "copy_eigen", "copy_topk", "copy_suppression_topk")
LABELS = ("induction", "previous_token", "bos", "diffuse", "copy", "unclassified")


def synthetic_table(n_layers: int = 4, n_heads: int = 6, seed: int = 0, model: str = "synthetic") -> pd.DataFrame:
    """One row per head with every score column, labels cycling through LABELS."""
    rng = np.random.default_rng(seed)
    rows = []
    for layer in range(n_layers):
        for head in range(n_heads):
            primary = LABELS[(layer * n_heads + head) % len(LABELS)]
            row = {"model": model, "layer": layer, "head": head, "primary_label": primary,
                   "labels": primary if primary != "unclassified" else ""}
            row.update({s: float(rng.uniform(0, 1)) for s in SCORES})
            row["copy_eigen"] = float(rng.uniform(-1, 1))
            rows.append(row)
    table = pd.DataFrame(rows)
    table.loc[0, "copy_topk"] = np.nan  # a score not computed for one head
    return table


@pytest.fixture
def table() -> pd.DataFrame:
    return synthetic_table()
