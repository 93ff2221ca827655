"""Load a pretrained decoder as a :class:`HeadModel`, from any kind of source.

Examples
--------
>>> import headclass
>>> model = headclass.load_model("smollm2-135m")          # alias: fetched once, then offline
>>> model = headclass.load_model("gpt2")                  # hub name TransformerLens knows
>>> model = headclass.load_model("./my-model")            # save_pretrained folder
>>> model = headclass.load_model("model.Q4_1.gguf")       # GGUF, dequantised
>>> model = headclass.load_model(hf_model, tokenizer=tok) # a transformers model in memory
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from headclass.atomic import atomic_folder
from headclass.errors import ModelFileError, ModelNotFoundError, OptionError
from headclass.loading.aliases import ModelAlias, cache_dir, fetch_pypi_gguf, model_aliases
from headclass.loading.backends import available_backends, build_tl_model, has_tokenizer_files
from headclass.loading.head_model import HeadModel, HeadModelLike, PatternCallback, check_finite_weights, hook_name
from headclass.loading.memory import (
    check_fits,
    config_weight_bytes,
    folder_weight_bytes,
    gguf_weight_bytes,
    hub_config_weight_bytes,
    hub_weight_bytes,
)
from headclass.loading.sources import (
    check_causal_config,
    hub_errors,
    load_gguf,
    looks_like_path,
    read_folder_config,
    resolve_hub_name,
)

__all__ = ["load_model", "HeadModel", "HeadModelLike", "PatternCallback", "hook_name", "available_backends"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _finite_checked(load: Any) -> Any:
    """Every model :func:`load_model` returns has finite weights (else a ScoreError naming the
    first layer and head: a NaN weight never reaches a score, an SVD or a table)."""
    import functools

    @functools.wraps(load)
    def checked(*args: Any, **kwargs: Any) -> HeadModel:
        model = load(*args, **kwargs)
        check_finite_weights(model)
        return model

    return checked


@_finite_checked
def load_model(
    source: Any,
    *,
    device: str = "cpu",
    dtype: Union[str, torch.dtype] = torch.float32,
    backend: str = "auto",
    tokenizer: Any = None,
    name: Optional[str] = None,
    revision: Optional[str] = None,
) -> HeadModel:
    """Load a causal decoder through TransformerLens and wrap it as a :class:`HeadModel`.

    Parameters
    ----------
    source
        One of: an alias from ``configs/models.yaml`` (``"smollm2-135m"``, ``"gpt2-small"``...);
        a hub name TransformerLens knows (``"gpt2"``, ``"EleutherAI/pythia-160m"``...); a local
        Hugging Face folder; a ``.gguf`` file; a ``transformers`` model object (copied, never
        modified); or a TransformerLens model already processed (wrapped as is).
    device, dtype
        Where and in which precision the model lives (``"cpu"``, ``torch.float32`` by default).
        ``device`` is checked before anything is loaded (``"cuda"`` without a GPU, ``"cuda:7"``
        on a one-GPU machine or ``"banana"`` raise :class:`~headclass.errors.OptionError`).
        ``"bfloat16"`` halves memory and runs the model in bf16 end to end (scores accumulate in
        float32); ``"float16"`` on a CPU warns (slow there) and suggests bfloat16.
    backend
        ``"auto"`` (TransformerBridge on TransformerLens >= 4, HookedTransformer on 2.x/3.x),
        ``"bridge"`` or ``"hooked"``.
    tokenizer
        A tokenizer for an in-memory model (folders, GGUF and hub models bring their own).
    name
        Display name; defaults to the source.
    revision
        A hub branch, tag or commit (e.g. Pythia's training checkpoints ``"step1000"``); hub
        names and hub aliases only (a local checkpoint is a folder: pass its path).

    Raises
    ------
    ModelNotFoundError, HubUnreachableError, UnsupportedArchitectureError,
    MissingDependencyError, ModelFileError, OutOfMemoryError
        Each with a one-line message that says what to do. ``OutOfMemoryError``: the weights,
        sized from their files before any is read, exceed the memory available
        (:mod:`headclass.loading.memory`; ``HEADCLASS_MEMORY_CHECK=0`` skips the check).
    """
    dtype = _check_dtype(dtype)
    device = _check_device(device, dtype)
    backend = _check_backend(backend)
    if revision is not None and not _is_hub_source(source):
        raise OptionError(
            f"revision={revision!r} applies to hub models only; {_describe_source(source)} is not one "
            "(for a local checkpoint, pass the path of its folder)."
        )

    if _is_tl_model(source):
        label = name or str(getattr(source.cfg, "model_name", type(source).__name__))
        kind = "bridge" if type(source).__name__ == "TransformerBridge" else "hooked"
        return HeadModel(source, name=label, backend=kind, source_kind="object")

    if _is_hf_model(source):
        check_causal_config(source.config, f"model object {type(source).__name__}")
        label = name or getattr(source.config, "_name_or_path", "") or type(source).__name__
        copied = sum(p.numel() for p in source.parameters()) * dtype.itemsize  # the copy's own bytes
        check_fits(copied, dtype, f"a copy of model {str(label)!r}", backend=backend)
        tl_model = build_tl_model(
            backend, hf_model=copy.deepcopy(source), tokenizer=tokenizer, device=device, dtype=dtype
        )
        return HeadModel(
            tl_model,
            name=str(label),
            backend=backend,
            source_kind="object",
            tokenizer=tokenizer,
            bos_token_id=_config_bos(source.config),
            hf_config=source.config,
        )

    if not isinstance(source, (str, os.PathLike)):
        raise ModelNotFoundError(
            f"source must be a model name, a path, or a transformers / TransformerLens model; "
            f"got {type(source).__name__}."
        )
    text = str(source)
    aliases = model_aliases()
    if text in aliases:
        return _load_alias(aliases[text], device=device, dtype=dtype, backend=backend, name=name, revision=revision)

    if looks_like_path(text):
        path = Path(text).expanduser()
        if not path.exists():
            from headclass.loading.sources import missing_path_error

            raise missing_path_error(text)
        if path.is_dir():
            return _load_folder(
                path,
                device=device,
                dtype=dtype,
                backend=backend,
                tokenizer=tokenizer,
                name=name or path.name,
                source_kind="folder",
            )
        check_fits(lambda: gguf_weight_bytes(path, dtype), dtype, f"GGUF file {str(path)!r}", backend=backend)
        hf_model, gguf_tokenizer = load_gguf(path, dtype)
        tokenizer = tokenizer or gguf_tokenizer
        tl_model = build_tl_model(backend, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype)
        return HeadModel(
            tl_model,
            name=name or path.stem,
            backend=backend,
            source_kind="gguf",
            tokenizer=tokenizer,
            bos_token_id=_config_bos(hf_model.config),
            hf_config=hf_model.config,
        )

    return _load_hub(
        text,
        device=device,
        dtype=dtype,
        backend=backend,
        tokenizer=tokenizer,
        name=name or text,
        source_kind="hub",
        revision=revision,
    )


def _is_hub_source(source: Any) -> bool:
    if not isinstance(source, str):
        return False
    alias = model_aliases().get(source)
    if alias is not None:
        return alias.kind == "hub"
    return not looks_like_path(source)


def _describe_source(source: Any) -> str:
    if not isinstance(source, (str, os.PathLike)):
        return f"a {type(source).__name__} object"
    if str(source) in model_aliases():
        return f"alias {str(source)!r} (a {model_aliases()[str(source)].kind} alias)"
    return f"local path {str(source)!r}"


def _from_hub_revision(hub_name: str, revision: str, *, device, dtype, backend, tokenizer) -> tuple[Any, Any]:
    """A hub model at ``revision``: transformers fetches it, the backend wraps the object."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(hub_name, revision=revision, torch_dtype=dtype)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(hub_name, revision=revision)
    return build_tl_model(backend, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype), tokenizer


def _load_hub(text: str, *, device, dtype, backend, tokenizer, name, source_kind, revision=None) -> HeadModel:
    hub_name = resolve_hub_name(text)
    check_fits(  # pickled weights (no safetensors header to read): the config's parameters
        lambda: hub_weight_bytes(hub_name, dtype, revision) or hub_config_weight_bytes(hub_name, dtype, revision),
        dtype,
        f"model {name!r}",
        backend=backend,
    )
    with hub_errors(hub_name):
        if revision is not None:
            tl_model, tokenizer = _from_hub_revision(
                hub_name, revision, device=device, dtype=dtype, backend=backend, tokenizer=tokenizer
            )
            return HeadModel(tl_model, name=name, backend=backend, source_kind=source_kind, tokenizer=tokenizer)
        tl_model = build_tl_model(backend, hub_name=hub_name, tokenizer=tokenizer, device=device, dtype=dtype)
    return HeadModel(tl_model, name=name, backend=backend, source_kind=source_kind)


def _load_alias(alias: ModelAlias, *, device, dtype, backend, name, revision=None) -> HeadModel:
    label = name or alias.alias
    if alias.kind == "hub" and alias.name is not None:  # models.yaml guarantees a name for hub aliases
        return _load_hub(
            alias.name,
            device=device,
            dtype=dtype,
            backend=backend,
            tokenizer=None,
            name=label,
            source_kind="alias",
            revision=revision,
        )
    return _load_folder(
        _dequantised_folder(alias),
        device=device,
        dtype=dtype,
        backend=backend,
        tokenizer=None,
        name=label,
        source_kind="alias",
    )


def _load_folder(path: Path, *, device, dtype, backend, tokenizer, name, source_kind) -> HeadModel:
    config = read_folder_config(path)
    check_fits(  # pickled weights (no safetensors header to read): the config's parameters
        lambda: folder_weight_bytes(path, dtype) or config_weight_bytes(config, dtype),
        dtype,
        f"model {name!r}",
        backend=backend,
    )
    folder = str(path.resolve())
    try:
        tl_model = build_tl_model(backend, folder=folder, tokenizer=tokenizer, device=device, dtype=dtype)
    except Exception as exc:
        if not _is_weight_file_error(exc):
            raise
        # torch's own text suggests weights_only=False (arbitrary code execution): never pass it on
        raise ModelFileError(
            f"cannot read the weights in folder {str(path)!r} ({type(exc).__name__}): a weight file is "
            "corrupt or not a checkpoint; re-save the model with save_pretrained or download it again."
        ) from None
    if tokenizer is None and has_tokenizer_files(folder):
        tokenizer = tl_model.tokenizer  # loaded from the folder by the backend
    return HeadModel(
        tl_model,
        name=name,
        backend=backend,
        source_kind=source_kind,
        tokenizer=tokenizer,
        bos_token_id=_config_bos(config),
        hf_config=config,
    )


def _is_weight_file_error(exc: BaseException) -> bool:
    """An exception from deserialising a weight file (unpickling, safetensors, torch's zip reader)."""
    import pickle

    if isinstance(exc, pickle.UnpicklingError) or type(exc).__name__ == "SafetensorError":
        return True
    text = str(exc)
    return isinstance(exc, (RuntimeError, EOFError, ValueError)) and any(
        marker in text
        for marker in ("PytorchStreamReader", "weights_only", "safetensors", "invalid load key", "hasRecord")
    )


def _config_bos(config: Any) -> Optional[int]:
    bos = getattr(config, "bos_token_id", None)
    return int(bos) if isinstance(bos, int) else None


def _dequantised_folder(alias: ModelAlias) -> Path:
    """A ``save_pretrained`` copy of the alias' GGUF, made once and kept in the cache.

    Dequantising a GGUF takes ~15 s (SmolLM2; ~1 min for Qwen-1.5B); reading the cached
    float32 folder takes ~1 s. The folder appears atomically (:func:`headclass.atomic.atomic_folder`).
    """
    folder = cache_dir() / alias.alias / "hf"
    if (folder / "config.json").is_file():
        return folder
    # dequantised in float32 once: that step holds the weights and nothing else. Sized before the
    # wheels are fetched where models.yaml gives the count (1 GB of them for Qwen-1.5B).
    what = f"dequantising {alias.alias!r}"
    known = 4 * alias.parameters if alias.parameters else None
    check_fits(known, torch.float32, what, classify=False)
    gguf_path = fetch_pypi_gguf(alias)
    if known is None:
        check_fits(lambda: gguf_weight_bytes(gguf_path, torch.float32), torch.float32, what, classify=False)
    hf_model, tokenizer = load_gguf(gguf_path, torch.float32)
    with atomic_folder(folder) as staging:
        hf_model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return folder


def _check_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise OptionError(f"dtype must be a torch.dtype or one of {sorted(_DTYPES)}; got {dtype!r}.")


def _check_device(device: Any, dtype: torch.dtype) -> str:
    """A device that exists here, as a string (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``).

    Checked before anything is loaded. float16 on a CPU works but is slow (no half-precision
    matmul kernels): a :class:`~headclass.errors.HeadclassWarning` suggests bfloat16.
    """
    import warnings

    from headclass.errors import HeadclassWarning

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise OptionError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps'; got {device!r}.") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise OptionError(f"device {device!r} is not available: {why}. Use device='cpu'.")
        if dev.index is not None and dev.index >= count:
            raise OptionError(
                f"device {device!r} does not exist: {count} CUDA device(s) here, cuda:0 to cuda:{count - 1}."
            )
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise OptionError(f"device {device!r} is not available on this machine. Use device='cpu'.")
    elif dev.type != "cpu":
        raise OptionError(f"device {device!r} is not supported; use 'cpu', 'cuda', 'cuda:N' or 'mps'.")
    if dev.type == "cpu" and dtype == torch.float16:
        warnings.warn(
            "float16 on CPU is about 10x slower than float32 (no half-precision kernels); "
            "use dtype='bfloat16' to halve memory at full speed.",
            HeadclassWarning,
            stacklevel=4,
        )
    return str(dev)


def _check_backend(backend: str) -> str:
    found = available_backends()
    if backend == "auto":
        if not found:
            raise OptionError("the installed TransformerLens offers neither TransformerBridge nor HookedTransformer.")
        return found[0]
    if backend not in ("bridge", "hooked"):
        raise OptionError(f"backend must be 'auto', 'bridge' or 'hooked'; got {backend!r}.")
    if backend not in found:
        raise OptionError(
            f"backend {backend!r} is not available with the installed TransformerLens "
            f"(available: {found}); 'bridge' needs TransformerLens >= 4, 'hooked' needs 2.x/3.x."
        )
    return backend


def _is_hf_model(obj: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, PreTrainedModel)


def _is_tl_model(obj: Any) -> bool:
    return type(obj).__name__ in ("TransformerBridge", "HookedTransformer") and hasattr(obj, "cfg")
