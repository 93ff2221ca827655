"""``HeadModel.n_params`` counts the model as published: a tied embedding once."""

from __future__ import annotations

import headclass


def test_tied_embedding_is_counted_once(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64)  # tied
    hf = GPT2LMHeadModel(config)
    hf.save_pretrained(tmp_path / "tied")
    model = headclass.load_model(tmp_path / "tied")
    assert model.n_params == hf.num_parameters()  # transformers counts shared tensors once


def test_untied_embedding_is_counted_twice(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64, tie_word_embeddings=False)
    hf = GPT2LMHeadModel(config)
    hf.save_pretrained(tmp_path / "untied")
    model = headclass.load_model(tmp_path / "untied")
    assert model.n_params == hf.num_parameters()


def test_smollm2_has_its_published_size(smollm2):
    # SmolLM2-135M ties its embedding: 134.5M, not the 162.8M of the processed modules
    assert smollm2.n_params == 134_515_008
