"""kdray's version (a leaf: the tracker tags every run with it without importing the package's registries)."""
from __future__ import annotations

__version__ = "0.1.0"
