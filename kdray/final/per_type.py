"""``kdray final --per-type``: every knowledge type's best configuration over the same seeds, each compared with
labels only seed by seed (paired t-tests, Holm-corrected over the types)."""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdray.errors import FinalError
from kdray.final.jobs import (
    JobLedger,
    best_of_type,
    final_teacher,
    group_label,
    labels_only,
    run_job_set,
    seed_jobs,
    trusted,
)
from kdray.final.stats import holm, paired
from kdray.goal import ACCURACY, Goal
from kdray.tracking.store import (
    TAG_KIND,
    TAG_PARENT,
    TAG_STATUS,
    TAG_SWEEP,
    client,
    find_sweep,
    log_metrics,
    metric_key,
    sweep_children,
    sweep_goal,
)


@dataclass
class PerTypeResult:
    sweep: str
    seeds: list[int]
    table: list[dict[str, Any]]  # per knowledge type: trial, accuracies per seed, mean, std, diff, ci, p, p_holm
    rows: list[dict[str, Any]]  # every retraining run
    baseline: str
    teacher_test: float = float("nan")  # the teacher's test value of the sweep's metric
    student: str = ""  # the champion's student, on which the types are compared
    missing: list[str] = field(default_factory=list)  # types with no trial to retrain
    run_id: str = ""
    goal: Goal = ACCURACY

    @property
    def teacher_test_accuracy(self) -> float:
        return self.teacher_test if self.goal.percent else float("nan")


def student_label(student: dict[str, Any] | None) -> str:
    """``resnet8x4`` or ``mnist1d_mlp width=256``: a student config in a few words."""
    student = student or {}
    return student.get("name", "") + "".join(f" {o}={v}" for o, v in (student.get("options") or {}).items())


