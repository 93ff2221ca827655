"""The labelling rule (pure, on hand-built scores), HeadTaxonomy, classify, and config errors."""

from __future__ import annotations

import gc
import math
import sys
import types
import warnings
import weakref

import numpy as np
import pandas as pd
import pytest
import torch
from fake_scores import neutral_scores, random_scores, random_taxonomy
from planted import bos_only_model, planted_attention_model

import headclass
from headclass.config import load_config
from headclass.errors import ConfigError, HeadclassError, ScoreError
from headclass.taxonomy import (
    CORE_LABELS,
    FALLBACK_LABELS,
    LABELS,
    PRIORITY,
    RULES,
    SCORE_COLUMNS,
    TABLE_COLUMNS,
    UNCLASSIFIED,
    HeadTaxonomy,
    classify,
    flag_column,
    label_heads,
    label_margins,
)
from headclass.taxonomy.labelling import EVIDENCE, FREE_SHARES
from headclass.taxonomy.rules import BUDGET_ROLE

T = load_config().thresholds  # the shipped defaults


def row(table: pd.DataFrame, layer: int, head: int) -> pd.Series:
    return table[(table["layer"] == layer) & (table["head"] == head)].iloc[0]


def single_head(**values) -> pd.Series:
    """Label one head whose scores are neutral except ``values`` (fixed_offset as {k: score})."""
    scores = neutral_scores(1, 1, max_offset=4)
    for name, value in values.items():
        if name == "fixed_offset":
            for k, v in value.items():
                scores["fixed_offset"][0, 0, k - 1] = v
        else:
            scores[name][0, 0] = value
    return label_heads(scores).iloc[0]


# -- one label at a time -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "values, label",
    [
        ({"previous_token": 0.9}, "previous-token"),
        ({"current_token": 0.9}, "current-token"),
        ({"bos": 0.9}, "bos"),
        ({"induction": 0.9}, "induction"),
        ({"duplicate_token": 0.9}, "duplicate-token"),
        ({"fixed_offset": {3: 0.9}}, "fixed-offset"),
        ({"diffuse_entropy": 0.95, "max_attention": 0.05}, "diffuse"),
        ({"copy_eigen": 0.95, "copy_topk": 0.9}, "copy"),
        ({"copy_suppression_topk": 0.9}, "copy-suppression"),
    ],
)
def test_each_label_alone(values, label):
    r = single_head(**values)
    assert r["primary_label"] == label
    assert r[flag_column(label)]
    # every head also has an output role: transform unless an output label holds
    extra = [] if RULES[label].axis == "output" else ["transform"]
    assert r["labels"] == ", ".join([label] + extra)
    assert sum(bool(r[flag_column(other)]) for other in LABELS) == 1 + len(extra)
    assert 0 < r["margin"] <= 1
    assert r["output_role"] == (label if RULES[label].axis == "output" else "transform")
    if RULES[label].axis == "attention":
        assert r["attention_role"] == label and r["attention_roles"] == label


def test_neutral_head_is_unclassified():
    r = single_head()
    assert r["primary_label"] == UNCLASSIFIED and r["attention_role"] == UNCLASSIFIED
    assert r["labels"] == "transform" and r["output_role"] == "transform"  # it writes, like a typical head
    assert not any(r[flag_column(label)] for label in LABELS if label != "transform")
    assert r["margin"] == -1.0  # every score sits at the far end of its range


# -- threshold edges ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, label",
    [
        ("previous_token", "previous-token"),
        ("induction", "induction"),
        ("bos", "bos"),
        ("current_token", "current-token"),
        ("duplicate_token", "duplicate-token"),
        ("copy_suppression_topk", "copy-suppression"),
    ],
)
def test_score_equal_to_threshold_counts(name, label):
    t = float(getattr(T, name))
    at = label_heads({**neutral_scores(1, 1), name: torch.tensor([[t]], dtype=torch.float64)}).iloc[0]
    assert at[flag_column(label)] and at["primary_label"] == label and at["margin"] == 0.0
    below = label_heads({**neutral_scores(1, 1), name: torch.tensor([[t - 1e-9]], dtype=torch.float64)}).iloc[0]
    assert not below[flag_column(label)] and below["primary_label"] == UNCLASSIFIED
    assert -1e-6 < below["margin"] < 0


def test_diffuse_needs_both_entropy_and_low_max_attention():
    t = T
    assert single_head(diffuse_entropy=t.diffuse_entropy, max_attention=t.diffuse_max_attention)["is_diffuse"]
    # high entropy alone (a head spread over a few keys but peaked) is not diffuse
    assert not single_head(diffuse_entropy=0.99, max_attention=t.diffuse_max_attention + 0.01)["is_diffuse"]
    assert not single_head(diffuse_entropy=t.diffuse_entropy - 0.01, max_attention=0.01)["is_diffuse"]


def test_copy_needs_both_eigen_and_topk():
    assert single_head(copy_eigen=T.copy_eigen, copy_topk=T.copy_topk)["is_copy"]
    assert not single_head(copy_eigen=0.99, copy_topk=T.copy_topk - 0.01)["is_copy"]
    assert not single_head(copy_eigen=T.copy_eigen - 0.01, copy_topk=0.99)["is_copy"]


