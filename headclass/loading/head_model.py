"""``HeadModel``: the one interface every score and classifier sees.

A HeadModel wraps a TransformerLens model of either generation (a ``TransformerBridge`` in
compatibility mode on TransformerLens >= 4, a ``HookedTransformer`` on 2.x/3.x) and exposes

* shapes: ``n_layers``, ``n_heads``, ``d_model``, ``d_head``, ``d_vocab``, ``n_key_value_heads``;
* processed per-head weights (LayerNorm folded, writing weights centred, as HookedTransformer
  does at load time): ``W_Q, W_K, W_V`` ``[layer, head, d_model, d_head]`` and ``W_O``
  ``[layer, head, d_head, d_model]``, grouped-query key/value heads expanded to one per query
  head; ``W_E`` ``[d_vocab, d_model]``, ``W_U`` ``[d_model, d_vocab]``, ``W_pos``
  ``[n_ctx, d_model]`` or ``None`` for rotary / no positional embedding;
* tokens: ``tokenizer``, ``bos_token_id``, ``prepends_bos``, :meth:`to_tokens`;
* :meth:`run_with_patterns`: one forward pass during which a callback receives each layer's
  attention pattern ``[batch, head, query, key]`` as it is computed, so scores are reduced
  inside the hook and no cache of all layers is ever held;
* :meth:`effective_embedding` (``W_E + MLP0(LN2(W_E))``), :attr:`b_U`, :meth:`has_hook`, so
  scores never reach into the TransformerLens model;
* ``tl_model``: the underlying TransformerLens model, for power users (``run_with_hooks`` etc.).

Tests may pass any object with the same attributes (see :class:`HeadModelLike`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Protocol, Sequence, Union, runtime_checkable

import torch
from torch import Tensor

from headclass.errors import ProbeError, ScoreError
from headclass.loading.tokens import check_token_ids

__all__ = [
    "HeadModel",
    "HeadModelLike",
    "PatternCallback",
    "hook_name",
    "check_finite_weights",
    "layer_weight",
    "kv_layer_weight",
    "query_heads_per_kv_head",
    "expand_kv_heads",
]

_FROM_TL_MODEL = object()

#: Receives ``(layer, pattern)`` with ``pattern`` of shape ``[batch, head, query, key]``.
PatternCallback = Callable[[int, Tensor], None]


def hook_name(layer: int, name: str) -> str:
    """TransformerLens hook name of a layer's hook point, e.g. ``blocks.3.attn.hook_pattern``."""
    if name in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out"):
        return f"blocks.{layer}.{name}"
    return f"blocks.{layer}.attn.{name}"


@runtime_checkable
class HeadModelLike(Protocol):
    """What scores rely on. :class:`HeadModel` implements it; tests may fake it."""

    name: str
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_vocab: int

    def run_with_patterns(
        self, tokens: Tensor, callback: PatternCallback, *, layers: Optional[Iterable[int]] = None
    ) -> None: ...

    @property
    def b_U(self) -> Optional[Tensor]: ...

    # processed weights, as HeadModel documents them (the weight scores read these)
    @property
    def W_Q(self) -> Tensor: ...

    @property
    def W_K(self) -> Tensor: ...

    @property
    def W_V(self) -> Tensor: ...

    @property
    def W_O(self) -> Tensor: ...

    @property
    def W_E(self) -> Tensor: ...

    @property
    def W_U(self) -> Tensor: ...

    @property
    def W_pos(self) -> Optional[Tensor]: ...

    @property
    def tokenizer(self) -> Any: ...

    def has_hook(self, name: str) -> bool: ...

    def effective_embedding(self, chunk_size: int = 4096, *, tokens: Optional[Tensor] = None) -> Tensor: ...


class _PatternsDone(Exception):
    """Raised by the last requested layer's pattern hook to end the forward pass there."""


