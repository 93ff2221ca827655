"""One exception family for headclass.

Every error says what went wrong and what to do about it, in one readable message, so that the
CLI can print ``str(error)`` alone and a notebook user sees the fix without a stack trace dive.
Errors that are about a bad value also subclass :class:`ValueError` (and file errors
:class:`FileNotFoundError`) so callers that catch the builtin keep working.
"""

from __future__ import annotations

__all__ = [
    "HeadclassError",
    "OptionError",
    "ModelNotFoundError",
    "HubUnreachableError",
    "UnsupportedArchitectureError",
    "MissingDependencyError",
    "ModelFileError",
    "OutOfMemoryError",
    "ConfigError",
    "ProbeError",
    "ScoreError",
    "HeadclassWarning",
]


class HeadclassError(Exception):
    """Base class of every error headclass raises on purpose."""


class OptionError(HeadclassError, ValueError):
    """An option has a value it cannot take: an unknown dtype, backend or device, a revision for
    a source that has none."""


class ModelNotFoundError(HeadclassError, ValueError):
    """A model name that is neither an alias, a local path, nor a model the hub knows."""


class HubUnreachableError(HeadclassError, ConnectionError):
    """The Hugging Face hub cannot be reached and the model is not in the local cache."""


class UnsupportedArchitectureError(HeadclassError, ValueError):
    """The model has no causal self-attention (encoder-only, encoder-decoder, vision...)."""


class MissingDependencyError(HeadclassError, ImportError):
    """An optional package is needed for this input (e.g. ``gguf`` for GGUF files)."""


class ModelFileError(HeadclassError, FileNotFoundError):
    """A model file or folder is missing, incomplete or corrupt."""


class OutOfMemoryError(HeadclassError, MemoryError):
    """The model's weights need more memory than this machine has available (checked before
    loading: :mod:`headclass.loading.memory`)."""


class ConfigError(HeadclassError, ValueError):
    """A configuration file or value is malformed: unknown keys, wrong types, out of range."""


class ProbeError(HeadclassError, ValueError):
    """A probe batch cannot support a score: too short, empty, wrong ids or shapes."""


class ScoreError(HeadclassError, ValueError):
    """A score cannot be computed on this input (e.g. it would produce NaN)."""


class HeadclassWarning(UserWarning):
    """Something headclass adapted for you and wants you to know (e.g. probes shrunk to fit a
    short context). The CLI prints it as one line, ``headclass: warning: ...``."""
