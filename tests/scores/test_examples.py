"""The evidence behind the head cards (headclass.scores.examples), on planted heads.

Ground truth from tests/planted.py: the previous-token head's examples are all at offset 1; the
induction head's examples point at the token after the previous occurrence of the query's token
(the probe's ``induction_target``); the copy head raises the token it reads first; the examples
are a bounded top-k merged over chunks (chunking never changes them).
"""

from __future__ import annotations

import pytest
import torch
from planted import planted_attention_model, planted_roles_model

from headclass import probes as hp
from headclass.scores.examples import (
    ExampleCollector,
    composition_partners,
    head_evidence,
    head_key,
    ov_token_effects,
)
from headclass.scores.patterns import pattern_measurement


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_attention_model(tmp_path_factory.mktemp("planted-examples"))


@pytest.fixture(scope="module")
def roles_model(tmp_path_factory):
    return planted_roles_model(tmp_path_factory.mktemp("planted-roles-examples"))


def collect(model, probe, batch_size=4, **kwargs):
    collector = ExampleCollector([probe], model.n_layers, model.n_heads, **kwargs)
    pattern_measurement(model, [probe], batch_size=batch_size, progress=False, observers=[collector])
    return collector


@pytest.fixture(scope="module")
def repeated_probe(planted):
    model, _ = planted
    return hp.repeated(model, n_sequences=6, segment_length=20, seed=1)


def test_previous_token_examples_are_all_at_offset_one(planted, repeated_probe):
    model, roles = planted
    examples = collect(model, repeated_probe).examples(*roles["previous_token"])["repeated"]
    assert len(examples) == 5
    for ex in examples:
        assert ex["offset"] == 1 and ex["key"] == ex["query"] - 1 and ex["relation"] == "previous"
        assert ex["weight"] > 0.99 and ex["query"] >= 1 and ex["key"] >= 1


def test_induction_examples_point_at_the_token_after_the_previous_occurrence(planted, repeated_probe):
    model, roles = planted
    examples = collect(model, repeated_probe).examples(*roles["induction"])["repeated"]
    assert examples
    for ex in examples:
        target = int(repeated_probe.induction_target[ex["seq"], ex["query"]])
        assert target >= 0 and ex["key"] == target, ex
        assert ex["relation"] == "induction" and ex["weight"] > 0.99
        tokens = repeated_probe.tokens[ex["seq"]]
        assert int(tokens[ex["key"] - 1]) == ex["query_token"] == int(tokens[ex["query"]])
        assert ex["prefers"][0][0] == ex["key"]  # what the query looks for


def test_examples_skip_the_first_position_and_carry_their_context(planted, repeated_probe):
    model, roles = planted
    collector = collect(model, repeated_probe)
    bos = collector.examples(*roles["bos"])["repeated"]
    assert all(ex["key"] >= 1 and ex["weight"] < 1e-3 for ex in bos)  # nothing away from BOS
    ex = collector.examples(*roles["previous_token"])["repeated"][0]
    tokens = repeated_probe.tokens[ex["seq"]].tolist()
    for start, ids in ex["context"]:
        assert ids == tokens[start : start + len(ids)]
    positions = [start + i for start, ids in ex["context"] for i in range(len(ids))]
    assert ex["query"] in positions and ex["key"] in positions
    assert min(positions) == max(0, ex["key"] - 8) and max(positions) == min(len(tokens) - 1, ex["query"] + 8)


def test_top_k_is_bounded_and_independent_of_chunking(planted, repeated_probe):
    model, roles = planted
    one = collect(model, repeated_probe, batch_size=6, n_examples=3)
    many = collect(model, repeated_probe, batch_size=1, n_examples=3)
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            a = one.examples(layer, head)["repeated"]
            b = many.examples(layer, head)["repeated"]
            assert len(a) == len(b) == 3
            assert [x["weight"] for x in a] == pytest.approx([x["weight"] for x in b], abs=1e-6)
    assert one._top[("repeated", 0)]["weight"].shape == (model.n_heads, 3)  # never more than k kept


