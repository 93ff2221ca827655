"""Planted-head models: tiny GPT-2s whose heads do exactly one known thing.

Scores, taxonomy and ablation tests reuse these builders. Each returns the model and a dict
``role -> (layer, head)`` (or a list of heads for models where several share a role).

How the weights are set
-----------------------
* The residual stream is split into orthonormal subspaces, all orthogonal to the all-ones
  direction (so LayerNorm's centring does nothing): token identity ``T`` (one direction per
  token), position ``P`` (one per position) and "previous token" ``PT`` (one per token).
  ``wte[t] = T[t]``, ``wpe[p] = P[p]``: every position starts with norm sqrt(2), and the only
  head that writes (the previous-token head) adds one unit vector, so LayerNorm is a constant
  rescaling at every position of a layer and the attention logits are exactly as planted.
* A head's query/key weights map subspace directions onto ``d_head`` basis vectors ``u_i``, so
  ``q . k`` is a gap ``GAP`` (default 25 nats after the 1/sqrt(d_head) scaling) on the planted
  target and 0 elsewhere: the off-target attention is below ``n_ctx * exp(-25)`` ~ 1e-9.
* MLPs are zero (``c_fc``, ``c_proj`` weights and biases 0), every bias is 0, LayerNorm weights
  are 1. The unembedding is tied to ``wte``, so the logits are not meaningful: these models
  test attention patterns, not predictions.

Head recipes (:data:`RECIPES`):

``previous_token``   q_i . k_j = GAP [j == i - 1]; writes the token at i - 1 into ``PT``.
``current_token``    q_i . k_j = GAP [j == i].
``bos``              q_i . k_j = GAP [j == 0].
``diffuse``          all logits 0: uniform over the visible keys (normalised entropy 1).
``induction``        q from ``T`` (token i), k from ``PT`` (token j - 1): GAP [tok(j-1) == tok(i)].
                     Needs a ``previous_token`` head in an earlier layer (K-composition).
``duplicate_token``  GAP [tok(j) == tok(i)] - 2 GAP [j == i]: earlier copies, never itself.
``offset3``          q_i . k_j = GAP [j == i - 3] (a fixed-offset head, best k = 3).
``bos_and_current``  GAP on key 0 and on key i: half BOS, half self (an unrelated mix).
``local3``           q_i . k_j = GAP [i - 3 <= j <= i - 1]: uniform over the 3 previous tokens.
``delimiter``        GAP on keys holding a delimiter token (``DELIMITER_IDS``: ".", ",", "\n"),
                     GAP / 2 on key 0: the delimiters wherever they are, else BOS.
``content``          the same for one class of ordinary words (``CONTENT_IDS``): attention
                     decided by which tokens are present, not by their position.

OV recipes (:data:`OV_RECIPES`, the ``ov_layout`` of :func:`build_planted_gpt2`; by default a
``previous_token`` head writes ``previous`` and every other head writes nothing, W_V = W_O = 0):

``previous``         reads token t, writes it into ``PT`` (what induction K-composes with).
``copy``             reads token t, writes ``T[t]``: the OV circuit maps each token to itself.
``transform``        reads token t, writes ``TRANSFORM[t] @ T`` (a random unit mix of the other,
                     non-digit tokens): a substantial output that neither raises nor lowers the
                     attended token.
``successor``        reads digit i (``DIGIT_IDS``), writes digit i + 1 (Gould et al. 2023), plus
                     0.3 x the ``transform`` mix (which raises no digit) for every token.
``noop``             reads token t, writes ``NOOP_SCALE * TRANSFORM[t] @ T``: almost nothing.

Heads that write anything but ``previous`` sit in the last layer, so no later attention sees
their output and every planted pattern stays exact.

Import from tests as ``from planted import ...`` (pytest puts ``tests/`` on ``sys.path``
through ``tests/conftest.py``).

Example
-------
>>> model, roles = planted_attention_model(tmp_path)
>>> roles["induction"]
(1, 0)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import torch

import headclass

__all__ = [
    "ROLES_LAYOUT",
    "ROLES_OV_LAYOUT",
    "WORDS",
    "DIGIT_IDS",
    "DELIMITER_IDS",
    "CONTENT_IDS",
    "TRANSFORM",
    "NOOP_SCALE",
    "OV_RECIPES",
    "save_planted_tokenizer",
    "planted_roles_model",
    "VOCAB",
    "N_CTX",
    "D_MODEL",
    "N_HEADS",
    "GAP",
    "ATTENTION_LAYOUT",
    "PLANTED_OFFSET",
    "RECIPES",
    "build_planted_gpt2",
    "planted_attention_model",
    "bos_only_model",
]

VOCAB = 32  # ids 0..31; id 0 is BOS
N_CTX = 64
D_MODEL = 384
N_HEADS = 4  # d_head = 96 = VOCAB + N_CTX, room for token and position codes at once
GAP = 25.0
PLANTED_OFFSET = 3  # the offset of the ``offset3`` recipe

#: The layout of :func:`planted_attention_model`.
ATTENTION_LAYOUT = (
    ("previous_token", "current_token", "bos", "diffuse"),
    ("induction", "duplicate_token", "offset3", "bos_and_current"),
)


#: The vocabulary of :func:`save_planted_tokenizer` (id = index): BOS/EOS, an unknown-word
#: token, the digits (an ordinal sequence), three delimiters and 17 common English words.
WORDS = (
    ("<|endoftext|>", "<unk>")
    + tuple(str(i) for i in range(10))
    + (".", ",", "\n")
    + ("the", "of", "and", "a", "to", "in", "is", "that", "it", "as", "for", "was", "on", "with", "by", "are", "be")
)
DIGIT_IDS = tuple(range(2, 12))  # "0" .. "9"
DELIMITER_IDS = (12, 13, 14)  # ".", ",", "\n"
CONTENT_IDS = (15, 16, 17, 18)  # "the", "of", "and", "a"
#: The ``transform`` head writes ``sum_j TRANSFORM[t, j] T[j]`` when it reads token ``t``: a
#: seeded random unit mix of the non-digit tokens other than ``t``, so the attended token's own
#: logit lands in the middle of the others (neither raised nor lowered) and no digit is raised.
TRANSFORM = torch.randn(32, 32, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
TRANSFORM[:, list(DIGIT_IDS)] = 0.0
TRANSFORM.fill_diagonal_(0.0)
TRANSFORM /= TRANSFORM.norm(dim=1, keepdim=True)
NOOP_SCALE = 1e-4

#: The layout of :func:`planted_roles_model`: attention recipes and OV recipes.
ROLES_LAYOUT = (
    ("previous_token", "local3", "delimiter", "content"),
    ("bos", "current_token", "previous_token", "current_token"),
)
ROLES_OV_LAYOUT = (
    (None, None, None, None),
    ("transform", "successor", "noop", "copy"),
)


class _Basis:
    """Orthonormal directions of the residual stream, grouped in subspaces."""

    def __init__(self, d_model: int, vocab: int, n_ctx: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        raw = torch.randn(d_model, d_model, generator=generator, dtype=torch.float64)
        raw[:, 0] = 1.0  # the first direction is all-ones: LayerNorm's centring direction
        q, _ = torch.linalg.qr(raw)
        columns = q.T  # row i = i-th orthonormal direction
        self.T = columns[1 : 1 + vocab]
        self.P = columns[1 + vocab : 1 + vocab + n_ctx]
        self.PT = columns[1 + vocab + n_ctx : 1 + 2 * vocab + n_ctx]


def _qk(query_pairs, key_pairs, d_model: int, d_head: int, scale: float):
    """W_Q, W_K ``[d_model, d_head]`` from (residual direction, head dim, weight) triples."""
    w_q = torch.zeros(d_model, d_head, dtype=torch.float64)
    w_k = torch.zeros(d_model, d_head, dtype=torch.float64)
    for direction, dim, weight in query_pairs:
        w_q[:, dim] += scale * weight * direction
    for direction, dim, weight in key_pairs:
        w_k[:, dim] += weight * direction
    return w_q, w_k


def _recipe_previous(B, n_ctx, vocab):
    return ([(B.P[p], p, 1.0) for p in range(n_ctx)], [(B.P[p], p + 1, 1.0) for p in range(n_ctx - 1)])


def _recipe_current(B, n_ctx, vocab):
    return [(B.P[p], p, 1.0) for p in range(n_ctx)], [(B.P[p], p, 1.0) for p in range(n_ctx)]


def _recipe_bos(B, n_ctx, vocab):
    return [(B.P[p], 0, 1.0) for p in range(n_ctx)], [(B.P[0], 0, 1.0)]


def _recipe_diffuse(B, n_ctx, vocab):
    return [], []


def _recipe_induction(B, n_ctx, vocab):
    return [(B.T[t], t, 1.0) for t in range(vocab)], [(B.PT[t], t, 1.0) for t in range(vocab)]


def _recipe_duplicate(B, n_ctx, vocab):
    query = [(B.T[t], t, 1.0) for t in range(vocab)] + [(B.P[p], vocab + p, 1.0) for p in range(n_ctx)]
    key = [(B.T[t], t, 1.0) for t in range(vocab)] + [(B.P[p], vocab + p, -2.0) for p in range(n_ctx)]
    return query, key


def _recipe_offset(B, n_ctx, vocab):
    k = PLANTED_OFFSET
    return ([(B.P[p], p, 1.0) for p in range(n_ctx)], [(B.P[p], p + k, 1.0) for p in range(n_ctx - k)])


def _recipe_bos_and_current(B, n_ctx, vocab):
    query = [(B.P[p], 0, 1.0) for p in range(n_ctx)] + [(B.P[p], 1 + p, 1.0) for p in range(n_ctx)]
    key = [(B.P[0], 0, 1.0)] + [(B.P[p], 1 + p, 1.0) for p in range(n_ctx)]
    return query, key


def _recipe_local3(B, n_ctx, vocab):
    query = [(B.P[p], j, 1.0) for p in range(n_ctx) for j in range(max(0, p - 3), p)]
    return query, [(B.P[j], j, 1.0) for j in range(n_ctx)]


def _token_class(ids):
    def recipe(B, n_ctx, vocab):
        query = [(B.P[p], 0, 1.0) for p in range(n_ctx)]
        return query, [(B.T[t], 0, 1.0) for t in ids] + [(B.P[0], 0, 0.5)]

    return recipe


#: Head recipes: name -> function(basis, n_ctx, vocab) -> (query triples, key triples).
RECIPES: dict[str, Callable] = {
    "previous_token": _recipe_previous,
    "current_token": _recipe_current,
    "bos": _recipe_bos,
    "diffuse": _recipe_diffuse,
    "induction": _recipe_induction,
    "duplicate_token": _recipe_duplicate,
    "offset3": _recipe_offset,
    "bos_and_current": _recipe_bos_and_current,
    "local3": _recipe_local3,
    "delimiter": _token_class(DELIMITER_IDS),
    "content": _token_class(CONTENT_IDS),
}


def _ov_previous(B, vocab):
    return [(t, B.T[t], B.PT[t]) for t in range(vocab)]


def _ov_copy(B, vocab):
    return [(t, B.T[t], B.T[t]) for t in range(vocab)]


def _ov_transform(B, vocab):
    return [(t, B.T[t], TRANSFORM[t] @ B.T) for t in range(vocab)]


def _ov_successor(B, vocab):
    # digit d -> digit d + 1; on top (and for every other token) the transform's mix at 0.3,
    # which raises no digit and keeps the attended token's own logit mid-ranked (no ties)
    nxt = {d: B.T[d + 1] for d in DIGIT_IDS[:-1]}
    return [(t, B.T[t], nxt.get(t, 0.0) + 0.3 * (TRANSFORM[t] @ B.T)) for t in range(vocab)]


def _ov_noop(B, vocab):
    return [(t, B.T[t], NOOP_SCALE * (TRANSFORM[t] @ B.T)) for t in range(vocab)]


#: OV recipes: name -> function(basis, vocab) -> (value dim, direction read, direction written).
OV_RECIPES: dict[str, Callable] = {
    "previous": _ov_previous,
    "copy": _ov_copy,
    "transform": _ov_transform,
    "successor": _ov_successor,
    "noop": _ov_noop,
}


def blank_gpt2(config, token_embedding: torch.Tensor, position_embedding: torch.Tensor):
    """A ``GPT2LMHeadModel`` of ``config`` that does nothing but embed: every weight and bias 0,
    every LayerNorm gain 1, ``wte`` / ``wpe`` set to ``token_embedding`` ``[vocab, d_model]`` and
    ``position_embedding`` ``[n_ctx, d_model]``. The planted models write their heads into it."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        for name, param in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                param.fill_(1.0)
        model.transformer.wte.weight.copy_(token_embedding)
        model.transformer.wpe.weight.copy_(position_embedding)
    return model


