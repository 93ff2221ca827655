"""Fixtures for the known-results tests: a GPT-2-shaped model with GPT-2 small's roles planted.

:func:`planted_gpt2_roles_model` builds a 12-layer x 12-head GPT-2 whose heads at GPT-2
small's published positions do the published jobs, and whose other 132 heads do nothing. It is
the model the role checker of ``test_gpt2_published_roles.py`` is itself tested on: the checker
must pass on it, and must name the head that is missing when one role is left unplanted.

Technique (as in ``tests/planted.py``, generalised to any head count): the residual stream is
split into orthonormal subspaces orthogonal to the all-ones direction (so LayerNorm's centring
does nothing): token identity ``T`` (one direction per token), position ``P`` (one per
position) and "previous token" ``PT`` (one per token). A head's query / key weights map
subspace directions onto its ``d_head`` basis vectors, so ``q . k`` is ``gap`` nats on the
planted targets and 0 elsewhere; the OV weights map ``T`` to ``+T`` (copy), ``-T`` (copy
suppression), ``T`` to ``PT`` (the one previous-token head that writes) or to nothing. MLPs
are zero and the unembedding is tied to ``T``.

Recipes (name -> what head ``(l, h)`` does):

``previous_token``       attends ``i -> i - 1``; writes nothing (pattern only).
``previous_token_writer``  the same, and writes the previous token into ``PT``.
``induction``            attends to keys whose ``PT`` (previous token) equals its own token:
                         K-composition with the writer, which must sit in an earlier layer.
``duplicate_token``      attends to earlier copies of its own token, never to itself.
``copy``                 uniform attention; OV = +identity on tokens (name mover).
``copy_suppression``     uniform attention; OV = -identity on tokens (negative name mover).
``none``                 uniform attention (zero QK); writes a faint token code into a junk
                         subspace that nothing reads (see ``JUNK``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import torch
from planted import blank_gpt2

__all__ = ["GPT2_SMALL_LAYOUT", "planted_gpt2_roles_model", "build_planted_roles"]

VOCAB = 16  # id 0 is BOS; 15 ordinary ids (the repeated probe's segment is 15 tokens)
N_CTX = 32
N_LAYERS = 12
N_HEADS = 12
D_HEAD = VOCAB + N_CTX  # room for a token code and a position code in one head
D_MODEL = N_HEADS * D_HEAD  # 576
GAP = 25.0
# OV scale of the heads with no output role: they write a faint token code into a "junk"
# subspace nothing reads. Not zero, so that a layer's median OV norm is not 0 (weight_scores
# then flags every head of the layer, the copy heads too, as ``writes_nothing``); faint, so
# that the residual norms the planted attention relies on move by well under 1 %.
JUNK = 1e-4

#: GPT-2 small's published roles, ``(layer, head) -> recipe`` (see test_gpt2_published_roles).
GPT2_SMALL_LAYOUT: dict[tuple[int, int], str] = {
    (2, 2): "previous_token_writer",
    (4, 11): "previous_token",
    (5, 1): "induction",
    (5, 5): "induction",
    (6, 9): "induction",
    (7, 2): "induction",
    (7, 10): "induction",
    (0, 1): "duplicate_token",
    (3, 0): "duplicate_token",
    (9, 6): "copy",
    (9, 9): "copy",
    (10, 0): "copy",
    (10, 7): "copy_suppression",
    (11, 10): "copy_suppression",
}


class _Basis:
    def __init__(self, seed: int):
        generator = torch.Generator().manual_seed(seed)
        raw = torch.randn(D_MODEL, D_MODEL, generator=generator, dtype=torch.float64)
        raw[:, 0] = 1.0  # first direction: all-ones, LayerNorm's centring direction
        q, _ = torch.linalg.qr(raw)
        rows = q.T
        self.T = rows[1 : 1 + VOCAB]
        self.P = rows[1 + VOCAB : 1 + VOCAB + N_CTX]
        self.PT = rows[1 + VOCAB + N_CTX : 1 + 2 * VOCAB + N_CTX]
        self.J = rows[1 + 2 * VOCAB + N_CTX : 1 + 3 * VOCAB + N_CTX]  # junk: read by nothing


def _qk(recipe: str, B: _Basis, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``W_Q, W_K`` ``[d_model, d_head]`` of a recipe; ``q . k`` = scale x the planted pairing."""
    w_q = torch.zeros(D_MODEL, D_HEAD, dtype=torch.float64)
    w_k = torch.zeros(D_MODEL, D_HEAD, dtype=torch.float64)
    if recipe.startswith("previous_token"):
        for p in range(N_CTX - 1):
            w_q[:, p] += scale * B.P[p + 1]
            w_k[:, p] += B.P[p]
    elif recipe == "induction":
        for t in range(VOCAB):
            w_q[:, t] += scale * B.T[t]
            w_k[:, t] += B.PT[t]
    elif recipe == "duplicate_token":
        for t in range(VOCAB):
            w_q[:, t] += scale * B.T[t]
            w_k[:, t] += B.T[t]
        for p in range(N_CTX):  # -2 gap on itself: earlier copies only
            w_q[:, VOCAB + p] += scale * B.P[p]
            w_k[:, VOCAB + p] -= 2.0 * B.P[p]
    return w_q, w_k


