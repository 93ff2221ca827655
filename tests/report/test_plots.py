"""Figures: the right cells, colours fixed per label, every score on hover, clear errors."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from fake_scores import random_taxonomy

from headclass.errors import HeadclassError, MissingDependencyError, ScoreError
from headclass.report import plots
from headclass.taxonomy import LABELS, SCORE_COLUMNS, UNCLASSIFIED, HeadTaxonomy, classify


@pytest.fixture
def tax() -> HeadTaxonomy:
    t = random_taxonomy(5, 4, seed=3, model="random", ablation=True)
    table = t.table
    table.loc[1, "induction"] = float("nan")  # L0H1: could not be computed
    return HeadTaxonomy(table, t.metadata)


@pytest.fixture(scope="module")
def tiny_taxonomy(tiny_gpt2) -> HeadTaxonomy:
    """A real classify() output of a small model."""
    return classify(tiny_gpt2, progress=False)


@pytest.fixture(autouse=True)
def no_show(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("plot functions must not call Figure.show()")

    monkeypatch.setattr(go.Figure, "show", refuse)


def _heatmap(fig: go.Figure) -> go.Heatmap:
    return next(trace for trace in fig.data if isinstance(trace, go.Heatmap))


def test_plotly_is_not_imported_with_headclass():
    code = (
        "import sys, headclass, headclass.taxonomy, headclass.report.plots, headclass.report.html; "
        "print(any(m.startswith('plotly') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_head_grid_cells_follow_primary_labels(tax):
    fig = plots.head_grid(tax)
    assert isinstance(fig, go.Figure)
    heat = _heatmap(fig)
    z = np.array(heat.z, dtype=float)
    assert z.shape == (tax.n_layers, tax.n_heads)
    legend = [t.name.split(" (")[0] for t in fig.data if isinstance(t, go.Scatter)]
    assert set(legend) == set(tax.table["primary_label"])
    # value i in a cell is the i-th legend label; the stepped colour scale gives that label's colour
    for row in tax.table.itertuples(index=False):
        assert legend[int(z[row.layer, row.head])] == row.primary_label
    scale = dict((round(pos, 6), colour) for pos, colour in heat.colorscale)
    n = len(legend)
    for i, label in enumerate(legend):
        assert scale[round(i / n, 6)] == plots.label_color(label)
    legend_colours = {t.name.split(" (")[0]: t.marker.color for t in fig.data if isinstance(t, go.Scatter)}
    assert legend_colours == {label: plots.LABEL_COLORS[label] for label in legend}


def test_head_grid_hover_shows_every_score(tax):
    heat = _heatmap(plots.head_grid(tax))
    text = heat.text[2][3]
    row = tax.head(2, 3)
    assert text.startswith("<b>L2H3</b>")
    assert f"primary: <b>{row['primary_label']}</b>" in text
    for score in SCORE_COLUMNS + ("ablation_induction_dloss", "ablation_text_dloss"):
        assert f"{score}: {row[score]:.3f}" in text
    assert "induction: NaN" in heat.text[0][1]


def test_label_colours_are_fixed_and_distinct():
    colours = [plots.LABEL_COLORS[label] for label in LABELS + (UNCLASSIFIED,)]
    assert len(set(colours)) == len(colours)
    assert plots.label_color("some-new-label") == plots.label_color("some-new-label")


def test_colours_consistent_across_figures(tax, tiny_taxonomy):
    for fig in (plots.head_grid(tax), plots.head_grid(tiny_taxonomy)):
        for trace in fig.data:
            if isinstance(trace, go.Scatter):
                assert trace.marker.color == plots.label_color(trace.name.split(" (")[0])
    for trace in plots.label_counts_by_layer(tax).data:
        assert trace.marker.color == plots.label_color(trace.name)


def test_score_heatmap_values_and_scales(tax):
    fig = plots.score_heatmap(tax.table, "induction")
    heat = _heatmap(fig)
    table = tax.table
    for row in table.itertuples(index=False):
        value = heat.z[row.layer][row.head]
        if math.isnan(row.induction):
            assert value is None
        else:
            assert value == pytest.approx(row.induction)
    assert heat.zmin == 0 and heat.zmax == 1
    eig = _heatmap(plots.score_heatmap(tax, "copy_eigen"))
    assert eig.zmid == 0 and eig.zmin == -1 and eig.zmax == 1


def test_score_heatmap_unknown_score(tax):
    with pytest.raises(ScoreError, match=r"no score column 'inductoin'.*'induction'"):
        plots.score_heatmap(tax, "inductoin")


def test_score_heatmaps_menu(tax):
    fig = plots.score_heatmaps(tax, ["induction", "copy_eigen", "bos"])
    assert [t.visible for t in fig.data] == [True, False, False]
    buttons = fig.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == ["induction", "copy_eigen", "bos"]
    assert buttons[1].args[0]["visible"] == [False, True, False]


def test_label_counts_by_layer(tax):
    fig = plots.label_counts_by_layer(tax)
    assert fig.layout.barmode == "stack"
    totals = np.sum([np.array(t.y) for t in fig.data], axis=0)
    assert totals.tolist() == [tax.n_heads] * tax.n_layers
    table = tax.table
    for trace in fig.data:
        expected = [
            int(((table.layer == layer) & (table.primary_label == trace.name)).sum()) for layer in range(tax.n_layers)
        ]
        assert list(trace.y) == expected


def test_figures_on_a_real_taxonomy(tiny_taxonomy):
    grid = plots.head_grid(tiny_taxonomy)
    assert np.array(_heatmap(grid).z, dtype=float).shape == (2, 4)
    assert "tiny" in grid.layout.title.text or grid.layout.title.text.startswith("Attention heads")
    plots.label_counts_by_layer(tiny_taxonomy)
    for score in SCORE_COLUMNS:
        plots.score_heatmap(tiny_taxonomy, score)


def test_bad_input():
    with pytest.raises(HeadclassError, match="HeadTaxonomy or its table"):
        plots.head_grid([1, 2, 3])


# -- attention patterns ------------------------------------------------------------------------


def test_attention_pattern_matches_the_model(tiny_gpt2):
    ids = torch.tensor([0, 5, 9, 17, 5, 9, 17])
    fig = plots.attention_pattern(tiny_gpt2, ids, layer=1, head=2)
    heat = _heatmap(fig)
    z = np.array(heat.z, dtype=float)
    seen = {}
    tiny_gpt2.run_with_patterns(ids[None], lambda layer, p: seen.setdefault(layer, p[0, 2].clone()), layers=[1])
    expected = seen[1].numpy()
    lower = np.tril(np.ones_like(expected, dtype=bool))
    np.testing.assert_allclose(z[lower], expected[lower], atol=1e-6)
    assert np.isnan(z[~lower]).all()
    np.testing.assert_allclose(np.nansum(z, axis=1), 1.0, atol=1e-5)
    # no tokenizer: token ids label the axes
    assert list(fig.layout.xaxis.ticktext)[:3] == ["0 (0)", "5 (1)", "9 (2)"]


def test_attention_pattern_checks_the_head(tiny_gpt2):
    with pytest.raises(HeadclassError, match=r"layer must be in \[0, 1\].*got 7"):
        plots.attention_pattern(tiny_gpt2, [0, 1, 2], layer=7, head=0)
    with pytest.raises(HeadclassError, match=r"head must be in \[0, 3\]"):
        plots.attention_pattern(tiny_gpt2, [0, 1, 2], layer=0, head=4)


@pytest.mark.smollm2
def test_attention_pattern_text_tokens_on_axes(smollm2):
    fig = plots.attention_pattern(smollm2, "The cat sat. The cat sat.", layer=0, head=0)
    ticks = list(fig.layout.xaxis.ticktext)
    assert ticks[1] == "The (1)" and ticks[2] == " cat (2)"
    assert list(fig.layout.yaxis.ticktext) == ticks


def test_circuitsvis_missing_is_a_clear_error(tiny_gpt2, monkeypatch):
    monkeypatch.setitem(sys.modules, "circuitsvis", None)  # import raises ImportError
    with pytest.raises(MissingDependencyError, match="pip install"):
        plots.attention_pattern_circuitsvis(tiny_gpt2, [0, 1, 2], layer=0)


def test_circuitsvis_render(tiny_gpt2):
    pytest.importorskip("circuitsvis")
    view = plots.attention_pattern_circuitsvis(tiny_gpt2, [0, 3, 4, 3, 4], layer=1, heads=[0, 2])
    html = str(view)
    assert "L1H0" in html and "L1H2" in html


# -- spectra ----------------------------------------------------------------------------------


def test_singular_value_spectra(tiny_gpt2):
    from headclass.scores.weights import ov_singular_values, qk_singular_values

    ov, qk = ov_singular_values(tiny_gpt2), qk_singular_values(tiny_gpt2)
    fig = plots.singular_value_spectra({"OV": ov, "QK": qk}, heads=[(0, 1), (1, 3)])
    assert len(fig.data) == 4
    first = fig.data[0]
    assert first.name == "L0H1"
    expected = ov[0, 1].sort(descending=True).values
    np.testing.assert_allclose(first.y, expected.numpy(), rtol=1e-6)
    assert fig.layout.yaxis.type == "log"
    normalised = plots.singular_value_spectra(ov, heads=[(1, 0)], normalize=True, log_y=False)
    assert normalised.data[0].y[0] == pytest.approx(1.0)


def test_singular_value_spectra_errors():
    with pytest.raises(HeadclassError, match="outside spectra"):
        plots.singular_value_spectra(torch.ones(2, 3, 4), heads=[(2, 0)])
    with pytest.raises(ScoreError, match=r"shape \[layer, head, d_head\]"):
        plots.singular_value_spectra(torch.ones(2, 3), heads=[(0, 0)])
    with pytest.raises(HeadclassError, match="heads is empty"):
        plots.singular_value_spectra(torch.ones(2, 3, 4), heads=[])