def test_copy_margin_is_the_smaller_condition_margin():
    # eigen 0.85: (0.85 - 0.7) / 0.3 = 0.5; topk 0.6: (0.6 - 0.5) / 0.5 = 0.2
    r = single_head(copy_eigen=0.85, copy_topk=0.6)
    assert r["margin"] == pytest.approx(0.2, abs=1e-6)


def test_negative_margin_scales_by_room_below_threshold():
    # copy_eigen ranges over [-1, 1]: a failing copy_eigen of -0.15 with threshold 0.7 is
    # (-0.15 - 0.7) / (0.7 + 1) = -0.5 of the way down; topk passes.
    r = single_head(copy_eigen=-0.15, copy_topk=0.9)
    assert r["primary_label"] == UNCLASSIFIED
    assert r["margin"] == pytest.approx(-0.5, abs=1e-6)


# -- fixed offset -------------------------------------------------------------------------------
def test_fixed_offset_takes_best_k_of_at_least_two():
    r = single_head(fixed_offset={1: 0.95, 2: 0.3, 4: 0.6})
    assert r["fixed_offset"] == pytest.approx(0.6) and r["fixed_offset_k"] == 4
    assert r["is_fixed_offset"] and not r["is_previous_token"]


def test_offset_one_alone_is_not_fixed_offset():
    r = single_head(fixed_offset={1: 0.95})
    assert not r["is_fixed_offset"]
    assert r["primary_label"] == UNCLASSIFIED


def test_fixed_offset_as_best_score_and_k():
    scores = neutral_scores(1, 2)
    scores["fixed_offset"] = torch.tensor([[0.9, 0.9]])
    scores["fixed_offset_k"] = torch.tensor([[1, 3]])
    t = label_heads(scores)
    assert not t.loc[0, "is_fixed_offset"] and math.isnan(t.loc[0, "fixed_offset"])
    assert pd.isna(t.loc[0, "fixed_offset_k"])
    assert t.loc[1, "is_fixed_offset"] and t.loc[1, "fixed_offset_k"] == 3
    del scores["fixed_offset_k"]
    with pytest.raises(ScoreError, match="fixed_offset_k"):
        label_heads(scores)


def test_fixed_offset_with_only_offset_one_tried():
    scores = neutral_scores(1, 1, max_offset=1)
    t = label_heads(scores)
    assert math.isnan(t.loc[0, "fixed_offset"]) and pd.isna(t.loc[0, "fixed_offset_k"])


# -- several labels, primary rule ------------------------------------------------------------------
def test_multi_label_primary_is_largest_normalised_margin():
    # previous-token: (0.9 - 0.4) / 0.6 = 0.833; duplicate-token: (0.7 - 0.4) / 0.6 = 0.5
    r = single_head(previous_token=0.9, duplicate_token=0.7)
    assert r["is_previous_token"] and r["is_duplicate_token"]
    assert r["labels"] == "previous-token, duplicate-token, transform"
    assert r["attention_role"] == "mixed" and r["attention_roles"] == "previous-token, duplicate-token"
    assert r["primary_label"] == "previous-token"
    assert r["margin"] == pytest.approx(0.5 / 0.6)
    # normalised, not raw: current-token 0.5 -> 0.167 loses to copy_topk 0.6 -> 0.2 (eigen 1 -> 1)
    r = single_head(current_token=0.5, copy_eigen=1.0, copy_topk=0.6)
    assert r["primary_label"] == "copy" and r["margin"] == pytest.approx(0.2)
    # and among fallback labels: diffuse entropy 0.95 -> 0.75 beats bos 0.8 -> 0.5
    r = single_head(bos=0.8, diffuse_entropy=0.95, max_attention=0.0)
    assert r["primary_label"] == "diffuse"


def test_bos_and_diffuse_yield_to_any_mechanism_label():
    # an induction head that parks the rest of its attention on BOS
    r = single_head(induction=0.45, bos=0.98)  # margins: induction 0.083, bos 0.95
    assert r["is_induction"] and r["is_bos"]
    assert r["primary_label"] == "induction"
    assert r["margin"] == pytest.approx(0.05 / 0.6)
    r = single_head(bos=0.98)
    assert r["primary_label"] == "bos"
    assert set(FALLBACK_LABELS) == {"bos", "diffuse"}


def test_a_bos_sink_with_copying_ov_keeps_both_labels():
    r = single_head(bos=0.9, copy_eigen=0.99, copy_topk=0.99)
    assert r["is_bos"] and r["is_copy"]
    assert r["primary_label"] == "copy"  # margin 0.98 > bos 0.75


def test_a_head_parking_everything_has_no_free_shares():
    # free_attention = 1 - 1.0 = 0 in float32: rounding noise in two classes became infinite
    # shares of the rest (an overflow warning on SmolLM2, and a budget mix of two "big" classes)
    scores = neutral_scores(1, 1, max_offset=4)
    for cls in BUDGET_ROLE:
        scores[f"budget_{cls}"] = torch.full((1, 1), 1.0 if cls == "first" else 0.0)
    scores["budget_previous"][0, 0] = scores["budget_other"][0, 0] = 3e-8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = label_heads(scores, replicates={"budget_other": torch.full((3, 1, 1), 3e-8)}).iloc[0]
        label_margins(scores)
    assert r["attention_role"] == UNCLASSIFIED, r["attention_roles"]  # bos 0 here: no rule, no budget mix
    assert r["confidence"] == 1.0  # the bootstrap's replicates park everything too


