"""The evidence behind each head's roles, gathered for its card (Elhage et al. 2021's "QK/OV entries").

A label is a claim; a head card (:mod:`headclass.report.cards`) shows why. Everything a card
shows that is not a table column is collected here, during :func:`headclass.classify`, and kept
as one plain, JSON-able document (:func:`head_evidence`), so the taxonomy holds no reference to
the model and ``read_json`` gives the cards back:

* **attention examples** (:class:`ExampleCollector`): an observer of the pattern scores' one
  hooked pass (:func:`headclass.scores.patterns.pattern_measurement`, ``observers=``). For
  each probe, layer and head it keeps a *bounded* top-k: per query the key it attends to most
  (away from the first position: queries ``q >= 1``, keys ``k >= 1``), the ``k`` strongest
  such (query, key) pairs over every sequence, merged chunk by chunk (``[head, k]`` tensors,
  never the pattern). Each example also keeps the query's ``n_preferred`` most attended keys
  (the first position included): what the query looks for.
* **a pattern sample**: the first sequence's first ``pattern_tokens`` tokens of the text probe
  (else the first probe), every head's ``[query, key]`` pattern on them (the card's heatmap).
* **what a head writes** (:func:`ov_token_effects`, from the weights): for a few source tokens,
  the direct effect on the logits of attending to them, ``x W_V W_O W_U`` with ``x`` the
  source's embedding (the effective embedding ``W_E + MLP0(W_E)`` when the model has a first
  MLP, as in Wang et al. 2022) at unit RMS, centred over the vocabulary: the tokens it raises
  and lowers most.
* **composition partners** (:func:`composition_partners`): each head's strongest Q-, K- and
  V-composition partners among earlier heads (:mod:`headclass.scores.composition`), when
  affordable (:data:`COMPOSITION_MAX_FLOPS`); otherwise the document says "not computed" and why.

The document (``version`` :data:`EVIDENCE_VERSION`)::

    {"version": 1, "settings": {...}, "tokens": {"<id>": "<string>"},
     "embedding": "effective" | "W_E", "composition": {"computed": bool, "reason": str},
     "pattern_prompt": {"probe": str, "tokens": [id, ...]},
     "heads": {"L<layer>H<head>": {
         "examples": {"<probe>": [{"seq", "query", "key", "weight", "offset", "relation",
                                   "query_token", "key_token", "context": [[start, [id...]]...],
                                   "prefers": [[key, key_token, weight], ...]}, ...]},
         "writes": [{"source": id, "raises": [[id, logit], ...], "lowers": [[id, logit], ...]}],
         "composition": {"q": [[layer, head, score], ...], "k": [...], "v": [...]} | null,
         "pattern": [[w, ...], ...]}}}          # row q holds keys 0..q

``relation`` names the attention-budget class of the key (:data:`headclass.scores.patterns.BUDGET_CLASSES`,
first match wins, ``delimiter`` left out): ``self``, ``previous``, ``local``, ``duplicate``
(an earlier copy of the query's token), ``induction`` (the token after an earlier copy) or ``other``.

Examples
--------
>>> collector = ExampleCollector(probes, model.n_layers, model.n_heads)
>>> pattern_measurement(model, probes, observers=[collector])
>>> doc = head_evidence(model, collector)
>>> doc["heads"]["L1H0"]["examples"]["repeated"][0]["relation"]
'induction'
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from headclass.errors import ScoreError
from headclass.heap import reuse_freed_memory
from headclass.loading.head_model import HeadModelLike, layer_weight
from headclass.probes import Probe, token_sample
from headclass.scores.weights import _VOCAB_BLOCK, _Scratch, _screen_dtype, _unembed_rows

__all__ = [
    "EVIDENCE_VERSION",
    "COMPOSITION_MAX_FLOPS",
    "ExampleCollector",
    "ov_token_effects",
    "composition_partners",
    "composition_cost",
    "head_evidence",
    "head_key",
    "token_strings",
]

#: Version of the evidence document.
EVIDENCE_VERSION = 1
#: Composition partners are computed only when ``3/2 (n_layers n_heads)^2 d_model^2`` (the
#: flops of :func:`~headclass.scores.composition.composition_scores`) stays below this (about
#: 10 s on a laptop CPU: GPT-2 small, 1.8e10, and SmolLM2-135M, 3.6e10, are below; GPT-2
#: medium, 2.3e11, and Qwen2.5-0.5B, 1.4e11, above: their cards say "not computed").
COMPOSITION_MAX_FLOPS = 5.0e10

# ov_token_effects: bytes of the float32 rows x W_V W_O multiplied with the vocabulary together
# (every layer of a 7B model: 28 layers x 28 heads x 6 sources x 3584 x 4 = 67 MB; a 70B model's
# go in chunks), and of one product's logits ([rows, _VOCAB_BLOCK]: 512 rows in bfloat16).
# Each block of W_U is converted once per chunk of layers, and the products have hundreds of
# rows instead of one layer's (Qwen2.5-1.5B: 72): token effects 2.8 -> 2.4 s on Qwen2.5-0.5B.
_EFFECT_ROWS_BYTES = 1 << 27
_EFFECT_LOGIT_BYTES = 1 << 24
# _exact_top: bytes of the candidates' gathered float32 unembedding columns at a time.
_EXACT_BYTES = 1 << 24


def head_key(layer: int, head: int) -> str:
    """``"L5H1"``: a head's key in the evidence document (and, as ``head-L5H1``, its card's id)."""
    return f"L{int(layer)}H{int(head)}"


class ExampleCollector:
    """Observer of the pattern pass that keeps each head's strongest attention examples.

    Call it as ``collector(layer, pattern, chunk)`` (what :func:`pattern_measurement`'s
    ``observers`` do) for every layer of every chunk, chunks of a probe in order.

    Parameters
    ----------
    probes
        The probes the pass runs (examples are kept per probe name).
    n_layers, n_heads
        The model's shape.
    n_examples
        Examples kept per probe and head (the bounded top-k).
    n_preferred
        Keys kept per example query (what it looks for).
    pattern_tokens
        Length of the pattern sample (first sequence of the text probe, else the first probe).
    """

    def __init__(
        self,
        probes: Sequence[Probe],
        n_layers: int,
        n_heads: int,
        *,
        n_examples: int = 5,
        n_preferred: int = 3,
        pattern_tokens: int = 16,
    ):
        self.probes = {p.name: p for p in probes}
        self.n_layers, self.n_heads = int(n_layers), int(n_heads)
        self.n_examples, self.n_preferred = int(n_examples), int(n_preferred)
        names = list(self.probes)
        self.sample_probe = "text" if "text" in self.probes else (names[0] if names else None)
        self.pattern_tokens = int(pattern_tokens)
        # (probe, layer) -> weight [head, k], seq, query, key [head, k], pref_key, pref_w [head, k, p]
        self._top: dict[tuple[str, int], dict[str, Tensor]] = {}
        self._sample: dict[int, Tensor] = {}  # layer -> [head, n, n] float32
        self._current: Optional[Probe] = None
        self._start = 0
        self._next: dict[str, int] = {}

    def __call__(self, layer: int, pattern: Tensor, chunk: Probe) -> None:
        if chunk is not self._current:  # a new chunk: its first sequence's index in its probe
            self._current = chunk
            self._start = self._next.get(chunk.name, 0)
            self._next[chunk.name] = self._start + chunk.n_sequences
        if chunk.name not in self.probes:
            return
        with torch.no_grad():
            self._examples(layer, pattern, chunk)
            if chunk.name == self.sample_probe and self._start == 0 and layer not in self._sample:
                n = min(self.pattern_tokens, chunk.n_positions)
                self._sample[layer] = pattern[0, :, :n, :n].float().clone()  # host copy: when read

    def _examples(self, layer: int, pattern: Tensor, chunk: Probe) -> None:
        b, h, n_q, n_k = pattern.shape
        if n_q < 2:
            return
        away = pattern[:, :, 1:, 1:]  # queries >= 1, keys >= 1
        best, where = away.max(-1)  # [b, h, q-1]
        flat = best.permute(1, 0, 2).reshape(h, -1)  # [h, b (q-1)]
        k = min(self.n_examples, flat.shape[1])
        weight, index = flat.topk(k, dim=1)  # [h, k]
        seq, query = index // (n_q - 1), index % (n_q - 1)
        heads = torch.arange(h, device=pattern.device)[:, None].expand(h, k)
        key = where.permute(1, 0, 2).reshape(h, -1).gather(1, index) + 1
        rows = pattern[seq, heads, query + 1]  # [h, k, keys]
        p = min(self.n_preferred, n_k)
        pref_w, pref_key = rows.topk(p, dim=-1)
        # Kept on the pattern's device (no host round trip inside the hook); read on the host.
        found = {
            "weight": weight.float(),
            "seq": seq + self._start,
            "query": query + 1,
            "key": key,
            "pref_key": pref_key,
            "pref_w": pref_w.float(),
        }
        slot = (chunk.name, int(layer))
        old = self._top.get(slot)
        if old is not None:  # merge with the examples of the earlier chunks, keep the top k
            found = {name: torch.cat([old[name], value], 1) for name, value in found.items()}
            keep = found["weight"].topk(min(self.n_examples, found["weight"].shape[1]), dim=1).indices
            found = {
                name: value.gather(1, keep if value.ndim == 2 else keep[..., None].expand(-1, -1, value.shape[2]))
                for name, value in found.items()
            }
        self._top[slot] = found

    # -- results ---------------------------------------------------------------------------
    def _host_top(self, slot: tuple[str, int]) -> Optional[dict[str, Tensor]]:
        """A slot's kept examples on the host, moved there once (the pass kept them on its device)."""
        found = self._top.get(slot)
        if found is not None and found["weight"].device.type != "cpu":
            found = self._top[slot] = {key: value.cpu() for key, value in found.items()}
        return found

    def examples(
        self, layer: int, head: int, *, context: int = 8, local_window: int = 4
    ) -> dict[str, list[dict[str, Any]]]:
        """The head's examples per probe (strongest first), as the evidence document holds them."""
        out: dict[str, list[dict[str, Any]]] = {}
        for name, probe in self.probes.items():
            top = self._host_top((name, int(layer)))
            if top is None:
                continue
            tokens = probe.tokens
            records = []
            order = top["weight"][head].argsort(descending=True, stable=True)
            for i in order.tolist():
                s, q, k = int(top["seq"][head, i]), int(top["query"][head, i]), int(top["key"][head, i])
                row = tokens[s]
                records.append(
                    {
                        "seq": s,
                        "query": q,
                        "key": k,
                        "weight": _round(top["weight"][head, i]),
                        "offset": q - k,
                        "relation": _relation(row, q, k, local_window),
                        "query_token": int(row[q]),
                        "key_token": int(row[k]),
                        "context": _context(row, q, k, context),
                        "prefers": [
                            [int(kk), int(row[int(kk)]), _round(w)]
                            for kk, w in zip(top["pref_key"][head, i], top["pref_w"][head, i])
                        ],
                    }
                )
            out[name] = records
        return out

    def pattern_sample(self) -> tuple[Optional[str], list[int], dict[int, Tensor]]:
        """``(probe name, token ids, {layer: [head, n, n]})`` of the pattern sample."""
        if self.sample_probe is None or not self._sample:
            return None, [], {}
        n = next(iter(self._sample.values())).shape[-1]
        ids = [int(t) for t in self.probes[self.sample_probe].tokens[0, :n]]
        return self.sample_probe, ids, {layer: sample.cpu() for layer, sample in self._sample.items()}


