"""Attention-pattern scores: what each head attends to, from one forward pass per batch.

Every score is a ``Float[Tensor, "layer head"]`` in [0, 1]. All of them come out of ONE forward
pass per probe batch: :meth:`HeadModel.run_with_patterns` hands each layer's pattern
``[batch, head, query, key]`` to a callback, every registered reduction folds it into a running
sum ``[head]`` on the spot, and the pattern is dropped before the next layer runs (no cache of
all layers is ever held). A score is the sum over batches divided by the number of *valid*
query positions (those where the score is defined), so batches of any size and any number of
probes pool into the same weighted mean, and chunking never changes a result.

The scores (``A`` is a head's pattern, ``q`` a query position, ``k`` a key position;
``s0 = 1`` when the probe starts with BOS, else 0):

===================  ==============================================  ============================
key                  formula (mean over the valid queries)           valid queries
===================  ==============================================  ============================
``previous_token``   ``A[q, q-1]``                                   ``q >= 1 + s0``
``current_token``    ``A[q, q]``                                     ``q >= 1``
``bos``              ``A[q, 0]``                                     ``q >= 1``
``induction``        ``sum A[q, k]`` over ``k < q`` with             an earlier copy of ``tok[q]``
                     ``tok[k-1] == tok[q]``                          has a successor before ``q``
``duplicate_token``  ``sum A[q, j]`` over ``j < q`` with             ``tok[q]`` occurred before
                     ``tok[j] == tok[q]``
``fixed_offset``     ``max_k mean A[q, q-k]``, ``k = 1..max_offset``  ``q - k >= s0`` (per ``k``)
``diffuse_entropy``  ``H(A[q, :]) / log(q + 1)``                     ``q + 1 >= diffuse_min_keys``
``max_attention``    ``max_k A[q, k]``                               ``q + 1 >= diffuse_min_keys``
===================  ==============================================  ============================

``fixed_offset`` comes with ``fixed_offset_k`` (``Int[Tensor, "layer head"]``, the best ``k``,
ties to the smallest) and ``fixed_offset_per_k`` (``Float[Tensor, "layer head offset"]``, index
``i`` is ``k = i + 1``; NaN for an offset no query of the probes can see), from which the
taxonomy takes the best ``k >= 2`` (``k = 1`` is ``previous_token``).

* Query 0 never counts for ``current_token`` / ``bos``: it can only attend to itself, so every
  head would score 1 there. With a BOS, ``previous_token`` and ``fixed_offset`` skip the
  queries whose target key is the BOS (the target is then indistinguishable from a sink), so a
  head that only attends to BOS gets exactly 0 for every score but ``bos`` (and 1 for
  ``max_attention``, 0 for ``diffuse_entropy``), never NaN.
* ``exclude_bos=True`` / ``exclude_current_token=True`` measure previous-token, duplicate-token
  and induction attention as a share of the attention *not* paid to position 0 / the query
  itself (per query: ``sum A[q, target] / (1 - A[q, 0] - A[q, q])``; a query with less than
  1e-4 of its attention left counts as 0, so a head that only attends to BOS scores 0).
* Sources: previous-token, duplicate-token and induction heads as in Olsson et al. 2022 ("In-
  context learning and induction heads", prefix-matching score on repeated random tokens) and
  Wang et al. 2022 (IOI); attention sinks / BOS heads from Xiao et al. 2023 ("Efficient
  streaming language models with attention sinks"); positional (fixed-offset) and diffuse heads
  from Voita et al. 2019 and Clark et al. 2019 ("What does BERT look at?", entropy per head).

Probes
------
:func:`pattern_scores` pools every probe that feeds a score (:attr:`Probe.scores`), weighting
each by its valid query positions. The default probes (:func:`headclass.probes.default_probes`):
random repeated tokens ``[BOS] r r`` feed every score; the shipped English text (when the model
has a tokenizer) feeds all but ``induction`` and ``duplicate_token``, which are measured on the
repeated tokens only, where every repeat is exact and every induction target unambiguous.

Cost
----
Per layer: one ``take`` of the few thousand pattern entries the sparse scores read (previous,
current, BOS, offsets, duplicate, induction, with their denominators) and one ``index_add`` into
per-score segments, plus two passes over the pattern for max-attention and entropy (the latter
only over the lower triangle, in query blocks written into one reused buffer). Nothing of the
size of the pattern is allocated, and nothing outlives the layer's hook.

Agreement with TransformerLens
------------------------------
``convention="detect_head"`` reproduces ``transformer_lens.head_detector.detect_head(...,
error_measure="mul")`` for ``previous_token``, ``duplicate_token`` and ``induction`` exactly
(same masks, same normalisation): per sequence ``sum(A' * D) / sum(A')`` over the whole
``[query, key]`` square, where ``A'`` is the pattern with column 0 and/or the diagonal zeroed
(``exclude_bos`` / ``exclude_current_token``) and ``D`` the detection pattern, then the mean
over sequences. Its differences from the default convention: every query row counts, including
the ones where the score is undefined (query 0, the first copy of a repeated segment), which
dilutes scores (an ideal induction head on ``[BOS] r r`` gets about 0.5 instead of 1); the
previous-token target of query 1 is the BOS; an induction "target" may be the query itself
(``a a``); sequences, not positions, are averaged. The other scores have one convention.

Examples
--------
>>> from headclass.scores.patterns import pattern_scores
>>> scores = pattern_scores(model)                       # default probes from the config
>>> scores["induction"].shape
torch.Size([30, 9])
>>> scores["induction"].flatten().topk(3)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

from headclass.errors import ProbeError, ScoreError
from headclass.probes import Probe, default_probes, from_tokens

__all__ = [
    "SCORE_NAMES",
    "CONVENTIONS",
    "pattern_scores",
    "pattern_scores_single_pass",
    "detect_head_scores",
]

CONVENTIONS = ("headclass", "detect_head")
# Below this much attention left after exclusions, a query's share counts as 0 (float32 gives
# 1 - A[q, 0] to about 1e-7, so smaller remainders are rounding noise).
_DENOMINATOR_FLOOR = 1e-4
# Entropy is computed in slices of about this many pattern entries, so its temporaries stay a
# small fraction of one layer's pattern.
_ENTROPY_SLICE = 1 << 21


# -- per-batch context ------------------------------------------------------------------------


@dataclass
class _Options:
    max_offset: int
    diffuse_min_keys: int
    exclude_bos: bool
    exclude_current_token: bool
    convention: str


@dataclass
class _Terms:
    """Pattern entries a sparse score reads: ``A[b[i], :, q[i], k[i]]`` is added to segment
    ``seg[i]``; ``finish`` turns the segment sums ``[n_seg, head]`` into the score's sum."""

    b: Tensor
    q: Tensor
    k: Tensor
    seg: Tensor
    n_seg: int
    finish: Callable[[Tensor], Tensor]


