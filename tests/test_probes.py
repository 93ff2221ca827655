"""Probes: reproducible token batches, their bookkeeping, and their validation errors."""

from __future__ import annotations

import pytest
import torch

from headclass import ProbeError, probes
from headclass.probes import Probe, _occurrences


class FakeTokenizer:
    """Whitespace tokenizer over a growing vocabulary (ids 3.. ; 0 = BOS, 1 = EOS, 2 = PAD)."""

    all_special_ids = [0, 1, 2]

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __len__(self) -> int:
        return 200

    def __call__(self, text, add_special_tokens=False):
        ids = [self.vocab.setdefault(word, 3 + len(self.vocab) % 197) for word in text.split()]
        return {"input_ids": ids}


class FakeModel:
    """The attributes probes read, without any network or weights."""

    name = "fake"
    d_vocab = 256
    n_ctx = 512
    bos_token_id = 0

    def __init__(self, tokenizer=None, prepends_bos=True):
        self.tokenizer = tokenizer
        self.prepends_bos = prepends_bos

    def special_token_ids(self):
        return {0, 1, 2} if self.tokenizer is not None else {0}

    def to_tokens(self, texts, *, max_tokens=None):
        out = []
        for text in texts:
            ids = self.tokenizer(text)["input_ids"]
            ids = ([0] if self.prepends_bos else []) + ids
            out.append(torch.tensor(ids[:max_tokens]))
        return out


# -- repeated --------------------------------------------------------------------------------


def test_repeated_layout_bos_and_vocabulary(tiny_gpt2):
    probe = probes.repeated(tiny_gpt2, n_sequences=5, segment_length=10, n_repeats=3, seed=1)
    assert probe.tokens.shape == (5, 1 + 30)
    assert probe.has_bos and (probe.tokens[:, 0] == tiny_gpt2.bos_token_id).all()
    body = probe.tokens[:, 1:]
    assert (body[:, :10] == body[:, 10:20]).all() and (body[:, :10] == body[:, 20:]).all()
    assert not (body == tiny_gpt2.bos_token_id).any()  # no special tokens
    for row in body[:, :10]:
        assert len(set(row.tolist())) == 10  # distinct within a segment
    # bookkeeping: the copy in the previous segment, and the token after it
    assert (probe.previous_occurrence[:, 1:11] == -1).all()
    assert (probe.previous_occurrence[:, 11:] == torch.arange(11, 31) - 10).all()
    assert (probe.induction_target[:, 11:] == torch.arange(11, 31) - 9).all()
    assert probe.n_induction_positions == 5 * 20


def test_repeated_is_reproducible_and_seeded(tiny_gpt2):
    a = probes.repeated(tiny_gpt2, 3, 8, seed=7)
    b = probes.repeated(tiny_gpt2, 3, 8, seed=7)
    c = probes.repeated(tiny_gpt2, 3, 8, seed=8)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)


def test_repeated_without_bos_and_special_ids():
    model = FakeModel(tokenizer=FakeTokenizer(), prepends_bos=False)
    probe = probes.repeated(model, 4, 50)
    assert probe.tokens.shape == (4, 100) and not probe.has_bos
    assert probe.tokens.min() >= 3 and probe.tokens.max() < 200  # no specials, no padding rows


def test_ordinary_ids_extreme_fraction():
    model = FakeModel(tokenizer=FakeTokenizer())
    ids = probes.ordinary_token_ids(model)
    assert ids.tolist() == list(range(3, 200))
    trimmed = probes.ordinary_token_ids(model, 0.1)
    drop = int(197 * 0.1)
    assert trimmed.tolist() == list(range(3 + drop, 200 - drop))
    probe = probes.repeated(model, 2, 20, exclude_extreme_fraction=0.1)
    body = probe.tokens[:, 1:]
    assert body.min() >= 3 + drop and body.max() < 200 - drop


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(n_sequences=0, segment_length=5), "n_sequences"),
        (dict(n_sequences=2, segment_length=1), "repeated segment of >= 2 tokens"),
        (dict(n_sequences=2, segment_length=5, n_repeats=1), "n_repeats"),
        (dict(n_sequences=2, segment_length=5, exclude_extreme_fraction=0.5), "exclude_extreme_fraction"),
        (dict(n_sequences=2, segment_length=40), "exceeds the context"),
        (dict(n_sequences=2, segment_length=200), "exceeds the 127 ordinary token ids"),
    ],
)
def test_repeated_rejects_bad_sizes(tiny_gpt2, kwargs, words):
    with pytest.raises(ProbeError, match=words):
        probes.repeated(tiny_gpt2, **kwargs)


