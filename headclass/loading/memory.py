"""Will the model fit? A check before loading, so that a model too large for this machine is one
clear line instead of minutes of loading and a process killed without a word.

The weights' bytes in the requested dtype come from the weight files' headers (safetensors
files of a folder, of an alias' dequantised folder or of a hub model, read from the local
cache or, before anything is downloaded, from the hub; the tensor table of a GGUF file); the
memory left is Linux's ``MemAvailable`` (free memory plus the page cache the kernel can drop),
lowered to the cgroup's limit where a container has one. Loading with the bridge holds the
weights once (:func:`~headclass.loading.backends.load_folder_model`), HookedTransformer several
times (:data:`HOOKED_LOAD_LEAST`), and ``classify`` peaks at 1.14-1.30x the weights on
Qwen2.5-Coder 0.5B / 1.5B (docs/scaling.md), so:

* weights larger than the memory available, or a HookedTransformer load that surely is:
  :class:`~headclass.errors.OutOfMemoryError`, before anything is read (the load could not
  finish);
* weights that fit, but not the expected peak (:func:`classify_peak_bytes`, or
  HookedTransformer's load): a :class:`~headclass.errors.HeadclassWarning`, and the load goes
  on.

Weights in ``*.bin`` files only (pickles: no header) are sized from the model's config instead,
built on the meta device. Where a size or the memory available cannot be read (a hub model not
cached while ``HF_HUB_OFFLINE`` is set, an architecture transformers does not know, a system
without ``/proc/meminfo``) nothing is checked. ``HEADCLASS_MEMORY_CHECK=0`` skips the check (for
a machine whose swap or overcommit you trust).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from headclass.errors import HeadclassWarning, OutOfMemoryError
from headclass.loading.backends import _STORED_DTYPES
from headclass.loading.sources import hub_offline, safetensors_header

__all__ = [
    "CLASSIFY_FIXED_BYTES",
    "CLASSIFY_PEAK",
    "HOOKED_LOAD_LEAST",
    "HOOKED_LOAD_MOST",
    "available_memory_bytes",
    "check_fits",
    "config_weight_bytes",
    "classify_peak_bytes",
    "folder_weight_bytes",
    "gguf_weight_bytes",
    "hub_config_weight_bytes",
    "hub_weight_bytes",
    "load_peak_bytes",
]

#: Classify's peak resident memory, as the warning assumes it: ``CLASSIFY_PEAK`` times the
#: weights' bytes plus :data:`CLASSIFY_FIXED_BYTES` (:func:`classify_peak_bytes`). The factor is
#: the largest measured on the Qwen models (1.30x, Qwen2.5-Coder-0.5B bfloat16, RESULTS.md); the
#: fixed part is what no model size scales (the tokenizer, Python objects, the heap's free
#: blocks), the most that SmolLM2's measured peaks lie above 1.3x its weights (1.12 GB float32
#: at 0.54 GB of weights, docs/scaling.md): a small model's peak is mostly that.
CLASSIFY_PEAK = 1.3
CLASSIFY_FIXED_BYTES = 450_000_000

#: HookedTransformer (TransformerLens 2.x/3.x, backend ``"hooked"``) holds the transformers
#: model, its own initialised parameters, the converted state dict and the processing's copies
#: at once while it loads: its peak above the imports, in multiples of the weights' float32
#: bytes whatever the dtype, was 3.89 / 4.40 (Qwen2.5-Coder-0.5B float32 / bfloat16) and 4.66 /
#: 5.41 (SmolLM2-135M, with its tokenizer; benchmarks/bench_load.py, RESULTS.md). A load is
#: refused below the least of them (it cannot finish) and warned about below the most. The
#: bridge (TransformerLens 4) holds the weights once.
HOOKED_LOAD_LEAST = 3.8
HOOKED_LOAD_MOST = 5.5

# Environment variable that turns the check off ("0").
_SWITCH = "HEADCLASS_MEMORY_CHECK"

# cgroup v1 reports "no limit" as a huge number (2^63 rounded down to a page)
_NO_LIMIT = 1 << 60


def available_memory_bytes(
    meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")
) -> Optional[int]:
    """Bytes this process can still fill: ``MemAvailable``, or less where the cgroup's limit
    (v2 ``memory.max`` - ``memory.current``, v1 ``memory.limit_in_bytes`` -
    ``memory.usage_in_bytes``) leaves less. ``None`` where ``meminfo`` cannot be read."""
    try:
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024  # "23481088 kB"
    except (OSError, KeyError, ValueError, IndexError):
        return None
    for limit_file, usage_file in (
        (cgroup / "memory.max", cgroup / "memory.current"),
        (cgroup / "memory" / "memory.limit_in_bytes", cgroup / "memory" / "memory.usage_in_bytes"),
    ):
        try:
            limit_text = limit_file.read_text().strip()
            if limit_text == "max" or int(limit_text) >= _NO_LIMIT:
                continue
            available = min(available, max(0, int(limit_text) - int(usage_file.read_text().strip())))
        except (OSError, ValueError):
            continue
    return available


# safetensors' dtype names that the folder reader does not know (it hands such files to
# transformers, which converts the floating ones too): the rest are kept as stored
_OTHER_WIDTHS = {"U16": 2, "U32": 4, "U64": 8}


def _bytes_in(numel: int, stored: str, dtype: torch.dtype) -> int:
    # floating-point tensors (F64 ... F8_E4M3, BF16) are converted to the dtype asked for, the
    # others kept as stored, as the folder reader does (backends._STORED_DTYPES)
    known = _STORED_DTYPES.get(stored)
    if known is not None and not known.is_floating_point:
        return numel * known.itemsize
    if known is not None or stored.startswith(("F", "BF")):
        return numel * dtype.itemsize
    return numel * _OTHER_WIDTHS.get(stored, 1)


def _safetensors_bytes(files: list[Path], dtype: torch.dtype) -> int:
    total = 0
    for path in files:
        header, _ = safetensors_header(path)
        for entry in header.values():
            total += _bytes_in(math.prod(int(dim) for dim in entry["shape"]), str(entry["dtype"]), dtype)
    return total


def folder_weight_bytes(folder: Union[str, Path], dtype: torch.dtype) -> Optional[int]:
    """Bytes of a Hugging Face folder's tensors in ``dtype`` (floating-point ones; integer
    buffers as stored), from its safetensors headers; ``None`` without safetensors files."""
    files = sorted(Path(folder).glob("*.safetensors"))
    return _safetensors_bytes(files, dtype) if files else None


def hub_weight_bytes(name: str, dtype: torch.dtype, revision: Optional[str] = None) -> Optional[int]:
    """Bytes of a hub model's tensors in ``dtype``, before any weight is downloaded.

    From the local Hugging Face cache where its safetensors files all are (one file, or every
    shard its index names); otherwise, unless ``HF_HUB_OFFLINE`` is set, from the hub itself:
    ``huggingface_hub.get_safetensors_metadata`` reads each file's header with a ranged request
    (kilobytes, where the weights of a 7B model are 15 GB). ``None`` where neither answers (a
    repository without safetensors files, a hub that cannot be reached): the load tells.
    """
    cached = _cached_hub_bytes(name, dtype, revision)
    if cached is not None or hub_offline():
        return cached
    try:
        from huggingface_hub import get_safetensors_metadata

        counts = get_safetensors_metadata(name, revision=revision).parameter_count  # {"BF16": n, ...}
    except Exception:  # an answer it cannot read is a model it cannot size: the load will tell
        return None
    return sum(_bytes_in(int(numel), str(stored), dtype) for stored, numel in counts.items()) or None


def _cached_hub_bytes(name: str, dtype: torch.dtype, revision: Optional[str]) -> Optional[int]:
    try:
        import json

        from huggingface_hub import try_to_load_from_cache

        single = try_to_load_from_cache(name, "model.safetensors", revision=revision)
        if isinstance(single, str):
            return _safetensors_bytes([Path(single)], dtype)
        index = try_to_load_from_cache(name, "model.safetensors.index.json", revision=revision)
        if not isinstance(index, str):
            return None
        shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        paths = [try_to_load_from_cache(name, shard, revision=revision) for shard in shards]
        if not all(isinstance(path, str) for path in paths):
            return None
        return _safetensors_bytes([Path(str(path)) for path in paths], dtype)
    except Exception:  # a cache it cannot read is a model it cannot size: the load will tell
        return None


def config_weight_bytes(config: Any, dtype: torch.dtype) -> Optional[int]:
    """Bytes of the parameters a transformers ``config`` describes, in ``dtype``: the model built
    on the meta device (no memory; 0.85 s for Llama-3-70B's config) and its parameters counted,
    tied ones once. For weights without a header to read (``*.bin`` files only: the pickles of
    older checkpoints, Pythia's training revisions); ``None`` where transformers cannot build it."""
    try:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return sum(p.numel() for p in model.parameters()) * dtype.itemsize or None
    except Exception:  # an architecture transformers does not know: the load reports it
        return None


def hub_config_weight_bytes(name: str, dtype: torch.dtype, revision: Optional[str] = None) -> Optional[int]:
    """:func:`config_weight_bytes` of a hub model's ``config.json`` (from the cache, or a small
    download where the hub may be asked); ``None`` where it cannot be had."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name, revision=revision)
    except Exception:  # no config to be had: the load reports why
        return None
    return config_weight_bytes(config, dtype)


def gguf_weight_bytes(path: Union[str, Path], dtype: torch.dtype) -> Optional[int]:
    """Bytes of a GGUF file's tensors once dequantised to ``dtype`` (its tensor table, read by
    the ``gguf`` package); ``None`` where that package is missing or the file unreadable."""
    try:
        from gguf import GGUFReader

        return sum(int(tensor.n_elements) * dtype.itemsize for tensor in GGUFReader(str(path)).tensors)
    except Exception:  # the loader itself reports a bad file, with its own message
        return None


def load_peak_bytes(weight_bytes: int, dtype: torch.dtype, backend: str) -> tuple[int, int]:
    """The least and the most resident memory the load itself needs for weights of
    ``weight_bytes`` in ``dtype``: the weights once with the bridge; with HookedTransformer
    (``backend="hooked"``) :data:`HOOKED_LOAD_LEAST` and :data:`HOOKED_LOAD_MOST` times their
    float32 bytes."""
    if backend == "hooked":
        float32 = weight_bytes * 4 / dtype.itemsize
        return int(HOOKED_LOAD_LEAST * float32), int(HOOKED_LOAD_MOST * float32)
    return weight_bytes, weight_bytes


def classify_peak_bytes(weight_bytes: int) -> int:
    """Classify's expected peak resident memory for weights of ``weight_bytes`` (above the
    imports): ``CLASSIFY_PEAK * weight_bytes + CLASSIFY_FIXED_BYTES``."""
    return int(CLASSIFY_PEAK * weight_bytes) + CLASSIFY_FIXED_BYTES


def check_fits(
    weight_bytes: Union[Optional[int], Callable[[], Optional[int]]],
    dtype: torch.dtype,
    what: str,
    *,
    classify: bool = True,
    backend: str = "bridge",
) -> None:
    """Refuse (or warn about) a model whose weights take ``weight_bytes`` in ``dtype``.

    Raises :class:`~headclass.errors.OutOfMemoryError` when the load itself
    (:func:`load_peak_bytes`: the weights alone with ``backend="bridge"``, several copies
    with ``"hooked"``) exceeds the memory available; with ``classify``, warns when classify's
    peak (:func:`classify_peak_bytes`) does (``classify=False`` for a step that holds nothing
    else, such as dequantising a GGUF file).
    ``weight_bytes`` may be a function that returns them: it is called only when the check is
    on (sizing from the hub asks the network, from a config builds a model on the meta device).
    Nothing when either is unknown or ``HEADCLASS_MEMORY_CHECK=0``.
    """
    if os.environ.get(_SWITCH, "").strip() == "0":
        return
    if callable(weight_bytes):
        weight_bytes = weight_bytes()
    if weight_bytes is None:
        return
    available = available_memory_bytes()
    if available is None:
        return
    name = str(dtype).replace("torch.", "")
    hint = f"try dtype bfloat16 ({weight_bytes / 2e9:.1f} GB of weights)" if dtype == torch.float32 else ""
    least, most = load_peak_bytes(weight_bytes, dtype, backend)
    hooked = backend == "hooked"  # its load holds several copies: its own refusal and warning
    bridge = (
        f"install TransformerLens >= 4, whose 'bridge' backend holds the weights once ({weight_bytes / 1e9:.1f} GB)"
    )
    if weight_bytes > available:
        raise OutOfMemoryError(
            f"{what} needs {weight_bytes / 1e9:.1f} GB for its weights in {name} alone, and only "
            f"{available / 1e9:.1f} GB of memory is available: {hint + ', ' if hint else ''}free memory "
            f"or use a larger machine ({_SWITCH}=0 skips this check)."
        )
    if hooked and least > available:
        raise OutOfMemoryError(
            f"{what} needs at least {least / 1e9:.1f} GB to load with the 'hooked' backend (HookedTransformer "
            f"holds {HOOKED_LOAD_LEAST}-{HOOKED_LOAD_MOST}x its float32 weights at once while it processes them), "
            f"and only {available / 1e9:.1f} GB of memory is available: {bridge}, free memory or use a larger "
            f"machine ({_SWITCH}=0 skips this check)."
        )
    peak = classify_peak_bytes(weight_bytes)
    if hooked and most > peak:  # HookedTransformer's load, not classify, sets the peak
        peak, reason, hint = (
            most,
            f"loading it with the 'hooked' backend peaks at up to {HOOKED_LOAD_MOST}x its float32 weights",
            bridge,
        )
    else:
        reason = f"classify peaks at about {CLASSIFY_PEAK}x that plus {CLASSIFY_FIXED_BYTES / 1e9:.2f} GB"
    if classify and peak > available:
        warnings.warn(
            f"{what} has {weight_bytes / 1e9:.1f} GB of weights in {name}; {reason} ({peak / 1e9:.1f} GB) and "
            f"{available / 1e9:.1f} GB of memory is available, so it may run out of memory"
            f"{': ' + hint if hint else ''}.",
            HeadclassWarning,
            stacklevel=3,
        )
