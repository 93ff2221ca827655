"""Head importance by ablation: how much the loss rises when one head is knocked out.

(About 600 lines: the public API, then the two engines, exact and attribution, which share the
probes, targets, hooks and the logit readout below them.)

For every head ``(layer, head)`` the head's output ``blocks.{layer}.attn.hook_z``
``[batch, pos, head, d_head]`` is replaced, on a probe batch, by

* ``method="mean"``: its mean over the probe (over batch and positions, per head), or
* ``method="zero"``: zeros,

and the loss is measured again. The score is the change, ``ablated - clean``, in nats per
token (positive: the model needed the head). Two probes, two scores, each ``[layer, head]``:

``ablation_induction_dloss``
    Loss on repeated random tokens ``[BOS] r r`` (``probes.repeated``), counted only where
    the next token is predictable from an earlier repeat: at positions whose token lies in the
    second (or a later) repeat, i.e. where the probe has an induction target.
``ablation_text_dloss``
    Next-token loss over every position of the natural-text probe (``probes.text``).

Weights are never edited: ablation happens in a forward hook on ``hook_z``.

Two modes
---------
``mode="exact"``
    One clean pass caches each layer's residual stream entering the block
    (``blocks.{l}.hook_resid_pre``), the clean loss and the per-head means; each ablated run
    restarts from the residual just before the head's layer
    (:meth:`~headclass.HeadModel.run_from_layer`, which truly skips the earlier blocks on
    both TransformerLens generations), and the heads of one layer run together in one pass,
    the batch replicated once per head (copy ``i`` ablates head ``i``). The forward stops at
    the unembedding's input and logits are computed only where the loss counts, when the clean
    run shows that ``x @ W_U + b_U`` reproduces the model's logits (otherwise the model's own
    logits are used). Equal to :func:`headclass.testing.ablation_scores_reference` (one full forward per head,
    no caching) to float rounding (tested to 1e-5).
``mode="attribution"``
    Attribution patching (Nanda 2023; Syed et al. 2023): one forward and one backward pass,
    ``dloss[h] ~ sum over batch, pos, d_head of (z_ablated - z_clean) * dloss/dz``. A
    first-order guess: it is blind where the loss is saturated (a head that makes a prediction
    certain has ~0 gradient there) and often misjudges heads whose removal changes the loss a
    lot. Check it against exact ablation on your model with :func:`rank_correlation` (smollm2
    numbers in ``benchmarks/RESULTS.md``).

The slow references the fast paths are tested against (one full forward per head) live in
:mod:`headclass.testing`: ``ablation_scores_reference``, ``ablation_dloss_reference``.

Examples
--------
>>> import headclass
>>> from headclass.scores.ablation import ablation_scores, rank_correlation
>>> model = headclass.load_model("smollm2-135m")
>>> exact = ablation_scores(model)                                  # doctest: +SKIP
>>> fast = ablation_scores(model, mode="attribution")               # doctest: +SKIP
>>> rank_correlation(exact["ablation_text_dloss"], fast["ablation_text_dloss"])  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from headclass.config import HeadclassConfig, load_config
from headclass.errors import ProbeError, ScoreError
from headclass.loading.head_model import hook_name
from headclass.probes import build_probe_set

__all__ = [
    "ablation_scores",
    "ablation_dloss",
    "induction_targets",
    "text_targets",
    "rank_correlation",
    "METHODS",
    "MODES",
    "SCORE_KEYS",
]

#: How a head's output is replaced.
METHODS = ("mean", "zero")
#: ``exact`` ablation runs, or first-order ``attribution`` patching.
MODES = ("exact", "attribution")
#: The keys :func:`ablation_scores` returns, one per probe.
SCORE_KEYS = ("ablation_induction_dloss", "ablation_text_dloss")
_PROBE_OF_KEY = {"ablation_induction_dloss": "induction", "ablation_text_dloss": "text"}

# One pass of replicated copies should need at most about this much memory; above it the
# heads of a layer are split over several passes (heads_per_pass=0, "as many as fit").
_MEMORY_BUDGET_BYTES = 2 * 2**30

HeadList = Optional[Iterable[tuple[int, int]]]


# -- public API ---------------------------------------------------------------------------
def ablation_scores(
    model: Any,
    *,
    config: Union[None, HeadclassConfig, Mapping[str, Any], str] = None,
    probes: Optional[Mapping[str, Any]] = None,
    method: Optional[str] = None,
    mode: Optional[str] = None,
    heads: HeadList = None,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Loss increase when each head is ablated, on the induction and the text probe.

    Parameters
    ----------
    model
        A :class:`~headclass.HeadModel`.
    config
        Probe sizes, ``ablation.method`` and ``ablation.heads_per_pass`` come from its
        ``ablation`` section (``induction_sequences``, ``induction_segment_length``,
        ``text_sequences``, ``text_max_tokens``), the seed and the token-frequency filter from
        ``probes.seed`` and ``probes.repeated.exclude_extreme_fraction``; defaults when ``None``.
    probes
        Optional mapping overriding the probes: ``{"induction": ..., "text": ...}``, each a
        :class:`~headclass.probes.Probe` or a token tensor ``[batch, pos]``. The induction
        loss counts a probe's positions that have an induction target; for a tensor, the
        positions after the first repeat of its repeated segment (:func:`induction_targets`).
        A missing key is built from ``config``.
    method
        ``"mean"`` or ``"zero"``; ``None`` takes ``config.ablation.method``.
    mode
        ``"exact"`` (ablated forward runs) or ``"attribution"`` (one forward and backward per
        probe, a linear estimate); ``None`` takes ``config.ablation.mode``.
    heads
        ``(layer, head)`` pairs to ablate; ``None`` for all. Heads left out are ``NaN``
        ("not computed"), not 0.
    progress
        Show a progress bar (exact mode).

    Returns
    -------
    dict[str, Tensor]
        ``ablation_induction_dloss`` and ``ablation_text_dloss``, each ``[layer, head]``
        float32 on the CPU: ablated loss minus clean loss, nats per token. When the model has
        no tokenizer and no text probe is given, ``ablation_text_dloss`` is all ``NaN`` (with
        a warning): there is no text to score.
    """
    cfg = load_config(config)
    method = _check_method(method if method is not None else cfg.ablation.method)
    mode = mode if mode is not None else cfg.ablation.mode
    _check_mode(mode)
    return _per_probe(
        model,
        cfg,
        probes,
        heads,
        lambda probe, pairs: ablation_dloss(
            model,
            probe.tokens,
            targets=probe.targets,
            method=method,
            mode=mode,
            heads=pairs,
            heads_per_pass=cfg.ablation.heads_per_pass,
            progress=progress,
            desc=f"ablation ({probe.name})",
        ),
    )


