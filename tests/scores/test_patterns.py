"""Attention-pattern scores: planted heads, formulas, TransformerLens agreement, one pass, errors."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from planted import (
    PLANTED_OFFSET,
    bos_only_model,
    planted_attention_model,
    planted_roles_model,
)

from headclass import ProbeError, ScoreError, probes
from headclass.scores.patterns import (
    BUDGET_CLASSES,
    PATTERN_KEYS,
    PATTERN_SCORES,
    SCORE_NAMES,
    delimiter_token_mask,
    pattern_measurement,
    pattern_scores,
    pattern_scores_single_pass,
)
from headclass.testing import detect_head_scores

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

    def __init__(self, patterns, tokens, tokenizer=None):
        self.patterns, self.tokens, self.tokenizer = patterns, tokens, tokenizer
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

                    def share(keys, A=A, q=q, den=den):
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


@pytest.mark.parametrize(
    "score, role, floor",
    [
        ("previous_token", "previous_token", 0.9),
        ("current_token", "current_token", 0.9),
        ("bos", "bos", 0.9),
        ("induction", "induction", 0.9),
        ("duplicate_token", "duplicate_token", 0.9),
        ("diffuse_entropy", "diffuse", 0.95),
    ],
)
def test_planted_head_ranks_first(planted, planted_scores, score, role, floor):
    _, roles = planted
    values = planted_scores[score]
    layer, head = roles[role]
    assert values[layer, head] > floor
    others = values.clone()
    others[layer, head] = -1
    assert values[layer, head] > others.max()
    if score != "diffuse_entropy":  # the planted heads that are sharp elsewhere score low
        sharp = [
            roles[r]
            for r in ("previous_token", "current_token", "bos", "induction", "duplicate_token", "fixed_offset")
            if r != role
        ]
        assert max(float(values[layer, head]) for layer, head in sharp) < 0.1


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
    for name in ("previous_token", "current_token", "induction", "duplicate_token", "fixed_offset", "diffuse_entropy"):
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
    ours = pattern_scores(
        model, probe, exclude_bos=exclude_bos, exclude_current_token=exclude_current, progress=False, batch_size=2
    )
    ref = naive_scores(model.patterns, probe, exclude_bos=exclude_bos, exclude_current=exclude_current)
    for name in SCORE_NAMES:
        torch.testing.assert_close(ours[name].double(), ref[name], atol=1e-5, rtol=0, msg=name)
    assert torch.equal(ours["fixed_offset_k"], ref["fixed_offset_k"])


def test_scores_shapes_ranges_and_keys(tiny_gpt2):
    scores = pattern_scores(tiny_gpt2, probes.repeated(tiny_gpt2, 4, 12), progress=False)
    core = [key for key in scores if not key.endswith("_se") and not key.startswith(("budget", "positional"))]
    assert core == [
        "previous_token",
        "current_token",
        "bos",
        "induction",
        "duplicate_token",
        "fixed_offset",
        "fixed_offset_k",
        "fixed_offset_per_k",
        "diffuse_entropy",
        "max_attention",
    ]
    # a repeated probe (scores=None) feeds the _rep budget and consistency, not the text ones
    assert {f"budget_rep_{c}" for c in BUDGET_CLASSES} <= set(scores)
    assert "positional_consistency_rep" in scores and "positional_consistency" in PATTERN_SCORES
    assert not any(key.startswith(("budget_first", "positional_consistency_se")) for key in scores)
    assert "positional_consistency" not in scores
    scores = {key: value for key, value in scores.items() if key in core}
    per_k = scores.pop("fixed_offset_per_k")
    assert per_k.shape == (2, 4, 8)
    torch.testing.assert_close(per_k[..., 0], scores["previous_token"])
    torch.testing.assert_close(per_k.max(-1).values, scores["fixed_offset"])
    for name, value in scores.items():
        assert value.shape == (2, 4)
        if name != "fixed_offset_k":
            assert value.dtype == torch.float32 and 0 <= value.min() and value.max() <= 1
    assert scores["fixed_offset_k"].min() >= 1 and scores["fixed_offset_k"].max() <= 8
    subset = pattern_scores(tiny_gpt2, probes.repeated(tiny_gpt2, 4, 12), scores=["bos", "induction"], progress=False)
    assert list(subset) == ["bos", "bos_se", "induction", "induction_se"]
    torch.testing.assert_close(subset["bos"], scores["bos"])


# -- chunking, pooling, one pass -------------------------------------------------------------


def test_chunking_gives_the_same_scores(tiny_gpt2):
    probe = probes.repeated(tiny_gpt2, 7, 12, n_repeats=3)
    whole = pattern_scores_single_pass(tiny_gpt2, probe)
    for size in (1, 3, 7):
        chunked = pattern_scores(tiny_gpt2, probe, batch_size=size, progress=False)
        for name in whole:
            torch.testing.assert_close(chunked[name], whole[name], atol=1e-6, rtol=1e-5, equal_nan=True, msg=name)
    detect = pattern_scores(tiny_gpt2, probe, batch_size=2, convention="detect_head", progress=False)
    torch.testing.assert_close(
        detect["induction"], pattern_scores_single_pass(tiny_gpt2, probe, convention="detect_head")["induction"]
    )


def test_probes_pool_by_valid_positions(tiny_gpt2):
    a = probes.repeated(tiny_gpt2, 3, 10, seed=1, name="a")
    b = probes.repeated(tiny_gpt2, 5, 20, seed=2, name="b")
    both = pattern_scores(tiny_gpt2, [a, b], progress=False)
    sa, sb = pattern_scores_single_pass(tiny_gpt2, a), pattern_scores_single_pass(tiny_gpt2, b)
    wa, wb = a.n_induction_positions, b.n_induction_positions
    torch.testing.assert_close(both["induction"], (wa * sa["induction"] + wb * sb["induction"]) / (wa + wb))
    na, nb = 3 * (a.n_positions - 2), 5 * (b.n_positions - 2)  # previous-token queries q >= 2
    torch.testing.assert_close(
        both["previous_token"], (na * sa["previous_token"] + nb * sb["previous_token"]) / (na + nb)
    )


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
        ours = pattern_scores_single_pass(
            model,
            probe,
            scores=TOKEN_MATCH,
            convention="detect_head",
            exclude_bos=exclude_bos,
            exclude_current_token=exclude_current,
        )
        for name in TOKEN_MATCH:
            ref = detect_head_scores(
                model, probe.tokens, name, exclude_bos=exclude_bos, exclude_current_token=exclude_current
            )
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
    with pytest.raises(
        ProbeError,
        match=r"induction needs a repeated segment of >= 2 tokens; "
        r"probe 'tokens' has none\. Use probes\.repeated",
    ):
        pattern_scores(tiny_gpt2, distinct, progress=False)
    # the other scores are fine on it
    assert "bos" in pattern_scores(tiny_gpt2, distinct, scores=["bos", "previous_token"], progress=False)


def test_text_only_probes_do_not_feed_induction(tiny_gpt2):
    text_like = probes.from_tokens(tiny_gpt2, torch.randint(1, 9, (2, 20)), name="text", scores=probes.TEXT_SCORES)
    with pytest.raises(ProbeError, match="no probe given feeds it.*Use probes.repeated"):
        pattern_scores(tiny_gpt2, text_like, progress=False)


def test_text_budget_needs_a_probe_that_names_it(tiny_gpt2):
    with pytest.raises(ProbeError, match=r"budget .*no probe given feeds it.*name 'budget' in Probe\.scores"):
        pattern_scores(tiny_gpt2, probes.repeated(tiny_gpt2, 2, 6), scores=["budget"], progress=False)


def test_short_probe_for_diffuse(tiny_gpt2):
    with pytest.raises(ProbeError, match=r"(?s)induction needs.*diffuse_entropy needs sequences of >= 4 tokens"):
        pattern_scores(tiny_gpt2, probes.from_tokens(tiny_gpt2, [[0, 3, 3]]), progress=False)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(scores=["inductoin"]), ScoreError, "unknown score name"),
        (dict(convention="tl"), ScoreError, "convention must be one of"),
        (dict(batch_size=0), ProbeError, "batch_size must be an int >= 1"),
        (dict(probes=[]), ProbeError, "at least one probe"),
        (dict(probes=[torch.zeros(2, 3)]), ProbeError, "must be Probe objects"),
    ],
)
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


# -- attention budget --------------------------------------------------------------------------


class FakeTokenizer:
    """Just what :func:`delimiter_token_mask` reads: a length and single-id decoding."""

    def __init__(self, strings):
        self.strings = list(strings)

    def __len__(self):
        return len(self.strings)

    def batch_decode(self, ids):
        return [self.strings[row[0]] for row in ids]


FAKE_STRINGS = ["<s>", "a", ".", "b", "\n", " ,", "c", "d?", " ", "\ufffd"] + [f"w{i}" for i in range(10, 50)]
FAKE_DELIMITERS = {2, 4, 5, 8}  # ".", "\n", " ,", " " (not "d?", not the replacement character)


def naive_budget(patterns, probe, delimiters, window):
    """Loop reference: every key of every query q >= 1 goes to its first matching class.

    Returns per-sequence sums ``[seq, layer, head, class]``, query counts ``[seq]`` and the
    per-sequence sums of a uniform head ``[seq, class]``.
    """
    tokens = probe.tokens.tolist()
    n_layers, n_heads = len(patterns), patterns[0].shape[1]
    sums = torch.zeros(len(tokens), n_layers, n_heads, len(BUDGET_CLASSES), dtype=torch.float64)
    counts = torch.zeros(len(tokens), dtype=torch.float64)
    base = torch.zeros(len(tokens), len(BUDGET_CLASSES), dtype=torch.float64)
    for b, row in enumerate(tokens):
        for q in range(1, len(row)):
            counts[b] += 1
            for k in range(q + 1):
                if k == 0:
                    c = "first"
                elif k == q:
                    c = "self"
                elif k == q - 1:
                    c = "previous"
                elif q - k <= window:
                    c = "local"
                elif row[k] == row[q]:
                    c = "duplicate"
                elif row[k - 1] == row[q]:
                    c = "induction"
                elif row[k] in delimiters:
                    c = "delimiter"
                else:
                    c = "other"
                i = BUDGET_CLASSES.index(c)
                base[b, i] += 1.0 / (q + 1)
                for layer, pattern in enumerate(patterns):
                    sums[b, layer, :, i] += pattern[b, :, q, k].double()
    return sums, counts, base


def budget_model(seed=3, batch=4, pos=16, uniform=False):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 9, (batch, pos), generator=generator)  # many repeats and delimiters
    tokens[:, 0] = 0
    patterns = random_causal_patterns(2, batch, 3, pos, seed=seed)
    if uniform:
        rows = torch.ones(pos, pos, dtype=torch.float64).tril()
        patterns = [(rows / rows.sum(-1, keepdim=True)).expand_as(p).clone() for p in patterns]
    return FakePatternModel(patterns, tokens, FakeTokenizer(FAKE_STRINGS)), tokens


def test_delimiter_mask_reads_the_decoded_strings():
    model, _ = budget_model()
    assert set(delimiter_token_mask(model).nonzero().flatten().tolist()) == FAKE_DELIMITERS
    model.tokenizer = None
    assert not delimiter_token_mask(model).any()


def test_delimiter_mask_of_some_ids_decodes_only_those():
    model, _ = budget_model()
    decoded = []
    decode = model.tokenizer.batch_decode
    model.tokenizer.batch_decode = lambda ids: decoded.extend(i for (i,) in ids) or decode(ids)
    some = torch.tensor([[2, 3, 3], [8, 9, 40]])
    mask = delimiter_token_mask(model, ids=some)
    assert sorted(decoded) == [2, 3, 8, 9, 40]
    assert set(mask.nonzero().flatten().tolist()) == {2, 8}  # only the ids asked for
    decoded.clear()
    mask = delimiter_token_mask(model, ids=torch.tensor([2, 4, 5]))
    assert decoded == [4, 5]  # 2 was decoded already: kept per tokenizer
    assert set(mask.nonzero().flatten().tolist()) == {2, 4, 5}
    assert set(delimiter_token_mask(model).nonzero().flatten().tolist()) == FAKE_DELIMITERS


@pytest.mark.parametrize("window", [2, 4])
@pytest.mark.parametrize("text", [True, False])
def test_budget_matches_naive_loops(window, text):
    model, tokens = budget_model()
    feeds = probes.TEXT_SCORES | {"budget"} if text else None
    probe = probes.from_tokens(model, tokens, has_bos=True, name="text" if text else "rep", scores=feeds)
    prefix = "budget" if text else "budget_rep"
    # alone, and with the scores whose entries it then reuses (BOS, self, offsets)
    alone, shared = (
        pattern_scores(
            model, probe, scores=names, batch_size=3, progress=False, config={"patterns": {"local_window": window}}
        )
        for names in ([prefix], [prefix, "bos", "current_token", "fixed_offset"])
    )
    for key, value in alone.items():
        torch.testing.assert_close(shared[key], value, equal_nan=True, msg=key)
    ours = shared
    sums, counts, base = naive_budget(model.patterns, probe, FAKE_DELIMITERS, window)
    share = sums.sum(0) / counts.sum()
    rate = base.sum(0) / counts.sum()
    for i, c in enumerate(BUDGET_CLASSES):
        torch.testing.assert_close(ours[f"{prefix}_{c}"].double(), share[..., i], atol=1e-6, rtol=0, msg=c)
        assert torch.allclose(ours[f"{prefix}_base_{c}"].double(), rate[i].expand(2, 3), atol=1e-6)
        if rate[i] > 0:
            torch.testing.assert_close(
                ours[f"{prefix}_lift_{c}"].double(), share[..., i] / rate[i], atol=1e-5, rtol=1e-5
            )
        else:
            assert ours[f"{prefix}_lift_{c}"].isnan().all()
    assert rate[BUDGET_CLASSES.index("delimiter")] > 0 and rate[BUDGET_CLASSES.index("duplicate")] > 0
    total = sum(ours[f"{prefix}_{c}"] for c in BUDGET_CLASSES)
    assert (total - 1).abs().max() < 1e-5


def test_a_uniform_head_gets_its_base_rates():
    model, tokens = budget_model(uniform=True)
    scores = pattern_scores(model, probes.from_tokens(model, tokens), scores=["budget_rep"], progress=False)
    for c in BUDGET_CLASSES:
        torch.testing.assert_close(scores[f"budget_rep_{c}"], scores[f"budget_rep_base_{c}"], atol=1e-6, rtol=0)


def test_budget_rows_sum_to_one_on_a_real_model(tiny_gpt2):
    scores = pattern_scores(tiny_gpt2, probes.repeated(tiny_gpt2, 3, 20), progress=False)
    total = sum(scores[f"budget_rep_{c}"] for c in BUDGET_CLASSES)
    assert (total - 1).abs().max() < 1e-5


def test_planted_budgets_match_their_construction(planted):
    model, roles = planted
    probe = probes.repeated(model, 6, 31)
    scores = pattern_scores(model, probe, progress=False)
    budget = {c: scores[f"budget_rep_{c}"] for c in BUDGET_CLASSES}
    for role, cls in (
        ("previous_token", "previous"),
        ("current_token", "self"),
        ("bos", "first"),
        ("fixed_offset", "local"),
    ):  # offset 3 lies in the window 2..4
        assert budget[cls][roles[role]] > 0.9, (role, cls)
    # induction / duplicate heads spend on their class exactly what their score says, at the
    # queries that have a target (the second copy): the two reductions agree
    queries = probe.n_sequences * (probe.n_positions - 1)
    for role, cls, n in (
        ("induction", "induction", probe.n_induction_positions),
        ("duplicate_token", "duplicate", probe.n_duplicate_positions),
    ):
        expected = scores[role][roles[role]] * n / queries
        assert abs(float(budget[cls][roles[role]] - expected)) < 1e-4
        assert scores[f"budget_rep_lift_{cls}"][roles[role]] > 5
    half = roles["bos_and_current"]
    assert abs(float(budget["first"][half]) - 0.5) < 0.01 and abs(float(budget["self"][half]) - 0.5) < 0.01
    uniform = roles["diffuse"]
    for c in BUDGET_CLASSES:
        assert abs(float(scores[f"budget_rep_lift_{c}"][uniform]) - 1) < 1e-4 or budget[c][uniform] == 0


@pytest.fixture(scope="module")
def roles_planted(tmp_path_factory):
    return planted_roles_model(tmp_path_factory.mktemp("planted-roles"))


def roles_probes(model, seed=0):
    """Repeated tokens, and a text-like probe: random words with a delimiter about every 6th."""
    generator = torch.Generator().manual_seed(seed)
    words = torch.randint(2, 32, (12, 60), generator=generator)
    words[:, 0] = model.bos_token_id
    text = probes.from_tokens(
        model, words, name="text", scores=probes.TEXT_SCORES | {"budget", "positional_consistency"}
    )
    return [probes.repeated(model, 12, 28, seed=seed), text]


def test_planted_local_delimiter_and_content_heads(roles_planted):
    model, roles = roles_planted
    scores = pattern_scores(model, roles_probes(model), progress=False)
    local = roles["local"]
    for prefix in ("budget", "budget_rep"):
        assert scores[f"{prefix}_previous"][local] + scores[f"{prefix}_local"][local] > 0.95
        assert abs(float(scores[f"{prefix}_local"][local]) - 2 / 3) < 0.05  # offsets 2, 3 of 1..3
    delimiter, content = roles["delimiter"], roles["content"]
    assert scores["budget_delimiter"][delimiter] > 0.5
    assert scores["budget_lift_delimiter"][delimiter] > 5
    assert scores["budget_lift_delimiter"][content] < 0.1  # it never looks at a delimiter
    for role in ("previous_token", "local", "transform", "successor", "noop", "copy"):
        assert scores["budget_lift_delimiter"][roles[role]] < 1.5, role


def test_positional_consistency_matches_pairwise_loops():
    model, tokens = budget_model(batch=5, pos=15, seed=6)
    probe = probes.from_tokens(model, tokens)
    ours = pattern_scores(model, probe, scores=["positional_consistency_rep"], batch_size=2, progress=False)
    rows = list(range(2, 15, 4))  # queries 2, 6, 10, 14; keys >= 1
    for layer, pattern in enumerate(model.patterns):
        window = pattern[:, :, rows, 1:].double()  # [seq, head, query, key]
        cross = sum((window[b] * window[c]).sum((-2, -1)) for b in range(5) for c in range(5) if b != c)
        own = sum((window[b] * window[b]).sum((-2, -1)) for b in range(5))
        torch.testing.assert_close(
            ours["positional_consistency_rep"][layer].double(), cross / (4 * own), atol=1e-6, rtol=1e-5
        )


def test_positional_consistency_separates_position_from_content(roles_planted, planted):
    model, roles = roles_planted
    scores = pattern_scores(model, roles_probes(model), progress=False)
    for key in ("positional_consistency", "positional_consistency_rep"):
        for role in ("previous_token", "local", "successor", "noop", "copy"):  # position decides
            assert scores[key][roles[role]] > 0.99, (key, role)
        for role in ("delimiter", "content"):  # tokens decide
            assert scores[key][roles[role]] < 0.3, (key, role)
    model, roles = planted
    scores = pattern_scores(model, probes.repeated(model, 6, 31), progress=False)
    for role in ("previous_token", "current_token", "diffuse", "fixed_offset", "bos_and_current"):
        assert scores["positional_consistency_rep"][roles[role]] > 0.99, role


# -- uncertainty -------------------------------------------------------------------------------


def test_standard_errors_follow_the_stratified_ratio_formula():
    model, tokens = budget_model(batch=6, pos=14)
    a = probes.from_tokens(model, tokens[:4], name="a")
    b = probes.from_tokens(model, tokens[4:], name="b")
    ours = pattern_scores(model, [a, b], scores=["bos", "budget_rep", "induction"], batch_size=4, progress=False)
    per_sequence = torch.stack([p[:, :, 1:, 0].double().sum(-1) for p in model.patterns], 1)  # [seq, L, H]
    counts = torch.full((6,), 13.0, dtype=torch.float64)
    sums_budget, counts_budget, _ = naive_budget(model.patterns, probes.from_tokens(model, tokens), FAKE_DELIMITERS, 4)

    def stratified_se(sums, counts):
        ratio = sums.sum(0) / counts.sum()
        residual = sums - ratio * counts.view(-1, *[1] * (sums.ndim - 1))
        variance = 0
        for rows in (slice(0, 4), slice(4, 6)):
            part = residual[rows]
            n = part.shape[0]
            variance = variance + n / (n - 1) * ((part - part.mean(0)) ** 2).sum(0)
        return variance.sqrt() / counts.sum()

    torch.testing.assert_close(ours["bos_se"].double(), stratified_se(per_sequence, counts), atol=1e-7, rtol=1e-5)
    first = stratified_se(sums_budget[..., 0], counts_budget)
    torch.testing.assert_close(ours["budget_rep_first_se"].double(), first, atol=1e-7, rtol=1e-5)
    assert (ours["induction_se"] > 0).all() and torch.isfinite(ours["induction_se"]).all()


def test_standard_error_matches_the_bootstrap_spread():
    model, tokens = budget_model(batch=40, pos=12, seed=5)
    run = pattern_measurement(
        model, probes.from_tokens(model, tokens), scores=["bos", "previous_token"], progress=False
    )
    replicates = run.bootstrap(400, seed=1)
    for name in ("bos", "previous_token"):
        assert replicates[name].shape == (400, 2, 3)
        ratio = replicates[name].std(0) / run.scores[f"{name}_se"]
        assert ((ratio > 0.8) & (ratio < 1.25)).all(), (name, ratio)


def test_a_bootstrap_replicate_is_the_score_of_its_resampled_probes():
    model, tokens = budget_model(batch=7, pos=14, seed=2)
    a = probes.from_tokens(model, tokens[:4], name="a")
    b = probes.from_tokens(model, tokens[4:], name="b", scores=probes.TEXT_SCORES | {"budget"})
    run = pattern_measurement(model, [a, b], progress=False)
    replicates = run.bootstrap(3, seed=9)
    draws = run.bootstrap_draws(3, seed=9)
    assert [d.shape for d in draws] == [(3, 4), (3, 3)]
    for r in range(3):
        resampled = [
            probes.from_tokens(model, a.tokens[draws[0][r]], name="a"),
            probes.from_tokens(model, b.tokens[draws[1][r]], name="b", scores=b.scores),
        ]
        direct = pattern_scores(model, resampled, progress=False)
        for key, value in replicates.items():
            torch.testing.assert_close(value[r], direct[key], atol=1e-6, rtol=1e-5, equal_nan=True, msg=key)
    assert not any(key.endswith("_se") or key.startswith("positional") for key in replicates)
    assert torch.equal(run.bootstrap(3, seed=9)["bos"], replicates["bos"])
    assert not torch.equal(run.bootstrap(3, seed=8)["bos"], replicates["bos"])


def test_planted_scores_do_not_depend_on_the_batch_size(planted):
    model, _ = planted
    probe = probes.repeated(model, 16, 31)
    one = pattern_scores(model, probe, batch_size=1, progress=False)
    all16 = pattern_scores(model, probe, batch_size=16, progress=False)
    assert list(one) == list(all16)
    for key in one:
        torch.testing.assert_close(one[key], all16[key], atol=1e-6, rtol=1e-5, equal_nan=True, msg=key)


def test_bfloat16_patterns_accumulate_in_float32():
    generator = torch.Generator().manual_seed(4)
    tokens = torch.randint(1, 40, (6, 96), generator=generator)
    tokens[:, 0] = 0
    patterns = [p.to(torch.bfloat16) for p in random_causal_patterns(1, 6, 2, 96, seed=4, sharpness=0.5)]
    exact = [p.double() for p in patterns]  # the same values, summed in float64
    probe = probes.from_tokens(FakePatternModel(patterns, tokens), tokens)
    low = pattern_scores(FakePatternModel(patterns, tokens), probe, progress=False)
    high = pattern_scores(FakePatternModel(exact, tokens), probe, progress=False)
    for key, value in low.items():
        assert value.dtype == high[key].dtype, key
        torch.testing.assert_close(value.double(), high[key].double(), atol=2e-6, rtol=1e-5, equal_nan=True, msg=key)


# -- registry ----------------------------------------------------------------------------------


def test_registry_describes_every_returned_key(roles_planted):
    model, _ = roles_planted
    scores = pattern_scores(model, roles_probes(model), progress=False)
    grid = {key for key, value in scores.items() if value.shape == (2, 4) and value.is_floating_point()}
    assert grid == set(PATTERN_KEYS)
    for name, info in PATTERN_SCORES.items():
        assert info.name == name and info.description and set(info.probes) <= {"repeated", "text"}
        assert set(info.keys) - {"fixed_offset_k"} <= set(PATTERN_KEYS), name
    for key, info in PATTERN_KEYS.items():
        low, high = info.range
        value = scores[key][~scores[key].isnan()]
        assert (value >= low - 1e-6).all() and (value <= high + 1e-6).all(), key
    assert set(SCORE_NAMES) == {
        "previous_token",
        "current_token",
        "bos",
        "induction",
        "duplicate_token",
        "fixed_offset",
        "diffuse_entropy",
        "max_attention",
    }


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_budgets_uncertainty_and_consistency(smollm2):
    """The default probes (repeated tokens and the shipped text) on the real model."""
    run = pattern_measurement(smollm2, progress=False)
    scores = run.scores
    for prefix in ("budget", "budget_rep"):
        total = sum(scores[f"{prefix}_{c}"] for c in BUDGET_CLASSES)
        assert (total - 1).abs().max() < 1e-4, prefix
        # SmolLM2 parks much of its attention on the first token (Xiao et al.'s sinks)
        assert float(scores[f"{prefix}_first"].mean()) > 5 * float(scores[f"{prefix}_base_first"].mean())
    assert float(scores["budget_lift_delimiter"].max()) > 3  # some heads seek punctuation
    for key in ("positional_consistency", "positional_consistency_rep"):
        assert ((scores[key] >= 0) & (scores[key] <= 1)).all()
    for key, value in scores.items():
        if key.endswith("_se") and "_lift_" not in key:
            assert torch.isfinite(value).all() and (value >= 0).all(), key
    replicates = run.bootstrap(20, seed=0)
    assert replicates["induction"].shape == (20, 30, 9)
    # the bootstrap spread of a score is of the size of its standard error
    ratio = replicates["induction"].std(0).mean() / scores["induction_se"].mean()
    assert 0.5 < float(ratio) < 2.0
    mask = delimiter_token_mask(smollm2)
    tokenizer = smollm2.tokenizer
    for text, expected in ((".", True), (",", True), ("\n", True), (" the", False), ("1", False)):
        assert bool(mask[tokenizer.encode(text, add_special_tokens=False)[0]]) == expected, text