def test_ties_follow_priority():
    # induction (0.7 - 0.4) / 0.6 = 0.5 and previous-token the same: induction is first in PRIORITY
    r = single_head(induction=0.7, previous_token=0.7)
    assert r["primary_label"] == "induction"
    assert PRIORITY.index("induction") < PRIORITY.index("previous-token")
    # both at the top of the range
    r = single_head(duplicate_token=1.0, current_token=1.0)
    assert r["primary_label"] == "duplicate-token"
    assert sorted(PRIORITY) == sorted(set(LABELS) - {"no-op", "transform"})  # output-only: never primary


def test_unclassified_margin_is_nearest_label():
    r = single_head(induction=0.2, bos=0.15)  # induction -0.5, bos -0.75
    assert r["primary_label"] == UNCLASSIFIED
    assert r["margin"] == pytest.approx(-0.5)


def test_margin_sign_matches_flags_on_random_scores():
    scores = random_scores(6, 7, seed=3)
    margins = label_margins(scores)
    table = label_heads(scores)
    for label in LABELS:
        flags = table[flag_column(label)].to_numpy()
        m = margins[label].ravel()
        known = ~np.isnan(m)  # NaN: the evidence was not computed (no budget in these scores)
        assert np.array_equal(flags[known], m[known] >= 0), label
        assert not flags[~known].any(), label
        assert np.all((m[known] >= -1) & (m[known] <= 1))
    classified = table["primary_label"] != UNCLASSIFIED
    assert (table.loc[classified, "margin"] >= 0).all()
    assert (table.loc[~classified, "margin"] < 0).all()
    # the primary label carries the largest margin among the head's labels (mechanisms first)
    for i, r in table[classified].iterrows():
        mine = [label for label in PRIORITY if r[flag_column(label)]]  # no-op / transform: never primary
        specific = [label for label in mine if label not in FALLBACK_LABELS]
        best = max(margins[label].ravel()[i] for label in (specific or mine))
        assert r["margin"] == pytest.approx(best)
        assert r["primary_label"] in (specific or mine)


# -- NaN, missing and malformed scores -----------------------------------------------------------
def test_nan_score_gives_no_label_and_is_ignored_for_margin():
    scores = neutral_scores(1, 2)
    scores["induction"] = torch.tensor([[float("nan"), 0.9]])
    scores["bos"] = torch.tensor([[0.3, 0.0]])
    t = label_heads(scores)
    assert not t.loc[0, "is_induction"] and math.isnan(t.loc[0, "induction"])
    assert t.loc[0, "primary_label"] == UNCLASSIFIED
    assert t.loc[0, "margin"] == pytest.approx(-0.5)  # from bos, not NaN
    assert t.loc[1, "primary_label"] == "induction"


def test_missing_score_is_named():
    scores = neutral_scores()
    del scores["copy_topk"]
    with pytest.raises(ScoreError, match="copy_topk"):
        label_heads(scores)


def test_shape_mismatch_is_named():
    scores = neutral_scores(2, 3)
    scores["bos"] = torch.zeros(3, 2)
    with pytest.raises(ScoreError, match="'bos'.*shape"):
        label_heads(scores)
    scores["bos"] = torch.zeros(6)
    with pytest.raises(ScoreError, match=r"\[layer, head\]"):
        label_heads(scores)


def test_scores_must_be_a_mapping():
    with pytest.raises(ScoreError, match="mapping"):
        label_heads([1, 2, 3])


def test_numpy_scores_and_float64_work():
    scores = {k: v.numpy().astype(np.float64) for k, v in neutral_scores(2, 2).items()}
    scores["induction"][1, 1] = 0.8
    assert row(label_heads(scores), 1, 1)["primary_label"] == "induction"


# -- thresholds -----------------------------------------------------------------------------------
def test_thresholds_from_mapping_and_config():
    scores = neutral_scores(1, 1)
    scores["induction"][0, 0] = 0.3
    assert label_heads(scores).loc[0, "primary_label"] == UNCLASSIFIED
    assert label_heads(scores, {"induction": 0.25}).loc[0, "primary_label"] == "induction"
    cfg = load_config({"thresholds": {"induction": 0.25}})
    assert label_heads(scores, cfg).loc[0, "primary_label"] == "induction"
    assert label_heads(scores, cfg.thresholds).loc[0, "primary_label"] == "induction"


def test_threshold_at_top_of_range():
    scores = neutral_scores(1, 2)
    scores["bos"] = torch.tensor([[1.0, 0.99]])
    t = label_heads(scores, {"bos": 1.0})
    assert t.loc[0, "is_bos"] and t.loc[0, "margin"] == 0.0
    assert not t.loc[1, "is_bos"]


def test_bad_thresholds_raise_config_error_naming_key():
    with pytest.raises(ConfigError, match="thresholds.induction"):
        label_heads(neutral_scores(), {"induction": 1.7})
    with pytest.raises(ConfigError, match="thresholds.inducton"):
        label_heads(neutral_scores(), {"inducton": 0.5})


