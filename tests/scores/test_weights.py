"""Weight-based scores: planted heads, exact identities, agreement with explicit matrices, SmolLM2."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

import headclass
from headclass.errors import ScoreError
from headclass.scores import weights
from headclass.scores.weights import (
    WEIGHT_SCORE_KEYS,
    WEIGHT_SCORES,
    copy_eigen_score,
    copy_token_sample,
    effective_embedding,
    identity_distance,
    ov_circuit_eigenvalues,
    ov_gain_scores,
    ov_singular_values,
    ov_svd_scores,
    participation_ratio,
    positional_prev_token_score,
    projection_distance,
    qk_singular_values,
    sampling_error,
    successor_scores,
    successor_sequences,
    topk_copy_scores,
    weight_scores,
)

D_MODEL, N_HEADS, D_HEAD, VOCAB, N_CTX = 64, 4, 16, 128, 32


def centred_basis(d: int, k: int, seed: int) -> torch.Tensor:
    """``[d, k]`` orthonormal columns orthogonal to the all-ones vector.

    TransformerLens centres writing and reading weights along d_model at load time; directions
    orthogonal to (1, ..., 1) pass through that processing unchanged, so what is planted in the
    Hugging Face weights is exactly what the processed HeadModel weights hold.
    """
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, k, generator=g)
    return torch.linalg.qr(m - m.mean(0, keepdim=True)).Q


def tiny_gpt2_object(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_head=N_HEADS, n_embd=D_MODEL, vocab_size=VOCAB, n_positions=N_CTX, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


def head_columns(kind: str, head: int) -> slice:
    """Columns of GPT-2's fused c_attn weight ``[d_model, 3 d_model]`` for one head's q/k/v."""
    offset = {"q": 0, "k": D_MODEL, "v": 2 * D_MODEL}[kind] + head * D_HEAD
    return slice(offset, offset + D_HEAD)


def plant_ov(hf, layer: int, head: int, w_v: torch.Tensor, w_o: torch.Tensor) -> None:
    attn = hf.transformer.h[layer].attn
    attn.c_attn.weight[:, head_columns("v", head)] = w_v
    attn.c_attn.bias[head_columns("v", head)] = 0.0
    attn.c_proj.weight[head * D_HEAD : (head + 1) * D_HEAD, :] = w_o


def plant_qk(hf, layer: int, head: int, w_q: torch.Tensor, w_k: torch.Tensor) -> None:
    attn = hf.transformer.h[layer].attn
    for kind, weight in (("q", w_q), ("k", w_k)):
        attn.c_attn.weight[:, head_columns(kind, head)] = weight
        attn.c_attn.bias[head_columns(kind, head)] = 0.0


@pytest.fixture(scope="module")
def planted():
    """GPT-2 (2 layers x 4 heads, tied embeddings) with planted heads:

    * L1H0 copies: ``W_OV = 2 B B^T`` (a scaled projection of rank d_head);
    * L1H1 suppresses: ``W_OV = -2 B' B'^T``;
    * L0H3 writes nothing (``W_O = 0``);
    * L0H1 is a positional previous-token head: with sinusoidal position embeddings
      ``p_i = sum_f cos(w_f i) u_f + sin(w_f i) v_f``, its queries rotate each frequency by
      ``-w_f`` so that ``q_i . k_j = 3 sum_f cos(w_f (i - 1 - j))``, highest at ``j = i - 1``.
    """
    hf = tiny_gpt2_object(seed=1)
    with torch.no_grad():
        basis = centred_basis(D_MODEL, D_HEAD, seed=2)
        plant_ov(hf, 1, 0, 2.0 * basis, basis.T)
        other = centred_basis(D_MODEL, D_HEAD, seed=3)
        plant_ov(hf, 1, 1, -2.0 * other, other.T)
        hf.transformer.h[0].attn.c_proj.weight[3 * D_HEAD : 4 * D_HEAD, :] = 0.0

        n_freq = D_HEAD // 2
        pos_basis = centred_basis(D_MODEL, D_HEAD, seed=4)
        freqs = 2 * math.pi * torch.arange(1, n_freq + 1) / (2.5 * N_CTX)
        angles = torch.arange(N_CTX)[:, None] * freqs[None, :]  # [pos, freq]
        coords = torch.stack([angles.cos(), angles.sin()], -1).flatten(1)  # [pos, 2 freq]
        hf.transformer.wpe.weight[:] = coords @ pos_basis.T
        rotate = torch.zeros(D_HEAD, D_HEAD)
        for f, w in enumerate(freqs.tolist()):
            c, s = math.cos(w), math.sin(w)
            rotate[2 * f : 2 * f + 2, 2 * f : 2 * f + 2] = torch.tensor([[c, -s], [s, c]])
        plant_qk(hf, 0, 1, 3.0 * pos_basis @ rotate, pos_basis)
    return headclass.load_model(hf)


@pytest.fixture(scope="module")
def planted_scores(planted):
    # copy_sample_min = the whole sample: every head ranks every token (no sequential stop)
    return weight_scores(planted, config={"weights": {"copy_sample_size": VOCAB, "copy_sample_min": VOCAB}})


def test_planted_weights_survive_loading(planted):
    basis = centred_basis(D_MODEL, D_HEAD, seed=2)
    w_ov = planted.W_V[1, 0] @ planted.W_O[1, 0]
    torch.testing.assert_close(w_ov, 2.0 * basis @ basis.T, atol=1e-5, rtol=0)
    assert float(planted.W_O[0, 3].abs().max()) == 0.0


NO_TOKENIZER_NAN = {"successor", "successor_se"}  # no tokenizer: no ordinal sequence


def test_weight_scores_keys_shapes_and_ranges(planted_scores):
    assert list(planted_scores) == list(WEIGHT_SCORE_KEYS)
    for key, value in planted_scores.items():
        assert value.shape == (2, N_HEADS), key
        if key in NO_TOKENIZER_NAN:
            assert value.isnan().all(), key
        else:
            assert torch.isfinite(value.float()).all(), key
            low, high = WEIGHT_SCORES[key].range
            assert (value.float() >= low).all() and (value.float() <= high).all(), key
    assert planted_scores["writes_nothing"].dtype == torch.bool
    assert ((planted_scores["copy_eigen"] >= -1) & (planted_scores["copy_eigen"] <= 1)).all()
    for key in (
        "copy_topk",
        "copy_suppression_topk",
        "ov_identity_distance",
        "ov_projection_distance",
        "positional_prev_token",
    ):
        assert ((planted_scores[key] >= 0) & (planted_scores[key] <= 1)).all(), key


def test_planted_copy_and_suppression_heads(planted_scores):
    eig = planted_scores["copy_eigen"]
    assert eig[1, 0] > 0.999  # W_OV = +c P, tied embeddings: all eigenvalues >= 0
    assert eig[1, 1] < -0.999  # W_OV = -c P
    random_heads = [(0, 0), (0, 1), (0, 2), (1, 2), (1, 3)]
    for layer, head in random_heads:
        assert abs(float(eig[layer, head])) < 0.5, (layer, head, float(eig[layer, head]))
    assert float(torch.tensor([abs(float(eig[layer, head])) for layer, head in random_heads]).mean()) < 0.3

    assert planted_scores["copy_topk"][1, 0] > 0.95
    assert planted_scores["copy_suppression_topk"][1, 1] > 0.95
    assert planted_scores["copy_topk"][1, 1] < 0.05
    assert planted_scores["copy_suppression_topk"][1, 0] < 0.05
    for layer, head in random_heads:
        assert planted_scores["copy_topk"][layer, head] < 0.5

    # A scaled projection is as far from the identity as its rank allows, but is a projection.
    proj = planted_scores["ov_projection_distance"]
    assert proj[1, 0] < 1e-3 and proj[1, 1] < 1e-3
    ident = planted_scores["ov_identity_distance"]
    expected = math.sqrt(1 - D_HEAD / D_MODEL)
    assert abs(float(ident[1, 0]) - expected) < 1e-4
    assert abs(float(planted_scores["ov_effective_rank"][1, 0]) - D_HEAD) < 1e-3


def test_planted_zero_head_writes_nothing(planted_scores):
    flags = planted_scores["writes_nothing"]
    assert bool(flags[0, 3])
    assert int(flags.sum()) == 1
    assert float(planted_scores["ov_norm"][0, 3]) == 0.0
    assert float(planted_scores["ov_effective_rank"][0, 3]) == 0.0
    assert float(planted_scores["copy_eigen"][0, 3]) == 0.0
    # All its logits tie with the own token's: ties never count as copying or suppressing.
    assert float(planted_scores["copy_topk"][0, 3]) == 0.0
    assert float(planted_scores["copy_suppression_topk"][0, 3]) == 0.0


def test_planted_positional_previous_token_head(planted_scores):
    score = planted_scores["positional_prev_token"]
    assert score[0, 1] > 0.9
    others = torch.cat([score[0, [0, 2, 3]], score[1]])
    assert float(others.max()) < 0.5
    assert int(score.flatten().argmax()) == 1


def test_eigenvalue_summary_equals_explicit_vocab_matrix(tiny_gpt2):
    model = tiny_gpt2
    eig = ov_circuit_eigenvalues(model)
    assert eig.shape == (model.n_layers, model.n_heads, model.d_head)
    ours = copy_eigen_score(eig)
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            full = (
                model.W_E.double()
                @ model.W_V[layer, head].double()
                @ model.W_O[layer, head].double()
                @ model.W_U.double()
            )  # [vocab, vocab]
            explicit = copy_eigen_score(torch.linalg.eigvals(full))
            assert abs(float(ours[layer, head]) - float(explicit)) < 1e-4, (layer, head)


def test_effective_embedding_matches_first_mlp_and_feeds_the_scores(tiny_gpt2):
    model = tiny_gpt2
    block = model.tl_model.blocks[0]
    tokens = torch.tensor([3, 17, 99])
    with torch.no_grad():
        expected = model.W_E[tokens] + block.mlp(block.ln2(model.W_E[tokens][None]))[0]
    torch.testing.assert_close(effective_embedding(model)[tokens], expected, atol=1e-5, rtol=1e-5)
    eig = copy_eigen_score(ov_circuit_eigenvalues(model, effective_embedding=True))
    full = (
        effective_embedding(model).double() @ model.W_V[1, 2].double() @ model.W_O[1, 2].double() @ model.W_U.double()
    )
    assert abs(float(eig[1, 2]) - float(copy_eigen_score(torch.linalg.eigvals(full)))) < 1e-4
    scores = weight_scores(model, config={"weights": {"effective_embedding": True, "copy_sample_size": 50}})
    assert torch.isfinite(scores["copy_topk"]).all()
    rows = torch.tensor([5, 9])
    torch.testing.assert_close(model.effective_embedding(tokens=rows), effective_embedding(model)[rows])


def test_effective_embedding_needs_a_first_mlp():
    fake = fake_model(torch.randn(1, 1, 8, 4), torch.randn(1, 1, 4, 8))
    with pytest.raises(ScoreError, match="first block's MLP"):
        effective_embedding(fake)


def test_topk_matches_explicit_logits(tiny_gpt2):
    model = tiny_gpt2
    tokens = torch.arange(1, model.d_vocab)
    scores = topk_copy_scores(model, top_k=3, tokens=tokens)
    for layer, head in [(0, 0), (1, 3)]:
        logits = model.W_E[tokens] @ model.W_V[layer, head] @ model.W_O[layer, head] @ model.W_U
        own = logits.gather(1, tokens[:, None])
        others = logits.scatter(1, tokens[:, None], float("nan"))  # NaN never compares true
        copy = float(((others >= own).sum(1) < 3).float().mean())
        suppress = float(((others <= own).sum(1) < 3).float().mean())
        # Blocked and whole matrix products may round a near-tie apart: allow one token.
        assert abs(float(scores["copy_topk"][layer, head]) - copy) <= 1.01 / len(tokens)
        assert abs(float(scores["copy_suppression_topk"][layer, head]) - suppress) <= 1.01 / len(tokens)


@pytest.mark.parametrize("k", [5, 4000])
def test_topk_with_a_vocabulary_larger_than_one_block(k):
    """Rows are dropped once settled, blocks grow: the counts that matter stay exact. With
    ``k = 4000`` (2/3 of the vocabulary) rows stay open on both sides until late, so the columns that
    later blocks must leave out count on an open side (they are counted and taken off)."""
    d, r, vocab = 32, 8, 6000
    g = torch.Generator().manual_seed(7)
    W_E = torch.randn(vocab, d, generator=g)
    basis = torch.linalg.qr(torch.randn(d, r, generator=g)).Q
    W_V = torch.stack([basis, -basis, torch.randn(d, r, generator=g), 0.3 * basis])[None]
    W_O = torch.stack([basis.T, basis.T, torch.randn(r, d, generator=g), basis.T])[None]
    W_O[0, 3] += 0.2 * torch.randn(r, d, generator=g)  # a noisy, partial copier
    fake = fake_model(W_V, W_O, d_vocab=vocab, W_E=W_E, W_U=W_E.T.contiguous())
    tokens = torch.randperm(vocab, generator=g)[:300]
    scores = topk_copy_scores(fake, top_k=k, tokens=tokens)
    for head in range(4):
        logits = W_E[tokens] @ W_V[0, head] @ W_O[0, head] @ W_E.T
        own = logits.gather(1, tokens[:, None])
        others = logits.scatter(1, tokens[:, None], float("nan"))
        copy = float(((others >= own).sum(1) < k).float().mean())
        suppress = float(((others <= own).sum(1) < k).float().mean())
        assert abs(float(scores["copy_topk"][0, head]) - copy) <= 1.01 / len(tokens), head
        assert abs(float(scores["copy_suppression_topk"][0, head]) - suppress) <= 1.01 / len(tokens), head
    if k > 5:  # the random head's tokens fall on both sides of both thresholds
        assert 0.1 < float(scores["copy_topk"][0, 2]) < 0.9 and 0.1 < float(scores["copy_suppression_topk"][0, 2]) < 0.9
        return
    # Both paths are exercised: rows kept to the end (copiers) and rows dropped early.
    assert scores["copy_topk"][0, 0] > 0.2 and scores["copy_suppression_topk"][0, 1] > 0.2
    assert scores["copy_topk"][0, 2] < 0.05 and scores["copy_suppression_topk"][0, 0] < 0.05


@pytest.mark.parametrize(
    "amx, avx512_bf16, expected",
    [(True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, torch.float32)],
)
def test_the_screen_is_bfloat16_where_the_cpu_multiplies_it(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert weights._screen_dtype(torch.device("cpu")) == expected
    assert weights._screen_dtype(torch.device("meta")) == torch.float32  # not a CPU: float32


def _explicit_topk(W_E, W_V, W_O, W_U, tokens, k):
    """Float32 logits of the whole vocabulary: (in top k, in bottom k) per token."""
    projected = W_E[tokens] @ W_V @ W_O
    logits = projected @ W_U
    own = logits.gather(1, tokens[:, None])
    others = logits.scatter(1, tokens[:, None], float("nan"))
    tie = 1e-5 * projected.norm(dim=1, keepdim=True) * W_U.norm(dim=0).max()  # rounding ties
    return (others >= own - tie).sum(1) < k, (others <= own + tie).sum(1) < k


@pytest.mark.parametrize("screen", [torch.float32, torch.bfloat16])
def test_topk_of_rounding_noise_is_a_tie_on_every_screen(monkeypatch, screen):
    """A head that writes orthogonally to the unembedding gets logits that are float rounding
    only (their order differs between CPUs and summation orders): they tie with the own logit,
    so the head neither copies nor suppresses, whichever screen ranks them."""
    monkeypatch.setattr(weights, "_screen_dtype", lambda device: screen)
    d, vocab = 48, 100  # few columns: noise ranks would land in a top 5 often
    g = torch.Generator().manual_seed(5)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    W_U = basis[:, :40] @ torch.randn(40, vocab, generator=g)  # columns span 40 of 48 dims
    W_E = torch.randn(vocab, d, generator=g)
    hidden = basis[:, 40:]  # [d, 8], orthogonal to every column, up to rounding
    W_V = torch.stack([torch.randn(d, 8, generator=g), torch.eye(d)[:, :8]])[None]
    W_O = torch.stack([5 * hidden.T, torch.eye(d)[:8]])[None]
    fake = fake_model(W_V, W_O, d_vocab=vocab, W_E=W_E, W_U=W_U)
    projected = W_E[:50] @ W_V[0, 0] @ W_O[0, 0]
    noise = (projected @ W_U).abs().amax(1) / (projected.norm(dim=1) * W_U.norm(dim=0).max())
    assert 0 < float(noise.max()) < 1e-6  # rounding, not signal
    scores = topk_copy_scores(fake, top_k=5, tokens=torch.arange(vocab))
    assert float(scores["copy_topk"][0, 0]) == 0.0 and float(scores["copy_suppression_topk"][0, 0]) == 0.0
    top, bottom = _explicit_topk(W_E, W_V[0, 1], W_O[0, 1], W_U, torch.arange(vocab), 5)  # a real head too
    assert round(float(scores["copy_topk"][0, 1]) * vocab) == int(top.sum())
    assert round(float(scores["copy_suppression_topk"][0, 1]) * vocab) == int(bottom.sum())


@pytest.mark.parametrize(
    "pairs, layout", [(300, "contiguous"), (700, "contiguous"), (700, "transposed")], ids=["300", "700", "700-view"]
)
@pytest.mark.parametrize("screen", [torch.float32, torch.bfloat16])
def test_topk_screen_is_exact_even_at_near_ties(monkeypatch, screen, pairs, layout):
    """The bfloat16 screen decides like float32 logits, also where rivals sit within its margin
    (two layers of 3 heads x 200 tokens, ranked in batches of pairs that straddle them: 700
    pairs takes both layers at once, 300 one head at a time, two per batch). ``transposed``:
    ``W_U`` is a transposed view of a ``[vocab, d_model]`` matrix, as the TransformerLens bridge
    hands it out (the screen's copy gathers its rows)."""
    monkeypatch.setattr(weights, "_screen_dtype", lambda device: screen)
    monkeypatch.setattr(weights, "_TOPK_PAIR_BYTES", 4 * 48 * pairs)
    batches: list[int] = []
    rank_batch = weights._rank_batch
    monkeypatch.setattr(weights, "_rank_batch", lambda batch, *a: batches.append(len(batch)) or rank_batch(batch, *a))
    d, vocab, k = 48, 3000, 5
    g = torch.Generator().manual_seed(11)
    W_E = torch.randn(vocab, d, generator=g)
    W_U = W_E.T.contiguous()
    # Rivals: k columns equal to a token's own column up to 2e-4 relative, far inside
    # bfloat16's 2^-8: for 20 tokens 2 rivals lie above and 3 below (own logit 3rd: in the top
    # 5), for 20 more all 5 above (6th: not in it).
    tokens = torch.randperm(vocab, generator=g)[:200]
    rivals = torch.randperm(vocab, generator=g)
    rivals = rivals[~torch.isin(rivals, tokens)][: 40 * k].view(40, k)
    for i, (t, group) in enumerate(zip(tokens[:40].tolist(), rivals)):
        for j, col in enumerate(group.tolist()):
            up = j < 2 or i >= 20
            W_U[:, col] = W_U[:, t] * (1 + (2e-4 if up else -2e-4) * (1 + j))
    eye = torch.eye(d)
    W_V = torch.stack([eye, -eye, torch.randn(d, d, generator=g) / d**0.5])  # copy, suppress, random
    W_O = torch.stack([eye, eye, torch.randn(d, d, generator=g) / d**0.5])
    W_V, W_O = torch.stack([W_V, W_V.flip(0)]), torch.stack([W_O, W_O.flip(0)])  # layer 1: reversed
    if layout == "transposed":
        W_U = W_U.T.contiguous().T
        assert W_U.stride(0) == 1
    fake = fake_model(W_V, W_O, d_vocab=vocab, W_E=W_E, W_U=W_U)
    scores = topk_copy_scores(fake, top_k=k, tokens=tokens)
    for layer, head in itertools.product(range(2), range(3)):
        top, bottom = _explicit_topk(W_E, W_V[layer, head], W_O[layer, head], W_U, tokens, k)
        assert round(float(scores["copy_topk"][layer, head]) * len(tokens)) == int(top.sum()), (layer, head)
        got = round(float(scores["copy_suppression_topk"][layer, head]) * len(tokens))
        assert got == int(bottom.sum()), (layer, head)
    assert torch.equal(scores["copy_topk"][1], scores["copy_topk"][0].flip(0))
    assert batches == ([2, 2, 2] if pairs == 300 else [2])  # (layer, heads) groups per batch
    # the perfect copier loses exactly the 20 tokens with 5 rivals above (the suppressor too)
    assert round(float(scores["copy_topk"][0, 0]) * 200) == 180
    assert round(float(scores["copy_suppression_topk"][0, 1]) * 200) == 180


def test_topk_screen_margin_covers_the_rounding(monkeypatch):
    """Every bfloat16-screened logit lies within the margin _top_and_bottom assumes (float32
    or bfloat16 unembedding), and that margin is not a loose worst case."""
    g = torch.Generator().manual_seed(5)
    for d, unembed in ((64, torch.float32), (896, torch.float32), (896, torch.bfloat16)):
        p = torch.randn(50, d, generator=g) * torch.rand(50, 1, generator=g) * 10
        W = torch.randn(d, 4000, generator=g)
        W[:, :100] *= 1e-3  # small columns: the margin uses the largest column norm
        W[:, 100:150] = p.T * 0.1  # columns along p: the output's rounding is largest there
        W = W.to(unembed).float()
        exact = p.double() @ W.double()
        screened = (p.bfloat16() @ W.bfloat16()).double()
        rounding = (p - p.bfloat16().float()).norm(dim=1, keepdim=True)
        emax = (W - W.bfloat16().float()).norm(dim=0).max()
        error = weights._screen_error(d, torch.bfloat16, unembed)
        size, wmax = p.norm(dim=1, keepdim=True), W.norm(dim=0).max()
        bound = weights._screen_margin(rounding, size, wmax, emax, screened.abs().float(), error).double()
        assert ((screened - exact).abs() <= bound).all()
        assert (screened - exact).abs().amax() > 0.05 * bound.amax()  # not vacuous
        assert float(rounding.max() / size.max()) < 0.7 * 2.0**-8  # measured, not the worst case


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_counts_from_chunk_extremes_equal_the_eager_ones(monkeypatch, dtype):
    """Counting from each chunk's largest and smallest logit gives the eager integers (NaN never
    counts, ties count, +-inf count on their side, crossed thresholds leave no band), and
    compares logit by logit only the chunks that a threshold falls inside."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(37, 3072, generator=g).round(decimals=1).to(dtype)  # many exact ties
    logits[::2, 600] = float("nan")  # a row's own column
    logits[1::4, 2900] = float("nan")
    logits[:5, 1000:2000] = float("-inf")  # a row's own logit is high: ranked columns at -inf
    logits[5:9, 1000:2000] = float("inf")
    logits[9:12, 2000:2500] = 9.0  # chunks wholly above every threshold below
    logits[12:15, 250:750] = logits[12:15, 5:6]  # chunks wholly tied with high
    high = logits[:, 5:6, None].clone()
    low = high - 0.5
    logits[15:18, 2500:3000] = (high[15:18, 0] - 0.2).expand(3, 500)  # chunks wholly in the band
    logits = logits[:, :3000].view(37, -1, 250)  # [rows, chunks, chunk] of a wider block, as ranked
    expected = weights._count_beyond_eager(logits, high, low)
    flat = logits.flatten(1)
    assert torch.equal(expected[0], (flat >= high[:, 0]).sum(-1, dtype=torch.int32))
    assert torch.equal(expected[1], (flat <= low[:, 0]).sum(-1, dtype=torch.int32))
    band = (logits > low) & (logits < high)
    assert torch.equal(expected[2], band.sum(-1, dtype=torch.int32))
    assert int(expected[2].sum()) > 0 and int(expected[1].sum()) > 0
    # high <= low (the exact screen's "above" and "below" overlap): no band, every tie counted twice
    crossed = weights._count_beyond_eager(logits, low, high)
    assert not crossed[2].any()
    assert torch.equal(crossed[0], (flat >= low[:, 0]).sum(-1, dtype=torch.int32))
    assert torch.equal(crossed[1], (flat <= high[:, 0]).sum(-1, dtype=torch.int32))

    monkeypatch.setattr(weights, "_DETAIL_LOGITS", 1000)  # the chunks compared, a few at a time
    compared: list[int] = []
    eager = weights._count_beyond_eager
    monkeypatch.setattr(weights, "_count_beyond_eager", lambda x, *a: compared.append(x.shape[0]) or eager(x, *a))
    ragged = logits.flatten(1)[:, :70].reshape(37, 1, 70)  # a block's last, narrower chunk
    for shift in (0.0, 6.0, -6.0):  # own logits mid-row, high in it (top-k pairs), low (bottom-k)
        for chunks in (logits, ragged):
            for thresholds in ((high + shift, low + shift), (low + shift, high + shift)):
                compared.clear()
                for got, want in zip(weights._count_beyond(chunks, *thresholds), eager(chunks, *thresholds)):
                    assert torch.equal(got, want)
                assert max(compared, default=0) <= 1000 // chunks.shape[-1]
                if shift and chunks is logits:  # decided by their extremes but for a few chunks
                    assert 0 < sum(compared) < 0.25 * 37 * 12


@pytest.mark.parametrize("unembed", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d, r", [(64, 8), (896, 64)])
def test_output_space_margin_covers_the_rounding(monkeypatch, unembed, d, r):
    """Every logit screened in a head's output space lies within the margin _top_and_bottom
    gives it, column by column (well- and ill-conditioned W_O, float32 or bfloat16 unembedding),
    and that margin is not a loose worst case."""
    monkeypatch.setattr(weights, "_screen_dtype", lambda device: torch.bfloat16)
    g = torch.Generator().manual_seed(6)
    vocab = 3000
    W_U = (torch.randn(d, vocab, generator=g) * torch.rand(1, vocab, generator=g)).to(unembed)
    for spread in (1.0, 1e-3):  # singular values of W_O over one or three decades
        u, _, vh = torch.linalg.svd(torch.randn(r, d, generator=g), full_matrices=False)
        W_O = u @ torch.diag(torch.logspace(0, math.log10(spread), r)) @ vh * 3
        # The worst case of the basis' rounding: columns along its largest error direction, and
        # outputs along what that direction meets in the space (the same QR as the build's).
        basis = torch.linalg.qr(W_O.double().T).Q.float()
        worst_u, _, worst_v = torch.linalg.svd(basis.bfloat16().double() - basis.double())
        W_U[:, :40] = (worst_u[:, :1].T * torch.linspace(1, 3, 40)[:, None]).T.to(unembed)
        fake = fake_model(torch.zeros(1, 1, d, r), W_O[None, None], d_vocab=vocab, W_U=W_U)
        screen = weights._Screen.build(fake, torch.Generator().manual_seed(0))
        space = weights._OutputSpace.build(W_O, screen)
        p = torch.randn(50, r, generator=g) @ W_O  # float32, as the rounds form it
        p[:20] = (worst_v[:1].float() @ basis.T) * torch.linspace(1, 5, 20)[:, None]
        y, beyond = space.coordinates(p, screen.error[0])
        left = y.bfloat16()
        screened = (left @ space.columns).double()  # [pair, vocab], screen column order
        columns = screen.W_U.float()[:, screen.order].double()
        exact = p.double() @ columns
        reference = (p @ screen.W_U.float()[:, screen.order]).double()  # the float32 logits
        margin = weights._screen_margin(
            (y - left.float()).norm(dim=1, keepdim=True),
            y.norm(dim=1, keepdim=True),
            space.norms[None],
            space.errors[None],
            screened.abs().float(),
            screen.error,
            beyond[:, None] * screen.norms[None],
        ).double()
        assert ((screened - exact).abs() <= margin).all()
        assert ((screened - reference).abs() <= margin).all()
        assert (screened - exact).abs().amax() > 0.05 * margin.amax()  # not vacuous
        # its parts: the view's columns within their bound (tight on the worst columns), the
        # residual the one that makes p . w = y . (Q^T w) + r . w
        view = space.basis.double().T @ columns  # Q^T w_j, exactly enough
        column_error = (space.columns.double() - view).norm(dim=0)
        assert (column_error <= space.errors).all()
        assert (column_error[screen.place[:40]] / space.errors[screen.place[:40]]).amax() > 0.3
        residual = p.double() - y.double() @ space.basis.double().T
        assert (residual.norm(dim=1) <= beyond).all()
        torch.testing.assert_close(y.double() @ view + residual @ columns, exact, rtol=0, atol=1e-9)


def test_heads_near_a_threshold_rank_the_rest_in_their_output_space(monkeypatch):
    """Heads still open after the first rounds rank the rest of the sample in their output
    space and replay the stop rule: the same counts, stops and scores as ranking round by round
    with the plain screen, rivals within the bfloat16 margin included."""
    monkeypatch.setattr(weights, "_screen_dtype", lambda device: torch.bfloat16)
    d, r, vocab, k = 48, 16, 4000, 5
    g = torch.Generator().manual_seed(12)
    basis = torch.linalg.qr(torch.randn(d, r, generator=g)).Q
    W_E = torch.randn(vocab, d, generator=g) + 3 * torch.randn(vocab, r, generator=g) @ basis.T  # much in it
    W_U = W_E.T.contiguous()
    tokens = torch.randperm(vocab, generator=g)[:600]
    rivals = torch.randperm(vocab, generator=g)
    rivals = rivals[~torch.isin(rivals, tokens)][: 60 * k].view(60, k)
    for i, (t, group) in enumerate(zip(tokens[:60].tolist(), rivals)):  # rivals at 2e-4 relative
        for j, col in enumerate(group.tolist()):
            W_U[:, col] = W_U[:, t] * (1 + (2e-4 if j < 2 or i >= 30 else -2e-4) * (1 + j))
    noise = [0.1 * torch.randn(d, r, generator=g) for _ in range(4)]
    W_V = torch.stack([basis + noise[0], -basis + noise[1], basis + 2 * noise[2], torch.randn(d, r, generator=g)])
    W_O = torch.stack([basis.T, basis.T, basis.T + noise[3].T, torch.randn(r, d, generator=g)])
    fake = fake_model(W_V[None], W_O[None], d_vocab=vocab, W_E=W_E, W_U=W_U)
    whole = topk_copy_scores(fake, top_k=k, tokens=tokens)
    # thresholds at two heads' own fractions: they stay open long, to the end or a late stop
    stop_at = (float(whole["copy_topk"][0, 0]) - 0.1, float(whole["copy_suppression_topk"][0, 1]) + 0.02)
    spaces: list[int] = []
    build = weights._OutputSpace.build
    monkeypatch.setattr(weights._OutputSpace, "build", lambda *a: spaces.append(1) or build(*a))
    fast = topk_copy_scores(fake, top_k=k, tokens=tokens, stop_at=stop_at, first_sample=10)
    monkeypatch.setattr(weights, "_SPACE_FROM", 10**9)  # every round with the plain screen
    plain = topk_copy_scores(fake, top_k=k, tokens=tokens, stop_at=stop_at, first_sample=10)
    assert all(torch.equal(fast[key], plain[key]) for key in plain)
    ranked = fast["copy_topk_n"][0].tolist()
    assert len(spaces) == 2 and 20 < ranked[0] < 600 and ranked[1] == 600  # a replayed stop, the end
    top, bottom = _explicit_topk(W_E, W_V[1], W_O[1], W_U, tokens, k)  # head 1 ranked every token
    assert round(float(fast["copy_suppression_topk"][0, 1]) * 600) == int(bottom.sum())
    assert round(float(fast["copy_topk"][0, 1]) * 600) == int(top.sum())


def test_logits_blocks_share_one_buffer_that_grows_when_needed():
    """_Scratch: every block of a ranking is a view of one buffer (no fresh pages per block),
    replaced only by a larger request or another dtype."""
    scratch = weights._Scratch()
    cpu = torch.device("cpu")
    first = scratch.take(3, 5, torch.bfloat16, cpu)
    assert first.shape == (3, 5) and first.is_contiguous() and first.dtype == torch.bfloat16
    assert first.untyped_storage().nbytes() >= weights._TOPK_BLOCK_BYTES // 2  # a block's worth at once
    wide = scratch.take(7, 300, torch.bfloat16, cpu)
    assert wide.data_ptr() == first.data_ptr() and wide.is_contiguous()
    huge = scratch.take(weights._TOPK_BLOCK_BYTES // 4 // 100 + 1, 100, torch.bfloat16, cpu)
    assert huge.data_ptr() != first.data_ptr() and huge.shape[1] == 100
    assert scratch.take(2, 2, torch.float32, cpu).dtype == torch.float32


def test_sequential_sample_stops_clear_heads_early(planted, planted_scores):
    """With the default stop rule, clear heads rank ``copy_sample_min`` tokens and keep their side
    of the thresholds; the full-sample fixture's fractions lie in their Wilson intervals."""
    cfg = {"weights": {"copy_sample_size": VOCAB, "copy_sample_min": 16, "copy_stop_z": 3.0}}
    seq = weight_scores(planted, config=cfg)
    n = seq["copy_topk_n"]
    full = planted_scores
    assert (full["copy_topk_n"] == full["copy_topk_n"].max()).all()
    assert n[1, 0] < full["copy_topk_n"][1, 0] and n[1, 1] < full["copy_topk_n"][1, 1]  # the copier, the suppressor
    assert ((n >= 16) & (n <= full["copy_topk_n"])).all()
    for key, threshold in (("copy_topk", 0.5), ("copy_suppression_topk", 0.5)):
        assert torch.equal(seq[key] >= threshold, full[key] >= threshold), key
        low, high = weights.wilson_interval(seq[key], n, 3.0)
        inside = (low <= full[key] + 1e-6) & (full[key] <= high + 1e-6)
        assert inside.all(), key
        # the errors use each head's own count
        torch.testing.assert_close(
            seq[f"{key}_se"], sampling_error(seq[key], n, planted.d_vocab - len(planted.special_token_ids()))
        )


def test_sequential_sample_goes_on_near_a_threshold():
    """A head whose copy fraction sits at the threshold ranks the whole sample."""
    d, r, vocab = 32, 8, 2000
    g = torch.Generator().manual_seed(3)
    W_E = torch.randn(vocab, d, generator=g)
    basis = torch.linalg.qr(torch.randn(d, r, generator=g)).Q
    W_V = torch.stack([basis, torch.randn(d, r, generator=g)])[None]
    W_O = torch.stack([basis.T, torch.randn(r, d, generator=g)])[None]
    fake = fake_model(W_V, W_O, d_vocab=vocab, W_E=W_E, W_U=W_E.T.contiguous())
    tokens = torch.randperm(vocab, generator=g)[:800]
    full = topk_copy_scores(fake, top_k=5, tokens=tokens)
    threshold = float(full["copy_topk"][0, 0])  # exactly at the head's fraction
    seq = topk_copy_scores(fake, top_k=5, tokens=tokens, stop_at=(threshold, 0.5), first_sample=50)
    assert int(seq["copy_topk_n"][0, 0]) == 800 and float(seq["copy_topk"][0, 0]) == threshold
    assert int(seq["copy_topk_n"][0, 1]) == 50  # the random head is clear at once
    with pytest.raises(ScoreError, match="first_sample"):
        topk_copy_scores(fake, tokens=tokens, stop_at=(0.5, 0.5), first_sample=0)


class _ExpandedOnly:
    """A model seen only through its expanded per-head weights: no ``kv_layer_weight``."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        if name == "kv_layer_weight":
            raise AttributeError(name)
        return getattr(self._model, name)


def test_grouped_query_scores_are_computed_per_key_value_head(tiny_qwen2_dir, monkeypatch):
    """Key/value weights served unexpanded (one per group) give exactly the scores of the
    expanded per-head weights, on both TransformerLens generations."""
    from headclass.loading.head_model import kv_layer_weight, layer_weight

    model = headclass.load_model(tiny_qwen2_dir)
    n_kv, group = model.n_key_value_heads, model.n_heads // model.n_key_value_heads
    assert 1 < group
    for layer in range(model.n_layers):
        for key in ("W_K", "W_V"):
            grouped = kv_layer_weight(model, key, layer)
            assert grouped.shape == (n_kv, model.d_model, model.d_head)
            assert torch.equal(grouped.repeat_interleave(group, dim=0), layer_weight(model, key, layer))
            assert torch.equal(kv_layer_weight(_ExpandedOnly(model), key, layer), layer_weight(model, key, layer))
    with pytest.raises(KeyError, match="W_K and W_V"):
        kv_layer_weight(model, "W_Q", 0)
    expanded = _ExpandedOnly(model)
    ours, theirs = weight_scores(model), weight_scores(expanded)
    assert ours.keys() == theirs.keys()
    for key in ours:  # bit for bit (NaN where the tokenizer holds no ordinal sequence)
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, equal_nan=True, msg=key)
    assert torch.equal(weights.ov_circuit_eigenvalues(model), weights.ov_circuit_eigenvalues(expanded)), (
        "eigenvalues per group"
    )
    runs = [torch.arange(5, 15), torch.tensor([40, 3, 77, 12])]  # the tiny tokenizer has no ordinals
    successor = weights.successor_scores(model, sequences=runs)["successor"]
    assert torch.equal(successor, weights.successor_scores(expanded, sequences=runs)["successor"])
    assert successor.isfinite().all()
    for layer in range(model.n_layers):  # the spectra as defined, from the expanded weights
        expected = torch.linalg.svdvals(weights.r_factor(model.W_Q[layer]) @ weights.r_factor(model.W_K[layer]).mT)
        assert torch.equal(qk_singular_values(model)[layer], expected)
    # a head ranked in its output space reads its own key/value head (top half of the
    # vocabulary: about half the pairs in it, so another head's W_V would show)
    monkeypatch.setattr(weights, "_screen_dtype", lambda device: torch.bfloat16)
    screen = weights._Screen.build(model, torch.Generator().manual_seed(0))
    tokens = weights.copy_token_sample(model, 64)
    sources, own = model.W_E[tokens].float(), model.W_U[:, tokens].float()
    half = model.d_vocab // 2
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            ranked = [
                weights._rank_in_output_space(m, layer, head, screen, sources, own, tokens, half, 16)
                for m in (model, expanded)
            ]
            assert torch.equal(ranked[0][0], ranked[1][0]) and torch.equal(ranked[0][1], ranked[1][1])
            assert 0 < int(ranked[0][0].sum()) < tokens.numel()


def test_token_sample_is_seeded_and_skips_special_tokens(tiny_gpt2):
    a = copy_token_sample(tiny_gpt2, 40, seed=3)
    assert torch.equal(a, copy_token_sample(tiny_gpt2, 40, seed=3))
    assert not torch.equal(a, copy_token_sample(tiny_gpt2, 40, seed=4))
    assert a.numel() == 40 and len(set(a.tolist())) == 40
    assert not set(a.tolist()) & tiny_gpt2.special_token_ids()
    everything = copy_token_sample(tiny_gpt2, 10_000)
    assert everything.numel() == tiny_gpt2.d_vocab - len(tiny_gpt2.special_token_ids())
    with pytest.raises(ScoreError, match="copy_sample_size"):
        copy_token_sample(tiny_gpt2, 0)


# -- exact identities on fakes with known answers ----------------------------------------------


def fake_model(W_V: torch.Tensor, W_O: torch.Tensor, **extra) -> SimpleNamespace:
    """A HeadModel-like object carrying only weights: ``W_V [L, H, d, r]``, ``W_O [L, H, r, d]``."""
    n_layers, n_heads, d_model, d_head = W_V.shape
    fields = dict(
        name="fake",
        n_layers=n_layers,
        n_heads=n_heads,
        d_model=d_model,
        d_head=d_head,
        d_vocab=16,
        W_V=W_V,
        W_O=W_O,
        W_Q=W_V.clone(),
        W_K=W_V.clone(),
        W_pos=None,
    )
    fields.update(extra)
    return SimpleNamespace(**fields)


def explicit_distances(w: torch.Tensor) -> tuple[float, float]:
    """Brute force on the ``d x d`` matrix: best c by least squares against I and against P."""
    w = w.double()
    d = w.shape[0]
    u, s, vh = torch.linalg.svd(w)
    rank = int((s > 1e-4 * s.max()).sum()) if s.max() > 0 else 0
    out = []
    for target in (torch.eye(d, dtype=w.dtype), vh[:rank].T @ vh[:rank]):
        if float(w.norm()) == 0 or float(target.norm()) == 0:
            out.append(1.0)
            continue
        c = float((w * target).sum() / (target * target).sum())
        out.append(float((w - c * target).norm() / w.norm()))
    return out[0], out[1]


def test_distance_identities_on_known_matrices():
    d, r = 12, 4
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(d, r, generator=g)).Q
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    rotation = torch.block_diag(rot, rot)  # traceless rotation inside the subspace
    keep2 = torch.tensor([1.0, 1.0, 0.0, 0.0])  # a rank-deficient head: 2 of 4 used
    cases = {
        # name: (W_V [d, r], W_O [r, d], identity distance, projection distance)
        "scaled projection": (3.0 * basis, basis.T, math.sqrt(1 - r / d), 0.0),
        "negative projection": (-0.5 * basis, basis.T, math.sqrt(1 - r / d), 0.0),
        "rank-2 projection": (basis * keep2, (basis * keep2).T, math.sqrt(1 - 2 / d), 0.0),
        "rotation": (basis @ rotation, basis.T, 1.0, 1.0),
        "zero": (torch.zeros(d, r), torch.zeros(r, d), 1.0, 1.0),
        "random": (torch.randn(d, r, generator=g), torch.randn(r, d, generator=g), None, None),
    }
    W_V = torch.stack([case[0] for case in cases.values()])[None]
    W_O = torch.stack([case[1] for case in cases.values()])[None]
    scores = ov_svd_scores(fake_model(W_V, W_O))
    for i, (name, (w_v, w_o, ident, proj)) in enumerate(cases.items()):
        brute_ident, brute_proj = explicit_distances(w_v @ w_o)
        assert abs(float(scores["ov_identity_distance"][0, i]) - brute_ident) < 1e-5, name
        assert abs(float(scores["ov_projection_distance"][0, i]) - brute_proj) < 1e-4, name
        if ident is not None:
            assert abs(float(scores["ov_identity_distance"][0, i]) - ident) < 1e-5, name
            assert abs(float(scores["ov_projection_distance"][0, i]) - proj) < 1e-4, name
    # The random head is neither identity- nor projection-like.
    assert float(scores["ov_projection_distance"][0, 5]) > 0.8


def test_full_width_identity_head_scores_zero():
    d = 6
    eye = torch.eye(d)[None, None]
    scores = ov_svd_scores(fake_model(2.0 * eye, eye))
    assert float(scores["ov_identity_distance"][0, 0]) < 1e-6
    assert float(scores["ov_projection_distance"][0, 0]) < 1e-6
    assert abs(float(scores["ov_effective_rank"][0, 0]) - d) < 1e-4
    assert abs(float(scores["ov_norm"][0, 0]) - 2.0 * math.sqrt(d)) < 1e-5


def test_spectra_equal_explicit_svd_and_helpers():
    g = torch.Generator().manual_seed(1)
    W_V, W_O = torch.randn(2, 3, 20, 5, generator=g), torch.randn(2, 3, 5, 20, generator=g)
    W_Q, W_K = torch.randn(2, 3, 20, 5, generator=g), torch.randn(2, 3, 20, 5, generator=g)
    fake = fake_model(W_V, W_O, W_Q=W_Q, W_K=W_K)
    ov, qk = ov_singular_values(fake), qk_singular_values(fake)
    assert ov.shape == qk.shape == (2, 3, 5)
    torch.testing.assert_close(ov, torch.linalg.svdvals(W_V @ W_O)[..., :5], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(qk, torch.linalg.svdvals(W_Q @ W_K.mT)[..., :5], atol=1e-4, rtol=1e-4)
    assert float(participation_ratio(torch.tensor([1.0, 0.0, 0.0]))) == pytest.approx(1.0)
    assert float(participation_ratio(torch.tensor([2.0, 2.0, 2.0]))) == pytest.approx(3.0)
    assert float(participation_ratio(torch.zeros(3))) == 0.0
    assert float(identity_distance(torch.tensor(0.0), torch.tensor(0.0), 4)) == 1.0
    assert float(projection_distance(torch.tensor(2.0), torch.tensor([1.0, 1.0]))) == pytest.approx(0.0, abs=1e-6)


def test_ov_norm_relative_and_writes_nothing_cutoff():
    g = torch.Generator().manual_seed(2)
    W_V, W_O = torch.randn(1, 4, 10, 3, generator=g), torch.randn(1, 4, 3, 10, generator=g)
    W_O[0, 2] *= 0.05  # a head writing at ~5% of its peers
    scores = ov_svd_scores(fake_model(W_V, W_O))
    norm = scores["ov_norm"][0]
    torch.testing.assert_close(scores["ov_norm_relative"][0], norm / norm.quantile(0.5))
    assert not scores["writes_nothing"].any()
    flagged = ov_svd_scores(fake_model(W_V, W_O), writes_nothing_below=0.2)["writes_nothing"][0]
    assert flagged.tolist() == [False, False, True, False]
    with pytest.raises(ScoreError, match="writes_nothing_below"):
        ov_svd_scores(fake_model(W_V, W_O), writes_nothing_below=1.5)


def test_positional_score_absent_for_rotary_models(tiny_llama_dir):
    model = headclass.load_model(tiny_llama_dir)
    assert model.W_pos is None
    scores = weight_scores(model, config={"weights": {"copy_sample_size": 32}})
    assert "positional_prev_token" not in scores
    assert set(scores) == set(WEIGHT_SCORE_KEYS) - {"positional_prev_token"}
    assert all(torch.isfinite(v.float()).all() for k, v in scores.items() if k not in NO_TOKENIZER_NAN)
    with pytest.raises(ScoreError, match="learned absolute position"):
        positional_prev_token_score(model)


def test_bad_options_are_named(tiny_gpt2):
    with pytest.raises(ScoreError, match="top_k"):
        topk_copy_scores(tiny_gpt2, top_k=0)
    with pytest.raises(headclass.ConfigError, match="copy_sample_size"):
        weight_scores(tiny_gpt2, config={"weights": {"copy_sample_size": 0}})


# -- the real model ----------------------------------------------------------------------------


def induction_scores(model, *, n_sequences: int = 4, segment: int = 40, seed: int = 0) -> torch.Tensor:
    """Mean attention from each token of a repeat to the token after its first occurrence.

    Inline (one hooked pass) so this test does not depend on :mod:`headclass.scores.patterns`.
    """
    g = torch.Generator().manual_seed(seed)
    ordinary = copy_token_sample(model, model.d_vocab)
    random = ordinary[torch.randint(0, ordinary.numel(), (n_sequences, segment), generator=g)]
    bos = torch.full((n_sequences, 1), model.bos_token_id)
    tokens = torch.cat([bos, random, random], 1)
    queries = torch.arange(segment + 1, 2 * segment + 1)
    keys = queries - segment + 1
    out = torch.zeros(model.n_layers, model.n_heads)

    def reduce(layer, pattern):
        out[layer] = pattern[:, :, queries, keys].mean((0, 2))

    model.run_with_patterns(tokens, reduce)
    return out


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_scores_finite_and_induction_heads_copy(smollm2):
    """Induction heads copy: the token they attend to is the one they predict.

    Through the effective embedding (W_E + MLP0, as the IOI paper reads GPT-2's OV circuits),
    every one of the five strongest induction heads has a positive eigenvalue copying score.
    Through the raw W_E the strongest ones do too, but SmolLM2's fourth (L17H5) sits at -0.02,
    so for the raw embedding only the average is asserted.
    """
    scores = weight_scores(smollm2, config={"weights": {"effective_embedding": True}})
    assert set(scores) == set(WEIGHT_SCORE_KEYS) - {"positional_prev_token"}  # rotary
    for key, value in scores.items():
        assert value.shape == (30, 9), key
        assert torch.isfinite(value.float()).all(), key
    words = {smollm2.tokenizer.decode(run) for run in successor_sequences(smollm2)}
    assert {
        "0123456789",
        " Monday Tuesday Wednesday Thursday Friday Saturday Sunday",
        " January February March April May June July August September October November December",
    } <= words
    assert (scores["successor"] >= 0).all() and (scores["successor_se"] > 0).any()
    raw = copy_eigen_score(ov_circuit_eigenvalues(smollm2))
    induction = induction_scores(smollm2).flatten()
    top = induction.argsort(descending=True)[:5]
    report = []
    for index in top.tolist():
        layer, head = divmod(index, smollm2.n_heads)
        report.append(
            f"L{layer}H{head}: induction {float(induction[index]):.2f}, copy_eigen "
            f"{float(scores['copy_eigen'][layer, head]):+.2f} (raw W_E {float(raw[layer, head]):+.2f})"
        )
    print("top induction heads of smollm2-135m:\n  " + "\n  ".join(report))
    assert float(induction[top[0]]) > 0.5
    layers, heads = top // smollm2.n_heads, top % smollm2.n_heads
    assert (scores["copy_eigen"][layers, heads] > 0).all(), report
    assert float(raw[layers, heads].mean()) > 0.2, report


# -- sampling errors, output gain, successor heads ---------------------------------------------


def test_sampling_errors_of_the_topk_scores(tiny_gpt2, planted_scores):
    p = torch.tensor([[0.0, 0.5], [0.2, 1.0]])
    torch.testing.assert_close(sampling_error(p, 100), (p * (1 - p) / 100).sqrt())
    finite = sampling_error(p, 100, population=200)
    torch.testing.assert_close(finite, (p * (1 - p) / 100).sqrt() * math.sqrt(100 / 199))
    assert (sampling_error(p, 200, population=200) == 0).all()
    assert sampling_error(p, 0).isnan().all()
    # the planted fixture samples every ordinary token: nothing is left to sampling
    assert (planted_scores["copy_topk_se"] == 0).all()
    scores = weight_scores(tiny_gpt2, config={"weights": {"copy_sample_size": 40}})
    population = tiny_gpt2.d_vocab - len(tiny_gpt2.special_token_ids())
    for key in ("copy_topk", "copy_suppression_topk"):
        torch.testing.assert_close(scores[f"{key}_se"], sampling_error(scores[key], 40, population))


def test_ov_gain_equals_explicit_output_norms(planted, planted_scores):
    tokens = copy_token_sample(planted, VOCAB)
    x = planted.W_E[tokens]
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    expected = torch.zeros(2, N_HEADS)
    for layer in range(2):
        for head in range(N_HEADS):
            out = x @ planted.W_V[layer, head] @ planted.W_O[layer, head]
            expected[layer, head] = ((out.norm(dim=-1) / x.norm(dim=-1)) ** 2).mean().sqrt()
    torch.testing.assert_close(planted_scores["ov_gain"], expected, atol=1e-5, rtol=1e-4)
    assert float(planted_scores["ov_gain"][0, 3]) == 0.0  # W_O = 0
    writing = expected[expected > 0]
    torch.testing.assert_close(planted_scores["ov_gain_relative"], expected / writing.median(), atol=1e-5, rtol=1e-4)
    direct = ov_gain_scores(planted, planted.W_E, tokens)
    torch.testing.assert_close(direct["ov_gain"], planted_scores["ov_gain"])


def test_writes_nothing_cutoff_is_the_config_key(planted):
    tiny = {"copy_sample_size": 16}
    default = weight_scores(planted, config={"weights": tiny})["writes_nothing"]
    assert default.tolist() == [[False, False, False, True], [False, False, False, False]]
    none = weight_scores(planted, config={"weights": {**tiny, "writes_nothing_below": 0.0}})["writes_nothing"]
    assert not none.any()  # 0 < 0 never holds, not even for the zero head
    with pytest.raises(headclass.ConfigError, match="writes_nothing_below"):
        weight_scores(planted, config={"weights": {"writes_nothing_below": 1.5}})


def test_successor_score_equals_explicit_ranking(tiny_gpt2):
    runs = [torch.tensor([3, 9, 4, 20, 7]), torch.tensor([11, 12, 13])]
    scores = successor_scores(tiny_gpt2, sequences=runs, embedding=tiny_gpt2.W_E)
    expected = torch.zeros(2, 4)
    for layer in range(2):
        for head in range(4):
            for run in runs:
                logits = (
                    tiny_gpt2.W_E[run] @ tiny_gpt2.W_V[layer, head] @ tiny_gpt2.W_O[layer, head] @ tiny_gpt2.W_U[:, run]
                )  # [item, item]
                for i in range(len(run) - 1):
                    others = torch.cat([logits[i, : i + 1], logits[i, i + 2 :]])
                    expected[layer, head] += float(logits[i, i + 1] > others.max())
    n = 4 + 2
    torch.testing.assert_close(scores["successor"], expected / n)
    torch.testing.assert_close(scores["successor_se"], sampling_error(expected / n, n))
    assert successor_sequences(tiny_gpt2) == []  # no tokenizer
    assert successor_scores(tiny_gpt2)["successor"].isnan().all()


@pytest.fixture(scope="module")
def roles_planted(tmp_path_factory):
    from planted import planted_roles_model

    return planted_roles_model(tmp_path_factory.mktemp("planted-roles"))


def test_planted_output_roles(roles_planted):
    """transform, successor, no-op and copy heads of the planted roles model, on their axis."""
    from planted import DIGIT_IDS

    model, roles = roles_planted
    assert [r.tolist() for r in successor_sequences(model)] == [list(DIGIT_IDS)]
    scores = weight_scores(model)
    at = {role: {key: float(value[roles[role]]) for key, value in scores.items()} for role in roles}
    assert at["successor"]["successor"] == 1.0 and at["successor"]["successor_se"] == 0.0
    for role in ("transform", "noop", "copy", "previous_token", "local"):
        assert at[role]["successor"] == 0.0, role
    assert at["copy"]["copy_topk"] == 1.0 and at["copy"]["copy_eigen"] > 0.99
    for role in ("transform", "successor"):  # substantial output, own token neither up nor down
        assert at[role]["copy_topk"] == 0.0 and at[role]["copy_suppression_topk"] == 0.0, role
        assert at[role]["ov_gain_relative"] > 0.5 and not at[role]["writes_nothing"], role
    assert at["noop"]["writes_nothing"] and at["noop"]["ov_gain_relative"] < 0.01
    assert at["transform"]["ov_gain_relative"] > 0.9 * at["copy"]["ov_gain_relative"]