class _Batch:
    """What the reductions need about one probe batch, built once before its forward pass.

    Every sparse score (previous, current, BOS, offsets, duplicate, induction) is a list of
    ``(b, q, k)`` entries with a segment id. All of them are concatenated, so that a layer costs
    ONE ``take`` of a few thousand values per head and ONE ``index_add`` into the segments,
    whatever the number of scores; only entropy and max-attention read the whole pattern.
    """

    def __init__(self, probe: Probe, options: _Options, names: Sequence[str], device: torch.device):
        self.probe, self.options, self.device = probe, options, device
        self.n_batch, self.n_pos = probe.n_sequences, probe.n_positions
        self._match: Optional[Tensor] = None
        self.slices: dict[str, tuple[int, int, Callable[[Tensor], Tensor]]] = {}
        parts, offset = [], 0
        for name in names:
            spec = _SCORES[name]
            if spec.terms is None:
                continue
            terms = spec.terms(self)
            parts.append((terms.b, terms.q, terms.k, terms.seg + offset))
            self.slices[name] = (offset, terms.n_seg, terms.finish)
            offset += terms.n_seg
        self.n_segments = offset
        if parts:
            b, q, k, seg = (torch.cat(column) for column in zip(*parts))
            self._flat = (b * self.n_pos + q) * self.n_pos + k  # index within one head's block
            self._seg = seg.to(device)
        self._index: Optional[Tensor] = None
        self._buffer: Optional[Tensor] = None

    def same_token(self) -> Tensor:
        """``[batch, query, key]``: key holds the same token as query (diagonal included)."""
        if self._match is None:
            tokens = self.probe.tokens
            self._match = tokens[:, :, None] == tokens[:, None, :]
        return self._match

    def queries(self, start: int) -> tuple[Tensor, Tensor]:
        """``(b, q)`` of every query position ``q >= start`` of every sequence."""
        q = torch.arange(max(0, start), self.n_pos).expand(self.n_batch, -1)
        b = torch.arange(self.n_batch)[:, None].expand_as(q)
        return b.reshape(-1), q.reshape(-1)

    def segment_sums(self, pattern: Tensor) -> dict[str, Tensor]:
        """Sum of the pattern entries of every segment, ``[n_seg, head]`` per sparse score."""
        if not self.slices:
            return {}
        n_heads = pattern.shape[1]
        if self._index is None or self._index.shape[1] != n_heads:
            block = self.n_pos * self.n_pos
            b = self._flat // block
            # flat position in [batch, head, query, key] order; take() reads any memory layout
            self._index = ((b[:, None] * n_heads + torch.arange(n_heads)) * block
                           + (self._flat % block)[:, None]).to(self.device)
        values = pattern.take(self._index)  # [entry, head]
        sums = values.new_zeros(self.n_segments, n_heads).index_add_(0, self._seg, values)
        return {name: sums[start:start + size] for name, (start, size, _) in self.slices.items()}

    def buffer(self, numel: int, like: Tensor) -> Tensor:
        """A scratch buffer reused across layers (fresh large allocations are page-fault bound)."""
        if self._buffer is None or self._buffer.numel() < numel or self._buffer.dtype != like.dtype:
            self._buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
        return self._buffer[:numel]


