"""Q-, K- and V-composition scores between every earlier and every later head (Elhage et al. 2021).

A later head ``B`` composes with an earlier head ``A`` when what ``A`` writes (its OV circuit)
lands where ``B`` reads. In TransformerLens' row-vector convention (``x @ W``), with
``W_OV = W_V W_O`` and ``W_QK = W_Q W_K^T`` (both ``[d_model, d_model]``):

* Q-composition: ``B``'s queries read ``A``'s output: ``W_B = W_QK^B``;
* K-composition: ``B``'s keys read it: ``W_B = (W_QK^B)^T = W_K W_Q^T``;
* V-composition: ``B``'s values read it: ``W_B = W_OV^B``;

and the score is ``||W_OV^A W_B||_F / (||W_OV^A||_F ||W_B||_F)`` in [0, 1], exactly
TransformerLens' ``all_composition_scores(mode)`` (``utils.composition_scores(OV, right)``).
Induction heads K-compose with previous-token heads.

Index order follows ``all_composition_scores``: ``scores[la, ha, lb, hb]`` with the EARLIER
head ``A = (la, ha)`` first and the LATER head ``B = (lb, hb)`` second,
``Float[Tensor, "layer_a head_a layer_b head_b"]``, zero wherever ``la >= lb``.

How it is computed (never a ``d_model x d_model`` matrix per pair): with thin QR factors,
``||W_OV^A W_B||_F^2 = <G_A, H_B>_F`` where ``G_A = (W_OV^A)^T W_OV^A = P_A^T P_A`` and
``H_B = W_B W_B^T = T_B T_B^T`` have the small factors ``P_A = R_V^A W_O^A``
(``[d_head, d_model]``) and ``T_B`` (``[d_model, d_head]``: ``W_Q R_K^T`` for Q, ``W_K R_Q^T``
for K, ``W_V R_O^T`` for V). Each head's Gram matrix is built once per pass, packed as its upper
block rows (about ``0.56 d_model^2`` numbers, :class:`_Packer`), and all pairs' inner products are then
matrix products per block: ``d_model^2`` flops per pair, against ``2 d_model d_head^2`` for
forming each pair's ``d_head x d_head`` product ``P_A T_B`` (5x more for GPT-2 XL).

Examples
--------
>>> from headclass.scores.composition import composition_scores, top_k_composition_partners
>>> scores = composition_scores(model)                 # {"q": ..., "k": ..., "v": ...}
>>> top_k_composition_partners(scores, 5, 1, kind="k")  # earlier heads that L5H1's keys read
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence, Union

import torch
from torch import Tensor

from headclass.errors import ScoreError
from headclass.heap import reuse_freed_memory
from headclass.loading.head_model import HeadModelLike, expand_kv_heads, kv_layer_weight, layer_weight
from headclass.scores.weights import _f32, r_factor

__all__ = ["COMPOSITION_KINDS", "composition_scores", "top_k_composition_partners"]

#: Composition kinds, in TransformerLens' ``mode`` spelling lower-cased.
COMPOSITION_KINDS: tuple[str, ...] = ("q", "k", "v")

#: Default bound on the packed Gram matrices held at once.
DEFAULT_MEMORY_BYTES = 1 << 31

# Earlier layers packed together for one matrix product against a block of later layers.
_EARLIER_GROUP = 8

# Blocks per side of the Gram matrices' packing (_Packer).
_PACK_BLOCKS = 8


def _check_kinds(kinds: Union[str, Iterable[str]]) -> tuple[str, ...]:
    names = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    lowered = tuple(str(kind).lower() for kind in names)
    bad = [kind for kind in lowered if kind not in COMPOSITION_KINDS]
    if bad or not lowered:
        raise ScoreError(f"The 'kinds' parameter must name composition kinds among 'q', 'k', 'v'. Got {kinds!r}.")
    return tuple(dict.fromkeys(lowered))


def _unit(factors: Tensor) -> Tensor:
    """Scale each head's factor ``[head, a, b]`` to unit Frobenius norm (zero heads stay zero)."""
    norms = factors.flatten(1).norm(dim=1).clamp_min(torch.finfo(factors.dtype).tiny)
    return factors / norms[:, None, None]


