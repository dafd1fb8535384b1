"""The sweep commands: ``kdray sweep``, ``kdray best``, ``kdray compare``."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from kdray.errors import ConfigError, KdrayError
from kdray.goal import ACCURACY, Goal
from kdray.storage import resolve_storage
from kdray.tracking.store import (
    TAG_KNOWLEDGE,
    TAG_STATUS,
    TAG_TRIAL,
    client,
    find_sweep,
    sweep_children,
    sweep_goal,
    tracking_uri,
)

REPO_SPACES = Path(__file__).resolve().parents[2] / "search_spaces"


def default_space() -> str:
    """``search_spaces/default.yaml`` of this folder, else the one beside the kdray sources."""
    here = Path("search_spaces/default.yaml")
    return str(here if here.is_file() else REPO_SPACES / "default.yaml")


def _latest_sweep_dir(storage: str, space_name: str) -> str | None:
    """The newest sweep of this search space in a local storage folder: its stored space name must be this one
    (a name prefix is not enough: spaces ``digits`` and ``digits-big`` share one)."""
    from kdray.sweep.runner import SWEEP_FILE

    root = Path(storage)
    if not root.is_dir():
        return None

    def of_this_space(p: Path) -> bool:
        try:
            stored = json.loads((p / SWEEP_FILE).read_text()).get("space")
        except (OSError, ValueError):
            return False
        return stored == space_name and (p / "tuner.pkl").exists()

    cands = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(space_name + "-") and of_this_space(p)]
    return max(cands, key=lambda p: p.stat().st_mtime).name if cands else None


def cmd_sweep(args: argparse.Namespace) -> int:
    from kdray.sweep.runner import SweepRequest, is_remote, run_sweep
    from kdray.sweep.space import check_space
    from kdray.tracking.store import probe

    path = args.space or default_space()
    capacity = None if args.address else None  # local machine; a joined cluster is checked once connected
    uri = tracking_uri(args.tracking_uri)
    space = check_space(path, capacity if not args.address else {"CPU": math.inf, "GPU": math.inf}, tracking_uri=uri)
    storage = resolve_storage(args.storage)  # a URI stays a URI
    probe(uri)
    name = args.name
    if args.resume and not name:
        name = _latest_sweep_dir(storage, space.name) if not is_remote(storage) else None
        if not name:
            raise ConfigError("--resume needs --name NAME (no interrupted sweep of this space found in "
                              f"{storage})", field="--name")
    name = name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    req = SweepRequest(space=space, space_path=path, space_yaml=Path(path).read_text(), name=name, storage=storage,
                       tracking_uri=uri, address=args.address, resume=args.resume, num_samples=args.num_samples,
                       max_concurrent=args.max_concurrent, quiet=args.quiet)
    result = run_sweep(req)
    if result.interrupted:
        return 130
    print()
    print(f"sweep {result.name} finished in {result.wall_s:.0f} s ({len(result.outcomes)} trials)")
    print(_format_board(result.leaderboard))
    if not result.budget.empty:
        fair = space.min_trials_per_type and space.scheduler.type == "asha"
        print("\nbudget per knowledge type" + (f" (fair budget: {space.min_trials_per_type} full-length trials each "
                                               "before ASHA may abandon a type)" if fair else "") + ":")
        print(format_budget(result.budget, space.goal))
    if space.multi_objective and "pareto" in result.leaderboard.columns:
        front = result.leaderboard[result.leaderboard["pareto"]]
        cost, metric = space.objectives[1], space.metric
        print(f"\nPareto front of {metric} and {cost}: trials "
              + ", ".join(f"{int(r.trial)} ({getattr(r, metric):.4f}, {getattr(r, cost):.4g})"
                          for r in front.sort_values(cost).itertuples()))
        print("  pick the best within a budget: kdray best --sweep " + result.name + " --max-latency-ms MS "
              "[--max-params N]")
    if result.champion:
        ch = result.champion
        print(f"\nchampion: {ch.knowledge} (trial {ch.trial_id}) val_accuracy {ch.val_accuracy:.4f}, "
              f"test_accuracy {ch.test_accuracy:.4f}"
              + "".join(f", {k} {v:.4f}" for k, v in sorted(ch.metrics.items())))
        print(f"{ch.note}\n  {ch.model_uri}" + (f" = {ch.alias_uri}" if ch.alias_uri else ""))
        print(f"MLflow UI: mlflow ui --backend-store-uri {uri}")
    return 0


def format_budget(df, goal: Goal = ACCURACY) -> str:
    view = df.copy()
    best = f"best_{goal.metric}"
    view["epoch_share"] = view["epoch_share"].map(lambda v: f"{v * 100:.0f}%")
    if "token_share" in view:  # a language model's trials: what each type trained on and generated
        view["token_share"] = view["token_share"].map(lambda v: f"{v * 100:.0f}%")
    view[best] = view[best].map(lambda v: "-" if v != v else f"{v:.4f}")
    return view.rename(columns={"full_length": "full-length", "epoch_share": "share", "token_share": "token share",
                                best: f"best {goal.metric} (full-length)"}).to_string(index=False)


def _format_board(df, limit: int = 20) -> str:
    if df.empty:
        return "(no trials)"
    cols = [c for c in ["rank", "trial", "knowledge", "status", "epochs", "val_nll", "val_accuracy", "pareto",
                        "latency_ms", "student_params"] if c in df.columns]
    extra = [c for c in df.columns if c not in cols and c not in ("trial_id", "run_id")]
    view = df[cols + extra].head(limit).copy()
    for c in view.columns:
        if view[c].dtype.kind == "f":
            view[c] = view[c].map(lambda v: "" if v != v else f"{v:.4g}")
    view = view.fillna("")
    return view.to_string(index=False)


# -- best ----------------------------------------------------------------------------------------------
def no_sweep(uri: str, sweep: str | None) -> str:
    if sweep:
        return f"no sweep named {sweep!r} in the MLflow store {uri}"
    return (f"no finished sweep in the MLflow store {uri} (a sweep still running or interrupted is read only with "
            "--sweep NAME)")


def champion_info(uri: str, sweep: str | None) -> dict[str, Any]:

    c = client(uri)
    parent = find_sweep(c, sweep)
    if parent is None:
        raise KdrayError(no_sweep(uri, sweep))
    tags = parent.data.tags
    run_id = tags.get("kdray.champion_run_id")
    if not run_id:
        raise KdrayError(f"sweep {tags.get('kdray.sweep')} has no champion (status: {tags.get(TAG_STATUS, 'running')})")
    run = c.get_run(run_id)
    metrics = parent.data.metrics
    params = dict(run.data.params)
    searched = json.loads(run.data.tags.get("kdray.searched", "{}"))
    goal = sweep_goal(parent)
    return {
        "metric": goal.metric,
        **({f"{k}": metrics[f"champion_{k}"] for k in ("val_nll", "test_nll", "test_ppl", "val_exact_match",
                                                       "test_exact_match")
            if f"champion_{k}" in metrics}),
        "sweep": tags.get("kdray.sweep"),
        "experiment_id": parent.info.experiment_id,
        "parent_run_id": parent.info.run_id,
        "run_id": run_id,
        "trial_id": run.data.tags.get(TAG_TRIAL),
        "knowledge": tags.get("kdray.champion_knowledge"),
        "model_uri": tags.get("kdray.champion_model_uri"),
        "alias_uri": f"models:/{tags.get('kdray.registered_model')}@champion",
        "registered_model": tags.get("kdray.registered_model"),
        "version": tags.get("kdray.champion_version"),
        "val_accuracy": metrics.get("champion_val_accuracy"),
        "test_accuracy": metrics.get("champion_test_accuracy"),
        "params": params,
        "searched": searched,
    }


def cmd_best(args: argparse.Namespace) -> int:
    uri = tracking_uri(args.tracking_uri)
    if args.max_latency_ms is not None or args.max_params is not None:
        return _best_within_budget(args, uri)
    info = champion_info(uri, args.sweep)
    _export(info, args, uri)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"sweep {info['sweep']}: champion {info['knowledge']} (trial {info['trial_id']}, run {info['run_id']})")
    sel = info["metric"]
    print(f"  {sel:<13} {info[sel]:.4f}   (selection)")
    for k in ("val_accuracy", "val_nll", "test_exact_match", "test_nll", "test_ppl", "test_accuracy"):
        if k != sel and info.get(k) is not None:
            print(f"  {k:<13} {info[k]:.4f}" + ("   (measured once, after selection)" if k.startswith("test") else ""))
    print(f"  model         {info['model_uri']}  =  {info['alias_uri']}")
    for k, v in sorted(info["searched"].items()):
        print(f"  {k:<28} {v}")
    for k, v in info.get("exported", {}).items():
        print(f"  exported {k}: {v}")
    return 0


def _export(info: dict[str, Any], args: argparse.Namespace, uri: str) -> None:
    """With ``--export DIR``: write the chosen run's student there (``--onnx`` too) and note the files in ``info``."""
    if not args.export:
        return
    from kdray.tracking.champion import export

    formats = ("state_dict", "torchscript") + (("onnx",) if args.onnx else ())
    info["exported"] = export(info["run_id"], args.export, uri, formats)


