"""The budget each knowledge type got in a sweep, from its table of trials.

Its own module, with nothing but pandas, because ``kdray compare`` reads it on every call: importing the
fair-budget scheduler (Ray Tune) or the search space (torch, through the typed config) would triple the
command's time.
"""
from __future__ import annotations

from typing import Any

from kdray.goal import ACCURACY, Goal


def budget_by_type(trials: Any, choices: list[str], goal: Goal = ACCURACY) -> Any:
    """Per knowledge choice: trials, full-length trials, epochs spent (and their share of the sweep's), and the
    best value of the sweep's metric among its full-length trials (``best_val_accuracy``, ``best_val_nll``).
    ``trials``: a table with a row per trial (``knowledge``, ``status``, ``epochs``, the metric): the sweep's
    leaderboard, or ``kdray compare``'s trials read back from MLflow. Every choice in ``choices`` has a row, tried
    or not; other types follow, sorted."""
    import pandas as pd

    if trials.empty:
        trials = pd.DataFrame(columns=["knowledge", "status", "epochs", goal.metric])
    if goal.metric not in trials:
        trials = trials.assign(**{goal.metric: float("nan")})
    rows = []
    total = int(trials["epochs"].sum()) or 1
    for c in list(choices) + sorted(set(trials["knowledge"]) - set(choices)):
        mine = trials[trials["knowledge"] == c]
        full = mine.loc[mine["status"] == "completed", goal.metric]
        epochs = int(mine["epochs"].sum())
        best = (full.max() if goal.maximise else full.min()) if len(full) else float("nan")
        rows.append({"knowledge": c, "trials": len(mine), "full_length": len(full), "epochs": epochs,
                     "epoch_share": epochs / total, f"best_{goal.metric}": float(best)})
    return pd.DataFrame(rows)
