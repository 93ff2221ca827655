"""Workflows that chain load -> classify -> compare for several models."""

from __future__ import annotations

import gc
import weakref

from fake_scores import random_taxonomy

from headclass import workflows
from headclass.workflows import compare_models


def test_compare_models_holds_one_model_at_a_time(monkeypatch):
    """Each model is freed before the next is loaded; the result keeps only tables."""
    alive = []
    peak = {"n": 0}

    class Model:
        def __init__(self, name):
            self.name = name
            alive.append(weakref.ref(self))

    def load_model(source, **kwargs):
        gc.collect()
        peak["n"] = max(peak["n"], sum(r() is not None for r in alive) + 1)
        return Model(source)

    def classify(model, config=None, *, progress=True):
        return random_taxonomy(len(model.name) + 2, 2, model=model.name)

    monkeypatch.setattr(workflows, "load_model", load_model)
    monkeypatch.setattr(workflows, "classify", classify)
    cmp = compare_models(["a", "bbbb", "cc"], n_bins=3, progress=False)
    gc.collect()
    assert peak["n"] == 1
    assert all(r() is None for r in alive)
    assert cmp.models == ["a", "bbbb", "cc"]
