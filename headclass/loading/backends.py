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

import contextlib
import copy
import mmap
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from headclass.heap import return_freed_memory
from headclass.loading.sources import safetensors_header

__all__ = [
    "transformer_lens_major",
    "available_backends",
    "build_tl_model",
    "load_folder_model",
    "placeholder_tokenizer",
    "has_tokenizer_files",
]

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
    return_freed_memory()
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
        if folder is not None and hf_model is None and tokenizer is None:
            tokenizer = _folder_tokenizer(folder)
        if folder is not None and hf_model is None:
            hf_model = load_folder_model(folder, dtype)
        if hf_model is not None:
            name = getattr(hf_model.config, "_name_or_path", None) or type(hf_model).__name__
            bridge = TransformerBridge.boot_transformers(
                str(name),
                hf_model=hf_model.to(device=device, dtype=dtype),
                tokenizer=tokenizer,
                device=device,
                dtype=dtype,
            )
        else:
            bridge = TransformerBridge.boot_transformers(
                hub_name or folder, device=device, dtype=dtype, tokenizer=tokenizer
            )
    with _lean_processing(bridge):
        bridge.enable_compatibility_mode(disable_warnings=True, **_PROCESSING)
    bridge.eval()
    _norms_without_unwatched_statistics(bridge)
    return bridge


def _norms_without_unwatched_statistics(bridge: Any) -> None:
    """Normalisations that skip computing what no hook watches (TransformerLens >= 4).

    With folded LayerNorm, TransformerLens 4.3's ``NormalizationBridge`` computes the norm
    twice per call: once in float32 for ``hook_scale`` / ``hook_normalized``, then again by the
    Hugging Face module, whose output it returns when no hook edited those values. When neither
    hook point has a hook of any kind, that output is all that is used, so only it is computed:
    the same tensor bit for bit (tests/loading), and ~8 % of a pattern pass saved (measured).
    A hooked norm takes TransformerLens' own path.
    """
    try:
        from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge
    except ImportError:  # another layout: keep TransformerLens' own forward
        return
    for module in bridge.modules():
        full = getattr(module, "_hf_autograd_forward_with_hooks", None)
        if isinstance(module, NormalizationBridge) and callable(full):
            module._hf_autograd_forward_with_hooks = _unwatched_norm(module, full)  # type: ignore[method-assign]


def _unwatched_norm(module: Any, full: Any) -> Any:
    points = [getattr(module, name, None) for name in ("hook_scale", "hook_normalized")]

    def forward(x: torch.Tensor) -> torch.Tensor:
        hf_norm = module.original_component
        watched = any(
            point is None
            or getattr(point, "fwd_hooks", None)
            or getattr(point, "bwd_hooks", None)
            or point._forward_hooks
            or point._forward_pre_hooks
            for point in points
        )
        if watched or hf_norm is None or isinstance(hf_norm, torch.nn.Identity) or torch.is_grad_enabled():
            return full(x)
        result = hf_norm(x)
        return result if result.dtype == x.dtype else result.to(x.dtype)

    return forward


# -- weight processing without a second copy of the weights (TransformerLens >= 4) -------------
#
# TransformerLens 4.3's ProcessWeights.process_weights upcasts every tensor to float32 first,
# and fold_layer_norm, center_unembed and fold_value_biases each start by cloning the whole
# state dict, while the model's parameters still hold the originals: a float32 Qwen2.5-0.5B
# peaked at 3.6x its weights while loading, a bfloat16 one at 8x. Here, for the duration of
# enable_compatibility_mode: the state dict becomes the only owner of the weights (the
# parameters it copies are swapped for meta placeholders until the processed weights are set),
# the three whole-dict clones are skipped and one dict is kept throughout (each result
# replaces its entry, so every original is freed as soon as it is replaced), W_U is centred in
# place, and half-precision weights are upcast one layer at a time for LayerNorm folding. The
# same TransformerLens functions do the arithmetic, so the
# processed weights are TransformerLens' own (tests/loading/test_big_models.py compares them).


