"""Two TransformerLens generations behind one door.

* ``bridge`` (TransformerLens >= 4): ``TransformerBridge.boot_transformers(...)`` then
  ``enable_compatibility_mode()``, which folds LayerNorm and centres the writing weights and
  the unembedding exactly as ``HookedTransformer`` does at load time.
* ``hooked`` (TransformerLens 2.x / 3.x): ``HookedTransformer``. Its ``from_pretrained`` only
  accepts official hub names, so local folders and in-memory models go through the lower-level
  ``get_pretrained_model_config`` / ``get_pretrained_state_dict`` /
  ``load_and_process_state_dict`` path with the same processing options.

Both receive the same three kinds of input: a hub name, a local folder, or a Hugging Face
model object (GGUF files and objects in memory).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["transformer_lens_major", "available_backends", "build_tl_model", "placeholder_tokenizer", "has_tokenizer_files"]

_PROCESSING = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)


def transformer_lens_major() -> int:
    """Major version of the installed TransformerLens."""
    from importlib.metadata import version

    return int(version("transformer-lens").split(".")[0])


def _has_hooked_transformer() -> bool:
    try:  # TransformerLens 4 raises ImportError (not AttributeError) from its module __getattr__
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def _has_bridge() -> bool:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return False
    return hasattr(TransformerBridge, "boot_transformers")


def available_backends() -> list[str]:
    """Backends the installed TransformerLens offers, the ``auto`` choice first.

    On 2.x/3.x ``HookedTransformer`` is the reference (3.x also ships an early bridge);
    on >= 4 only the bridge exists.
    """
    found = [name for name, ok in (("hooked", _has_hooked_transformer()), ("bridge", _has_bridge())) if ok]
    if transformer_lens_major() >= 4:
        found.sort(key=lambda name: name != "bridge")
    return found


def build_tl_model(
    backend: str,
    *,
    hub_name: Optional[str] = None,
    folder: Optional[str] = None,
    hf_model: Any = None,
    tokenizer: Any = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Any:
    """Build the TransformerLens model from exactly one of hub_name / folder / hf_model."""
    if backend == "bridge":
        return _build_bridge(hub_name, folder, hf_model, tokenizer, device, dtype)
    if backend == "hooked":
        return _build_hooked(hub_name, folder, hf_model, tokenizer, device, dtype)
    raise ValueError(f"backend must be 'auto', 'bridge' or 'hooked'; got {backend!r}.")


def _build_bridge(hub_name, folder, hf_model, tokenizer, device, dtype):
    from transformer_lens.model_bridge import TransformerBridge

    with tempfile.TemporaryDirectory() as tmp:
        if tokenizer is None and hub_name is None and (folder is None or not has_tokenizer_files(folder)):
            # TransformerLens 4 insists on a tokenizer (and reloads it from its path); a model
            # saved without one gets a placeholder, and HeadModel reports tokenizer=None.
            config = hf_model.config if hf_model is not None else _folder_config(folder)
            tokenizer = placeholder_tokenizer(config, tmp)
        if hf_model is not None:
            name = getattr(hf_model.config, "_name_or_path", None) or type(hf_model).__name__
            bridge = TransformerBridge.boot_transformers(
                str(name), hf_model=hf_model.to(device=device, dtype=dtype), tokenizer=tokenizer,
                device=device, dtype=dtype,
            )
        else:
            bridge = TransformerBridge.boot_transformers(
                hub_name or folder, device=device, dtype=dtype, tokenizer=tokenizer
            )
    bridge.enable_compatibility_mode(disable_warnings=True, **_PROCESSING)
    bridge.eval()
    return bridge


def _build_hooked(hub_name, folder, hf_model, tokenizer, device, dtype):
    from transformer_lens import HookedTransformer

    if hub_name is not None and hf_model is None:
        return HookedTransformer.from_pretrained(hub_name, device=device, dtype=dtype, **_PROCESSING)
    import transformer_lens.loading_from_pretrained as loading

    if hf_model is None:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer = tokenizer if tokenizer is not None else _folder_tokenizer(folder)
    with tempfile.TemporaryDirectory() as tmp:
        # TransformerLens' config conversion reads config.json from a folder. Writing only the
        # config (no weights) lets every source take this route; fields that transformers 5
        # dropped but TransformerLens 3 still reads (GPT-2's n_ctx) are restored here.
        config = copy.deepcopy(hf_model.config)
        if getattr(config, "model_type", "") == "gpt2" and "n_ctx" not in config.to_dict():
            config.n_ctx = config.n_positions
        if not getattr(config, "architectures", None):  # e.g. read from GGUF; TL 3 dispatches on it
            config.architectures = [type(hf_model).__name__]
        config.save_pretrained(tmp)
        cfg = loading.get_pretrained_model_config(tmp, fold_ln=True, device=device, dtype=dtype)
        if tokenizer is None:
            cfg.tokenizer_name = None  # otherwise it tries to load one from the config-only folder
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
        state_dict = loading.get_pretrained_state_dict(tmp, cfg, hf_model=hf_model, dtype=dtype)
    model.load_and_process_state_dict(state_dict, refactor_factored_attn_matrices=False, **_PROCESSING)
    model.to(device)
    model.eval()
    return model


def _folder_config(folder: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, local_files_only=True)


def placeholder_tokenizer(config: Any, folder: str) -> Any:
    """A word-level tokenizer ``t0 .. t{V-1}`` standing in for a model saved without one.

    Saved to ``folder`` and read back, since TransformerLens reloads tokenizers by path.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(int(config.vocab_size))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    bos = getattr(config, "bos_token_id", None)
    special = f"t{bos}" if bos is not None and 0 <= bos < len(vocab) else "t0"
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token=special, eos_token=special,
                            unk_token="t0", pad_token=special).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def has_tokenizer_files(folder: str) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    return any((Path(folder) / name).is_file() for name in names)


def _folder_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    if not has_tokenizer_files(path):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None  # a folder saved without a tokenizer: token ids only