def build_planted_roles(layout: Mapping[tuple[int, int], str] = GPT2_SMALL_LAYOUT, *, seed: int = 0, gap: float = GAP):
    """A ``GPT2LMHeadModel`` (12 x 12 heads, d_model 576, vocab 16, 32 positions) with ``layout``.

    Heads not in ``layout`` get recipe ``none``. At most one ``previous_token_writer``, and every
    ``induction`` head must come after it.
    """
    from transformers import GPT2Config

    writers = sorted(pos for pos, recipe in layout.items() if recipe == "previous_token_writer")
    inductions = [pos for pos, recipe in layout.items() if recipe == "induction"]
    if len(writers) > 1 or (inductions and (not writers or min(inductions)[0] <= writers[0][0])):
        raise ValueError("induction heads need exactly one previous_token_writer in an earlier layer")
    config = GPT2Config(
        n_layer=N_LAYERS,
        n_head=N_HEADS,
        n_embd=D_MODEL,
        vocab_size=VOCAB,
        n_positions=N_CTX,
        n_inner=4,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=True,
    )
    B = _Basis(seed)
    model = blank_gpt2(config, B.T, B.P)
    with torch.no_grad():
        norm_sq = 2.0  # squared norm of every residual vector: T + P, then + PT, ...
        for layer in range(N_LAYERS):
            # LayerNorm scales a residual of squared norm m by c = sqrt(d_model / m): q . k
            # picks up c^2, and the 1/sqrt(d_head) attention scale is undone here.
            c2 = D_MODEL / norm_sq
            scale = gap * math.sqrt(D_HEAD) / c2
            w_attn = torch.zeros(D_MODEL, 3 * D_MODEL, dtype=torch.float64)
            w_out = torch.zeros(D_MODEL, D_MODEL, dtype=torch.float64)
            adds = 0.0
            for head in range(N_HEADS):
                recipe = layout.get((layer, head), "none")
                cols = slice(head * D_HEAD, (head + 1) * D_HEAD)
                w_q, w_k = _qk(recipe, B, scale)
                w_attn[:, cols] = w_q
                w_attn[:, D_MODEL:][:, cols] = w_k
                values = w_attn[:, 2 * D_MODEL + head * D_HEAD : 2 * D_MODEL + (head + 1) * D_HEAD]
                sign = {"copy": 1.0, "copy_suppression": -1.0}.get(recipe)
                for t in range(VOCAB):
                    if recipe == "previous_token_writer":
                        values[:, t] = B.T[t] / math.sqrt(c2)  # unit token code after LayerNorm
                        w_out[head * D_HEAD + t] = B.PT[t]
                    elif sign is not None:
                        values[:, t] = B.T[t]
                        w_out[head * D_HEAD + t] = sign * B.T[t]
                    elif recipe != "previous_token_writer":
                        values[:, t] = JUNK * B.T[t]
                        w_out[head * D_HEAD + t] = B.J[t]
                if recipe == "previous_token_writer":
                    adds += 1.0
            # Copy heads write averages of token codes, which changes later norms position by
            # position; only heads that need no exact attention (copy, none) may follow them.
            norm_sq += adds
            attn = model.transformer.h[layer].attn
            attn.c_attn.weight.copy_(w_attn)
            attn.c_proj.weight.copy_(w_out)
    model.eval()
    return model


def planted_gpt2_roles_model(folder: Path, layout: Mapping[tuple[int, int], str] = GPT2_SMALL_LAYOUT):
    """Build, ``save_pretrained`` under ``folder`` and load with headclass (no tokenizer)."""
    import headclass

    hf_model = build_planted_roles(layout)
    path = Path(folder) / "planted-gpt2-roles"
    hf_model.save_pretrained(path)
    return headclass.load_model(path, name="planted-gpt2-roles")