# -- reductions ------------------------------------------------------------------------------
# Each score has ``count(probe, options)``: its number of valid queries (a tensor, [K] for
# fixed_offset), known before any forward pass, and either ``terms(batch)`` (the entries it
# reads, summed by the shared gather) or ``dense(pattern, batch)`` (reads the whole pattern).
# Both give the sum over the batch of the per-query values: ``[head]`` (``[head, K]`` for
# fixed_offset).


def _count_previous(probe: Probe, o: _Options) -> Tensor:
    if o.convention == "detect_head":
        return torch.tensor(float(probe.n_sequences))
    return torch.tensor(float(probe.n_sequences * max(0, probe.n_positions - 1 - int(probe.has_bos))))


def _count_after_first(probe: Probe, o: _Options) -> Tensor:
    return torch.tensor(float(probe.n_sequences * max(0, probe.n_positions - 1)))


def _count_duplicate(probe: Probe, o: _Options) -> Tensor:
    if o.convention == "detect_head":
        return torch.tensor(float(probe.n_sequences if probe.n_duplicate_positions else 0))
    return torch.tensor(float(probe.n_duplicate_positions))


def _count_induction(probe: Probe, o: _Options) -> Tensor:
    if o.convention == "detect_head":
        return torch.tensor(float(probe.n_sequences if probe.n_induction_positions else 0))
    return torch.tensor(float(probe.n_induction_positions))


def _count_offsets(probe: Probe, o: _Options) -> Tensor:
    ks = torch.arange(1, o.max_offset + 1)
    return (probe.n_sequences * (probe.n_positions - ks - int(probe.has_bos)).clamp(min=0)).float()


def _count_diffuse(probe: Probe, o: _Options) -> Tensor:
    return torch.tensor(float(probe.n_sequences * max(0, probe.n_positions - o.diffuse_min_keys + 1)))


def _single_segment(b: Tensor, q: Tensor, k: Tensor) -> _Terms:
    return _Terms(b, q, k, torch.zeros_like(b), 1, lambda sums: sums[0])


def _terms_current(batch: _Batch) -> _Terms:
    b, q = batch.queries(1)
    return _single_segment(b, q, q)


def _terms_bos(batch: _Batch) -> _Terms:
    b, q = batch.queries(1)
    return _single_segment(b, q, torch.zeros_like(q))


