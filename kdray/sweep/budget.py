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
    best value of the sweep's metric among its full-length trials (``best_val_accuracy``, ``best_val_nll``); for a
    language model's trials (a ``budget_tokens`` column), the tokens each type trained on and generated, and their
    share: on-policy trials spend more per epoch.
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
    tokens = "budget_tokens" in trials and trials["budget_tokens"].notna().any()
    all_tokens = float(trials["budget_tokens"].sum()) if tokens else 0.0
    for c in list(choices) + sorted(set(trials["knowledge"]) - set(choices)):
        mine = trials[trials["knowledge"] == c]
        full = mine.loc[mine["status"] == "completed", goal.metric]
        epochs = int(mine["epochs"].sum())
        best = (full.max() if goal.maximise else full.min()) if len(full) else float("nan")
        spent = {"tokens": int(mine["budget_tokens"].sum()),
                 "token_share": float(mine["budget_tokens"].sum()) / (all_tokens or 1.0)} if tokens else {}
        rows.append({"knowledge": c, "trials": len(mine), "full_length": len(full), "epochs": epochs,
                     "epoch_share": epochs / total, **spent, f"best_{goal.metric}": float(best)})
    return pd.DataFrame(rows)