def _round(value: Any, digits: int = 4) -> float:
    value = float(value)
    return round(value, digits) if math.isfinite(value) else 0.0


def _relation(row: Tensor, q: int, k: int, window: int) -> str:
    """The key's attention-budget class for query ``q`` (first match wins; no delimiter class)."""
    if k == q:
        return "self"
    if k == q - 1:
        return "previous"
    if q - window <= k <= q - 2:
        return "local"
    if int(row[k]) == int(row[q]):
        return "duplicate"
    if k >= 1 and int(row[k - 1]) == int(row[q]):
        return "induction"
    return "other"


def _context(row: Tensor, q: int, k: int, width: int) -> list[list[Any]]:
    """Token spans around the key and the query (one span when they are close): ``[[start, ids]]``."""
    n = int(row.shape[0])
    lo, hi = max(0, k - width), min(n, q + width + 1)
    if q - k <= 2 * width:
        spans = [(lo, hi)]
    else:
        spans = [(lo, min(n, k + width + 1)), (max(0, q - width), hi)]
    return [[start, [int(t) for t in row[start:stop]]] for start, stop in spans]


# -- what a head writes -------------------------------------------------------------------------


def _source_tokens(model: HeadModelLike, probes: dict[str, Probe], n: int) -> Tensor:
    """A few source tokens: distinct ordinary tokens of the text probe's first sequence (words a
    reader knows), else a seeded sample of ordinary tokens."""
    special = set(model.special_token_ids()) if hasattr(model, "special_token_ids") else set()
    text = probes.get("text")
    if text is not None:
        seen: list[int] = []
        for t in text.tokens[0].tolist():
            if t not in special and t not in seen:
                seen.append(int(t))
            if len(seen) == n:
                return torch.tensor(seen, dtype=torch.long)
    return token_sample(model, n, seed=0)[:n]


