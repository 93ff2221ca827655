"""The sweep spec: which models, which config, how to run; validated strictly, planned into jobs.

A spec is a YAML file or a mapping::

    models:
      - source: smollm2-135m
      - source: EleutherAI/pythia-160m
        revision: step1000            # a training checkpoint on the hub
      - source: ./toy-2l/checkpoints/step-400
        name: toy-2l@400
        config: {thresholds: {induction: 0.5}}   # per-source overrides
    config: my.yaml                   # or an inline mapping (only the keys to change)

Every key is checked (unknown keys, wrong types and out-of-range values are errors, reported in
one line); relative paths in a spec file (``config``, folder sources) are relative to the spec
file's folder. :func:`plan` turns a valid spec into one :class:`Job` per source: the resolved
source, the full config, a display name, a unique file stem and the :attr:`Job.key` hash that
decides whether a finished part can be reused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from headclass.errors import ConfigError

__all__ = ["SweepSpec", "ModelEntry", "SweepSpecError", "Job", "load_spec", "plan", "SWEEP_FORMAT"]

#: Bump when the part format or the work done per source changes: older parts are recomputed.
SWEEP_FORMAT = 1

ConfigSource = Union[None, str, dict[str, Any]]


class SweepSpecError(ConfigError):
    """The sweep spec is missing, not YAML, or breaks a rule (named in the one-line message)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelEntry(_Strict):
    """One source of a sweep.

    ``source``: anything :func:`headclass.load_model` takes by name (alias, hub name, folder,
    ``.gguf`` file). ``revision``: a hub branch, tag or commit (hub sources only). ``name``:
    display name (default: derived from the source). ``config``: overrides merged over the
    sweep's ``config`` for this source only (a mapping or a YAML path). ``step``: the training
    step, for plots against training (default: read from ``revision`` ``stepN`` or a folder
    named ``step-N``). ``family``: groups models of one family for plots against parameter
    count (default: the name less a size token such as ``-0.5b`` or ``-135m``).
    """

    source: str = Field(min_length=1)
    revision: Optional[str] = Field(None, min_length=1)
    name: Optional[str] = Field(None, min_length=1)
    config: ConfigSource = None
    step: Optional[int] = Field(None, ge=0)
    family: Optional[str] = Field(None, min_length=1)


class SweepSpec(_Strict):
    """A whole sweep: ``models`` (at least one) and one ``config`` for all, plus run options.

    ``device``, ``dtype``, ``backend``: passed to :func:`headclass.load_model`. ``ablation``:
    also ablate every head (slow). ``num_cpus``: CPUs per source (torch threads, and the Ray
    task's ``num_cpus``). ``num_gpus``: GPUs per Ray task (default 1 when ``device`` is cuda,
    else 0). ``memory_gb``: memory a Ray task reserves (default: estimated from the model's
    size and dtype). ``max_retries``: how often Ray reruns a source whose worker died.
    ``n_bins``: relative-depth bins of the comparison report.
    """

    models: list[ModelEntry] = Field(min_length=1)
    config: ConfigSource = None
    device: str = "cpu"
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    backend: Literal["auto", "bridge", "hooked"] = "auto"
    ablation: bool = False
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: Optional[float] = Field(None, ge=0)
    memory_gb: Optional[float] = Field(None, gt=0)
    max_retries: int = Field(3, ge=0)
    n_bins: int = Field(10, ge=1)


def _describe(error: ValidationError, label: str) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        # pydantic names the union member tried (e.g. "config.str"); keep the user's key only
        where = re.sub(r"\.(str|dict\[str,any\]|function-after\[.*?\])(?=\.|$)", "", where)
        if item["type"] == "extra_forbidden":
            model = ModelEntry if item["loc"][0] == "models" else SweepSpec
            parts.append(f"{where}: unknown key (keys: {', '.join(model.model_fields)})")
        elif item["type"] == "missing":
            parts.append(f"{where}: field required")
        else:
            parts.append(f"{where}: {item['msg'].lower()} (got {item.get('input')!r})")
    unique = list(dict.fromkeys(parts))
    return f"invalid sweep spec {label}: " + "; ".join(unique)


def load_spec(spec: Union[str, os.PathLike, Mapping[str, Any], SweepSpec]) -> tuple[SweepSpec, Path]:
    """Validate a spec (YAML path, mapping or :class:`SweepSpec`).

    Returns the spec and the folder its relative paths are relative to (the spec file's
    folder; the working directory for a mapping).

    Raises
    ------
    SweepSpecError
        One line naming every problem, e.g. ``invalid sweep spec 'a.yaml': models.1.sorce:
        unknown key; models.1.source: field required``.
    """
    if isinstance(spec, SweepSpec):
        return spec, Path.cwd()
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise SweepSpecError(f"sweep spec {str(path)!r} does not exist.")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise SweepSpecError(f"sweep spec {str(path)!r} is not valid YAML: {' '.join(str(exc).split())}") from None
        label, base = repr(str(path)), path.resolve().parent
    elif isinstance(spec, Mapping):
        data, label, base = dict(spec), "(mapping)", Path.cwd()
    else:
        raise SweepSpecError(f"a sweep spec must be a YAML path, a mapping or a SweepSpec; got {type(spec).__name__}.")
    if not isinstance(data, dict):
        raise SweepSpecError(
            f"invalid sweep spec {label}: must be a mapping with 'models' and 'config'; got {type(data).__name__}."
        )
    try:
        return SweepSpec.model_validate(data), base
    except ValidationError as exc:
        raise SweepSpecError(_describe(exc, label)) from None


