"""Accuracy against cost: the Pareto front of a sweep, its plot, and the best student within a budget.

Every trial measures its student's parameter count and serving latency (:mod:`kdray.models.cost`). A space
with ``objectives: [val_accuracy, latency_ms]`` searches both (Optuna's multi-objective TPE); whatever the
objectives, ``kdray best --max-latency-ms / --max-params`` picks the most accurate full-length trial within
a budget. Only trials that ran every epoch count: a stopped trial's student is not fully trained.
"""
from __future__ import annotations

import math
from typing import Any

from kdray.errors import BudgetError
from kdray.goal import ACCURACY, Goal

COSTS = ("student_params", "latency_ms", "latency_b64_ms")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points of (accuracy: higher is better, cost: lower is better).

    A point is dominated when another is at least as accurate and at most as costly, and strictly better in
    one of the two. Points with a NaN are never on the front. Equal points are both on it.
    """
    ok = [i for i, (a, c) in enumerate(points) if not (math.isnan(a) or math.isnan(c))]
    front = []
    for i in ok:
        a, c = points[i]
        if not any(points[j][0] >= a and points[j][1] <= c and (points[j][0] > a or points[j][1] < c)
                   for j in ok if j != i):
            front.append(i)
    return front


def within_budget(rows: list[dict[str, Any]], max_latency_ms: float | None = None,
                  max_params: float | None = None, goal: Goal = ACCURACY) -> tuple[dict[str, Any] | None,
                                                                          list[dict[str, Any]]]:
    """The best completed row on the sweep's metric meeting every budget (ties: the earlier trial), and the rows that
    met it.

    ``rows``: dicts with ``status``, the metric (``val_accuracy``, ``val_nll``), ``trial`` (its number) and the costs.
    """
    fits = [r for r in rows if r.get("status") == "completed" and math.isfinite(r.get(goal.metric, math.nan))
            and (max_latency_ms is None or r.get("latency_ms", math.inf) <= max_latency_ms)
            and (max_params is None or r.get("student_params", math.inf) <= max_params)]
    best = max(fits, key=lambda r: (goal.key(r[goal.metric]), -int(r.get("trial") or 0)), default=None)
    return best, fits


def front_png(board: Any, cost: str, path: str) -> None:
    """Every completed trial as accuracy against ``cost``, the front joined by a line (log-scaled cost)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = board[(board["status"] == "completed") & board[cost].notna()]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, g in done.groupby("knowledge"):
        ax.scatter(g[cost], g["val_accuracy"], s=26, label=k)
    front = done[done["pareto"]].sort_values(cost)
    ax.step(front[cost], front["val_accuracy"], where="post", color="black", lw=1, label="Pareto front")
    for _, r in front.iterrows():
        ax.annotate(f"{int(r['trial'])}", (r[cost], r["val_accuracy"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    if len(done) and done[cost].min() > 0:
        ax.set_xscale("log")
    ax.set_xlabel(cost.replace("_", " "))
    ax.set_ylabel("validation accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def budget_alias(max_latency_ms: float | None, max_params: float | None) -> str:
    """The registry alias of the best student within a budget, e.g. ``within-2ms`` or ``within-2ms-1e06-params``
    (MLflow aliases take letters, digits, '-' and '_')."""
    def num(v: float) -> str:
        return f"{v:g}".replace("+", "").replace(".", "p")

    parts = (["within"] + ([f"{num(max_latency_ms)}ms"] if max_latency_ms is not None else [])
             + ([f"{num(max_params)}-params"] if max_params is not None else []))
    return "-".join(parts)


def register_within_budget(uri: str, sweep: str | None, max_latency_ms: float | None = None,
                           max_params: float | None = None) -> dict[str, Any]:
    """The most accurate full-length student of a sweep within the budget, registered as a version of the sweep's
    model with the alias :func:`budget_alias` (``@champion`` is left alone). Its test accuracy is measured once,
    after the choice. Returns what was chosen and where it was registered."""
    import json

    import mlflow

    from kdray.config import DatasetConfig
    from kdray.data import load_dataset
    from kdray.tracking.champion import log_version, raw_example, read_checkpoint_record, test_metrics
    from kdray.tracking.store import TAG_STATUS, client, find_sweep, retrying, sweep_children, sweep_goal

    if max_latency_ms is None and max_params is None:
        raise BudgetError("give --max-latency-ms and/or --max-params")
    c = client(uri)
    parent = find_sweep(c, sweep)
    if parent is None:
        raise BudgetError(f"no sweep named {sweep!r} in {uri}" if sweep else f"no finished sweep in {uri}")
    name = parent.data.tags.get("kdray.sweep")
    model_name = parent.data.tags.get("kdray.registered_model") or parent.data.tags.get("kdray.model_name")
    if not model_name:
        raise BudgetError(f"sweep {name} names no registered model (a sweep made by an older kdray)")
    goal = sweep_goal(parent)
    runs = {}
    rows = []
    for run in sweep_children(c, parent, kind="trial"):
        t, m = run.data.tags, run.data.metrics
        rows.append({"run_id": run.info.run_id, "trial": int(t.get("kdray.trial_number", 0) or 0),
                     "knowledge": t.get("kdray.knowledge", "none"), "status": t.get(TAG_STATUS),
                     **{k: m.get(k, math.nan) for k in dict.fromkeys(["val_accuracy", goal.metric])},
                     **{k: m[k] for k in COSTS if k in m}})
        runs[run.info.run_id] = run
    budget = " and ".join(([f"latency_ms <= {max_latency_ms:g}"] if max_latency_ms is not None else [])
                          + ([f"student_params <= {max_params:g}"] if max_params is not None else []))
    best, fits = within_budget(rows, max_latency_ms, max_params, goal)
    if best is None:
        done = [r for r in rows if r["status"] == "completed"]
        lightest = min(done, key=lambda r: r.get("latency_ms", math.inf), default=None)
        raise BudgetError(f"no full-length trial of sweep {name} meets {budget}" + (
            f"; the fastest is trial {lightest['trial']} with latency_ms {lightest.get('latency_ms', math.nan):.4g} "
            f"and {lightest.get('student_params', math.nan):.4g} parameters" if lightest else ""))
    run = runs[best["run_id"]]
    where = run.data.tags.get("kdray.checkpoint")
    if not where:
        raise BudgetError(f"trial {best['trial']} of sweep {name} has no kdray.checkpoint tag (a sweep made by an "
                          "older kdray): its student cannot be read back")
    record = read_checkpoint_record(where)
    mlflow.set_tracking_uri(uri)
    cfg = mlflow.artifacts.load_dict(f"runs:/{best['run_id']}/resolved_config.json")
    dataset = DatasetConfig.model_validate(cfg["dataset"])
    test = test_metrics(record, dataset.model_dump(mode="json"))
    example = raw_example(load_dataset(dataset).train)
    alias = budget_alias(max_latency_ms, max_params)
    version = log_version(uri, best["run_id"], record, test, model_name, example, {"kdray.within_budget": budget})
    for k, v in {"kdray.sweep": name, "kdray.budget": budget, "val_accuracy": f"{best['val_accuracy']:.6f}",
                 **{k: f"{best[k]:.6f}" for k in (goal.metric,) if k != "val_accuracy"},
                 **{k: f"{v:.6f}" for k, v in test.items()}, "knowledge": best["knowledge"],
                 **{k: f"{best[k]:.6g}" for k in COSTS if k in best}}.items():
        retrying(c.set_model_version_tag, model_name, version, k, v, what="tagging the model version")
    retrying(c.set_registered_model_alias, model_name, alias, version, what="setting the budget alias")
    retrying(c.set_tag, parent.info.run_id, f"kdray.best_{alias}", f"{best['run_id']} (version {version})",
             what="tagging the sweep run")
    return {"sweep": name, "budget": budget, "run_id": best["run_id"], "trial": best["trial"],
            "knowledge": best["knowledge"], "student": json.dumps(cfg.get("student")),
            "metric": goal.metric, "val_accuracy": best["val_accuracy"], **test,
            **({goal.metric: best[goal.metric]} if goal.metric != "val_accuracy" else {}),
            **{k: best[k] for k in COSTS if k in best}, "candidates": len(fits), "registered_model": model_name,
            "version": version, "model_uri": f"models:/{model_name}/{version}",
            "alias_uri": f"models:/{model_name}@{alias}"}
