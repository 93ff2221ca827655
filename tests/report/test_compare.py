"""Comparison of taxonomies across models of different depths."""

from __future__ import annotations

import numpy as np
import pytest
from fake_scores import random_taxonomy

from headclass.errors import HeadclassError
from headclass.report.compare import Comparison, compare
from headclass.taxonomy import LABELS, UNCLASSIFIED, flag_column


@pytest.fixture
def two():
    return [random_taxonomy(4, 3, seed=1, model="small"), random_taxonomy(12, 5, seed=2, model="large")]


def test_tidy_table(two):
    cmp = compare(two, n_bins=4)
    t = cmp.table
    assert list(t.columns) == [
        "model",
        "bin",
        "depth_low",
        "depth_high",
        "depth_mid",
        "label",
        "count",
        "n_heads",
        "fraction",
        "n_layers",
    ]
    assert not t.duplicated(["model", "bin", "label"]).any()
    assert set(t["label"]) == set(LABELS) | {UNCLASSIFIED}
    assert t["fraction"].between(0, 1).all()
    assert np.allclose(t["fraction"], t["count"] / t["n_heads"])
    # a 4-layer model fills each of 4 bins with one layer; the 12-layer model puts 3 layers per bin
    per_bin = t[t["label"] == "induction"].set_index(["model", "bin"])["n_heads"]
    assert per_bin["small"].tolist() == [3, 3, 3, 3]
    assert per_bin["large"].tolist() == [15, 15, 15, 15]


def test_counts_add_up_to_each_model(two):
    cmp = compare(two, n_bins=7)
    wide = cmp.counts_per_label()
    assert list(wide.index) == ["small", "large"]
    assert list(wide.columns) == list(LABELS) + [UNCLASSIFIED, "n_heads"]
    for tax in two:
        table = tax.table
        for label in LABELS:
            assert wide.loc[tax.model_name, label] == table[flag_column(label)].sum()
            summed = cmp.table.query("model == @tax.model_name and label == @label")["count"].sum()
            assert summed == wide.loc[tax.model_name, label]
        assert wide.loc[tax.model_name, "n_heads"] == len(table)


def test_shallow_model_leaves_bins_out():
    cmp = compare([random_taxonomy(3, 2, model="three")], n_bins=10)
    # relative depths 0, 1/2, 1 fall in bins 0, 5 and the closed last bin 9
    assert sorted(set(cmp.table["bin"])) == [0, 5, 9]


def test_same_names_are_told_apart():
    cmp = compare([random_taxonomy(model="m"), random_taxonomy(model="m", seed=3)])
    assert cmp.models == ["m", "m #2"]


def test_bad_inputs():
    with pytest.raises(HeadclassError, match="at least one"):
        compare([])
    with pytest.raises(HeadclassError, match="item 1"):
        compare([random_taxonomy(), "gpt2"])
    with pytest.raises(HeadclassError, match="n_bins"):
        compare([random_taxonomy()], n_bins=0)
    assert isinstance(compare(random_taxonomy()), Comparison)  # a single taxonomy is fine


def test_figures(two):
    import plotly.graph_objects as go

    cmp = compare(two, n_bins=5)
    fig = cmp.fig_label_fractions()
    assert isinstance(fig, go.Figure)
    assert {tr.name for tr in fig.data} == {"small", "large"}
    assert len(fig.data) == 2 * (len(LABELS) + 1)  # one line per model per label facet
    fig = cmp.fig_label_fractions(labels=["induction", "previous-token"])
    assert len(fig.data) == 4
    bars = cmp.fig_label_counts()
    assert isinstance(bars, go.Figure) and len(bars.data) == 2
    assert sum(bars.data[0].y) == cmp.counts_per_label().loc["small"].drop("n_heads").sum()
    frac = cmp.fig_label_counts(fraction=True)
    assert max(max(tr.y) for tr in frac.data) <= 1
    with pytest.raises(HeadclassError, match="unknown label"):
        cmp.fig_label_fractions(labels=["inductoin"])
    assert "2 models" in repr(cmp)
