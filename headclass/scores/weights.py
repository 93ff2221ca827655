"""Weight-based head scores: what a head's circuits do, read from its weights alone.

No forward pass on text: every score here is a function of the processed weights a
:class:`~headclass.loading.HeadModel` exposes (LayerNorm folded, writing weights centred), in
TransformerLens' row-vector convention: a residual vector ``x`` is read as ``x @ W_V``, so a head's
OV circuit is ``W_OV = W_V @ W_O`` (``[d_model, d_model]``) and its QK circuit
``W_QK = W_Q @ W_K^T``. Nothing ``d_model x d_model`` per head, nor ``vocab x vocab``, is ever
built: every quantity goes through ``d_head x d_head`` factors (thin QR of the
``[d_model, d_head]`` weights, cyclic permutation of products).

:func:`weight_scores` returns every score below as a ``[layer, head]`` tensor, in one call. The
registry :data:`WEIGHT_SCORES` declares each key once (range, one-line description); the table:

============================  ============  ========================================================
key                           range         meaning (function that documents it)
============================  ============  ========================================================
``copy_eigen``                [-1, 1]       ``sum(eig) / sum(|eig|)`` of the full OV circuit
                                            ``W_E W_V W_O W_U`` (:func:`copy_eigen_score`)
``copy_topk``                 [0, 1]        fraction of sampled tokens whose own logit is among the
                                            head's top-k OV logits (:func:`topk_copy_scores`)
``copy_topk_se``              >= 0          its sampling error (:func:`sampling_error`)
``copy_suppression_topk``     [0, 1]        ... among the k most negative (:func:`topk_copy_scores`)
``copy_suppression_topk_se``  >= 0          its sampling error
``copy_topk_n``               >= 1          tokens that head ranked: ``weights.copy_sample_min`` and
                                            more until both fractions are clear of their
                                            thresholds, at most ``copy_sample_size``
``successor``                 [0, 1]        fraction of ordinal items (numbers, weekdays, months,
                                            letters...) whose OV output ranks the next item first
                                            (:func:`successor_scores`); NaN without such tokens
``successor_se``              >= 0          its binomial standard error
``ov_identity_distance``      [0, 1]        relative distance of ``W_OV`` to the best ``c * I``
``ov_projection_distance``    [0, 1]        relative distance to the best ``c * P_row(W_OV)``
``ov_norm``                   >= 0          ``||W_OV||_F``
``ov_norm_relative``          >= 0          ``ov_norm`` / median ``ov_norm`` of the head's layer
``writes_nothing``            bool          ``ov_norm_relative < weights.writes_nothing_below``
``ov_gain``                   >= 0          RMS over sampled tokens of ``||x W_OV|| / ||x||``, ``x``
                                            the token's embedding at unit RMS (:func:`ov_gain_scores`)
``ov_gain_relative``          >= 0          ``ov_gain`` / the median ``ov_gain`` of the model's heads
``ov_effective_rank``         [1, d_head]   participation ratio of ``W_OV``'s singular values
``qk_effective_rank``         [1, d_head]   the same for ``W_QK``
``positional_prev_token``     [0, 1]        weights-only previous-token indicator from
                                            ``W_pos W_QK W_pos^T``; only for learned absolute
                                            positions (absent for rotary models)
============================  ============  ========================================================

(:func:`ov_svd_scores` documents the five ``ov_*`` / ``qk_*`` keys and ``writes_nothing``;
:func:`positional_prev_token_score` the last.) The full singular-value spectra, for plots, come
from :func:`ov_singular_values` and :func:`qk_singular_values`.

What a head writes, in these terms: ``copy_topk`` / ``copy_eigen`` say it raises the token it
attends to, ``copy_suppression_topk`` that it lowers it, ``successor`` that it raises the next
item of an ordinal sequence; a head with a substantial output (``ov_gain_relative`` near 1 or
more) that does none of these transforms what it reads; ``writes_nothing`` (and
``ov_gain_relative`` near 0) marks a head whose output is negligible.

Sources: Elhage et al. (2021), *A Mathematical Framework for Transformer Circuits* (OV/QK
circuits, eigenvalue copying score); Wang et al. (2022), *Interpretability in the Wild* (IOI:
top-k copy score, effective embedding); McDougall et al. (2023), *Copy Suppression*; Gould,
Ong, Ogden, Conmy (2023), *Successor Heads: Recurring, Interpretable Attention Heads In The Wild*.

The module is longer than most (about 850 lines): every score here reads the same processed
weights through the same ``d_head``-sized factors (:func:`r_factor`), and the blocked top-k
ranking that keeps ``[heads, sample, vocab]`` from ever being held needs its own page.

Examples
--------
>>> import headclass
>>> from headclass.scores.weights import weight_scores
>>> model = headclass.load_model("smollm2-135m")
>>> scores = weight_scores(model)
>>> scores["copy_eigen"].shape
torch.Size([30, 9])
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from headclass.config import HeadclassConfig, load_config
from headclass.errors import ProbeError, ScoreError
from headclass.heap import reuse_freed_memory
from headclass.loading.head_model import (
    HeadModelLike,
    expand_kv_heads,
    kv_layer_weight,
    layer_weight,
    query_heads_per_kv_head,
)
from headclass.probes import ordinary_token_ids, token_sample
from headclass.scores.patterns import ScoreInfo

__all__ = [
    "WEIGHT_SCORES",
    "WEIGHT_SCORE_KEYS",
    "ORDINAL_SEQUENCES",
    "weight_scores",
    "successor_sequences",
    "successor_scores",
    "ov_gain_scores",
    "sampling_error",
    "effective_embedding",
    "ov_circuit_eigenvalues",
    "copy_eigen_score",
    "copy_token_sample",
    "topk_copy_scores",
    "ov_singular_values",
    "qk_singular_values",
    "ov_svd_scores",
    "identity_distance",
    "projection_distance",
    "participation_ratio",
    "positional_prev_token_score",
    "r_factor",
]


def _info(key: str, low: float, high: float, description: str, kind: str = "score") -> ScoreInfo:
    return ScoreInfo(key, (low, high), (), description, (key,), kind)


_INF = math.inf

#: The registry of weight scores: every key :func:`weight_scores` can return, with its range and
#: a one-line description (``probes`` is empty: no probe is read). ``positional_prev_token``
#: only for models with learned absolute position embeddings.
WEIGHT_SCORES: Mapping[str, ScoreInfo] = {
    info.name: info
    for info in (
        _info("copy_eigen", -1.0, 1.0, "eigenvalue copying score of the full OV circuit"),
        _info("copy_topk", 0.0, 1.0, "fraction of sampled tokens whose own logit is in the OV top k"),
        _info("copy_topk_se", 0.0, _INF, "sampling error of copy_topk", "se"),
        _info("copy_suppression_topk", 0.0, 1.0, "fraction of sampled tokens whose own logit is in the OV bottom k"),
        _info("copy_suppression_topk_se", 0.0, _INF, "sampling error of copy_suppression_topk", "se"),
        _info("copy_topk_n", 1.0, _INF, "tokens the head's top-k copy scores ranked (sequential sample)", "count"),
        _info("successor", 0.0, 1.0, "fraction of ordinal items whose OV output ranks the next item first"),
        _info("successor_se", 0.0, _INF, "binomial standard error of successor", "se"),
        _info("ov_identity_distance", 0.0, 1.0, "relative distance of W_OV to the best scaled identity"),
        _info("ov_projection_distance", 0.0, 1.0, "relative distance of W_OV to the best scaled projection"),
        _info("ov_norm", 0.0, _INF, "Frobenius norm of W_OV"),
        _info("ov_norm_relative", 0.0, _INF, "ov_norm over the median ov_norm of the head's layer"),
        _info("writes_nothing", 0.0, 1.0, "ov_norm_relative below weights.writes_nothing_below (bool)"),
        _info("ov_gain", 0.0, _INF, "RMS over sampled tokens of |x W_OV| / |x| for unit-RMS embeddings x"),
        _info("ov_gain_relative", 0.0, _INF, "ov_gain over the median ov_gain of the model's writing heads"),
        _info("ov_effective_rank", 0.0, _INF, "participation ratio of W_OV's singular values"),
        _info("qk_effective_rank", 0.0, _INF, "participation ratio of W_QK's singular values"),
        _info("positional_prev_token", 0.0, 1.0, "how often the positional QK circuit prefers the previous position"),
    )
}

#: Every key :func:`weight_scores` can return, in registry order.
WEIGHT_SCORE_KEYS: tuple[str, ...] = tuple(WEIGHT_SCORES)

#: Ordinal sequences for the successor score (Gould et al. 2023), each tried with and without a
#: leading space; only maximal runs of >= 3 consecutive items that the tokenizer holds as single
#: tokens are used (:func:`successor_sequences`).
ORDINAL_SEQUENCES: Mapping[str, tuple[str, ...]] = {
    "numbers": tuple(str(i) for i in range(201)),
    "number words": (
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
        "twenty",
    ),
    "Number words": ("One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine", "Ten"),
    "ordinals": ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth"),
    "weekdays": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "weekdays lower": ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"),
    "months": (
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ),
    "months lower": (
        "january",
        "february",
        "march",
        "april",
        "may",
        "june",
        "july",
        "august",
        "september",
        "october",
        "november",
        "december",
    ),
    "letters": tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
    "letters lower": tuple("abcdefghijklmnopqrstuvwxyz"),
    "roman numerals": ("I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X"),
}

_MIN_RUN = 3
# Logits this close, relative to the largest a head's output could give (|p| max_j |w_j|), are
# a tie, as float rounding can reorder them on another CPU: a successor logit must beat the
# others by more, and in the top-k ranks a tie with the own logit counts against it.
_TIE_RTOL = 1e-5

# Singular values below this fraction of a head's largest count as zero when the rank of its
# row space is taken (ov_projection_distance). fp32 factors carry ~1e-6 relative noise.
_RANK_RTOL = 1e-4

# Bytes of one block of logits in the top-k copy scores (bounds memory, keeps blocks in cache).
_TOPK_BLOCK_BYTES = 1 << 25
# Bytes of (head, token) pairs ranked at once (float32 rows of d_model), at least one head's:
# the unembedding is read once per batch. Qwen-0.5B's top-k time by budget: 2^21 8.6 s,
# 2^23 7.5 s, 2^27 6.1 s; its peak above the weights: +0.64, +0.69, +1.30 GB.
_TOPK_PAIR_BYTES = 1 << 23

# Vocabulary columns per block wherever a whole-vocabulary product is reduced on the fly.
_VOCAB_BLOCK = 16384


# -- shared helpers ----------------------------------------------------------------------------


def _f32(x: Tensor) -> Tensor:
    """Half-precision weights are upcast: eigenvalues and ranks need at least fp32."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _layers(model: HeadModelLike, desc: str, progress: bool) -> Iterable[int]:
    return _progress(range(int(model.n_layers)), desc, progress)