def test_copy_head_raises_its_own_token_first(roles_model):
    model, roles = roles_model
    tokens = torch.tensor([15, 16, 17, 18, 12, 5])
    effects, embedding = ov_token_effects(model, tokens)
    assert embedding == "effective"  # the planted GPT-2 has a (zero) first MLP
    for effect in effects[roles["copy"]]:
        assert effect["raises"][0][0] == effect["source"]
        assert effect["raises"][0][1] > effect["raises"][1][1]
    noop = effects[roles["noop"]]
    assert max(abs(v) for e in noop for _, v in e["raises"]) < 1e-2  # writes (almost) nothing


def test_induction_head_k_composes_with_the_previous_token_head(planted):
    model, roles = planted
    partners = composition_partners(model, n=2)
    assert partners[roles["induction"]]["k"][0][:2] == list(roles["previous_token"])
    assert partners[(0, 0)] == {"q": [], "k": [], "v": []}  # no earlier heads


def test_evidence_document_is_plain_json(planted, repeated_probe):
    import json

    model, roles = planted
    doc = head_evidence(model, collect(model, repeated_probe))
    assert json.loads(json.dumps(doc)) == doc
    assert set(doc["heads"]) == {head_key(la, h) for la in range(model.n_layers) for h in range(model.n_heads)}
    assert doc["composition"] == {"computed": True, "reason": ""}
    pattern = doc["heads"][head_key(*roles["previous_token"])]["pattern"]
    assert len(pattern) == 16 and [len(r) for r in pattern] == list(range(1, 17))
    assert pattern[5][4] == pytest.approx(1.0, abs=1e-3)
    every_id = {int(i) for i in doc["tokens"]}
    assert set(doc["pattern_prompt"]["tokens"]) <= every_id
    off = head_evidence(model, collect(model, repeated_probe), composition=False)
    assert off["composition"]["computed"] is False and "not computed" in off["composition"]["reason"]
    assert all(h["composition"] is None for h in off["heads"].values())


def test_composition_is_skipped_honestly_when_too_costly(planted, repeated_probe, monkeypatch):
    from headclass.report.cards import HeadCard
    from headclass.scores import examples

    model, roles = planted
    monkeypatch.setattr(examples, "COMPOSITION_MAX_FLOPS", 1.0)
    doc = head_evidence(model, collect(model, repeated_probe))
    assert doc["composition"]["computed"] is False
    assert "not computed" in doc["composition"]["reason"] and "COMPOSITION_MAX_FLOPS" in doc["composition"]["reason"]
    layer, head = roles["induction"]
    row = {"layer": layer, "head": head, "attention_role": "induction", "output_role": "no-op"}
    card = HeadCard(row, doc["heads"][head_key(layer, head)], document=doc)
    assert "not computed" in card.to_html()


@pytest.mark.parametrize("screen", [torch.float32, torch.bfloat16])
def test_ov_effects_of_a_bfloat16_model_are_float32_ranks_whatever_the_screen(monkeypatch, screen):
    """A bfloat16 ``W_U`` is read block by block (upcast for a float32 screen, as on CPUs
    without bfloat16 hardware); either way the candidates are ranked again in float32, so
    both screens name the same tokens and values."""
    from types import SimpleNamespace

    from headclass.scores import examples

    g = torch.Generator().manual_seed(3)
    d, vocab, heads = 32, 40000, 2  # more than one vocabulary block
    W_E = torch.randn(vocab, d, generator=g).bfloat16()
    model = SimpleNamespace(
        n_layers=1,
        n_heads=heads,
        W_E=W_E,
        W_U=W_E.T,  # a transposed view, as the bridge's tied unembedding
        W_V=(torch.randn(1, heads, d, 8, generator=g) / d**0.5).bfloat16(),
        W_O=torch.randn(1, heads, 8, d, generator=g).bfloat16(),
    )
    tokens = torch.tensor([5, 17, 39999])
    monkeypatch.setattr(examples, "_screen_dtype", lambda device: screen)
    effects, embedding = ov_token_effects(model, tokens, n=3)
    monkeypatch.setattr(examples, "_screen_dtype", lambda device: torch.float32)
    reference, _ = ov_token_effects(model, tokens, n=3)
    assert embedding == "W_E" and effects == reference
    # and the float32 ranks of the whole vocabulary, computed here directly
    x = W_E[tokens].float()
    x = x - x.mean(-1, keepdim=True)
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    logits = (x @ model.W_V[0, 1].float() @ model.W_O[0, 1].float()) @ model.W_U.float()
    assert [e["raises"][0][0] for e in effects[0, 1]] == logits.argmax(1).tolist()
    assert [e["lowers"][0][0] for e in effects[0, 1]] == logits.argmin(1).tolist()