def test_every_rule_uses_known_scores_and_thresholds():
    known = set(load_config().thresholds.model_dump())
    assert tuple(RULES) == LABELS
    for rule in RULES.values():
        for cond in rule.conditions:
            assert cond.score in SCORE_COLUMNS or cond.score in EVIDENCE or cond.score in FREE_SHARES, cond.score
            assert cond.threshold in known


# -- the table -----------------------------------------------------------------------------------
def test_table_schema():
    t = label_heads(random_scores(3, 4), model="m")
    assert list(t.columns) == list(TABLE_COLUMNS)
    assert len(t) == 12 and not t.duplicated(["layer", "head"]).any()
    assert t["layer"].dtype == "int64" and t["head"].dtype == "int64"
    assert all(t[flag_column(label)].dtype == bool for label in LABELS)
    assert all(t[s].dtype == "float64" for s in SCORE_COLUMNS)
    assert str(t["fixed_offset_k"].dtype) == "Int64"
    assert set(t["model"]) == {"m"}
    assert np.allclose(sorted(set(t["relative_depth"])), [0.0, 0.5, 1.0])  # layer / (n_layers - 1)
    for label in CORE_LABELS:
        assert flag_column(label) in t.columns


def test_flag_column_names():
    assert flag_column("previous-token") == "is_previous_token"
    assert flag_column("copy-suppression") == "is_copy_suppression"
    with pytest.raises(HeadclassError, match="unknown label"):
        flag_column("induction_head")


def test_ablation_columns_kept_when_given():
    t = label_heads(random_scores(2, 2, ablation=True))
    assert list(t.columns[-2:]) == ["ablation_induction_dloss", "ablation_text_dloss"]


# -- HeadTaxonomy ---------------------------------------------------------------------------------
def test_per_layer_is_tidy_and_consistent():
    tax = random_taxonomy(5, 4, seed=1)
    per = tax.per_layer()
    assert len(per) == 5 * (len(LABELS) + 1)
    assert not per.duplicated(["layer", "label"]).any()
    for _, g in per.groupby("layer"):
        assert g["primary_count"].sum() == 4  # every head has exactly one primary label
        assert np.allclose(g["fraction"], g["count"] / 4)
    table = tax.table
    for label in LABELS:
        assert per.loc[per["label"] == label, "count"].sum() == table[flag_column(label)].sum()
    for score in ("induction", "previous_token", "bos", "copy_eigen", "diffuse_entropy"):
        expected = table.groupby("layer")[score].mean().to_numpy()
        got = per.drop_duplicates("layer")[f"mean_{score}"].to_numpy()
        assert np.allclose(expected, got)


def test_summary():
    tax = random_taxonomy(6, 5, seed=2)
    s = tax.summary()
    assert list(s["label"]) == list(LABELS) + [UNCLASSIFIED]
    table = tax.table
    for r in s.itertuples():
        if r.label == UNCLASSIFIED:
            assert r.count == (table["primary_label"] == UNCLASSIFIED).sum()
            continue
        flagged = table[table[flag_column(r.label)]]
        assert r.count == len(flagged)
        if len(flagged):
            assert r.first_layer == flagged["layer"].min()
            assert r.best_head.startswith("L")
        else:
            assert pd.isna(r.first_layer) and r.best_head == ""
    assert s["primary_count"].sum() == len(tax)


def test_head_lookup_and_errors():
    tax = random_taxonomy(3, 2)
    h = tax.head(2, 1)
    assert h["layer"] == 2 and h["head"] == 1
    assert isinstance(h["is_induction"], bool) and isinstance(h["margin"], float)
    with pytest.raises(HeadclassError, match="layer 3 head 0"):
        tax.head(3, 0)


def test_heads_with_label():
    tax = random_taxonomy(6, 6, seed=4)
    ind = tax.heads_with("induction")
    assert ind["is_induction"].all() and len(ind) == tax.table["is_induction"].sum()
    prim = tax.heads_with("induction", primary=True)
    assert (prim["primary_label"] == "induction").all()
    assert (tax.heads_with(UNCLASSIFIED)["primary_label"] == UNCLASSIFIED).all()
    with pytest.raises(HeadclassError, match="unknown label"):
        tax.heads_with("inductive")


def test_repr_and_html():
    tax = random_taxonomy(4, 3, model="tiny")
    text = repr(tax)
    assert text.startswith("HeadTaxonomy('tiny': 4 layers x 3 heads = 12 heads)")
    html = tax._repr_html_()
    assert "<table>" in html and "induction" in html


def test_table_and_metadata_are_copies():
    tax = random_taxonomy()
    table = tax.table
    table.loc[0, "primary_label"] = "bos"
    tax.metadata["model"] = "changed"
    assert tax.metadata["model"] == "random"
    assert tax.equals(random_taxonomy())


def test_from_table_validates():
    tax = random_taxonomy()
    t = tax.table
    again = HeadTaxonomy.from_table(t.sample(frac=1, random_state=0), tax.metadata)  # any row order
    pd.testing.assert_frame_equal(again.table, tax.table)
    with pytest.raises(HeadclassError, match="lacks column"):
        HeadTaxonomy.from_table(t.drop(columns=["is_bos"]))
    with pytest.raises(HeadclassError, match="twice"):
        HeadTaxonomy.from_table(pd.concat([t, t.iloc[:1]]))
    bad = t.copy()
    bad.loc[0, "primary_label"] = "induction_head"
    with pytest.raises(HeadclassError, match="primary_label"):
        HeadTaxonomy.from_table(bad)
    with pytest.raises(HeadclassError, match="DataFrame"):
        HeadTaxonomy.from_table({"layer": [0]})


