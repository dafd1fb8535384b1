"""Typed configuration, validated once at the edge.

YAML is read with ``yaml.safe_load`` and validated by pydantic models; any problem becomes a
``ConfigError`` that names the file and the dotted field (``knowledge.0.temperature``) before Ray or
MLflow is touched. The resolved config (defaults filled in) is what every run logs.

The package: :mod:`~kdray.config.yaml` (reading), :mod:`~kdray.config.validation` (errors that name fields, paths,
plugins), :mod:`~kdray.config.parts` (data set, models, training, resources, teacher, cache, knowledge) and
:mod:`~kdray.config.run` (a run, a teacher's run). Everything is importable from ``kdray.config``.
"""
from __future__ import annotations

from kdray.config.parts import (
    SPLIT_FIELDS,
    CacheConfig,
    DatasetConfig,
    ModelConfig,
    ResourcesConfig,
    TeacherConfig,
    TeacherTrainSpec,
    TrainConfig,
    default_tokenizer,
    validate_knowledge,
)
from kdray.config.run import LatencyConfig, RunConfig, SchemeConfig, TeacherRunConfig, load_config
from kdray.config.validation import (
    PATH_OPTIONS,
    PLUGINS_FIELD,
    Strict,
    absolute_dir,
    absolute_hf_name,
    import_config_plugins,
    is_finite_number,
    local_path,
    pydantic_errors,
    validate,
)
from kdray.config.yaml import dotted_set, read_yaml
from kdray.errors import ConfigError

__all__ = ["PATH_OPTIONS", "PLUGINS_FIELD", "SPLIT_FIELDS", "CacheConfig", "ConfigError", "DatasetConfig",
           "LatencyConfig", "ModelConfig", "ResourcesConfig", "RunConfig", "SchemeConfig", "Strict", "TeacherConfig",
           "TeacherRunConfig", "TeacherTrainSpec", "TrainConfig", "absolute_dir", "absolute_hf_name",
               "default_tokenizer",
           "dotted_set", "import_config_plugins", "is_finite_number", "load_config", "local_path", "pydantic_errors",
               "read_yaml",
           "validate", "validate_knowledge"]