def build_planted_gpt2(
    layout: Sequence[Sequence[str]] = ATTENTION_LAYOUT, *, seed: int = 0, gap: float = GAP, ov_layout=None
):
    """A ``GPT2LMHeadModel`` whose head ``(l, h)`` follows recipe ``layout[l][h]``.

    Every layer needs ``N_HEADS`` (4) recipes. ``ov_layout`` (same shape, entries from
    :data:`OV_RECIPES` or None) sets what a head writes; None keeps the default (``previous``
    for a ``previous_token`` head, nothing otherwise). Returns ``(hf_model, roles)`` with
    ``roles`` mapping each recipe name to the list of ``(layer, head)`` that use it.
    """
    from transformers import GPT2Config

    unknown = {r for layer in layout for r in layer} - set(RECIPES)
    if unknown or any(len(layer) != N_HEADS for layer in layout):
        raise ValueError(f"layout needs {N_HEADS} known recipes per layer; unknown: {sorted(unknown)}")
    d_head = D_MODEL // N_HEADS
    config = GPT2Config(
        n_layer=len(layout),
        n_head=N_HEADS,
        n_embd=D_MODEL,
        vocab_size=VOCAB,
        n_positions=N_CTX,
        bos_token_id=0,
        eos_token_id=0,
        n_inner=4 * D_MODEL,
        tie_word_embeddings=True,
    )
    basis = _Basis(D_MODEL, VOCAB, N_CTX, seed)
    model = blank_gpt2(config, basis.T, basis.P)
    roles: dict[str, list[tuple[int, int]]] = {}
    with torch.no_grad():
        writers = 0  # unit vectors added to the residual stream by earlier previous-token heads
        for layer, recipes in enumerate(layout):
            # LayerNorm maps a residual of squared norm m to norm sqrt(d_model): components
            # grow by c = sqrt(d_model / m); q . k picks up c^2, and 1/sqrt(d_head) is undone.
            c2 = D_MODEL / (2.0 + writers)
            scale = gap * math.sqrt(d_head) / c2
            attn = model.transformer.h[layer].attn
            w_attn = torch.zeros(D_MODEL, 3 * D_MODEL, dtype=torch.float64)
            w_out = torch.zeros(D_MODEL, D_MODEL, dtype=torch.float64)
            for head, recipe in enumerate(recipes):
                roles.setdefault(recipe, []).append((layer, head))
                w_q, w_k = _qk(*RECIPES[recipe](basis, N_CTX, VOCAB), D_MODEL, d_head, scale)
                cols = slice(head * d_head, (head + 1) * d_head)
                w_attn[:, cols] = w_q
                w_attn[:, D_MODEL:][:, cols] = w_k
                ov = ov_layout[layer][head] if ov_layout is not None else None
                if ov is None and recipe == "previous_token":
                    ov = "previous"
                # value: the token identity (scaled back to unit length); output: the recipe's
                for dim, read, write in OV_RECIPES[ov](basis, VOCAB) if ov else ():
                    w_attn[:, 2 * D_MODEL + head * d_head + dim] = read / math.sqrt(c2)
                    w_out[head * d_head + dim] = write
                writers += ov == "previous"
            attn.c_attn.weight.copy_(w_attn)
            attn.c_proj.weight.copy_(w_out)
    model.eval()
    return model, roles


