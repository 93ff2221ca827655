"""headclass: tell what every attention head of a pretrained language model does.

Data flows one way: a source (hub name, folder, GGUF file, model object) -> :class:`HeadModel`
-> scores (pure functions of tensors) -> taxonomy (a tidy DataFrame) -> report.
"""

from headclass.config import HeadclassConfig, load_config
from headclass.errors import (
    ConfigError,
    HeadclassError,
    HubUnreachableError,
    MissingDependencyError,
    ModelFileError,
    ModelNotFoundError,
    ProbeError,
    ScoreError,
    UnsupportedArchitectureError,
)
from headclass.loading import HeadModel, load_model

__version__ = "0.1.0"

__all__ = [
    "load_model",
    "HeadModel",
    "load_config",
    "HeadclassConfig",
    "HeadclassError",
    "ModelNotFoundError",
    "HubUnreachableError",
    "UnsupportedArchitectureError",
    "MissingDependencyError",
    "ModelFileError",
    "ConfigError",
    "ProbeError",
    "ScoreError",
]
