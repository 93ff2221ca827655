"""Composition scores: TransformerLens' reference, causal layout, planted K-composition, partners."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from test_weights import centred_basis  # directions that survive TransformerLens' centring

import headclass
from headclass.errors import ScoreError
from headclass.scores.composition import composition_scores, top_k_composition_partners

D_MODEL, N_HEADS, D_HEAD = 64, 4, 16


def reference(model, mode: str) -> torch.Tensor:
    """TransformerLens' own ``all_composition_scores`` (HookedTransformer or TransformerBridge)."""
    scores = model.tl_model.all_composition_scores(mode)
    return getattr(scores, "scores", scores)  # the bridge wraps the tensor in CompositionScores


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_equal_to_transformer_lens(fixture, request):
    model = request.getfixturevalue(fixture)  # tiny_llama: grouped-query attention
    ours = composition_scores(model)
    assert set(ours) == {"q", "k", "v"}
    for kind, values in ours.items():
        expected = reference(model, kind.upper())
        assert values.shape == (model.n_layers, model.n_heads, model.n_layers, model.n_heads)
        torch.testing.assert_close(values, expected.float(), atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    return headclass.load_model(tiny_llama_dir)


def test_causal_layout_and_blocking(tmp_path):
    from conftest import save_tiny_gpt2

    from headclass.scores.composition import _Packer

    model = headclass.load_model(save_tiny_gpt2(tmp_path / "four", n_layer=4, seed=5))
    whole = composition_scores(model)
    # A budget too small for more than one later layer per pass: same numbers, more passes.
    blocked = composition_scores(model, kinds=["K", "v"], memory_bytes=1)
    for kind in ("k", "v"):
        torch.testing.assert_close(blocked[kind], whole[kind], atol=1e-6, rtol=1e-5)
    # Two later layers per pass against groups of two earlier layers (the last group short):
    # passes over layers 1-2 and 3, earlier layers [0, 1], then [0, 1] and [2].
    layer_bytes = model.n_heads * _Packer(model.d_model).size * 4  # one packed layer
    grouped = composition_scores(model, kinds=["K", "v"], memory_bytes=int(6.5 * layer_bytes))
    for kind in ("k", "v"):
        torch.testing.assert_close(grouped[kind], whole[kind], atol=1e-6, rtol=1e-5)
    later = torch.arange(4)[:, None] < torch.arange(4)[None, :]  # [layer_a, layer_b]
    mask = later[:, None, :, None].expand(4, N_HEADS, 4, N_HEADS)
    for values in whole.values():
        assert (values[~mask] == 0).all()
        assert (values[mask] > 0).all() and (values <= 1).all()


@pytest.fixture(scope="module")
def planted_k_pair():
    """L0H2 writes into a 4-dimensional subspace S (W_OV = projection onto S); L1H1's keys read
    only S (W_K = basis of S). Its K-composition score is 1/sqrt(4) = 0.5; random pairs ~0.1."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(11)
    hf = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2, n_head=N_HEADS, n_embd=D_MODEL, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
        )
    )
    subspace = torch.zeros(D_MODEL, D_HEAD)
    subspace[:, :4] = centred_basis(D_MODEL, 4, seed=12)
    with torch.no_grad():
        a = hf.transformer.h[0].attn
        a.c_attn.weight[:, 2 * D_MODEL + 2 * D_HEAD : 2 * D_MODEL + 3 * D_HEAD] = subspace
        a.c_proj.weight[2 * D_HEAD : 3 * D_HEAD, :] = subspace.T
        b = hf.transformer.h[1].attn
        b.c_attn.weight[:, D_MODEL + D_HEAD : D_MODEL + 2 * D_HEAD] = subspace
    return headclass.load_model(hf)


def test_planted_k_composition_ranks_first(planted_k_pair):
    scores = composition_scores(planted_k_pair)
    assert abs(float(scores["k"][0, 2, 1, 1]) - 0.5) < 1e-4
    partners = top_k_composition_partners(scores, 1, 1, kind="k", n=3)
    assert list(partners.columns) == ["layer", "head", "score", "kind"]
    assert (partners.loc[0, "layer"], partners.loc[0, "head"]) == (0, 2)
    assert partners.loc[0, "score"] > 2 * partners.loc[1, "score"]
    assert partners["score"].is_monotonic_decreasing and len(partners) == 3
    readers = top_k_composition_partners(scores, 0, 2, kind="k", direction="later")
    assert (readers.loc[0, "layer"], readers.loc[0, "head"]) == (1, 1)
    assert len(readers) == N_HEADS
    # Its queries read nothing special from L0H2: no Q-composition standout.
    assert float(scores["q"][0, 2, 1, 1]) < 0.3


def test_partners_edge_cases(planted_k_pair):
    scores = composition_scores(planted_k_pair, kinds="k")
    assert set(scores) == {"k"}
    empty = top_k_composition_partners(scores, 0, 0)
    assert isinstance(empty, pd.DataFrame) and empty.empty
    single = top_k_composition_partners(scores["k"], 1, 1, n=1)
    assert len(single) == 1 and single.loc[0, "kind"] == "k"
    with pytest.raises(ScoreError, match="kinds"):
        composition_scores(planted_k_pair, kinds=["x"])
    with pytest.raises(ScoreError, match="outside"):
        top_k_composition_partners(scores, 5, 0)
    with pytest.raises(ScoreError, match="direction"):
        top_k_composition_partners(scores, 1, 0, direction="sideways")
    with pytest.raises(ScoreError, match="not 'q'"):
        top_k_composition_partners(scores, 1, 0, kind="q")


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_induction_heads_k_compose_with_the_previous_token_head(smollm2):
    """On SmolLM2-135M the strongest previous-token head (L16H0, attention to i-1 ~0.9) is among
    the top-3 K-composition partners of each of the two strongest induction heads (L18H6, L17H3).
    Pattern scores are measured inline, in one hooked pass over repeated random tokens."""
    g = torch.Generator().manual_seed(0)
    n, segment = 4, 40
    random = torch.randint(100, 10_000, (n, segment), generator=g)
    tokens = torch.cat([torch.full((n, 1), smollm2.bos_token_id), random, random], 1)
    queries = torch.arange(segment + 1, 2 * segment + 1)
    steps = torch.arange(1, 2 * segment + 1)
    induction = torch.zeros(smollm2.n_layers, smollm2.n_heads)
    previous = torch.zeros_like(induction)

    def reduce(layer, pattern):
        induction[layer] = pattern[:, :, queries, queries - segment + 1].mean((0, 2))
        previous[layer] = pattern[:, :, steps, steps - 1].mean((0, 2))

    smollm2.run_with_patterns(tokens, reduce)
    prev_layer, prev_head = divmod(int(previous.flatten().argmax()), smollm2.n_heads)
    scores = composition_scores(smollm2, kinds="k")
    for index in induction.flatten().argsort(descending=True)[:2].tolist():
        layer, head = divmod(index, smollm2.n_heads)
        partners = top_k_composition_partners(scores, layer, head, kind="k", n=3)
        print(f"L{layer}H{head} (induction {float(induction[layer, head]):.2f}) K-partners:\n{partners}")
        pairs = list(zip(partners["layer"], partners["head"]))
        assert (prev_layer, prev_head) in pairs, (prev_layer, prev_head, pairs)


@pytest.mark.parametrize("d", [1, 5, 37, 64])
def test_packed_gram_matrices_give_their_frobenius_inner_products(d):
    """Upper block rows (ragged blocks when 8 does not divide d): the weighted left packing
    dotted with the plain right one is <A^T A, B^T B>_F, for every pair at once, wherever the
    rows were written."""
    from headclass.scores.composition import _Packer

    g = torch.Generator().manual_seed(d)
    A = torch.randn(3, 4, d, generator=g, dtype=torch.float64)
    B = torch.randn(2, 4, d, generator=g, dtype=torch.float64)
    packer = _Packer(d)
    expected = torch.einsum("aij,bij->ab", A.mT @ A, B.mT @ B)
    left, right = packer.empty(5, A.device, A.dtype), packer.empty(3, B.device, B.dtype)
    packer.pack(A[:2], left, 0, weighted=True)
    packer.pack(A[2:], left, 2, weighted=True)  # rows written apart, into the same segments
    packer.pack(B, right, 1, weighted=False)
    torch.testing.assert_close(packer.inner(left, right, 3)[:, 1:], expected)
    torch.testing.assert_close(packer.inner(left, right, 2)[:, 1:], expected[:2])
