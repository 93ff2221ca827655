"""Probe batches: reproducible token inputs that the pattern scores run on.

One module for every input a classification reads (about 600 lines): the probe type, its three
factories, the probe set with its one sizing step, and the vocabulary they all draw from. Split
apart, each would import the others.

A :class:`Probe` is a token batch ``[batch, pos]`` plus the per-position bookkeeping the scores
need, computed once when the probe is built:

* ``previous_occurrence[b, q]``: the latest position ``j < q`` holding the same token as ``q``
  (``-1`` if the token is new there). Duplicate-token queries are those with ``>= 0``.
* ``induction_target[b, q]``: the latest position ``k < q`` whose *preceding* token equals the
  token at ``q``, i.e. the token that followed an earlier copy of the current token (Olsson et
  al. 2022, prefix matching); ``-1`` if none. Induction queries are those with ``>= 0``. A token
  repeated right away (``a a``) gives no target, since "the token after the earlier copy" would
  be the query itself.
* ``has_bos``: position 0 holds the model's BOS token in every sequence.
* ``scores``: which pattern scores this probe feeds (``None``: all of them).

Three factories build probes:

* :func:`repeated` -- ``[BOS] r r`` (or ``r r r r``): random ordinary tokens, repeated. The
  probe for induction and duplicate-token scores.
* :func:`text` -- English paragraphs (the corpus shipped in ``headclass/data/corpus.txt``, or
  yours), tokenised and cut to a common length.
* :func:`from_tokens` -- any token tensor you already have.

:func:`default_probes` builds the repeated and text probes a configuration describes; it is what
:func:`headclass.scores.patterns.pattern_scores` uses when given no probes.

Examples
--------
>>> from headclass import probes
>>> rep = probes.repeated(model, n_sequences=16, segment_length=64, seed=0)
>>> rep.tokens.shape                       # BOS + 2 x 64 when the model prepends BOS
torch.Size([16, 129])
>>> txt = probes.text(model, max_tokens=128)
>>> for chunk in rep.batches(4): ...       # sub-probes of at most 4 sequences
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from headclass.errors import HeadclassWarning, ProbeError
from headclass.loading.tokens import as_token_tensor, check_token_ids

__all__ = [
    "Probe",
    "repeated",
    "text",
    "from_tokens",
    "default_probes",
    "ProbeSet",
    "build_probe_set",
    "fit_segment_length",
    "token_sample",
    "corpus_paragraphs",
    "ordinary_token_ids",
    "TEXT_SCORES",
]

#: Scores the natural-text probe feeds by default. Induction and duplicate-token scores need
#: exact repeats, which random repeated tokens provide cleanly and prose only by accident
#: (function words), so :func:`text` leaves them to :func:`repeated`. ``budget`` and
#: ``positional_consistency`` are the natural-text attention budget and consistency (the
#: repeated probe feeds their ``_rep`` twins; see :mod:`headclass.scores.patterns`).
TEXT_SCORES = frozenset(
    {
        "previous_token",
        "current_token",
        "bos",
        "fixed_offset",
        "diffuse_entropy",
        "max_attention",
        "budget",
        "positional_consistency",
    }
)


@dataclass(frozen=True, eq=False)
class Probe:
    """A token batch and the bookkeeping each pattern score needs.

    Build probes with :func:`repeated`, :func:`text` or :func:`from_tokens`; the constructor
    only stores (call :meth:`check` to validate against a model).

    Attributes
    ----------
    tokens
        ``Int[Tensor, "batch pos"]`` token ids (CPU, ``torch.long``).
    name
        Used in progress bars and error messages (``"repeated"``, ``"text"``...).
    has_bos
        Position 0 is the model's BOS token in every sequence.
    previous_occurrence
        ``Int[Tensor, "batch pos"]``: latest ``j < q`` with ``tokens[j] == tokens[q]``, else -1.
    induction_target
        ``Int[Tensor, "batch pos"]``: latest ``k < q`` with ``tokens[k - 1] == tokens[q]``, else -1.
    scores
        Names of the scores this probe feeds; ``None`` feeds every score.
    """

    tokens: Tensor
    name: str
    has_bos: bool
    previous_occurrence: Tensor
    induction_target: Tensor
    scores: Optional[frozenset] = None

    @property
    def n_sequences(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_positions(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def n_induction_positions(self) -> int:
        """Query positions where an induction target exists."""
        return int((self.induction_target >= 0).sum())

    @property
    def n_duplicate_positions(self) -> int:
        """Query positions whose token occurred before."""
        return int((self.previous_occurrence >= 0).sum())

    def feeds(self, score: str) -> bool:
        """Whether this probe contributes to ``score``."""
        return self.scores is None or score in self.scores

    def batches(self, batch_size: int) -> Iterator["Probe"]:
        """Sub-probes of at most ``batch_size`` sequences each, in order.

        Scores weight every sub-probe by its number of valid positions, so running the chunks
        one by one gives the same result as the whole batch at once.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ProbeError(f"batch_size must be an int >= 1; got {batch_size!r}.")
        for start in range(0, self.n_sequences, batch_size):
            stop = start + batch_size
            yield replace(
                self,
                tokens=self.tokens[start:stop],
                previous_occurrence=self.previous_occurrence[start:stop],
                induction_target=self.induction_target[start:stop],
            )

    def check(self, model: Any = None) -> "Probe":
        """Validate shapes and ids (against ``model`` when given); return self.

        Raises
        ------
        ProbeError
            Non-2-D or empty tokens, bookkeeping of another shape than the tokens, ids outside
            the model's vocabulary, or sequences longer than the model's context.
        """
        check_token_ids(self.tokens, name=self.name)
        for field in ("previous_occurrence", "induction_target"):
            value = getattr(self, field)
            if not isinstance(value, Tensor) or tuple(value.shape) != tuple(self.tokens.shape):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ProbeError(
                    f"probe {self.name!r}: {field} has shape {shape} but tokens have shape "
                    f"{tuple(self.tokens.shape)}; build probes with probes.from_tokens(...) "
                    "rather than by hand."
                )
        if model is not None:
            _check_against_model(self.tokens, self.name, model)
        return self

    def __repr__(self) -> str:
        feeds = "all scores" if self.scores is None else ", ".join(sorted(self.scores))
        return (
            f"Probe({self.name!r}, sequences={self.n_sequences}, positions={self.n_positions}, "
            f"has_bos={self.has_bos}, induction_positions={self.n_induction_positions}, "
            f"feeds={feeds})"
        )


