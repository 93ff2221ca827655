"""Toy transformers that grow induction heads: a known answer to check headclass against.

(About 650 lines: data, tokenizer, model, training with checkpoints, in-context loss and the
cache are one recipe; the cache key covers all of it.)

Olsson et al. (2022), *In-context Learning and Induction Heads*, found that induction heads
(attend to the token *after* an earlier copy of the current token, and predict it) need two
attention layers: a previous-token head in an earlier layer writes "my previous token was A"
into each position, and the induction head's keys read it (K-composition). A one-layer model
cannot build them.

This module trains small GPT-2-architecture models, attention-only in effect (every MLP is
zeroed and frozen, since transformers' GPT-2 always has one), on random token sequences in
which one segment appears twice (:func:`repeated_segment_batch`). The loss is the usual
next-token cross-entropy, taken only where the next token is predictable (inside the second
copy): elsewhere the tokens are uniform noise that only slows learning. Predicting the second
copy takes induction, so a model deep enough to build induction heads does: with the defaults
the two-layer model's loss drops sharply after a few hundred to a thousand steps, the moment
its induction heads form.

Training is seeded (same settings, same weights on one machine and thread count) and takes
about 20-60 s per model on one CPU core (longer on a busy machine). The result is a normal Hugging Face folder
(``save_pretrained`` plus a 64-character lower-casing tokenizer, so the text probe works) that
:func:`headclass.load_model` reads like any other model; :func:`toy_model` trains once and
keeps the folder in the per-user cache.

Examples
--------
>>> import headclass
>>> from headclass.toy import toy_model, toy_config
>>> model = headclass.load_model(toy_model(2))     # trained once, then read from the cache
>>> from headclass.taxonomy import classify
>>> tax = classify(model, toy_config())            # probes sized to the 32-token context
>>> tax.table.query("is_induction")[["layer", "head", "induction"]]

Use :func:`train_toy_model` to train with other settings into a folder of your choice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import torch
from torch import Tensor

from headclass.atomic import atomic_folder, write_text
from headclass.errors import HeadclassError

__all__ = [
    "TOY_VERSION",
    "ToySpec",
    "train_toy_model",
    "toy_model",
    "toy_config",
    "toy_tokenizer",
    "repeated_segment_batch",
    "toy_checkpoints",
    "checkpoint_step",
    "in_context_loss",
]

#: Bump when the training recipe changes, so cached models are retrained.
TOY_VERSION = "1"

#: Special tokens at the start of the toy vocabulary; ordinary tokens follow.
SPECIAL_TOKENS = ("<|bos|>", "<|unk|>")

# Characters of the toy tokenizer, in id order after the special tokens. Text is lower-cased
# first, so 64 ids cover English prose well enough for the text probe to mean something.
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,;:!?'\"-()\n/&%$#@*+=<>[]_"


@dataclass(frozen=True)
class ToySpec:
    """Every setting that determines a toy model's weights (the cache key).

    Parameters
    ----------
    n_layers
        Attention layers (1, 2, 3...).
    n_heads, d_model
        Heads per layer and residual width (``d_head = d_model // n_heads``). With the default
        two heads of width 32, one layer-0 head can carry the previous token's identity on its
        own and becomes a sharp previous-token head; with four heads of width 16 the job is
        shared by all of them, each attending to the previous token only about 40 % of the
        time, at the labelling threshold.
    vocab_size
        Token ids ``0 .. vocab_size - 1``; ids 0 (BOS) and 1 (unknown) are special.
    seq_len
        Tokens per training sequence, BOS included; also the model's context (``n_positions``).
    steps, batch_size, lr, weight_decay, warmup
        AdamW schedule: linear warm-up for ``warmup`` steps, then cosine decay to 10 %.
        At twice the default ``lr`` some seeds (with four heads) find a less legible circuit
        (the later head attends two tokens after the earlier copy and reads what a layer-0
        head wrote there), which lowers the loss as well but gives no induction *pattern*.
    min_segment
        Shortest repeated segment in the training data; the longest is ``(seq_len - 1) // 2``.
    seed
        Seeds initialisation and data: the same spec gives the same weights.
    """

    n_layers: int
    n_heads: int = 2
    d_model: int = 64
    vocab_size: int = 64
    seq_len: int = 32
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 30
    min_segment: int = 4
    seed: int = 0

    def check(self) -> "ToySpec":
        """Raise :class:`HeadclassError` naming the first setting out of range."""
        rules = {
            "n_layers": self.n_layers >= 1,
            "n_heads": self.n_heads >= 1,
            "d_model": self.d_model >= self.n_heads and self.d_model % self.n_heads == 0,
            "vocab_size": len(SPECIAL_TOKENS) + 2 <= self.vocab_size,
            "seq_len": self.seq_len >= 2 * self.min_segment + 1,
            "steps": self.steps >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "warmup": self.warmup >= 0,
            "min_segment": self.min_segment >= 2,
        }
        needs = {
            "d_model": f"a positive multiple of n_heads={self.n_heads}",
            "vocab_size": f"an int >= {len(SPECIAL_TOKENS) + 2}",
            "seq_len": f"an int >= 2 * min_segment + 1 = {2 * self.min_segment + 1}",
            "lr": "a float > 0",
            "weight_decay": "a float >= 0",
            "min_segment": "an int >= 2",
        }
        for name, ok in rules.items():
            if not ok:
                need = needs.get(name, "an int >= 1" if name != "warmup" else "an int >= 0")
                raise HeadclassError(f"The toy parameter {name!r} must be {need}. Got {getattr(self, name)!r}.")
        return self

    def key(self) -> str:
        """A short hash of every setting and :data:`TOY_VERSION` (cache folder name)."""
        blob = json.dumps({"version": TOY_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def folder_name(self) -> str:
        return f"toy-{self.n_layers}l-{self.n_heads}h-d{self.d_model}-s{self.seed}-{self.key()}"


# -- data ---------------------------------------------------------------------------------------


def repeated_segment_batch(
    batch_size: int, seq_len: int, vocab_size: int, generator: torch.Generator, *, min_segment: int = 4
) -> Tensor:
    """Random token sequences, each holding one segment that appears exactly twice.

    ``[BOS] x x S x x S x`` with ``S`` of random length in ``[min_segment, (seq_len - 1) // 2]``,
    the two copies at random places. Lengths and gaps vary, so no fixed positional offset
    predicts the second copy: only induction (find the earlier copy of the current token, read
    what came after it) does. Exactly two copies, not ``S S S ...``: with a periodic sequence a
    one-layer head attending a fixed distance back would already predict the next token.

    Returns
    -------
    Tensor
        ``Int[Tensor, "batch seq_len"]``; position 0 is BOS (id 0), the rest are ordinary ids
        ``len(SPECIAL_TOKENS) .. vocab_size - 1``.
    """
    return _segment_batch(batch_size, seq_len, vocab_size, generator, min_segment)[0]


def _segment_batch(
    batch_size: int, seq_len: int, vocab_size: int, generator: torch.Generator, min_segment: int
) -> tuple[Tensor, Tensor]:
    """Tokens ``[batch, pos]`` and a bool mask ``[batch, pos]`` of the predictable positions:
    the second copy of the segment, less its first token (which nothing announces)."""
    tokens = torch.randint(len(SPECIAL_TOKENS), vocab_size, (batch_size, seq_len), generator=generator)
    tokens[:, 0] = 0
    predictable = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    body = seq_len - 1
    lengths = torch.randint(min_segment, body // 2 + 1, (batch_size,), generator=generator)
    for row in range(batch_size):
        length = int(lengths[row])
        slack = body - 2 * length  # free positions before, between and after the copies
        gaps = torch.randint(0, slack + 1, (2,), generator=generator).sort().values
        first = 1 + int(gaps[0])
        second = first + length + int(gaps[1] - gaps[0])
        tokens[row, second : second + length] = tokens[row, first : first + length]
        predictable[row, second + 1 : second + length] = True
    return tokens, predictable


# -- tokenizer ----------------------------------------------------------------------------------


def toy_tokenizer(vocab_size: int = 64) -> Any:
    """A lower-casing character tokenizer with exactly ``vocab_size`` ids.

    Id 0 is ``<|bos|>`` (also EOS and padding), id 1 ``<|unk|>``, then one id per character of a
    fixed alphabet (letters, digits, space, punctuation); a larger vocabulary is padded with
    ``<|tN|>`` tokens, a smaller one keeps the alphabet's first characters.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    n_plain = vocab_size - len(SPECIAL_TOKENS)
    pieces = list(_ALPHABET[:n_plain]) + [f"<|t{i}|>" for i in range(max(0, n_plain - len(_ALPHABET)))]
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + pieces)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS[1]))
    core.normalizer = normalizers.Lowercase()
    core.decoder = decoders.Fuse()
    bos, unk = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token=bos,
        pad_token=bos,
        unk_token=unk,
        model_max_length=10**6,
    )