def _kv_r_factor(model: HeadModelLike, key: str, layer: int) -> Tensor:
    """``R`` of each key/value head's ``W_K`` or ``W_V``, repeated to its query heads: one QR a
    group (SmolLM2's 9 heads share 3)."""
    return expand_kv_heads(r_factor(kv_layer_weight(model, key, layer)), int(model.n_heads))


def _left_factor(model: HeadModelLike, layer: int) -> Tensor:
    """``P = R_V W_O`` ``[head, d_head, d_model]``: ``P^T P = W_OV^T W_OV``, unit norm."""
    return _unit(_kv_r_factor(model, "W_V", layer) @ _f32(layer_weight(model, "W_O", layer)))


def _right_factor(model: HeadModelLike, layer: int, kind: str) -> Tensor:
    """``T`` ``[head, d_model, d_head]`` with ``T T^T = W_B W_B^T`` for the kind, unit norm."""
    if kind == "q":  # W_QK W_QK^T = W_Q (W_K^T W_K) W_Q^T
        factor = _f32(layer_weight(model, "W_Q", layer)) @ _kv_r_factor(model, "W_K", layer).mT
    elif kind == "k":  # W_QK^T W_QK = W_K (W_Q^T W_Q) W_K^T
        factor = _f32(layer_weight(model, "W_K", layer)) @ r_factor(layer_weight(model, "W_Q", layer)).mT
    else:  # W_OV W_OV^T = W_V (W_O W_O^T) W_V^T
        factor = _f32(layer_weight(model, "W_V", layer)) @ r_factor(layer_weight(model, "W_O", layer).mT).mT
    return _unit(factor)