def _save_and_load(model, folder: Path, name: str) -> headclass.HeadModel:
    path = Path(folder) / name
    model.save_pretrained(path)
    return headclass.load_model(path, name=name)


def planted_attention_model(folder: Path) -> tuple[headclass.HeadModel, dict[str, tuple[int, int]]]:
    """The two-layer planted model, saved under ``folder`` and loaded with headclass.

    Layer 0: previous-token (0, 0), current-token (0, 1), BOS (0, 2), diffuse (0, 3).
    Layer 1: induction (1, 0, K-composing with (0, 0)), duplicate-token (1, 1), fixed offset 3
    (1, 2), half-BOS-half-self (1, 3). No tokenizer: probes use :func:`headclass.probes.repeated`
    or token ids; BOS is id 0 and is prepended.

    Returns ``(model, roles)`` with roles ``previous_token``, ``current_token``, ``bos``,
    ``diffuse``, ``induction``, ``duplicate_token``, ``fixed_offset``, ``bos_and_current``.
    """
    hf_model, roles = build_planted_gpt2(ATTENTION_LAYOUT)
    model = _save_and_load(hf_model, folder, "planted-attention")
    flat = {role: heads[0] for role, heads in roles.items()}
    flat["fixed_offset"] = flat.pop("offset3")
    return model, flat