def _best_within_budget(args: argparse.Namespace, uri: str) -> int:
    from kdray.sweep.front import register_within_budget

    for flag, v in (("--max-latency-ms", args.max_latency_ms), ("--max-params", args.max_params)):
        if v is not None and not v > 0:
            raise KdrayError(f"{flag} must be positive, got {v:g}")
    info = register_within_budget(uri, args.sweep, args.max_latency_ms, args.max_params)
    _export(info, args, uri)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"sweep {info['sweep']}: the most accurate of {info['candidates']} full-length students with "
          f"{info['budget']}")
    print(f"  trial {info['trial']} ({info['knowledge']}, student {info['student']}, run {info['run_id']})")
    print(f"  val_accuracy  {info['val_accuracy']:.4f}   (selection)")
    print(f"  test_accuracy {info['test_accuracy']:.4f}   (measured once, after selection)")
    print(f"  latency_ms    {info.get('latency_ms', float('nan')):.4g} (batch 1), "
          f"{info.get('latency_b64_ms', float('nan')):.4g} (batch 64); {info.get('student_params', 0):.0f} parameters")
    print(f"  model         {info['model_uri']}  =  {info['alias_uri']}")
    for k, v in info.get("exported", {}).items():
        print(f"  exported {k}: {v}")
    return 0