def ablation_dloss(
    model: Any,
    tokens: Tensor,
    *,
    targets: Optional[Tensor] = None,
    method: str = "mean",
    mode: str = "exact",
    heads: HeadList = None,
    heads_per_pass: int = 0,
    progress: bool = True,
    desc: str = "ablation",
) -> Tensor:
    """Loss increase per ablated head on one token batch: the engine of :func:`ablation_scores`.

    Parameters
    ----------
    tokens
        ``[batch, pos]`` token ids.
    targets
        Bool ``[batch, pos - 1]``: ``targets[b, p]`` counts the prediction of token ``p + 1``
        at position ``p`` in the loss. ``None``: every position (:func:`text_targets`); for
        the induction loss pass :func:`induction_targets` of the tokens.
    method, mode, heads, progress
        As in :func:`ablation_scores`.
    heads_per_pass
        Exact mode: heads of one layer ablated together in one pass (the batch replicated
        once per head); ``0`` chooses as many as fit in about 2 GiB.
    desc
        Progress bar label.

    Returns
    -------
    Tensor
        ``[layer, head]`` float32 on the CPU, ``NaN`` for heads not in ``heads``. Losses are
        differenced in float64, so the rounding of the difference is that of float32 logits.
    """
    method = _check_method(method)
    _check_mode(mode)
    tokens = model.check_tokens(tokens)
    targets = _check_targets(tokens, targets)
    heads_by_layer = _heads_by_layer(model, heads)
    if heads_per_pass < 0:
        raise ScoreError(f"The 'heads_per_pass' parameter must be an int >= 0. Got {heads_per_pass}.")
    if mode == "attribution":
        return _attribution_dloss(model, tokens, targets, method, heads_by_layer)
    return _exact_dloss(model, tokens, targets, method, heads_by_layer, heads_per_pass, progress, desc)


