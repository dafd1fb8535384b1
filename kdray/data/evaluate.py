"""A model's accuracy and loss on a split: what training validates on, the champion is tested on, ``final`` reports.

``session`` is anything with ``rank``, ``world_size`` and ``all_reduce_sum`` (the training loop's session): the sums
are taken over every rank exactly once, so each rank's shard counts once.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdray.data.base import Split
from kdray.data.loaders import Batches


@torch.no_grad()
def evaluate(
    model: nn.Module, split: Split, batch_size: int, device: torch.device, session: Any = None,
    channels_last: bool = False, amp: torch.dtype | None = None,
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``split``, summed over all ranks exactly once."""
    rank, world = (session.rank, session.world_size) if session else (0, 1)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # correct, count, loss
    for _, x, y in Batches(split, batch_size, train=False, rank=rank, world=world, device=device):
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
            logits = model(x)
        logits = logits.float()
        sums[0] += (logits.argmax(1) == y).sum()
        sums[1] += y.numel()
        sums[2] += F.cross_entropy(logits, y, reduction="sum")
    if session is not None:
        session.all_reduce_sum(sums)
    model.train(was_training)
    correct, count, loss = sums.tolist()
    return {"accuracy": correct / max(count, 1), "loss": loss / max(count, 1), "count": count}
