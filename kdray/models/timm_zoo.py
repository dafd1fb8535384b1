"""timm models by name: ``timm/<any timm.list_models() name>`` (filled in by issue 11)."""
from __future__ import annotations
