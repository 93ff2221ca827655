"""Attention-pattern scores: what each head attends to, from one forward pass per batch.

Every score is a ``Float[Tensor, "layer head"]``. All of them come out of ONE forward pass per
probe batch: :meth:`HeadModel.run_with_patterns` hands each layer's pattern
``[batch, head, query, key]`` to a callback, every registered reduction folds it into
per-sequence sums ``[sequence, head]`` on the spot, and the pattern is dropped before the next
layer runs (no cache of all layers is ever held). A score is the sum over sequences divided by
the number of *valid* query positions (those where the score is defined), so batches of any
size and any number of probes pool into the same weighted mean, and chunking never changes a
result. The per-sequence sums also give every score's standard error (``<key>_se``) and a
bootstrap over probe sequences (:meth:`PatternMeasurement.bootstrap`) without another forward.

This module is longer than most (about 1200 lines) because it is the one engine: the registry,
the shared gather, the per-sequence bookkeeping and the uncertainty all read the same
reductions, and splitting them would split the one place where a score is defined.

The core scores (``A`` is a head's pattern, ``q`` a query position, ``k`` a key position;
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

Attention budget
----------------
``budget`` (natural text) and ``budget_rep`` (repeated tokens) split each query's attention
``A[q, :]`` (queries ``q >= 1``) into mutually exclusive destination classes; each key goes to
the FIRST class of this list that it matches (:data:`BUDGET_CLASSES`):

==============  ============================================================================
class           key ``k`` (for query ``q``)
==============  ============================================================================
``first``       ``k == 0`` (the BOS when the model prepends one; an attention sink)
``self``        ``k == q``
``previous``    ``k == q - 1``
``local``       ``q - w <= k <= q - 2``, ``w = patterns.local_window``
``duplicate``   ``tok[k] == tok[q]`` (an earlier copy of the query's own token)
``induction``   ``tok[k - 1] == tok[q]`` (the token after an earlier copy)
``delimiter``   ``tok[k]`` is a delimiter (:func:`delimiter_token_mask`: punctuation,
                whitespace / newline tokens; none without a tokenizer)
``other``       every other key
==============  ============================================================================

The shares of a query sum to its attention total (1: ``other`` is measured as the row total
minus the named classes, so ``sum_c budget_c == 1`` checks that the rows are normalised).
Keys: ``budget_<class>`` (mean share over the queries of the text probes; ``budget_rep_<class>``
for the repeated probe), ``budget_base_<class>`` (the same reduction applied to a *uniform*
head, ``A[q, k] = 1 / (q + 1)``: the share a head gets by chance on these very tokens) and
``budget_lift_<class> = budget_<class> / budget_base_<class>`` (NaN where the base rate is 0:
no such key in the probe). Sources: first-position sinks (Xiao et al. 2023), attention to
separators and punctuation as a no-op (Clark et al. 2019), positional and local heads (Voita
et al. 2019), duplicate / induction heads (Wang et al. 2022; Olsson et al. 2022).

Positional consistency
----------------------
``positional_consistency`` (text) and ``positional_consistency_rep`` (repeated tokens) ask
whether a head's pattern is decided by *position* (the same in every sequence) or by *content*
(moving with the tokens). Over the queries ``q = 2, 6, 10, ...`` (every 4th from 2) and keys
``k >= 1`` (the first position is the budget's ``first``), with ``A_b`` sequence ``b``'s pattern
(those rows) and ``n`` sequences::

    sum_{b != b'} <A_b, A_b'>  /  ((n - 1) sum_b <A_b, A_b>)      in [0, 1]

the mean inner product of two *different* sequences' patterns over the mean inner product of a
pattern with itself: 1 when every sequence has the same pattern (previous-token, local,
fixed-offset, uniform heads), near 0 when the patterns of different sequences do not overlap
(a head that follows a class of tokens wherever it is). Pooled over the probes that feed it
(each probe's pairs, probes of >= 2 sequences). It is a statistic of sequence *pairs*, not a
mean over sequences: it has no ``_se`` and no bootstrap replicates. It keeps one
``[head, query, key]`` running sum per layer and probe (``layers x heads x pos^2 / 4`` floats).

Uncertainty
-----------
Every per-sequence score comes with ``<key>_se``: the standard error of the ratio estimator
``sum_i S_i / sum_i C_i`` (``S_i`` the sequence's sum, ``C_i`` its number of valid queries)
with sequences as the sampling unit, stratified by probe: ``sqrt(sum_p n_p / (n_p - 1)
sum_{i in p} (e_i - mean_p e)^2) / sum_i C_i`` with ``e_i = S_i - r C_i`` (the linearised
ratio; Cochran 1977, ch. 6). NaN when a feeding probe has a single sequence. ``fixed_offset_se``
is the SE at the best offset; ``budget_lift_<class>_se`` is ``budget_<class>_se / base``.
:func:`pattern_measurement` keeps the per-sequence sums; its :meth:`~PatternMeasurement.bootstrap`
resamples sequences within each probe (with replacement, seeded) and returns every score per
replicate, ``[replicate, layer, head]``.

Probes
------
:func:`pattern_scores` pools every probe that feeds a score (:attr:`Probe.scores`), weighting
each by its valid query positions. The default probes (:func:`headclass.probes.default_probes`):
random repeated tokens ``[BOS] r r`` feed every score except the natural-text budget and
consistency; the shipped English text (when the model has a tokenizer) feeds all but
``induction``, ``duplicate_token`` and the ``_rep`` scores. ``budget`` and
``positional_consistency`` are fed only by probes that name them in ``Probe.scores``
(:data:`headclass.probes.TEXT_SCORES` does); a probe with ``scores=None`` feeds the ``_rep``
ones. Every score but the core ones is left out, not an error, when no probe feeds it and
``scores`` is not given.

Precision and cost
------------------
Half-precision patterns (bfloat16, float16) are cast to float32 per layer before any
reduction, and sums across sequences are float64. Per layer: one ``take`` of the pattern
entries the sparse scores read and one ``index_add`` into per-sequence segments, one
``[pos, 2]`` matrix product (budget row totals and delimiter mass), two passes for
max-attention and entropy (the latter over the lower triangle in query blocks written into one
reused buffer), and a sum and a norm for the consistency.

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
(:func:`headclass.testing.detect_head_scores` runs ``detect_head`` itself, for the tests.)

Examples
--------
>>> from headclass.scores.patterns import pattern_scores, pattern_measurement
>>> scores = pattern_scores(model)                       # default probes from the config
>>> scores["induction"].shape, scores["induction_se"].shape
(torch.Size([30, 9]), torch.Size([30, 9]))
>>> run = pattern_measurement(model)
>>> run.bootstrap(200, seed=0)["induction"].shape
torch.Size([200, 30, 9])
"""

from __future__ import annotations

import math
import unicodedata
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union, cast

import torch
from torch import Tensor

from headclass.errors import ProbeError, ScoreError
from headclass.heap import reuse_freed_memory
from headclass.loading.head_model import HeadModelLike
from headclass.probes import Probe, default_probes, from_tokens

