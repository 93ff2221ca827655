"""Toy models (headclass.toy), and the known result they reproduce.

Olsson et al. 2022: induction heads need two attention layers. On toy attention-only models
trained on repeated random segments, :func:`headclass.report.compare.compare` must show no
induction head (score > 0.5) in the one-layer model, at least one in the two-layer model, and
the two-layer induction head's strongest K-composition partner must be a head labelled
previous-token (the circuit Olsson et al. and Elhage et al. 2021 describe).

The trained models are kept in the per-user cache (``$HEADCLASS_CACHE/toy``), so a run trains
each at most once and later runs none; a clean machine trains all three (about 1-2 min).
"""

from __future__ import annotations

import json

import pytest
import torch

import headclass
from headclass.errors import HeadclassError
from headclass.taxonomy import classify
from headclass.toy import (
    SPECIAL_TOKENS,
    ToySpec,
    _build_model,
    _forward,
    _segment_batch,
    repeated_segment_batch,
    toy_config,
    toy_model,
    toy_tokenizer,
    train_toy_model,
)

# -- data, tokenizer, model ---------------------------------------------------------------------


def test_batches_hold_one_segment_twice():
    generator = torch.Generator().manual_seed(0)
    tokens, predictable = _segment_batch(64, 32, 64, generator, 4)
    assert tokens.shape == predictable.shape == (64, 32)
    assert (tokens[:, 0] == 0).all()
    assert tokens[:, 1:].min() >= len(SPECIAL_TOKENS) and tokens.max() < 64
    for row, mask in zip(tokens, predictable):
        positions = mask.nonzero().squeeze(1)
        assert 3 <= len(positions) <= 14  # a segment of 4..15 tokens, less its first token
        assert (positions.diff() == 1).all()  # one contiguous stretch: the second copy
        start, length = int(positions[0]) - 1, len(positions) + 1
        copy = row[start : start + length]
        earlier = [s for s in range(1, start - length + 1) if torch.equal(row[s : s + length], copy)]
        assert earlier, "the second copy repeats nothing earlier"