# -- text ------------------------------------------------------------------------------------


def test_corpus_is_shipped_and_varied():
    paragraphs = probes.corpus_paragraphs()
    assert len(paragraphs) >= 20
    assert len(set(paragraphs)) == len(paragraphs)
    assert all(len(p.split()) >= 100 for p in paragraphs)


def test_text_probe_cuts_to_common_length():
    model = FakeModel(tokenizer=FakeTokenizer())
    probe = probes.text(model, ["one two three four five", "a b c", "x y z w"], max_tokens=10)
    assert probe.tokens.shape == (3, 4)  # BOS + the shortest text (3 words)
    assert probe.has_bos and (probe.tokens[:, 0] == 0).all()
    assert probe.scores == probes.TEXT_SCORES
    assert not probe.feeds("induction") and probe.feeds("previous_token")


def test_text_probe_defaults_to_corpus():
    model = FakeModel(tokenizer=FakeTokenizer())
    probe = probes.text(model, max_tokens=64, n_sequences=16)
    assert probe.tokens.shape == (16, 64)
    assert probes.text(model, max_tokens=64, scores=None).feeds("induction")


def test_text_probe_errors():
    with pytest.raises(ProbeError, match="has no tokenizer"):
        probes.text(FakeModel(tokenizer=None))
    model = FakeModel(tokenizer=FakeTokenizer())
    with pytest.raises(ProbeError, match="asked for 3 sequences but only 2 texts"):
        probes.text(model, ["a b", "c d"], n_sequences=3)
    with pytest.raises(ProbeError, match="non-empty list of strings"):
        probes.text(model, [])
    with pytest.raises(ProbeError, match="at least 2"):
        probes.text(model, ["", "a b c"])


# -- from_tokens and validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens, words",
    [
        (torch.zeros(0, 5, dtype=torch.long), "is empty"),
        (torch.zeros(3, 0, dtype=torch.long), "is empty"),
        ([], "is empty"),
        (torch.arange(5), r"shape \[batch, pos\].*tokens\[None\]"),
        (torch.zeros(2, 3, 4, dtype=torch.long), r"shape \[batch, pos\]"),
        (torch.tensor([[1, 2, 128]]), r"\[0, 127\].*\[1, 128\]"),
        (torch.tensor([[-1, 2, 3]]), r"\[0, 127\].*\[-1, 3\]"),
        ([[1, 2, 3], [4, 5]], "mismatched lengths"),
        (torch.ones(2, 3), "must be integers"),
        (torch.ones(1, 65, dtype=torch.long), "exceed the context"),
        ("hello", "must be a \\[batch, pos\\] tensor"),
    ],
)
def test_from_tokens_rejects_bad_batches(tiny_gpt2, tokens, words):
    with pytest.raises(ProbeError, match=words):
        probes.from_tokens(tiny_gpt2, tokens)


def test_probe_errors_are_value_errors(tiny_gpt2):
    with pytest.raises(ValueError):
        probes.from_tokens(tiny_gpt2, [])


def test_from_tokens_detects_bos(tiny_gpt2):
    assert probes.from_tokens(tiny_gpt2, torch.tensor([[0, 5, 6]])).has_bos
    assert not probes.from_tokens(tiny_gpt2, torch.tensor([[4, 5, 6]])).has_bos
    assert probes.from_tokens(tiny_gpt2, [[0, 5, 6], [0, 7, 8]]).tokens.dtype == torch.long


def test_check_rejects_mismatched_bookkeeping(tiny_gpt2):
    probe = probes.from_tokens(tiny_gpt2, torch.tensor([[0, 5, 6, 5]]))
    broken = Probe(probe.tokens, "broken", True, probe.previous_occurrence[:, :2], probe.induction_target)
    with pytest.raises(ProbeError, match="previous_occurrence has shape"):
        broken.check(tiny_gpt2)


