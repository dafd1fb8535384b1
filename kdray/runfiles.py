"""What a training run writes and reports, shared by the loop that writes it and everyone who reads it.

A leaf: the sweep's tracker, scheduler and searcher read a run's reports and checkpoints without importing the
training loop (and with it torch, the data sets and the models).
"""
from __future__ import annotations

from typing import Any

STUDENT_FILE = "student.pt"  # a self-contained model record (kdray.models.checkpoint)
STATE_FILE = "train_state.pt"  # optimizer, scaler, epoch: what resuming needs besides the weights
FAILURE_FILE = "failure.json"  # the only file of the checkpoint a failed Ray Train run reports last
PLANNED_EPOCHS = "epochs_planned"  # reported every epoch: a sweep may search train.epochs per trial


def ran_all_epochs(metrics: dict[str, Any], default_epochs: int) -> bool:
    """Did the run behind these (last reported) metrics reach the end of its own schedule?"""
    return int(metrics.get("epoch", 0)) >= int(metrics.get(PLANNED_EPOCHS, default_epochs))