# -- factories -------------------------------------------------------------------------------


def from_tokens(
    model: Any,
    tokens: Union[Tensor, Sequence[Sequence[int]], Sequence[Tensor]],
    *,
    name: str = "tokens",
    has_bos: Optional[bool] = None,
    scores: Optional[Iterable[str]] = None,
) -> Probe:
    """A probe from token ids you already have.

    Parameters
    ----------
    model
        The model the ids belong to (its vocabulary and context bound the ids and length).
    tokens
        ``[batch, pos]`` ids: a 2-D integer tensor, or equal-length sequences of ids.
    name
        Shown in progress bars and errors.
    has_bos
        Whether position 0 is BOS; by default, true when every sequence starts with the model's
        BOS id and the model prepends BOS.
    scores
        The scores this probe feeds (default: all).

    Raises
    ------
    ProbeError
        Sequences of different lengths, non-2-D or empty input, non-integer ids, ids outside
        the vocabulary, or sequences longer than the model's context.
    """
    tokens = _check_against_model(as_token_tensor(tokens, name), name, model).to(device="cpu")
    if has_bos is None:
        bos = getattr(model, "bos_token_id", None)
        has_bos = bool(
            getattr(model, "prepends_bos", bos is not None) and bos is not None and bool((tokens[:, 0] == bos).all())
        )
    previous, target = _occurrences(tokens)
    return Probe(
        tokens=tokens,
        name=name,
        has_bos=bool(has_bos),
        previous_occurrence=previous,
        induction_target=target,
        scores=None if scores is None else frozenset(scores),
    )