# -- compare ---------------------------------------------------------------------------------------------
def trial_table(uri: str, sweep: str | None):
    import pandas as pd


    c = client(uri)
    parent = find_sweep(c, sweep)
    if parent is None:
        raise KdrayError(no_sweep(uri, sweep))
    goal = sweep_goal(parent)
    rows = []
    for run in sweep_children(c, parent, kind="trial"):
        t = run.data.tags
        row = {"trial": t.get("mlflow.runName", ""), "knowledge": t.get(TAG_KNOWLEDGE, "none"),
               "status": t.get(TAG_STATUS, run.info.status.lower()), "epochs": int(t.get("kdray.epochs", 0) or 0),
               **{m: run.data.metrics.get(m, float("nan")) for m in dict.fromkeys([goal.metric, "val_accuracy"])},
               "run_id": run.info.run_id,
               **{k: run.data.metrics[k] for k in ("latency_ms", "student_params", "budget_tokens")
                  if k in run.data.metrics}}
        row.update({k: v for k, v in json.loads(t.get("kdray.searched", "{}")).items() if k != "knowledge"})
        rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty:
        df = df.sort_values(goal.metric, ascending=not goal.maximise, na_position="last").reset_index(drop=True)
    return parent, df



def knowledge_summary(df, goal: Goal = ACCURACY) -> list[dict[str, Any]]:
    """Per knowledge type: its best completed trial against the best completed labels-only trial (``gain_over_none``
    is the difference in the sweep's metric: positive is better for accuracy, negative for NLL)."""
    from kdray.sweep.budget import budget_by_type

    if df.empty:
        return []
    budget = budget_by_type(df, [], goal).set_index("knowledge")
    budget = budget[budget["full_length"] > 0]
    key = f"best_{goal.metric}"
    best = budget[key].sort_values(ascending=not goal.maximise)
    base = best.get("none", float("nan"))
    return [{"knowledge": k, key: float(v), "gain_over_none": float(v - base) if base == base else None,
             "trials": int(budget.at[k, "trials"]), "full_length": int(budget.at[k, "full_length"]),
             "epochs": int(budget.at[k, "epochs"]),
             **({"tokens": int(budget.at[k, "tokens"])} if "tokens" in budget else {})} for k, v in best.items()]