__all__ = [
    "ScoreInfo",
    "PATTERN_SCORES",
    "PATTERN_KEYS",
    "SCORE_NAMES",
    "BUDGET_CLASSES",
    "CONVENTIONS",
    "PatternMeasurement",
    "pattern_scores",
    "pattern_measurement",
    "pattern_scores_single_pass",
    "delimiter_token_mask",
]

CONVENTIONS = ("headclass", "detect_head")

#: The attention-budget classes, in their first-match-wins order (see the module docs).
BUDGET_CLASSES: tuple[str, ...] = ("first", "self", "previous", "local", "duplicate", "induction", "delimiter", "other")

# Below this much attention left after exclusions, a query's share counts as 0 (float32 gives
# 1 - A[q, 0] to about 1e-7, so smaller remainders are rounding noise).
_DENOMINATOR_FLOOR = 1e-4
# Entropy is computed in slices of about this many pattern entries, so its temporaries stay a
# small fraction of one layer's pattern.
_ENTROPY_SLICE = 1 << 21
# Positional consistency reads every 4th query row: a ratio of sums over thousands of
# (query, key) pairs, which a quarter of the rows estimates as well, at a quarter of the cost
# and of the memory of its running sums.
_CONSISTENCY_STRIDE = 4


@dataclass(frozen=True)
class ScoreInfo:
    """Public metadata of a registered score or of one key it returns.

    Attributes
    ----------
    name
        The score (or key) name.
    range
        ``(low, high)`` of its values (``math.inf`` when unbounded).
    probes
        Which probes it is meant for: ``("repeated",)``, ``("text",)`` or both.
    description
        One line: what it measures.
    keys
        The ``[layer, head]`` keys it adds to :func:`pattern_scores`' dict (for a key's own
        info: the key alone).
    kind
        ``"score"``, ``"se"`` (a standard error), ``"base"`` (a uniform head's value) or
        ``"lift"`` (score / base).
    """

    name: str
    range: tuple[float, float]
    probes: tuple[str, ...]
    description: str
    keys: tuple[str, ...] = ()
    kind: str = "score"


# -- per-batch context ------------------------------------------------------------------------


@dataclass
class _Options:
    max_offset: int
    diffuse_min_keys: int
    exclude_bos: bool
    exclude_current_token: bool
    convention: str
    local_window: int


@dataclass
class _Terms:
    """Pattern entries a sparse score reads: ``A[b[i], :, q[i], k[i]]`` is added to segment
    ``seg[i]``; ``finish(sums, pattern)`` turns the segment sums ``[n_seg, head]`` into the
    per-sequence sums ``[batch, head, K]``."""

    b: Tensor
    q: Tensor
    k: Tensor
    seg: Tensor
    n_seg: int
    finish: Callable[[Tensor, Tensor], Tensor]


class _Batch:
    """What the reductions need about one probe batch, built once before its forward pass.

    Every sparse score is a list of ``(b, q, k)`` entries with a segment id. All of them are
    concatenated, so that a layer costs ONE ``take`` per head and ONE ``index_add`` into the
    segments, whatever the number of scores.
    """

    def __init__(self, probe: Probe, options: _Options, names: Sequence[str], device: torch.device, delimiters: Tensor):
        self.probe, self.options, self.device = probe, options, device
        self.n_batch, self.n_pos = probe.n_sequences, probe.n_positions
        self.delimiter = delimiters[probe.tokens]  # [batch, pos] bool, CPU
        self._match: Optional[Tensor] = None
        self.slices: dict[str, tuple[int, int, Callable[[Tensor, Tensor], Tensor]]] = {}
        self.base: dict[str, Tensor] = {}  # per-sequence sums of a uniform head, [batch, K]
        parts, offset = [], 0
        for name in names:
            spec = _SCORES[name]
            if spec.terms is None:
                continue
            terms = spec.terms(self)
            parts.append((terms.b, terms.q, terms.k, terms.seg + offset))
            self.slices[name] = (offset, terms.n_seg, terms.finish)
            offset += terms.n_seg
            if spec.base:
                self.base[name] = self._uniform(_terms_budget(self, full=True))
        self.n_segments = offset
        if parts:
            b, q, k, seg = (torch.cat(column) for column in zip(*parts))
            self._flat = (b * self.n_pos + q) * self.n_pos + k  # index within one head's block
            self._seg = seg.to(device)
        self._index: Optional[Tensor] = None
        self._buffer: Optional[Tensor] = None
        self.segments: dict[str, Tensor] = {}  # the latest layer's segment sums (budget reuse)

    def _uniform(self, terms: _Terms) -> Tensor:
        """The score's per-sequence sums for a uniform head ``A[q, k] = 1 / (q + 1)``."""
        P = self.n_pos
        values = 1.0 / (terms.q.double() + 1.0)
        sums = torch.zeros(terms.n_seg, 1, dtype=torch.float64).index_add_(0, terms.seg, values[:, None])
        rows = torch.ones(P, P, dtype=torch.float64).tril() / torch.arange(1, P + 1, dtype=torch.float64)[:, None]
        return terms.finish(sums, rows.expand(self.n_batch, 1, P, P))[:, 0]

    def same_token(self) -> Tensor:
        """``[batch, query, key]``: key holds the same token as query (diagonal included)."""
        if self._match is None:
            tokens = self.probe.tokens
            self._match = tokens[:, :, None] == tokens[:, None, :]
        return self._match

    def queries(self, start: int) -> tuple[Tensor, Tensor]:
        """``(b, q)`` of every query position ``q >= start`` of every sequence."""
        q = torch.arange(min(max(0, start), self.n_pos), self.n_pos).expand(self.n_batch, -1)  # none past the end
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
            self._index = ((b[:, None] * n_heads + torch.arange(n_heads)) * block + (self._flat % block)[:, None]).to(
                self.device
            )
        values = pattern.take(self._index)  # [entry, head]
        sums = values.new_zeros(self.n_segments, n_heads).index_add_(0, self._seg, values)
        self.segments = {name: sums[start : start + size] for name, (start, size, _) in self.slices.items()}
        return self.segments

    def buffer(self, numel: int, like: Tensor) -> Tensor:
        """A scratch buffer reused across layers (fresh large allocations are page-fault bound)."""
        if self._buffer is None or self._buffer.numel() < numel or self._buffer.dtype != like.dtype:
            self._buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
        return self._buffer[:numel]


# -- reductions ------------------------------------------------------------------------------
# Each score has ``count(probe, options)``: its valid queries per sequence, ``[sequence, K]``
# (K = 1 but for fixed_offset and the budgets), known before any forward pass, and either
# ``terms(batch)`` (the entries it reads, summed by the shared gather) or ``dense(pattern,
# batch)`` (reads the whole pattern). Both give per-sequence sums ``[batch, head, K]``.


def _per_sequence(probe: Probe, value: float, k: int = 1) -> Tensor:
    """The same count for every sequence of the probe, ``[sequence, k]``."""
    return torch.full((probe.n_sequences, k), float(value), dtype=torch.float64)


def _count_previous(probe: Probe, o: _Options) -> Tensor:
    if o.convention == "detect_head":
        return _per_sequence(probe, 1.0)
    return _per_sequence(probe, max(0, probe.n_positions - 1 - int(probe.has_bos)))