@contextlib.contextmanager
def _lean_processing(bridge: Any) -> Iterator[None]:
    """Run ``enable_compatibility_mode`` with the lean processing above, where it applies."""
    from transformer_lens import weight_processing

    process = weight_processing.ProcessWeights
    if not all(hasattr(process, name) for name in _LEAN_NEEDS):  # another TL 4.x layout
        yield
        return
    stock = process.__dict__["process_weights"]
    released: list[tuple[torch.nn.Module, str]] = []

    def owning_state_dict(*args: Any, **kwargs: Any) -> dict:
        del bridge.__dict__["state_dict"]  # one call: the one process_weights makes
        state = type(bridge).state_dict(bridge, *args, **kwargs)
        released.extend(_release_parameters(bridge.original_model, state))
        return state

    lean = staticmethod(lambda *a, **k: _process_weights_lean(stock.__func__, *a, **k))
    stock_mlp = process.__dict__["_fold_mlp_layer_norm"]

    def fold_mlp(sd: dict, cfg: Any, layer: int, fold_biases: bool, center_weights: bool, adapter: Any, *rest: Any,
                 **kwargs: Any) -> dict:  # fmt: skip
        if rest or kwargs or not _fold_mlp_norm_in_place(sd, cfg, layer, fold_biases, center_weights, adapter):
            return stock_mlp.__func__(sd, cfg, layer, fold_biases, center_weights, adapter, *rest, **kwargs)
        return sd

    # for this call only, restored below
    process.process_weights = lean  # type: ignore[method-assign]
    process._fold_mlp_layer_norm = staticmethod(fold_mlp)  # type: ignore[method-assign,assignment]
    object.__setattr__(bridge, "state_dict", owning_state_dict)
    try:
        yield
    finally:
        process.process_weights = stock  # type: ignore[method-assign]
        process._fold_mlp_layer_norm = stock_mlp  # type: ignore[method-assign]
        bridge.__dict__.pop("state_dict", None)
    unset = [name for module, name in released if getattr(module._parameters.get(name), "is_meta", False)]
    if unset:
        raise RuntimeError(f"weight processing left {len(unset)} parameters without values: {unset[:5]}")


_LEAN_NEEDS = (
    "_fold_layer",
    "_fold_mlp_layer_norm",
    "_resolve_state_dict_key",
    "_fold_final_rms_bias",
    "_fold_unembed_layer_norm",
    "center_writing_weights",
    "center_unembed",
    "fold_value_biases",
    "_get_param_key",
    "convert_tensor_to_tl_format",
)


def _release_parameters(root: torch.nn.Module, state: dict) -> list[tuple[torch.nn.Module, str]]:
    """Swap every parameter that ``state`` holds as is for a meta placeholder of its shape.

    Parameters ``state`` only holds views of (GPT-2's fused ``c_attn``) keep their values.
    """
    # Same start and size: the tensor itself or a transposed view of it (the bridge's W_U).
    held = {(t.data_ptr(), t.numel()) for t in state.values() if isinstance(t, torch.Tensor)}
    released = []
    for module in root.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and not param.is_meta and (param.data_ptr(), param.numel()) in held:
                module._parameters[name] = torch.nn.Parameter(
                    param.detach().to("meta"), requires_grad=param.requires_grad
                )
                released.append((module, name))
    return released


@contextlib.contextmanager
def _no_clone() -> Iterator[None]:
    """``Tensor.clone`` returns its input: for the whole-dict copies of a sole-owner state dict."""
    clone = torch.Tensor.clone
    torch.Tensor.clone = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.clone = clone  # type: ignore[method-assign]


