"""Data sets: the registry (``DATASETS``), loaders and the fixed-seed validation split.

Importing this package registers every data set.
"""
from kdray.data import hub, lm, lm_builtin, lm_tasks, offline, tables, vision  # noqa: F401  (registers the data sets)
from kdray.data.base import (
    DATASETS,
    DataBundle,
    DatasetEntry,
    DatasetInfo,
    DatasetSpec,
    Split,
    carve_validation,
    data_dir,
    describe_dataset,
    load_dataset,
    register_dataset,
)
from kdray.data.loaders import Batches, ShardSampler
from kdray.data.views import ViewKey, crop_flip
from kdray.errors import DatasetUnavailable

__all__ = [
    "DATASETS",
    "Batches",
    "DataBundle",
    "DatasetInfo",
    "DatasetEntry",
    "DatasetSpec",
    "DatasetUnavailable",
    "ShardSampler",
    "Split",
    "ViewKey",
    "carve_validation",
    "crop_flip",
    "data_dir",
    "describe_dataset",
    "load_dataset",
    "register_dataset",
]