def test_batches_are_seeded():
    a = repeated_segment_batch(8, 32, 64, torch.Generator().manual_seed(3))
    b = repeated_segment_batch(8, 32, 64, torch.Generator().manual_seed(3))
    c = repeated_segment_batch(8, 32, 64, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_tokenizer_is_character_level_with_exact_vocabulary():
    tok = toy_tokenizer(64)
    assert len(tok) == 64 and tok.bos_token_id == 0 and tok.unk_token_id == 1
    ids = tok("Hello, world.", add_special_tokens=False)["input_ids"]
    assert len(ids) == len("hello, world.") and 1 not in ids
    assert tok.decode(ids) == "hello, world."
    assert tok("~", add_special_tokens=False)["input_ids"] == [1]  # not in the alphabet: unknown
    assert len(toy_tokenizer(128)) == 128 and len(toy_tokenizer(16)) == 16


def test_model_is_attention_only_and_fast_forward_matches_transformers():
    spec = ToySpec(2, seq_len=32)
    model = _build_model(spec)
    for block in model.transformer.h:
        for param in block.mlp.parameters():
            assert not param.requires_grad and not param.any()
    tokens = repeated_segment_batch(4, 32, 64, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(_forward(model, tokens), model(tokens).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "field, value",
    [("n_layers", 0), ("d_model", 65), ("vocab_size", 3), ("seq_len", 8), ("lr", 0.0), ("min_segment", 1)],
)
def test_spec_errors_name_the_setting(field, value):
    with pytest.raises(HeadclassError, match=f"'{field}'"):
        ToySpec(**{"n_layers": 2, field: value}).check()


def test_unknown_setting_is_an_error(tmp_path):
    with pytest.raises(HeadclassError, match="train_toy_model got unknown settings \\['n_head'\\]"):
        train_toy_model(1, n_head=2, out_dir=tmp_path / "m", progress=False)
    with pytest.raises(HeadclassError, match="toy_model got unknown settings \\['layers'\\]"):
        toy_model(1, layers=2, cache_dir=tmp_path)


def test_cache_key_covers_every_setting():
    assert ToySpec(2).key() == ToySpec(2).key()
    assert len({ToySpec(2).key(), ToySpec(2, seed=1).key(), ToySpec(2, steps=10).key(), ToySpec(3).key()}) == 4


# -- training, saving, caching ------------------------------------------------------------------


def test_same_seed_same_weights(tmp_path):
    a = train_toy_model(2, steps=15, seed=5, out_dir=tmp_path / "a", progress=False)
    b = train_toy_model(2, steps=15, seed=5, out_dir=tmp_path / "b", progress=False)
    c = train_toy_model(2, steps=15, seed=6, out_dir=tmp_path / "c", progress=False)
    from safetensors.torch import load_file

    wa, wb, wc = (load_file(str(f / "model.safetensors")) for f in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_saved_folder_loads_with_tokenizer_and_spec(tmp_path):
    folder = train_toy_model(2, steps=5, out_dir=tmp_path / "toy", progress=False)
    record = json.loads((folder / "toy_spec.json").read_text())
    assert record["spec"]["n_layers"] == 2 and record["spec"]["steps"] == 5
    model = headclass.load_model(folder)
    assert (model.n_layers, model.n_heads, model.d_model, model.d_vocab, model.n_ctx) == (2, 2, 64, 64, 32)
    assert model.bos_token_id == 0 and model.prepends_bos
    ids = model.to_tokens("the cat")[0]
    assert ids[0] == 0 and len(ids) == 1 + len("the cat")
    with pytest.raises(HeadclassError, match="already holds a model"):
        train_toy_model(2, steps=5, out_dir=folder, progress=False)


def test_toy_model_trains_once_then_reads_the_cache(tmp_path, monkeypatch):
    first = toy_model(1, cache_dir=tmp_path, steps=5, progress=False)
    assert (first / "config.json").is_file() and first.parent == tmp_path
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the model is cached")

    monkeypatch.setattr("headclass.toy.train_toy_model", no_training)
    assert toy_model(1, cache_dir=tmp_path, steps=5, progress=False) == first
    with pytest.raises(AssertionError, match="trained again"):
        toy_model(1, cache_dir=tmp_path, steps=6, progress=False)  # other settings, other model


def test_toy_config_fits_the_context():
    cfg = headclass.load_config(toy_config(32))
    assert 1 + 2 * cfg.probes.repeated.segment_length <= 32
    assert cfg.probes.text.max_tokens == 32 and cfg.ablation.induction_segment_length <= 15
    with pytest.raises(HeadclassError, match="does not fit"):
        toy_config(32, segment_length=16)


# -- the known result: induction heads need two layers ------------------------------------------


@pytest.fixture(scope="session")
def toy_models():
    """Folders of the trained 1-, 2- and 3-layer toy models (default settings, user cache)."""
    return {n: toy_model(n, progress=False) for n in (1, 2, 3)}


@pytest.fixture(scope="session")
def toy_comparison(toy_models):
    from headclass.report.compare import compare

    taxonomies = [
        classify(headclass.load_model(folder, name=f"toy-{n}l"), toy_config(), progress=False)
        for n, folder in toy_models.items()
    ]
    return compare(taxonomies)


@pytest.mark.slow
def test_one_layer_model_has_no_induction_head(toy_comparison):
    table = toy_comparison.taxonomies["toy-1l"].table
    assert table["induction"].max() <= 0.5, table[["layer", "head", "induction"]]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["toy-2l", "toy-3l"])
def test_deeper_models_have_induction_heads(toy_comparison, name):
    table = toy_comparison.taxonomies[name].table
    assert (table["induction"] > 0.5).any(), table[["layer", "head", "induction"]]
    assert table.loc[table["induction"] > 0.5, "layer"].min() >= 1  # never in layer 0
    assert toy_comparison.counts_per_label().loc[name, "induction"] >= 1


@pytest.mark.slow
def test_two_layer_induction_head_reads_a_previous_token_head(toy_models, toy_comparison):
    from headclass.scores.composition import composition_scores, top_k_composition_partners

    table = toy_comparison.taxonomies["toy-2l"].table
    best = table.loc[table["induction"].idxmax()]
    model = headclass.load_model(toy_models[2])
    partners = top_k_composition_partners(
        composition_scores(model, kinds="k"), int(best["layer"]), int(best["head"]), kind="k", n=1
    )
    partner = table.set_index(["layer", "head"]).loc[(int(partners["layer"][0]), int(partners["head"][0]))]
    assert bool(partner["is_previous_token"]), (partners, partner[["previous_token", "labels"]])


# -- checkpoints and the in-context loss ----------------------------------------------------------


def test_checkpoints_change_nothing_about_training(tmp_path):
    from safetensors.torch import load_file

    from headclass.toy import toy_checkpoints

    plain = train_toy_model(2, steps=20, out_dir=tmp_path / "plain", progress=False)
    saved = train_toy_model(
        2, steps=20, checkpoint_every=10, checkpoints=[5], out_dir=tmp_path / "ckpt", progress=False
    )
    found = toy_checkpoints(saved)
    assert [step for step, _ in found] == [0, 5, 10, 20]
    assert all(path == saved / "checkpoints" / f"step-{step}" for step, path in found)
    final, last = load_file(str(plain / "model.safetensors")), load_file(str(found[-1][1] / "model.safetensors"))
    ours = load_file(str(saved / "model.safetensors"))
    assert all(torch.equal(final[k], ours[k]) and torch.equal(final[k], last[k]) for k in final)
    first = load_file(str(found[0][1] / "model.safetensors"))
    assert not all(torch.equal(first[k], final[k]) for k in final)  # step 0 is the initialisation
    record = json.loads((found[1][1] / "toy_spec.json").read_text())
    assert record["step"] == 5 and record["spec"]["steps"] == 20
    model = headclass.load_model(found[1][1])
    assert model.n_layers == 2 and model.bos_token_id == 0
    assert toy_checkpoints(plain) == []
    assert not [p for p in saved.rglob(".*")], "staging folders left behind"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"checkpoint_every": 0}, "'checkpoint_every'"),
        ({"checkpoints": [21]}, "'checkpoints'"),
        ({"checkpoints": [-1]}, "'checkpoints'"),
    ],
)
def test_checkpoint_settings_are_checked(tmp_path, kwargs, message):
    with pytest.raises(HeadclassError, match=message):
        train_toy_model(1, steps=20, out_dir=tmp_path / "m", progress=False, **kwargs)


