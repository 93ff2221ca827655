"""Head importance by ablation: planted induction circuit, reference agreement, attribution, API.

The planted model (:func:`planted_induction_lm`) predicts with a real two-layer induction
circuit, so its *logits* (not only its attention patterns) depend on the heads: ablating the
induction head or the previous-token head it K-composes with must ruin the second repeat.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from planted import ATTENTION_LAYOUT, D_MODEL, N_HEADS, VOCAB, build_planted_gpt2

import headclass
from headclass import ProbeError, ScoreError, probes
from headclass.scores.ablation import (
    SCORE_KEYS,
    ablation_dloss,
    ablation_scores,
    induction_targets,
    rank_correlation,
)
from headclass.testing import ablation_dloss_reference, ablation_scores_reference

# Weights of the planted read-out (see planted_induction_lm).
OUT_SCALE = 2.0  # the induction head writes this multiple of OUT[token]
UNEMBED_SCALE = 1.5  # logits read OUT[token] with this weight, after ln_f
JUNK_SCALE = 0.5  # the "unrelated" head (0, 1) writes this multiple of JUNK[token]


def planted_induction_lm(folder: Path) -> tuple[headclass.HeadModel, dict[str, tuple[int, int]]]:
    """tests/planted.py's two-layer attention model, made to *predict* by induction.

    ``planted.build_planted_gpt2`` plants the patterns: previous-token head (0, 0) writes the
    previous token into a subspace ``PT``; induction head (1, 0) attends from token ``t`` to
    the position after an earlier ``t`` (its keys read ``PT``). Its logits are tied to the
    embedding and meaningless. Here, on the same weights:

    * the induction head's value reads the attended token and its output writes it into a
      fresh subspace ``OUT`` (OV copying);
    * the unembedding is untied and reads ``OUT``: the model predicts "the token that followed
      the earlier copy of the current token", so the second repeat of ``[BOS] r r`` (distinct
      tokens) is predicted almost perfectly and the first is not;
    * the current-token head (0, 1), unrelated to induction, copies its token into a ``JUNK``
      subspace nothing reads (it only shifts LayerNorm scales a little), so that "unrelated"
      is not merely "writes nothing".

    Every other head writes nothing. Returns ``(model, roles)``.
    """
    hf_model, roles = build_planted_gpt2(ATTENTION_LAYOUT)
    d_head = D_MODEL // N_HEADS
    with torch.no_grad():
        tok = hf_model.transformer.wte.weight.double()  # T: one direction per token
        pos = hf_model.transformer.wpe.weight.double()  # P
        prev = hf_model.transformer.h[0].attn.c_proj.weight.double()[:VOCAB]  # PT (head 0 rows)
        used = torch.cat([torch.ones(1, D_MODEL, dtype=torch.float64), tok, pos, prev])
        # Orthonormal directions orthogonal to everything planted (and to all-ones).
        q, _ = torch.linalg.qr(
            torch.cat(
                [
                    used.T,
                    torch.randn(D_MODEL, 2 * VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
                ],
                1,
            )
        )
        free = q.T[used.shape[0] :]
        out_dirs, junk_dirs = free[:VOCAB], free[VOCAB : 2 * VOCAB]

        def copy_head(layer: int, head: int, target, scale: float, writers: int) -> None:
            # LayerNorm scales a residual of squared norm m (mean 0) by sqrt(d_model / m);
            # the value undoes it so the head moves exactly `scale` x one unit vector.
            c = math.sqrt(D_MODEL / (2.0 + writers))
            attn = hf_model.transformer.h[layer].attn
            for t in range(VOCAB):
                attn.c_attn.weight[:, 2 * D_MODEL + head * d_head + t] = (tok[t] / c).float()
                attn.c_proj.weight[head * d_head + t] = (scale * target[t]).float()

        copy_head(0, 1, junk_dirs, JUNK_SCALE, writers=0)
        copy_head(1, 0, out_dirs, OUT_SCALE, writers=1)
        hf_model.config.tie_word_embeddings = False
        hf_model.lm_head.weight = torch.nn.Parameter((UNEMBED_SCALE * out_dirs).float())
    path = Path(folder) / "planted-induction-lm"
    hf_model.save_pretrained(path)
    model = headclass.load_model(path, name="planted-induction-lm")
    flat = {role: heads[0] for role, heads in roles.items()}
    return model, flat


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir) -> headclass.HeadModel:
    """The grouped-query (4 heads, 2 KV heads) Llama of conftest, loaded."""
    return headclass.load_model(tiny_llama_dir)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_induction_lm(tmp_path_factory.mktemp("planted-induction"))


@pytest.fixture(scope="module")
def planted_probes(planted):
    model, _ = planted
    return {
        "induction": probes.repeated(model, n_sequences=4, segment_length=12, seed=0),
        "text": torch.randint(1, VOCAB, (3, 25), generator=torch.Generator().manual_seed(0)),
    }


def repeated_tokens(model, n_sequences=3, segment_length=10, seed=0) -> torch.Tensor:
    """``[BOS] r r`` token ids for models without a tokenizer (random segments, may repeat ids)."""
    g = torch.Generator().manual_seed(seed)
    segment = torch.randint(1, model.d_vocab, (n_sequences, segment_length), generator=g)
    return torch.cat([torch.zeros(n_sequences, 1, dtype=torch.long), segment, segment], dim=1)


# -- the planted induction circuit ----------------------------------------------------------
def test_planted_model_predicts_by_induction(planted, planted_probes):
    model, _ = planted
    probe = planted_probes["induction"]
    with torch.no_grad():
        logits = model.forward(probe.tokens, return_type="logits")
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), probe.tokens[:, 1:].flatten(), reduction="none"
    ).view(probe.tokens.shape[0], -1)
    second = induction_targets(probe.tokens)
    assert losses[second].mean() < 0.05  # second repeat: predicted
    assert losses[~second][1:].mean() > 1.0  # first repeat: guesswork


@pytest.mark.parametrize("method", ["mean", "zero"])
def test_planted_circuit_heads_matter_and_others_do_not(planted, planted_probes, method):
    model, roles = planted
    scores = ablation_scores(model, probes=planted_probes, method=method, progress=False)
    dloss = scores["ablation_induction_dloss"]
    induction, previous = dloss[roles["induction"]], dloss[roles["previous_token"]]
    assert induction > 1.0 and previous > 1.0  # sharp: > 1 nat per token
    sharp = min(induction, previous)
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            if (layer, head) not in (roles["induction"], roles["previous_token"]):
                assert abs(dloss[layer, head]) < 0.05 * sharp, (layer, head, float(dloss[layer, head]))
    # The unrelated writer does change the (unsaturated) text loss: the hook really ablated it.
    assert scores["ablation_text_dloss"][roles["current_token"]].abs() > 0.01


def test_planted_attribution_is_blind_where_the_loss_is_saturated(planted, planted_probes):
    """Documents attribution patching's known limit: the planted model predicts the second
    repeat with loss ~0, the gradient there is ~0, so the linear estimate sees nothing where
    exact ablation sees > 1 nat. (Why the docs say: check it with rank_correlation.)"""
    model, roles = planted
    fast = ablation_scores(model, probes=planted_probes, mode="attribution", progress=False)
    assert fast["ablation_induction_dloss"].abs().max() < 1e-3


# -- agreement with the one-head-per-pass reference ----------------------------------------
def _assert_same(fast: dict, ref: dict, tol: float = 1e-5) -> None:
    for key in SCORE_KEYS:
        assert torch.equal(fast[key].isnan(), ref[key].isnan()), key
        diff = (fast[key] - ref[key]).nan_to_num(0.0).abs().max()
        assert diff < tol, (key, float(diff))


@pytest.mark.parametrize("method", ["mean", "zero"])
@pytest.mark.parametrize("heads", [None, [(1, 2), (0, 1), (1, 0)]], ids=["all", "subset"])
@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_exact_matches_reference(request, fixture, method, heads):
    model = request.getfixturevalue(fixture)
    g = torch.Generator().manual_seed(1)
    given = {"induction": repeated_tokens(model), "text": torch.randint(1, model.d_vocab, (3, 21), generator=g)}
    fast = ablation_scores(model, probes=given, method=method, heads=heads, progress=False)
    ref = ablation_scores_reference(model, probes=given, method=method, heads=heads)
    _assert_same(fast, ref)
    if heads is not None:
        done = {
            (layer, h)
            for layer in range(model.n_layers)
            for h in range(model.n_heads)
            if not math.isnan(fast["ablation_text_dloss"][layer, h])
        }
        assert done == set(heads)


def test_targets_only_readout_is_used_and_exact(tiny_gpt2, tiny_llama):
    from headclass.scores.ablation import _UNEMBED_IN, _Readout

    for model in (tiny_gpt2, tiny_llama):
        tokens = repeated_tokens(model)
        seen = {}
        with torch.no_grad():
            logits = model.run_with_hooks(
                tokens, fwd_hooks=[(_UNEMBED_IN, lambda x, hook, seen=seen: seen.update(x=x))], return_type="logits"
            )
        assert _Readout.if_exact(model, seen["x"], logits, induction_targets(tokens)) is not None


def test_without_the_readout_the_model_logits_give_the_same_result(tiny_gpt2, monkeypatch):
    """Models whose logits are not x @ W_U + b_U (soft-capping...) take the full-logits path."""
    from headclass.scores import ablation

    tokens = repeated_tokens(tiny_gpt2)
    targets = induction_targets(tokens)
    fast = ablation_dloss(tiny_gpt2, tokens, targets=targets, progress=False)
    approx = ablation_dloss(tiny_gpt2, tokens, targets=targets, mode="attribution")
    monkeypatch.setattr(ablation._Readout, "if_exact", classmethod(lambda cls, *a: None))
    monkeypatch.setattr(ablation._Readout, "checked", classmethod(lambda cls, *a: None))
    assert (ablation_dloss(tiny_gpt2, tokens, targets=targets, progress=False) - fast).abs().max() < 1e-5
    slow_approx = ablation_dloss(tiny_gpt2, tokens, targets=targets, mode="attribution")
    assert (slow_approx - approx).abs().max() < 1e-5


def test_heads_per_pass_does_not_change_results(tiny_llama):
    tokens = repeated_tokens(tiny_llama)
    targets = induction_targets(tokens)
    one = ablation_dloss(tiny_llama, tokens, targets=targets, heads_per_pass=1, progress=False)
    three = ablation_dloss(tiny_llama, tokens, targets=targets, heads_per_pass=3, progress=False)
    ref = ablation_dloss_reference(tiny_llama, tokens, targets=targets)
    assert (one - ref).abs().max() < 1e-5 and (three - ref).abs().max() < 1e-5


def test_run_from_layer_matches_full_forward(tiny_llama):
    tokens = repeated_tokens(tiny_llama)
    resid = {}

    def store(layer):
        def hook(x, hook):
            resid[layer] = x.detach().clone()

        return hook

    with torch.no_grad():
        full = tiny_llama.run_with_hooks(
            tokens,
            fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", store(layer)) for layer in range(tiny_llama.n_layers)],
            return_type="logits",
        )
        for layer in range(tiny_llama.n_layers):
            assert (tiny_llama.run_from_layer(resid[layer], layer) - full).abs().max() < 1e-5


def test_run_from_layer_skips_earlier_blocks(tiny_gpt2):
    """Blocks below the start layer do not run (their attention hooks never fire)."""
    tokens = repeated_tokens(tiny_gpt2)
    fired = []
    with torch.no_grad():
        resid = {}
        tiny_gpt2.run_with_hooks(
            tokens, fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook: resid.update(r=x.clone()))]
        )
        tiny_gpt2.run_from_layer(
            resid["r"],
            1,
            fwd_hooks=[
                ("blocks.0.attn.hook_pattern", lambda x, hook: fired.append(0)),
                ("blocks.1.attn.hook_pattern", lambda x, hook: fired.append(1)),
            ],
        )
    assert fired == [1]


# -- attribution and rank correlation --------------------------------------------------------
def test_attribution_is_exact_for_a_linear_effect(tiny_gpt2):
    """For a tiny zero-ablation step the first-order estimate is the true change."""
    tokens = repeated_tokens(tiny_gpt2)
    approx = ablation_dloss(tiny_gpt2, tokens, method="zero", mode="attribution")
    exact = ablation_dloss(tiny_gpt2, tokens, method="zero", progress=False)
    assert rank_correlation(exact, approx) > 0.8
    assert torch.allclose(approx, exact, atol=0.05 * float(exact.abs().max()) + 1e-4)


def test_attribution_respects_heads_subset(tiny_llama):
    tokens = repeated_tokens(tiny_llama)
    some = ablation_dloss(tiny_llama, tokens, mode="attribution", heads=[(0, 3)])
    full = ablation_dloss(tiny_llama, tokens, mode="attribution")
    assert int((~some.isnan()).sum()) == 1
    assert torch.allclose(some[0, 3], full[0, 3])


def test_rank_correlation():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert rank_correlation(a, a * 10 + 3) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    assert rank_correlation(a, a**3) == pytest.approx(1.0)  # ranks, not values
    # against scipy's Spearman (average ranks for ties) on data with many ties
    from scipy import stats as scipy_stats  # a dev dependency: never skipped

    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randint(0, 6, (40,), generator=gen).double()
        y = x + torch.randint(0, 4, (40,), generator=gen).double()
        assert rank_correlation(x, y) == pytest.approx(scipy_stats.spearmanr(x.numpy(), y.numpy())[0], abs=1e-12)
    nan = float("nan")
    assert rank_correlation(torch.tensor([1.0, nan, 3.0, 2.0]), torch.tensor([1.0, 5.0, 3.0, 2.0])) == pytest.approx(
        1.0
    )
    assert math.isnan(rank_correlation(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 2.0])))


# -- probes, targets, errors -----------------------------------------------------------------
def test_induction_targets_mark_the_second_repeat():
    tokens = torch.tensor([[0, 5, 6, 7, 5, 6, 7], [0, 8, 9, 4, 8, 9, 4]])
    expected = torch.tensor([[False] * 4 + [True] * 2] * 2)
    assert torch.equal(induction_targets(tokens), expected)
    no_bos = tokens[:, 1:]
    assert torch.equal(induction_targets(no_bos), expected[:, 1:])
    with pytest.raises(ProbeError, match="repeated"):
        induction_targets(torch.tensor([[0, 1, 2, 3, 4, 5]]))


def test_probe_targets_agree_with_period_search(planted, planted_probes):
    from headclass.scores.ablation import _induction_probe_targets

    probe = planted_probes["induction"]
    assert torch.equal(_induction_probe_targets(probe, probe.tokens), induction_targets(probe.tokens))


def test_bad_arguments_are_named(tiny_gpt2):
    tokens = repeated_tokens(tiny_gpt2)
    with pytest.raises(ScoreError, match="'method'.*Got 'median'"):
        ablation_dloss(tiny_gpt2, tokens, method="median")
    with pytest.raises(ScoreError, match="'mode'"):
        ablation_dloss(tiny_gpt2, tokens, mode="fast")
    with pytest.raises(ScoreError, match=r"head \(5, 0\) is outside"):
        ablation_dloss(tiny_gpt2, tokens, heads=[(5, 0)])
    with pytest.raises(ScoreError, match="empty"):
        ablation_dloss(tiny_gpt2, tokens, heads=[])
    with pytest.raises(ProbeError, match=r"\[batch, pos - 1\]"):
        ablation_dloss(tiny_gpt2, tokens, targets=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ProbeError, match="repeated"):
        ablation_scores(tiny_gpt2, probes={"induction": torch.arange(1, 21).view(2, 10)})
    with pytest.raises(ProbeError, match="keys"):
        ablation_scores(tiny_gpt2, probes={"ind": tokens})


def test_no_tokenizer_gives_nan_text_scores_with_a_warning(planted):
    model, _ = planted
    assert model.tokenizer is None
    with pytest.warns(UserWarning, match="no tokenizer"):
        scores = ablation_scores(
            model, config={"ablation": {"induction_sequences": 2, "induction_segment_length": 8}}, progress=False
        )
    assert scores["ablation_text_dloss"].isnan().all()
    assert not scores["ablation_induction_dloss"].isnan().any()


def test_config_supplies_method_and_probe_sizes(planted):
    model, roles = planted
    cfg = {"ablation": {"method": "zero", "induction_sequences": 2, "induction_segment_length": 8}}
    with pytest.warns(UserWarning):
        via_config = ablation_scores(model, config=cfg, progress=False)
    given = {"induction": probes.repeated(model, 2, 8, seed=0), "text": torch.ones(1, 4, dtype=torch.long)}
    direct = ablation_scores(model, probes=given, method="zero", progress=False)
    assert torch.allclose(via_config["ablation_induction_dloss"], direct["ablation_induction_dloss"])


# -- SmolLM2 ----------------------------------------------------------------------------------
@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_top_induction_head_matters_more_than_median(smollm2):
    """Ablating the head with the highest induction attention raises induction loss more
    than ablating the median head (by induction attention): a real, measured effect."""
    probe = probes.repeated(smollm2, n_sequences=4, segment_length=32, seed=0)
    attention = torch.zeros(smollm2.n_layers, smollm2.n_heads)
    query = probe.induction_target >= 0
    rows = torch.arange(probe.tokens.shape[0])[:, None].expand_as(query)[query]
    cols = torch.arange(probe.tokens.shape[1])[None, :].expand_as(query)[query]
    keys = probe.induction_target[query]

    def score(layer, pattern):  # mean attention from each induction query to its target key
        attention[layer] = pattern[rows, :, cols, keys].mean(0).cpu()

    smollm2.run_with_patterns(probe.tokens, score)
    order = torch.argsort(attention.flatten(), descending=True)
    top = divmod(int(order[0]), smollm2.n_heads)
    median = divmod(int(order[len(order) // 2]), smollm2.n_heads)
    dloss = ablation_scores(
        smollm2, probes={"induction": probe, "text": probe.tokens[:, :16]}, heads=[top, median], progress=False
    )["ablation_induction_dloss"]
    assert dloss[top] > dloss[median] + 0.01, (top, float(dloss[top]), median, float(dloss[median]))


# -- the figure -------------------------------------------------------------------------------
def _table():
    import pandas as pd

    return pd.DataFrame(
        {
            "model": "m",
            "layer": [0, 0, 0, 1, 1, 1],
            "head": [0, 1, 2, 0, 1, 2],
            "relative_depth": [0.25, 0.25, 0.25, 0.75, 0.75, 0.75],
            "primary_label": ["copy", "copy", "induction", "copy", "bos", "induction"],
            "ablation_induction_dloss": [0.1, 0.3, 2.0, 0.05, 0.0, float("nan")],
            "ablation_text_dloss": [0.2, 0.4, 0.1, 0.6, 0.0, 0.3],
        }
    )


def test_importance_by_label_means_per_layer():
    from headclass.report.plots_ablation import importance_by_label

    data = importance_by_label(_table())
    copy0 = data[(data.score == "ablation_induction_dloss") & (data.primary_label == "copy") & (data.layer == 0)]
    assert copy0["mean_dloss"].item() == pytest.approx(0.2) and copy0["n_heads"].item() == 2
    assert copy0["heads"].item() == "L0H0 L0H1"
    # the NaN (not ablated) induction head of layer 1 leaves no row for that score
    assert data[(data.score == "ablation_induction_dloss") & (data.primary_label == "induction")].layer.tolist() == [0]
    only_copy = importance_by_label(_table(), labels=["copy"], x="relative_depth")
    assert set(only_copy.primary_label) == {"copy"} and set(only_copy.x) == {0.25, 0.75}


def test_fig_importance_by_label():
    from headclass.report.plots_ablation import fig_importance_by_label

    fig = fig_importance_by_label(_table())
    names = [t.name for t in fig.data]
    assert names.count("copy") == 2  # one trace per panel
    assert sum(t.showlegend is not False for t in fig.data if t.name == "copy") == 1
    copy_induction = next(t for t in fig.data if t.name == "copy" and t.xaxis == "x")
    assert list(copy_induction.y) == pytest.approx([0.2, 0.05])
    from fake_scores import random_taxonomy

    assert len(fig_importance_by_label(random_taxonomy(ablation=True), x="relative_depth").data) > 0
    with pytest.raises(ScoreError, match="ablation=True"):
        fig_importance_by_label(_table().drop(columns=["ablation_induction_dloss", "ablation_text_dloss"]))
    with pytest.raises(ScoreError, match="'x'"):
        fig_importance_by_label(_table(), x="depth")


def test_mode_comes_from_the_config_and_is_validated(tiny_gpt2):
    """``ablation.mode`` in the config picks attribution; a bad mode is named in the error."""
    import headclass
    from headclass.scores.ablation import ablation_scores

    tokens = torch.randint(1, tiny_gpt2.d_vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    probes = {"induction": torch.cat([tokens, tokens], dim=1), "text": tokens}
    pairs = [(0, 0), (1, 2)]
    from_config = ablation_scores(
        tiny_gpt2, config={"ablation": {"mode": "attribution"}}, probes=probes, heads=pairs, progress=False
    )
    explicit = ablation_scores(tiny_gpt2, probes=probes, heads=pairs, mode="attribution", progress=False)
    exact = ablation_scores(tiny_gpt2, probes=probes, heads=pairs, progress=False)
    for key in explicit:
        torch.testing.assert_close(from_config[key], explicit[key], equal_nan=True)
    assert not torch.allclose(
        exact["ablation_induction_dloss"].nan_to_num(), explicit["ablation_induction_dloss"].nan_to_num()
    )
    with pytest.raises(headclass.ConfigError, match="ablation.mode"):
        headclass.load_config({"ablation": {"mode": "fast"}})
