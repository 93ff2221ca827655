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

VOCAB = 32          # ids 0..31; id 0 is BOS
N_CTX = 64
D_MODEL = 384
N_HEADS = 4         # d_head = 96 = VOCAB + N_CTX, room for token and position codes at once
GAP = 25.0
PLANTED_OFFSET = 3  # the offset of the ``offset3`` recipe

#: The layout of :func:`planted_attention_model`.
ATTENTION_LAYOUT = (
    ("previous_token", "current_token", "bos", "diffuse"),
    ("induction", "duplicate_token", "offset3", "bos_and_current"),
)


class _Basis:
    """Orthonormal directions of the residual stream, grouped in subspaces."""

    def __init__(self, d_model: int, vocab: int, n_ctx: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        raw = torch.randn(d_model, d_model, generator=generator, dtype=torch.float64)
        raw[:, 0] = 1.0  # the first direction is all-ones: LayerNorm's centring direction
        q, _ = torch.linalg.qr(raw)
        columns = q.T  # row i = i-th orthonormal direction
        self.T = columns[1:1 + vocab]
        self.P = columns[1 + vocab:1 + vocab + n_ctx]
        self.PT = columns[1 + vocab + n_ctx:1 + 2 * vocab + n_ctx]


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
    return ([(B.P[p], p, 1.0) for p in range(n_ctx)],
            [(B.P[p], p + 1, 1.0) for p in range(n_ctx - 1)])


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
    return ([(B.P[p], p, 1.0) for p in range(n_ctx)],
            [(B.P[p], p + k, 1.0) for p in range(n_ctx - k)])


def _recipe_bos_and_current(B, n_ctx, vocab):
    query = [(B.P[p], 0, 1.0) for p in range(n_ctx)] + [(B.P[p], 1 + p, 1.0) for p in range(n_ctx)]
    key = [(B.P[0], 0, 1.0)] + [(B.P[p], 1 + p, 1.0) for p in range(n_ctx)]
    return query, key


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
}


def build_planted_gpt2(layout: Sequence[Sequence[str]] = ATTENTION_LAYOUT, *, seed: int = 0,
                       gap: float = GAP):
    """A ``GPT2LMHeadModel`` whose head ``(l, h)`` follows recipe ``layout[l][h]``.

    Every layer needs ``N_HEADS`` (4) recipes. Returns ``(hf_model, roles)`` with ``roles``
    mapping each recipe name to the list of ``(layer, head)`` that use it.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    unknown = {r for layer in layout for r in layer} - set(RECIPES)
    if unknown or any(len(layer) != N_HEADS for layer in layout):
        raise ValueError(f"layout needs {N_HEADS} known recipes per layer; unknown: {sorted(unknown)}")
    d_head = D_MODEL // N_HEADS
    config = GPT2Config(n_layer=len(layout), n_head=N_HEADS, n_embd=D_MODEL, vocab_size=VOCAB,
                        n_positions=N_CTX, bos_token_id=0, eos_token_id=0, n_inner=4 * D_MODEL,
                        tie_word_embeddings=True)
    model = GPT2LMHeadModel(config)
    basis = _Basis(D_MODEL, VOCAB, N_CTX, seed)
    roles: dict[str, list[tuple[int, int]]] = {}
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        for name, param in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                param.fill_(1.0)
        model.transformer.wte.weight.copy_(basis.T)
        model.transformer.wpe.weight.copy_(basis.P)
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
                if recipe == "previous_token":
                    # value: the token identity (scaled back to unit length); output: into PT
                    for t in range(VOCAB):
                        w_attn[:, 2 * D_MODEL + head * d_head + t] = basis.T[t] / math.sqrt(c2)
                        w_out[head * d_head + t] = basis.PT[t]
            writers += recipes.count("previous_token")
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