# -- model --------------------------------------------------------------------------------------


def _build_model(spec: ToySpec) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=spec.vocab_size,
        n_positions=spec.seq_len,
        n_embd=spec.d_model,
        n_layer=spec.n_layers,
        n_head=spec.n_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = GPT2LMHeadModel(config)
    # Attention-only in effect: GPT-2 always has MLPs, so zero and freeze them. Their output is
    # then exactly 0 and every head's contribution reaches the logits directly.
    with torch.no_grad():
        blocks: Any = model.transformer.h  # a ModuleList of GPT2Block (typed loosely by torch)
        for block in blocks:
            for param in list(block.mlp.parameters()) + list(block.ln_2.parameters()):
                if param is block.ln_2.weight:
                    param.fill_(1.0)
                else:
                    param.zero_()
                param.requires_grad_(False)
    return model


def _forward(model: Any, tokens: Tensor) -> Tensor:
    """GPT-2's forward for a model whose MLPs are zero, without transformers' overhead.

    Same parameters, same arithmetic (pre-LayerNorm attention blocks, final LayerNorm,
    unembedding), about twice as fast on tiny models; a test checks it against
    ``model(tokens).logits``. Returns logits ``[batch, pos, vocab]``.
    """
    import torch.nn.functional as F

    body, config = model.transformer, model.config
    batch, pos = tokens.shape
    width, n_heads = config.n_embd, config.n_head
    eps = config.layer_norm_epsilon
    resid = body.wte.weight[tokens] + body.wpe.weight[:pos]
    for block in body.h:
        normed = F.layer_norm(resid, (width,), block.ln_1.weight, block.ln_1.bias, eps)
        qkv = normed @ block.attn.c_attn.weight + block.attn.c_attn.bias
        q, k, v = qkv.view(batch, pos, 3, n_heads, width // n_heads).permute(2, 0, 3, 1, 4)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        resid = resid + z.transpose(1, 2).reshape(batch, pos, width) @ block.attn.c_proj.weight + block.attn.c_proj.bias
    return model.lm_head(F.layer_norm(resid, (width,), body.ln_f.weight, body.ln_f.bias, eps))


def _lr_factor(step: int, spec: ToySpec) -> float:
    if step < spec.warmup:
        return (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@contextlib.contextmanager
def _torch_threads(n: Optional[int]) -> Iterator[None]:
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_toy_model(
    n_layers: int,
    *,
    n_heads: int = 2,
    d_model: int = 64,
    vocab_size: int = 64,
    seq_len: int = 32,
    steps: int = 3000,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    out_dir: Union[None, str, Path] = None,
    progress: bool = True,
    threads: Optional[int] = 1,
    checkpoint_every: Optional[int] = None,
    checkpoints: Optional[Iterable[int]] = None,
    **extra: Any,
) -> Path:
    """Train a toy attention-only transformer on repeated-segment data and save it.

    Parameters
    ----------
    n_layers
        1 gives a model that cannot form induction heads; 2 or more usually does.
    n_heads, d_model, vocab_size, seq_len, steps, batch_size, lr, seed
        See :class:`ToySpec`; further :class:`ToySpec` fields (``weight_decay``, ``warmup``,
        ``min_segment``) may be passed by name.
    out_dir
        Folder to write (created; must not hold a model already). ``None``: a new temporary
        folder, which the caller owns.
    progress
        Print the loss ten times during training, and the training time.
    threads
        Torch CPU threads during training, restored afterwards. Default 1: these models are
        too small for threads to help (two threads were 10x slower on a busy 2-core machine);
        ``None`` keeps the current setting. Results may differ between thread counts.
    checkpoint_every, checkpoints
        Also save the model during training, after every ``checkpoint_every`` steps (and at
        step 0, the initialisation) and/or after each step listed in ``checkpoints`` (0 ..
        ``steps``), as ``out_dir/checkpoints/step-N/``: complete Hugging Face folders that
        :func:`headclass.load_model` reads, each with a ``toy_spec.json`` holding ``step``.
        Saving changes nothing about training: the final weights are the same with or
        without checkpoints. List them with :func:`toy_checkpoints`.

    Returns
    -------
    Path
        The Hugging Face folder (``config.json``, ``model.safetensors``, tokenizer files and
        ``toy_spec.json`` with the spec, final loss and training time).

    Examples
    --------
    >>> folder = train_toy_model(2, seed=1, out_dir="toy-2l-seed1")
    >>> import headclass; model = headclass.load_model(folder)
    >>> folder = train_toy_model(2, steps=1000, checkpoint_every=50, out_dir="toy-2l-ckpt")
    >>> toy_checkpoints(folder)[:2]       # [(0, .../checkpoints/step-0), (50, .../step-50)]
    """
    spec = _spec(
        "train_toy_model",
        n_layers=n_layers,
        n_heads=n_heads,
        d_model=d_model,
        vocab_size=vocab_size,
        seq_len=seq_len,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        **extra,
    )
    save_at = _checkpoint_steps(spec.steps, checkpoint_every, checkpoints)
    folder = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="headclass-toy-"))
    if (folder / "config.json").exists():
        raise HeadclassError(f"out_dir {str(folder)!r} already holds a model; choose an empty folder.")
    folder.mkdir(parents=True, exist_ok=True)

    def save_checkpoint(step: int, model: Any, loss: Optional[float]) -> None:
        with atomic_folder(folder / "checkpoints" / f"step-{step}") as staging:
            _save(staging, model, spec, {"step": step, "loss": loss})

    start = time.perf_counter()
    with _torch_threads(threads):
        model, losses = _train(spec, progress, save_at, save_checkpoint)
    seconds = time.perf_counter() - start

    _save(folder, model, spec, {"step": spec.steps, "final_loss": losses[-1], "train_seconds": round(seconds, 2)})
    if progress:
        print(f"trained {spec.folder_name()} in {seconds:.1f} s (final loss {losses[-1]:.3f})")
    return folder