# -- classify (with stand-in score modules until the real ones exist) ------------------------------
class FakeModel:
    """The HeadModel attributes classify reads; its scores come from the stand-in modules."""

    def __init__(self, n_layers=3, n_heads=4):
        self.name = "fake"
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.n_params = 1234
        self.backend = "bridge"
        self.architecture = "Fake"
        self.weight = torch.zeros(1000)  # something a leaked reference would keep alive

    def run_with_patterns(self, tokens, callback, *, layers=None):  # never called by the stand-ins
        raise AssertionError("stand-in scores do not run the model")


@pytest.fixture
def stand_in_scores(monkeypatch):
    """Replace the score modules by stand-ins returning planted scores; records the calls."""
    calls = {}

    def pattern_measurement(model, *, config=None, probes=None, progress=True, observers=()):
        calls["patterns"] = dict(config=config, probes=probes, progress=progress)
        s = random_scores(model.n_layers, model.n_heads, seed=5)
        out = {k: v for k, v in s.items() if k not in ("copy_eigen", "copy_topk", "copy_suppression_topk")}
        out["induction"] = torch.zeros(model.n_layers, model.n_heads)
        out["induction"][2, 1] = 0.95

        def bootstrap(n, seed=0):  # every replicate equal to the full sample: confidence 1
            calls["bootstrap"] = dict(n=n, seed=seed)
            return {"induction": out["induction"].expand(n, -1, -1)}

        return types.SimpleNamespace(scores=out, bootstrap=bootstrap)

    def weight_scores(model, *, config=None, tokens=None, progress=True):
        calls["weights"] = dict(config=config, tokens=tokens, progress=progress)
        s = random_scores(model.n_layers, model.n_heads, seed=6)
        return {k: s[k] for k in ("copy_eigen", "copy_topk", "copy_suppression_topk")}

    def ablation_scores(model, *, config=None, probes=None, progress=True):
        calls["ablation"] = dict(config=config, probes=probes, progress=progress)
        return {
            "ablation_induction_dloss": torch.ones(model.n_layers, model.n_heads),
            "ablation_text_dloss": torch.zeros(model.n_layers, model.n_heads),
        }

    class ExampleCollector:  # the cards' evidence: recorded, not computed
        def __init__(self, probes, n_layers, n_heads):
            calls["evidence"] = dict(probes=probes)

    def head_evidence(model, collector, **options):
        return None

    examples = types.ModuleType("headclass.scores.examples")
    examples.ExampleCollector, examples.head_evidence = ExampleCollector, head_evidence
    monkeypatch.setitem(sys.modules, "headclass.scores.examples", examples)
    for name, fn in (("patterns", pattern_measurement), ("weights", weight_scores), ("ablation", ablation_scores)):
        mod = types.ModuleType(f"headclass.scores.{name}")
        setattr(mod, fn.__name__, fn)
        monkeypatch.setitem(sys.modules, f"headclass.scores.{name}", mod)

    def build_probe_set(model, config, ablation=False):  # what classify hands each score
        calls["probe_set"] = types.SimpleNamespace(
            pattern_probes=["pattern probes"],
            copy_tokens="copy tokens",
            ablation_probes={"induction": "ablation probe"},
        )
        return calls["probe_set"]

    from headclass.taxonomy import classification

    monkeypatch.setattr(classification, "build_probe_set", build_probe_set)
    return calls


def test_classify_combines_scores_and_metadata(stand_in_scores):
    model = FakeModel()
    tax = classify(model, {"thresholds": {"induction": 0.9}}, progress=False)
    assert isinstance(tax, HeadTaxonomy)
    t = tax.table
    assert len(t) == 12 and set(t["model"]) == {"fake"}
    assert row(t, 2, 1)["is_induction"] and t["is_induction"].sum() == 1
    meta = tax.metadata
    assert meta["model"] == "fake" and meta["n_layers"] == 3 and meta["n_heads"] == 4
    assert meta["n_params"] == 1234 and meta["backend"] == "bridge"
    assert meta["config"]["thresholds"]["induction"] == 0.9
    assert meta["probe_seed"] == 0
    assert set(meta["versions"]) >= {"headclass", "torch", "transformer_lens", "transformers"}
    assert meta["date"][:2] == "20" and "T" in meta["date"]
    assert stand_in_scores["patterns"]["progress"] is False
    # the probe set is built once and each score gets its part of it
    assert stand_in_scores["patterns"]["probes"] == ["pattern probes"]
    assert stand_in_scores["weights"]["tokens"] == "copy tokens"
    assert stand_in_scores["bootstrap"] == {"n": 200, "seed": 0}  # config.uncertainty
    assert (t["confidence"] == 1.0).all()  # every replicate keeps every head's attention role
    assert "ablation" not in stand_in_scores
    assert "ablation_text_dloss" not in t.columns