@pytest.mark.parametrize("screen", [torch.float32, torch.bfloat16])
def test_ov_effects_ranked_in_chunks_of_layers_and_rows_are_each_heads_own(monkeypatch, screen):
    """Every layer's rows meet the vocabulary together, in chunks of layers, of rows and of
    candidates when the byte budgets say so: each head's lists are still the float32 ranks of
    its own logits, and the chunking changes no token."""
    from types import SimpleNamespace

    from headclass.scores import examples

    g = torch.Generator().manual_seed(5)
    d, vocab, layers, heads = 32, 20000, 3, 2  # two vocabulary blocks, the second ragged
    model = SimpleNamespace(
        n_layers=layers,
        n_heads=heads,
        W_E=torch.randn(vocab, d, generator=g),
        W_U=torch.randn(d, vocab, generator=g),  # its own contiguous [d_model, vocab] matrix
        W_V=torch.randn(layers, heads, d, 8, generator=g) / d**0.5,
        W_O=torch.randn(layers, heads, 8, d, generator=g),
    )
    tokens = torch.tensor([3, 1000, 19999])
    monkeypatch.setattr(examples, "_screen_dtype", lambda device: screen)
    whole, _ = ov_token_effects(model, tokens, n=4)
    monkeypatch.setattr(examples, "_EFFECT_ROWS_BYTES", 4 * heads * 3 * d * 2)  # two layers a chunk: [0, 1], [2]
    monkeypatch.setattr(examples, "_EFFECT_LOGIT_BYTES", 2 * examples._VOCAB_BLOCK * 5)  # 5 rows a product
    monkeypatch.setattr(examples, "_EXACT_BYTES", 4 * 16 * d * 3)  # 3 rows of 16 candidates at a time
    chunked, _ = ov_token_effects(model, tokens, n=4)
    for key, effects in whole.items():  # the same tokens; values up to float32 sums' order
        for ours, theirs in zip(chunked[key], effects):
            for kind in ("raises", "lowers"):
                assert [i for i, _ in ours[kind]] == [i for i, _ in theirs[kind]]
                assert [v for _, v in ours[kind]] == pytest.approx([v for _, v in theirs[kind]], abs=2e-4)
    x = model.W_E[tokens]
    x = x - x.mean(-1, keepdim=True)
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    for layer in range(layers):
        for head in range(heads):
            logits = (x @ model.W_V[layer, head] @ model.W_O[layer, head]) @ model.W_U  # [source, vocab]
            centred = logits - logits.mean(-1, keepdim=True)
            for s, effect in enumerate(chunked[layer, head]):
                assert effect["source"] == int(tokens[s])
                up, down = centred[s].topk(4), (-centred[s]).topk(4)
                assert [i for i, _ in effect["raises"]] == up.indices.tolist()
                assert [i for i, _ in effect["lowers"]] == down.indices.tolist()
                assert [v for _, v in effect["raises"]] == pytest.approx(up.values.tolist(), abs=2e-4)
                assert [v for _, v in effect["lowers"]] == pytest.approx((-down.values).tolist(), abs=2e-4)
