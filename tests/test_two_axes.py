"""Every head described on two axes: where it attends (attention role) and what it writes
(output role), with the attention budget and uncertainty behind them.

Ground truth by construction: the planted models of ``tests/planted.py`` (a head per role, its
weights making it exactly that), then the real SmolLM2-135M.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from planted import planted_attention_model, planted_roles_model

import headclass
from headclass import probes
from headclass.scores.patterns import BUDGET_CLASSES
from headclass.taxonomy import ATTENTION_ROLES, OUTPUT_ROLES, classify

SECOND_CORPUS = Path(__file__).resolve().parent / "data" / "second_corpus.txt"


@pytest.fixture(scope="module")
def roles_taxonomy(tmp_path_factory):
    """The planted roles, probed with repeated tokens only: the shipped English corpus through
    the planted 32-word vocabulary is mostly <unk>, whose repeats would claim the budget's
    earlier classes (duplicate, induction) before delimiters. The rules then read the
    repeated-token budget, as for any model without text."""
    model, roles = planted_roles_model(tmp_path_factory.mktemp("planted-roles"))
    with pytest.warns(headclass.HeadclassWarning):  # the 64-token context shrinks the probes
        built = probes.build_probe_set(model)
    return classify(model, probes=dataclasses.replace(built, text=None), progress=False), roles


@pytest.fixture(scope="module")
def attention_taxonomy(tmp_path_factory):
    model, roles = planted_attention_model(tmp_path_factory.mktemp("planted-attention"))
    config = {"probes": {"repeated": {"n_sequences": 4, "segment_length": 24}}}
    return classify(model, config, progress=False), roles


@pytest.mark.parametrize(
    "role, axis, expected",
    [
        ("previous_token", "attention_role", "previous-token"),
        ("local", "attention_role", "local"),
        ("delimiter", "attention_role", "delimiter"),
        ("content", "attention_role", "content"),
        ("transform", "output_role", "transform"),
        ("successor", "output_role", "successor"),
        ("noop", "output_role", "no-op"),
        ("copy", "output_role", "copy"),
    ],
)
def test_each_planted_head_gets_its_role_on_its_axis(roles_taxonomy, role, axis, expected):
    tax, roles = roles_taxonomy
    head = tax.head(*roles[role])
    assert head[axis] == expected, {k: head[k] for k in ("attention_role", "attention_roles", "output_role")}


@pytest.mark.parametrize(
    "role, expected",
    [
        ("previous_token", "previous-token"),
        ("current_token", "current-token"),
        ("bos", "bos"),
        ("diffuse", "diffuse"),
        ("induction", "induction"),
        ("duplicate_token", "duplicate-token"),
        ("fixed_offset", "fixed-offset"),
    ],
)
def test_existing_planted_heads_keep_their_roles(attention_taxonomy, role, expected):
    tax, roles = attention_taxonomy
    head = tax.head(*roles[role])
    assert head["attention_role"] == expected and head["primary_label"] == expected


def test_the_no_op_head_keeps_a_sharp_pattern(roles_taxonomy):
    tax, roles = roles_taxonomy
    head = tax.head(*roles["noop"])
    assert head["output_role"] == "no-op" and head["attention_role"] == "previous-token"


def test_budgets_match_the_construction(roles_taxonomy, attention_taxonomy):
    tax, roles = attention_taxonomy
    prev = tax.head(*roles["previous_token"])
    assert prev["budget_rep_previous"] > 0.9
    assert tax.head(*roles["bos"])["budget_rep_first"] > 0.9
    assert tax.head(*roles["current_token"])["budget_rep_self"] > 0.9
    # half the queries (the second repeat) have an induction target, and take it all
    assert tax.head(*roles["induction"])["budget_rep_induction"] > 0.45
    tax, roles = roles_taxonomy
    local = tax.head(*roles["local"])  # uniform over offsets 1..3
    assert local["budget_rep_local"] + local["budget_rep_previous"] > 0.9 and local["budget_rep_local"] > 0.6
    delimiter = tax.head(*roles["delimiter"])
    assert delimiter["budget_rep_delimiter"] > 0.5 and delimiter["budget_rep_lift_delimiter"] > 2


def test_every_head_has_both_roles(roles_taxonomy, attention_taxonomy):
    for tax, _ in (roles_taxonomy, attention_taxonomy):
        t = tax.table
        assert t["attention_role"].isin(ATTENTION_ROLES + ("mixed", "unclassified")).all()
        assert t["output_role"].isin(OUTPUT_ROLES).all()
        assert t["confidence"].between(0, 1).all()


def test_planted_taxonomy_is_the_same_with_batch_size_1_and_16(tmp_path):
    model, _ = planted_attention_model(tmp_path)
    config = {"probes": {"repeated": {"n_sequences": 4, "segment_length": 24}}}
    one = classify(model, {**config, "probes": {**config["probes"], "batch_size": 1}}, progress=False).table
    many = classify(model, {**config, "probes": {**config["probes"], "batch_size": 16}}, progress=False).table
    assert one[["attention_role", "attention_roles", "output_role", "primary_label", "labels"]].equals(
        many[["attention_role", "attention_roles", "output_role", "primary_label", "labels"]]
    )
    numeric = [c for c in one.columns if one[c].dtype == np.float64]
    np.testing.assert_allclose(one[numeric].to_numpy(), many[numeric].to_numpy(), rtol=1e-5, atol=1e-6)


def test_relabel_covers_the_new_rules(roles_taxonomy):
    tax, roles = roles_taxonomy
    strict = tax.relabel({"local": 0.99, "no_op_max_gain": 0.0})
    assert strict.head(*roles["local"])["attention_role"] != "local"
    assert strict.head(*roles["noop"])["output_role"] != "no-op"
    assert tax.relabel({}).table[["attention_role", "output_role"]].equals(tax.table[["attention_role", "output_role"]])


# -- the real SmolLM2-135M, default probes -------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_roles(smollm2):
    return classify(smollm2, progress=False)


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_every_head_described(smollm2_roles):
    t = smollm2_roles.table
    assert len(t) == 270
    assert t["output_role"].isin(OUTPUT_ROLES).all()
    assert t["attention_role"].notna().all()
    described = (t["attention_role"] != "unclassified").mean()
    assert described >= 0.85, t["attention_role"].value_counts()


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_budgets_sum_to_one(smollm2_roles):
    t = smollm2_roles.table
    for prefix in ("budget", "budget_rep"):
        total = t[[f"{prefix}_{c}" for c in BUDGET_CLASSES]].sum(axis=1)
        assert np.abs(total - 1).max() < 1e-4, prefix


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_roles_are_stable_across_seeds_and_texts(smollm2, smollm2_roles):
    base = smollm2_roles.table["attention_role"]
    fast = {"uncertainty": {"bootstrap": 0}}
    roles = [base]
    for seed in (1, 2):
        roles.append(classify(smollm2, {"probes": {"seed": seed}, **fast}, progress=False).table["attention_role"])
    same = np.logical_and.reduce([r == base for r in roles[1:]])
    assert same.mean() >= 0.95, f"{same.mean():.3f} of heads keep their role across 3 seeds"

    paragraphs = [" ".join(p.split()) for p in SECOND_CORPUS.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    built = probes.build_probe_set(smollm2)
    other = dataclasses.replace(built, text=probes.text(smollm2, paragraphs, max_tokens=128))
    second = classify(smollm2, fast, probes=other, progress=False).table["attention_role"]
    agree = (second == base).mean()
    assert agree >= 0.95, f"{agree:.3f} of heads keep their role on a second English text"


def test_role_counts_cover_every_head_once_per_axis(roles_taxonomy):
    tax, _ = roles_taxonomy
    counts = tax.role_counts()
    for axis in ("attention", "output"):
        part = counts[counts["axis"] == axis]
        assert part["count"].sum() == len(tax) and part["fraction"].sum() == pytest.approx(1.0)
    column = tax.table["attention_role"]
    row = counts[(counts["axis"] == "attention") & (counts["role"] == "local")].iloc[0]
    assert row["count"] == (column == "local").sum() and 0 <= row["mean_confidence"] <= 1
