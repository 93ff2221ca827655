"""Configuration: probe settings, score options and label thresholds, validated once on load.

``configs/default.yaml`` (shipped as ``headclass/configs/default.yaml``) is the one source of
the defaults, with a comment per key. The pydantic models below declare only the *constraints*
(types, ranges, enumerations): no field has a default of its own, so a default can never be
written twice. A user file lists only the keys it changes; it is merged over the defaults and
the whole is validated in one step. Validation is strict and happens once, at the boundary
(:func:`load_config`); every layer below receives the typed :class:`HeadclassConfig`:

* unknown keys, wrong types (no ``"0.5"`` for a float, no ``true`` for an int), out-of-range
  values and unknown enumeration values are all named in one :class:`~headclass.errors.ConfigError`,
  e.g. ``thresholds.induction: input should be less than or equal to 1 (got 1.7)``;
* a YAML file with a key given twice, a file that is not UTF-8, a folder given as a file are
  errors that name the file.

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
import functools
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Mapping, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from headclass.errors import ConfigError

__all__ = ["HeadclassConfig", "Thresholds", "load_config", "default_config_path", "ConfigSource"]


class _Strict(BaseModel):
    # forbid: a typo such as `thresholds.inducton` must fail loudly, not be ignored.
    # strict: "0.5" is not a float and true is not an int (an int is still a float).
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, frozen=False)


_Fraction = Field(ge=0.0, le=1.0)


class RepeatedProbeConfig(_Strict):
    """Repeated random tokens ``[BOS] r r ...`` (induction, duplicate-token scores)."""

    n_sequences: int = Field(ge=1)
    segment_length: int = Field(ge=2)
    n_repeats: int = Field(ge=2)
    exclude_extreme_fraction: float = Field(ge=0.0, lt=0.5)


class TextProbeConfig(_Strict):
    """The natural-text probe (the shipped English corpus, or the caller's texts)."""

    n_sequences: int = Field(ge=1)
    max_tokens: int = Field(ge=8)


class ProbeConfig(_Strict):
    seed: int
    batch_size: int = Field(ge=1)
    repeated: RepeatedProbeConfig
    text: TextProbeConfig


class PatternScoreConfig(_Strict):
    """Options of the attention-pattern scores (see :mod:`headclass.scores.patterns`)."""

    diffuse_min_keys: int = Field(ge=2)
    max_offset: int = Field(ge=1)
    exclude_bos: bool
    local_window: int = Field(ge=2)


class WeightScoreConfig(_Strict):
    """Options of the weight-based scores (see :mod:`headclass.scores.weights`)."""

    top_k: int = Field(ge=1)
    copy_sample_size: int = Field(ge=1)
    copy_sample_min: int = Field(ge=1)
    copy_stop_z: float = Field(gt=0.0)
    effective_embedding: bool
    writes_nothing_below: float = Field(ge=0.0, lt=1.0)


class UncertaintyConfig(_Strict):
    """Standard errors, bootstrap confidence and borderline marks."""

    bootstrap: int = Field(ge=0)
    seed: int
    borderline_se: float = Field(ge=0.0)


class Thresholds(_Strict):
    """Label thresholds: a condition is ``score >= threshold``, except the ``*_max_*`` keys
    (``score <= threshold``); see :data:`headclass.taxonomy.RULES` for which is which.

    Pattern scores and the top-k copy scores are in [0, 1]; ``copy_eigen`` (the eigenvalue
    copying score) is in [-1, 1].
    """

    previous_token: float = _Fraction
    current_token: float = _Fraction
    bos: float = _Fraction
    induction: float = _Fraction
    duplicate_token: float = _Fraction
    fixed_offset: float = _Fraction
    diffuse_entropy: float = _Fraction
    diffuse_max_attention: float = _Fraction
    copy_eigen: float = Field(ge=-1.0, le=1.0)
    copy_topk: float = _Fraction
    copy_suppression_topk: float = _Fraction
    local: float = _Fraction
    local_max_single_offset: float = _Fraction
    delimiter: float = _Fraction
    delimiter_lift: float = Field(ge=1.0)
    content: float = _Fraction
    content_max_consistency: float = _Fraction
    successor: float = _Fraction
    no_op_max_gain: float = Field(ge=0.0)
    mixed_min_share: float = _Fraction
    min_free_attention: float = _Fraction
    mixed_min_total: float = _Fraction


class AblationConfig(_Strict):
    method: Literal["zero", "mean"]
    # exact: ablated forward runs (minutes on a 135M model); attribution: one forward and
    # backward per probe, a linear estimate (seconds; rank correlation ~0.8 on SmolLM2).
    mode: Literal["exact", "attribution"]
    induction_sequences: int = Field(ge=1)
    induction_segment_length: int = Field(ge=2)
    text_sequences: int = Field(ge=1)
    text_max_tokens: int = Field(ge=8)
    heads_per_pass: int = Field(ge=0)  # 0: all heads of a layer in one pass when memory allows


class HeadclassConfig(_Strict):
    """The whole configuration; ``configs/default.yaml`` has every key with its default and a
    comment. Build it with :func:`load_config` (``HeadclassConfig.defaults()`` for the defaults)."""

    probes: ProbeConfig
    patterns: PatternScoreConfig
    weights: WeightScoreConfig
    uncertainty: UncertaintyConfig
    thresholds: Thresholds
    ablation: AblationConfig

    @classmethod
    def defaults(cls) -> "HeadclassConfig":
        """The shipped defaults (a fresh copy)."""
        return load_config(None)


ConfigSource = Union[None, str, Path, Mapping[str, Any], HeadclassConfig]


def default_config_path() -> Path:
    """Path of the shipped ``default.yaml``."""
    return Path(str(resources.files("headclass") / "configs" / "default.yaml"))


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a mapping holding the same key twice (PyYAML keeps the last)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    where = repr(str(path))
    if path.is_dir():
        raise ConfigError(f"config {where} is a folder, not a YAML file; give the path of a .yaml file.")
    if not path.is_file():
        raise ConfigError(f"config file {where} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {where} is not UTF-8 text (byte {exc.start}); save it as UTF-8.") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {where}: {exc.strerror or exc}.") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {where} is not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {where} must hold a mapping of sections "
            f"({', '.join(HeadclassConfig.model_fields)}); got {type(data).__name__}."
        )
    return data