def repeated(
    model: Any,
    n_sequences: int,
    segment_length: int,
    n_repeats: int = 2,
    seed: int = 0,
    exclude_extreme_fraction: float = 0.0,
    *,
    name: str = "repeated",
) -> Probe:
    """Random ordinary tokens repeated: ``[BOS] r r`` (``n_repeats`` copies of a segment ``r``).

    Each segment holds ``segment_length`` *distinct* ids drawn uniformly without replacement
    from :func:`ordinary_token_ids`, so every token of copy 2, 3, ... has exactly one earlier
    occurrence per earlier copy and an unambiguous induction target. BOS is prepended exactly
    when ``model.prepends_bos``. The same ``seed`` always gives the same tokens.

    Parameters
    ----------
    model
        The model the probe is for (vocabulary, special tokens, BOS, context length).
    n_sequences, segment_length, n_repeats
        Batch size, tokens per segment (>= 2), copies of the segment (>= 2).
    seed
        Seed of the ``torch.Generator`` that draws the segments.
    exclude_extreme_fraction
        Drop this fraction of the ordinary ids at *each* frequency extreme (in [0, 0.5)). The
        frequency proxy is the token id: byte-level BPE vocabularies (GPT-2, Llama, SmolLM2...)
        number tokens in merge order, and earlier merges are the more frequent pieces, so the
        lowest ids are the commonest and the highest the rarest. No other frequency data is
        read.

    Raises
    ------
    ProbeError
        Bad sizes, a segment longer than the ordinary vocabulary, or a probe longer than the
        model's context.
    """
    for label, value, low in (
        ("n_sequences", n_sequences, 1),
        ("segment_length", segment_length, 2),
        ("n_repeats", n_repeats, 2),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            hint = " (induction needs a repeated segment of >= 2 tokens)" if label != "n_sequences" else ""
            raise ProbeError(f"repeated probe: {label} must be an int >= {low}{hint}; got {value!r}.")
    if not 0.0 <= float(exclude_extreme_fraction) < 0.5:
        raise ProbeError(
            f"repeated probe: exclude_extreme_fraction must be in [0, 0.5); got {exclude_extreme_fraction!r}."
        )
    ids = ordinary_token_ids(model, exclude_extreme_fraction)
    if segment_length > len(ids):
        raise ProbeError(
            f"repeated probe: segment_length={segment_length} exceeds the {len(ids)} ordinary "
            f"token ids available for model {getattr(model, 'name', '?')!r}; lower segment_length "
            "or exclude_extreme_fraction."
        )
    bos = getattr(model, "bos_token_id", None)
    prepend = _prepends_bos(model)
    length = int(prepend) + segment_length * n_repeats
    n_ctx = getattr(model, "n_ctx", None)
    if n_ctx is not None and length > n_ctx:
        raise ProbeError(
            f"repeated probe of {int(prepend)} + {n_repeats} x {segment_length} = {length} tokens "
            f"exceeds the context of model {getattr(model, 'name', '?')!r} ({n_ctx} tokens); "
            "lower segment_length or n_repeats."
        )
    generator = torch.Generator().manual_seed(int(seed))
    rows = []
    for _ in range(n_sequences):
        segment = ids[torch.randperm(len(ids), generator=generator)[:segment_length]]
        row = segment.repeat(n_repeats)
        if prepend:
            row = torch.cat([torch.tensor([bos], dtype=torch.long), row])
        rows.append(row)
    return from_tokens(model, torch.stack(rows), name=name, has_bos=prepend)


def text(
    model: Any,
    texts: Union[None, str, Sequence[str]] = None,
    max_tokens: int = 128,
    n_sequences: Optional[int] = None,
    *,
    name: str = "text",
    scores: Optional[Iterable[str]] = TEXT_SCORES,
) -> Probe:
    """Natural text, tokenised with the model's tokenizer and cut to a common length.

    Parameters
    ----------
    model
        A model with a tokenizer (BOS is prepended exactly when ``model.prepends_bos``).
    texts
        One text or several; ``None`` uses the shipped English corpus
        (:func:`corpus_paragraphs`, ``headclass/data/corpus.txt``).
    max_tokens
        Longest sequence, BOS included. Every sequence is cut to the shortest tokenised text
        (or ``max_tokens``, whichever is smaller), so no padding is ever needed.
    n_sequences
        Use the first ``n_sequences`` texts (default: all).
    scores
        The scores this probe feeds; by default :data:`TEXT_SCORES` (everything except
        induction and duplicate-token, which the repeated probe measures). ``None`` feeds all.

    Raises
    ------
    ProbeError
        No tokenizer, no texts, more sequences asked for than texts given, or texts shorter
        than 2 tokens.
    """
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 2:
        raise ProbeError(f"text probe: max_tokens must be an int >= 2; got {max_tokens!r}.")
    if texts is None:
        texts = corpus_paragraphs()
    elif isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ProbeError("text probe: texts must be a non-empty list of strings (or None for the shipped corpus).")
    if n_sequences is not None:
        if not isinstance(n_sequences, int) or isinstance(n_sequences, bool) or n_sequences < 1:
            raise ProbeError(f"text probe: n_sequences must be an int >= 1; got {n_sequences!r}.")
        if n_sequences > len(texts):
            raise ProbeError(
                f"text probe: asked for {n_sequences} sequences but only {len(texts)} texts were "
                "given; pass more texts or a smaller n_sequences."
            )
        texts = texts[:n_sequences]
    n_ctx = getattr(model, "n_ctx", None)
    limit = max_tokens if n_ctx is None else min(max_tokens, n_ctx)
    if getattr(model, "tokenizer", None) is None or not hasattr(model, "to_tokens"):
        raise ProbeError(
            f"text probe: model {getattr(model, 'name', '?')!r} has no tokenizer; pass token ids "
            "with probes.from_tokens(model, tokens) or use probes.repeated(...)."
        )
    rows = model.to_tokens(texts, max_tokens=limit)
    length = min(len(row) for row in rows)
    if length < 2:
        raise ProbeError(f"text probe: the shortest text has {length} token(s); every text needs at least 2.")
    tokens = torch.stack([row[:length] for row in rows])
    return from_tokens(model, tokens, name=name, has_bos=bool(getattr(model, "prepends_bos", False)), scores=scores)


@dataclass(frozen=True, eq=False)
class ProbeSet:
    """Every input one classification needs, built once by :func:`build_probe_set`.

    :func:`headclass.classify` builds it and hands each part to the score that reads it, so
    the model goes to ``probes`` once, and patterns, weights and ablation see probes sized by
    the same step (:func:`fit_segment_length`).

    Attributes
    ----------
    repeated, text
        The pattern-score probes (``text`` is ``None`` without a tokenizer).
    copy_tokens
        ``Int[Tensor, "sample"]``: sorted ordinary ids for the sampled weight scores
        (top-k copy, :func:`token_sample`).
    ablation_induction, ablation_text
        The (smaller) probes of the ablation scores, built only when asked for
        (``build_probe_set(..., ablation=True)``); ``ablation_text`` is ``None`` without a
        tokenizer.
    """

    repeated: Probe
    text: Optional[Probe]
    copy_tokens: Tensor
    ablation_induction: Optional[Probe] = None
    ablation_text: Optional[Probe] = None

    @property
    def pattern_probes(self) -> list[Probe]:
        """The probes of the pattern scores: repeated tokens, then text when there is one."""
        return [self.repeated] + ([self.text] if self.text is not None else [])

    @property
    def ablation_probes(self) -> dict[str, Probe]:
        """``{"induction": ..., "text": ...}`` as :func:`headclass.scores.ablation.ablation_scores` takes."""
        if self.ablation_induction is None:
            raise ProbeError(
                "this probe set was built without ablation probes; use build_probe_set(model, config, ablation=True)."
            )
        out = {"induction": self.ablation_induction}
        if self.ablation_text is not None:
            out["text"] = self.ablation_text
        return out


def build_probe_set(model: Any, config: Any = None, *, ablation: bool = False) -> ProbeSet:
    """The probes a configuration describes, sized once to the model's context.

    ``ablation=True`` also builds the ablation scores' probes (``config.ablation``).

    Repeated segments shrink to fit ``n_ctx`` and texts are cut at it
    (:func:`fit_segment_length`); when anything was shrunk, ONE :class:`HeadclassWarning`
    says what and to what. A context too short for any probe is a :class:`ProbeError` that
    names the model's context.
    """
    from headclass.config import load_config

    cfg = load_config(config)
    notes: list[str] = []
    rep, abl = cfg.probes.repeated, cfg.ablation
    seed, extremes = cfg.probes.seed, rep.exclude_extreme_fraction
    segment = fit_segment_length(model, rep.segment_length, rep.n_repeats, notes, what="repeated probe")
    has_text = getattr(model, "tokenizer", None) is not None
    n_texts = len(corpus_paragraphs())
    text_notes = notes if has_text else []
    text_tokens = _fit_text_length(model, cfg.probes.text.max_tokens, text_notes, "text probe")
    ablation_parts: dict[str, Optional[Probe]] = {}
    if ablation:
        abl_segment = fit_segment_length(model, abl.induction_segment_length, 2, notes, what="ablation probe")
        abl_text_tokens = _fit_text_length(model, abl.text_max_tokens, text_notes, "ablation text")
        ablation_parts = {
            "ablation_induction": repeated(
                model,
                abl.induction_sequences,
                abl_segment,
                2,
                seed=seed,
                exclude_extreme_fraction=extremes,
                name="ablation induction",
            ),
            "ablation_text": text(
                model,
                max_tokens=abl_text_tokens,
                n_sequences=min(abl.text_sequences, n_texts),
                name="ablation text",
                scores=None,
            )
            if has_text
            else None,
        }
    if notes:
        warnings.warn(
            HeadclassWarning(
                f"probes shrunk to fit model {getattr(model, 'name', '?')!r} (context of "
                f"{getattr(model, 'n_ctx', '?')} tokens): " + "; ".join(notes) + "."
            ),
            stacklevel=2,
        )
    return ProbeSet(
        repeated=repeated(model, rep.n_sequences, segment, rep.n_repeats, seed=seed, exclude_extreme_fraction=extremes),
        text=text(model, max_tokens=text_tokens, n_sequences=min(cfg.probes.text.n_sequences, n_texts))
        if has_text
        else None,
        copy_tokens=token_sample(model, cfg.weights.copy_sample_size, seed=seed),
        **ablation_parts,
    )


def default_probes(model: Any, config: Any = None) -> list[Probe]:
    """The pattern-score probes of :func:`build_probe_set`: repeated tokens, plus text when the
    model has a tokenizer."""
    return build_probe_set(model, config).pattern_probes


def fit_segment_length(
    model: Any, segment_length: int, n_repeats: int, notes: list[str], *, what: str = "repeated probe"
) -> int:
    """The one sizing step: the longest segment <= ``segment_length`` of distinct ordinary
    tokens whose ``n_repeats`` copies (after BOS) fit the model's context; appends a note to
    ``notes`` when it shrank.

    Raises :class:`ProbeError` when not even 2-token segments fit, naming the context.
    """
    n_ordinary = len(ordinary_token_ids(model))  # a segment holds distinct ordinary tokens
    if n_ordinary < segment_length:
        if n_ordinary < 2:
            raise ProbeError(
                f"model {getattr(model, 'name', '?')!r} has {n_ordinary} ordinary token ids; "
                "a repeated probe needs at least 2."
            )
        notes.append(
            f"the {what}'s segment was cut from {segment_length} to the {n_ordinary} ordinary "
            "token ids of the vocabulary"
        )
        segment_length = n_ordinary
    n_ctx = getattr(model, "n_ctx", None)
    if n_ctx is None:
        return segment_length
    prepend = int(_prepends_bos(model))
    room = (int(n_ctx) - prepend) // n_repeats
    if room >= segment_length:
        return segment_length
    if room < 2:
        need = prepend + 2 * n_repeats
        raise ProbeError(
            f"model {getattr(model, 'name', '?')!r} has a context of {n_ctx} tokens; the {what} needs "
            f"at least {need} ({'BOS + ' if prepend else ''}{n_repeats} copies of a 2-token segment), "
            "so its heads cannot be probed for induction. Use a model with a longer context."
        )
    notes.append(f"the {what} was shrunk from {n_repeats} x {segment_length} to {n_repeats} x {room} tokens")
    return room


def _fit_text_length(model: Any, max_tokens: int, notes: list[str], what: str) -> int:
    n_ctx = getattr(model, "n_ctx", None)
    if n_ctx is None or int(n_ctx) >= max_tokens:
        return max_tokens
    notes.append(f"the {what} was cut from {max_tokens} to {n_ctx} tokens")
    return int(n_ctx)


def _prepends_bos(model: Any) -> bool:
    bos = getattr(model, "bos_token_id", None)
    return bool(getattr(model, "prepends_bos", bos is not None)) and bos is not None


def token_sample(model: Any, sample_size: int, *, seed: int = 0) -> Tensor:
    """Sorted ids of ``sample_size`` ordinary tokens drawn without replacement (seeded).

    Ordinary: :func:`ordinary_token_ids` (not BOS or another special token, and below the
    tokenizer's length when the embedding is padded beyond it). All ordinary ids when there are
    no more than ``sample_size``. The sample of the top-k copy scores
    (:mod:`headclass.scores.weights`).
    """
    if isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1:
        raise ProbeError(f"The 'copy_sample_size' parameter must be an int >= 1. Got {sample_size!r}.")
    ordinary = ordinary_token_ids(model)
    if ordinary.numel() == 0:
        raise ProbeError(f"model {getattr(model, 'name', model)!r} has no ordinary tokens to sample.")
    if ordinary.numel() <= sample_size:
        return ordinary
    generator = torch.Generator().manual_seed(int(seed))
    chosen = torch.randperm(ordinary.numel(), generator=generator)[:sample_size]
    return ordinary[chosen].sort().values


# -- vocabulary and corpus -------------------------------------------------------------------


def ordinary_token_ids(model: Any, exclude_extreme_fraction: float = 0.0) -> Tensor:
    """Ids a repeated probe may draw: the vocabulary minus special tokens, ascending.

    With a tokenizer: ids below ``min(d_vocab, len(tokenizer))`` (padding rows of the embedding
    are not tokens) minus ``model.special_token_ids()``. Without one: every id but BOS.
    ``exclude_extreme_fraction`` then drops that fraction at each end of the id order (see
    :func:`repeated` for why id order stands in for frequency).
    """
    n = int(model.d_vocab)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        try:
            n = min(n, len(tokenizer))
        except TypeError:
            pass
    special = set(model.special_token_ids()) if hasattr(model, "special_token_ids") else set()
    bos = getattr(model, "bos_token_id", None)
    if bos is not None:
        special.add(int(bos))
    keep = torch.ones(n, dtype=torch.bool)
    for i in special:
        if 0 <= i < n:
            keep[i] = False
    ids = torch.arange(n)[keep]
    drop = int(len(ids) * float(exclude_extreme_fraction))
    if drop:
        ids = ids[drop : len(ids) - drop]
    return ids


def corpus_paragraphs() -> list[str]:
    """The shipped English corpus (``headclass/data/corpus.txt``), one string per paragraph."""
    raw = (resources.files("headclass") / "data" / "corpus.txt").read_text(encoding="utf-8")
    paragraphs = [" ".join(block.split()) for block in raw.split("\n\n")]
    return [p for p in paragraphs if p]


# -- helpers ---------------------------------------------------------------------------------


def _check_against_model(tokens: Tensor, name: str, model: Any) -> Tensor:
    return check_token_ids(
        tokens,
        d_vocab=int(model.d_vocab),
        n_ctx=getattr(model, "n_ctx", None),
        name=name,
        model_name=str(getattr(model, "name", "?")),
    )


def _occurrences(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """``previous_occurrence`` and ``induction_target`` of a ``[batch, pos]`` id tensor.

    One left-to-right scan per sequence keeping, per token, its two latest positions: the
    induction target of ``q`` is ``j + 1`` for the latest earlier occurrence ``j`` with
    ``j + 1 < q`` (when the latest is ``q - 1``, the one before it).
    """
    batch, pos = tokens.shape
    previous = torch.full((batch, pos), -1, dtype=torch.long)
    target = torch.full((batch, pos), -1, dtype=torch.long)
    for b, row in enumerate(tokens.tolist()):
        latest: dict[int, tuple[int, int]] = {}
        prev_row, target_row = previous[b].tolist(), target[b].tolist()
        for q, tok in enumerate(row):
            last, before = latest.get(tok, (-1, -1))
            prev_row[q] = last
            j = last if last + 1 < q else before
            target_row[q] = j + 1 if j >= 0 else -1
            latest[tok] = (q, last)
        previous[b] = torch.tensor(prev_row)
        target[b] = torch.tensor(target_row)
    return previous, target