#: The per-head attention weights :func:`layer_weight` serves one layer at a time.
HEAD_WEIGHTS = ("W_Q", "W_K", "W_V", "W_O")

#: Those of them that grouped-query heads share, which :func:`kv_layer_weight` serves unexpanded.
KV_WEIGHTS = ("W_K", "W_V")


def layer_weight(model: HeadModelLike, key: str, layer: int) -> Tensor:
    """One layer of a per-head weight, ``getattr(model, key)[layer]``, without stacking every layer.

    ``key`` is one of :data:`HEAD_WEIGHTS`: ``[head, d_model, d_head]`` (``W_Q, W_K, W_V``, GQA
    heads expanded) or ``[head, d_head, d_model]`` (``W_O``). A :class:`HeadModel` builds it from
    that layer's own parameters, so that scores reading layer after layer never hold a second
    copy of the attention weights (all four stacked and expanded: 0.3x of SmolLM2's weights,
    0.12x of Qwen2.5-0.5B's, 0.3x of a Llama-7B's). Other models (test fakes) are indexed.
    """
    per_layer = getattr(model, "layer_weight", None)
    return per_layer(key, layer) if callable(per_layer) else getattr(model, key)[layer]


def kv_layer_weight(model: HeadModelLike, key: str, layer: int) -> Tensor:
    """One layer of ``W_K`` or ``W_V`` with grouped-query heads not expanded, ``[kv_head, d_model, d_head]``.

    Query head ``h`` reads key/value head ``h // query_heads_per_kv_head(n_heads, kv_head)``, as
    :func:`layer_weight` expands them; a score that computes per key/value head and expands its
    (small) result does ``n_heads / kv_head`` times less work and copies no weight. Models
    without grouped-query attention, and other models than :class:`HeadModel` (test fakes),
    give :func:`layer_weight`'s ``[head, d_model, d_head]``: every head its own group.
    """
    if key not in KV_WEIGHTS:
        raise KeyError(f"kv_layer_weight serves W_K and W_V, not {key!r}")
    per_layer = getattr(model, "kv_layer_weight", None)
    return per_layer(key, layer) if callable(per_layer) else layer_weight(model, key, layer)


def query_heads_per_kv_head(n_heads: int, n_kv: int) -> int:
    """Query heads that share one key/value head (1 without grouped-query attention): query
    head ``h`` reads key/value head ``h // query_heads_per_kv_head(n_heads, n_kv)``."""
    if n_heads % n_kv:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_key_value_heads={n_kv}")
    return n_heads // n_kv


def expand_kv_heads(per_kv_head: Tensor, n_heads: int, dim: int = 0) -> Tensor:
    """Repeat grouped-query key/value heads along ``dim`` so that query head ``h`` gets key/value
    head ``h // query_heads_per_kv_head(n_heads, n_kv)``: ``[kv_head, ...]`` -> ``[head, ...]``
    (weights, or a score's per-key/value-head result). Matches the ``repeat_interleave``
    TransformerLens and Hugging Face use in grouped-query attention; returned as is without it."""
    group = query_heads_per_kv_head(n_heads, per_kv_head.shape[dim])
    return per_kv_head if group == 1 else per_kv_head.repeat_interleave(group, dim=dim)


def _pattern_check(pattern: Tensor, sinks: bool = False) -> tuple[Tensor, Tensor]:
    """``(sums, bad)``, both ``[batch, head, query]``: a pattern's row sums in float32 (NaN / inf
    propagate) and the rows that are not finite or do not sum to 1 within a tolerance for its
    dtype (with attention sinks, GPT-OSS: to a share in (0, 1]). Device ops only, no host sync:
    it runs inside the pattern hooks; :func:`_check_patterns` reads the results afterwards."""
    sums = pattern.detach().sum(dim=-1, dtype=torch.float32)
    tol = 1e-3 if pattern.dtype in (torch.float32, torch.float64) else 2e-2
    if sinks:  # a learned sink logit takes part of each row's mass
        return sums, ~((sums > 0) & (sums <= 1 + tol))  # also True for NaN sums
    return sums, ~((sums - 1).abs() <= tol)


