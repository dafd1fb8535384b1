"""The budget each knowledge type got in a sweep, from its table of trials.

Its own module, with nothing but pandas, because ``kdray compare`` reads it on every call: importing the
fair-budget scheduler (Ray Tune) or the search space (torch, through the typed config) would triple the
command's time.
"""
from __future__ import annotations

from typing import Any


def budget_by_type(trials: Any, choices: list[str]) -> Any:
    """Per knowledge choice: trials, full-length trials, epochs spent (and their share of the sweep's), and the
    best validation accuracy of a full-length trial. ``trials``: a table with a row per trial (``knowledge``,
    ``status``, ``epochs``, ``val_accuracy``): the sweep's leaderboard, or ``kdray compare``'s trials read back
    from MLflow. Every choice in ``choices`` has a row, tried or not; other types follow, sorted."""
    import pandas as pd

    if trials.empty:
        trials = pd.DataFrame(columns=["knowledge", "status", "epochs", "val_accuracy"])
    rows = []
    total = int(trials["epochs"].sum()) or 1
    for c in list(choices) + sorted(set(trials["knowledge"]) - set(choices)):
        mine = trials[trials["knowledge"] == c]
        full = mine.loc[mine["status"] == "completed", "val_accuracy"]
        epochs = int(mine["epochs"].sum())
        rows.append({"knowledge": c, "trials": len(mine), "full_length": len(full), "epochs": epochs,
                     "epoch_share": epochs / total,
                     "best_val_accuracy": float(full.max()) if len(full) else float("nan")})
    return pd.DataFrame(rows)