@dataclass(frozen=True)
class Job:
    """One source to classify: everything a worker needs, as plain picklable data."""

    index: int
    name: str
    stem: str
    source: str
    revision: Optional[str]
    config: dict[str, Any]
    device: str
    dtype: str
    backend: str
    ablation: bool
    threads: int
    step: Optional[int] = None
    family: Optional[str] = None
    series: Optional[str] = None
    key: str = ""

    def record(self) -> dict[str, Any]:
        """The job's facts for ``summary.json`` and part sidecars (no config)."""
        return {
            "name": self.name,
            "stem": self.stem,
            "source": self.source,
            "revision": self.revision,
            "step": self.step,
            "family": self.family,
            "series": self.series,
            "key": self.key,
        }


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _config_mapping(config: ConfigSource, base: Path, where: str) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, dict):
        return config
    path = Path(config).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise SweepSpecError(f"{where}: config file {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        raise SweepSpecError(f"{where}: config file {str(path)!r} is not valid YAML: {reason}") from None
    if data is not None and not isinstance(data, dict):
        raise SweepSpecError(f"{where}: config file {str(path)!r} must hold a mapping; got {type(data).__name__}.")
    return data or {}


def _resolve_source(source: str, base: Path) -> str:
    from headclass.loading.sources import looks_like_path

    if source.startswith(("./", "../", ".\\", "..\\")) or source in (".", ".."):
        return str((base / source).resolve())
    if source.startswith("~"):
        return str(Path(source).expanduser().resolve())
    if not os.path.isabs(source) and (base / source).exists() and looks_like_path(str(base / source)):
        return str((base / source).resolve())
    return source


def _slug(text: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._@-]+", "-", text).replace("@", "-at-")
    return stem.strip("-.") or "model"


_STEP_REVISION = re.compile(r"^step[-_]?(\d+)$")
_SIZE_TOKEN = re.compile(r"[-_.]?\d+(?:\.\d+)?[mMbB](?=$|[-_.])")


def _default_name(source: str, given: str, revision: Optional[str], step: Optional[int]) -> str:
    if revision:
        return f"{given}@{revision}"
    path = Path(source)
    if path.is_absolute() or os.sep in given:
        if step is not None and path.parent.name == "checkpoints":
            return f"{path.parent.parent.name}@{step}"
        return path.name or given
    return given


def _series(name: str, source: str, step: Optional[int]) -> Optional[str]:
    if step is None:
        return None
    if "@" in name:
        return name.rsplit("@", 1)[0]
    path = Path(source)
    if path.parent.name == "checkpoints":
        return path.parent.parent.name
    return path.parent.name or source


def _family(name: str) -> Optional[str]:
    base = name.rsplit("@", 1)[0].rsplit("/", 1)[-1]
    stripped = _SIZE_TOKEN.sub("", base)
    return stripped if stripped and stripped != base else None


def _fingerprint(source: str) -> Optional[list[Any]]:
    """Names, sizes and modification times of a local folder's (or file's) files: a retrained
    folder at the same path is not mistaken for the old one."""
    path = Path(source)
    if not path.is_absolute() or not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def job_key(job_fields: Mapping[str, Any]) -> str:
    """sha256 of everything that determines a part's content."""
    blob = json.dumps(job_fields, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def plan(spec: SweepSpec, base: Path) -> list[Job]:
    """One :class:`Job` per model entry, configs resolved and validated.

    Raises
    ------
    SweepSpecError
        A config that does not validate (named with its source), a revision given for a
        local source, or two models with the same name.
    """
    from headclass._version import __version__
    from headclass.config import load_config

    sweep_config = _config_mapping(spec.config, base, "config")
    jobs: list[Job] = []
    stems: set[str] = set()
    names: dict[str, int] = {}
    for index, entry in enumerate(spec.models):
        where = f"models.{index} ({entry.source!r})"
        source = _resolve_source(entry.source, base)
        if entry.revision is not None and os.path.isabs(source):
            raise SweepSpecError(
                f"{where}: revision {entry.revision!r} applies to hub models only; "
                "for a local checkpoint, point source at its folder."
            )
        merged = _merge(sweep_config, _config_mapping(entry.config, base, where))
        try:
            config = load_config(merged).model_dump(mode="json")
        except ConfigError as exc:
            raise SweepSpecError(f"{where}: {' '.join(str(exc).split())}") from None
        step = entry.step
        matched = _STEP_REVISION.match(entry.revision) if entry.revision is not None else None
        if step is None and matched is not None:
            step = int(matched.group(1))
        if step is None and os.path.isabs(source):
            from headclass.toy import checkpoint_step

            step = checkpoint_step(source)
        name = entry.name or _default_name(source, entry.source, entry.revision, step)
        if name in names:
            raise SweepSpecError(
                f"{where}: models.{names[name]} and models.{index} are both named {name!r}; "
                "give one a different 'name'."
            )
        names[name] = index
        stem, i = _slug(name), 2
        while stem.lower() in stems:
            stem, i = f"{_slug(name)}-{i}", i + 1
        stems.add(stem.lower())
        threads = max(1, int(spec.num_cpus))
        keyed = {
            "format": SWEEP_FORMAT,
            "headclass": __version__,
            "source": source,
            "revision": entry.revision,
            "fingerprint": _fingerprint(source),
            "name": name,
            "config": config,
            "device": spec.device,
            "dtype": spec.dtype,
            "backend": spec.backend,
            "ablation": spec.ablation,
            "threads": threads,
        }
        jobs.append(
            Job(
                index=index,
                name=name,
                stem=stem,
                source=source,
                revision=entry.revision,
                config=config,
                device=spec.device,
                dtype=spec.dtype,
                backend=spec.backend,
                ablation=spec.ablation,
                threads=threads,
                step=step,
                family=entry.family or _family(name),
                series=_series(name, source, step),
                key=job_key(keyed),
            )
        )
    return jobs