def _progress(items: Sequence[int], desc: str, progress: bool) -> Iterable[int]:
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


def r_factor(weight: Tensor) -> Tensor:
    """``R`` of the thin QR ``weight = Q R``: ``[..., m, n]`` (m >= n) -> ``[..., n, n]``.

    ``R^T R = weight^T weight``, so for any ``M``: ``||weight @ M||_F = ||R @ M||_F`` and the
    singular values of ``weight @ M`` are those of ``R @ M``. This is how ``d_model``-sized
    factors shrink to ``d_head x d_head`` ones everywhere in this module and in
    :mod:`headclass.scores.composition`. (QR, not a square root of ``weight^T weight``: as fast
    here, and exact for rank-deficient weights, whose zero singular values must stay zero.)
    """
    return torch.linalg.qr(_f32(weight), mode="r")[1]


def _per_group(per_head: Tensor, grouped: Tensor) -> Tensor:
    """``[head, ...]`` -> ``[kv_head, group, ...]``, to meet ``[kv_head, 1, ...]`` factors of
    :func:`~headclass.loading.head_model.kv_layer_weight` (query head ``h`` in group ``h // group``)."""
    return per_head.unflatten(0, (grouped.shape[0], -1))


def _check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value < 1.0):
        raise ScoreError(f"The {name!r} parameter must be a float in [0, 1). Got {value!r}.")
    return float(value)


# -- embeddings --------------------------------------------------------------------------------


def effective_embedding(model: HeadModelLike, *, chunk_size: int = 4096) -> Tensor:
    """The token embedding as layer 1 sees it: ``W_E + MLP0(LN(W_E))``, ``[d_vocab, d_model]``.

    In GPT-2 the first MLP works as an extension of the embedding, so the IOI paper (Wang et al.
    2022) and the copy-suppression paper (McDougall et al. 2023) read OV circuits of later heads
    through this "effective embedding" instead of ``W_E``. Each token embedding goes through the
    first block's second normalisation and MLP alone: layer 0's attention output and the
    position embedding are left out (the token by itself, as in those papers' simplest form).

    A thin front door to :meth:`HeadModel.effective_embedding
    <headclass.loading.head_model.HeadModel.effective_embedding>`. A model without a first MLP
    (attention-only) or without that method (a test fake) raises :class:`ScoreError`.
    """
    method = getattr(model, "effective_embedding", None)
    if method is None:
        raise ScoreError(
            f"effective_embedding needs the first block's MLP; model {getattr(model, 'name', model)!r} "
            "has none (attention-only, or a model without HeadModel.effective_embedding). "
            "Use effective_embedding=False."
        )
    return method(chunk_size)


def _embedding(model: HeadModelLike, effective: bool) -> Tensor:
    # In the model's dtype: users upcast the rows they take (a float32 copy of a bf16 W_E
    # would hold the embedding three times over).
    return effective_embedding(model) if effective else model.W_E


def _unembed_embed(W_U: Tensor, embedding: Tensor, block: int = _VOCAB_BLOCK) -> Tensor:
    """``W_U @ embedding`` ``[d_model, d_model]`` in float32, ``block`` vocabulary rows at a time."""
    out = torch.zeros(W_U.shape[0], embedding.shape[1], dtype=torch.float32, device=W_U.device)
    for start in range(0, W_U.shape[1], block):
        out += _f32(W_U[:, start : start + block]) @ _f32(embedding[start : start + block])
    return out


# -- 1. eigenvalue copying score ---------------------------------------------------------------


def _ov_eigenvalues(model: HeadModelLike, embedding: Tensor, progress: bool = False) -> Tensor:
    # Non-zero eigenvalues of E W_V W_O W_U (vocab x vocab) are those of W_O (W_U E) W_V
    # (d_head x d_head): eig(AB) and eig(BA) share their non-zero part.
    out = []
    with reuse_freed_memory():  # the same blocks each layer (headclass.heap)
        unembed_embed = _unembed_embed(model.W_U, embedding)  # [d_model, d_model], once per model
        for layer in _layers(model, "OV eigenvalues", progress):
            W_V = _f32(kv_layer_weight(model, "W_V", layer))  # [kv_head, d_model, d_head]
            # (W_U E) W_V once per key/value group, then each query head's W_O: d_model^2 d_head
            # multiply-adds per group instead of per head (Qwen2.5-1.5B: 1.1 -> 0.2 s)
            read = unembed_embed @ W_V  # [kv_head, d_model, d_head]
            small = _per_group(_f32(layer_weight(model, "W_O", layer)), W_V) @ read[:, None]
            out.append(torch.linalg.eigvals(small.flatten(0, 1).double()))
    return torch.stack(out)


def ov_circuit_eigenvalues(model: HeadModelLike, *, effective_embedding: bool = False) -> Tensor:
    """Non-zero eigenvalues of every head's full OV circuit, ``Complex[Tensor, "layer head d_head"]``.

    The full OV circuit ``W_E W_V W_O W_U`` (``[d_vocab, d_vocab]``: how attending to a source
    token moves each output logit) has rank <= ``d_head``; its non-zero eigenvalues equal those
    of ``W_O (W_U W_E) W_V`` (``d_head x d_head``), computed here with ``W_U W_E`` formed once
    per model. With ``effective_embedding=True`` the embedding is :func:`effective_embedding`.
    """
    return _ov_eigenvalues(model, _embedding(model, effective_embedding))


def copy_eigen_score(eigenvalues: Tensor) -> Tensor:
    """Eigenvalue copying score ``sum(eig) / sum(|eig|)`` in [-1, 1] (Elhage et al. 2021).

    ``eigenvalues``: ``[..., n]`` complex (or real). ``sum(eig)`` is the trace, real for a real
    matrix. +1: every eigenvalue is real and positive (attending to a token raises that token's
    logit: copying); -1: all negative (suppression); near 0: no consistent sign. A head whose
    eigenvalues are all zero gets 0. Returns a float32 tensor ``[...]``.
    """
    total = eigenvalues.sum(-1).real if eigenvalues.is_complex() else eigenvalues.sum(-1)
    magnitude = eigenvalues.abs().sum(-1)
    score = torch.where(
        magnitude > 0, total / magnitude.clamp_min(torch.finfo(magnitude.dtype).tiny), torch.zeros_like(magnitude)
    )
    return score.clamp(-1.0, 1.0).float()


# -- 2. top-k copy and copy-suppression scores -------------------------------------------------


def copy_token_sample(model: HeadModelLike, sample_size: int, *, seed: int = 0) -> Tensor:
    """Sorted ids of ``sample_size`` ordinary tokens drawn without replacement (seeded).

    Ordinary: :func:`headclass.probes.ordinary_token_ids` (not BOS or another special token, and
    below the tokenizer's length when the embedding is padded beyond it). All ordinary ids when there
    are no more than ``sample_size``. The one sampler is :func:`headclass.probes.token_sample`
    (what :class:`~headclass.probes.ProbeSet` holds); this front door raises :class:`ScoreError`.
    """
    try:
        return token_sample(model, sample_size, seed=seed)
    except ProbeError as error:
        raise ScoreError(str(error)) from None


# A head still open once it ranked this many times ``first_sample`` tokens ranks the rest in its
# output space (_OutputSpace). Qwen2.5-0.5B: 13 of its 16 heads near a threshold, ~3 s of the
# top-k's 12 s; a head that then settles soon ranks more tokens than it would have.
_SPACE_FROM = 2