def _terms_offsets(batch: _Batch) -> _Terms:
    skip = int(batch.probe.has_bos)
    parts = []
    for k in range(1, batch.options.max_offset + 1):
        b, q = batch.queries(k + skip)
        parts.append((b, q, q - k, torch.full_like(b, k - 1)))
    b, q, key, seg = (torch.cat(column) for column in zip(*parts))
    return _Terms(b, q, key, seg, batch.options.max_offset, lambda sums: sums.T)  # [head, K]


def _token_match(name: str) -> Callable[[_Batch], _Terms]:
    """Terms of previous-token, duplicate-token or induction attention (see module doc)."""

    def terms(batch: _Batch) -> _Terms:
        o, n = batch.options, batch.n_batch
        if name == "previous_token":
            b, q = batch.queries(1 if o.convention == "detect_head" else 1 + int(batch.probe.has_bos))
            k = q - 1
        elif name == "duplicate_token":
            b, q, k = batch.same_token().tril(-1).nonzero(as_tuple=True)  # j < q
        else:
            # key k whose preceding token k - 1 is a copy of token q; the detect_head
            # convention also admits k == q (a token repeated at once)
            shifted = torch.zeros_like(batch.same_token())
            shifted[:, :, 1:] = batch.same_token()[:, :, :-1]
            b, q, k = shifted.tril(0 if o.convention == "detect_head" else -1).nonzero(as_tuple=True)
        keep = torch.ones_like(q, dtype=torch.bool)
        if o.exclude_bos:
            keep &= k != 0
        if o.exclude_current_token:
            keep &= k != q
        b, q, k = b[keep], q[keep], k[keep]
        if o.convention == "detect_head":
            return _detect_head_terms(batch, b, q, k)
        if not (o.exclude_bos or o.exclude_current_token):
            return _single_segment(b, q, k)
        # share of the attention left after removing BOS and/or self, per valid query
        queries, slot = torch.unique(b * batch.n_pos + q, return_inverse=True)
        m = len(queries)
        qb, qq = queries // batch.n_pos, queries % batch.n_pos
        parts = [(b, q, k, slot)]
        if o.exclude_bos:
            parts.append((qb, qq, torch.zeros_like(qq), m + torch.arange(m)))
        if o.exclude_current_token:
            parts.append((qb, qq, qq, 2 * m + torch.arange(m)))
        b, q, k, seg = (torch.cat(column) for column in zip(*parts))

        def finish(sums: Tensor) -> Tensor:
            left = 1.0 - o.exclude_bos * sums[m:2 * m] - o.exclude_current_token * sums[2 * m:3 * m]
            return _share(sums[:m], left).sum(0)

        return _Terms(b, q, k, seg, 3 * m, finish)

    return terms


def _detect_head_terms(batch: _Batch, b: Tensor, q: Tensor, k: Tensor) -> _Terms:
    """detect_head's per-sequence ``sum(A' * D) / sum(A')``, summed over sequences."""
    o, n, P = batch.options, batch.n_batch, batch.n_pos
    parts = [(b, q, k, b)]
    all_b, all_q = batch.queries(0)
    if o.exclude_bos:  # sum over queries of A[q, 0]
        parts.append((all_b, all_q, torch.zeros_like(all_q), n + all_b))
    if o.exclude_current_token:  # sum over queries of A[q, q]
        parts.append((all_b, all_q, all_q, 2 * n + all_b))
    if o.exclude_bos and o.exclude_current_token:  # A[0, 0] was removed twice
        first = torch.arange(n)
        parts.append((first, torch.zeros_like(first), torch.zeros_like(first), 3 * n + first))
    b, q, k, seg = (torch.cat(column) for column in zip(*parts))

    def finish(sums: Tensor) -> Tensor:
        left = P - o.exclude_bos * sums[n:2 * n] - o.exclude_current_token * sums[2 * n:3 * n]
        if o.exclude_bos and o.exclude_current_token:
            left = left + sums[3 * n:4 * n]
        return _share(sums[:n], left).sum(0)

    return _Terms(b, q, k, seg, 4 * n, finish)