def _process_weights_lean(
    stock: Any,
    state_dict: dict,
    cfg: Any,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
    refactor_factored_attn_matrices: bool = False,
    adapter: Any = None,
) -> dict:
    """TransformerLens 4.3's ``ProcessWeights.process_weights``, step for step, without copies.

    ``state_dict`` (TransformerLens keys, ``blocks.{l}.attn.q.weight``...) must own its tensors.
    Paths this does not cover (refactored attention matrices, adapters that opt out of a step,
    LayerNorm models in half precision) run TransformerLens' own function.
    """
    from transformer_lens.weight_processing import ProcessWeights as process

    norm = getattr(cfg, "normalization_type", "LN")
    low = {
        k: v.dtype
        for k, v in state_dict.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float32
    }
    center = center_writing_weights and norm in ("LN", "LNPre") and not getattr(cfg, "final_rms", False)
    if (
        refactor_factored_attn_matrices
        or (low and norm in ("LN", "LNPre"))
        or (fold_ln and adapter is not None and not getattr(adapter, "supports_fold_ln", True))
        or (
            center_writing_weights
            and adapter is not None
            and not getattr(adapter, "supports_center_writing_weights", True)
        )
    ):
        return stock(
            state_dict,
            cfg,
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
            fold_value_biases=fold_value_biases,
            refactor_factored_attn_matrices=refactor_factored_attn_matrices,
            adapter=adapter,
        )
    sd = state_dict
    if fold_ln and norm in ("LN", "LNPre", "RMS", "RMSPre"):
        with_biases = norm in ("LN", "LNPre")
        gqa = "" if getattr(cfg, "n_key_value_heads", None) is None else "_"
        for layer in range(cfg.n_layers):
            _upcast(sd, low, lambda key, layer=layer: key.startswith(f"blocks.{layer}."))
            sd = _into(sd, process._fold_layer(sd, cfg, layer, with_biases, with_biases, adapter, gqa))
            _downcast(sd, low)
        # The final norm folds into the unembedding in the model's dtype: upcasting W_U would
        # hold it four times over (one bf16 ulp of difference, see the module notes).
        sd = _into(sd, process._fold_final_rms_bias(sd, cfg, with_biases, adapter))
        if with_biases or not _fold_unembed_rms_in_place(sd, cfg, process._get_param_key, adapter):
            sd = _into(sd, process._fold_unembed_layer_norm(sd, cfg, with_biases, with_biases, adapter))
        _downcast(sd, low)
    with _no_clone():
        if center:
            sd = _into(sd, process.center_writing_weights(sd, cfg, adapter=adapter))
        if center_unembed and not _center_unembed_in_place(sd, cfg, process._get_param_key, adapter):
            sd = _into(sd, process.center_unembed(sd, cfg=cfg, adapter=adapter))
        if fold_value_biases:
            sd = _into(sd, process.fold_value_biases(sd, cfg, adapter=adapter))
    if fold_value_biases and center:
        for layer in range(cfg.n_layers):
            key = process._get_param_key(f"blocks.{layer}.attn.b_O", adapter)
            if key in sd:
                b_O = process.convert_tensor_to_tl_format(key, sd, sd.get(key), cfg, adapter, layer)
                if b_O is not None:
                    sd[key] = process.convert_tensor_to_hf_format(key, b_O - b_O.mean(), cfg, adapter, layer)
    _downcast(sd, low)
    return sd


