"""kdray: find the best distilled student for a teacher network.

Importing the package fills the registries (knowledge types, models, data sets), so a Ray worker that
imports kdray sees exactly the registry the driver saw.
"""
from __future__ import annotations

__version__ = "0.1.0"

from kdray import data, knowledge, models  # noqa: E402,F401  (registers every plug-in)
from kdray.data import DATASETS  # noqa: E402
from kdray.knowledge import KNOWLEDGE  # noqa: E402
from kdray.models import MODELS  # noqa: E402

__all__ = ["DATASETS", "KNOWLEDGE", "MODELS", "__version__"]