def _count_after_first(probe: Probe, o: _Options) -> Tensor:
    return _per_sequence(probe, max(0, probe.n_positions - 1))


def _count_matches(field: str) -> Callable[[Probe, _Options], Tensor]:
    def count(probe: Probe, o: _Options) -> Tensor:
        hits = (getattr(probe, field) >= 0).sum(1).double()
        if o.convention == "detect_head":  # every sequence counts once when the probe has any
            return _per_sequence(probe, float(bool(hits.sum() > 0)))
        return hits[:, None]

    return count


def _count_offsets(probe: Probe, o: _Options) -> Tensor:
    ks = torch.arange(1, o.max_offset + 1)
    per_k = (probe.n_positions - ks - int(probe.has_bos)).clamp(min=0).double()
    return per_k.expand(probe.n_sequences, -1).clone()


def _count_diffuse(probe: Probe, o: _Options) -> Tensor:
    return _per_sequence(probe, max(0, probe.n_positions - o.diffuse_min_keys + 1))


def _count_budget(probe: Probe, o: _Options) -> Tensor:
    return _per_sequence(probe, max(0, probe.n_positions - 1), len(BUDGET_CLASSES))


def _count_pairs(probe: Probe, o: _Options) -> Tensor:
    # consistency needs two sequences and a query >= 2; one "count" per sequence when it does
    return _per_sequence(probe, float(probe.n_sequences >= 2 and probe.n_positions >= 3))


def _single(batch: _Batch, b: Tensor, q: Tensor, k: Tensor) -> _Terms:
    """One segment per sequence: the per-sequence sum of ``A[b, q, k]``."""
    return _Terms(b, q, k, b, batch.n_batch, lambda sums, pattern: sums[:, :, None])


def _terms_current(batch: _Batch) -> _Terms:
    b, q = batch.queries(1)
    return _single(batch, b, q, q)


def _terms_bos(batch: _Batch) -> _Terms:
    b, q = batch.queries(1)
    return _single(batch, b, q, torch.zeros_like(q))


def _terms_offsets(batch: _Batch) -> _Terms:
    skip, B, K = int(batch.probe.has_bos), batch.n_batch, batch.options.max_offset
    parts = []
    for k in range(1, K + 1):
        b, q = batch.queries(k + skip)
        parts.append((b, q, q - k, (k - 1) * B + b))
    b, q, key, seg = (torch.cat(column) for column in zip(*parts))
    return _Terms(b, q, key, seg, K * B, lambda sums, pattern: sums.view(K, B, -1).permute(1, 2, 0))


def _token_match(name: str) -> Callable[[_Batch], _Terms]:
    """Terms of previous-token, duplicate-token or induction attention (see module doc)."""

    def terms(batch: _Batch) -> _Terms:
        o = batch.options
        if name == "previous_token":
            b, q = batch.queries(1 if o.convention == "detect_head" else 1 + int(batch.probe.has_bos))
            k = q - 1
        elif name == "duplicate_token":
            b, q, k = batch.same_token().tril(-1).nonzero(as_tuple=True)  # j < q
        else:
            # key k whose preceding token k - 1 is a copy of token q; the detect_head
            # convention also admits k == q (a token repeated at once)
            b, q, k = _shifted_match(batch).tril(0 if o.convention == "detect_head" else -1).nonzero(as_tuple=True)
        keep = torch.ones_like(q, dtype=torch.bool)
        if o.exclude_bos:
            keep &= k != 0
        if o.exclude_current_token:
            keep &= k != q
        b, q, k = b[keep], q[keep], k[keep]
        if o.convention == "detect_head":
            return _detect_head_terms(batch, b, q, k)
        if not (o.exclude_bos or o.exclude_current_token):
            return _single(batch, b, q, k)
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

        def finish(sums: Tensor, pattern: Tensor) -> Tensor:
            left = 1.0 - o.exclude_bos * sums[m : 2 * m] - o.exclude_current_token * sums[2 * m : 3 * m]
            share = _share(sums[:m], left)
            out = share.new_zeros(batch.n_batch, share.shape[1])
            return out.index_add_(0, qb.to(share.device), share)[:, :, None]

        return _Terms(b, q, k, seg, 3 * m, finish)

    return terms


def _shifted_match(batch: _Batch) -> Tensor:
    """``[batch, query, key]``: the token before key ``k`` equals the token at query ``q``."""
    same = batch.same_token()
    shifted = torch.zeros_like(same)
    shifted[:, :, 1:] = same[:, :, :-1]
    return shifted


def _detect_head_terms(batch: _Batch, b: Tensor, q: Tensor, k: Tensor) -> _Terms:
    """detect_head's per-sequence ``sum(A' * D) / sum(A')``."""
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

    def finish(sums: Tensor, pattern: Tensor) -> Tensor:
        left = P - o.exclude_bos * sums[n : 2 * n] - o.exclude_current_token * sums[2 * n : 3 * n]
        if o.exclude_bos and o.exclude_current_token:
            left = left + sums[3 * n : 4 * n]
        return _share(sums[:n], left)[:, :, None]

    return _Terms(b, q, k, seg, 4 * n, finish)