def _save(folder: Path, model: Any, spec: ToySpec, facts: dict[str, Any]) -> None:
    """``save_pretrained`` + tokenizer + ``toy_spec.json`` (the spec and ``facts``) into ``folder``."""
    model.save_pretrained(folder)
    toy_tokenizer(spec.vocab_size).save_pretrained(folder)
    record = {"version": TOY_VERSION, "spec": asdict(spec), **facts}
    write_text(folder / "toy_spec.json", json.dumps(record, indent=2) + "\n")


def _checkpoint_steps(steps: int, every: Optional[int], listed: Optional[Iterable[int]]) -> frozenset[int]:
    """The steps after which a checkpoint is saved (0 = the initialisation)."""
    chosen: set[int] = set()
    if every is not None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise HeadclassError(f"The 'checkpoint_every' parameter must be an int >= 1. Got {every!r}.")
        chosen.update(range(0, steps + 1, every))
        chosen.add(steps)
    for step in listed or ():
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= steps:
            raise HeadclassError(f"The 'checkpoints' parameter must list ints in [0, steps={steps}]. Got {step!r}.")
        chosen.add(step)
    return frozenset(chosen)


def checkpoint_step(path: Union[str, Path]) -> Optional[int]:
    """The training step of a checkpoint folder named ``step-N`` (or ``stepN``), else ``None``."""
    import re

    match = re.fullmatch(r"step[-_]?(\d+)", Path(str(path)).name)
    return int(match.group(1)) if match else None