@functools.lru_cache(maxsize=1)
def _defaults() -> dict[str, Any]:
    return _read_yaml(default_config_path())


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
        elif item["type"] == "missing":
            lines.append(f"{where}: missing (configs/default.yaml must define every key)")
        else:
            lines.append(f"{where}: {item['msg'].lower()} (got {item.get('input')!r})")
    return f"invalid config {source}: " + "; ".join(lines)


def load_config(source: ConfigSource = None) -> HeadclassConfig:
    """Load and validate a configuration (the one place configs are validated).

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
        The file is missing, a folder, not UTF-8, not YAML or has a duplicate key, or any key
        is unknown, mistyped or out of range (all problems listed in one message).
    """
    if isinstance(source, HeadclassConfig):
        return source
    label = "(defaults)"
    if source is None:
        override: Mapping[str, Any] = {}
    elif isinstance(source, (str, Path)):
        if str(source) == "":
            raise ConfigError("config path is empty; give the path of a YAML file.")
        override = _read_yaml(Path(source).expanduser())
        label = f"in {str(source)!r}"
    elif isinstance(source, Mapping):
        override = source
        label = "(mapping)"
    else:
        raise ConfigError(
            f"config must be None, a YAML path, a mapping or a HeadclassConfig; got {type(source).__name__}."
        )
    try:
        return HeadclassConfig.model_validate(_merge(_defaults(), override))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, label)) from None