def run_final_per_type(uri: str, sweep: str | None, seeds: int, storage: str, say=print,
                       step_hook: Any = None, by: str | None = None) -> PerTypeResult:
    """Retrain the best configuration of every knowledge type over the same ``seeds`` seeds, test each run once,
    and compare every type with ``none`` seed by seed (paired t-test, Holm-corrected over the types). With ``by`` (a
    searched parameter such as ``tkd.divergence``) every value of it counts as a type of its own.

    Each (configuration, seed) is recorded as it ends; a rerun retrains only the runs not recorded yet."""
    import mlflow

    if seeds < 2:
        raise FinalError("--seeds must be at least 2 for a standard deviation and a test")
    c = client(uri)
    parent = find_sweep(c, sweep)
    if parent is None:
        raise FinalError(f"no sweep named {sweep!r} in {uri}" if sweep else f"no finished sweep in {uri}")
    name = parent.data.tags[TAG_SWEEP]
    goal = sweep_goal(parent)
    trials = sweep_children(c, parent, kind="trial")
    kinds = list(dict.fromkeys(group_label(t, by) for t in sorted(
        trials, key=lambda r: int(r.data.tags.get("kdray.trial_number", 0) or 0))))
    if by and not any("[" in k for k in kinds):
        raise FinalError(f"no trial of sweep {name} searched {by!r}; the searched parameters are named as in "
                         "`kdray compare` (e.g. tkd.divergence, train.lr)")
    usable = [t for t in trials if t.data.tags.get(TAG_STATUS) in ("completed", "stopped_early")]
    if not usable:
        raise FinalError(f"sweep {name} has no trial that ran (completed or stopped early) to retrain")
    mlflow.set_tracking_uri(uri)
    try:
        cfg_of = {t.info.run_id: trusted(mlflow.artifacts.load_dict(f"runs:/{t.info.run_id}/resolved_config.json"))
                  for t in usable}
    except Exception as e:  # noqa: BLE001
        raise FinalError(f"sweep {name}'s trials have no resolved_config.json artifact (made by an older kdray?): "
                         f"{e}") from None
    # Types are compared on one student: the champion's (a searched student would otherwise confound the type
    # with the width or architecture its best trial happened to use). A type never tried with that student
    # keeps its own best trial's student, shown in the table.
    ref_id = parent.data.tags.get("kdray.champion_run_id")
    if ref_id not in cfg_of:
        ref_id = max(usable, key=lambda r: (r.data.tags.get(TAG_STATUS) == "completed",
                                            goal.key(r.data.metrics.get(goal.metric, math.nan)))).info.run_id
    ref_student = cfg_of[ref_id].get("student")
    same = [t for t in usable if cfg_of[t.info.run_id].get("student") == ref_student]
    best = {k: best_of_type(same, k, goal=goal, by=by) or best_of_type(usable, k, goal=goal, by=by) for k in kinds}
    best = {k: r for k, r in best.items() if r is not None}
    configs = {k: cfg_of[r.info.run_id] for k, r in best.items()}
    if "none" in best and configs["none"].get("student") == ref_student:
        baseline = f"labels-only trial {best['none'].data.tags.get('mlflow.runName')}"
    else:  # the reference trial's configuration without its knowledge terms: the same student
        ref = cfg_of[ref_id]
        configs["none"] = labels_only(ref)
        best.pop("none", None)
        configs = {"none": configs.pop("none"), **configs}
        ref_name = next(t for t in usable if t.info.run_id == ref_id).data.tags.get("mlflow.runName", ref_id)
        baseline = f"{ref_name}'s configuration without its knowledge terms (no labels-only trial with its student)"
    say(f"baseline: {baseline}")
    # A type whose best trial used another student (it was never tried with the champion's, or its choice pins
    # its own) meets labels only on *its* student: its configuration without knowledge terms, retrained too.
    baseline_of: dict[str, str] = {}
    for k in list(configs):
        st = configs[k].get("student")
        if k == "none" or st == ref_student:
            baseline_of[k] = "none"
            continue
        key = f"none ({student_label(st)})"
        configs.setdefault(key, labels_only(configs[k]))
        baseline_of[k] = key
    missing = [k for k in kinds if k not in best and k != "none"]
    if missing:
        say(f"no trial to retrain (every one failed): {', '.join(missing)}")
    seed_list = list(range(1, seeds + 1))  # the same seeds for every type: the same data order and views
    jobs = seed_jobs(configs, seed_list)
    with_teacher = [j.config for j in jobs if j.config.teacher is not None]
    refs, teacher_acc = (final_teacher(with_teacher[0], storage, uri, say, goal) if with_teacher
                         else ([], float("nan")))
    say(f"retraining {len(configs)} configurations, the best of each knowledge type ({', '.join(configs)}), with seeds "
        f"{seed_list}: {len(jobs)} runs")
    outputs = run_job_set(jobs, refs, storage, JobLedger(c, parent, name), say, step_hook)
    rows = [{"knowledge": j.label, "seed": j.seed, **o} for j, o in zip(jobs, outputs)]
    acc = {k: {r["seed"]: r[goal.test] for r in rows if r["knowledge"] == k
               and math.isfinite(r.get(goal.test, math.nan))} for k in configs}
    table = []
    for k in configs:
        vals = [acc[k][s] for s in seed_list if s in acc[k]]
        student = configs[k].get("student") or {}
        trial = "(derived)"
        if k in best:
            tags = best[k].data.tags
            trial = tags.get("mlflow.runName", best[k].info.run_id) + (
                "" if tags.get(TAG_STATUS) == "completed" else f" (stopped at epoch {tags.get('kdray.epochs', '?')})")
        entry = {"knowledge": k, "trial": trial, "run_id": best[k].info.run_id if k in best else "",
                 "student": student_label(student), "baseline": baseline_of.get(k, ""),
                 "n": len(vals), "mean": float(np.mean(vals)) if vals else float("nan"),
                 "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan"), goal.test: vals}
        if k in baseline_of and k != "none":
            b = baseline_of[k]
            common = [s for s in seed_list if s in acc[k] and s in acc[b]]
            if len(common) >= 2:
                diff, ci, p = paired([acc[k][s] for s in common], [acc[b][s] for s in common])
                entry.update(diff=diff, ci_low=ci[0], ci_high=ci[1], p=p, paired_seeds=len(common))
        table.append(entry)
    tested = [e for e in table if "p" in e]
    for e, ph in zip(tested, holm([e["p"] for e in tested])):
        e["p_holm"] = ph
    res = PerTypeResult(name, seed_list, table, rows, baseline, teacher_acc, student_label(ref_student), missing,
                        goal=goal)
    res.run_id = log_per_type(c, parent, res, configs)
    return res