def _fold_unembed_rms_in_place(sd: dict, cfg: Any, param_key: Any, adapter: Any) -> bool:
    """``W_U *= g`` (the final RMSNorm's scale) in place, ``g`` set to the identity; False when not safe.

    TransformerLens' ``_fold_unembed_layer_norm`` writes the product into a new tensor, so the
    unembedding is held twice at the load's peak (+0.27 GB for a bf16 Qwen2.5-0.5B, +0.93 GB for
    a float32 1.5B). The same elementwise product in place rounds identically. Not done (False)
    when ``W_U`` shares its storage with another tensor (tied embeddings: ``W_E`` must keep its
    values) or when its axes are ambiguous; TransformerLens' function runs then.
    """
    w_key, g_key = param_key("unembed.W_U", adapter), param_key("ln_final.w", adapter)
    W_U, g = sd.get(w_key), sd.get(g_key)
    if not isinstance(W_U, torch.Tensor) or not isinstance(g, torch.Tensor) or W_U.ndim != 2 or g.ndim != 1:
        return False
    if W_U.shape[0] == W_U.shape[1] or g.shape[0] not in W_U.shape or W_U.dtype != g.dtype:
        return False
    storage = W_U.untyped_storage().data_ptr()
    if any(
        v is not W_U and isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() == storage for v in sd.values()
    ):
        return False  # tied to the embedding
    offset = bool(getattr(cfg, "rmsnorm_uses_offset", False))  # Gemma: the scale is 1 + w
    scale = 1.0 + g if offset else g
    W_U.mul_(scale[None, :] if W_U.shape[1] == g.shape[0] else scale[:, None])
    _set_identity(sd, g_key, torch.zeros_like(g) if offset else torch.ones_like(g), ("ln_final", "ln_f"))
    return True


def _set_identity(sd: dict, key: str, identity: torch.Tensor, spellings: tuple[str, str]) -> None:
    """``sd[key] = identity`` for a folded norm's scale, and the same under the key's other
    spelling where the state dict has that too (``spellings``: the long and the short one,
    ``ln_final`` / ``ln_f``, ``ln_2`` / ``ln2``), as TransformerLens' own folds reset both."""
    long, short = spellings
    other = key.replace(long, short) if long in key else key.replace(short, long)
    for name in {key, other}:
        if name in sd:
            sd[name] = identity


def _fold_mlp_norm_in_place(
    sd: dict, cfg: Any, layer: int, fold_biases: bool, center_weights: bool, adapter: Any
) -> bool:
    """``W_in *= g``, ``W_gate *= g`` (the layer's ``ln2`` scale) in place, ``g`` set to the
    identity; False where TransformerLens' ``_fold_mlp_layer_norm`` must run.

    TransformerLens writes each product into a new tensor: 56 fresh matrices of 55 MB for a
    float32 Qwen2.5-1.5B, 3.2 s of its load in page faults and copies (0.3 s in place). The same
    elementwise products round identically. Only the plain case is done here: an RMSNorm (or a
    LayerNorm without a bias to fold), a dense MLP (no experts), weights whose ``d_model`` axis
    is unambiguous and which share storage with no other tensor, no centring of the weights.
    """
    from transformer_lens.weight_processing import ProcessWeights as process

    def key(name: str) -> str:
        return process._resolve_state_dict_key(sd, process._get_param_key(f"blocks.{layer}.{name}", adapter), layer)

    if center_weights or getattr(cfg, "attn_only", False) or (getattr(cfg, "num_experts", None) or 0) > 0:
        return False
    g_key, b_key = key("ln2.w"), key("ln2.b")
    g = sd.get(g_key)
    if not isinstance(g, torch.Tensor) or g.ndim != 1 or (fold_biases and sd.get(b_key) is not None):
        return False
    names = ["mlp.W_in"] + (["mlp.W_gate"] if getattr(cfg, "gated_mlp", False) else [])
    found = [sd.get(key(name)) for name in names]
    weights = [w for w in found if isinstance(w, torch.Tensor)]
    d = g.shape[0]
    if len(weights) < len(names) or not all(
        w.ndim == 2 and w.dtype == g.dtype and (w.shape[0] == d) != (w.shape[1] == d) for w in weights
    ):
        return False
    mine = {id(w) for w in weights}
    storages = {w.untyped_storage().data_ptr() for w in weights}
    shared = [v for v in sd.values() if isinstance(v, torch.Tensor) and id(v) not in mine and v.numel() > 0]
    if len(storages) < len(weights) or any(v.untyped_storage().data_ptr() in storages for v in shared):
        return False  # fused or tied: the product must not reach another tensor
    offset = bool(getattr(cfg, "rmsnorm_uses_offset", False))  # Gemma: the scale is 1 + w
    scale = 1.0 + g if offset else g
    for w in weights:
        w.mul_(scale[None, :] if w.shape[1] == d else scale[:, None])
    _set_identity(sd, g_key, torch.zeros_like(g) if offset else torch.ones_like(g), ("ln_2", "ln2"))
    return True