def cmd_compare(args: argparse.Namespace) -> int:
    uri = tracking_uri(args.tracking_uri)
    parent, df = trial_table(uri, args.sweep)
    goal = sweep_goal(parent)
    summary = knowledge_summary(df, goal)
    finals = _final_runs(uri, parent)
    if args.json:
        print(json.dumps({"sweep": parent.data.tags.get("kdray.sweep"), "trials": df.to_dict(orient="records"),
                          "by_knowledge": summary, "final": finals}, indent=2, default=str))
        return 0
    if args.csv:
        df.to_csv(sys.stdout, index=False)
        return 0
    m = goal.metric
    print(f"sweep {parent.data.tags.get('kdray.sweep')}: {len(df)} trials (sorted by validation {goal.label})")
    print(_format_board(df.drop(columns=["run_id"]), limit=len(df)))
    print("\nbest completed trial per knowledge type, against labels only (none):")
    nones = df[df["knowledge"] == "none"] if not df.empty else df
    if not nones.empty and not (nones["status"] == "completed").any():
        top = nones.sort_values([m, "epochs"], ascending=[not goal.maximise, False]).iloc[0]
        print(f"  (no labels-only trial ran to the end: the best, {top['trial']}, reached {m} {top[m]:.4f} "
              f"before it was {top['status'].replace('_', ' ')} at epoch {top['epochs']}; "
              "`kdray final` retrains it in full)")
    for s in summary:
        gain = s["gain_over_none"]
        diff = (f"{gain * 100:+.2f} points" if goal.percent else f"{gain:+.4f}") if gain is not None else None
        print(f"  {s['knowledge']:<12} {s[f'best_{m}']:.4f}   "
              + (diff if diff is not None else "(no completed `none` trial)")
              + f"   ({s['trials']} trials, {s['full_length']} full-length, {s['epochs']} epochs"
              + (f", {s['tokens']} tokens)" if "tokens" in s else ")"))
    for f in finals:
        print(f"\nfinal evaluation over {f['seeds']} seeds (test split): {f['summary']}")
    return 0


def _final_runs(uri: str, parent) -> list[dict[str, Any]]:
    c = client(uri)
    out = []
    for run in sweep_children(c, parent, kind="final"):
        m = run.data.metrics
        out.append({**m, "run_id": run.info.run_id, "seeds": int(m.get("seeds", 0)),
                    "summary": run.data.tags.get("kdray.final_summary", "")})
    return out


# -- final -------------------------------------------------------------------------------------------------
def _check_champion_plugins(uri: str, run_id: str, say) -> None:
    """The plugin modules the sweep's runs named are *not* imported from MLflow (anyone who can write to the tracking
    server would choose what runs here): they must be imported already, by ``--plugin`` or an installed entry
    point. Says which the sweep used; refuses, naming them, when one is missing."""
    import mlflow

    from kdray import plugins

    mlflow.set_tracking_uri(uri)
    try:
        names = mlflow.artifacts.load_dict(f"runs:/{run_id}/resolved_config.json").get("plugins") or []
    except Exception:  # noqa: BLE001 - an older run without the artifact: run_final reports it
        return
    if not names:
        return
    missing = [n for n in names if n not in plugins.imported()]
    if missing:
        raise ConfigError(f"the sweep's trials used the plugin modules {', '.join(names)}; kdray final imports no "
                          f"module named by MLflow runs: pass {' '.join('--plugin ' + n for n in missing)} to import "
                          "them from this machine", field="--plugin")
    say(f"the sweep's trials used the plugin modules {', '.join(names)} (imported here by --plugin)")


def cmd_final(args: argparse.Namespace) -> int:
    from kdray.final import format_table, run_final
    from kdray.ray_setup import init_ray
    from kdray.tracking.store import probe

    uri = tracking_uri(args.tracking_uri)
    probe(uri)
    info = champion_info(uri, args.sweep)  # fails clearly before Ray starts if there is nothing to evaluate
    if args.seeds < 2:
        raise KdrayError("--seeds must be at least 2")
    if args.by and not args.per_type:
        raise ConfigError("--by goes with --per-type", field="--by")
    say = lambda m: print(f"[kdray] {m}", flush=True, file=sys.stderr if args.json else sys.stdout)  # noqa: E731
    _check_champion_plugins(uri, info["run_id"], say)  # before Ray starts: its workers must import them too
    init_ray(args.address)
    if args.per_type:
        from kdray.final import format_per_type, run_final_per_type

        pt = run_final_per_type(uri, args.sweep, args.seeds, resolve_storage(args.storage), say=say, by=args.by)
        if args.json:
            print(json.dumps({"sweep": pt.sweep, "seeds": pt.seeds, "baseline": pt.baseline, "types": pt.table,
                              "metric": pt.goal.test, "teacher_test": pt.teacher_test,
                              "teacher_test_accuracy": pt.teacher_test_accuracy, "run_id": pt.run_id,
                              "markdown": format_per_type(pt, markdown=True)}, indent=2, default=str))
        else:
            print(format_per_type(pt, markdown=args.markdown))
        return 0
    # with --json, stdout carries only the JSON: progress goes to stderr
    res = run_final(uri, args.sweep, args.seeds, resolve_storage(args.storage), say=say)
    if args.json:
        print(json.dumps({"sweep": res.sweep, "seeds": res.seeds, "champion": res.champion, "none": res.none,
                          "teacher_test_accuracy": res.teacher_test_accuracy, "gain": res.gain,
                          # JSON has no NaN: an undefined test or interval is null
                          "p_value": _finite(res.p_value), "ci": [_finite(v) for v in res.ci],
                          "baseline": res.baseline, "run_id": res.run_id}, indent=2))
    else:
        print(format_table(res))
    return 0


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