def _check_patterns(checks: dict[int, tuple[Tensor, Tensor]], name: str) -> None:
    """Raise ScoreError naming the first layer (and head) whose :func:`_pattern_check` found a
    broken row; one host sync for all layers, after the pass."""
    if not checks:
        return
    with torch.no_grad():
        layers = sorted(checks)
        flags = torch.stack([checks[layer][1].any() for layer in layers]).cpu()
        for layer, flag in zip(layers, flags.tolist()):
            if not flag:
                continue
            sums, bad = checks[layer]
            head = int(bad.any(dim=0).any(dim=-1).nonzero()[0, 0])
            worst = sums[:, head][bad[:, head]]
            what = (
                f"has rows that do not sum to 1 (e.g. {float(worst[0]):.4g})"
                if bool(torch.isfinite(worst).all())
                else "is not finite (NaN or inf)"
            )
            raise ScoreError(
                f"model {name!r}: the attention pattern of layer {layer} head {head} {what}; the model "
                "produces non-finite or broken activations there (check its weights and dtype: float16 "
                "can overflow, use --dtype float32). No table was made."
            )


def check_finite_weights(model: "HeadModelLike") -> None:
    """Raise ScoreError naming the first layer (and head) with a NaN or inf weight.

    The attention weights ``W_Q, W_K, W_V, W_O`` are checked per head, a layer at a time
    (:func:`layer_weight`: no stacked copy); every other parameter of the TransformerLens model
    (MLPs, norms, embeddings), when there is one, by name. One host sync per tensor.
    :func:`headclass.load_model` calls it on every model it returns.
    """
    with torch.no_grad():
        for layer in range(model.n_layers):
            for key in HEAD_WEIGHTS:
                read = kv_layer_weight if key in KV_WEIGHTS else layer_weight  # grouped-query heads unexpanded
                weight = read(model, key, layer).flatten(start_dim=1)
                # any NaN / inf makes a head's float32 sum non-finite; only then (or on an
                # overflowing sum) the exact check: isfinite's bool copy cost 0.8 s of a 1.5B's load
                finite = torch.isfinite(weight.sum(dim=-1, dtype=torch.float32))  # [head]
                if not bool(finite.all()):
                    finite = torch.isfinite(weight).all(dim=-1)
                if not bool(finite.all()):
                    head = int((~finite).nonzero()[0, 0]) * query_heads_per_kv_head(model.n_heads, weight.shape[0])
                    raise ScoreError(
                        f"model {model.name!r} has non-finite weights (NaN or inf): {key} of layer "
                        f"{layer} head {head}. Fix or re-download the checkpoint; no table was made."
                    )
        tl_model = getattr(model, "tl_model", None)
        named = tl_model.named_parameters() if tl_model is not None and hasattr(tl_model, "named_parameters") else ()
        for pname, param in named:
            if not _all_finite(param):
                import re

                pname = pname.replace("_original_component.", "").replace("original_component.", "")
                found = re.search(r"(?:^|\.)(?:blocks|h|layers)\.(\d+)\.", pname)
                where = f"layer {found.group(1)} ({pname})" if found else pname
                raise ScoreError(
                    f"model {model.name!r} has non-finite weights (NaN or inf) in {where}. Fix or "
                    "re-download the checkpoint; no table was made."
                )


