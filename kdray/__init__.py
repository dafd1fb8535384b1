"""kdray: find the best distilled student for a teacher network.

The plugin API, importable from here: what a plugin module uses to register its own knowledge types, models and
data sets (see README "Bring your own"). Names are loaded on first use, so ``import kdray`` (and the command
line) does not import torch until something needs it; the registries are filled when their package is imported
(``kdray.knowledge``, ``kdray.models``, ``kdray.data``), which every name below does.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kdray.version import __version__

_API = {
    # knowledge types
    "KNOWLEDGE": "kdray.knowledge", "Knowledge": "kdray.knowledge", "KnowledgeParams": "kdray.knowledge",
    "ModelLayout": "kdray.knowledge", "TapOutputs": "kdray.knowledge", "register_knowledge": "kdray.knowledge",
    "DistillObjective": "kdray.knowledge",
    # models
    "MODELS": "kdray.models", "Classifier": "kdray.models", "Preprocess": "kdray.models",
    "register_model": "kdray.models", "set_layout": "kdray.models", "build_model": "kdray.models",
    "load_record": "kdray.models", "model_from_record": "kdray.models", "save_model": "kdray.models",
    # data sets
    "DATASETS": "kdray.data", "DataBundle": "kdray.data", "DatasetInfo": "kdray.data", "DatasetSpec": "kdray.data",
    "Split": "kdray.data", "register_dataset": "kdray.data", "load_dataset": "kdray.data",
    # errors
    "KdrayError": "kdray.errors", "ConfigError": "kdray.errors",
}

__all__ = sorted(_API) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from kdray.data import DATASETS, DataBundle, DatasetInfo, DatasetSpec, Split, load_dataset, register_dataset  # noqa: F401
    from kdray.errors import ConfigError, KdrayError  # noqa: F401
    from kdray.knowledge import (  # noqa: F401
        KNOWLEDGE,
        DistillObjective,
        Knowledge,
        KnowledgeParams,
        ModelLayout,
        TapOutputs,
        register_knowledge,
    )
    from kdray.models import (  # noqa: F401
        MODELS,
        Classifier,
        Preprocess,
        build_model,
        load_record,
        model_from_record,
        register_model,
        save_model,
        set_layout,
    )


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kdray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