def _share(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator``, and 0 where (almost) no attention is left to share."""
    enough = denominator > _DENOMINATOR_FLOOR
    return torch.where(enough, numerator / denominator.clamp(min=_DENOMINATOR_FLOOR), 0.0)


def _terms_budget(batch: _Batch, full: bool = False) -> _Terms:
    """The budget's named classes as entries (classes 0-5), plus the claimed delimiter keys.

    ``first``, ``self``, ``previous`` and ``local`` are offsets; ``duplicate`` / ``induction``
    are token matches beyond the local window. Delimiter keys that an earlier class claimed go
    to segment 6, so that ``delimiter = (all delimiter mass) - segment 6``. When the probe has
    a BOS and the batch already gathers ``bos``, ``current_token`` and ``fixed_offset`` (offsets
    up to the window), their per-sequence sums ARE classes 0-3 (same entries), so those are not
    gathered twice (``full=True`` gathers them anyway: the uniform-head base rates).
    """
    B, P, w = batch.n_batch, batch.n_pos, batch.options.local_window
    reuse = (
        not full
        and batch.probe.has_bos
        and batch.options.max_offset >= w
        and {"bos", "current_token", "fixed_offset"} <= set(batch.slices)
    )
    parts: list[tuple[Tensor, Tensor, Tensor, int]] = []  # (b, q, k, class)
    b, q = batch.queries(1)
    parts += [(b, q, torch.zeros_like(q), 0), (b, q, q, 1)]
    b, q = batch.queries(2)
    parts.append((b, q, q - 1, 2))
    for d in range(2, w + 1):
        b, q = batch.queries(d + 1)
        parts.append((b, q, q - d, 3))
    position = torch.arange(P)
    far = (position[:, None] - position[None, :] > w) & (position[None, :] >= 1)  # [q, k]
    same = batch.same_token()
    for index, mask in ((4, same & far), (5, _shifted_match(batch) & far & ~same)):
        b, q, k = mask.nonzero(as_tuple=True)
        parts.append((b, q, k, index))
    b = torch.cat([part[0] for part in parts])
    q = torch.cat([part[1] for part in parts])
    k = torch.cat([part[2] for part in parts])
    cls = torch.cat([torch.full_like(part[0], part[3]) for part in parts])
    claimed = batch.delimiter[b, k]
    keep = cls >= 4 if reuse else torch.ones_like(claimed)
    b, q, k = torch.cat([b[keep], b[claimed]]), torch.cat([q[keep], q[claimed]]), torch.cat([k[keep], k[claimed]])
    cls = torch.cat([cls[keep], torch.full((int(claimed.sum()),), 6, dtype=cls.dtype)])
    columns = torch.stack([torch.ones(B, P, dtype=torch.float64), batch.delimiter.double()], -1)

    def finish(sums: Tensor, pattern: Tensor) -> Tensor:
        named = sums.view(7, B, -1)  # [7, batch, head]
        if reuse:
            offsets = batch.segments["fixed_offset"].view(-1, B, named.shape[-1])  # [K, batch, head]
            named = torch.cat(
                [
                    torch.stack(
                        [batch.segments["bos"], batch.segments["current_token"], offsets[0], offsets[1:w].sum(0)]
                    ),
                    named[4:],
                ]
            )
        mass = torch.matmul(pattern, columns.to(pattern.device, pattern.dtype)[:, None])
        total, delimiter = mass[:, :, 1:].sum(2).unbind(-1)  # queries q >= 1
        delimiter = delimiter - named[6]
        other = total - named[:6].sum(0) - delimiter
        return torch.cat([named[:6].permute(1, 2, 0), delimiter[..., None], other[..., None]], -1)

    return _Terms(b, q, k, cls * B + b, 7 * B, finish)


def _dense_entropy(pattern: Tensor, batch: _Batch) -> Tensor:
    """Per-sequence sum of ``H(A[q]) / log(q + 1)`` over the rows with enough keys.

    A block of queries ``[q0, q1)`` only reads keys ``< q1`` (the rest is masked to 0), which
    skips about half the pattern; each block is written into one reused scratch buffer.
    """
    B, H, P = pattern.shape[0], pattern.shape[1], batch.n_pos
    first = batch.options.diffuse_min_keys - 1
    rows_per_block = max(1, _ENTROPY_SLICE // max(1, B * H * P))
    buffer = batch.buffer(B * H * min(rows_per_block, P) * P, pattern)
    total = pattern.new_zeros(B, H)
    for q0 in range(first, P, rows_per_block):
        q1 = min(P, q0 + rows_per_block)
        block = pattern[:, :, q0:q1, :q1]
        scratch = buffer[: block.numel()].view(block.shape)
        entropy = torch.special.entr(block, out=scratch).sum(-1)  # [b, head, query]
        norm = torch.arange(q0 + 1, q1 + 1, device=pattern.device, dtype=pattern.dtype).log()
        total += (entropy / norm).sum(2)
    return total[:, :, None]


def _dense_max(pattern: Tensor, batch: _Batch) -> Tensor:
    first = batch.options.diffuse_min_keys - 1
    return pattern[:, :, first:, :].amax(-1).sum(2)[:, :, None]


def _cross_moments(pattern: Tensor) -> tuple[Tensor, Tensor]:
    """Consistency moments of one batch: ``sum_b A_b`` ``[head, q, k]`` and ``sum_b <A_b, A_b>``,
    over the queries ``q = 2, 2 + s, 2 + 2 s, ...`` (``s = _CONSISTENCY_STRIDE``) and keys ``k >= 1``."""
    window = pattern[:, :, 2::_CONSISTENCY_STRIDE, 1:]
    rows = torch.linalg.vector_norm(window, dim=-1)  # [batch, head, query], per row
    return window.sum(0), rows.double().pow(2).sum((0, 2))


# -- outputs: from means [..., layer, head, K] to the returned keys ---------------------------


_Outputs = Callable[[Tensor, Optional[Tensor]], dict[str, Tensor]]
_Errors = Callable[[Tensor, Tensor, Optional[Tensor]], dict[str, Tensor]]


def _plain(name: str) -> tuple[_Outputs, _Errors]:
    def outputs(means: Tensor, base: Optional[Tensor]) -> dict[str, Tensor]:
        return {name: means[..., 0].clamp(0.0, 1.0)}

    def errors(se: Tensor, means: Tensor, base: Optional[Tensor]) -> dict[str, Tensor]:
        return {f"{name}_se": se[..., 0]}

    return outputs, errors


def _offset_outputs(means: Tensor, base: Optional[Tensor]) -> dict[str, Tensor]:
    means = means.clamp(0.0, 1.0)  # NaN (no query could see this offset) stays NaN
    index = means.nan_to_num(-1.0).argmax(-1)  # ties: the smallest offset
    return {
        "fixed_offset": means.gather(-1, index[..., None])[..., 0],
        "fixed_offset_k": index + 1,
        "fixed_offset_per_k": means,
    }


def _offset_errors(se: Tensor, means: Tensor, base: Optional[Tensor]) -> dict[str, Tensor]:
    index = means.clamp(0.0, 1.0).nan_to_num(-1.0).argmax(-1)
    return {"fixed_offset_se": se.gather(-1, index[..., None])[..., 0]}


def _budget(prefix: str) -> tuple[_Outputs, _Errors]:
    def lift(value: Tensor, base: Tensor) -> Tensor:
        return torch.where(base > 0, value / base.clamp_min(1e-300), torch.full_like(value, math.nan))

    def outputs(means: Tensor, base: Optional[Tensor]) -> dict[str, Tensor]:
        shares = means.clamp(0.0, 1.0)
        rates = cast(Tensor, base)[..., None, None, :].expand_as(shares)  # a budget always has one
        out = {f"{prefix}_{c}": shares[..., i] for i, c in enumerate(BUDGET_CLASSES)}
        out.update({f"{prefix}_base_{c}": rates[..., i] for i, c in enumerate(BUDGET_CLASSES)})
        out.update({f"{prefix}_lift_{c}": lift(shares[..., i], rates[..., i]) for i, c in enumerate(BUDGET_CLASSES)})
        return out

    def errors(se: Tensor, means: Tensor, base: Optional[Tensor]) -> dict[str, Tensor]:
        rates = cast(Tensor, base)[None, None, :].expand_as(se)
        out = {f"{prefix}_{c}_se": se[..., i] for i, c in enumerate(BUDGET_CLASSES)}
        out.update({f"{prefix}_lift_{c}_se": lift(se[..., i], rates[..., i]) for i, c in enumerate(BUDGET_CLASSES)})
        return out

    return outputs, errors


@dataclass(frozen=True)
class _Score:
    info: ScoreInfo
    count: Callable[[Probe, _Options], Tensor]
    undefined: str  # why a probe gives no valid query
    outputs: _Outputs
    errors: Optional[_Errors]
    terms: Optional[Callable[[_Batch], _Terms]] = None
    dense: Optional[Callable[[Tensor, _Batch], Tensor]] = None
    core: bool = True  # always computed; an error when no probe feeds it
    opt_in: bool = False  # fed only by probes that name it in Probe.scores
    base: bool = False  # also reduce a uniform head (budget base rates)
    cross: bool = False  # a between-sequence statistic (positional consistency)


_KEYS = "needs sequences of >= {min_keys} tokens (patterns.diffuse_min_keys)"
_BOTH, _REP, _TEXT = ("repeated", "text"), ("repeated",), ("text",)


def _core(
    name: str,
    rng: tuple[float, float],
    probes: tuple[str, ...],
    description: str,
    count: Callable,
    undefined: str,
    **kw: Any,
) -> _Score:
    outputs, errors = _plain(name)
    return _Score(
        ScoreInfo(name, rng, probes, description, (name, f"{name}_se")), count, undefined, outputs, errors, **kw
    )


def _budget_score(name: str, probes: tuple[str, ...], opt_in: bool) -> _Score:
    outputs, errors = _budget(name)
    where = "natural text" if opt_in else "repeated random tokens"
    keys = tuple(
        f"{name}{part}_{c}{se}"
        for part, se in (("", ""), ("", "_se"), ("_base", ""), ("_lift", ""), ("_lift", "_se"))
        for c in BUDGET_CLASSES
    )
    return _Score(
        ScoreInfo(
            name,
            (0.0, 1.0),
            probes,
            f"attention budget on {where}: share of each query's attention per "
            "destination class (first match wins), with base rates and lifts",
            keys,
        ),
        _count_budget,
        "needs sequences of >= 2 tokens",
        outputs,
        errors,
        terms=_terms_budget,
        core=False,
        opt_in=opt_in,
        base=True,
    )


def _consistency_score(name: str, probes: tuple[str, ...], opt_in: bool) -> _Score:
    outputs, _ = _plain(name)
    where = "natural text" if opt_in else "repeated random tokens"
    return _Score(
        ScoreInfo(
            name,
            (0.0, 1.0),
            probes,
            f"positional consistency on {where}: mean overlap of two sequences' "
            "patterns over a pattern's overlap with itself (1: decided by position)",
            (name,),
        ),
        _count_pairs,
        "needs >= 2 sequences of >= 3 tokens",
        outputs,
        None,
        core=False,
        opt_in=opt_in,
        cross=True,
    )


#: The registry: one engine, thin named reductions. Order = order of the returned dict.
_SCORES: dict[str, _Score] = {
    "previous_token": _core(
        "previous_token",
        (0.0, 1.0),
        _BOTH,
        "mean attention from q to q - 1",
        _count_previous,
        "needs sequences of >= 3 tokens (2 without BOS)",
        terms=_token_match("previous_token"),
    ),
    "current_token": _core(
        "current_token",
        (0.0, 1.0),
        _BOTH,
        "mean attention from q to itself",
        _count_after_first,
        "needs sequences of >= 2 tokens",
        terms=_terms_current,
    ),
    "bos": _core(
        "bos",
        (0.0, 1.0),
        _BOTH,
        "mean attention to position 0 (BOS / first token)",
        _count_after_first,
        "needs sequences of >= 2 tokens",
        terms=_terms_bos,
    ),
    "induction": _core(
        "induction",
        (0.0, 1.0),
        _REP,
        "attention to the token after an earlier copy of the current token",
        _count_matches("induction_target"),
        "needs a repeated segment of >= 2 tokens",
        terms=_token_match("induction"),
    ),
    "duplicate_token": _core(
        "duplicate_token",
        (0.0, 1.0),
        _REP,
        "attention to earlier copies of the current token",
        _count_matches("previous_occurrence"),
        "needs a token that occurs twice",
        terms=_token_match("duplicate_token"),
    ),
    "fixed_offset": _Score(
        ScoreInfo(
            "fixed_offset",
            (0.0, 1.0),
            _BOTH,
            "mean attention from q to q - k at the best k",
            ("fixed_offset", "fixed_offset_k", "fixed_offset_se"),
        ),
        _count_offsets,
        "needs sequences of >= 3 tokens",
        _offset_outputs,
        _offset_errors,
        terms=_terms_offsets,
    ),
    "diffuse_entropy": _core(
        "diffuse_entropy",
        (0.0, 1.0),
        _BOTH,
        "entropy of each query's attention / log(number of keys)",
        _count_diffuse,
        _KEYS,
        dense=_dense_entropy,
    ),
    "max_attention": _core(
        "max_attention",
        (0.0, 1.0),
        _BOTH,
        "mean of each query's largest weight",
        _count_diffuse,
        _KEYS,
        dense=_dense_max,
    ),
    "budget": _budget_score("budget", _TEXT, opt_in=True),
    "budget_rep": _budget_score("budget_rep", _REP, opt_in=False),
    "positional_consistency": _consistency_score("positional_consistency", _TEXT, opt_in=True),
    "positional_consistency_rep": _consistency_score("positional_consistency_rep", _REP, opt_in=False),
}

#: Public metadata of every registered score (:class:`ScoreInfo`), in the order
#: :func:`pattern_scores` returns them; ``scores=`` takes these names.
PATTERN_SCORES: Mapping[str, ScoreInfo] = {name: spec.info for name, spec in _SCORES.items()}

#: Names of the core scores: always computed, each a ``[layer, head]`` key of its own name.
SCORE_NAMES: tuple[str, ...] = tuple(name for name, spec in _SCORES.items() if spec.core)


def _key_infos() -> dict[str, ScoreInfo]:
    out: dict[str, ScoreInfo] = {}
    for info in PATTERN_SCORES.values():
        for key in info.keys:
            if key == "fixed_offset_k":
                continue
            kind = (
                "se" if key.endswith("_se") else "lift" if "_lift_" in key else ("base" if "_base_" in key else "score")
            )
            rng = {"se": (0.0, math.inf), "lift": (0.0, math.inf)}.get(kind, info.range)
            what = {
                "se": "standard error over probe sequences of ",
                "base": "uniform head's value of ",
                "lift": "share / base rate of ",
            }.get(kind, "")
            out[key] = ScoreInfo(key, rng, info.probes, what + info.description, (key,), kind)
    return out


#: Every ``[layer, head]`` float key :func:`pattern_scores` can return, with its metadata
#: (``fixed_offset_k``, an int, and ``fixed_offset_per_k``, ``[layer, head, offset]``, aside).
PATTERN_KEYS: Mapping[str, ScoreInfo] = _key_infos()


# -- public API ------------------------------------------------------------------------------


class PatternMeasurement:
    """What one run of the pattern scores measured: the scores and their per-sequence sums.

    Build it with :func:`pattern_measurement`. ``scores`` is what :func:`pattern_scores`
    returns. The per-sequence sums let :meth:`bootstrap` resample probe sequences without
    running the model again.
    """

    def __init__(self, scores: dict[str, Tensor], pooled: dict[str, "_Pooled"], probe_sizes: list[int]):
        self.scores = scores
        self._pooled = pooled
        self._probe_sizes = probe_sizes

    def sequence_sums(self, name: str) -> Tensor:
        """``Float64[Tensor, "sequence layer head K"]``: each sequence's sum of ``name``'s quantity."""
        return self._pooled[_known(name, self._pooled)].sums

    def sequence_counts(self, name: str) -> Tensor:
        """``Float64[Tensor, "sequence K"]``: each sequence's number of valid queries for ``name``."""
        return self._pooled[_known(name, self._pooled)].counts

    def bootstrap_draws(self, n_replicates: int, seed: int = 0) -> list[Tensor]:
        """The sequences each replicate draws: per probe, ``Int[Tensor, "replicate sequence"]``
        of indices into that probe's sequences (uniform, with replacement; seeded)."""
        if isinstance(n_replicates, bool) or not isinstance(n_replicates, int) or n_replicates < 1:
            raise ScoreError(f"The 'n_replicates' parameter must be an int >= 1. Got {n_replicates!r}.")
        generator = torch.Generator().manual_seed(int(seed))
        return [torch.randint(0, size, (n_replicates, size), generator=generator) for size in self._probe_sizes]

    def bootstrap(self, n_replicates: int, seed: int = 0) -> dict[str, Tensor]:
        """Every score recomputed on ``n_replicates`` resamples of the probe sequences.

        Each replicate draws, within each probe, as many sequences as it has, uniformly with
        replacement (:meth:`bootstrap_draws`); the SAME draw serves every
        score, so replicates are joint. Returns the keys of :attr:`scores` without ``_se`` and
        without the consistency scores, each ``[replicate, layer, head]``
        (``fixed_offset_per_k``: ``[replicate, layer, head, offset]``; ``fixed_offset_k``
        int). A replicate whose resample has no valid query for a score gives NaN there.
        """
        weights = [
            torch.zeros(n_replicates, size, dtype=torch.float64).scatter_add_(
                1, draw, torch.ones(n_replicates, size, dtype=torch.float64)
            )
            for draw, size in zip(self.bootstrap_draws(n_replicates, seed), self._probe_sizes)
        ]
        out: dict[str, Tensor] = {}
        for name, pooled in self._pooled.items():
            w = torch.cat([weights[p] for p in pooled.probes], 1)  # [replicate, sequence]
            sums = torch.einsum("rs,slhk->rlhk", w, pooled.sums)
            counts = w @ pooled.counts  # [replicate, K]
            means = sums / counts[:, None, None, :]
            base = None if pooled.base is None else (w @ pooled.base) / counts
            out.update(
                {
                    key: value.float() if value.is_floating_point() else value
                    for key, value in _SCORES[name].outputs(means, base).items()
                }
            )
        return out


@dataclass
class _Pooled:
    """Per-sequence sums of one score over every probe feeding it, sequences in probe order."""

    sums: Tensor  # [sequence, layer, head, K] float64
    counts: Tensor  # [sequence, K] float64
    probes: list[int]  # index of each feeding probe, in order
    strata: Tensor  # [sequence] the probe index of each sequence
    base: Optional[Tensor]  # [sequence, K] uniform-head sums (budgets)


def pattern_measurement(
    model: HeadModelLike,
    probes: Union[None, Probe, Sequence[Probe]] = None,
    *,
    config: Any = None,
    scores: Optional[Iterable[str]] = None,
    batch_size: Optional[int] = None,
    exclude_bos: Optional[bool] = None,
    exclude_current_token: bool = False,
    convention: str = "headclass",
    progress: bool = True,
    observers: Sequence[Callable[[int, Tensor, Probe], None]] = (),
) -> PatternMeasurement:
    """Every attention-pattern score of every head, with what its uncertainty needs.

    Same parameters as :func:`pattern_scores`; returns a :class:`PatternMeasurement` whose
    ``scores`` is :func:`pattern_scores`' dict and whose :meth:`~PatternMeasurement.bootstrap`
    resamples probe sequences. ``observers``: callables ``observer(layer, pattern, chunk)``
    that see every layer's pattern ``[batch, head, query, key]`` (float32) inside the same
    hooked pass, after the scores' reductions, with the probe chunk it came from (e.g.
    :class:`headclass.scores.examples.ExampleCollector`); like the reductions, they must
    not keep the pattern.
    """
    from headclass.config import load_config

    cfg = load_config(config)
    options = _options(cfg, exclude_bos, exclude_current_token, convention)
    if probes is None:
        probes = default_probes(model, cfg)
    elif isinstance(probes, Probe):
        probes = [probes]
    probes = list(probes)
    if not probes:
        raise ProbeError("pattern_scores needs at least one probe (or probes=None for the defaults).")
    for probe in probes:
        if not isinstance(probe, Probe):
            raise ProbeError(f"probes must be Probe objects (see headclass.probes); got {type(probe).__name__}.")
    size = cfg.probes.batch_size if batch_size is None else batch_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ProbeError(f"batch_size must be an int >= 1; got {size!r}.")
    names = _score_names(scores, probes, options)
    return _Engine(model, probes, names, options, observers).run(size, progress)


def pattern_scores(
    model: HeadModelLike,
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
        ``d_vocab`` and ``run_with_patterns``; a ``tokenizer`` for the delimiter class).
    probes
        One probe or several; ``None`` builds :func:`headclass.probes.default_probes` from the
        config. A score is the mean over the valid query positions of every probe that feeds
        it (module docs, "Probes").
    config
        A :class:`~headclass.HeadclassConfig`, a mapping or a YAML path (``None``: defaults).
        Uses ``probes.*`` (default probes, ``batch_size``) and ``patterns.*``.
    scores
        Names from :data:`PATTERN_SCORES` to compute (default: the core scores and every other
        one some probe feeds).
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
        ``Float[Tensor, "layer head"]`` per key (CPU, float32), score by score in
        :data:`PATTERN_SCORES` order, each score's keys as in its :attr:`ScoreInfo.keys`
        (every per-sequence score with ``<key>_se``); with ``fixed_offset`` also
        ``fixed_offset_k`` (``Int[Tensor, "layer head"]``) and ``fixed_offset_per_k``
        (``Float[Tensor, "layer head offset"]``).

    Raises
    ------
    ProbeError
        A requested (or core) score has no valid query position in any probe that feeds it
        (e.g. induction on text only), or a probe is malformed.
    ScoreError
        A pattern contains NaN (the message names the layer).
    """
    return pattern_measurement(
        model,
        probes,
        config=config,
        scores=scores,
        batch_size=batch_size,
        exclude_bos=exclude_bos,
        exclude_current_token=exclude_current_token,
        convention=convention,
        progress=progress,
    ).scores


def pattern_scores_single_pass(
    model: HeadModelLike,
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
    every requested core and ``_rep`` score is computed on it) or a token tensor. Same options
    and return value as :func:`pattern_scores`, without chunking or progress bar.
    """
    from headclass.config import load_config

    cfg = load_config(config)
    options = _options(cfg, exclude_bos, exclude_current_token, convention)
    probe = tokens if isinstance(tokens, Probe) else from_tokens(model, tokens, name="tokens")
    probe = Probe(
        probe.tokens, probe.name, probe.has_bos, probe.previous_occurrence, probe.induction_target, scores=None
    )
    names = _score_names(scores, [probe], options)
    return _Engine(model, [probe], names, options).run(probe.n_sequences, progress=False).scores


# Per tokenizer: (is a delimiter, has been decoded), two [vocab] bool tensors.
_DELIMITERS: "weakref.WeakKeyDictionary[Any, tuple[Tensor, Tensor]]" = weakref.WeakKeyDictionary()


def delimiter_token_mask(model: HeadModelLike, ids: Optional[Tensor] = None) -> Tensor:
    """``Bool[Tensor, "vocab"]``: the ids whose decoded string is a delimiter.

    A delimiter decodes (alone, ``tokenizer.decode([id])``) to whitespace only (``"\\n"``,
    ``" "``, ``"\\n\\n"``) or to punctuation only once stripped (every character in a Unicode
    ``P*`` category: ``"."``, ``" ,"``, ``"?)"``, ``".\\n"``). Special tokens are never
    delimiters (BOS is the budget's ``first``), nor are ids that decode to nothing or to a
    replacement character (byte fragments). All False without a tokenizer.

    ``ids`` (any shape): decode only these, e.g. the probes' tokens; the mask is then False
    for every other id. Decoding the whole vocabulary costs ~4 s for Qwen2.5's 152k ids, the
    probes hold a few thousand. What was decoded is kept per tokenizer.
    """
    d_vocab = int(model.d_vocab)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return torch.zeros(d_vocab, dtype=torch.bool)
    try:
        cached = _DELIMITERS.get(tokenizer)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is None or cached[0].numel() != d_vocab:
        cached = (torch.zeros(d_vocab, dtype=torch.bool), torch.zeros(d_vocab, dtype=torch.bool))
    mask, decoded = cached
    try:
        n = min(d_vocab, len(tokenizer))
    except TypeError:
        n = d_vocab
    wanted = torch.arange(n) if ids is None else torch.unique(torch.as_tensor(ids).flatten().long().cpu())
    wanted = wanted[(wanted >= 0) & (wanted < n)]
    todo = wanted[~decoded[wanted]]
    if todo.numel():
        special = set(model.special_token_ids()) if hasattr(model, "special_token_ids") else set()
        ids_todo = todo.tolist()
        strings = tokenizer.batch_decode([[i] for i in ids_todo])
        mask[todo] = torch.tensor([_is_delimiter(i, text, special) for i, text in zip(ids_todo, strings)])
        decoded[todo] = True
    try:
        _DELIMITERS[tokenizer] = (mask, decoded)
    except TypeError:
        pass
    if ids is None:
        return mask.clone()
    out = torch.zeros(d_vocab, dtype=torch.bool)
    out[wanted] = mask[wanted]
    return out


def _is_delimiter(token_id: int, text: str, special: set[int]) -> bool:
    if token_id in special or not text or "\ufffd" in text:
        return False
    stripped = text.strip()
    return not stripped or all(unicodedata.category(c).startswith("P") for c in stripped)


# -- engine ----------------------------------------------------------------------------------


class _Engine:
    """Runs probes batch by batch and folds every layer's pattern into per-sequence sums."""

    def __init__(
        self,
        model: HeadModelLike,
        probes: list[Probe],
        names: list[str],
        options: _Options,
        observers: Sequence[Callable[[int, Tensor, Probe], None]] = (),
    ):
        self.model, self.probes, self.names, self.options = model, probes, names, options
        self.observers = tuple(observers)
        for probe in probes:
            probe.check(model)
        problems = [problem for problem in (self._problem(name) for name in names) if problem]
        if problems:
            raise ProbeError("\n".join(problems))
        needs_delimiters = any(_SCORES[n].base for n in names)
        self.delimiters = (
            delimiter_token_mask(model, ids=torch.cat([p.tokens.flatten() for p in probes]))
            if needs_delimiters
            else torch.zeros(int(model.d_vocab), dtype=torch.bool)
        )

    def _problem(self, name: str) -> Optional[str]:
        """Why ``name`` has no valid query position in the probes feeding it, if it has none."""
        spec = _SCORES[name]
        undefined = spec.undefined.format(min_keys=self.options.diffuse_min_keys)
        feeding = [p for p in self.probes if _feeds(p, name)]
        if any(bool((spec.count(p, self.options).sum(0) > 0).any()) for p in feeding):
            return None
        hint = (
            " Use probes.repeated(...)."
            if name in ("induction", "duplicate_token")
            else f" Only probes that name {name!r} in Probe.scores feed it (probes.text does)."
            if spec.opt_in
            else " Use longer sequences."
        )
        if not feeding:
            given = ", ".join(repr(p.name) for p in self.probes)
            return f"{name} {undefined}; no probe given feeds it (probes {given} leave it out, see Probe.scores).{hint}"
        label = " or ".join(repr(p.name) for p in feeding)
        return f"{name} {undefined}; probe {label} has none.{hint}"

    def run(self, batch_size: int, progress: bool) -> PatternMeasurement:
        from tqdm.auto import tqdm

        device = _model_device(self.model)
        per_probe: list[dict[str, Any]] = []
        n_chunks = sum(math.ceil(p.n_sequences / batch_size) for p in self.probes)
        # reuse_freed_memory: each batch allocates the same activations again (headclass.heap)
        with (
            reuse_freed_memory(),
            tqdm(total=n_chunks, desc="pattern scores", unit="batch", disable=not progress) as bar,
        ):
            for probe in self.probes:
                active = [n for n in self.names if _feeds(probe, n)]
                collected: dict[str, Any] = {
                    "active": active,
                    "sums": {n: [] for n in active},
                    "base": {n: [] for n in active},
                    "cross": {},
                }
                per_probe.append(collected)
                if not active:
                    bar.update(math.ceil(probe.n_sequences / batch_size))
                    continue
                for chunk in probe.batches(batch_size):
                    bar.set_postfix_str(probe.name)
                    self._run_chunk(chunk, active, device, collected)
                    bar.update(1)
        return self._finish(per_probe)

    def _run_chunk(self, chunk: Probe, active: list[str], device: torch.device, collected: dict[str, Any]) -> None:
        L = int(self.model.n_layers)
        batch = _Batch(chunk, self.options, [n for n in active if not _SCORES[n].cross], device, self.delimiters)
        sums: dict[str, list[Optional[Tensor]]] = {name: [None] * L for name in active}
        cross = collected["cross"]
        covered = "diffuse_entropy" in active and "max_attention" in active
        first = self.options.diffuse_min_keys - 1
        nan_flags: dict[int, Tensor] = {}  # per layer, on the device: checked after the pass

        def callback(layer: int, pattern: Tensor) -> None:
            if pattern.dtype not in (torch.float32, torch.float64):
                pattern = pattern.float()  # half precision: every reduction accumulates in fp32
            segments = batch.segment_sums(pattern)
            bad = (pattern[:, :, :first] if covered else pattern).isnan().any()
            for name in active:
                spec = _SCORES[name]
                if spec.cross:
                    if chunk.n_positions < 3:
                        continue
                    total, square = _cross_moments(pattern)
                    if (name, layer) in cross:
                        cross[name, layer][0].add_(total)
                        cross[name, layer][1].add_(square)
                    else:
                        cross[name, layer] = [total.clone(), square]
                    bad = bad | square.isnan().any()
                    sums[name][layer] = square  # marks the layer as reported
                    continue
                if spec.dense is not None:
                    value = spec.dense(pattern, batch)
                else:
                    start, size, finish = batch.slices[name]
                    value = finish(segments[name], pattern)
                sums[name][layer] = value
                bad = bad | value.isnan().any()
            # NaN anywhere in the pattern reaches the entropy / max sums of rows >= first; the
            # first rows are checked directly (a full scan only when those scores are skipped).
            # Kept on the device and read after the pass: no host round trip in the hook.
            nan_flags[layer] = bad
            for observer in self.observers:  # e.g. the head cards' top-k examples
                observer(layer, pattern, chunk)

        self.model.run_with_patterns(chunk.tokens, callback)
        if nan_flags:
            flagged = sorted(nan_flags)
            flags = torch.stack([nan_flags[layer].reshape(()) for layer in flagged]).cpu().tolist()
            if any(flags):
                raise ScoreError(
                    f"the attention pattern of layer {flagged[flags.index(True)]} contains NaN (probe "
                    f"{chunk.name!r}); the model's weights or its dtype (float16 overflow?) are "
                    "broken for this input. Try dtype=torch.float32."
                )
        missing = [layer for layer in range(L) if sums[active[0]][layer] is None]
        if missing:
            raise ScoreError(
                f"run_with_patterns never reported layers {missing} of model {getattr(self.model, 'name', '?')!r}."
            )
        for name in active:
            if _SCORES[name].cross:
                continue
            # [batch, layer, head, K], float64 on the CPU
            layers = [cast(Tensor, value) for value in sums[name]]  # every layer reported (above)
            collected["sums"][name].append(torch.stack([value.double().cpu() for value in layers], 1))
            if name in batch.base:
                collected["base"][name].append(batch.base[name])

    def _finish(self, per_probe: list[dict[str, Any]]) -> PatternMeasurement:
        L = int(self.model.n_layers)
        out: dict[str, Tensor] = {}
        pooled: dict[str, _Pooled] = {}
        for name in self.names:
            spec = _SCORES[name]
            feeding = [i for i, c in enumerate(per_probe) if name in c["active"]]
            if spec.cross:
                out[name] = _consistency(self.probes, per_probe, feeding, name, L, int(self.model.n_heads)).float()
                continue
            sums = torch.cat([torch.cat(per_probe[i]["sums"][name]) for i in feeding])
            counts = torch.cat([spec.count(self.probes[i], self.options) for i in feeding])
            strata = torch.cat([torch.full((self.probes[i].n_sequences,), i) for i in feeding])
            base = torch.cat([torch.cat(per_probe[i]["base"][name]) for i in feeding]) if spec.base else None
            total = counts.sum(0)
            means = sums.sum(0) / total  # [layer, head, K]
            base_means = None if base is None else base.sum(0) / total
            se = _ratio_se(sums, counts, strata, means)
            for key, value in spec.outputs(means, base_means).items():
                out[key] = value.float() if value.is_floating_point() else value
            if spec.errors is not None:
                out.update({key: value.float() for key, value in spec.errors(se, means, base_means).items()})
            pooled[name] = _Pooled(sums, counts, feeding, strata, base)
        return PatternMeasurement(out, pooled, [p.n_sequences for p in self.probes])


def _consistency(
    probes: list[Probe], per_probe: list[dict[str, Any]], feeding: list[int], name: str, n_layers: int, n_heads: int
) -> Tensor:
    """Pooled positional consistency ``[layer, head]`` from each probe's moments (module docs)."""
    numerator: Optional[Tensor] = None
    denominator: Optional[Tensor] = None
    for i in feeding:
        n = probes[i].n_sequences
        moments = [per_probe[i]["cross"].get((name, layer)) for layer in range(n_layers)]
        if n < 2 or any(m is None for m in moments):
            continue
        square = torch.stack([m[1].cpu() for m in moments])  # [layer, head]
        total = torch.stack([m[0].double().pow(2).sum((-2, -1)).cpu() for m in moments])
        num, den = (total - square) / (n - 1), square
        numerator = num if numerator is None else numerator + num
        denominator = den if denominator is None else denominator + den
    if numerator is None or denominator is None:
        return torch.full((n_layers, n_heads), math.nan)
    ratio = torch.where(
        denominator > 0, numerator / denominator.clamp_min(1e-300), torch.full_like(numerator, math.nan)
    )
    return ratio.clamp(0.0, 1.0)


def _ratio_se(sums: Tensor, counts: Tensor, strata: Tensor, means: Tensor) -> Tensor:
    """Stratified SE of the ratio estimator ``sum S / sum C`` over sequences (module docs)."""
    residual = sums - means * counts[:, None, None, :]  # [sequence, layer, head, K]
    variance = torch.zeros_like(means)
    for stratum in strata.unique():
        rows = strata == stratum
        n = int(rows.sum())
        if n < 2:
            has_queries = counts[rows].sum(0) > 0
            variance = torch.where(has_queries, torch.full_like(variance, math.nan), variance)
            continue
        part = residual[rows]
        variance = variance + n / (n - 1) * (part - part.mean(0)).pow(2).sum(0)
    return variance.sqrt() / counts.sum(0)


def _feeds(probe: Probe, name: str) -> bool:
    """Opt-in scores are fed only by probes that name them; the others as Probe.feeds says."""
    if _SCORES[name].opt_in:
        return probe.scores is not None and name in probe.scores
    return probe.feeds(name)


def _known(name: str, pooled: Mapping[str, Any]) -> str:
    if name not in pooled:
        raise ScoreError(f"no per-sequence sums for {name!r}; this measurement has {sorted(pooled)}.")
    return name


def _options(cfg: Any, exclude_bos: Optional[bool], exclude_current_token: bool, convention: str) -> _Options:
    if convention not in CONVENTIONS:
        raise ScoreError(f"convention must be one of {CONVENTIONS}; got {convention!r}.")
    return _Options(
        max_offset=cfg.patterns.max_offset,
        diffuse_min_keys=cfg.patterns.diffuse_min_keys,
        exclude_bos=cfg.patterns.exclude_bos if exclude_bos is None else bool(exclude_bos),
        exclude_current_token=bool(exclude_current_token),
        convention=convention,
        local_window=cfg.patterns.local_window,
    )


def _score_names(scores: Optional[Iterable[str]], probes: Sequence[Probe], options: _Options) -> list[str]:
    """The requested names in registry order; by default the core scores and every other one
    that some probe feeds with at least one valid query."""
    if scores is None:
        return [
            name
            for name, spec in _SCORES.items()
            if spec.core or any(_feeds(p, name) and bool(spec.count(p, options).sum() > 0) for p in probes)
        ]
    if isinstance(scores, str):
        scores = [scores]
    wanted = list(dict.fromkeys(scores))
    unknown = [s for s in wanted if s not in _SCORES]
    if unknown or not wanted:
        raise ScoreError(
            f"unknown score name(s) {unknown}; choose from {list(_SCORES)}."
            if unknown
            else "scores must name at least one score."
        )
    return [s for s in _SCORES if s in wanted]


def _model_device(model: HeadModelLike) -> torch.device:
    try:
        return torch.device(model.device)  # type: ignore[attr-defined]  # fakes may have none
    except (AttributeError, TypeError, RuntimeError):
        return torch.device("cpu")
