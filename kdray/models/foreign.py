"""Models that are not kdray's own classes: a ``torch.export`` program or an unpickled module (a teacher from the
MLflow registry, :mod:`kdray.tracking.teacher`). A record holds them under these keys instead of a state dict
to rebuild; ``model_from_record`` turns them back into modules without importing anything named by the record.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

MODULE_KEY = "module"  # a record key that holds a live nn.Module instead of a state dict to rebuild
PT2_KEY = "pt2"  # a record key that holds a torch.export program (bytes), loaded in each process


class ExportedModel(nn.Module):
    """A ``torch.export`` program as a module (MLflow's default "pt2" format). Its train/eval behaviour was
    fixed when it was exported, and the unlifted graph refuses ``train()``/``eval()``: a teacher is frozen
    anyway, so the mode stops here instead of recursing into it."""

    def __init__(self, program: bytes) -> None:
        super().__init__()
        import io

        self.graph = torch.export.load(io.BytesIO(program)).module()

    def train(self, mode: bool = True) -> "ExportedModel":
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)


def foreign_module(record: dict[str, Any]) -> nn.Module:
    """The network of a record that holds a foreign model (an exported program or an unpickled module)."""
    if record.get(PT2_KEY) is not None:
        return ExportedModel(record[PT2_KEY])
    return record[MODULE_KEY]
