"""TPE + ASHA against random search and a grid, at the same compute budget.

Space: MNIST-1D (CNN teacher -> MLP student), knowledge in {none, kd, fitnet} with the learning rate,
temperature and weights searched; small enough for a full grid (2 values per parameter: 14 points).
Compute is counted in training epochs. The grid's size sets the budget (14 trials x E epochs); random search
gets as many full trials; TPE + ASHA gets more trials, which ASHA stops early, and is cut at the same number
of epochs. The curve is the best validation accuracy of a *fully trained* student reached so far, against
epochs consumed (trials in the order they finished), for each method and seed. Written as CSV and PNG under
benchmarks/results/ and logged to MLflow (experiment ``kdray-benchmarks``) as a run with the plot.

    python benchmarks/bench_search.py --epochs 40 --seeds 2
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sweep import sweep_once  # noqa: E402

SPACE = {
    "train.lr": {"type": "float", "low": 5.0e-4, "high": 3.0e-3, "log": True},
    "knowledge": {
        "none": {},
        "kd": {"kd.temperature": {"type": "float", "low": 2, "high": 10, "log": True},
               "kd.weight": {"type": "float", "low": 0.5, "high": 4, "log": True}},
        "fitnet": {"fitnet.weight": {"type": "float", "low": 0.5, "high": 8, "log": True},
                   "fitnet.teacher_layer": "block2", "fitnet.student_layer": "block2"},
    },
}


def curve(tmp: Path, name: str, budget: int) -> list[tuple[int, float]]:
    """(epochs consumed, best completed val accuracy so far), trials in the order they finished."""
    from mlflow import MlflowClient

    from kdray.tracking.store import find_sweep, sweep_children

    c = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    runs = sorted(sweep_children(c, find_sweep(c, name), kind="trial"), key=lambda r: r.info.end_time or 0)
    used, best, points = 0, 0.0, [(0, 0.0)]
    for r in runs:
        epochs = int(r.data.tags.get("kdray.epochs", 0) or 0)
        if used + epochs > budget:
            break
        used += epochs
        if r.data.tags.get("kdray.status") == "completed":
            best = max(best, r.data.metrics.get("val_accuracy", 0.0))
        points.append((used, best))
    return points


def main() -> None:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--storage", default=str(REPO / "kdray_runs" / "bench"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--tracking-uri", default=f"sqlite:///{REPO / 'kdray_runs' / 'bench' / 'benchmarks.db'}")
    args = ap.parse_args()
    base = yaml.safe_load((REPO / "search_spaces" / "default.yaml").read_text())
    base["base"]["train"]["epochs"] = args.epochs
    base["space"] = SPACE
    grid_size = 2 + 2 ** 3 + 2 ** 2  # none: lr; kd: lr, T, w; fitnet: lr, w
    budget = grid_size * args.epochs
    methods = {
        "grid": {"searcher": {"type": "grid", "grid_points": 2}, "scheduler": {"type": "fifo"},
                 "num_samples": grid_size},
        "random": {"searcher": {"type": "random"}, "scheduler": {"type": "fifo"}, "num_samples": grid_size},
        "tpe+asha": {"searcher": {"type": "tpe", "n_startup_trials": 6},
                     "scheduler": {"type": "asha", "grace_period": max(1, args.epochs // 4), "reduction_factor": 2},
                     "num_samples": 2 * grid_size},
    }
    results: dict[str, list] = {}
    for seed in range(args.seeds):
        for method, over in methods.items():
            if method == "grid" and seed > 0:
                continue  # a grid has no randomness
            data = json.loads(json.dumps(base))
            data.update(over, seed=seed)
            _, wall, tmp, _, _ = sweep_once(data, args.storage, f"{method}-{seed}")
            pts = curve(tmp, f"{method}-{seed}", budget)
            results[f"{method} (seed {seed})" if method != "grid" else "grid"] = pts
            print(f"{method:<9} seed {seed}: best {pts[-1][1]:.4f} after {pts[-1][0]} of {budget} epochs "
                  f"({wall:.0f} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    rows = []
    for label, pts in results.items():
        xs, ys = zip(*pts)
        ax.step(list(xs) + [budget], list(ys) + [ys[-1]], where="post", label=label)
        rows += [{"method": label, "epochs_used": x, "best_val_accuracy": y} for x, y in pts]
    ax.set_xlabel("training epochs consumed (all trials)")
    ax.set_ylabel("best validation accuracy of a fully trained student")
    ax.set_ylim(0.5, None)
    ax.legend(fontsize=8)
    ax.set_title(f"MNIST-1D, same budget ({budget} epochs)")
    fig.tight_layout()
    fig.savefig(out / "search_curves.png", dpi=110)
    import pandas as pd

    pd.DataFrame(rows).to_csv(out / "search_curves.csv", index=False)
    summary = {label: {"best": pts[-1][1], "epochs_used": pts[-1][0]} for label, pts in results.items()}
    (out / "search_summary.json").write_text(json.dumps({"budget_epochs": budget, "methods": summary}, indent=2))
    import mlflow

    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment("kdray-benchmarks")
    with mlflow.start_run(run_name="search-strategies"):
        mlflow.log_params({"budget_epochs": budget, "epochs_per_trial": args.epochs, "seeds": args.seeds})
        for label, s in summary.items():
            mlflow.log_metric(f"best_val.{label.replace(' ', '_').replace('(', '').replace(')', '').replace('+', '_')}",
                              s["best"])
        mlflow.log_artifact(str(out / "search_curves.png"))
        mlflow.log_artifact(str(out / "search_curves.csv"))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