def induction_targets(tokens: Tensor, *, segment_length: Optional[int] = None) -> Tensor:
    """Where the next token is predictable from an earlier repeat of a repeated batch.

    ``tokens`` ``[batch, pos]`` is ``prefix + s + s (+ s ...)`` with the same layout in every
    row (``probes.repeated``); the prefix (BOS) may be empty. Returns bool ``[batch, pos - 1]``,
    True at positions ``p`` whose token lies in the second or a later repeat (so token
    ``p + 1`` appeared after the same token before). With ``segment_length=None`` the
    segment length is found as the smallest period of the rows.

    Raises
    ------
    ProbeError
        The rows do not repeat a segment of >= 2 tokens.
    """
    if tokens.ndim != 2:
        raise ProbeError(f"tokens must have shape [batch, pos]; got shape {tuple(tokens.shape)}.")
    n_pos = tokens.shape[1]
    candidates = [segment_length] if segment_length is not None else range(2, n_pos // 2 + 1)
    for prefix in (0, 1):
        for seg in candidates:
            if seg < 2 or prefix + 2 * seg > n_pos:
                continue
            if torch.equal(tokens[:, prefix + seg :], tokens[:, prefix : n_pos - seg]):
                targets = torch.zeros(tokens.shape[0], n_pos - 1, dtype=torch.bool, device=tokens.device)
                targets[:, prefix + seg :] = True
                return targets
    raise ProbeError(
        "induction loss needs a segment of >= 2 tokens repeated in every row "
        f"(tokens of shape {tuple(tokens.shape)} repeat none"
        + (f" of length {segment_length}" if segment_length is not None else "")
        + "). Use headclass.probes.repeated(model, ...)."
    )


def text_targets(tokens: Tensor) -> Tensor:
    """Every prediction counts: all True, bool ``[batch, pos - 1]``."""
    return torch.ones(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool, device=tokens.device)


def rank_correlation(exact: Tensor, approx: Tensor) -> float:
    """Spearman rank correlation of two score grids (e.g. exact vs attribution ``dloss``).

    Pairs where either value is ``NaN`` are dropped; ties get their average rank. Returns
    ``NaN`` when fewer than two pairs remain or one side is constant. No scipy needed.
    """
    a = torch.as_tensor(exact, dtype=torch.float64).flatten().cpu()
    b = torch.as_tensor(approx, dtype=torch.float64).flatten().cpu()
    if a.shape != b.shape:
        raise ScoreError(f"exact and approx must have the same number of values; got {a.numel()} and {b.numel()}.")
    keep = ~(torch.isnan(a) | torch.isnan(b))
    if int(keep.sum()) < 2:
        return float("nan")
    a, b = _ranks(a[keep]), _ranks(b[keep])
    a, b = a - a.mean(), b - b.mean()
    denom = torch.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


# -- probes -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _LossProbe:
    name: str
    tokens: Tensor  # [batch, pos]
    targets: Tensor  # bool [batch, pos - 1]


def _loss_probes(model: Any, cfg: HeadclassConfig, given: Mapping[str, Any]) -> dict[str, Optional[_LossProbe]]:
    unknown = set(given) - {"induction", "text"}
    if unknown:
        raise ProbeError(f"probes may hold the keys 'induction' and 'text'; got {sorted(unknown)}.")
    chosen = dict(given)
    has_text = getattr(model, "tokenizer", None) is not None
    if "induction" not in chosen or ("text" not in chosen and has_text):  # classify's sizing step
        chosen = {**build_probe_set(model, cfg, ablation=True).ablation_probes, **given}
    induction = chosen["induction"]
    tokens = _tokens_of(induction, "induction")
    built: dict[str, Optional[_LossProbe]] = {
        "induction": _LossProbe("induction", tokens, _induction_probe_targets(induction, tokens))
    }
    text = chosen.get("text")
    if text is None:
        warnings.warn(
            f"model {getattr(model, 'name', '?')!r} has no tokenizer, so there is no text probe; "
            "ablation_text_dloss is NaN. Pass probes={'text': token_ids} to score it.",
            stacklevel=4,
        )
        built["text"] = None
        return built
    tokens = _tokens_of(text, "text")
    built["text"] = _LossProbe("text", tokens, text_targets(tokens))
    return built


def _per_probe(
    model: Any,
    cfg: HeadclassConfig,
    given: Optional[Mapping[str, Any]],
    heads: HeadList,
    run: Callable[["_LossProbe", list], Tensor],
) -> dict[str, Tensor]:
    """``run(probe, heads)`` for each score key; all-NaN where the probe cannot be built."""
    pairs = _pairs(_heads_by_layer(model, heads))  # validated before any probe is built
    built = _loss_probes(model, cfg, given or {})
    out: dict[str, Tensor] = {}
    for key in SCORE_KEYS:
        probe = built[_PROBE_OF_KEY[key]]
        out[key] = torch.full((model.n_layers, model.n_heads), float("nan")) if probe is None else run(probe, pairs)
    return out


def _tokens_of(probe: Any, name: str) -> Tensor:
    tokens = probe if isinstance(probe, Tensor) else getattr(probe, "tokens", None)
    if not isinstance(tokens, Tensor):
        raise ProbeError(
            f"probe {name!r} must be a token tensor [batch, pos] or have .tokens; got {type(probe).__name__}."
        )
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ProbeError(f"probe {name!r} needs tokens of shape [batch, pos >= 2]; got shape {tuple(tokens.shape)}.")
    return tokens


def _induction_probe_targets(probe: Any, tokens: Tensor) -> Tensor:
    """A :class:`~headclass.probes.Probe` knows its induction positions; a tensor is searched."""
    known = getattr(probe, "induction_target", None)
    if isinstance(known, Tensor) and known.shape == tokens.shape:
        targets = (known[:, :-1] >= 0).to(tokens.device)
        if bool(targets.any()):
            return targets
        raise ProbeError(
            f"induction loss needs repeated tokens; probe {getattr(probe, 'name', '?')!r} has no "
            "position whose token occurred before. Use headclass.probes.repeated(model, ...)."
        )
    return induction_targets(tokens)


def _check_targets(tokens: Tensor, targets: Optional[Tensor]) -> Tensor:
    if targets is None:
        return text_targets(tokens)
    expected = (tokens.shape[0], tokens.shape[1] - 1)
    if tuple(targets.shape) != expected:
        raise ProbeError(
            f"targets must be bool of shape [batch, pos - 1] = {list(expected)}; got {list(targets.shape)}."
        )
    targets = targets.to(device=tokens.device, dtype=torch.bool)
    if not bool(targets.any()):
        raise ProbeError("targets select no position, so there is no loss to ablate.")
    return targets


# -- validation ---------------------------------------------------------------------------
def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ScoreError(f"The 'method' parameter must be one of {list(METHODS)}. Got {method!r}.")
    return method


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ScoreError(f"The 'mode' parameter must be one of {list(MODES)}. Got {mode!r}.")
    return mode


def _heads_by_layer(model: Any, heads: HeadList) -> dict[int, list[int]]:
    n_layers, n_heads = model.n_layers, model.n_heads
    if heads is None:
        return {layer: list(range(n_heads)) for layer in range(n_layers)}
    grouped: dict[int, set[int]] = {}
    for pair in heads:
        try:
            layer, head = (int(x) for x in pair)
        except (TypeError, ValueError):
            raise ScoreError(f"heads must be (layer, head) pairs; got {pair!r}.") from None
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ScoreError(f"head ({layer}, {head}) is outside the model's {n_layers} layers x {n_heads} heads.")
        grouped.setdefault(layer, set()).add(head)
    if not grouped:
        raise ScoreError("heads is empty; give at least one (layer, head) pair, or None for all.")
    return {layer: sorted(hs) for layer, hs in sorted(grouped.items())}


def _pairs(heads_by_layer: Mapping[int, Sequence[int]]) -> list[tuple[int, int]]:
    return [(layer, head) for layer, hs in heads_by_layer.items() for head in hs]


# -- engines ------------------------------------------------------------------------------
def _exact_dloss(model, tokens, targets, method, heads_by_layer, heads_per_pass, progress, desc) -> Tensor:
    layers = sorted(heads_by_layer)
    n_batch = tokens.shape[0]
    with torch.no_grad():
        resid: dict[int, Tensor] = {}
        means: dict[int, Tensor] = {}
        unembed_in: dict[str, Tensor] = {}
        hooks: list[tuple[str, Callable[..., Any]]] = [
            (hook_name(layer, "hook_resid_pre"), _store(resid, layer)) for layer in layers
        ]
        if method == "mean":
            hooks += [(hook_name(layer, "hook_z"), _store_mean(means, layer)) for layer in layers]
        if _has_hook(model, _UNEMBED_IN):
            hooks.append((_UNEMBED_IN, _store(unembed_in, "x")))
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits")
        readout = _Readout.if_exact(model, unembed_in.get("x"), logits, targets)
        clean = readout.losses(unembed_in["x"], tokens, targets) if readout else _losses(logits, tokens, targets)
        del logits, unembed_in

        per_pass = heads_per_pass or _fitting_copies(model, tokens, readout is not None)
        out = torch.full((model.n_layers, model.n_heads), float("nan"))
        bar = _bar(progress, sum(len(h) for h in heads_by_layer.values()), desc)
        for layer in layers:
            todo = heads_by_layer[layer]
            for start in range(0, len(todo), per_pass):
                chunk = todo[start : start + per_pass]
                ablate = [(hook_name(layer, "hook_z"), _ablation_hook(chunk, n_batch, means.get(layer)))]
                replicated = resid[layer].repeat(len(chunk), 1, 1)
                if readout is None:
                    logits = model.run_from_layer(replicated, layer, fwd_hooks=ablate, return_type="logits")
                    losses = _losses(logits, tokens, targets)
                    del logits
                else:

                    def run(
                        extra: list, replicated: Tensor = replicated, layer: int = layer, ablate: list = ablate
                    ) -> Any:
                        return model.run_from_layer(replicated, layer, fwd_hooks=ablate + extra, return_type="logits")

                    final = readout.final_residual(run)
                    losses = readout.losses(final, tokens, targets)
                out[layer, chunk] = (losses - clean).float()
                bar.update(len(chunk))
        bar.close()
    return out


_UNEMBED_IN = "unembed.hook_in"


def _has_hook(model: Any, name: str) -> bool:
    has_hook = getattr(model, "has_hook", None)
    return bool(has_hook(name)) if callable(has_hook) else False


class _StopAtUnembed(Exception):
    """Raised by a hook to end a forward pass once the unembedding's input is known."""

    def __init__(self, x: Tensor):
        super().__init__("stop at unembed")
        self.x = x


class _Readout:
    """Logits ``x @ W_U + b_U`` computed only at the target positions.

    The model's own forward unembeds every position; the induction loss needs about half of
    them, and the unembedding is the largest matrix of a small model. Used only when the
    clean run shows it reproduces the model's logits (no logit soft-capping etc.).
    """

    def __init__(self, w_u: Tensor, b_u: Optional[Tensor]):
        self.w_u, self.b_u = w_u, b_u

    @classmethod
    def if_exact(cls, model: Any, x: Optional[Tensor], logits: Tensor, targets: Tensor) -> Optional["_Readout"]:
        w_u = getattr(model, "W_U", None)
        if not isinstance(w_u, Tensor) or x is None or x.shape[:2] != logits.shape[:2]:
            return None
        b_u = getattr(model, "b_U", None)
        readout = cls(w_u, b_u.detach() if isinstance(b_u, Tensor) else None)
        expected = logits[:, :-1][targets].float()
        got = readout.logits(x[:, :-1][targets])
        tolerance = 1e-5 * max(1.0, float(expected.abs().max()))
        return readout if got.shape == expected.shape and float((got - expected).abs().max()) <= tolerance else None

    def logits(self, x: Tensor) -> Tensor:
        out = x @ self.w_u.to(x.dtype)
        return (out if self.b_u is None else out + self.b_u.to(x.dtype)).float()

    @classmethod
    def checked(cls, model: Any, tokens: Tensor) -> Optional["_Readout"]:
        """Check on a few clean positions (one short forward) when no clean logits are at hand."""
        if not _has_hook(model, _UNEMBED_IN):
            return None
        sample = tokens[:1, : min(tokens.shape[1], 8)]
        seen: dict[str, Tensor] = {}
        with torch.no_grad():
            logits = model.run_with_hooks(sample, fwd_hooks=[(_UNEMBED_IN, _store(seen, "x"))], return_type="logits")
        if "x" not in seen:
            return None
        return cls.if_exact(model, seen["x"], logits, text_targets(sample))

    def final_residual(self, run: Callable[[list], Any]) -> Tensor:
        """``run(extra_hooks)`` runs the forward; it is stopped at the unembedding's input."""

        def stop(x: Tensor, hook: Any) -> None:
            raise _StopAtUnembed(x)

        try:
            run([(_UNEMBED_IN, stop)])
        except _StopAtUnembed as done:
            return done.x
        raise ScoreError(f"the forward pass never reached hook {_UNEMBED_IN!r}.")

    def loss(self, x: Tensor, tokens: Tensor, targets: Tensor) -> Tensor:
        """The scalar loss of one (unreplicated) batch, graph kept."""
        return F.cross_entropy(self.logits(x[:, :-1][targets]), tokens[:, 1:][targets])

    def losses(self, x: Tensor, tokens: Tensor, targets: Tensor) -> Tensor:
        n_batch = tokens.shape[0]
        predicted = tokens[:, 1:][targets]
        out = []
        for i in range(x.shape[0] // n_batch):
            rows = x[i * n_batch : (i + 1) * n_batch, :-1][targets]  # [n_targets, d_model]
            out.append(F.cross_entropy(self.logits(rows), predicted))
        return torch.stack(out).double().cpu()


def _attribution_dloss(model, tokens, targets, method, heads_by_layer) -> Tensor:
    layers = sorted(heads_by_layer)
    perturbations: dict[int, Tensor] = {}
    clean_z: dict[int, Tensor] = {}

    def capture(layer: int) -> Callable[[Tensor, Any], Tensor]:
        def hook(z: Tensor, hook: Any) -> Tensor:
            # z + 0 with a leaf 0: its gradient is dloss/dz through every later path, while
            # z itself keeps its dependence on earlier heads (a leaf *replacing* z would cut
            # those paths out of earlier layers' gradients).
            eps = torch.zeros_like(z, requires_grad=True)
            perturbations[layer] = eps
            clean_z[layer] = z.detach()
            return z + eps

        return hook

    hooks = [(hook_name(layer, "hook_z"), capture(layer)) for layer in layers]
    readout = _Readout.checked(model, tokens)
    with torch.enable_grad():
        if readout is None:
            loss = _loss(model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits"), tokens, targets)
        else:
            final = readout.final_residual(
                lambda extra: model.run_with_hooks(tokens, fwd_hooks=hooks + extra, return_type="logits")
            )
            loss = readout.loss(final, tokens, targets)
        grads = torch.autograd.grad(loss, [perturbations[layer] for layer in layers])
    out = torch.full((model.n_layers, model.n_heads), float("nan"))
    with torch.no_grad():
        for layer, grad in zip(layers, grads):
            z = clean_z[layer].float()
            ablated = z.mean(dim=(0, 1), keepdim=True) if method == "mean" else torch.zeros_like(z)
            estimate = ((ablated - z) * grad.float()).sum(dim=(0, 1, 3)).cpu()
            out[layer, heads_by_layer[layer]] = estimate[heads_by_layer[layer]]
    return out


# -- helpers ------------------------------------------------------------------------------
def _store(store: dict[Any, Tensor], layer: Any) -> Callable[[Tensor, Any], None]:
    def hook(x: Tensor, hook: Any) -> None:
        store[layer] = x.detach().clone()

    return hook


def _store_mean(store: dict[int, Tensor], layer: int) -> Callable[[Tensor, Any], None]:
    def hook(z: Tensor, hook: Any) -> None:
        store[layer] = z.detach().mean(dim=(0, 1))  # [head, d_head]

    return hook


def _ablation_hook(heads: Sequence[int], n_batch: int, means: Optional[Tensor]) -> Callable[[Tensor, Any], Tensor]:
    """Copy ``i`` of the replicated batch has head ``heads[i]`` ablated (mean, or zero)."""

    def hook(z: Tensor, hook: Any) -> Tensor:
        z = z.clone()  # never write into a tensor the backend may still hold
        copies = z.view(len(heads), n_batch, *z.shape[1:])
        for i, head in enumerate(heads):
            copies[i, :, :, head] = 0.0 if means is None else means[head].to(z.dtype)
        return z

    return hook


def _losses(logits: Tensor, tokens: Tensor, targets: Tensor) -> Tensor:
    """Mean loss over the target positions, one per copy of a replicated batch.

    ``logits`` ``[copies * batch, pos, vocab]``; returns a float64 CPU tensor ``[copies]``.
    """
    n_batch = tokens.shape[0]
    return (
        torch.stack(
            [
                _loss(logits[i * n_batch : (i + 1) * n_batch], tokens, targets).detach()  # one copy at a time
                for i in range(logits.shape[0] // n_batch)
            ]
        )
        .double()
        .cpu()
    )


def _loss(logits: Tensor, tokens: Tensor, targets: Tensor) -> Tensor:
    """The scalar mean loss of one batch ``[batch, pos, vocab]`` at the targets (graph kept)."""
    return F.cross_entropy(logits[:, :-1][targets].float(), tokens[:, 1:][targets])


def _fitting_copies(model: Any, tokens: Tensor, readout: bool) -> int:
    """Heads per pass that keep one pass's largest tensors within the memory budget."""
    n_pos = tokens.shape[1]
    d_mlp = int(getattr(getattr(model, "cfg", None), "d_mlp", None) or 4 * model.d_model)
    # activations alive at once in a block (residual, MLP hidden, attention scores), x4 slack
    per_copy = tokens.numel() * (2 * model.d_model + d_mlp + 2 * model.n_heads * n_pos) * 4 * 4
    if not readout:
        per_copy += tokens.numel() * model.d_vocab * 4 * 2  # the model's logits, and a float copy
    return max(1, min(model.n_heads, _MEMORY_BUDGET_BYTES // max(per_copy, 1)))


def _ranks(x: Tensor) -> Tensor:
    """Average ranks (1-based), ties sharing the mean of their positions."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, x.numel() + 1, dtype=x.dtype)
    _, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(int(inverse.max()) + 1, dtype=x.dtype).index_add_(0, inverse, ranks)
    counts = torch.zeros_like(sums).index_add_(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(progress: bool, total: int, desc: str) -> Any:
    if not progress:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="head", leave=False)