class _Packer:
    """Symmetric Gram matrices ``F^T F`` (``F: [n, r, d]``) packed as their upper block rows.

    ``<G, H>_F = sum_i <G_ii, H_ii> + 2 sum_{i<j} <G_ij, H_ij>`` over ``_PACK_BLOCKS`` x
    ``_PACK_BLOCKS`` blocks of the ``d x d`` matrix: the left side carries the weights (1 on the
    diagonal blocks, 2 off them), so a plain dot product of packed vectors is ``<G, H>_F``.
    Block row ``i`` (rows ``r0:r1``, columns ``r0:d``) is one product ``F[:, :, r0:r1]^T
    F[:, :, r0:]``, written straight into a matrix of its own, a segment ``[rows, (r1 - r0)
    (d - r0)]``: a layer's rows are contiguous there, so the product needs no copy. The whole
    Gram matrix with its blocks copied out took twice as long (SmolLM2: 5 -> 2.5 ms a layer)
    and held an unpacked layer on top. ``36/64`` of ``d^2`` numbers against the exact upper
    triangle's ``d (d + 1) / 2``, whose gather cost 1.5 ns a number.
    """

    def __init__(self, d: int):
        step = -(-d // _PACK_BLOCKS)
        self.edges = [(a, min(d, a + step)) for a in range(0, d, step)]
        self.widths = [(r1 - r0) * (d - r0) for r0, r1 in self.edges]
        self.size = sum(self.widths)  # numbers a packed matrix holds

    def empty(self, rows: int, device: torch.device, dtype: torch.dtype = torch.float32) -> list[Tensor]:
        """Room for ``rows`` packed matrices: the segments ``[rows, width]``, one allocation."""
        flat = torch.empty(rows * self.size, dtype=dtype, device=device)
        segments, at = [], 0
        for width in self.widths:
            segments.append(flat[at : at + rows * width].view(rows, width))
            at += rows * width
        return segments

    def pack(self, factors: Tensor, segments: list[Tensor], at: int, *, weighted: bool) -> None:
        """Writes the packed ``F^T F`` of ``factors`` ``[n, r, d]`` into rows ``at:at + n``."""
        n, d = factors.shape[0], factors.shape[2]
        for (r0, r1), segment in zip(self.edges, segments):
            part = segment[at : at + n].view(n, r1 - r0, d - r0)
            torch.matmul(factors[:, :, r0:r1].mT, factors[:, :, r0:], out=part)
            if weighted:
                part[:, :, r1 - r0 :].mul_(2.0)

    @staticmethod
    def inner(left: list[Tensor], right: list[Tensor], rows: int) -> Tensor:
        """``[rows, right rows]``: the first ``rows`` left matrices dotted with every right one."""
        out = left[0][:rows] @ right[0].T
        for left_part, right_part in zip(left[1:], right[1:]):
            out.addmm_(left_part[:rows], right_part.T)
        return out


def composition_scores(
    model: HeadModelLike,
    *,
    kinds: Union[str, Sequence[str]] = COMPOSITION_KINDS,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Q-, K- and V-composition of every later head with every earlier head.

    Parameters
    ----------
    model
        A :class:`~headclass.loading.HeadModel` (or any object with ``W_Q, W_K, W_V, W_O``).
    kinds
        Which of ``"q"``, ``"k"``, ``"v"`` to compute (TransformerLens' modes ``Q``, ``K``, ``V``).
    memory_bytes
        Bound on the packed Gram matrices held at once (later heads of a block of layers, plus
        a group of up to 8 layers of earlier heads); one layer's factors come on top while it
        is being packed. Smaller values mean more passes (earlier layers are rebuilt once per
        block of later layers), never a different result.
    progress
        Show a progress bar over blocks of later layers.

    Returns
    -------
    dict[str, Tensor]
        ``{kind: Float[Tensor, "layer_a head_a layer_b head_b"]}``: the score of earlier head
        ``(layer_a, head_a)`` with later head ``(layer_b, head_b)``, zero where
        ``layer_a >= layer_b`` (the order of TransformerLens' ``all_composition_scores``).
    """
    kinds = _check_kinds(kinds)
    if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes <= 0:
        raise ScoreError(f"The 'memory_bytes' parameter must be a positive int. Got {memory_bytes!r}.")
    n_layers, n_heads, d_model = int(model.n_layers), int(model.n_heads), int(model.d_model)
    device = layer_weight(model, "W_O", 0).device
    out = torch.zeros(len(kinds), n_layers, n_heads, n_layers, n_heads)
    if n_layers < 2:
        return {kind: out[i] for i, kind in enumerate(kinds)}
    packer = _Packer(d_model)
    layer_bytes = n_heads * packer.size * 4
    # Later heads of `per_block` layers (all kinds) stay packed while earlier layers stream by
    # in groups of `per_group` layers; each streamed layer is rebuilt once per block. A group
    # shares one matrix product: one layer's few rows against the whole block read the block
    # from memory once per layer (SmolLM2 within the cards' budget: 1.3 s of products, 0.5 s
    # in groups of 5).
    per_group = max(1, min(_EARLIER_GROUP, n_layers - 1, memory_bytes // (layer_bytes * (len(kinds) + 1))))
    per_block = max(1, min(n_layers - 1, (memory_bytes - per_group * layer_bytes) // (layer_bytes * len(kinds))))
    blocks = range(1, n_layers, per_block)
    if progress:
        from tqdm.auto import tqdm

        blocks = tqdm(blocks, desc="composition", leave=False)
    # reuse_freed_memory: every block allocates the same Gram buffers again (headclass.heap)
    with torch.no_grad(), reuse_freed_memory():
        left = packer.empty(per_group * n_heads, device)  # one group of earlier layers
        for b0 in blocks:
            b1 = min(n_layers, b0 + per_block)
            right = packer.empty(len(kinds) * (b1 - b0) * n_heads, device)
            for i, (kind, layer) in enumerate((k, lb) for k in kinds for lb in range(b0, b1)):
                # [kind, layer_b, head_b] rows
                packer.pack(_right_factor(model, layer, kind).mT, right, i * n_heads, weighted=False)
            for g0 in range(0, b1 - 1, per_group):
                group = range(g0, min(b1 - 1, g0 + per_group))
                for i, la in enumerate(group):  # [layer_a, head_a] rows
                    packer.pack(_left_factor(model, la), left, i * n_heads, weighted=True)
                inner = packer.inner(left, right, len(group) * n_heads).clamp_min_(0.0).sqrt_()
                inner = inner.view(len(group), n_heads, len(kinds), b1 - b0, n_heads).permute(2, 0, 1, 3, 4).cpu()
                for i, la in enumerate(group):
                    lb0 = max(b0, la + 1)  # causal: only la < lb
                    out[:, la, :, lb0:b1] = inner[:, i, :, lb0 - b0 :]
                del inner
            del right
        del left
    return {kind: out[i].clamp_(max=1.0) for i, kind in enumerate(kinds)}


def top_k_composition_partners(
    scores: Union[Tensor, Mapping[str, Tensor]],
    layer: int,
    head: int,
    *,
    kind: str = "k",
    n: int = 5,
    direction: str = "earlier",
) -> "Any":
    """The strongest composition partners of one head, as a pandas DataFrame sorted by score.

    Parameters
    ----------
    scores
        The dict returned by :func:`composition_scores` (``kind`` picks the tensor), or one
        ``[layer_a, head_a, layer_b, head_b]`` tensor.
    layer, head
        The head whose partners are listed.
    kind
        ``"q"``, ``"k"`` or ``"v"``; with a single tensor it only labels the rows.
    n
        How many partners (fewer when fewer exist).
    direction
        ``"earlier"`` (default): the head is the later head ``B``; list the earlier heads it
        composes with (e.g. the previous-token heads an induction head's keys read).
        ``"later"``: the head is ``A``; list the later heads that read its output.

    Returns
    -------
    pandas.DataFrame
        Columns ``layer``, ``head``, ``score``, ``kind``, one row per partner, highest score first
        (empty for a layer-0 head looking for earlier partners).
    """
    import pandas as pd

    kind = _check_kinds(kind)[0]
    if isinstance(scores, Mapping):
        if kind not in scores:
            raise ScoreError(
                f"scores hold the kinds {sorted(scores)}, not {kind!r}; compute it with "
                f"composition_scores(model, kinds=[{kind!r}])."
            )
        grid = scores[kind]
    else:
        grid = scores
    if not isinstance(grid, Tensor) or grid.ndim != 4:
        raise ScoreError(
            f"scores must be a [layer, head, layer, head] tensor (or a dict of them); "
            f"got {type(grid).__name__} of shape {tuple(getattr(grid, 'shape', ()))}."
        )
    n_layers, n_heads = int(grid.shape[0]), int(grid.shape[1])
    if not (0 <= layer < n_layers and 0 <= head < n_heads):
        raise ScoreError(f"head L{layer}H{head} is outside the scores ({n_layers} layers x {n_heads} heads).")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ScoreError(f"The 'n' parameter must be an int >= 1. Got {n!r}.")
    if direction == "earlier":
        partners, layers = grid[:layer, :, layer, head], range(layer)
    elif direction == "later":
        partners, layers = grid[layer, head, layer + 1 :, :], range(layer + 1, n_layers)
    else:
        raise ScoreError(f"The 'direction' parameter must be 'earlier' or 'later'. Got {direction!r}.")
    rows = [(la, h, float(partners[i, h])) for i, la in enumerate(layers) for h in range(n_heads)]
    table = pd.DataFrame(rows, columns=["layer", "head", "score"])
    table = table.sort_values("score", ascending=False, kind="stable").head(n).reset_index(drop=True)
    table["kind"] = kind
    return table.astype({"layer": "int64", "head": "int64", "score": "float64"})