def bos_only_model(folder: Path) -> tuple[headclass.HeadModel, dict[str, list[tuple[int, int]]]]:
    """A one-layer planted model whose four heads all attend only to BOS (position 0).

    Every score but ``bos`` / ``max_attention`` must come out exactly 0 (not NaN) for it, also
    with ``exclude_bos=True``. Returns ``(model, {"bos": [(0, 0), ..., (0, 3)]})``.
    """
    hf_model, roles = build_planted_gpt2((("bos",) * N_HEADS,))
    return _save_and_load(hf_model, folder, "planted-bos-only"), roles


def save_planted_tokenizer(folder: Path) -> Path:
    """Save a word-level tokenizer over :data:`WORDS` (``"the 3 ."`` -> ``[15, 5, 12]``).

    Whitespace and punctuation split words; unknown words become ``<unk>`` (id 1); id 0 is
    BOS/EOS/PAD. Each id decodes to its word, so the delimiter ids decode to ".", "," and
    "\\n" and the digits to "0".."9" (a successor sequence).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    special = "<|endoftext|>"
    PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=special, eos_token=special, unk_token="<unk>", pad_token=special
    ).save_pretrained(folder)
    return folder


def planted_roles_model(folder: Path) -> tuple[headclass.HeadModel, dict[str, tuple[int, int]]]:
    """The two-layer planted model of the two-axes roles, with :func:`save_planted_tokenizer`.

    Layer 0 (attention roles, writing nothing but the previous-token head): previous-token
    (0, 0), local window 1..3 (0, 1), delimiter (0, 2), content (0, 3).
    Layer 1 (output roles, each with a sharp pattern): transform on a BOS pattern (1, 0),
    successor on a current-token pattern (1, 1), no-op on a previous-token pattern (1, 2),
    copy on a current-token pattern (1, 3).

    Returns ``(model, roles)`` with roles ``previous_token``, ``local``, ``delimiter``,
    ``content``, ``transform``, ``successor``, ``noop``, ``copy``.
    """
    hf_model, _ = build_planted_gpt2(ROLES_LAYOUT, ov_layout=ROLES_OV_LAYOUT)
    path = Path(folder) / "planted-roles"
    hf_model.save_pretrained(path)
    save_planted_tokenizer(path)
    model = headclass.load_model(path, name="planted-roles")
    roles = {
        "previous_token": (0, 0),
        "local": (0, 1),
        "delimiter": (0, 2),
        "content": (0, 3),
        "transform": (1, 0),
        "successor": (1, 1),
        "noop": (1, 2),
        "copy": (1, 3),
    }
    return model, roles
