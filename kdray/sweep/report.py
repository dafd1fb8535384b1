"""What a finished (or interrupted) sweep reports: each trial's outcome, the leaderboard, the budget per knowledge
type, Optuna's plots and where each full-length student's checkpoint is."""
from __future__ import annotations

import io
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from kdray.goal import ACCURACY, Goal
from kdray.storage import is_remote
from kdray.sweep.front import COSTS
from kdray.sweep.request import SweepRequest, local_state_dir
from kdray.sweep.space import NONE, SearchSpace
from kdray.tracking.champion import TrialOutcome, outcome_value
from kdray.tracking.store import log_metrics, metric_key


def _checkpoint_of(r, storage: str) -> Any:
    """A trial's last checkpoint as Ray's Checkpoint (which knows its filesystem: S3 or local)."""
    if r.checkpoint is not None:
        return r.checkpoint
    path = (r.metrics or {}).get("checkpoint_path")  # trials that drove a TorchTrainer
    if path and is_remote(storage):
        import pyarrow.fs
        import ray.train

        fs, _ = pyarrow.fs.FileSystem.from_uri(storage)
        return ray.train.Checkpoint(path, filesystem=fs)
    return path


def trial_outcomes(results, space: SearchSpace, max_epochs: int, run_ids: dict[str, str],
              storage: str = "") -> list[TrialOutcome]:
    from kdray.runfiles import ran_all_epochs
    from kdray.tracking.tracker import tag_number

    out = []
    ids = _trial_ids(results)
    for r in results:
        m = dict(r.metrics or {})
        # A trial that erred before its first report has no metrics: its id comes from Tune's own trial
        tid = m.get("trial_id") or ids.get(Path(r.path).name if r.path else "", "")
        params = dict(r.config or {})
        if r.error is not None:
            status = "error"
        elif m.get("failed"):
            status = "failed"
        elif not ran_all_epochs(m, max_epochs):
            status = "stopped_early"
        else:
            status = "completed"
        ckpt = _checkpoint_of(r, storage)
        number = tag_number(m.get("experiment_tag"))
        costs = {k: float(m[k]) for k in COSTS if isinstance(m.get(k), (int, float))}
        extra = {space.metric: float(m[space.metric])} if isinstance(m.get(space.metric), (int, float)) else {}
        spent = float(m["budget_tokens"]) if isinstance(m.get("budget_tokens"), (int, float)) else None
        out.append(TrialOutcome(tid, run_ids.get(tid), params.get("knowledge", NONE), status, int(m.get("epoch", 0)),
                                float(m.get("val_accuracy", float("nan"))), params, ckpt, number, costs, extra,
                                spent))
    return out


def _trial_ids(results) -> dict[str, str]:
    """Tune's trial id of each result, by the name of the trial's folder."""
    trials = getattr(getattr(results, "_experiment_analysis", None), "trials", None) or []
    return {Path(t.path).name: t.trial_id for t in trials if getattr(t, "path", None)}


def checkpoint_uri(checkpoint: Any, storage: str) -> str | None:
    """Where a trial's checkpoint lives, as one string (``s3://bucket/...`` or a local path): a trial run's tag,
    from which ``kdray best --max-latency-ms`` reads a student that was not the champion."""
    if checkpoint is None:
        return None
    path = getattr(checkpoint, "path", checkpoint)
    if is_remote(storage) and "://" not in str(path):
        return f"{storage.split('://', 1)[0]}://{path}"
    return str(path)


def leaderboard(outcomes: list[TrialOutcome], front_cost: str | None = None, goal: Goal = ACCURACY) -> pd.DataFrame:
    """Every trial, best first by the sweep's metric, with its student's costs; with ``front_cost`` a ``pareto``
    column marks the completed trials on the front of the metric against that cost."""
    from kdray.sweep.front import pareto_front
    from kdray.tracking.tracker import searched_params

    rows = []
    for o in outcomes:
        row = {"trial": o.number, "trial_id": o.trial_id, "run_id": o.run_id, "knowledge": o.knowledge,
               "status": o.status, "epochs": o.epochs, "val_accuracy": o.val_accuracy, **o.metrics, **o.costs,
               **({"budget_tokens": o.budget_tokens} if o.budget_tokens is not None else {})}
        row.update({k: v for k, v in searched_params(o.params).items() if k != "knowledge"})
        rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty and front_cost:
        done = [i for i, o in enumerate(outcomes) if o.status == "completed"]
        pts = [(goal.key(outcome_value(outcomes[i], goal)), outcomes[i].costs.get(front_cost, float("nan")))
               for i in done]
        on = {done[k] for k in pareto_front(pts)}
        df.insert(7, "pareto", [i in on for i in range(len(outcomes))])
    if not df.empty:
        # Same order as the champion's selection: the metric, then the earlier trial on ties.
        if goal.metric not in df:
            df[goal.metric] = float("nan")
        df = df.sort_values([goal.metric, "trial"], ascending=[not goal.maximise, True],
                            na_position="last").reset_index(drop=True)
        df.insert(0, "rank", range(1, len(df) + 1))
    return df