# Bytes of the float32 block a half-precision W_U is summed in (its centring's mean): the load's
# peak is there, beside the untied W_U; 64 MB blocks held 0.05x of a bf16 Qwen-0.5B more.
_SUM_BLOCK_BYTES = 1 << 24


def _center_unembed_in_place(sd: dict, cfg: Any, param_key: Any, adapter: Any) -> bool:
    """``W_U -= W_U.mean(over the vocabulary)`` (and ``b_U``) in place; False when unsure of the axis.

    TransformerLens' ``center_unembed`` computes the same difference into new tensors, which
    holds the unembedding three times at once (the largest matrix of these models).
    """
    try:
        w_key, b_key = param_key("unembed.W_U", adapter), param_key("unembed.b_U", adapter)
    except (KeyError, ValueError):
        return False
    W_U, d_vocab = sd.get(w_key), int(getattr(cfg, "d_vocab", -1))
    if not isinstance(W_U, torch.Tensor) or W_U.ndim != 2 or W_U.shape[0] == W_U.shape[1]:
        return False
    axis = 0 if W_U.shape[0] == d_vocab else 1 if W_U.shape[1] == d_vocab else None
    if axis is None:
        return False
    if W_U.dtype in (torch.float32, torch.float64):
        W_U.sub_(W_U.mean(axis, keepdim=True))  # as TransformerLens computes it, bit for bit
    else:  # in float32 over vocabulary blocks: the mean of a bfloat16 W_U converts it whole
        total = torch.zeros_like(W_U.narrow(axis, 0, 1), dtype=torch.float32)
        rows = max(1, _SUM_BLOCK_BYTES // (4 * W_U.shape[1 - axis]))
        for block in W_U.split(rows, dim=axis):
            total += block.sum(axis, keepdim=True, dtype=torch.float32)
        W_U.sub_((total / W_U.shape[axis]).to(W_U.dtype))
    if isinstance(sd.get(b_key), torch.Tensor):
        sd[b_key].sub_(sd[b_key].mean())
    return True


def _into(sd: dict, result: dict) -> dict:
    """Keep one dict: a step that returns a new one would leave the caller's holding the old tensors."""
    if result is not sd:
        sd.clear()
        sd.update(result)
    return sd


def _upcast(sd: dict, low: dict, wanted: Any) -> None:
    for key in [k for k in sd if k in low and wanted(k)]:
        sd[key] = sd[key].float()


def _downcast(sd: dict, low: dict) -> None:
    """Back to the original dtypes; tensors created by folding take their weight's dtype."""
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
            continue
        dtype = low.get(key) or low.get(key.removesuffix(".bias") + ".weight")
        if dtype is not None:
            sd[key] = value.to(dtype)


def _build_hooked(hub_name, folder, hf_model, tokenizer, device, dtype):
    from transformer_lens import HookedTransformer

    if hub_name is not None and hf_model is None:
        return HookedTransformer.from_pretrained(hub_name, device=device, dtype=dtype, **_PROCESSING)
    import transformer_lens.loading_from_pretrained as loading

    if hf_model is None:
        hf_model = load_folder_model(folder, dtype)
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


def load_folder_model(folder: str, dtype: torch.dtype) -> Any:
    """The transformers model of a ``save_pretrained`` folder, its weights held once, in ``dtype``.

    ``from_pretrained`` memory-maps safetensors files: the mapped pages of every tensor that
    weight processing later replaces stay resident beside the replacement, and a dtype
    conversion holds the file and the converted copy at once. Here each tensor is copied (and
    converted) out of a private mapping of its file a block at a time, each block's pages
    dropped from the process once copied (:func:`_read_safetensors`), and the tensors are
    handed to ``from_pretrained(state_dict=...)``, which adopts them without copying. Other
    folders (``*.bin``, sharded indexes that name other files, dtypes this reader does not
    know) and systems without ``madvise`` take ``from_pretrained`` as usual.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    files = sorted(Path(folder).glob("*.safetensors"))
    others = [p for p in Path(folder).iterdir() if p.suffix in (".bin", ".pt", ".pth")]
    headers = [safetensors_header(path) for path in files]
    known = all(entry["dtype"] in _STORED_DTYPES for header, _ in headers for entry in header.values())
    if not files or others or not known or not hasattr(mmap, "MADV_DONTNEED") or sys.byteorder != "little":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    state: dict[str, torch.Tensor] = {}
    for path, (header, data_start) in zip(files, headers):
        state.update(_read_safetensors(path, header, data_start, dtype))
    model_class: Any = AutoModelForCausalLM._model_mapping[type(config)]  # the class for this config
    model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    model.config._name_or_path = str(folder)
    return model.eval()


# Tensors are copied out of the file's mapping in blocks of this size, and each block's pages are
# dropped once copied: the file never holds more than this beside the copies in resident memory.
_READ_BLOCK_BYTES = 1 << 26

# safetensors' dtype names (its format's specification)
_STORED_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_safetensors(
    path: Path, header: dict[str, Any], data_start: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, floating-point ones in ``dtype``, others as stored.

    Copied out of a private mapping of the file by ``torch`` (both cores) ``_READ_BLOCK_BYTES``
    at a time, and each block's pages ``MADV_DONTNEED``-ed once copied: they stay in the page
    cache, not in this process. Reading Qwen-1.5B's 7.1 GB: 3.0-3.5 s, against 7.1-7.8 s with
    ``os.preadv`` into the same tensors and 7.7-9.7 s with safetensors' ``pread`` backend (whose
    slices read the whole tensor each time: converting a 544 MB embedding in 64 MB blocks read
    it 9 times), the same peak resident memory.
    """
    tensors: dict[str, torch.Tensor] = {}
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
        for key, entry in header.items():
            tensors[key] = _copy_out(mapped, data_start, entry, dtype)
    return tensors


def _copy_out(mapped: mmap.mmap, data_start: int, entry: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    stored = _STORED_DTYPES[entry["dtype"]]
    out = torch.empty(entry["shape"], dtype=dtype if stored.is_floating_point else stored)
    begin = data_start + entry["data_offsets"][0]
    size = stored.itemsize
    count = out.numel()
    if count == 0:
        return out
    source = torch.frombuffer(mapped, dtype=stored, count=count, offset=begin)
    target = out.view(-1)
    step = max(1, _READ_BLOCK_BYTES // size)
    for first in range(0, count, step):
        last = min(count, first + step)
        target[first:last].copy_(source[first:last])  # converts the dtype
        _drop_pages(mapped, begin + first * size, (last - first) * size)
    return out


def _drop_pages(mapped: mmap.mmap, offset: int, length: int) -> None:
    """Release the whole pages of ``[offset, offset + length)`` from this process' mapping."""
    first = offset // mmap.PAGESIZE * mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, first, offset + length - first)


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
    PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=special, eos_token=special, unk_token="t0", pad_token=special
    ).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def has_tokenizer_files(folder: str) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    return any((Path(folder) / name).is_file() for name in names)


def _folder_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    if not has_tokenizer_files(path):
        return None
    # TransformerLens reloads a tokenizer that has a BOS token with add_bos_token=True
    # (get_tokenizer_with_bos: 0.6 s more for Qwen's); asking for it first loads it once.
    for options in ({"add_bos_token": True}, {}):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **options)
        except (OSError, ValueError, TypeError):
            continue
        if options and tokenizer.bos_token is None:
            continue  # nothing to prepend: load it as saved
        return tokenizer
    return None  # a folder saved without a tokenizer: token ids only
