"""Qwen2 architecture: grouped-query attention (6 query / 2 key-value heads), q/k/v biases, rotary.

A tiny Qwen2 built from its config: the expanded per-head weights are the checkpoint's own
(RMSNorm folded in) and the attention patterns equal transformers' eager attention within 1e-5.
``make test`` runs this folder under both TransformerLens generations.
"""

from __future__ import annotations

import torch

import headclass


def test_qwen2_gqa_weights_and_biases_are_expanded_per_query_head(tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM

    model = headclass.load_model(tiny_qwen2_dir)
    assert (model.n_layers, model.n_heads, model.n_key_value_heads, model.d_head) == (2, 6, 2, 16)
    assert model.W_pos is None and model.positional_embedding_type == "rotary"
    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir)
    d, group = model.d_head, model.n_heads // model.n_key_value_heads
    for layer, block in enumerate(hf.model.layers):
        norm = block.input_layernorm.weight.detach()  # RMSNorm weight folded into W_Q / W_K / W_V
        attn = block.self_attn
        for head in range(model.n_heads):
            kv = head // group  # heads 0-2 share kv head 0, heads 3-5 kv head 1
            q_rows = slice(head * d, (head + 1) * d)
            kv_rows = slice(kv * d, (kv + 1) * d)
            torch.testing.assert_close(
                model.W_Q[layer, head], norm[:, None] * attn.q_proj.weight.detach()[q_rows].T, atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(
                model.W_K[layer, head], norm[:, None] * attn.k_proj.weight.detach()[kv_rows].T, atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(
                model.W_V[layer, head], norm[:, None] * attn.v_proj.weight.detach()[kv_rows].T, atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(model.b_Q[layer, head], attn.q_proj.bias.detach()[q_rows], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model.b_K[layer, head], attn.k_proj.bias.detach()[kv_rows], atol=1e-5, rtol=1e-5)


def test_qwen2_patterns_equal_transformers_eager_attention(tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(1, 128, (3, 19), generator=torch.Generator().manual_seed(0))
    model = headclass.load_model(tiny_qwen2_dir)
    ours: dict[int, torch.Tensor] = {}
    model.run_with_patterns(tokens, lambda layer, p: ours.__setitem__(layer, p.clone()))
    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = hf(tokens, output_attentions=True).attentions
    assert sorted(ours) == list(range(len(theirs))) == [0, 1]
    for layer, pattern in ours.items():
        assert pattern.shape == (3, 6, 19, 19)
        assert pattern.max() > 0.5  # sharp enough that a wrong head mapping would show
        torch.testing.assert_close(pattern, theirs[layer], atol=1e-5, rtol=0)


def test_query_heads_share_key_value_heads_in_equal_groups():
    import pytest

    from headclass.loading.head_model import expand_kv_heads, query_heads_per_kv_head

    assert query_heads_per_kv_head(6, 2) == 3  # tiny Qwen2: heads 0-2 read kv head 0
    assert query_heads_per_kv_head(14, 2) == 7  # Qwen2.5-0.5B
    assert query_heads_per_kv_head(12, 12) == 1  # no grouped-query attention
    with pytest.raises(ValueError, match="n_heads=6 is not a multiple of n_key_value_heads=4"):
        query_heads_per_kv_head(6, 4)
    per_kv = torch.tensor([10, 20])
    assert expand_kv_heads(per_kv, 6).tolist() == [10, 10, 10, 20, 20, 20]
    stacked = torch.stack([per_kv, per_kv + 1])  # [layer, kv_head]
    assert expand_kv_heads(stacked, 6, dim=1).tolist() == [[10, 10, 10, 20, 20, 20], [11, 11, 11, 21, 21, 21]]
    assert expand_kv_heads(stacked, 2, dim=1) is stacked  # no grouping: no copy