def toy_checkpoints(folder: Union[str, Path]) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every checkpoint saved under ``folder/checkpoints``, by step."""
    root = Path(folder) / "checkpoints"
    found = []
    for child in root.iterdir() if root.is_dir() else ():
        step = checkpoint_step(child)
        if step is not None and (child / "toy_spec.json").is_file():
            found.append((step, child))
    return sorted(found)


def _spec(caller: str, **settings: Any) -> ToySpec:
    unknown = set(settings) - {f.name for f in fields(ToySpec)}
    if unknown:
        raise HeadclassError(
            f"{caller} got unknown settings {sorted(unknown)}; the settings are the ToySpec fields "
            f"{[f.name for f in fields(ToySpec)]}."
        )
    return ToySpec(**settings).check()


def _train(
    spec: ToySpec, progress: bool, save_at: frozenset[int] = frozenset(), save: Any = None
) -> tuple[Any, list[float]]:
    torch.manual_seed(spec.seed)
    model = _build_model(spec)
    model.train()
    generator = torch.Generator().manual_seed(spec.seed + 1)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.98),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, spec))
    losses: list[float] = []
    if 0 in save_at:
        _checkpoint(model, 0, None, save)
    for step in range(spec.steps):
        tokens, predictable = _segment_batch(
            spec.batch_size, spec.seq_len, spec.vocab_size, generator, spec.min_segment
        )
        logits = _forward(model, tokens)
        per_token = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, spec.vocab_size), tokens[:, 1:].reshape(-1), reduction="none"
        )
        weight = predictable[:, 1:].reshape(-1).float()
        loss = (per_token * weight).sum() / weight.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step + 1 in save_at:
            _checkpoint(model, step + 1, losses[-1], save)
        if progress and (step + 1) % max(1, spec.steps // 10) == 0:
            recent = losses[-50:]
            print(f"  step {step + 1}/{spec.steps}: loss {sum(recent) / len(recent):.3f}")
    model.eval()
    return model, losses


def _checkpoint(model: Any, step: int, loss: Optional[float], save: Any) -> None:
    model.eval()
    save(step, model, loss)
    model.train()


# -- cache --------------------------------------------------------------------------------------


def toy_model(
    n_layers: int,
    *,
    cache_dir: Union[None, str, Path] = None,
    progress: bool = True,
    checkpoint_every: Optional[int] = None,
    checkpoints: Optional[Iterable[int]] = None,
    **settings: Any,
) -> Path:
    """The folder of a trained toy model, training it only the first time.

    Parameters
    ----------
    n_layers
        Attention layers.
    cache_dir
        Where trained models are kept; default ``headclass.loading.aliases.cache_dir() / "toy"``
        (``$HEADCLASS_CACHE/toy`` or ``~/.cache/headclass/toy``).
    progress
        Print training progress when training happens.
    **settings
        Any :class:`ToySpec` field (``seed``, ``steps``, ``d_model``...). The cache key covers
        all of them and :data:`TOY_VERSION`, so changed settings train a new model.
    checkpoint_every, checkpoints
        Keep training checkpoints too (see :func:`train_toy_model`; list them with
        :func:`toy_checkpoints`). A model with checkpoints is cached apart from the same
        model without (the final weights are identical), under a name that also covers the
        checkpoint steps.

    Returns
    -------
    Path
        A folder :func:`headclass.load_model` reads. Written atomically: a crash or a concurrent
        trainer never leaves a half-written model behind.

    Examples
    --------
    >>> folder = toy_model(2, steps=1000, checkpoint_every=50)
    >>> [step for step, _ in toy_checkpoints(folder)][:3]
    [0, 50, 100]
    """
    spec = _spec("toy_model", n_layers=n_layers, **settings)
    save_at = _checkpoint_steps(spec.steps, checkpoint_every, checkpoints)
    if cache_dir is None:
        from headclass.loading.aliases import cache_dir as user_cache

        root = user_cache() / "toy"
    else:
        root = Path(cache_dir)
    name = spec.folder_name()
    if save_at:
        name += "-ckpt" + hashlib.sha256(json.dumps(sorted(save_at)).encode()).hexdigest()[:8]
    folder = root / name
    if (folder / "toy_spec.json").is_file():
        return folder
    hyper = {f.name: getattr(spec, f.name) for f in fields(ToySpec) if f.name != "n_layers"}
    if save_at:
        hyper["checkpoints"] = sorted(save_at)
    with atomic_folder(folder) as staging:  # a crash or a concurrent trainer leaves no half model
        train_toy_model(n_layers, out_dir=staging, progress=progress, **hyper)
    return folder


def toy_config(seq_len: Optional[int] = None, segment_length: Optional[int] = None) -> dict[str, Any]:
    """Config overrides that fit a toy model's short context (pass to :func:`load_config`).

    The defaults probe with 2 x 64 repeated tokens and 128-token texts, longer than a toy's
    ``seq_len``-token context. This keeps every probe inside it: a repeated segment of
    ``segment_length`` tokens (default ``(seq_len - 1) // 2 - 4``, within the training
    range of segment lengths) and texts cut to ``seq_len`` tokens. Thresholds stay the defaults.
    """
    if seq_len is None:  # the toy models' own context (ToySpec.seq_len)
        seq_len = ToySpec(n_layers=1).seq_len
    if segment_length is None:
        segment_length = (seq_len - 1) // 2 - 4
    if 1 + 2 * segment_length > seq_len:
        raise HeadclassError(f"segment_length={segment_length} does not fit a {seq_len}-token context twice after BOS.")
    return {
        "probes": {"repeated": {"segment_length": segment_length}, "text": {"max_tokens": seq_len}},
        "ablation": {"induction_segment_length": segment_length, "text_max_tokens": seq_len},
    }


# -- in-context loss ----------------------------------------------------------------------------


def in_context_loss(model: Any, config: Any = None) -> float:
    """Loss on the second copy of repeated random tokens minus the loss on the first (nats).

    Olsson et al. (2022) track in-context learning as the loss late in a context minus the
    loss early in it. On ``[BOS] r r`` (the repeated probe of ``config.probes.repeated``:
    ``n_sequences`` random segments of ``segment_length`` distinct tokens, seeded) the first
    copy is unpredictable and the second is predictable by induction: the difference is about
    0 for a model without induction heads and strongly negative (down to about minus the
    first copy's loss) once they form. The first token of each copy is left out of its mean
    (nothing announces it).

    Parameters
    ----------
    model
        A :class:`~headclass.HeadModel` (anything with ``forward`` and the probe interface).
    config
        A config (``None``: the defaults; for a toy model pass :func:`toy_config`).

    Returns
    -------
    float
        ``mean CE(copy 2) - mean CE(copy 1)``, averaged over the probe's sequences.
    """
    import torch.nn.functional as F

    from headclass.config import load_config
    from headclass.probes import repeated

    probes = load_config(config).probes
    cfg = probes.repeated
    probe = repeated(
        model,
        cfg.n_sequences,
        cfg.segment_length,
        2,
        seed=probes.seed,
        exclude_extreme_fraction=cfg.exclude_extreme_fraction,
        name="in-context loss",
    )
    tokens = probe.tokens
    offset = int(probe.has_bos)
    length = cfg.segment_length
    with torch.no_grad():
        logits = model.forward(tokens, return_type="logits").float()
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")  # [batch, pos - 1]
    # per_token[:, t - 1] is the loss of predicting token t.
    first = per_token[:, offset : offset + length - 1]  # tokens offset+1 .. offset+length-1
    second = per_token[:, offset + length : offset + 2 * length - 1]  # tokens offset+length+1 ..
    return float(second.mean() - first.mean())