def _all_finite(tensor: Tensor) -> bool:
    """Every element finite, without tensor-sized temporaries (``isfinite`` of a float32
    ``W_U`` held ~1.7x its size, and a float32 sum of a bfloat16 one converts it whole): any
    NaN / inf makes the chunked float32 sum non-finite; a non-finite sum (or an overflow) is
    then checked exactly, in chunks."""
    if not tensor.is_floating_point():
        return True
    chunks = tensor.detach().reshape(-1).split(1 << 22)  # sum(dtype=float32) of a bf16 tensor copies it whole
    if bool(torch.isfinite(sum(chunk.sum(dtype=torch.float32) for chunk in chunks))):
        return True
    return all(bool(torch.isfinite(chunk).all()) for chunk in chunks)


def _published_parameter_count(config: Any) -> Optional[int]:
    """Parameters of the Hugging Face model ``config`` describes, counted on the meta device."""
    try:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return int(AutoModelForCausalLM.from_config(config).num_parameters())
    except Exception:  # an architecture transformers cannot build from its config alone
        return None


class HeadModel:
    """A TransformerLens model seen as a grid of attention heads.

    Build one with :func:`headclass.load_model`; the constructor only stores.

    Parameters
    ----------
    tl_model
        A ``TransformerBridge`` (with ``enable_compatibility_mode()`` applied) or a
        ``HookedTransformer`` with processed weights.
    name
        A display name (the source the user gave, or the alias).
    backend
        ``"bridge"`` (TransformerLens >= 4) or ``"hooked"`` (TransformerLens 2.x/3.x).
    source_kind
        How it was loaded: ``hub``, ``folder``, ``gguf``, ``object``, ``alias``.
    tokenizer
        The user-facing tokenizer; by default the TransformerLens model's. ``None`` for models
        saved without one (TransformerLens 4 is then given a placeholder it requires, which is
        never shown to users).
    bos_token_id
        BOS id from the Hugging Face config, used when there is no tokenizer.
    hf_config
        The Hugging Face config the model was built from, when known (for :attr:`n_params`).
    """

    def __init__(
        self,
        tl_model: Any,
        *,
        name: str,
        backend: str,
        source_kind: str = "object",
        tokenizer: Any = _FROM_TL_MODEL,
        bos_token_id: Optional[int] = None,
        hf_config: Any = None,
    ):
        self.tl_model = tl_model
        self.name = name
        self.backend = backend
        self.source_kind = source_kind
        self._tokenizer = getattr(tl_model, "tokenizer", None) if tokenizer is _FROM_TL_MODEL else tokenizer
        self._bos_token_id = bos_token_id
        self._hf_config = hf_config
        self._n_params: Optional[int] = None
        self._weights: dict[str, Optional[Tensor]] = {}

    # -- shapes ----------------------------------------------------------------------------
    @property
    def cfg(self) -> Any:
        """The TransformerLens config object (``HookedTransformerConfig`` or bridge config)."""
        return self.tl_model.cfg

    @property
    def n_layers(self) -> int:
        return int(self.cfg.n_layers)

    @property
    def n_heads(self) -> int:
        return int(self.cfg.n_heads)

    @property
    def d_model(self) -> int:
        return int(self.cfg.d_model)

    @property
    def d_head(self) -> int:
        return int(self.cfg.d_head)

    @property
    def d_vocab(self) -> int:
        return int(self.cfg.d_vocab)

    @property
    def n_ctx(self) -> int:
        return int(self.cfg.n_ctx)

    @property
    def n_key_value_heads(self) -> int:
        """Key/value heads per layer (< n_heads for grouped-query attention)."""
        n_kv = getattr(self.cfg, "n_key_value_heads", None)
        return int(n_kv) if n_kv else self.n_heads

    @property
    def positional_embedding_type(self) -> str:
        """``standard`` (learned absolute, GPT-2), ``rotary``, ``shortformer``, ..."""
        return str(getattr(self.cfg, "positional_embedding_type", "standard"))

    @property
    def architecture(self) -> str:
        return str(getattr(self.cfg, "original_architecture", None) or getattr(self.cfg, "architecture", "") or "")

    @property
    def device(self) -> torch.device:
        return self.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_E.dtype

    @property
    def n_params(self) -> int:
        """Number of parameters of the model as published (a tied embedding counted once).

        Counted on a copy of the Hugging Face architecture built on the meta device (no
        memory): the TransformerLens module is no guide, since its weight processing unties a
        tied ``W_U`` and the bridge keeps split and fused q/k/v copies (SmolLM2-135M would
        count 162.8M instead of 134.5M). Without a Hugging Face config, the TransformerLens
        module's parameters, less a tied unembedding.
        """
        if self._n_params is None:
            config = self._hf_config or getattr(getattr(self.tl_model, "original_model", None), "config", None)
            self._n_params = _published_parameter_count(config) if config is not None else None
            if self._n_params is None:
                total = int(sum(p.numel() for p in self.tl_model.parameters()))
                if bool(getattr(self.cfg, "tie_word_embeddings", False)):
                    total -= self.d_vocab * self.d_model
                self._n_params = total
        return self._n_params

    # -- weights ---------------------------------------------------------------------------
    def _weight(self, key: str) -> Optional[Tensor]:
        # Cached: the bridge rebuilds stacked weights on every attribute access.
        if key not in self._weights:
            with torch.no_grad():
                if key == "W_pos":
                    value = self._positional_weight()
                else:
                    value = getattr(self.tl_model, key).detach()
                    if key in ("W_K", "W_V", "b_K", "b_V"):
                        value = expand_kv_heads(value, self.n_heads, dim=1)  # [layer, kv_head, ...]
            self._weights[key] = value
        return self._weights[key]

    def layer_weight(self, key: str, layer: int) -> Tensor:
        """``getattr(self, key)[layer]`` from that layer's parameters alone (see :func:`layer_weight`).

        A view of the processed parameter (``W_Q``, ``W_O`` on both backends), grouped-query
        key/value heads expanded (copied) for this layer only; a view of the stacked tensor
        when a caller has built that already.
        """
        if key not in HEAD_WEIGHTS:
            raise KeyError(f"layer_weight serves {', '.join(HEAD_WEIGHTS)}, not {key!r}")
        attn = getattr(self.tl_model.blocks[layer], "attn", None)
        if key in self._weights or attn is None:  # cached, or a layout only the stacked accessor knows
            return self._required(key)[layer]
        with torch.no_grad():
            value = getattr(attn, key).detach()
        return expand_kv_heads(value, self.n_heads)

    def kv_layer_weight(self, key: str, layer: int) -> Tensor:
        """``W_K`` or ``W_V`` of one layer, grouped-query heads not expanded (see :func:`kv_layer_weight`).

        The bridge's attention holds them so; ``HookedTransformer``'s grouped-query attention
        keeps them as ``_W_K`` / ``_W_V`` behind properties that expand them.
        """
        if key not in KV_WEIGHTS:
            raise KeyError(f"kv_layer_weight serves W_K and W_V, not {key!r}")
        attn = getattr(self.tl_model.blocks[layer], "attn", None)
        if key in self._weights or attn is None:
            return self.layer_weight(key, layer)
        with torch.no_grad():
            value = getattr(attn, "_" + key, None)
            value = (getattr(attn, key) if value is None else value).detach()
        n_kv = value.shape[0]
        if n_kv == 0 or self.n_heads % n_kv:
            return self.layer_weight(key, layer)
        return value

    def _required(self, key: str) -> Tensor:
        """A weight every TransformerLens model has (only ``W_pos`` may be absent)."""
        value = self._weight(key)
        if value is None:  # never for these keys; keeps the return type a Tensor
            raise ScoreError(f"model {self.name!r} has no {key}.")
        return value

    def _positional_weight(self) -> Optional[Tensor]:
        if self.positional_embedding_type not in ("standard", "shortformer"):
            return None
        try:
            return self.tl_model.W_pos.detach()
        except AttributeError:
            return None

    @property
    def W_Q(self) -> Tensor:
        """Query weights ``[layer, head, d_model, d_head]`` (LayerNorm folded in)."""
        return self._required("W_Q")

    @property
    def W_K(self) -> Tensor:
        """Key weights ``[layer, head, d_model, d_head]``, GQA heads expanded."""
        return self._required("W_K")

    @property
    def W_V(self) -> Tensor:
        """Value weights ``[layer, head, d_model, d_head]``, GQA heads expanded."""
        return self._required("W_V")

    @property
    def W_O(self) -> Tensor:
        """Output weights ``[layer, head, d_head, d_model]`` (centred)."""
        return self._required("W_O")

    @property
    def b_Q(self) -> Tensor:
        """Query biases ``[layer, head, d_head]``."""
        return self._required("b_Q")

    @property
    def b_K(self) -> Tensor:
        """Key biases ``[layer, head, d_head]``, GQA heads expanded."""
        return self._required("b_K")

    @property
    def W_E(self) -> Tensor:
        """Token embedding ``[d_vocab, d_model]``."""
        return self._required("W_E")

    @property
    def W_U(self) -> Tensor:
        """Unembedding ``[d_model, d_vocab]`` (centred, final LayerNorm folded in)."""
        return self._required("W_U")

    @property
    def W_pos(self) -> Optional[Tensor]:
        """Learned absolute positions ``[n_ctx, d_model]``; ``None`` for rotary models."""
        return self._weight("W_pos")

    @property
    def b_U(self) -> Optional[Tensor]:
        """Unembedding bias ``[d_vocab]``; ``None`` when the model has none."""
        if "b_U" not in self._weights:
            value = getattr(self.tl_model, "b_U", None)
            self._weights["b_U"] = value.detach() if isinstance(value, Tensor) else None
        return self._weights["b_U"]

    def has_hook(self, name: str) -> bool:
        """Whether the TransformerLens model has a hook point ``name`` (e.g. ``unembed.hook_in``)."""
        return name in (getattr(self.tl_model, "hook_dict", None) or {})

    def effective_embedding(self, chunk_size: int = 4096, *, tokens: Optional[Tensor] = None) -> Tensor:
        """The token embedding as layer 1 sees it: ``W_E + MLP0(LN2(W_E))``, ``[d_vocab, d_model]``
        (``[len(tokens), d_model]``: the rows of ``tokens`` only, when given).

        Each token embedding goes through the first block's second normalisation and MLP alone
        (no layer-0 attention, no positions), ``chunk_size`` vocabulary rows at a time; the
        result has the model's dtype and device. Raises :class:`~headclass.errors.ScoreError`
        when the first block has no MLP (attention-only models).
        """
        blocks: Any = getattr(self.tl_model, "blocks", None)
        try:
            block = blocks[0]
            norm, mlp = block.ln2, block.mlp
        except (AttributeError, IndexError, TypeError, KeyError):
            norm = mlp = None
        if norm is None or mlp is None:
            raise ScoreError(
                f"effective_embedding needs the first block's MLP (blocks[0].ln2 and .mlp); "
                f"model {self.name!r} has none (attention-only). Use effective_embedding=False."
            )
        W_E = self.W_E if tokens is None else self.W_E[torch.as_tensor(tokens, dtype=torch.long).to(self.W_E.device)]
        out = torch.empty_like(W_E)
        with torch.no_grad():
            for start in range(0, W_E.shape[0], chunk_size):
                rows = W_E[start : start + chunk_size]
                out[start : start + chunk_size] = rows + mlp(norm(rows[None]))[0].to(rows.dtype)
        return out

    # -- tokens ----------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer, or ``None`` for models built without one."""
        return self._tokenizer

    @property
    def bos_token_id(self) -> Optional[int]:
        """BOS id: the tokenizer's, else the model config's; ``None`` when neither has one."""
        tok = self.tokenizer
        bos = getattr(tok, "bos_token_id", None) if tok is not None else None
        if bos is None:
            bos = self._bos_token_id
        return int(bos) if bos is not None and 0 <= int(bos) < self.d_vocab else None

    @property
    def prepends_bos(self) -> bool:
        """Whether the model expects a BOS token at position 0 (TransformerLens' default)."""
        return bool(getattr(self.cfg, "default_prepend_bos", True)) and self.bos_token_id is not None

    def special_token_ids(self) -> set[int]:
        """Ids the tokenizer marks as special (BOS, EOS, PAD, chat markers...)."""
        ids: set[int] = set()
        tok = self.tokenizer
        if tok is not None:
            ids.update(int(i) for i in getattr(tok, "all_special_ids", []) if i is not None)
            added = getattr(tok, "added_tokens_decoder", {}) or {}
            ids.update(int(i) for i, t in added.items() if getattr(t, "special", False))
        if self.bos_token_id is not None:
            ids.add(self.bos_token_id)
        return {i for i in ids if 0 <= i < self.d_vocab}

    def to_tokens(self, texts: Union[str, Sequence[str]], *, max_tokens: Optional[int] = None) -> list[Tensor]:
        """Tokenise texts, BOS prepended exactly when :attr:`prepends_bos`.

        Returns one 1-D id tensor per text (lengths differ; probes cut them to a common length).
        """
        tok = self.tokenizer
        if tok is None:
            raise ProbeError(
                f"model {self.name!r} has no tokenizer, so text cannot be tokenised; pass token id tensors instead."
            )
        if isinstance(texts, str):
            texts = [texts]
        out = []
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if self.prepends_bos:
                ids = [self.bos_token_id] + list(ids)
            if max_tokens is not None:
                ids = ids[:max_tokens]
            out.append(torch.tensor(ids, dtype=torch.long))
        return out

    def check_tokens(self, tokens: Tensor) -> Tensor:
        """Validate a token batch ``[batch, pos]`` (:func:`~headclass.loading.tokens.check_token_ids`)
        and move it to the model's device."""
        checked = check_token_ids(tokens, d_vocab=self.d_vocab, n_ctx=self.n_ctx, model_name=self.name)
        return checked.to(device=self.device)

    # -- running ---------------------------------------------------------------------------
    def run_with_patterns(
        self,
        tokens: Tensor,
        callback: PatternCallback,
        *,
        layers: Optional[Iterable[int]] = None,
    ) -> None:
        """Run ``tokens`` ``[batch, pos]``; ``callback(layer, pattern)`` sees each layer's pattern.

        ``pattern`` is ``[batch, head, query, key]`` (softmax over keys, causal), valid only
        during the call: reduce it there, do not keep it. The forward stops after the last
        requested layer (no unembedding), so only one layer's pattern is alive at a time.

        Every pattern is checked to be finite with every row summing to 1 (within a tolerance
        for the dtype): the hooks keep each layer's row sums (``[batch, head, query]``, on the
        device) and they are checked once the pass returns, in one host sync, so the hooks
        never wait for the host (on a GPU the pass runs ahead). A NaN/inf weight or activation
        upstream shows here; :class:`~headclass.errors.ScoreError` names the first such layer
        and head, so no table is ever built from it (callbacks may have seen such a pattern:
        whatever they computed from it is never published).
        """
        tokens = self.check_tokens(tokens)
        wanted = sorted(set(range(self.n_layers) if layers is None else layers))
        if not wanted:
            return

        sinks = self._has_attention_sinks()
        checks: dict[int, tuple[Tensor, Tensor]] = {}

        def make_hook(layer: int) -> Callable[[Tensor, Any], None]:
            def hook(pattern: Tensor, hook: Any) -> None:
                checks[layer] = _pattern_check(pattern, sinks)
                callback(layer, pattern.detach())
                if layer == wanted[-1]:
                    raise _PatternsDone  # nothing after this pattern is needed

            return hook

        fwd_hooks = [(hook_name(layer, "hook_pattern"), make_hook(layer)) for layer in wanted]
        # Stopping inside the last pattern hook (not with stop_at_layer, which is None for the
        # last layer) skips the rest of that block, the final norm and the [batch, pos,
        # d_vocab] logits, on both TransformerLens generations.
        with torch.no_grad():
            try:
                self.tl_model.run_with_hooks(tokens, return_type=None, fwd_hooks=fwd_hooks)
            except _PatternsDone:
                pass
            except Exception:  # a callback failed: a broken pattern is the better message
                _check_patterns(checks, self.name)
                raise
            _check_patterns(checks, self.name)

    def _has_attention_sinks(self) -> bool:
        """Whether attention has learned sink logits (GPT-OSS), so pattern rows sum to <= 1."""
        if "_sinks" not in self.__dict__:
            named = getattr(self.tl_model, "named_parameters", None)
            self.__dict__["_sinks"] = callable(named) and any(n.endswith("sinks") for n, _ in named())
        return bool(self.__dict__["_sinks"])

    def forward(self, tokens: Tensor, **kwargs: Any) -> Any:
        """The TransformerLens forward (``return_type`` etc. passed through)."""
        return self.tl_model(self.check_tokens(tokens), **kwargs)

    def run_with_hooks(self, tokens: Tensor, **kwargs: Any) -> Any:
        """TransformerLens ``run_with_hooks`` on validated tokens."""
        return self.tl_model.run_with_hooks(self.check_tokens(tokens), **kwargs)

    def __repr__(self) -> str:
        kv = f", kv_heads={self.n_key_value_heads}" if self.n_key_value_heads != self.n_heads else ""
        return (
            f"HeadModel({self.name!r}, layers={self.n_layers}, heads={self.n_heads}{kv}, "
            f"d_model={self.d_model}, d_head={self.d_head}, vocab={self.d_vocab}, "
            f"backend={self.backend!r})"
        )

    def run_from_layer(
        self,
        resid: Tensor,
        start_layer: int,
        *,
        fwd_hooks: Sequence[tuple[str, Callable[..., Any]]] = (),
        return_type: Optional[str] = "logits",
    ) -> Any:
        """Resume the forward at block ``start_layer``; blocks below it are not run.

        ``resid`` ``[batch, pos, d_model]`` is the residual stream entering that block (what
        ``blocks.{start_layer}.hook_resid_pre`` saw in an earlier run; its batch may differ,
        e.g. replicated). Returns what the TransformerLens forward returns for ``return_type``
        (``"logits"``: ``[batch, pos, d_vocab]``); ``fwd_hooks`` as in ``run_with_hooks``.

        ``HookedTransformer(start_at_layer=...)`` skips the earlier blocks itself. The
        TransformerLens 4 bridge still runs blocks ``0..start_layer-1`` and discards their
        output, so here their wrapped Hugging Face layers are made pass-throughs for the
        call: the same logits (bit for bit on the models tested) at a fraction of the cost.
        """
        if not 0 <= start_layer < self.n_layers:
            raise ValueError(f"start_layer must be in [0, {self.n_layers - 1}]; got {start_layer}.")
        run = lambda: self.tl_model.run_with_hooks(  # noqa: E731
            resid, start_at_layer=start_layer, fwd_hooks=list(fwd_hooks), return_type=return_type
        )
        if self.backend != "bridge" or start_layer == 0:
            return run()

        def passthrough(*args: Any, **kwargs: Any) -> Any:
            return args[0] if args else kwargs["hidden_states"]

        skipped = [self.tl_model.blocks[i].original_component for i in range(start_layer)]
        try:
            for layer in skipped:  # instance attribute shadows the class's forward
                layer.forward = passthrough
            return run()
        finally:
            for layer in skipped:
                layer.__dict__.pop("forward", None)