def test_toy_model_with_checkpoints_is_cached_apart(tmp_path):
    from headclass.toy import toy_checkpoints

    plain = toy_model(1, cache_dir=tmp_path, steps=4, progress=False)
    saved = toy_model(1, cache_dir=tmp_path, steps=4, checkpoint_every=2, progress=False)
    assert plain != saved and plain.name == ToySpec(1, steps=4).folder_name()  # the old key still works
    assert [s for s, _ in toy_checkpoints(saved)] == [0, 2, 4] and toy_checkpoints(plain) == []
    assert toy_model(1, cache_dir=tmp_path, steps=4, checkpoint_every=2, progress=False) == saved


@pytest.mark.slow
def test_in_context_loss_is_negative_once_induction_heads_exist(toy_models):
    from headclass.toy import in_context_loss

    losses = {n: in_context_loss(headclass.load_model(folder), toy_config(32)) for n, folder in toy_models.items()}
    untrained = headclass.load_model(train_toy_model(2, steps=1, out_dir=None, progress=False))
    assert abs(in_context_loss(untrained, toy_config(32))) < 0.2  # no learning: both copies equally hard
    assert losses[2] < -4 and losses[3] < -4, losses  # the second copy is predicted by induction
    assert losses[1] > losses[2] + 2, losses  # one layer: no induction, far less in-context learning