def _topk_counts(
    model: HeadModelLike,
    embedding: Tensor,
    tokens: Tensor,
    top_k: int,
    *,
    seed: int = 0,
    stop: Optional[_StopRule] = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per head: sampled tokens in the top k (copies), in the bottom k (suppressions), and how
    many tokens were ranked, three ``[layer, head]`` long tensors.

    Without ``stop`` every head ranks every token. With it, tokens come in rounds (a seeded
    random order; ``stop.first`` tokens, then doubling) and a head stops after the round where
    both of its fractions are clear of their thresholds (:meth:`_StopRule.settled`). With a
    bfloat16 screen, heads still open after ``_SPACE_FROM`` times ``stop.first`` tokens rank the
    rest of the sample at once in their output space, and the rule is replayed on their running
    counts: where it stops, and the counts there, are the rounds'. The pairs
    of a round are ranked together across layers, up to ``_TOPK_PAIR_BYTES`` of them at a
    time: each ranking reads the whole unembedding, so few rows per read would leave the
    matrix products waiting on memory.
    """
    W_U = model.W_U  # model dtype: no float32 copy is made
    n = int(tokens.numel())
    generator = torch.Generator().manual_seed(int(seed))
    screen = _Screen.build(model, generator)
    tokens = tokens[torch.randperm(n, generator=generator).to(tokens.device)]  # rounds: prefixes
    bounds = stop.rounds(n) if stop is not None else [n]
    sources = _f32(embedding[tokens])  # [sample, d_model]
    own_unembed = _f32(W_U[:, tokens.to(W_U.device)])  # [d_model, sample]
    shape = (int(model.n_layers), int(model.n_heads))
    copies = torch.zeros(shape, dtype=torch.long)
    suppressions = torch.zeros_like(copies)
    ranked = torch.zeros_like(copies)
    open_heads = torch.ones(shape, dtype=torch.bool)
    budget = max(1, _TOPK_PAIR_BYTES // (4 * int(model.d_model)))
    start = 0
    # the rounds allocate the same blocks again and again: kept in the heap (headclass.heap)
    with reuse_freed_memory():
        for end in _progress(bounds, "top-k copy", progress):
            own_columns = screen.place[tokens[start:end]]  # the round's tokens, screen columns
            batch: list[tuple[int, Tensor, Tensor, Tensor]] = []  # layer, heads, projected, own
            for layer in range(shape[0]):
                open_here = open_heads[layer].nonzero().squeeze(1)
                if not open_here.numel():
                    continue
                W_V, W_O = _f32(layer_weight(model, "W_V", layer)), _f32(layer_weight(model, "W_O", layer))
                for heads in open_here.split(max(1, budget // (end - start))):
                    projected, own = _head_outputs(
                        sources[start:end], own_unembed[:, start:end], W_V[heads], W_O[heads]
                    )
                    batch.append((layer, heads, projected, own))
                    if sum(p.shape[0] * p.shape[1] for _, _, p, _ in batch) >= budget:
                        _rank_batch(batch, own_columns, screen, top_k, copies, suppressions)
                        batch = []
            if batch:
                _rank_batch(batch, own_columns, screen, top_k, copies, suppressions)
            ranked[open_heads] = end
            if stop is not None:
                open_heads[open_heads.clone()] = ~stop.settled(copies[open_heads], suppressions[open_heads], end)
            start = end
            if not open_heads.any():
                break
            if stop is not None and screen.error[0] and end >= _SPACE_FROM * stop.first and end < n:
                # Heads still open now are near a threshold and usually take most of the
                # sample: each ranks the rest at once in its output space, and the rule is
                # replayed on the running counts (the same stop, the same counts).
                for layer, head in open_heads.nonzero().tolist():
                    rest = slice(end, n)
                    in_top, in_bottom = _rank_in_output_space(
                        model, layer, head, screen, sources[rest], own_unembed[:, rest], tokens[rest], top_k, budget
                    )
                    copies[layer, head], suppressions[layer, head], ranked[layer, head] = stop.replay(
                        copies[layer, head], suppressions[layer, head], in_top, in_bottom, end, bounds
                    )
                break
    return copies, suppressions, ranked


def _head_outputs(sources: Tensor, own_unembed: Tensor, W_V: Tensor, W_O: Tensor) -> tuple[Tensor, Tensor]:
    """What heads write when they attend to each token, ``[head, token, d_model]``, and each
    one's logit for that token, ``[head, token]``: ``sources`` ``[token, d_model]`` float32,
    ``own_unembed`` ``[d_model, token]`` the tokens' unembedding columns, ``W_V`` ``[head,
    d_model, d_head]``, ``W_O`` ``[head, d_head, d_model]``. One formula for the rounds and the
    output space, so both rank the same float32 logits."""
    projected = (sources @ W_V) @ W_O
    return projected, (projected * own_unembed.mT).sum(-1)


def _rank_in_output_space(
    model: HeadModelLike,
    layer: int,
    head: int,
    screen: _Screen,
    sources: Tensor,
    own_unembed: Tensor,
    tokens: Tensor,
    top_k: int,
    budget: int,
) -> tuple[Tensor, Tensor]:
    """Is each token's own logit among the head's ``top_k`` largest (smallest), ranked in the
    head's output space (:class:`_OutputSpace`), ``budget`` tokens at a time: two ``[token]``
    bool tensors, in the order of ``tokens``."""
    # [1, d_model, d_head] and [1, d_head, d_model]: this head's alone (its key/value head's
    # W_V, not the layer's expanded to every query head)
    groups = kv_layer_weight(model, "W_V", layer)
    group = head // query_heads_per_kv_head(int(model.n_heads), int(groups.shape[0]))
    W_V = _f32(groups[group : group + 1])
    W_O = _f32(layer_weight(model, "W_O", layer)[head : head + 1])
    space = _OutputSpace.build(W_O[0], screen)
    tops, bottoms = [], []
    for a in range(0, int(tokens.numel()), budget):
        b = a + budget
        projected, own = _head_outputs(sources[a:b], own_unembed[:, a:b], W_V, W_O)
        top, bottom = _top_and_bottom(projected[0], own[0], screen.place[tokens[a:b]], screen, top_k, space)
        tops.append(top)
        bottoms.append(bottom)
    return torch.cat(tops), torch.cat(bottoms)


def _rank_batch(
    batch: list[tuple[int, Tensor, Tensor, Tensor]],
    own_columns: Tensor,
    screen: "_Screen",
    top_k: int,
    copies: Tensor,
    suppressions: Tensor,
) -> None:
    """Ranks a batch of ``(layer, heads, projected [head, token, d_model], own [head, token])``
    (one round's tokens, whose screen columns are ``own_columns`` ``[token]``) and adds each
    head's copies and suppressions to the ``[layer, head]`` counts."""
    projected = torch.cat([p.flatten(0, 1) for _, _, p, _ in batch])
    own = torch.cat([o.flatten() for _, _, _, o in batch])
    n_tokens = own_columns.numel()
    in_top, in_bottom = _top_and_bottom(projected, own, own_columns.repeat(own.numel() // n_tokens), screen, top_k)
    counts = torch.stack([in_top, in_bottom]).view(2, -1, n_tokens).sum(-1).cpu()
    at = 0
    for layer, heads, _, _ in batch:
        copies[layer, heads] += counts[0, at : at + heads.numel()]
        suppressions[layer, heads] += counts[1, at : at + heads.numel()]
        at += heads.numel()


class _StopRule:
    """When a head has ranked enough tokens: both fractions clear of their thresholds.

    A fraction ``c / n`` is clear of a threshold ``t`` when the Wilson score interval at ``z``
    (Wilson 1927; it stays honest at 0 and 1, where ``sqrt(p (1 - p) / n)`` is 0) lies wholly
    on one side of ``t``. Labels read ``score >= t``, so a clear fraction cannot change its side
    with more tokens except by a ``z``-sigma fluke. Rounds: ``first`` tokens, then doubling.
    """

    def __init__(self, first: int, z: float, copy: float, suppression: float) -> None:
        self.first, self.z, self.thresholds = int(first), float(z), (float(copy), float(suppression))

    def rounds(self, n: int) -> list[int]:
        bounds, size = [], max(1, self.first)
        while size < n:
            bounds.append(size)
            size *= 2
        return bounds + [n]

    def settled(self, copies: Tensor, suppressions: Tensor, n: Union[int, Tensor]) -> Tensor:
        clear = torch.ones(copies.shape, dtype=torch.bool)
        for count, threshold in zip((copies, suppressions), self.thresholds):
            low, high = wilson_interval(count.double() / n, n, self.z)
            clear &= (low > threshold) | (high < threshold)
        return clear

    def replay(
        self, copies: Tensor, suppressions: Tensor, in_top: Tensor, in_bottom: Tensor, start: int, bounds: list[int]
    ) -> tuple[Tensor, Tensor, int]:
        """Where the rounds stop a head, and its counts there, from the decisions on every
        token after the first ``start`` at once: ``copies``, ``suppressions`` its counts
        after ``start`` tokens, ``in_top``, ``in_bottom`` ``[token]`` the decisions on the
        next tokens, ``bounds`` the rounds' ends (:meth:`rounds`). The round ending the sample
        always stops it. Returns ``(copies, suppressions, ranked)``."""
        later = torch.tensor([bound for bound in bounds if bound > start])
        at = (later - start - 1).to(in_top.device)
        copied = copies + in_top.long().cumsum(0)[at].cpu()
        suppressed = suppressions + in_bottom.long().cumsum(0)[at].cpu()
        done = self.settled(copied, suppressed, later)
        done[-1] = True  # the whole sample
        first = int(done.nonzero()[0])
        return copied[first], suppressed[first], int(later[first])


def wilson_interval(fraction: Tensor, n: Union[int, Tensor], z: float) -> tuple[Tensor, Tensor]:
    """Wilson score interval ``(low, high)`` of a binomial fraction measured on ``n`` items.

    ``(p + z^2 / 2n -/+ z sqrt(p (1 - p) / n + z^2 / 4n^2)) / (1 + z^2 / n)`` (Wilson 1927):
    unlike ``p -/+ z sqrt(p (1 - p) / n)`` it is not empty at ``p = 0`` or ``1``.
    """
    p = fraction.double()
    n = torch.as_tensor(n, dtype=torch.float64)
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * (p * (1 - p) / n + z2 / (4 * n * n)).clamp_min(0).sqrt() / (1 + z2 / n)
    return centre - half, centre + half


# Columns per band chunk: the counter counts band logits per chunk (a small output) and only
# chunks with some are searched for them.
_BAND_CHUNK = 256


def _count_beyond_eager(logits: Tensor, high: Tensor, low: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of ``logits`` ``[rows, chunks, chunk]``: how many are ``>= high`` and ``<= low``
    (``[rows, 1, 1]``), two ``[rows]`` int32 tensors, and per chunk how many lie in the band
    between them (``low < logit < high``), ``[rows, chunks]`` int32. NaN (a column left out)
    compares false everywhere. The reference: every logit compared three times."""
    # Three comparisons, not four and an AND: the band is what lies above low less what
    # reaches high, and empty (not negative) where high <= low.
    above = (logits >= high).sum(-1, dtype=torch.int32)  # [rows, chunks]
    band = (logits > low).sum(-1, dtype=torch.int32).sub_(above).clamp_min_(0)
    less = (logits <= low).sum((-2, -1), dtype=torch.int32)
    return above.sum(-1, dtype=torch.int32), less, band


# Logits compared one by one at a time by _count_beyond (its gathered copy, the bool masks and
# their int32 sums: ~8 bytes a logit, 8 MB).
_DETAIL_LOGITS = 1 << 20


def _count_beyond(logits: Tensor, high: Tensor, low: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_count_beyond_eager`'s counts (the same integers), read mostly from each chunk's
    largest and smallest logit.

    A chunk whose maximum lies below ``high`` holds nothing above, one whose minimum reaches it
    is all above, and the same for ``low``: the counts of such a chunk follow from two
    reductions. Only the others, where a threshold falls inside the chunk (or a NaN makes its
    extremes NaN), are compared logit by logit. A pair ranked against the whole vocabulary is
    one whose own logit is near the top or the bottom, so nearly every chunk of its row lies
    wholly on one side. Two reductions cost ~0.4 ns a logit in bfloat16 here (0.15 in float32)
    where three comparisons and their sums cost ~5.5 ns; ``torch.compile`` fusing them cost 0.53
    ns a logit and 1.7-3.6 s of compilation in each process (used until 2026-12-07).
    """
    width = logits.shape[-1]
    top, bottom = logits.amax(-1), logits.amin(-1)  # [rows, chunks]; NaN where a chunk holds one
    high, low = high[..., 0], low[..., 0]  # [rows, 1]
    all_above, none_above = bottom >= high, top < high
    all_below, none_below = top <= low, bottom > low
    above = all_above.to(torch.int32).mul_(width)
    less = all_below.to(torch.int32).mul_(width)
    # a decided chunk is all above, all below or all in the band (none of it where high <= low)
    band = (width - above - less).clamp_min_(0)
    rows, chunks = ((all_above | none_above) & (all_below | none_below)).logical_not_().nonzero().unbind(1)
    step = max(1, _DETAIL_LOGITS // width)  # gathered chunks at a time: bounded temporaries
    for at in range(0, rows.numel(), step):
        row, chunk = rows[at : at + step], chunks[at : at + step]
        more, fewer, between = _count_beyond_eager(logits[row, chunk][:, None], high[row, :, None], low[row, :, None])
        above[row, chunk], less[row, chunk], band[row, chunk] = more, fewer, between[:, 0]
    return above.sum(-1, dtype=torch.int32), less.sum(-1, dtype=torch.int32), band


def _screen_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the vocabulary-wide logit screen: bfloat16 where the CPU multiplies it in
    hardware with float32 accumulation (Intel AMX: about 7x float32 on the machine this was
    tuned on; AVX512-BF16 dot products, as on AMD EPYC: about 3x), else float32. The float32
    comparisons of the band keep every decision exact either way."""
    if device.type == "cpu":
        for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
            supported = getattr(torch.cpu, probe, None)
            if callable(supported) and supported():
                return torch.bfloat16
    return torch.float32


def _screen_error(d_model: int, screen: torch.dtype, unembed: torch.dtype) -> tuple[float, float]:
    """``(a, b)`` of :func:`_screen_margin`: ``a`` the float32 summation error of a logit,
    relative to ``|p| |w|`` (both sides: the screen's sum of exact bfloat16 products and the
    float32 reference, ``(2 d + 2) 2^-24 (1 + u)^2``), ``b`` the relative rounding of a logit
    to bfloat16 (``u = 2^-8``), each with 25 % to spare. ``(0, 0)`` for a float32 screen: it
    is the reference."""
    if screen == torch.float32:
        return 0.0, 0.0
    u = 2.0**-8
    return (2 * d_model + 2) * 2.0**-24 * (1 + u) ** 2 * 1.25, 1.25 * u


def _screen_margin(
    rounding: Tensor,
    size: Tensor,
    wmax: Tensor,
    emax: Tensor,
    own_abs: Tensor,
    error: tuple[float, float],
    extra: Union[float, Tensor] = 0.0,
) -> Tensor:
    """How far a screened logit near ``own`` can lie from its float32 value, per row.

    A bfloat16 screen computes ``round(p~ . w~)`` from ``p~ = round(p)`` and ``w~ = round(w)``
    (``w~ = w`` when ``W_U`` is bfloat16 already); the products are exact in float32, and
    ``p~ . w~ - p . w = (p~ - p) . w~ + p . (w~ - w)``, so by Cauchy-Schwarz the difference is
    at most ``|p~ - p| (1 + u) |w| + |p| |w~ - w|``, plus the two float32 sums (``a |p| |w|``).
    The rounding errors are measured, not assumed (``rounding`` = ``|p~ - p|`` per row,
    ``emax`` = the largest ``|w~_j - w_j|`` of the block, ``wmax`` its largest ``|w_j|``):
    about half the worst case ``u |p|``, so the band the float32 comparisons must settle is
    half as wide. 25 % is added to spare; rounding the logit itself adds ``b (|own| + m)``.
    ``extra``: a further bound added before the spare (:class:`_OutputSpace`'s residual).
    """
    a, b = error
    u = 2.0**-8
    inputs = 1.25 * ((1 + u) * rounding * wmax + size * emax + extra) + a * size * wmax
    return inputs + b * (own_abs + inputs)


def _round_away(x: Tensor, dtype: torch.dtype, up: bool) -> Tensor:
    """``x`` in ``dtype``, rounded strictly up (or down): a bound that stays one."""
    limit = x.new_tensor(math.inf if up else -math.inf).to(dtype)
    rounded = x.to(dtype)
    short = rounded.float() <= x if up else rounded.float() >= x
    return torch.where(short, torch.nextafter(rounded, limit), rounded)


class _Scratch:
    """One buffer that every logits block of a ranking is written into, grown when too small.

    The blocks vary in size from one product to the next (rows settle, widths follow). Fresh
    ones each time fragment the heap that :func:`~headclass.heap.reuse_freed_memory` keeps
    during the rounds (Qwen2.5-0.5B bf16 top-k peak +0.27 GB against +0.17 GB with this
    buffer), and outside such a context each is a mapping faulted in page by page (1.8 M page
    faults). One buffer reused costs nothing more than the largest block.
    """

    def __init__(self) -> None:
        self._buffer: Optional[Tensor] = None

    def take(self, rows: int, columns: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A contiguous ``[rows, columns]`` view of the buffer (its old content is garbage)."""
        n = rows * columns
        buffer = self._buffer
        if buffer is None or buffer.numel() < n or buffer.dtype != dtype or buffer.device != device:
            size = max(n, _TOPK_BLOCK_BYTES // 4)  # logits blocks are sized in 4-byte logits
            buffer = self._buffer = torch.empty(size, dtype=dtype, device=device)
        return buffer[:n].view(rows, columns)


class _Screen(NamedTuple):
    """The unembedding as the top-k ranking reads it, built once per :func:`_topk_counts` call.

    ``W_U`` ``[d_model, vocab]``: the reference (float32 logits of it decide); ``columns``: the
    same in the screen dtype (:func:`_screen_dtype`), column ``j`` being ``W_U``'s ``order[j]``;
    ``place``: the inverse (``W_U`` column -> screen column); ``norms`` ``[vocab]``: the column
    norms of ``columns`` (of ``W_U``'s, in their order), ``errors`` ``[vocab]``: the norm of each
    column's rounding to the screen dtype (zeros where ``columns`` is ``W_U`` itself);
    ``first`` ``[m]``: random screen columns ranked first, ``first_block``
    their columns, ``in_first`` ``[vocab]`` each column's slot in them (-1: not among them);
    ``error``: :func:`_screen_error` (zeros: the screen is float32, exact); ``logits``: the
    :class:`_Scratch` the logits blocks are written into.
    """

    W_U: Tensor
    columns: Tensor
    order: Tensor
    place: Tensor
    norms: Tensor
    errors: Tensor
    first: Tensor
    first_block: Tensor
    in_first: Tensor
    error: tuple[float, float]
    logits: _Scratch

    @classmethod
    def build(cls, model: HeadModelLike, generator: torch.Generator) -> "_Screen":
        """The screen of ``model.W_U``; ``first`` is the generator's next permutation of the
        vocabulary (1024 columns)."""
        W_U = model.W_U
        n_vocab = int(W_U.shape[1])
        first = torch.randperm(n_vocab, generator=generator)[: min(n_vocab, 1024)].to(W_U.device)
        dtype = _screen_dtype(W_U.device)
        blocks = range(0, n_vocab, _VOCAB_BLOCK)
        norms = torch.cat([_f32(W_U[:, a : a + _VOCAB_BLOCK]).norm(dim=0) for a in blocks])
        errors = torch.zeros_like(norms)
        if W_U.dtype == dtype or dtype == torch.float32:  # the model's own W_U (blocks upcast), no copy
            columns, order = W_U, torch.arange(n_vocab, device=W_U.device)
        else:  # a copy in the screen dtype, columns by falling norm: tight margins block by block
            order = norms.argsort(descending=True)
            # Held as [vocab, d_model] rows (``columns`` is its transposed view, which the matrix
            # products read as fast): each block is a gather of whole rows along memory, where
            # gathering columns of the bridge's transposed W_U view took 4x longer (0.5B: 1.8 s).
            rows = torch.empty(W_U.shape[::-1], dtype=dtype, device=W_U.device)
            step = max(1, _TOPK_BLOCK_BYTES // (8 * int(W_U.shape[0])))  # float32 temporaries: two
            for a in range(0, n_vocab, step):
                block = _unembed_rows(W_U, order[a : a + step])  # [step, d_model] float32
                rows[a : a + step] = block
                errors[a : a + step] = (block - rows[a : a + step].float()).norm(dim=1)
            columns = rows.mT
            norms = norms[order]
        place = torch.empty_like(order)
        place[order] = torch.arange(n_vocab, device=order.device)
        in_first = torch.full((n_vocab,), -1, dtype=torch.long, device=W_U.device)
        in_first[first] = torch.arange(first.numel(), device=W_U.device)
        error = _screen_error(int(model.d_model), dtype, W_U.dtype)
        first_block = columns[:, first]
        return cls(W_U, columns, order, place, norms, errors, first, first_block, in_first, error, _Scratch())


class _OutputSpace(NamedTuple):
    """One head's output space and the unembedding seen from it: the screen of a head that ranks
    many tokens (:func:`_topk_counts`).

    A head writes ``p = z W_O`` (``z`` its ``d_head`` values), so ``p`` lies in the row space
    of ``W_O``. With ``Q`` ``[d_model, d_head]`` an orthonormal basis of it (QR in float64,
    kept in float32), ``p . w_j = y . (Q^T w_j) + r . w_j`` exactly, for ``y = p Q`` and the
    residual ``r = p - y Q^T`` (rounding alone, measured in float64). The screen multiplies
    ``y~`` with ``n~_j = round(Q~^T w~_j)`` (``columns`` ``[d_head, vocab]`` in the screen's
    dtype and column order): ``d_model / d_head`` times fewer multiply-adds a logit, once
    ``columns`` is formed, which costs as much as ranking ``d_head`` pairs with the plain screen.

    Its error is :func:`_screen_margin`'s with ``y`` for ``p`` and ``n~`` for ``w~``, plus
    ``|r| |w_j|`` and the float32 reference sum ``a |p| |w_j|`` (``coordinates``); ``errors``
    bounds ``|n~_j - Q^T w_j|`` by ``||Q~ - Q||_2 |w_j| + ||Q~||_2 |w~_j - w_j|`` (Cauchy-Schwarz),
    ``+ (a / 2) || |Q~| ||_2 |w~_j|`` (the float32 sum of the product, one side) ``+ 2^-8 |n~_j|``
    (its rounding to bfloat16), with 25 % to spare; the norms are computed in float64.
    """

    basis: Tensor  # Q, [d_model, d_head] float32
    columns: Tensor  # [d_head, vocab], the screen's dtype and column order
    norms: Tensor  # |n~_j|, [vocab] float32
    errors: Tensor  # the bound on |n~_j - Q^T w_j|, [vocab] float32
    first_block: Tensor  # columns[:, screen.first]

    @classmethod
    def build(cls, W_O: Tensor, screen: _Screen) -> "_OutputSpace":
        """The space of a head whose output weights are ``W_O`` ``[d_head, d_model]``."""
        basis = torch.linalg.qr(W_O.double().T).Q.float()  # [d_model, d_head]
        rounded = basis.to(screen.columns.dtype)
        exact = rounded.double()
        spread = float(torch.linalg.matrix_norm(exact - basis.double(), ord=2))
        scale = float(torch.linalg.matrix_norm(exact, ord=2))
        absolute = float(torch.linalg.matrix_norm(exact.abs(), ord=2))
        columns = rounded.T @ screen.columns  # [d_head, vocab]
        n_vocab = int(columns.shape[1])
        norms = torch.cat([_f32(columns[:, a : a + _VOCAB_BLOCK]).norm(dim=0) for a in range(0, n_vocab, _VOCAB_BLOCK)])
        w, e = screen.norms, screen.errors  # |w_j|, |w~_j - w_j|
        a = screen.error[0]
        errors = 1.25 * (spread * w + scale * e + a / 2 * absolute * (w + e)) + 2.0**-8 * norms
        return cls(basis, columns, norms, errors, columns[:, screen.first])

    def coordinates(self, projected: Tensor, a: float) -> tuple[Tensor, Tensor]:
        """``y = p Q`` ``[pair, d_head]`` float32 and, per pair, ``|r| + a |p|``, which the
        margin multiplies by a block's largest ``|w_j|`` (the residual, and the float32 sum of
        the reference logit; 1e-6 ``|p|`` more for the float64 sums that measure ``r``)."""
        y = projected @ self.basis
        basis = self.basis.double()
        step = max(1, (1 << 18) // int(basis.shape[0]))  # float64 rows, 2 MB at a time
        residual = torch.cat(
            [
                (projected[i : i + step].double() - y[i : i + step].double() @ basis.T).norm(dim=1).float()
                for i in range(0, projected.shape[0], step)
            ]
        )
        return y, residual + (a + 1e-6) * projected.norm(dim=1)


def _top_and_bottom(
    projected: Tensor,
    own: Tensor,
    own_columns: Tensor,
    screen: _Screen,
    top_k: int,
    space: Optional[_OutputSpace] = None,
) -> tuple[Tensor, Tensor]:
    """Is each pair's own logit among the ``top_k`` largest (smallest) of the vocabulary?

    ``projected``: ``[pair, d_model]`` float32, a sampled embedding through ``W_V W_O``;
    ``own``: ``[pair]`` its logit for its own token, whose screen column ``own_columns``
    ``[pair]`` is left out of the ranking; ``screen``: :class:`_Screen`. Returns two ``[pair]``
    bool tensors, what float32 logits of every column give. Ties never help: a logit within
    ``_TIE_RTOL |p| max_j |w_j|`` of the own one (``tie``, a float rounding's reach) counts
    as above it and as below it.

    Every pair meets the ``first`` columns (a fair sample of the vocabulary), then the rest in
    blocks, and a pair with ``top_k`` logits on each side of its own is dropped as soon as that
    is so: it can be in neither list. So only pairs really near the top or the bottom meet the
    whole vocabulary. A bfloat16 screen knows each logit near ``own`` within
    ``m`` (:func:`_screen_margin`, from the rounding errors of the pair's row and of the block's
    columns): a logit ``>= own + m`` is surely above, ``<= own - m`` surely below (both
    rounded outwards), and the few columns in between, the band, are compared in
    float32 in the same pass (the counter finds them with its counts), for the pairs still
    open. The first block settles most pairs on sure counts alone (its band is wide where
    ``own`` is mid-vocabulary); the pairs it leaves open rank it again, with its band.

    ``space``: every pair is one head's, whose outputs lie in ``space`` (:class:`_OutputSpace`):
    the screen multiplies their ``d_head`` coordinates with the unembedding seen from it,
    ``d_model / d_head`` times fewer multiply-adds a logit, within a margin of its own; the
    band and the decisions are the same float32 logits. A bfloat16 screen only.
    """
    n_pairs = projected.shape[0]
    n_vocab = screen.columns.shape[1]
    device = projected.device
    error, norms = screen.error, screen.norms
    exact = not error[0]
    size_p = projected.norm(dim=1)
    tie = _TIE_RTOL * size_p * norms.max()  # [pair]
    if space is None:  # the screen's rows are the pairs' outputs
        rows_in, columns_of, first_block = projected, screen.columns, screen.first_block
        column_norms, column_errors, beyond = norms, screen.errors, None
    else:  # their coordinates in the head's output space, and its view of the unembedding
        assert not exact, "the output space screens in bfloat16 only"
        rows_in, beyond = space.coordinates(projected, error[0])
        columns_of, first_block = space.columns, space.first_block
        column_norms, column_errors = space.norms, space.errors
    left = rows_in if exact else rows_in.to(columns_of.dtype)
    size = rows_in.norm(dim=1)
    rounding = (rows_in - left.float()).norm(dim=1)  # |p~ - p|: zeros for an exact screen
    above = torch.zeros(n_pairs, dtype=torch.int32, device=device)  # float32 logit >= own - tie
    below = torch.zeros_like(above)  # float32 logit <= own + tie

    def tally(
        rows: Tensor,
        rows_left: Tensor,
        block: Tensor,
        wmax: Tensor,
        emax: Tensor,
        block_wmax: Tensor,
        offset: Tensor,
        skip: Optional[Tensor],
        screen_columns: Optional[Tensor],
    ) -> None:
        # block [d_model, c]; rows_left = left[rows]; wmax, emax: the block's largest column
        # norm and rounding error (of the output space's view with one); block_wmax: the
        # largest |w_j| of the block's unembedding columns; offset [rows]: the own column's
        # place in the block (-1 if absent); skip: block columns ranked already;
        # screen_columns [c]: each block column's screen column, to compare the band in
        # float32 (None: sure counts only)
        right = _f32(block) if exact else block
        logits = screen.logits.take(rows_left.shape[0], right.shape[1], rows_left.dtype, rows_left.device)
        torch.matmul(rows_left, right, out=logits)  # [rows, c], screen dtype
        if skip is not None:
            # Ranked already: made -inf for a row whose own logit is high so far (no more above
            # than below), +inf for the others, so that a chunk's extremes still decide it
            # (NaN would send ~80 % of the chunks, those holding one, to the slow comparisons).
            # The counts they add are taken off below.
            high_side = above[rows] <= below[rows]
            infinity = torch.tensor(math.inf, dtype=logits.dtype, device=logits.device)
            logits[:, skip] = torch.where(high_side, -infinity, infinity)[:, None]
        mine = ((offset >= 0) & (offset < logits.shape[1])).nonzero().squeeze(1)
        logits[mine, offset[mine]] = math.nan  # never counts itself (NaN compares false)
        if exact:  # above: >= own - tie, below: <= own + tie (both for a tie; no band)
            high = (own[rows] - tie[rows])[:, None, None]
            low = (own[rows] + tie[rows])[:, None, None]
        else:
            own_abs = own[rows].abs() + tie[rows]  # the logits compared lie this far out, at most
            extra = 0.0 if beyond is None else beyond[rows] * block_wmax
            margin = _screen_margin(rounding[rows], size[rows], wmax, emax, own_abs, error, extra)
            # Strictly beyond the tie and the margin, in the screen's dtype: surely above
            # (>= high) is surely not below, and the other way; the band between is compared
            # in float32.
            reach = tie[rows] + margin
            high = _round_away(own[rows] + reach, screen.columns.dtype, up=True)[:, None, None]
            low = _round_away(own[rows] - reach, screen.columns.dtype, up=False)[:, None, None]
        n_rows, width = logits.shape
        main = width - width % _BAND_CHUNK
        chunks = []
        if main:
            chunks.append(logits[:, :main].view(n_rows, -1, _BAND_CHUNK))
        if main < width:  # the ragged end, one chunk of fewer columns
            chunks.append(logits[:, main:].view(n_rows, 1, -1))
        bands = []
        for chunked in chunks:
            more, less, band = _count_beyond(chunked, high, low)
            above[rows] += more
            below[rows] += less
            bands.append((chunked, band))
        if skip is not None:
            n_skip = int(skip.numel())
            below[rows] -= high_side.int() * n_skip  # their -inf counted below
            above[rows] -= (~high_side).int() * n_skip  # their +inf counted above
        if screen_columns is None or exact:
            return
        # the band's columns in float32, for the rows still open (a settled row's counts
        # only grow): chunks holding some first, then the logits in them
        still = (above[rows] < top_k) | (below[rows] < top_k)
        at = 0
        for chunked, band in bands:
            row, chunk = ((band > 0) & still[:, None]).nonzero().unbind(1)
            if row.numel():
                part = chunked[row, chunk]  # [n, chunk]
                i, j = ((part > low[row, 0]) & (part < high[row, 0])).nonzero().unbind(1)
                pair = rows[row[i]]
                column = screen.order[screen_columns[at + chunk[i] * chunked.shape[2] + j]]
                # two [step, d_model] gathers and their product, 24 MB: the band of a head ranked in its
                # output space is wider, and whole steps of it cost +0.05 GB on SmolLM2 at 32 MiB
                step = max(1, _TOPK_BLOCK_BYTES // (16 * projected.shape[1]))
                for a in range(0, pair.numel(), step):
                    p = pair[a : a + step]
                    logit = (projected[p] * _unembed_rows(screen.W_U, column[a : a + step])).sum(-1)
                    above.index_add_(0, p, (logit >= own[p] - tie[p]).int())
                    below.index_add_(0, p, (logit <= own[p] + tie[p]).int())
            at += chunked.shape[1] * chunked.shape[2]

    rows = torch.arange(n_pairs, device=device)
    first_max, first_error = column_norms[screen.first].max(), column_errors[screen.first].max()
    first_wmax = norms[screen.first].max()
    first_offset = screen.in_first[own_columns]
    tally(rows, left, first_block, first_max, first_error, first_wmax, first_offset, None, None)
    rows = ((above < top_k) | (below < top_k)).nonzero().squeeze(1)
    rows_left = left[rows]
    if not exact and rows.numel():  # the first block again with its band, for the pairs left open
        above[rows] = 0
        below[rows] = 0
        tally(rows, rows_left, first_block, first_max, first_error, first_wmax, first_offset[rows], None, screen.first)
    start = 0
    while start < n_vocab:
        still = (above[rows] < top_k) | (below[rows] < top_k)
        n_open = int(still.sum())
        if not n_open:
            break
        # Settled rows are dropped when a quarter of them is: gathering [rows, d_model] at
        # every block costs more than ranking a few settled rows on (their counts only grow).
        if n_open < 0.75 * rows.numel():
            rows = rows[still]
            rows_left = left[rows]
        width = _TOPK_BLOCK_BYTES // (4 * rows.numel()) // _BAND_CHUNK * _BAND_CHUNK
        stop = min(n_vocab, start + max(_BAND_CHUNK, width))
        columns = slice(start, stop)
        skip = (screen.in_first[columns] >= 0).nonzero().squeeze(1)
        block, offset = columns_of[:, columns], own_columns[rows] - start
        wmax, emax, block_wmax = column_norms[columns].max(), column_errors[columns].max(), norms[columns].max()
        tally(rows, rows_left, block, wmax, emax, block_wmax, offset, skip, torch.arange(start, stop, device=device))
        start = stop
    return above < top_k, below < top_k


def _unembed_rows(W_U: Tensor, columns: Tensor) -> Tensor:
    """Columns of ``W_U`` ``[d_model, vocab]`` as float32 rows ``[n, d_model]``, gathered along
    memory: the bridge's ``W_U`` is a transposed view of the ``[vocab, d_model]`` unembedding."""
    if W_U.stride(0) == 1:
        return _f32(W_U.mT.index_select(0, columns))
    return _f32(W_U.index_select(1, columns)).mT


def topk_copy_scores(
    model: HeadModelLike,
    *,
    top_k: int = 5,
    sample_size: int = 2000,
    seed: int = 0,
    effective_embedding: bool = False,
    tokens: Optional[Tensor] = None,
    stop_at: Optional[tuple[float, float]] = None,
    first_sample: int = 100,
    z: float = 3.0,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Top-k copy and copy-suppression scores (IOI paper; ARENA 1.4), ``[layer, head]`` in [0, 1].

    For each sampled token ``t`` the head's direct effect on the logits when it attends to ``t``
    is ``W_E[t] @ W_V @ W_O @ W_U`` (``vocab`` logits; the effective embedding with
    ``effective_embedding=True``). Then

    * ``copy_topk``: the fraction of sampled tokens whose own logit is among the ``top_k`` largest
      (Wang et al. 2022 call such a head a copying head; they use the effective embedding);
    * ``copy_suppression_topk``: the fraction whose own logit is among the ``top_k`` most negative,
      i.e. the top-k of the negated logits (McDougall et al. 2023).

    Ranks are taken over the whole vocabulary and count the other tokens whose logit is ``>=``
    the own logit (``<=`` for suppression), so ties never help; logits within ``1e-5 |p|
    max_j |w_j|`` of the own one (``p`` the head's output row, ``w_j`` the unembedding's columns)
    tie with it, as float rounding can reorder them on another CPU. A head whose logits are
    all equal, or only rounding noise (one that writes nothing, or orthogonally to the
    unembedding), scores 0 on both. The sample is
    :func:`copy_token_sample` (special tokens excluded, seeded) unless ``tokens`` (1-D ids) is
    given.

    Logits are computed one layer and one block of vocabulary columns at a time
    (``[heads, sample, vocab]`` is never held), and a (head, token) pair is dropped as soon as
    ``top_k`` other logits lie on each side of its own: it can then be in neither list. Only the
    pairs that really are near the top or bottom meet the whole vocabulary, so a head that
    neither copies nor suppresses costs about ``2 d_head (sample + d_model) 1024`` flops.
    The decisions are exact (see ``_top_and_bottom``): where the CPU has bfloat16 matrix
    hardware (AMX, AVX512-BF16) the logits are screened in bfloat16 with a proven error
    margin, and the few logits within the margin of a pair's own are computed again in
    float32, in the same pass.

    ``stop_at=(copy_threshold, suppression_threshold)`` samples sequentially: every head ranks
    ``first_sample`` tokens, then doubling rounds, and stops as soon as the Wilson interval at
    ``z`` (:func:`wilson_interval`) of both fractions lies on one side of its threshold. Clear
    heads (most of them) then cost a fraction of the full sample, heads near a threshold get all
    of it; ``copy_topk_n`` says how many tokens each head ranked, and the errors use it. Without
    ``stop_at`` every head ranks every sampled token. With a bfloat16 screen, a head still open
    after ``2 first_sample`` tokens ranks the rest of the sample at once in its own output space
    (``d_head`` coordinates against ``Q^T W_U``, with a margin of its own: ``_OutputSpace``) and
    the rule is replayed on its running counts: the same stops and counts, for ``d_model /
    d_head`` times fewer multiply-adds a logit.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ScoreError(f"The 'top_k' parameter must be an int >= 1. Got {top_k!r}.")
    if tokens is None:
        tokens = copy_token_sample(model, sample_size, seed=seed)
    else:
        tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
        if tokens.numel() == 0 or int(tokens.min()) < 0 or int(tokens.max()) >= model.d_vocab:
            raise ScoreError(f"tokens must be a non-empty 1-D tensor of ids in [0, {model.d_vocab - 1}].")
    stop = None
    if stop_at is not None:
        if isinstance(first_sample, bool) or not isinstance(first_sample, int) or first_sample < 1:
            raise ScoreError(f"The 'first_sample' parameter must be an int >= 1. Got {first_sample!r}.")
        stop = _StopRule(first_sample, z, *stop_at)
    with torch.no_grad():
        return _topk_scores(model, _embedding(model, effective_embedding), tokens, top_k, seed, stop, progress)


def _topk_scores(
    model: HeadModelLike,
    embedding: Tensor,
    tokens: Tensor,
    top_k: int,
    seed: int,
    stop: Optional[_StopRule],
    progress: bool,
) -> dict[str, Tensor]:
    copies, suppressions, ranked = _topk_counts(
        model, embedding, tokens.to(embedding.device), top_k, seed=seed, stop=stop, progress=progress
    )
    population = int(ordinary_token_ids(model).numel())
    copy, suppress = copies.float() / ranked, suppressions.float() / ranked
    return {
        "copy_topk": copy,
        "copy_topk_se": sampling_error(copy, ranked, population),
        "copy_suppression_topk": suppress,
        "copy_suppression_topk_se": sampling_error(suppress, ranked, population),
        "copy_topk_n": ranked.float(),
    }


# -- 2b. sampling error, successor heads, output gain -----------------------------------------


def sampling_error(fraction: Tensor, n: Union[int, Tensor], population: Optional[int] = None) -> Tensor:
    """Standard error of a fraction measured on ``n`` sampled items: ``sqrt(p (1 - p) / n)``.

    ``n``: one count, or one per fraction (a tensor shaped like ``fraction``). With
    ``population`` (the number of items the sample is drawn from, without replacement) the
    finite-population correction ``sqrt((N - n) / (N - 1))`` applies, so a "sample" of the
    whole population has error 0. NaN where ``fraction`` is NaN or ``n`` is 0.
    """
    p = fraction.double()
    count = torch.as_tensor(n, dtype=torch.float64).expand_as(p)
    se = (p * (1.0 - p) / count.clamp_min(1.0)).clamp_min(0.0).sqrt()
    if population is not None and population > 1:
        se = se * ((population - count) / (population - 1)).clamp_min(0.0).sqrt()
    elif population is not None:
        se = torch.zeros_like(se)
    return torch.where(count > 0, se, torch.full_like(se, math.nan)).float()


def successor_sequences(model: HeadModelLike, *, min_length: int = _MIN_RUN) -> list[Tensor]:
    """The ordinal sequences the model's tokenizer holds as single tokens, as id tensors.

    Every list of :data:`ORDINAL_SEQUENCES` is tried as is and with a leading space; an item
    counts when it encodes to exactly one id that decodes back to the item (so an unknown-word
    id never passes). Consecutive counted items form runs; runs of >= ``min_length`` items are
    kept, duplicates (the same ids twice) once. ``[]`` without a tokenizer.
    """
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return []
    d_vocab = int(model.d_vocab)
    special = set(model.special_token_ids()) if hasattr(model, "special_token_ids") else set()
    runs: list[tuple[int, ...]] = []
    for items in ORDINAL_SEQUENCES.values():
        for prefix in ("", " "):
            run: list[int] = []
            for item in items + (None,):
                token = None
                if item is not None:
                    ids = tokenizer.encode(prefix + item, add_special_tokens=False)
                    if (
                        len(ids) == 1
                        and 0 <= ids[0] < d_vocab
                        and ids[0] not in special
                        and tokenizer.decode(ids).strip() == item
                    ):
                        token = int(ids[0])
                if token is not None and token not in run:
                    run.append(token)
                    continue
                if len(run) >= min_length and tuple(run) not in runs:
                    runs.append(tuple(run))
                run = [token] if token is not None else []
    return [torch.tensor(run, dtype=torch.long) for run in runs]


def successor_scores(
    model: HeadModelLike,
    *,
    sequences: Optional[Iterable[Tensor]] = None,
    embedding: Optional[Tensor] = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Successor score of every head (Gould et al. 2023), ``{"successor", "successor_se"}``.

    For each item ``i`` of an ordinal sequence (:func:`successor_sequences`: digits and numbers,
    number words, weekdays, months, letters...) that has a next item, the head's OV output when
    it attends to the item, ``x_i W_V W_O W_U``, is read at that sequence's items only; the item
    counts as a success when the NEXT item's logit is strictly above every other item's of the
    sequence by more than ``1e-5`` of the row's largest ``|logit|``, or of the largest logit the
    head's output could give (``|x_i W_V W_O| max_j |w_j|``) where that is larger: ties, also
    ties up to float rounding, never succeed, so a head that writes nothing, or writes only
    orthogonally to the items, scores 0. ``successor`` is the
    fraction of successes over all items of all sequences, ``successor_se`` its binomial error
    ``sqrt(p (1 - p) / n)``. ``x`` is the effective embedding (:func:`effective_embedding`, rows
    of the sequences' ids only) when the model has a first MLP, else ``W_E`` (as the paper reads
    successor heads through MLP0); pass ``embedding`` (``[d_vocab, d_model]``) to override.
    Both are NaN when the tokenizer holds no such sequence (or there is no tokenizer).
    """
    runs = list(successor_sequences(model) if sequences is None else sequences)
    runs = [torch.as_tensor(r, dtype=torch.long).flatten() for r in runs]
    runs = [r for r in runs if r.numel() >= 2]
    shape = (int(model.n_layers), int(model.n_heads))
    if not runs:
        nan = torch.full(shape, math.nan)
        return {"successor": nan, "successor_se": nan.clone()}
    ids = torch.cat(runs).unique()
    with torch.no_grad():
        if embedding is not None:
            rows = _f32(embedding[ids.to(embedding.device)])
        else:
            try:
                rows = _f32(model.effective_embedding(tokens=ids))
            except (ScoreError, AttributeError, TypeError):
                rows = _f32(model.W_E[ids.to(model.W_E.device)])
        position = {int(t): i for i, t in enumerate(ids.tolist())}
        W_U = _f32(model.W_U[:, ids.to(model.W_U.device)])  # [d_model, items]
        hits = torch.zeros(shape, dtype=torch.float64)
        n_items = sum(int(r.numel()) - 1 for r in runs)
        with reuse_freed_memory():  # the same blocks each layer (headclass.heap)
            for layer in _layers(model, "successor", progress):
                W_O = _f32(layer_weight(model, "W_O", layer))
                values = rows @ _f32(kv_layer_weight(model, "W_V", layer))  # [kv_head, item, d_head]
                logits = (values[:, None] @ _per_group(W_O @ W_U, values)).flatten(0, 1)  # [head, item, item]
                # the largest logit the head's output could give an item (Cauchy-Schwarz): a row that
                # is only float rounding of a write orthogonal to the items stays a tie
                written = (values[:, None] @ _per_group(W_O, values)).flatten(0, 1)  # [head, item, d_model]
                reach = written.norm(dim=-1) * W_U.norm(dim=0).max()  # [head, item]
                for run in runs:
                    index = torch.tensor([position[int(t)] for t in run.tolist()], device=logits.device)
                    block = logits[:, index[:-1]][:, :, index]  # [head, i, run]
                    nxt = torch.arange(1, run.numel(), device=logits.device)
                    target = block.gather(2, nxt[None, :, None].expand(block.shape[0], -1, 1))[..., 0]
                    others = block.scatter(2, nxt[None, :, None].expand(block.shape[0], -1, 1), -math.inf)
                    # strictly above, beyond float rounding of equal logits (a tie never succeeds)
                    margin = _TIE_RTOL * torch.maximum(block.abs().amax(-1), reach[:, index[:-1]])
                    hits[layer] += (target > others.amax(-1) + margin).sum(-1).double().cpu()
    fraction = (hits / n_items).float()
    return {"successor": fraction, "successor_se": sampling_error(fraction, n_items)}


def ov_gain_scores(
    model: HeadModelLike, embedding: Tensor, tokens: Tensor, *, progress: bool = False
) -> dict[str, Tensor]:
    """How much a head writes, ``{"ov_gain", "ov_gain_relative"}``, ``[layer, head]``.

    ``ov_gain = sqrt(mean_t ||x_t W_V W_O||^2 / ||x_t||^2)`` over the sampled tokens ``t``,
    with ``x_t`` the token's embedding row scaled to unit RMS (what the normalisation before the
    head gives it, up to centring, which the processed reading weights already ignore): the
    typical size of the head's output, relative to its input, when it attends to one token.
    ``ov_gain_relative`` divides by the median ``ov_gain`` of the model's heads that write
    anything (``ov_gain > 0``): about 1 for a typical head, near 0 for one that writes nearly
    nothing (NaN if no head writes). Computed through the thin-QR factor of ``W_O`` (``d_head``
    wide).
    """
    with torch.no_grad():
        x = _f32(embedding[tokens.to(embedding.device)])
        x = x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)  # unit RMS rows
        gain = torch.zeros(int(model.n_layers), int(model.n_heads), dtype=torch.float64)
        with reuse_freed_memory():  # the same blocks each layer (headclass.heap)
            for layer in _layers(model, "OV gain", progress):
                values = x @ _f32(kv_layer_weight(model, "W_V", layer))  # [kv_head, token, d_head]
                factor = r_factor(_f32(layer_weight(model, "W_O", layer)).mT).mT  # same norms as W_O
                out = values[:, None] @ _per_group(factor, values)  # [kv_head, group, token, d_head]
                ratio = out.flatten(0, 1).pow(2).sum(-1) / x.pow(2).sum(-1)  # [head, token]
                gain[layer] = ratio.mean(-1).sqrt().double().cpu()
        writing = gain[gain > 0]
        median = writing.median() if writing.numel() else torch.tensor(math.nan, dtype=torch.float64)
        relative = gain / median if bool(median > 0) else torch.full_like(gain, math.nan)
    return {"ov_gain": gain.float(), "ov_gain_relative": relative.float()}


# -- 3. singular values, identity-likeness -----------------------------------------------------


def _svdvals(r_left: Tensor, r_right: Tensor) -> Tensor:
    """Singular values of ``left @ right^T`` (``[head, d_model, d_head]`` each) from their
    :func:`r_factor` ``R``s: those of ``R_left R_right^T``."""
    return torch.linalg.svdvals(r_left @ r_right.mT)


def ov_singular_values(model: HeadModelLike, *, progress: bool = False) -> Tensor:
    """Singular values of every head's ``W_OV = W_V W_O``, ``[layer, head, d_head]``, descending.

    With ``W_V = Q_V R_V`` and ``W_O^T = Q_O R_O`` (thin QR, :func:`r_factor`),
    ``W_OV = Q_V (R_V R_O^T) Q_O^T``, so its singular values are those of the ``d_head x d_head`` matrix ``R_V R_O^T``.
    """
    n_heads = int(model.n_heads)
    return torch.stack(
        [
            _svdvals(
                expand_kv_heads(r_factor(kv_layer_weight(model, "W_V", layer)), n_heads),
                r_factor(layer_weight(model, "W_O", layer).mT),
            )
            for layer in _layers(model, "OV spectra", progress)
        ]
    )


def qk_singular_values(model: HeadModelLike, *, progress: bool = False) -> Tensor:
    """Singular values of every head's ``W_QK = W_Q W_K^T``, ``[layer, head, d_head]``, descending.

    Via ``R_Q R_K^T`` as in :func:`ov_singular_values`. Grouped-query key heads are expanded.
    """
    n_heads = int(model.n_heads)
    return torch.stack(
        [
            _svdvals(
                r_factor(layer_weight(model, "W_Q", layer)),
                expand_kv_heads(r_factor(kv_layer_weight(model, "W_K", layer)), n_heads),
            )
            for layer in _layers(model, "QK spectra", progress)
        ]
    )


def participation_ratio(singular_values: Tensor) -> Tensor:
    """Effective rank ``(sum s^2)^2 / sum s^4`` of ``[..., n]`` singular values, in [1, n].

    The participation ratio of the squared singular values (the energy spectrum): ``r`` for
    ``r`` equal singular values (a scaled projection of rank ``r``), 1 for rank one, in between
    for decaying spectra. 0 for an all-zero spectrum. Scale-free.
    """
    s2 = singular_values.double().pow(2)
    s4 = s2.pow(2).sum(-1)
    ratio = torch.where(s4 > 0, s2.sum(-1).pow(2) / s4.clamp_min(torch.finfo(s4.dtype).tiny), torch.zeros_like(s4))
    return ratio.float()


def identity_distance(trace: Tensor, frobenius_sq: Tensor, d_model: int) -> Tensor:
    """Relative Frobenius distance of ``W`` (``d x d``) to its best scaled identity, in [0, 1].

    ``min_c ||W - c I||_F / ||W||_F``: the best ``c = tr(W) / d`` leaves
    ``||W||^2 - tr(W)^2 / d``, so the score is ``sqrt(1 - tr(W)^2 / (d ||W||_F^2))``. Needs only
    the trace and ``||W||_F^2``. Known answers: ``W = c I`` -> 0; a scaled projection of rank
    ``r`` -> ``sqrt(1 - r / d)``; a traceless (e.g. random, or rotating) ``W`` -> 1. A zero
    ``W`` gets 1 (nothing identity-like about writing nothing).
    """
    return _distance(trace, frobenius_sq, torch.full_like(frobenius_sq, float(d_model)))


def projection_distance(trace: Tensor, singular_values: Tensor, *, rtol: float = _RANK_RTOL) -> Tensor:
    """Relative distance of ``W`` to the best scaled projection onto its own row space, in [0, 1].

    ``min_c ||W - c P||_F / ||W||_F`` with ``P`` the orthogonal projector onto the row space of
    ``W`` (rank ``r``). Since ``W P = W``, ``<W, P>_F = tr(W)`` and ``||P||_F^2 = r``: the best
    ``c = tr(W) / r`` leaves ``sqrt(1 - tr(W)^2 / (r ||W||_F^2))``. ``r`` counts the singular
    values above ``rtol`` times the largest. Known answers: ``W = c P`` (any ``c != 0``, any rank)
    -> 0; a rotation within its subspace (traceless) -> 1; zero ``W`` -> 1.

    ``singular_values``: ``[..., n]``; ``trace``: ``[...]``.
    """
    s = singular_values.double()
    rank = (s > rtol * s.amax(-1, keepdim=True)).sum(-1).double()
    return _distance(trace, s.pow(2).sum(-1), rank)


def _distance(trace: Tensor, frobenius_sq: Tensor, dim: Tensor) -> Tensor:
    trace, frobenius_sq, dim = trace.double(), frobenius_sq.double(), dim.double()
    valid = (frobenius_sq > 0) & (dim > 0)
    cosine_sq = trace.pow(2) / (dim * frobenius_sq).clamp_min(torch.finfo(torch.float64).tiny)
    distance = (1.0 - cosine_sq).clamp(0.0, 1.0).sqrt()
    return torch.where(valid, distance, torch.ones_like(distance)).float()


def ov_svd_scores(
    model: HeadModelLike,
    *,
    writes_nothing_below: Optional[float] = None,
    ov_spectra: Optional[Tensor] = None,
    qk_spectra: Optional[Tensor] = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Identity-likeness, norms and effective ranks of the OV and QK circuits, ``[layer, head]``.

    Is ``W_OV = W_V W_O`` "close to the identity"? It has rank <= ``d_head`` in a
    ``d_model``-dimensional space, so even a perfect copying head is far from ``I``:

    * ``ov_identity_distance`` (:func:`identity_distance`): ``min_c ||W_OV - c I|| / ||W_OV||``.
      A head that copies perfectly within its ``d_head``-dimensional subspace (``W_OV = c P``)
      still scores ``sqrt(1 - d_head / d_model)``, 0.96 for GPT-2 small: the rank deficit
      dominates, and the score barely separates copying heads from random ones.
    * ``ov_projection_distance`` (:func:`projection_distance`): the same against the best scaled
      projector onto ``W_OV``'s own row space. ``W_OV = c P`` scores 0 whatever its rank; a head
      that rotates or mixes directions within its subspace scores near 1. This is the measure
      that asks "does it copy what it reads?" (the sign of ``c``, copy vs. suppress, is in
      ``copy_eigen``).
    * ``ov_norm``: ``||W_OV||_F`` (sqrt of the sum of squared singular values);
      ``ov_norm_relative``: ``ov_norm`` over the median ``ov_norm`` of the head's layer (0 when
      that median is 0); ``writes_nothing``: ``ov_norm_relative < writes_nothing_below``.
    * ``ov_effective_rank``, ``qk_effective_rank``: :func:`participation_ratio` of the singular
      values of ``W_OV`` and ``W_QK = W_Q W_K^T``.

    Everything comes from the ``d_head x d_head`` factored forms: singular values via
    :func:`ov_singular_values`, ``tr(W_OV) = tr(W_O W_V)``. Pass precomputed spectra to reuse
    them. ``writes_nothing_below`` defaults to the config's ``weights.writes_nothing_below``.
    """
    if writes_nothing_below is None:
        writes_nothing_below = load_config().weights.writes_nothing_below
    writes_nothing_below = _check_fraction("writes_nothing_below", writes_nothing_below)
    # trace and ||W_OV||^2 in float64: the distances are sqrt(1 - cos^2), which turns a 1e-7
    # rounding of cos^2 into a 3e-4 error near 0. Written into tensors made beforehand: a small
    # result kept per layer among the freed float64 copies fragmented the heap that
    # reuse_freed_memory keeps (Qwen2.5-1.5B: +0.67 GB, +0.07 GB so).
    n_heads, device = int(model.n_heads), layer_weight(model, "W_O", 0).device
    trace = torch.empty(int(model.n_layers), n_heads, dtype=torch.float64, device=device)
    frobenius_sq = torch.empty_like(trace)
    with reuse_freed_memory():  # the same blocks each layer (headclass.heap)
        ov = ov_singular_values(model, progress=progress) if ov_spectra is None else ov_spectra
        qk = qk_singular_values(model, progress=progress) if qk_spectra is None else qk_spectra
        for layer in range(model.n_layers):  # each layer's weights built once for both
            W_V, W_O = kv_layer_weight(model, "W_V", layer).double(), layer_weight(model, "W_O", layer).double()
            trace[layer] = (W_V[:, None] * _per_group(W_O.mT, W_V)).sum((-2, -1)).flatten()
            frobenius_sq[layer] = (expand_kv_heads(r_factor(W_V), n_heads) @ W_O).pow(2).sum((-2, -1))
    rank = (ov.double() > _RANK_RTOL * ov.double().amax(-1, keepdim=True)).sum(-1).double()
    norm = frobenius_sq.sqrt()
    median = norm.quantile(0.5, dim=1, keepdim=True)
    relative = torch.where(median > 0, norm / median.clamp_min(torch.finfo(median.dtype).tiny), torch.zeros_like(norm))
    return {
        "ov_identity_distance": identity_distance(trace, frobenius_sq, int(model.d_model)),
        "ov_projection_distance": _distance(trace, frobenius_sq, rank),  # = projection_distance
        "ov_norm": norm.float(),
        "ov_norm_relative": relative.float(),
        "writes_nothing": relative < writes_nothing_below,
        "ov_effective_rank": participation_ratio(ov),
        "qk_effective_rank": participation_ratio(qk),
    }


# -- 4. positional signature of the QK circuit -------------------------------------------------


def positional_prev_token_score(model: HeadModelLike, *, first_query: int = 2, progress: bool = False) -> Tensor:
    """How often a head's purely positional QK circuit prefers the previous position, ``[layer, head]``.

    For models with learned absolute position embeddings (GPT-2, OPT...). The positional part of
    head ``h``'s attention score from query position ``i`` to key position ``j`` is
    ``p_i W_Q W_K^T p_j^T`` (the matrix ``W_pos W_QK W_pos^T``), computed as
    ``(W_pos W_Q)(W_pos W_K)^T``, ``[n_ctx, d_head] x [d_head, n_ctx]`` per head, one layer at a
    time. ``p_i`` is row ``i`` of ``W_pos`` normalised as the folded LayerNorm would (centred,
    scaled to unit RMS): a key's score scales with its norm, and LayerNorm removes that.

    The score is the fraction of query positions ``i = first_query .. n_ctx-1`` whose
    highest-scoring causal key (``j <= i``) is ``j = i - 1``. ``first_query=2`` by default, so
    every counted query has at least three keys to choose from (chance <= 1/3). Biases are left
    out: ``b_K`` adds the same amount to every key of a query and cannot change the argmax;
    ``b_Q`` adds a fixed, position-independent preference over keys that belongs to the head's
    content, not its positional signature. Ties (e.g. a zero head) resolve to the first key, so a
    head with no positional preference scores 0.

    Raises :class:`ScoreError` for models without learned absolute positions (``W_pos is None``:
    rotary, ALiBi...) and for contexts shorter than ``first_query + 1``.
    """
    W_pos = getattr(model, "W_pos", None)
    if W_pos is None:
        raise ScoreError(
            f"positional_prev_token needs learned absolute position embeddings (W_pos); model "
            f"{getattr(model, 'name', model)!r} has none (rotary or no positional embedding)."
        )
    if isinstance(first_query, bool) or not isinstance(first_query, int) or first_query < 1:
        raise ScoreError(f"The 'first_query' parameter must be an int >= 1. Got {first_query!r}.")
    n_ctx = W_pos.shape[0]
    if n_ctx <= first_query:
        raise ScoreError(
            f"positional_prev_token needs a context longer than {first_query} positions; W_pos has {n_ctx}."
        )
    positions = _f32(W_pos)
    positions = positions - positions.mean(-1, keepdim=True)
    positions = positions / positions.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
    future = torch.ones(n_ctx, n_ctx, dtype=torch.bool, device=positions.device).triu(1)
    # Queries in slices, each against the keys it can see only (about half the full matrix).
    step = 128
    out = torch.zeros(model.n_layers, model.n_heads)
    for layer in _layers(model, "positional QK", progress):
        q_all = positions @ _f32(layer_weight(model, "W_Q", layer))  # [head, n_ctx, d_head]
        k_all = positions @ _f32(layer_weight(model, "W_K", layer))
        hits = torch.zeros(model.n_heads, device=positions.device)
        for i0 in range(first_query, n_ctx, step):
            i1 = min(n_ctx, i0 + step)
            scores = (q_all[:, i0:i1] @ k_all[:, :i1].mT).masked_fill_(future[i0:i1, :i1], float("-inf"))
            best = scores.argmax(-1)  # [head, queries]
            hits += (best == torch.arange(i0 - 1, i1 - 1, device=best.device)).sum(-1)
        out[layer] = (hits / (n_ctx - first_query)).cpu()
    return out


# -- all of them -------------------------------------------------------------------------------


def weight_scores(
    model: HeadModelLike,
    *,
    config: Union[None, str, Mapping[str, Any], HeadclassConfig] = None,
    writes_nothing_below: Optional[float] = None,
    tokens: Optional[Tensor] = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Every weight-based score of every head, ``{key: [layer, head] tensor}``, in one call.

    Keys are :data:`WEIGHT_SCORE_KEYS` in that order (see the module docstring);
    ``positional_prev_token`` is present only when the model has learned absolute position
    embeddings (never NaN); ``successor`` / ``successor_se`` are NaN when the tokenizer holds no
    ordinal sequence. ``writes_nothing`` is a bool tensor, the rest float32. Options come from
    ``config.weights`` (``top_k``, ``copy_sample_size``, ``copy_sample_min``, ``copy_stop_z``,
    ``effective_embedding``, ``writes_nothing_below``), the token sample of the top-k scores from
    ``config.probes.seed``, and their sequential stop from ``config.thresholds.copy_topk`` and
    ``copy_suppression_topk`` (:func:`topk_copy_scores` with ``stop_at``).

    Parameters
    ----------
    model
        A :class:`~headclass.loading.HeadModel`, or any object with the same weight attributes.
    config
        A :class:`~headclass.config.HeadclassConfig`, a (partial) mapping, a YAML path, or None
        for the defaults.
    writes_nothing_below
        Cutoff on ``ov_norm_relative`` under which a head is flagged ``writes_nothing``
        (default: ``config.weights.writes_nothing_below``).
    tokens
        ``Int[Tensor, "sample"]`` ids of the top-k copy scores' token sample (default: drawn
        with :func:`copy_token_sample` from the config; :func:`headclass.classify` passes its
        :class:`~headclass.probes.ProbeSet`'s). The same sample feeds ``ov_gain``.
    progress
        Show progress bars.
    """
    cfg = load_config(config)
    options = cfg.weights
    if writes_nothing_below is None:
        writes_nothing_below = options.writes_nothing_below
    writes_nothing_below = _check_fraction("writes_nothing_below", writes_nothing_below)
    scores: dict[str, Tensor] = {}
    # No reuse_freed_memory here: each stage holds its own and gives the heap back when it ends.
    # One context around them all kept every stage's fragments to the end (Qwen2.5-1.5B
    # bfloat16: peaks from 4.1 to 5.2 GB above the imports, 3.55 GB of weights).
    with torch.no_grad():
        embedding = _embedding(model, options.effective_embedding)
        scores["copy_eigen"] = copy_eigen_score(_ov_eigenvalues(model, embedding, progress))
        if tokens is None:
            tokens = copy_token_sample(model, options.copy_sample_size, seed=cfg.probes.seed)
        stop = _StopRule(
            options.copy_sample_min,
            options.copy_stop_z,
            cfg.thresholds.copy_topk,
            cfg.thresholds.copy_suppression_topk,
        )
        scores.update(_topk_scores(model, embedding, tokens, options.top_k, cfg.probes.seed, stop, progress))
        scores.update(
            successor_scores(model, embedding=embedding if options.effective_embedding else None, progress=progress)
        )
        gains = ov_gain_scores(model, embedding, tokens, progress=progress)
        del embedding
        scores.update(ov_svd_scores(model, writes_nothing_below=writes_nothing_below, progress=progress))
        scores.update(gains)
        positions = getattr(model, "W_pos", None)
        if positions is not None and positions.shape[0] > 2:
            scores["positional_prev_token"] = positional_prev_token_score(model, progress=progress)
    return {key: scores[key].cpu() for key in WEIGHT_SCORE_KEYS if key in scores}