def log_search_plots(c, parent_id: str, req: SweepRequest, board: pd.DataFrame, say) -> None:
    """Optuna's importance, parallel-coordinate and history plots (HTML + PNG) on the parent run."""

    if req.space.searcher.type == "grid":
        studies = []
    else:
        import optuna

        storage = f"sqlite:///{local_state_dir(req) / 'optuna.db'}"
        try:
            studies = [optuna.load_study(study_name=req.name, storage=storage)]
        except Exception as e:  # noqa: BLE001
            say(f"could not open the Optuna study for plots: {e}")
            studies = []
    with tempfile.TemporaryDirectory() as d:
        for study in studies:
            import optuna.visualization as ov

            done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
            if len(study.directions) > 1:  # Optuna's single-objective plots need a target there
                names = list(req.space.objectives)
                plots = {"pareto_front": lambda st: ov.plot_pareto_front(st, target_names=names)}
            else:
                plots = {"optimization_history": ov.plot_optimization_history,
                         "parallel_coordinate": ov.plot_parallel_coordinate}
                if len(done) >= 2:
                    plots["param_importances"] = ov.plot_param_importances
            for name, fn in plots.items():
                try:
                    with warnings.catch_warnings():  # "less than 2 trials" for each rare choice: noise here
                        warnings.simplefilter("ignore", UserWarning)
                        figure = fn(study)
                    figure.write_html(f"{d}/{name}.html", include_plotlyjs="cdn")
                except Exception as e:  # noqa: BLE001 - a plot is a bonus, never a failure
                    say(f"plot {name} skipped: {e}")
        if not board.empty:
            _history_png(board, f"{d}/{req.space.metric}_by_trial.png", req.space.goal)
        if "pareto" in board.columns and req.space.multi_objective:
            from kdray.sweep.front import front_png

            cost = req.space.objectives[1]
            front_png(board, cost, f"{d}/pareto_front_{cost}.png")
        for f in Path(d).iterdir():
            c.log_artifact(parent_id, str(f), "plots")


def import_plot_libraries() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import optuna.visualization  # noqa: F401
    import sklearn  # noqa: F401 - the champion's data loading imports it in this thread meanwhile


def _history_png(board: pd.DataFrame, path: str, goal: Goal = ACCURACY) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = board.copy().rename(columns={"trial": "n"}).sort_values("n")
    col = goal.metric
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, g in df.groupby("knowledge"):
        ax.scatter(g["n"], g[col], label=k, s=24)
    done = df[df["status"] == "completed"]
    if not done.empty:
        best = done[col].cummax() if goal.maximise else done[col].cummin()
        ax.plot(done["n"], best, color="black", lw=1, label="best completed so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {goal.label} (last epoch)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_budget(c: Any, parent_id: str, board: pd.DataFrame, choices: list[str], goal: Goal = ACCURACY
               ) -> pd.DataFrame:
    """The budget each knowledge type got, as ``budget_by_type.csv`` and ``budget.<type>.*`` metrics (one batch)."""
    from kdray.sweep.budget import budget_by_type

    df = budget_by_type(board, choices, goal)
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    c.log_text(parent_id, buf.getvalue(), "budget_by_type.csv")
    log_metrics(c, parent_id, {f"budget.{metric_key(r['knowledge'])}.{k}": float(r[k]) for r in df.to_dict("records")
                               for k in ("trials", "full_length", "epochs", "epoch_share", "tokens", "token_share",
                                         f"best_{goal.metric}") if k in r})
    return df
