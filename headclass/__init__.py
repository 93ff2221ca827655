"""headclass: tell what every attention head of a pretrained language model does.

Data flows one way: a source (hub name, folder, GGUF file, model object) -> :class:`HeadModel`
-> scores (pure functions of tensors) -> taxonomy (a tidy DataFrame) -> report.
"""

import headclass._startup  # noqa: F401  (first: the CLI's Ctrl-C guard during the imports below)
from headclass._version import __version__ as __version__
from headclass.config import HeadclassConfig, load_config
from headclass.errors import (
    ConfigError,
    HeadclassError,
    HeadclassWarning,
    HubUnreachableError,
    MissingDependencyError,
    ModelFileError,
    ModelNotFoundError,
    OptionError,
    ProbeError,
    ScoreError,
    UnsupportedArchitectureError,
)
from headclass.loading import HeadModel, load_model
from headclass.report.compare import Comparison, compare
from headclass.report.export import read_json
from headclass.sweep import SweepResult, sweep  # the attribute headclass.sweep is this function
from headclass.taxonomy import HeadTaxonomy, classify
from headclass.workflows import compare_models

__all__ = [
    "load_model",
    "HeadModel",
    "classify",
    "HeadTaxonomy",
    "read_json",
    "compare",
    "sweep",
    "SweepResult",
    "compare_models",
    "Comparison",
    "load_config",
    "HeadclassConfig",
    "HeadclassError",
    "HeadclassWarning",
    "ModelNotFoundError",
    "OptionError",
    "HubUnreachableError",
    "UnsupportedArchitectureError",
    "MissingDependencyError",
    "ModelFileError",
    "ConfigError",
    "ProbeError",
    "ScoreError",
]
