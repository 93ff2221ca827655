"""Attention-pattern scores: planted heads, formulas, TransformerLens agreement, one pass, errors."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from headclass import ProbeError, ScoreError, probes
from headclass.scores.patterns import (
    SCORE_NAMES,
    detect_head_scores,
    pattern_scores,
    pattern_scores_single_pass,
)
from planted import PLANTED_OFFSET, bos_only_model, planted_attention_model

TOKEN_MATCH = ("previous_token", "duplicate_token", "induction")


class CountingModel:
    """Wraps a model and counts forward passes and pattern callbacks per layer."""

    def __init__(self, model):
        self._model = model
        self.passes = 0
        self.callbacks: Counter = Counter()

    def __getattr__(self, name):
        return getattr(self._model, name)

    def run_with_patterns(self, tokens, callback, *, layers=None):
        self.passes += 1

        def counted(layer, pattern):
            self.callbacks[layer] += 1
            callback(layer, pattern)

        return self._model.run_with_patterns(tokens, counted, layers=layers)


class FakePatternModel:
    """A HeadModelLike that hands out fixed patterns ``[layer][batch, head, query, key]``.

    Row ``i`` of the patterns belongs to row ``i`` of ``tokens``; a chunk gets its own rows.
    """

    name = "fake-patterns"
    d_vocab = 50
    n_ctx = 100
    bos_token_id = 0
    prepends_bos = True

    def __init__(self, patterns, tokens):
        self.patterns, self.tokens = patterns, tokens
        self.n_layers = len(patterns)
        self.n_heads = patterns[0].shape[1]

    def run_with_patterns(self, tokens, callback, *, layers=None):
        rows = [int((self.tokens == row).all(-1).nonzero()[0]) for row in tokens]
        for layer, pattern in enumerate(self.patterns):
            callback(layer, pattern[rows])


def random_causal_patterns(n_layers, batch, heads, pos, seed=0, sharpness=3.0):
    generator = torch.Generator().manual_seed(seed)
    logits = sharpness * torch.randn(n_layers, batch, heads, pos, pos, generator=generator)
    mask = torch.ones(pos, pos, dtype=torch.bool).triu(1)
    return list(logits.masked_fill(mask, float("-inf")).softmax(-1).double())


def naive_scores(patterns, probe, *, exclude_bos=False, exclude_current=False, max_offset=8, min_keys=4):
    """Slow loop-by-loop reference of every formula in the module docs."""
    tokens = probe.tokens.tolist()
    s0 = int(probe.has_bos)
    n_layers, n_heads = len(patterns), patterns[0].shape[1]
    out = {name: torch.zeros(n_layers, n_heads, dtype=torch.float64) for name in SCORE_NAMES}
    out["fixed_offset_k"] = torch.zeros(n_layers, n_heads, dtype=torch.long)
    for layer, pattern in enumerate(patterns):
        for h in range(n_heads):
            values = {name: [] for name in SCORE_NAMES}
            offsets = [[] for _ in range(max_offset)]
            for b, row in enumerate(tokens):
                A = pattern[b, h]
                for q in range(len(row)):
                    den = 1.0 - exclude_bos * float(A[q, 0]) - exclude_current * float(A[q, q])

                    def share(keys):
                        keys = [k for k in keys if not (exclude_bos and k == 0)]
                        mass = sum(float(A[q, k]) for k in keys)
                        if not (exclude_bos or exclude_current):
                            return mass
                        return mass / den if den > 1e-4 else 0.0

                    if q - 1 >= s0:
                        values["previous_token"].append(share([q - 1]))
                    if q >= 1:
                        values["current_token"].append(float(A[q, q]))
                        values["bos"].append(float(A[q, 0]))
                    dup = [j for j in range(q) if row[j] == row[q]]
                    if dup:
                        values["duplicate_token"].append(share(dup))
                    ind = [k for k in range(1, q) if row[k - 1] == row[q]]
                    if ind:
                        values["induction"].append(share(ind))
                    for k in range(1, max_offset + 1):
                        if q - k >= s0:
                            offsets[k - 1].append(float(A[q, q - k]))
                    if q + 1 >= min_keys:
                        p = A[q, : q + 1]
                        entropy = -sum(float(x) * math.log(float(x)) for x in p if x > 0)
                        values["diffuse_entropy"].append(entropy / math.log(q + 1))
                        values["max_attention"].append(float(p.max()))
            for name, vals in values.items():
                if name != "fixed_offset":
                    out[name][layer, h] = sum(vals) / len(vals)
            means = [sum(v) / len(v) for v in offsets]
            best = max(range(max_offset), key=lambda i: means[i])
            out["fixed_offset"][layer, h] = means[best]
            out["fixed_offset_k"][layer, h] = best + 1
    return out


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_attention_model(tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="module")
def planted_scores(planted):
    model, _ = planted
    return pattern_scores(model, progress=False)  # default probes from the config


# -- planted heads ---------------------------------------------------------------------------


@pytest.mark.parametrize("score, role, floor", [
    ("previous_token", "previous_token", 0.9),
    ("current_token", "current_token", 0.9),
    ("bos", "bos", 0.9),
    ("induction", "induction", 0.9),
    ("duplicate_token", "duplicate_token", 0.9),
    ("diffuse_entropy", "diffuse", 0.95),
])
def test_planted_head_ranks_first(planted, planted_scores, score, role, floor):
    _, roles = planted
    values = planted_scores[score]
    layer, head = roles[role]
    assert values[layer, head] > floor
    others = values.clone()
    others[layer, head] = -1
    assert values[layer, head] > others.max()
    if score != "diffuse_entropy":  # the planted heads that are sharp elsewhere score low
        sharp = [roles[r] for r in ("previous_token", "current_token", "bos", "induction",
                                    "duplicate_token", "fixed_offset") if r != role]
        assert max(float(values[l, h]) for l, h in sharp) < 0.1


def test_planted_fixed_offset(planted, planted_scores):
    _, roles = planted
    for role, k in (("fixed_offset", PLANTED_OFFSET), ("previous_token", 1)):
        layer, head = roles[role]
        assert planted_scores["fixed_offset"][layer, head] > 0.9
        assert planted_scores["fixed_offset_k"][layer, head] == k
        per_k = planted_scores["fixed_offset_per_k"][layer, head]
        assert per_k[k - 1] > 0.9 and per_k.sum() - per_k[k - 1] < 0.05


def test_planted_diffuse_and_sharp_heads(planted, planted_scores):
    _, roles = planted
    for role in ("previous_token", "current_token", "bos", "fixed_offset"):
        layer, head = roles[role]
        assert planted_scores["diffuse_entropy"][layer, head] < 0.05
        assert planted_scores["max_attention"][layer, head] > 0.99
    layer, head = roles["diffuse"]
    assert planted_scores["max_attention"][layer, head] < 0.2
    mixed = planted_scores["bos"][roles["bos_and_current"]], planted_scores["current_token"][roles["bos_and_current"]]
    assert all(abs(float(v) - 0.5) < 0.01 for v in mixed)


@pytest.mark.parametrize("exclude_bos", [False, True])
def test_bos_only_heads_score_zero_not_nan(tmp_path, exclude_bos):
    model, roles = bos_only_model(tmp_path)
    probe = probes.repeated(model, 4, 20)
    scores = pattern_scores(model, probe, exclude_bos=exclude_bos, progress=False)
    for name in SCORE_NAMES:
        assert torch.isfinite(scores[name]).all(), name
    assert (scores["bos"] > 0.999).all() and (scores["max_attention"] > 0.999).all()
    for name in ("previous_token", "current_token", "induction", "duplicate_token",
                 "fixed_offset", "diffuse_entropy"):
        assert scores[name].abs().max() < 1e-6, name


# -- formulas ----------------------------------------------------------------------------------


@pytest.mark.parametrize("has_bos", [True, False])
@pytest.mark.parametrize("exclude_bos, exclude_current", [(False, False), (True, False), (True, True)])
def test_formulas_match_naive_loops(has_bos, exclude_bos, exclude_current):
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, 6, (3, 14), generator=generator)  # small vocabulary: many repeats
    if has_bos:
        tokens[:, 0] = 0
    model = FakePatternModel(random_causal_patterns(2, 3, 3, 14), tokens)
    probe = probes.from_tokens(model, tokens, has_bos=has_bos)
    ours = pattern_scores(model, probe, exclude_bos=exclude_bos, exclude_current_token=exclude_current,
                          progress=False, batch_size=2)
    ref = naive_scores(model.patterns, probe, exclude_bos=exclude_bos, exclude_current=exclude_current)
    for name in SCORE_NAMES:
        torch.testing.assert_close(ours[name].double(), ref[name], atol=1e-5, rtol=0, msg=name)
    assert torch.equal(ours["fixed_offset_k"], ref["fixed_offset_k"])


def test_scores_shapes_ranges_and_keys(tiny_gpt2):
    scores = pattern_scores(tiny_gpt2, probes.repeated(tiny_gpt2, 4, 12), progress=False)
    assert list(scores) == ["previous_token", "current_token", "bos", "induction", "duplicate_token",
                            "fixed_offset", "fixed_offset_k", "fixed_offset_per_k", "diffuse_entropy",
                            "max_attention"]
    per_k = scores.pop("fixed_offset_per_k")
    assert per_k.shape == (2, 4, 8)
    torch.testing.assert_close(per_k[..., 0], scores["previous_token"])
    torch.testing.assert_close(per_k.max(-1).values, scores["fixed_offset"])
    for name, value in scores.items():
        assert value.shape == (2, 4)
        if name != "fixed_offset_k":
            assert value.dtype == torch.float32 and 0 <= value.min() and value.max() <= 1
    assert scores["fixed_offset_k"].min() >= 1 and scores["fixed_offset_k"].max() <= 8
    subset = pattern_scores(tiny_gpt2, probes.repeated(tiny_gpt2, 4, 12), scores=["bos", "induction"],
                            progress=False)
    assert list(subset) == ["bos", "induction"]
    torch.testing.assert_close(subset["bos"], scores["bos"])


# -- chunking, pooling, one pass -------------------------------------------------------------


def test_chunking_gives_the_same_scores(tiny_gpt2):
    probe = probes.repeated(tiny_gpt2, 7, 12, n_repeats=3)
    whole = pattern_scores_single_pass(tiny_gpt2, probe)
    for size in (1, 3, 7):
        chunked = pattern_scores(tiny_gpt2, probe, batch_size=size, progress=False)
        for name in whole:
            torch.testing.assert_close(chunked[name], whole[name], atol=1e-6, rtol=1e-5, msg=name)
    detect = pattern_scores(tiny_gpt2, probe, batch_size=2, convention="detect_head", progress=False)
    torch.testing.assert_close(detect["induction"],
                               pattern_scores_single_pass(tiny_gpt2, probe, convention="detect_head")["induction"])


def test_probes_pool_by_valid_positions(tiny_gpt2):
    a = probes.repeated(tiny_gpt2, 3, 10, seed=1, name="a")
    b = probes.repeated(tiny_gpt2, 5, 20, seed=2, name="b")
    both = pattern_scores(tiny_gpt2, [a, b], progress=False)
    sa, sb = pattern_scores_single_pass(tiny_gpt2, a), pattern_scores_single_pass(tiny_gpt2, b)
    wa, wb = a.n_induction_positions, b.n_induction_positions
    torch.testing.assert_close(both["induction"], (wa * sa["induction"] + wb * sb["induction"]) / (wa + wb))
    na, nb = 3 * (a.n_positions - 2), 5 * (b.n_positions - 2)  # previous-token queries q >= 2
    torch.testing.assert_close(both["previous_token"],
                               (na * sa["previous_token"] + nb * sb["previous_token"]) / (na + nb))


def test_one_forward_pass_per_batch(tiny_gpt2):
    counting = CountingModel(tiny_gpt2)
    pattern_scores(counting, probes.repeated(tiny_gpt2, 10, 12), batch_size=4, progress=False)
    assert counting.passes == 3
    assert counting.callbacks == Counter({0: 3, 1: 3})


def test_progress_bar_reports_batches(tiny_gpt2, capsys):
    pattern_scores(tiny_gpt2, probes.repeated(tiny_gpt2, 4, 12), batch_size=2, progress=True)
    assert "2/2" in capsys.readouterr().err


# -- agreement with TransformerLens' detect_head ---------------------------------------------------


@pytest.mark.parametrize("exclude_bos, exclude_current", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("model_fixture", ["tiny_gpt2", "tiny_llama"])
def test_detect_head_convention_matches_transformer_lens(request, model_fixture, exclude_bos, exclude_current):
    model = request.getfixturevalue(model_fixture)
    generator = torch.Generator().manual_seed(5)
    random = probes.from_tokens(model, torch.randint(0, 12, (3, 30), generator=generator))  # with "a a"
    for probe in (probes.repeated(model, 3, 15, n_repeats=3), random):
        ours = pattern_scores_single_pass(model, probe, scores=TOKEN_MATCH, convention="detect_head",
                                          exclude_bos=exclude_bos, exclude_current_token=exclude_current)
        for name in TOKEN_MATCH:
            ref = detect_head_scores(model, probe.tokens, name, exclude_bos=exclude_bos,
                                     exclude_current_token=exclude_current)
            assert (ours[name] - ref.float()).abs().max() < 1e-4, (name, probe.name)


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    import headclass

    return headclass.load_model(tiny_llama_dir)


def test_detect_head_convention_on_planted_heads(planted):
    model, roles = planted
    probe = probes.repeated(model, 3, 20)
    ours = pattern_scores_single_pass(model, probe, scores=TOKEN_MATCH, convention="detect_head")
    for name in TOKEN_MATCH:
        ref = detect_head_scores(model, probe.tokens, name)
        assert (ours[name] - ref.float()).abs().max() < 1e-4
    # detect_head dilutes by every query row: an ideal induction head scores about 20/41
    assert abs(float(ours["induction"][roles["induction"]]) - 20 / 41) < 1e-3


# -- errors ----------------------------------------------------------------------------------


def test_probe_without_repeats_is_too_short_for_induction(tiny_gpt2):
    distinct = probes.from_tokens(tiny_gpt2, torch.arange(1, 41).reshape(2, 20))
    with pytest.raises(ProbeError, match=r"induction needs a repeated segment of >= 2 tokens; "
                                         r"probe 'tokens' has none\. Use probes\.repeated"):
        pattern_scores(tiny_gpt2, distinct, progress=False)
    # the other scores are fine on it
    assert "bos" in pattern_scores(tiny_gpt2, distinct, scores=["bos", "previous_token"], progress=False)


def test_text_only_probes_do_not_feed_induction(tiny_gpt2):
    text_like = probes.from_tokens(tiny_gpt2, torch.randint(1, 9, (2, 20)), name="text",
                                   scores=probes.TEXT_SCORES)
    with pytest.raises(ProbeError, match="no probe given feeds it.*Use probes.repeated"):
        pattern_scores(tiny_gpt2, text_like, progress=False)


def test_short_probe_for_diffuse(tiny_gpt2):
    with pytest.raises(ProbeError, match=r"(?s)induction needs.*diffuse_entropy needs sequences of >= 4 tokens"):
        pattern_scores(tiny_gpt2, probes.from_tokens(tiny_gpt2, [[0, 3, 3]]), progress=False)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(scores=["inductoin"]), ScoreError, "unknown score name"),
    (dict(convention="tl"), ScoreError, "convention must be one of"),
    (dict(batch_size=0), ProbeError, "batch_size must be an int >= 1"),
    (dict(probes=[]), ProbeError, "at least one probe"),
    (dict(probes=[torch.zeros(2, 3)]), ProbeError, "must be Probe objects"),
])
def test_bad_arguments(tiny_gpt2, kwargs, error, words):
    kwargs.setdefault("probes", probes.repeated(tiny_gpt2, 2, 5))
    with pytest.raises(error, match=words):
        pattern_scores(tiny_gpt2, progress=False, **kwargs)


def test_bad_token_batches_for_single_pass(tiny_gpt2):
    with pytest.raises(ProbeError, match="is empty"):
        pattern_scores_single_pass(tiny_gpt2, torch.zeros(0, 8, dtype=torch.long))
    with pytest.raises(ProbeError, match=r"\[0, 127\]"):
        pattern_scores_single_pass(tiny_gpt2, torch.full((2, 8), 500))
    with pytest.raises(ProbeError, match="mismatched lengths"):
        pattern_scores_single_pass(tiny_gpt2, probes.from_tokens(tiny_gpt2, [[1, 2, 3], [4, 5]]))


def test_nan_pattern_names_the_layer():
    patterns = random_causal_patterns(3, 2, 2, 10)
    patterns[1] = patterns[1].clone()
    patterns[1][0, 1, 2, 1] = float("nan")  # a row the entropy score does not cover
    tokens = torch.randint(1, 4, (2, 10), generator=torch.Generator().manual_seed(0))
    model = FakePatternModel(patterns, tokens)
    probe = probes.from_tokens(model, tokens)
    with pytest.raises(ScoreError, match="layer 1 contains NaN"):
        pattern_scores(model, probe, progress=False)
    with pytest.raises(ScoreError, match="layer 1 contains NaN"):
        pattern_scores(model, probe, scores=["bos"], progress=False)


# -- the real model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_repeated(smollm2):
    return probes.repeated(smollm2, 4, 32, seed=0)


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_has_induction_and_previous_token_heads_in_one_pass(smollm2, smollm2_repeated):
    counting = CountingModel(smollm2)
    scores = pattern_scores(counting, smollm2_repeated, batch_size=4, progress=False)
    assert counting.passes == 1
    assert set(counting.callbacks.values()) == {1} and len(counting.callbacks) == smollm2.n_layers
    assert scores["induction"].max() > 0.7
    assert scores["previous_token"].max() > 0.7


@pytest.mark.smollm2
@pytest.mark.slow
@pytest.mark.parametrize("name", TOKEN_MATCH)
def test_smollm2_agrees_with_detect_head(smollm2, smollm2_repeated, name):
    ref = detect_head_scores(smollm2, smollm2_repeated.tokens, name)
    exact = pattern_scores_single_pass(smollm2, smollm2_repeated, scores=[name], convention="detect_head")
    assert (exact[name] - ref.float()).abs().max() < 1e-4
    ours = pattern_scores_single_pass(smollm2, smollm2_repeated, scores=[name])
    assert set(ours[name].flatten().topk(5).indices.tolist()) == set(ref.flatten().topk(5).indices.tolist())


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_text_probe(smollm2):
    probe = probes.text(smollm2, max_tokens=128, n_sequences=16)
    assert probe.tokens.shape == (16, 128)  # every shipped paragraph has >= 127 tokens
    assert probe.has_bos and (probe.tokens[:, 0] == smollm2.bos_token_id).all()
    special = smollm2.special_token_ids() - {smollm2.bos_token_id}
    assert not any(int(t) in special for t in probe.tokens[:, 1:].flatten())