def test_classify_with_ablation_adds_columns(stand_in_scores):
    tax = classify(FakeModel(), ablation=True, progress=False)
    assert (tax.table["ablation_induction_dloss"] == 1).all()
    assert "ablation_text_dloss" in tax.table.columns
    assert tax.metadata["ablation"] is True
    assert stand_in_scores["ablation"]["config"].thresholds.induction == T.induction
    assert stand_in_scores["ablation"]["probes"] == {"induction": "ablation probe"}


def test_classify_loads_a_source_it_is_given(stand_in_scores, monkeypatch):
    import headclass.loading

    monkeypatch.setattr(headclass.loading, "load_model", lambda source: FakeModel())  # imported lazily
    tax = classify("some-alias", progress=False)
    assert len(tax) == 12


def test_classify_passes_probes_through(stand_in_scores):
    probe = object()
    classify(FakeModel(), probes=[probe], progress=False)
    assert stand_in_scores["patterns"]["probes"] == [probe]
    assert stand_in_scores["weights"]["tokens"] == "copy tokens"  # the rest still from the probe set


def test_classify_rejects_bad_config_before_scoring(stand_in_scores):
    with pytest.raises(ConfigError, match="thresholds.bos"):
        classify(FakeModel(), {"thresholds": {"bos": "high"}})
    assert not stand_in_scores


def test_taxonomy_holds_no_reference_to_the_model(stand_in_scores):
    model = FakeModel()
    ref = weakref.ref(model)
    tax = classify(model, progress=False)
    del model
    gc.collect()
    assert ref() is None
    assert len(tax.table) == 12


# -- config errors -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, key, words",
    [
        ({"thresholds": {"inducton": 0.5}}, "thresholds.inducton", "unknown key"),
        ({"thresholds": {"induction": "high"}}, "thresholds.induction", "number"),
        ({"thresholds": {"induction": 1.7}}, "thresholds.induction", "1.7"),
        ({"thresholds": {"copy_eigen": -1.5}}, "thresholds.copy_eigen", "-1.5"),
        ({"probes": {"repeated": {"segment_length": 1}}}, "probes.repeated.segment_length", "2"),
        ({"probes": {"batch_size": 2.5}}, "probes.batch_size", "integer"),
        ({"thresholds": 0.5}, "thresholds", "dictionary"),
        ({"colour": "red"}, "colour", "unknown key"),
    ],
)
def test_config_errors_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(override)
    message = str(info.value)
    assert key in message and words in message