# -- registration with the main parser -----------------------------------------------------------------------
def add_sweep_commands(sub, common: argparse.ArgumentParser) -> None:
    track = argparse.ArgumentParser(add_help=False)
    track.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else "
                       "sqlite:///mlflow.db in this folder)")
    which = argparse.ArgumentParser(add_help=False)
    which.add_argument("--sweep", help="the sweep's name (default: the most recent finished sweep)")

    s = sub.add_parser(
        "sweep", parents=[common, track], help="search knowledge types and hyperparameters with Ray Tune + Optuna",
        description="Run a sweep: every trial is a distillation run of the kdray training loop; Optuna "
        "(seeded TPE over a conditional space) proposes the knowledge type and its parameters, ASHA stops "
        "weak trials, MLflow records every trial, and the best student is registered with the alias "
        "`champion`. Progress is printed as trials start and finish.",
    )
    s.add_argument("space", nargs="?", help="search space YAML (default search_spaces/default.yaml)")
    s.add_argument("--num-samples", type=int, help="number of trials (default: the space's num_samples)")
    s.add_argument("--name", help="sweep name (default <space>-<date>-<time>); with --resume, the sweep to finish")
    s.add_argument("--resume", action="store_true", help="finish an interrupted sweep: unfinished trials resume "
                   "from their checkpoints, finished ones are not run again")
    s.add_argument("--max-concurrent", type=int, help="trials at once (default: what the cluster's CPUs/GPUs fit)")
    s.add_argument("--quiet", action="store_true", help="only the final leaderboard")
    s.set_defaults(fn=cmd_sweep)

    s = sub.add_parser("best", parents=[track, which], help="the champion of a sweep: metrics, model URI, export",
                       description="Print the best trial of a sweep (selected on validation accuracy; its test "
                       "accuracy was measured once, after selection).")
    s.add_argument("--json", action="store_true", help="print run_id, model_uri, val_accuracy, test_accuracy, "
                   "params as JSON")
    s.add_argument("--export", metavar="DIR", help="write the student as a state dict and TorchScript into DIR")
    s.add_argument("--onnx", action="store_true",
                   help="with --export, also write ONNX (needs `pip install kdray[onnx]`)")
    s.add_argument("--max-latency-ms", type=float, metavar="MS",
                   help="instead of the champion: the most accurate full-length student whose measured latency "
                   "(batch 1, on the space's latency device: CPU by default) is at most MS; it is registered as a "
                   "version with the alias @within-<MS>ms")
    s.add_argument("--max-params", type=float, metavar="N", help="the same with at most N parameters (e.g. 1e6); "
                   "may be combined with --max-latency-ms")
    s.set_defaults(fn=cmd_best)

    s = sub.add_parser("compare", parents=[track, which], help="every trial of a sweep, and each knowledge type "
                       "against labels only")
    fmt = s.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="CSV of every trial")
    fmt.add_argument("--json", action="store_true", help="JSON with trials, per-knowledge summary, final runs")
    s.set_defaults(fn=cmd_compare)

    s = sub.add_parser("final", parents=[common, track, which],
                       help="retrain the champion and the best labels-only config over seeds; test with error bars",
                       description="Retrain the champion's configuration and the best `none` configuration with K "
                       "fresh seeds each, evaluate every run on the test split, and report mean ± std, the "
                       "teacher's accuracy and the gain with Welch's t-test and a bootstrap interval. Logged as "
                       "an MLflow run under the sweep and attached to the registered champion. Each (configuration, "
                       "seed) is recorded in MLflow as it ends: if one fails, the others are kept, and running the "
                       "same command again retrains only the runs not recorded yet.")
    s.add_argument("--seeds", type=int, default=5, help="seeds per configuration (default 5)")
    s.add_argument("--per-type", action="store_true",
                   help="retrain the best configuration of every knowledge type over the same seeds (common random "
                   "numbers: the same data order and augmentation), and compare each with none seed by seed: mean ± "
                   "std, the paired difference with a 95%% interval, paired t-test p-values with Holm's correction, "
                   "and a box/strip plot in MLflow")
    s.add_argument("--markdown", action="store_true", help="with --per-type, print the table as Markdown")
    s.add_argument("--by", metavar="PARAM", help="with --per-type, also split each knowledge type by a searched "
                   "parameter (e.g. tkd.divergence): the best configuration of every value is retrained and compared "
                   "with none")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_final)