def _source_embedding(model: HeadModelLike, tokens: Tensor) -> tuple[Tensor, str]:
    """The sources' embeddings, effective (through the first MLP) when the model has one."""
    method = getattr(model, "effective_embedding", None)
    if method is not None:
        try:
            return method(tokens=tokens).float(), "effective"
        except (ScoreError, TypeError, AttributeError):
            pass
    return model.W_E[tokens.to(model.W_E.device)].float(), "W_E"


def _merge_top(running: Optional[tuple[Tensor, Tensor]], block: Any, start: int, k: int) -> tuple[Tensor, Tensor]:
    """The running top ``k`` (values, vocabulary ids; None before the first block) merged with a
    block's ``topk`` (ids from ``start``)."""
    block_values, block_index = block.values, block.indices + start
    if running is None:
        return block_values, block_index
    values, index = torch.cat([running[0], block_values], -1), torch.cat([running[1], block_index], -1)
    best = values.topk(k, dim=-1)
    return best.values, index.gather(-1, best.indices)


def _exact_top(written: Tensor, W_U: Tensor, candidates: Tensor, k: int, *, largest: bool) -> tuple[Tensor, Tensor]:
    """The top ``k`` (or bottom, as negated values) of float32 logits among ``candidates``:
    ``written`` ``[row, d_model]``, ``candidates`` ``[row, m]`` vocabulary ids. The candidates'
    unembedding columns are gathered along memory (:func:`~headclass.scores.weights._unembed_rows`),
    ``_EXACT_BYTES`` of them at a time."""
    m = int(candidates.shape[1])
    step = max(1, _EXACT_BYTES // (4 * m * int(written.shape[1])))
    values, ids = [], []
    for a in range(0, int(candidates.shape[0]), step):
        chosen = candidates[a : a + step]
        columns = _unembed_rows(W_U, chosen.flatten()).view(*chosen.shape, -1)  # [rows, m, d_model]
        logits = (columns * written[a : a + step, None, :]).sum(-1)
        best = (logits if largest else -logits).topk(k, dim=-1)
        values.append(best.values)
        ids.append(chosen.gather(-1, best.indices))
    return torch.cat(values), torch.cat(ids)


def ov_token_effects(model: HeadModelLike, tokens: Tensor, *, n: int = 5) -> tuple[dict[tuple[int, int], list], str]:
    """Per head, the tokens its OV circuit raises and lowers most for each source token.

    Returns ``({(layer, head): [{"source", "raises", "lowers"}, ...]}, embedding)`` with
    ``raises`` / ``lowers`` lists of ``[token id, centred logit]`` (largest effect first) and
    ``embedding`` ``"effective"`` or ``"W_E"`` (see the module docs). The rows ``x W_V W_O``
    of as many layers as ``_EFFECT_ROWS_BYTES`` holds (every layer, up to 7B models) meet
    each block of vocabulary together (``[row, block]`` logits, at most ``_EFFECT_LOGIT_BYTES``,
    the running top ``4 n`` kept), in bfloat16 where the CPU multiplies it in hardware; those
    candidates are ranked again with float32 logits, which give the values. Each block of
    ``W_U`` is converted once per such chunk of layers: no copy of the whole is made.
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    with torch.no_grad():
        x, embedding = _source_embedding(model, tokens)
        x = x - x.mean(-1, keepdim=True)
        x = x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)  # unit RMS, like a norm
        W_U = model.W_U  # model dtype: never a float32 copy of the whole
        n_layers, n_heads, n_sources = int(model.n_layers), int(model.n_heads), int(tokens.numel())
        d_model, n_vocab = int(W_U.shape[0]), int(W_U.shape[1])
        k = min(n, n_vocab)
        pool = min(n_vocab, 4 * k)  # candidates per row from the screen, ranked again exactly
        column_mean = torch.zeros(d_model, dtype=torch.float32, device=W_U.device)
        for start in range(0, n_vocab, _VOCAB_BLOCK):
            column_mean += W_U[:, start : start + _VOCAB_BLOCK].float().sum(1)
        column_mean /= n_vocab
        # The vocabulary-wide products in the screen's dtype (bfloat16 on CPUs that multiply it
        # in hardware, several times faster); the few candidates of each row are then recomputed
        # in float32. W_U is read (converted, or upcast for a float32 screen) block by block.
        screen_dtype = _screen_dtype(W_U.device)
        per_chunk = max(1, _EFFECT_ROWS_BYTES // (4 * n_heads * n_sources * d_model))  # layers at a time
        out: dict[tuple[int, int], list] = {}
        scratch = _Scratch()
        for first in range(0, n_layers, per_chunk):
            layers = range(first, min(n_layers, first + per_chunk))
            written = torch.cat(
                [
                    torch.einsum("sd,hde->hse", x, layer_weight(model, "W_V", layer).float())
                    @ layer_weight(model, "W_O", layer).float()
                    for layer in layers
                ]
            ).flatten(0, 1)  # [layer, head, source] rows, d_model
            left = written.to(screen_dtype)
            # rows a product at a time: [rows, _VOCAB_BLOCK] logits of _EFFECT_LOGIT_BYTES
            # (topk costs less a logit along wide blocks: 0.7 ns at 16384, 1.2 at 4096)
            step = max(1, _EFFECT_LOGIT_BYTES // (left.element_size() * _VOCAB_BLOCK))
            spans = [slice(a, a + step) for a in range(0, int(written.shape[0]), step)]
            ups: list[Optional[tuple[Tensor, Tensor]]] = [None] * len(spans)  # running top, ids
            downs: list[Optional[tuple[Tensor, Tensor]]] = [None] * len(spans)
            # The blocks' products reuse their freed memory (headclass.heap); the rows above are
            # built outside it: layer after layer of kept rows among freed weight copies left
            # the heap fragmented (+0.1 GB on SmolLM2 and Qwen2.5-0.5B in bfloat16).
            with reuse_freed_memory():
                for start in range(0, n_vocab, _VOCAB_BLOCK):
                    block = W_U[:, start : start + _VOCAB_BLOCK].to(screen_dtype)  # converted once
                    width = int(block.shape[1])
                    take = min(pool, width)
                    for i, span in enumerate(spans):
                        rows = left[span]
                        # one buffer for every product, negated in place: fresh 16 MB blocks
                        # each time fragment the heap too (Qwen2.5-1.5B bfloat16: +0.2 GB)
                        logits = scratch.take(int(rows.shape[0]), width, rows.dtype, rows.device)
                        torch.matmul(rows, block, out=logits)  # [rows, block]
                        ups[i] = _merge_top(ups[i], logits.topk(take, dim=-1), start, pool)
                        downs[i] = _merge_top(downs[i], logits.neg_().topk(take, dim=-1), start, pool)
            up_i = torch.cat([top[1] for top in ups if top is not None])
            down_i = torch.cat([top[1] for top in downs if top is not None])
            mean = written @ column_mean  # [row]: each logit row's mean, to centre it
            up_v, up_i = _exact_top(written, W_U, up_i, k, largest=True)
            down_v, down_i = _exact_top(written, W_U, down_i, k, largest=False)  # values: -logit
            # centred: raises by logit - mean, lowers by how far below the mean (positive)
            up_v, down_v = up_v - mean[:, None], down_v + mean[:, None]
            shape = (len(layers), n_heads, n_sources, k)
            raises_i, raises_v = up_i.view(shape).tolist(), up_v.view(shape).tolist()
            lowers_i, lowers_v = down_i.view(shape).tolist(), down_v.view(shape).tolist()
            sources = tokens.tolist()
            for at, layer in enumerate(layers):
                for head in range(n_heads):
                    up = zip(raises_i[at][head], raises_v[at][head])
                    down = zip(lowers_i[at][head], lowers_v[at][head])
                    out[layer, head] = [
                        {
                            "source": int(src),
                            "raises": [[i, _round(v)] for i, v in zip(*raised)],
                            "lowers": [[i, _round(-v)] for i, v in zip(*lowered)],
                        }
                        for src, raised, lowered in zip(sources, up, down)
                    ]
    return out, embedding


# -- composition --------------------------------------------------------------------------------


def composition_cost(model: HeadModelLike) -> float:
    """Flops of :func:`~headclass.scores.composition.composition_scores` (all three kinds)."""
    heads = int(model.n_layers) * int(model.n_heads)
    return 1.5 * heads * heads * float(model.d_model) ** 2


def composition_partners(model: HeadModelLike, *, n: int = 5) -> dict[tuple[int, int], dict[str, list]]:
    """Each head's ``n`` strongest Q-, K- and V-composition partners among earlier heads:
    ``{(layer, head): {"q": [[layer_a, head_a, score], ...], "k": ..., "v": ...}}``."""
    from headclass.scores.composition import composition_scores

    # The cards are a side dish: their Gram matrices (float32) may take as many bytes as the
    # model has parameters, a quarter of its float32 size (more passes, the same scores; SmolLM2:
    # as fast as with 2 GiB), not the 2 GiB composition_scores allows by default.
    budget = max(1 << 26, int(getattr(model, "n_params", 0) or 0))
    scores = composition_scores(model, memory_bytes=budget)
    L, H = int(model.n_layers), int(model.n_heads)
    out: dict[tuple[int, int], dict[str, list]] = {(lb, hb): {} for lb in range(L) for hb in range(H)}
    for kind, grid in scores.items():
        for lb in range(L):
            earlier = grid[:lb, :, lb, :].reshape(lb * H, H)  # [earlier head, head_b]
            k = min(n, lb * H)
            if k == 0:
                for hb in range(H):
                    out[lb, hb][kind] = []
                continue
            value, index = earlier.topk(k, dim=0)  # [k, head_b]
            for hb in range(H):
                out[lb, hb][kind] = [[int(i) // H, int(i) % H, _round(v)] for i, v in zip(index[:, hb], value[:, hb])]
    return out


# -- the document -------------------------------------------------------------------------------


def head_evidence(
    model: HeadModelLike,
    collector: ExampleCollector,
    *,
    n_sources: int = 6,
    n_effects: int = 5,
    context: int = 8,
    local_window: int = 4,
    composition: Optional[bool] = None,
) -> dict[str, Any]:
    """The evidence document of every head (module docs), from a collector that saw the pass.

    ``composition``: ``None`` computes the partners when affordable
    (:func:`composition_cost` <= :data:`COMPOSITION_MAX_FLOPS`), ``True`` always, ``False`` never.
    """
    L, H = int(model.n_layers), int(model.n_heads)
    used: set[int] = set()
    sources = _source_tokens(model, collector.probes, n_sources)
    writes, embedding = ov_token_effects(model, sources, n=n_effects)
    cost = composition_cost(model)
    if composition is None:
        composition = cost <= COMPOSITION_MAX_FLOPS
        reason = (
            ""
            if composition
            else f"not computed: {cost:.1e} flops for {L * H} heads of width {int(model.d_model)} is above "
            f"COMPOSITION_MAX_FLOPS ({COMPOSITION_MAX_FLOPS:.0e}); use "
            "headclass.scores.composition.composition_scores(model)"
        )
    else:
        reason = "" if composition else "not computed (composition=False)"
    partners = composition_partners(model) if composition and L > 1 else {}
    if composition and L <= 1:
        reason = "no earlier heads (one layer)"
    probe, prompt, sample = collector.pattern_sample()
    used.update(prompt)
    heads: dict[str, Any] = {}
    for layer in range(L):
        for head in range(H):
            examples = collector.examples(layer, head, context=context, local_window=local_window)
            for records in examples.values():
                for ex in records:
                    for _, ids in ex["context"]:
                        used.update(ids)
                    used.update(p[1] for p in ex["prefers"])
            effects = writes[layer, head]
            for effect in effects:
                used.add(effect["source"])
                used.update(i for i, _ in effect["raises"] + effect["lowers"])
            grid = sample.get(layer)
            pattern = (
                [[_round(w, 3) for w in grid[head, q, : q + 1].tolist()] for q in range(grid.shape[1])]
                if grid is not None
                else []
            )
            heads[head_key(layer, head)] = {
                "examples": examples,
                "writes": effects,
                "composition": partners.get((layer, head)) if partners else None,
                "pattern": pattern,
            }
    return {
        "version": EVIDENCE_VERSION,
        "settings": {
            "n_examples": collector.n_examples,
            "n_preferred": collector.n_preferred,
            "context": context,
            "n_sources": int(sources.numel()),
            "n_effects": n_effects,
        },
        "tokens": token_strings(model, sorted(used)),
        "embedding": embedding,
        "composition": {"computed": bool(partners), "reason": reason},
        "pattern_prompt": {"probe": probe, "tokens": prompt},
        "heads": heads,
    }


def token_strings(model: HeadModelLike, ids: Sequence[int]) -> dict[str, str]:
    """``{"<id>": readable string}`` (newlines as ``\\n``; the id itself without a tokenizer)."""
    tok = getattr(model, "tokenizer", None)
    out = {}
    for i in ids:
        piece = str(i)
        if tok is not None:
            try:
                piece = tok.decode([int(i)])
            except Exception:  # any tokenizer failure: show the id
                piece = str(i)
            piece = piece.replace("\n", "\\n").replace("\t", "\\t") or f"[{i}]"
        out[str(int(i))] = piece
    return out
