"""Configuration: probe settings, score options and label thresholds, validated on load.

The defaults live in ``configs/default.yaml`` (shipped inside the package as
``headclass/configs/default.yaml``). A user file only needs the keys it changes; it is merged
over the defaults and then validated as a whole. Validation is strict: unknown keys, wrong
types and out-of-range values are all named in one :class:`~headclass.errors.ConfigError`,
e.g. ``thresholds.induction: must be <= 1 (got 1.7)``.

Examples
--------
>>> from headclass.config import load_config
>>> cfg = load_config()                                    # the shipped defaults
>>> cfg = load_config({"thresholds": {"induction": 0.5}})  # a partial override
>>> cfg.thresholds.induction
0.5
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from headclass.errors import ConfigError

__all__ = ["HeadclassConfig", "load_config", "default_config_path"]

class _Strict(BaseModel):
    # forbid: a typo such as `thresholds.inducton` must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class RepeatedProbeConfig(_Strict):
    """Repeated random tokens ``[BOS] r r ...`` (induction, duplicate-token scores)."""

    n_sequences: int = Field(16, ge=1)
    segment_length: int = Field(64, ge=2)
    n_repeats: int = Field(2, ge=2)
    # Fraction of the ordinary vocabulary dropped at each frequency extreme, when the
    # tokenizer gives frequency information (BPE merge rank); 0 keeps everything.
    exclude_extreme_fraction: float = Field(0.0, ge=0.0, lt=0.5)


class TextProbeConfig(_Strict):
    """The natural-text probe (the shipped English corpus, or the caller's texts)."""

    n_sequences: int = Field(16, ge=1)
    max_tokens: int = Field(128, ge=8)


class ProbeConfig(_Strict):
    seed: int = 0
    batch_size: int = Field(8, ge=1)
    repeated: RepeatedProbeConfig = RepeatedProbeConfig()
    text: TextProbeConfig = TextProbeConfig()


class PatternScoreConfig(_Strict):
    """Options of the attention-pattern scores (see :mod:`headclass.scores.patterns`)."""

    # Diffuse score: queries that see fewer keys than this are skipped (entropy over
    # 1-3 keys says little about a head).
    diffuse_min_keys: int = Field(4, ge=2)
    # Fixed-offset score: offsets k = 1..max_offset are tried.
    max_offset: int = Field(8, ge=1)
    # Previous-token / duplicate / induction: ignore attention to position 0 (BOS) when
    # True, as TransformerLens' detect_head(exclude_bos=True) does.
    exclude_bos: bool = False


class WeightScoreConfig(_Strict):
    """Options of the weight-based scores (see :mod:`headclass.scores.weights`)."""

    top_k: int = Field(5, ge=1)
    copy_sample_size: int = Field(2000, ge=1)
    # Pass token embeddings through the first MLP ("effective embedding", IOI paper).
    effective_embedding: bool = False


class Thresholds(_Strict):
    """A head gets a label when its score is >= the label's threshold.

    Pattern scores and the top-k copy scores are in [0, 1]; ``copy_eigen`` (the eigenvalue
    copying score) is in [-1, 1].
    """

    previous_token: float = Field(0.4, ge=0.0, le=1.0)
    current_token: float = Field(0.4, ge=0.0, le=1.0)
    bos: float = Field(0.6, ge=0.0, le=1.0)
    induction: float = Field(0.4, ge=0.0, le=1.0)
    duplicate_token: float = Field(0.4, ge=0.0, le=1.0)
    fixed_offset: float = Field(0.4, ge=0.0, le=1.0)
    diffuse_entropy: float = Field(0.8, ge=0.0, le=1.0)
    diffuse_max_attention: float = Field(0.3, ge=0.0, le=1.0)
    copy_eigen: float = Field(0.7, ge=-1.0, le=1.0)
    copy_topk: float = Field(0.5, ge=0.0, le=1.0)
    copy_suppression_topk: float = Field(0.5, ge=0.0, le=1.0)


class AblationConfig(_Strict):
    method: str = Field("mean", pattern="^(zero|mean)$")
    # exact: ablated forward runs (minutes on a 135M model); attribution: one forward and
    # backward per probe, a linear estimate (seconds; rank correlation ~0.8 on SmolLM2).
    mode: str = Field("exact", pattern="^(exact|attribution)$")
    induction_sequences: int = Field(4, ge=1)
    induction_segment_length: int = Field(64, ge=2)
    text_sequences: int = Field(4, ge=1)
    text_max_tokens: int = Field(128, ge=8)
    heads_per_pass: int = Field(0, ge=0)  # 0: all heads of a layer in one pass when memory allows


class HeadclassConfig(_Strict):
    """The whole configuration; see ``configs/default.yaml`` for every key with comments."""

    probes: ProbeConfig = ProbeConfig()
    patterns: PatternScoreConfig = PatternScoreConfig()
    weights: WeightScoreConfig = WeightScoreConfig()
    thresholds: Thresholds = Thresholds()
    ablation: AblationConfig = AblationConfig()


def default_config_path() -> Path:
    """Path of the shipped ``default.yaml``."""
    return Path(str(resources.files("headclass") / "configs" / "default.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of sections "
            f"(probes, patterns, weights, thresholds, ablation); got {type(data).__name__}."
        )
    return data


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key (check the spelling against configs/default.yaml)")
        else:
            lines.append(f"{where}: {item['msg'].lower()} (got {item.get('input')!r})")
    return f"invalid config {source}:\n  " + "\n  ".join(lines)


def load_config(
    source: Union[None, str, Path, Mapping[str, Any], HeadclassConfig] = None,
) -> HeadclassConfig:
    """Load and validate a configuration.

    Parameters
    ----------
    source
        ``None`` for the shipped defaults; a path to a YAML file; a (possibly partial) mapping;
        or an already built :class:`HeadclassConfig` (returned as is).

    Returns
    -------
    HeadclassConfig
        The defaults with ``source`` merged over them.

    Raises
    ------
    ConfigError
        The file is missing or not YAML, or any key is unknown, mistyped or out of range
        (all problems are listed in one message).
    """
    if isinstance(source, HeadclassConfig):
        return source
    defaults = _read_yaml(default_config_path())
    label = "(defaults)"
    if source is None:
        override: Mapping[str, Any] = {}
    elif isinstance(source, (str, Path)):
        override = _read_yaml(Path(source))
        label = f"in {str(source)!r}"
    elif isinstance(source, Mapping):
        override = source
        label = "(mapping)"
    else:
        raise ConfigError(
            f"config must be None, a YAML path, a mapping or a HeadclassConfig; "
            f"got {type(source).__name__}."
        )
    try:
        return HeadclassConfig.model_validate(_merge(defaults, override))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, label)) from None