def format_per_type(res: PerTypeResult, markdown: bool = False) -> str:
    """The table: the test metric's mean ± std per type (accuracy in %, a language model's NLL in nats per token),
    and the paired difference to ``none`` with its interval, its p-value and the Holm-corrected one (significant at
    5 % after correction: marked *)."""
    g = res.goal
    f = g.show
    head = ["knowledge", "trial", f"test {g.label}{' %' if g.percent else ''} (mean ± std)",
            f"Δ vs none ({'points' if g.percent else 'nats'}) [95% CI]", "p (paired t)", "p (Holm)"]
    digits = 2 if g.percent else 4
    lines = []
    for e in ordered(res.table, g):
        acc = f"{f(e['mean']):.{digits}f} ± {f(e['std']):.{digits}f}" if e["n"] > 1 else "(failed)"
        if "diff" in e:
            star = " *" if e["p_holm"] < 0.05 else ""
            diff = f"{f(e['diff']):+.{digits}f} [{f(e['ci_low']):+.{digits}f}, {f(e['ci_high']):+.{digits}f}]"
            ps = [f"{e['p']:.3g}", f"{e['p_holm']:.3g}{star}"]
            if e.get("baseline", "none") != "none":
                diff += f" vs {e['baseline']}"
        else:
            diff, ps = ("baseline" if e["knowledge"].startswith("none") else "-"), ["", ""]
        lines.append([e["knowledge"], str(e["trial"]), acc, diff, *ps])
    if len({e["student"] for e in res.table}) > 1:  # a searched student: which one each type's best used
        head.insert(2, "student")
        for cells, e in zip(lines, ordered(res.table, g)):
            cells.insert(2, e["student"])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
    else:
        widths = [max(len(head[i]), *(len(r[i]) for r in lines)) for i in range(len(head))]
        out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
        out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in lines]
    title = (f"final evaluation per knowledge type of sweep {res.sweep} on the test split, student {res.student}, "
             f"seeds {res.seeds} (the same seeds, data order and augmentation for every type); baseline: "
             f"{res.baseline}; * significant at 5% after Holm's correction"
             + (f"; teacher {f(res.teacher_test):.{digits}f}" if math.isfinite(res.teacher_test) else "")
             + (f"; no trial to retrain: {', '.join(res.missing)}" if res.missing else ""))
    return title + "\n" + "\n".join(out)


def ordered(table: list[dict[str, Any]], goal: Goal = ACCURACY) -> list[dict[str, Any]]:
    """Baselines first, then the types by their mean test value, best first."""
    return sorted(table, key=lambda e: (not e["knowledge"].startswith("none"), -goal.key(e["mean"])))


def per_type_png(res: PerTypeResult, path: str) -> None:
    """Box per type with every seed's test accuracy on it (strip), types in the table's order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = ordered(res.table, res.goal)
    data = [[res.goal.show(v) for v in e[res.goal.test]] for e in entries]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(entries) + 2), 4.2))
    ax.boxplot(data, widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)
    for i, vals in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(vals)), vals, s=18, zorder=3)
    ax.set_xticks(range(1, len(entries) + 1), [e["knowledge"] for e in entries], rotation=30, ha="right")
    ax.set_ylabel(f"test {res.goal.label}" + (" (%)" if res.goal.percent else ""))
    ax.set_title(f"{res.sweep}: best configuration per knowledge type, {len(res.seeds)} seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_per_type(c, parent, res: PerTypeResult, configs: dict[str, Any]) -> str:
    import tempfile
    from pathlib import Path

    import pandas as pd

    summary = "; ".join(f"{e['knowledge']} {res.goal.show(e['diff']):+.{2 if res.goal.percent else 4}f} "
                        f"(p_holm {e['p_holm']:.3g})" for e in res.table if "diff" in e)
    summary = f"per type over {len(res.seeds)} seeds vs none: {summary}"
    run = c.create_run(parent.info.experiment_id, run_name=f"final-per-type-{len(res.seeds)}-seeds", tags={
        TAG_PARENT: parent.info.run_id, TAG_KIND: "final", TAG_SWEEP: res.sweep, "kdray.final_mode": "per_type",
        "kdray.final_summary": summary, "kdray.final_baseline": res.baseline})
    rid = run.info.run_id
    metrics = {"seeds": len(res.seeds), f"teacher_{res.goal.test}": res.teacher_test}
    for e in res.table:
        metrics.update({f"{metric_key(e['knowledge'])}.{'test_' if k in ('mean', 'std') else ''}{k}": e[k]
                        for k in ("mean", "std", "diff", "ci_low", "ci_high", "p", "p_holm") if k in e})
    log_metrics(c, rid, metrics)  # the finite ones, in one call
    buf = io.StringIO()
    pd.DataFrame(res.rows).to_csv(buf, index=False)
    c.log_text(rid, buf.getvalue(), "final_runs.csv")
    c.log_text(rid, format_per_type(res, markdown=True) + "\n", "per_type.md")
    c.log_text(rid, json.dumps(res.table, indent=2, default=str), "per_type.json")
    c.log_text(rid, json.dumps(configs, indent=2, default=str), "configs.json")
    with tempfile.TemporaryDirectory() as d:
        png = Path(d) / f"per_type_{res.goal.test}.png"
        per_type_png(res, str(png))
        c.log_artifact(rid, str(png), "plots")
    c.set_terminated(rid, "FINISHED")
    c.set_tag(parent.info.run_id, "kdray.final_per_type_run_id", rid)
    return rid