def _share(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator``, and 0 where (almost) no attention is left to share."""
    enough = denominator > _DENOMINATOR_FLOOR
    return torch.where(enough, numerator / denominator.clamp(min=_DENOMINATOR_FLOOR), 0.0)


def _dense_entropy(pattern: Tensor, batch: _Batch) -> Tensor:
    """Sum of ``H(A[q]) / log(q + 1)`` over the rows with enough keys, in query blocks.

    A block of queries ``[q0, q1)`` only reads keys ``< q1`` (the rest is masked to 0), which
    skips about half the pattern; each block is written into one reused scratch buffer.
    """
    B, H, P = pattern.shape[0], pattern.shape[1], batch.n_pos
    first = batch.options.diffuse_min_keys - 1
    rows_per_block = max(1, _ENTROPY_SLICE // max(1, B * H * P))
    buffer = batch.buffer(B * H * min(rows_per_block, P) * P, pattern)
    total = pattern.new_zeros(H)
    for q0 in range(first, P, rows_per_block):
        q1 = min(P, q0 + rows_per_block)
        block = pattern[:, :, q0:q1, :q1]
        scratch = buffer[: block.numel()].view(block.shape)
        entropy = torch.special.entr(block, out=scratch).sum(-1)  # [b, head, query]
        norm = torch.arange(q0 + 1, q1 + 1, device=pattern.device, dtype=pattern.dtype).log()
        total += (entropy / norm).sum((0, 2))
    return total


def _dense_max(pattern: Tensor, batch: _Batch) -> Tensor:
    first = batch.options.diffuse_min_keys - 1
    return pattern[:, :, first:, :].amax(-1).sum((0, 2))


@dataclass(frozen=True)
class _Score:
    count: Callable[[Probe, _Options], Tensor]
    undefined: str  # why a probe gives no valid query
    terms: Optional[Callable[[_Batch], _Terms]] = None
    dense: Optional[Callable[[Tensor, _Batch], Tensor]] = None


_KEYS = "needs sequences of >= {min_keys} tokens (patterns.diffuse_min_keys)"

#: The registry: one engine, thin named reductions. Order = order of the returned dict.
_SCORES: dict[str, _Score] = {
    "previous_token": _Score(_count_previous, "needs sequences of >= 3 tokens (2 without BOS)",
                             terms=_token_match("previous_token")),
    "current_token": _Score(_count_after_first, "needs sequences of >= 2 tokens", terms=_terms_current),
    "bos": _Score(_count_after_first, "needs sequences of >= 2 tokens", terms=_terms_bos),
    "induction": _Score(_count_induction, "needs a repeated segment of >= 2 tokens",
                        terms=_token_match("induction")),
    "duplicate_token": _Score(_count_duplicate, "needs a token that occurs twice",
                              terms=_token_match("duplicate_token")),
    "fixed_offset": _Score(_count_offsets, "needs sequences of >= 3 tokens", terms=_terms_offsets),
    "diffuse_entropy": _Score(_count_diffuse, _KEYS, dense=_dense_entropy),
    "max_attention": _Score(_count_diffuse, _KEYS, dense=_dense_max),
}

#: Names of the scores, in the order :func:`pattern_scores` returns them.
SCORE_NAMES: tuple[str, ...] = tuple(_SCORES)


# -- public API ------------------------------------------------------------------------------


def pattern_scores(
    model: Any,
    probes: Union[None, Probe, Sequence[Probe]] = None,
    *,
    config: Any = None,
    scores: Optional[Iterable[str]] = None,
    batch_size: Optional[int] = None,
    exclude_bos: Optional[bool] = None,
    exclude_current_token: bool = False,
    convention: str = "headclass",
    progress: bool = True,
) -> dict[str, Tensor]:
    """Every attention-pattern score of every head, one forward pass per probe batch.

    Parameters
    ----------
    model
        A :class:`~headclass.HeadModel` (or anything with ``n_layers``, ``n_heads``,
        ``d_vocab`` and ``run_with_patterns``).
    probes
        One probe or several; ``None`` builds :func:`headclass.probes.default_probes` from the
        config: random repeated tokens (feeding every score) and, when the model has a
        tokenizer, the shipped text corpus (feeding all but induction and duplicate-token,
        see :data:`headclass.probes.TEXT_SCORES`). A score is the mean over the valid query
        positions of every probe that feeds it, so probes are weighted by their positions.
    config
        A :class:`~headclass.HeadclassConfig`, a mapping or a YAML path (``None``: defaults).
        Uses ``probes.*`` (default probes, ``batch_size``) and ``patterns.*``.
    scores
        Names from :data:`SCORE_NAMES` to compute (default: all).
    batch_size
        Sequences per forward pass (default ``config.probes.batch_size``); larger batches are
        run in chunks, which gives the same scores.
    exclude_bos, exclude_current_token
        Measure previous-token / duplicate / induction attention as a share of the attention
        not paid to position 0 / the query itself. ``exclude_bos`` defaults to
        ``config.patterns.exclude_bos``.
    convention
        ``"headclass"`` (default, see the module docs) or ``"detect_head"``, which reproduces
        TransformerLens' ``detect_head(error_measure="mul")`` for the token-match scores.
    progress
        Show a tqdm bar over batches.

    Returns
    -------
    dict[str, Tensor]
        One ``Float[Tensor, "layer head"]`` in [0, 1] per requested score (CPU, float32), in
        :data:`SCORE_NAMES` order; with ``fixed_offset`` also ``fixed_offset_k``
        (``Int[Tensor, "layer head"]``, the best offset) and ``fixed_offset_per_k``
        (``Float[Tensor, "layer head offset"]``, the mean for each ``k = 1..max_offset``).

    Raises
    ------
    ProbeError
        A requested score has no valid query position in any probe that feeds it (e.g.
        induction on text only), or a probe is malformed.
    ScoreError
        A pattern contains NaN (the message names the layer).
    """
    from headclass.config import load_config

    cfg = load_config(config)
    options = _options(cfg, exclude_bos, exclude_current_token, convention)
    names = _score_names(scores)
    if probes is None:
        probes = default_probes(model, cfg)
    elif isinstance(probes, Probe):
        probes = [probes]
    probes = list(probes)
    if not probes:
        raise ProbeError("pattern_scores needs at least one probe (or probes=None for the defaults).")
    size = cfg.probes.batch_size if batch_size is None else batch_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ProbeError(f"batch_size must be an int >= 1; got {size!r}.")
    return _Engine(model, probes, names, options).run(size, progress)


def pattern_scores_single_pass(
    model: Any,
    tokens: Union[Tensor, Probe],
    *,
    config: Any = None,
    scores: Optional[Iterable[str]] = None,
    exclude_bos: Optional[bool] = None,
    exclude_current_token: bool = False,
    convention: str = "headclass",
) -> dict[str, Tensor]:
    """All requested scores of one token batch ``[batch, pos]`` from exactly one forward pass.

    ``tokens`` may be a :class:`~headclass.probes.Probe` (its ``scores`` restriction is ignored:
    every requested score is computed on it) or a token tensor. Same options and return value
    as :func:`pattern_scores`, without chunking or progress bar.
    """
    from headclass.config import load_config

    cfg = load_config(config)
    options = _options(cfg, exclude_bos, exclude_current_token, convention)
    names = _score_names(scores)
    probe = tokens if isinstance(tokens, Probe) else from_tokens(model, tokens, name="tokens")
    probe = Probe(probe.tokens, probe.name, probe.has_bos, probe.previous_occurrence,
                  probe.induction_target, scores=None)
    return _Engine(model, [probe], names, options).run(probe.n_sequences, progress=False)


def detect_head_scores(
    model: Any,
    tokens: Tensor,
    head_type: str,
    *,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
) -> Tensor:
    """TransformerLens' ``detect_head(..., error_measure="mul")`` on exactly these tokens.

    ``detect_head`` only takes strings and tokenises them itself; this feeds it a stand-in
    model whose ``to_tokens`` returns rows of ``tokens`` instead, so both sides see the same
    ids. It runs one cached forward pass per sequence, as ``detect_head`` does for a list.

    Parameters
    ----------
    model
        A :class:`~headclass.HeadModel` (its ``tl_model`` is what ``detect_head`` runs).
    tokens
        ``[batch, pos]`` ids, ``1 < pos < n_ctx`` (``detect_head``'s own limit).
    head_type
        ``"previous_token"``, ``"duplicate_token"`` or ``"induction"``.

    Returns
    -------
    Tensor
        ``Float[Tensor, "layer head"]``, the mean over sequences.
    """
    from transformer_lens.head_detector import detect_head

    names = {"previous_token": "previous_token_head", "duplicate_token": "duplicate_token_head",
             "induction": "induction_head"}
    if head_type not in names:
        raise ScoreError(f"head_type must be one of {sorted(names)}; got {head_type!r}.")
    tokens = model.check_tokens(tokens) if hasattr(model, "check_tokens") else tokens
    stand_in = _FixedTokens(model.tl_model, tokens)
    labels = [str(i) for i in range(tokens.shape[0])]
    with torch.no_grad():
        return detect_head(stand_in, labels, names[head_type], exclude_bos=exclude_bos,
                           exclude_current_token=exclude_current_token, error_measure="mul")


class _FixedTokens:
    """A TransformerLens model whose ``to_tokens("i")`` is row ``i`` of a fixed batch."""

    def __init__(self, tl_model: Any, tokens: Tensor):
        self._tl_model, self._tokens = tl_model, tokens

    @property
    def cfg(self) -> Any:
        return self._tl_model.cfg

    def to_tokens(self, seq: Union[str, Sequence[str]]) -> Tensor:
        if isinstance(seq, str):
            return self._tokens[int(seq)][None]
        return self._tokens[[int(s) for s in seq]]

    def run_with_cache(self, *args: Any, **kwargs: Any) -> Any:
        return self._tl_model.run_with_cache(*args, **kwargs)


# -- engine ----------------------------------------------------------------------------------


class _Engine:
    """Runs probes batch by batch and folds every layer's pattern into running sums."""

    def __init__(self, model: Any, probes: list[Probe], names: list[str], options: _Options):
        self.model, self.probes, self.names, self.options = model, probes, names, options
        for probe in probes:
            if not isinstance(probe, Probe):
                raise ProbeError(
                    f"probes must be Probe objects (see headclass.probes); got {type(probe).__name__}."
                )
            probe.check(model)
        self.counts: dict[str, Tensor] = {}
        problems = []
        for name in names:
            count, problem = self._count(name)
            self.counts[name] = count
            if problem:
                problems.append(problem)
        if problems:
            raise ProbeError("\n".join(problems))

    def _count(self, name: str) -> tuple[Tensor, Optional[str]]:
        """Valid query positions of ``name`` over all probes feeding it, or why there are none."""
        spec = _SCORES[name]
        undefined = spec.undefined.format(min_keys=self.options.diffuse_min_keys)
        feeding = [p for p in self.probes if p.feeds(name)]
        total = sum((spec.count(p, self.options) for p in feeding), torch.tensor(0.0))
        if bool((total > 0).any()):
            return total, None
        hint = (" Use probes.repeated(...)." if name in ("induction", "duplicate_token")
                else " Use longer sequences.")
        if not feeding:
            given = ", ".join(repr(p.name) for p in self.probes)
            return total, (f"{name} {undefined}; no probe given feeds it (probes {given} "
                           f"leave it out, see Probe.scores).{hint}")
        label = " or ".join(repr(p.name) for p in feeding)
        return total, f"{name} {undefined}; probe {label} has none.{hint}"

    def run(self, batch_size: int, progress: bool) -> dict[str, Tensor]:
        from tqdm.auto import tqdm

        L, H = int(self.model.n_layers), int(self.model.n_heads)
        totals = {name: None for name in self.names}
        n_chunks = sum(math.ceil(p.n_sequences / batch_size) for p in self.probes)
        device = _model_device(self.model)
        with tqdm(total=n_chunks, desc="pattern scores", unit="batch", disable=not progress) as bar:
            for probe in self.probes:
                active = [n for n in self.names if probe.feeds(n)]
                if not active:
                    bar.update(math.ceil(probe.n_sequences / batch_size))
                    continue
                for chunk in probe.batches(batch_size):
                    bar.set_postfix_str(probe.name)
                    sums = self._run_chunk(chunk, active, device, L, H)
                    for name, value in sums.items():
                        totals[name] = value if totals[name] is None else totals[name] + value
                    bar.update(1)
        return self._finish(totals, L, H)

    def _run_chunk(self, chunk: Probe, active: list[str], device: torch.device, L: int, H: int
                   ) -> dict[str, Tensor]:
        batch = _Batch(chunk, self.options, active, device)
        sums: dict[str, list[Optional[Tensor]]] = {name: [None] * L for name in active}
        covered = "diffuse_entropy" in active and "max_attention" in active
        first = self.options.diffuse_min_keys - 1

        def callback(layer: int, pattern: Tensor) -> None:
            segments = batch.segment_sums(pattern)
            for name in active:
                spec = _SCORES[name]
                if spec.dense is not None:
                    value = spec.dense(pattern, batch)
                else:
                    start, size, finish = batch.slices[name]
                    value = finish(segments[name])
                sums[name][layer] = value.float()
            # NaN anywhere in the pattern reaches the entropy / max sums of rows >= first; the
            # first rows are checked directly (a full scan only when those scores are skipped)
            bad = (pattern[:, :, :first] if covered else pattern).isnan().any()
            for name in active:
                bad = bad | sums[name][layer].isnan().any()
            if bool(bad):  # one host sync per layer
                raise ScoreError(
                    f"the attention pattern of layer {layer} contains NaN (probe {chunk.name!r}); "
                    "the model's weights or its dtype (float16 overflow?) are broken for this "
                    "input. Try dtype=torch.float32."
                )

        self.model.run_with_patterns(chunk.tokens, callback)
        missing = [layer for layer in range(L) if sums[active[0]][layer] is None]
        if missing:
            raise ScoreError(f"run_with_patterns never reported layers {missing} of model "
                             f"{getattr(self.model, 'name', '?')!r}.")
        return {name: torch.stack([s.cpu() for s in per_layer]) for name, per_layer in sums.items()}

    def _finish(self, totals: dict[str, Optional[Tensor]], L: int, H: int) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name in self.names:
            count = self.counts[name]
            total = totals[name]
            if name == "fixed_offset":
                means = (total / count.clamp(min=1)).clamp(0.0, 1.0)  # [L, H, K]
                means[..., count == 0] = float("nan")  # no query could see this offset
                index = means.nan_to_num(-1.0).argmax(-1)  # ties: the smallest offset
                out[name] = means.gather(-1, index[..., None])[..., 0]
                out["fixed_offset_k"] = index + 1
                out["fixed_offset_per_k"] = means
            else:
                out[name] = (total / count).clamp(0.0, 1.0)
        return out


def _options(cfg: Any, exclude_bos: Optional[bool], exclude_current_token: bool,
             convention: str) -> _Options:
    if convention not in CONVENTIONS:
        raise ScoreError(f"convention must be one of {CONVENTIONS}; got {convention!r}.")
    return _Options(
        max_offset=cfg.patterns.max_offset,
        diffuse_min_keys=cfg.patterns.diffuse_min_keys,
        exclude_bos=cfg.patterns.exclude_bos if exclude_bos is None else bool(exclude_bos),
        exclude_current_token=bool(exclude_current_token),
        convention=convention,
    )


def _score_names(scores: Optional[Iterable[str]]) -> list[str]:
    if scores is None:
        return list(SCORE_NAMES)
    if isinstance(scores, str):
        scores = [scores]
    wanted = list(dict.fromkeys(scores))
    unknown = [s for s in wanted if s not in _SCORES]
    if unknown or not wanted:
        raise ScoreError(
            f"unknown score name(s) {unknown}; choose from {list(SCORE_NAMES)}." if unknown
            else "scores must name at least one score."
        )
    return [s for s in SCORE_NAMES if s in wanted]


def _model_device(model: Any) -> torch.device:
    try:
        return torch.device(model.device)
    except (AttributeError, TypeError, RuntimeError):
        return torch.device("cpu")