def test_occurrences_by_hand():
    tokens = torch.tensor([[9, 1, 2, 1, 2, 2, 7]])
    previous, target = _occurrences(tokens)
    assert previous.tolist() == [[-1, -1, -1, 1, 2, 4, -1]]
    # q=3 (token 1): copy at 1, target 2; q=4 (2): copy at 2, target 3;
    # q=5 (2, right after a 2): latest copy 4 is adjacent, so copy 2 -> target 3
    assert target.tolist() == [[-1, -1, -1, 2, 3, 3, -1]]


def test_batches_split_in_order(tiny_gpt2):
    probe = probes.repeated(tiny_gpt2, 7, 6)
    chunks = list(probe.batches(3))
    assert [c.n_sequences for c in chunks] == [3, 3, 1]
    assert torch.equal(torch.cat([c.tokens for c in chunks]), probe.tokens)
    assert torch.equal(torch.cat([c.induction_target for c in chunks]), probe.induction_target)
    assert all(c.name == probe.name and c.has_bos == probe.has_bos for c in chunks)
    with pytest.raises(ProbeError, match="batch_size"):
        list(probe.batches(0))


def test_default_probes_adapt_to_context(tiny_gpt2):
    (rep,) = probes.default_probes(tiny_gpt2)  # no tokenizer: no text probe
    assert rep.n_positions <= tiny_gpt2.n_ctx
    assert rep.n_sequences == 16 and rep.n_induction_positions > 0


# -- one validator, one sizing step -----------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(3, dtype=torch.long),  # 1-D
        torch.zeros(2, 0, dtype=torch.long),  # empty
        torch.zeros(2, 4),  # float ids
        torch.full((2, 4), 10_000, dtype=torch.long),  # outside the vocabulary
        torch.zeros(1, 65, dtype=torch.long),  # longer than the context
    ],
)
def test_every_entry_point_gives_the_same_message(tiny_gpt2, bad):
    messages = []
    for check in (lambda t: tiny_gpt2.check_tokens(t), lambda t: probes.from_tokens(tiny_gpt2, t, name="tokens")):
        with pytest.raises(ProbeError) as info:
            check(bad)
        messages.append(str(info.value))
    assert messages[0] == messages[1]


def test_probe_set_is_sized_once_and_says_so(tiny_gpt2):
    with pytest.warns(probes.HeadclassWarning) as caught:
        built = probes.build_probe_set(tiny_gpt2, ablation=True)
    assert len(caught) == 1  # one warning line for everything that shrank
    message = str(caught[0].message)
    assert "(context of 64 tokens)" in message
    assert "repeated probe was shrunk from 2 x 64 to 2 x 31" in message
    assert "ablation probe was shrunk from 2 x 64 to 2 x 31" in message
    assert built.repeated.n_positions == 63 and built.ablation_induction.n_positions == 63
    assert built.copy_tokens.ndim == 1 and built.text is None and built.ablation_text is None


def test_probe_set_without_ablation_builds_no_ablation_probe(tiny_gpt2):
    built = probes.build_probe_set(tiny_gpt2, {"probes": {"repeated": {"segment_length": 8}}})
    assert built.ablation_induction is None
    with pytest.raises(ProbeError, match="ablation=True"):
        _ = built.ablation_probes


def test_a_probe_that_fits_is_not_reported(tiny_gpt2, recwarn):
    probes.build_probe_set(tiny_gpt2, {"probes": {"repeated": {"segment_length": 8}}})
    assert not [w for w in recwarn if issubclass(w.category, probes.HeadclassWarning)]


@pytest.mark.parametrize("n_positions", [2, 4])
def test_too_short_a_context_names_the_model_context(tmp_path, n_positions):
    from conftest import save_tiny_gpt2

    import headclass

    model = headclass.load_model(save_tiny_gpt2(tmp_path / "short", n_positions=n_positions))
    with pytest.raises(ProbeError, match=f"has a context of {n_positions} tokens; the repeated probe needs at least 5"):
        probes.build_probe_set(model)


def test_toy_config_fits_the_toy_context():
    from headclass.toy import ToySpec, toy_config

    cfg = toy_config()
    seq_len = ToySpec(n_layers=1).seq_len
    assert cfg["probes"]["text"]["max_tokens"] == seq_len
    assert 1 + 2 * cfg["probes"]["repeated"]["segment_length"] <= seq_len
    assert 1 + 2 * cfg["ablation"]["induction_segment_length"] <= seq_len