def test_config_error_lists_every_problem():
    with pytest.raises(ConfigError) as info:
        load_config({"thresholds": {"induction": 2, "bos": -1}})
    assert "thresholds.induction" in str(info.value) and "thresholds.bos" in str(info.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("thresholds: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)
    good = tmp_path / "good.yaml"
    good.write_text("thresholds:\n  induction: 0.55\n")
    assert load_config(good).thresholds.induction == 0.55
    with pytest.raises(ConfigError, match="HeadclassConfig"):
        load_config(42)


def test_default_thresholds_are_in_the_shipped_yaml():
    import yaml

    shipped = yaml.safe_load(headclass.config.default_config_path().read_text())["thresholds"]
    assert set(shipped) == set(load_config().thresholds.model_dump())


def test_further_per_head_scores_become_extra_columns():
    scores = neutral_scores(2, 3)
    scores["ov_norm"] = torch.arange(6.0).reshape(2, 3)
    scores["writes_nothing"] = torch.zeros(2, 3, dtype=torch.bool)
    scores["spectrum"] = torch.zeros(2, 3, 8)  # not per head: ignored
    t = label_heads(scores)
    assert list(t.columns[-2:]) == ["ov_norm", "writes_nothing"]
    assert t["ov_norm"].dtype == "float64" and t["writes_nothing"].dtype == bool
    assert "spectrum" not in t.columns


def test_relabel_from_stored_scores_matches_labelling_anew():
    scores = random_scores(4, 5, seed=9)
    tax = HeadTaxonomy(label_heads(scores, model="r"), {"model": "r", "config": {"thresholds": {"bos": 0.5}}})
    again = tax.relabel({"induction": 0.2})
    expected = label_heads(scores, {"bos": 0.5, "induction": 0.2}, model="r")
    pd.testing.assert_frame_equal(again.table, expected)
    assert again.metadata["config"]["thresholds"]["induction"] == 0.2
    assert again.metadata["config"]["thresholds"]["bos"] == 0.5  # kept from the taxonomy
    assert tax.relabel(None).table["is_induction"].sum() <= again.table["is_induction"].sum()
    with pytest.raises(ConfigError, match="thresholds.induction"):
        tax.relabel({"induction": -3})
    partial = HeadTaxonomy(tax.table.iloc[:-1], tax.metadata)
    with pytest.raises(ScoreError, match="full grid"):
        partial.relabel(None)


def test_per_offset_scores_take_precedence_over_best_of_all_offsets():
    # what pattern_scores gives: the best over k = 1.. (here k = 1), plus the per-k means
    scores = neutral_scores(1, 1)
    scores["fixed_offset"] = torch.tensor([[0.9]])
    scores["fixed_offset_k"] = torch.tensor([[1]])
    scores["fixed_offset_per_k"] = torch.tensor([[[0.9, 0.05, 0.5, 0.0]]])
    r = label_heads(scores).iloc[0]
    assert r["fixed_offset"] == pytest.approx(0.5) and r["fixed_offset_k"] == 3 and r["is_fixed_offset"]


def test_a_head_that_writes_nothing_neither_copies_nor_suppresses():
    # a zero OV circuit: every logit ties, so both top-k scores can read 1
    scores = neutral_scores(1, 3)
    scores["copy_eigen"] = torch.tensor([[0.9, 0.0, 0.9]])
    scores["copy_topk"] = torch.tensor([[1.0, 1.0, 1.0]])
    scores["copy_suppression_topk"] = torch.tensor([[0.0, 1.0, 0.0]])
    scores["current_token"] = torch.tensor([[0.0, 1.0, 0.0]])
    scores["writes_nothing"] = torch.tensor([[True, True, False]])
    t = label_heads(scores)
    assert not t.loc[0, "is_copy"] and t.loc[0, "primary_label"] == UNCLASSIFIED
    assert not t.loc[1, "is_copy_suppression"] and t.loc[1, "primary_label"] == "current-token"
    assert t.loc[2, "is_copy"]
    m = label_margins(scores)
    assert m["copy"][0, 0] == -1.0 and m["copy-suppression"][0, 1] == -1.0
    # relabelling from the table keeps the rule (writes_nothing rides along as a column)
    tax = HeadTaxonomy(t, {"model": "model"})
    pd.testing.assert_frame_equal(tax.relabel(None).table, t)


# -- planted models: the real score modules on heads that do one known thing ----------------------
PLANTED_PRIMARY = {
    "previous_token": "previous-token",
    "current_token": "current-token",
    "bos": "bos",
    "diffuse": "diffuse",
    "induction": "induction",
    "duplicate_token": "duplicate-token",
    "fixed_offset": "fixed-offset",
}
# 64-token context, no tokenizer: repeated random tokens only, short enough to fit.
PLANTED_CONFIG = {"probes": {"repeated": {"n_sequences": 4, "segment_length": 24}}}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    model, roles = planted_attention_model(tmp_path_factory.mktemp("planted"))
    return classify(model, PLANTED_CONFIG, progress=False), roles


@pytest.mark.parametrize("role", sorted(PLANTED_PRIMARY))
def test_planted_head_gets_its_primary_label(planted, role):
    tax, roles = planted
    layer, head = roles[role]
    h = tax.head(layer, head)
    assert h["primary_label"] == PLANTED_PRIMARY[role], h["labels"]
    assert h["margin"] > 0.75  # near-perfect (diffuse: max attention ~ 1/keys on short probes)


def test_planted_model_labels_nothing_twice_by_accident(planted):
    tax, roles = planted
    t = tax.table
    assert len(t) == 8 and not t.duplicated(["layer", "head"]).any()
    # only the planted induction head is an induction head, etc.
    for role, label in PLANTED_PRIMARY.items():
        assert (t["primary_label"] == label).sum() >= 1
        if role != "current_token":  # the half-BOS-half-self head is also current-token
            assert t[flag_column(label)].sum() == 1, label
    layer, head = roles["fixed_offset"]
    assert tax.head(layer, head)["fixed_offset_k"] == 3
    assert not t["is_copy"].any() and not t["is_copy_suppression"].any()  # no head copies


def test_real_scores_keep_no_reference_to_the_model(tmp_path):
    model, roles = bos_only_model(tmp_path)
    refs = [weakref.ref(model), weakref.ref(model.tl_model)]
    tax = classify(model, PLANTED_CONFIG, progress=False)
    del model
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert set(tax.table["primary_label"]) == {"bos"}
    assert tax.metadata["n_layers"] == 1


# -- the real SmolLM2-135M ------------------------------------------------------------------------
# Smaller probes and token sample than the defaults: the same heads stand out, in a fraction of
# the time (the README demo uses the defaults).
SMOLLM2_CONFIG = {
    "probes": {"repeated": {"n_sequences": 8, "segment_length": 32}, "text": {"n_sequences": 8, "max_tokens": 64}},
    "weights": {"copy_sample_size": 500},
}


@pytest.fixture(scope="module")
def smollm2_taxonomy(smollm2):
    return classify(smollm2, SMOLLM2_CONFIG, progress=False)


@pytest.mark.smollm2
def test_smollm2_every_head_once(smollm2_taxonomy):
    t = smollm2_taxonomy.table
    assert len(t) == 270 == len(smollm2_taxonomy)
    assert not t.duplicated(["layer", "head"]).any()
    assert set(t["layer"]) == set(range(30)) and set(t["head"]) == set(range(9))
    assert list(t.columns[: len(TABLE_COLUMNS)]) == list(TABLE_COLUMNS)
    for label in CORE_LABELS:
        assert t[flag_column(label)].dtype == bool
    assert t[list(SCORE_COLUMNS)].drop(columns=["fixed_offset"]).notna().all().all()


@pytest.mark.smollm2
def test_smollm2_has_induction_and_previous_token_heads(smollm2_taxonomy):
    t = smollm2_taxonomy.table
    assert t["is_induction"].sum() >= 1
    assert t["is_previous_token"].sum() >= 1
    s = smollm2_taxonomy.summary().set_index("label")
    first_induction = s.loc["induction", "first_layer"]
    assert first_induction >= 1  # induction needs an earlier previous-token head
    assert s.loc["previous-token", "first_layer"] < first_induction


@pytest.mark.smollm2
def test_smollm2_metadata(smollm2_taxonomy):
    meta = smollm2_taxonomy.metadata
    assert meta["model"] == "smollm2-135m"
    assert (meta["n_layers"], meta["n_heads"]) == (30, 9)
    assert meta["n_params"] > 100_000_000
    assert meta["backend"] in ("bridge", "hooked")
    assert meta["config"]["probes"]["repeated"]["segment_length"] == 32


@pytest.mark.smollm2
def test_smollm2_json_round_trip(smollm2_taxonomy, tmp_path):
    from headclass.report.export import read_json

    back = read_json(smollm2_taxonomy.to_json(tmp_path / "smollm2.json"))
    pd.testing.assert_frame_equal(back.table, smollm2_taxonomy.table)
    assert back.metadata == smollm2_taxonomy.metadata


@pytest.mark.slow
def test_ablation_on_a_trained_toy_model_with_toy_config():
    """The ablation probes go through the same sizing step as the pattern probes (issue: the
    ablation's probe of 1 + 2 x 27 tokens once exceeded the toy's 32-token context)."""
    from headclass.toy import toy_config, toy_model

    model = headclass.load_model(toy_model(2, progress=False), name="toy-2l")
    tax = classify(model, toy_config(), ablation=True, progress=False)
    t = tax.table
    assert t["ablation_induction_dloss"].notna().all() and t["ablation_text_dloss"].notna().all()
    # the toy's induction head is the head the model needs most on repeated tokens
    # the heads the model needs most on repeated tokens are its induction circuit: the
    # previous-token head in layer 0 and the induction heads that read it
    top = t.loc[t["ablation_induction_dloss"].idxmax()]
    assert top["is_induction"] or top["is_previous_token"], t[
        ["layer", "head", "induction", "ablation_induction_dloss"]
    ]
    assert (t.loc[t["is_induction"], "ablation_induction_dloss"] > 0).all()


def _role_by_head(flags, margins, grids, t) -> np.ndarray:
    """The attention role as the rule states it, one head at a time (the reference)."""
    from headclass.taxonomy.rules import ATTENTION_ROLES, MIXED, SUBSUMES

    order = list(ATTENTION_ROLES)
    classes = [c for c in BUDGET_ROLE if c != "first"]
    out = np.empty(grids["copy_eigen"].shape, dtype=object)
    for i, j in np.ndindex(out.shape):
        held = [r for r in order if flags[r][i, j]]
        specific = [r for r in held if r not in FALLBACK_LABELS]
        specific = [r for r in specific if not any(r in SUBSUMES.get(p, ()) for p in held)]
        shares = sorted((np.nan_to_num(grids[f"free_{c}"][i, j], nan=0.0) for c in classes), reverse=True)
        mix = shares[1] >= t["mixed_min_share"] and shares[0] + shares[1] >= t["mixed_min_total"]
        margin = {r: np.nan_to_num(margins[r][i, j], nan=-1.0) for r in held}
        if len(specific) == 1:
            out[i, j] = specific[0]
        elif len(specific) >= 2:
            out[i, j] = MIXED
        elif held:
            out[i, j] = max(held, key=lambda r: (margin[r], -order.index(r)))
        else:
            out[i, j] = MIXED if mix else UNCLASSIFIED
    return out


def test_vectorised_attention_role_matches_the_rule_head_by_head():
    # The bootstrap decides every head's role for each replicate at once (_role_of); the table's
    # role comes from the same function. Both must be the rule applied head by head, ties included
    # (equal margins: the first role in order; NaN margins count as -1).
    from headclass.taxonomy.labelling import _attention_roles, _role_of, _role_parts
    from headclass.taxonomy.rules import ATTENTION_ROLES

    rng = np.random.default_rng(0)
    t = {"mixed_min_share": 0.2, "mixed_min_total": 0.5}
    seen = set()
    for trial in range(200):
        shape = (4, 6)
        flags = {r: rng.random(shape) < rng.choice([0.05, 0.2, 0.5]) for r in ATTENTION_ROLES}
        margins = {}
        for r in ATTENTION_ROLES:  # each role its own margins; few distinct values make ties common
            values = rng.choice([-1.0, 0.0, 0.5], size=shape) if trial % 3 == 0 else rng.normal(size=shape)
            margins[r] = np.where(rng.random(shape) < 0.1, np.nan, values)
        grids = {"copy_eigen": np.zeros(shape)}
        for c in BUDGET_ROLE:
            share = rng.choice([0.0, 0.2, 0.25, 0.3], size=shape) if trial % 2 else rng.random(shape) * 0.6
            grids[f"free_{c}"] = np.where(rng.random(shape) < 0.1, np.nan, share)
        expected = _role_by_head(flags, margins, grids, t)
        fast = _role_of(_role_parts(flags, margins, grids, t))
        assert (fast == expected).all(), trial
        assert (_attention_roles(flags, margins, grids, t)[0] == expected).all(), trial
        seen.update(expected.flatten().tolist())
    assert {"mixed", UNCLASSIFIED, "bos", "diffuse", "induction"} <= seen  # every branch taken
