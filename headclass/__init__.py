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
from headclass.report.compare import Comparison, compare, compare_models
from headclass.report.export import read_json
from headclass.report.table import HeadTaxonomy
from headclass.taxonomy import classify

__version__ = "0.1.0"

__all__ = [
    "load_model",
    "HeadModel",
    "classify",
    "HeadTaxonomy",
    "read_json",
    "compare",
    "compare_models",
    "Comparison",
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
