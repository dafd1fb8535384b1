"""``kdray final``: the champion against the best labels-only configuration, retrained over seeds on the test split."""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdray.config import RunConfig
from kdray.errors import FinalError
from kdray.final.jobs import JobLedger, best_labels_only, final_teacher, labels_only, run_job_set, seed_jobs, trusted
from kdray.final.stats import bootstrap_ci, describe_interval, describe_p, welch
from kdray.goal import ACCURACY, Goal
from kdray.tracking.store import (
    TAG_KIND,
    TAG_PARENT,
    TAG_STATUS,
    TAG_SWEEP,
    client,
    find_sweep,
    log_metrics,
    sweep_children,
    sweep_goal,
)


@dataclass
class FinalResult:
    sweep: str
    seeds: list[int]
    champion: list[float]
    none: list[float]
    teacher_test_accuracy: float
    champion_knowledge: str
    p_value: float
    ci: tuple[float, float]
    baseline: str  # which labels-only configuration was retrained, in words
    run_id: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)
    goal: Goal = ACCURACY  # champion / none / teacher hold the test values of the sweep's metric

    @property
    def gain(self) -> float:
        """Champion minus none, in the metric's own direction: positive for more accuracy, negative for less NLL."""
        return float(np.mean(self.champion) - np.mean(self.none))

    def summary(self) -> str:
        g = self.goal
        c, n = np.array([g.show(v) for v in self.champion]), np.array([g.show(v) for v in self.none])
        d = 2 if g.percent else 4
        scale = g.show(1.0)
        ci = (self.ci[0] * scale, self.ci[1] * scale)
        return (f"{self.champion_knowledge} {c.mean():.{d}f} ± {c.std(ddof=1):.{d}f} vs none "
                f"{n.mean():.{d}f} ± {n.std(ddof=1):.{d}f} ({'gain' if g.percent else 'difference'} "
                f"{g.show(self.gain):+.{d}f} {'points' if g.percent else 'nats'}, "
                f"{describe_interval(ci, d)}, {describe_p(self.p_value).strip()}); "
                f"teacher {g.show(self.teacher_test_accuracy):.{d}f}")


def run_final(uri: str, sweep: str | None, seeds: int, storage: str, say=print, step_hook: Any = None) -> FinalResult:
    """Retrain the champion and the best ``none`` trial over ``seeds`` seeds; log and return the result.

    Each (configuration, seed) is recorded as it ends; a rerun retrains only the runs not recorded yet.
    ``step_hook``: a callable(epoch, step) run before every training step (tests inject faults with it)."""
    import mlflow

    if seeds < 2:
        raise FinalError("--seeds must be at least 2 for a standard deviation and a test")
    c = client(uri)
    parent = find_sweep(c, sweep)
    if parent is None:
        raise FinalError(f"no sweep named {sweep!r} in {uri}" if sweep else
                         f"no finished sweep in {uri} (name a running or interrupted one with --sweep)")
    name = parent.data.tags[TAG_SWEEP]
    goal = sweep_goal(parent)
    champ_id = parent.data.tags.get("kdray.champion_run_id")
    if not champ_id:
        raise FinalError(f"sweep {name} has no champion yet (status {parent.data.tags.get(TAG_STATUS)})")
    # The champion never serves as its own baseline (a labels-only champion against itself measures noise).
    best_none = best_labels_only(sweep_children(c, parent, kind="trial"), exclude=champ_id, goal=goal)
    mlflow.set_tracking_uri(uri)
    try:
        configs = {"champion": trusted(mlflow.artifacts.load_dict(f"runs:/{champ_id}/resolved_config.json"))}
        if best_none is not None:
            none_id = best_none.info.run_id
            configs["none"] = trusted(mlflow.artifacts.load_dict(f"runs:/{none_id}/resolved_config.json"))
    except Exception as e:  # noqa: BLE001
        raise FinalError(f"sweep {name}'s trials have no resolved_config.json artifact (made by an older kdray?): "
                         f"{e}") from None
    # Labels only: no knowledge term and nobody teaching (dml peers teach each other without knowledge terms).
    champ_is_none = (not configs["champion"].get("knowledge")
                     and (configs["champion"].get("scheme") or {}).get("type", "distill") == "distill")
    if best_none is None and champ_is_none:
        baseline = ("the champion's own configuration (the champion is labels-only and the sweep has no other "
                    "labels-only trial): the difference measures seed-to-seed noise, not distillation")
        configs["none"] = dict(configs["champion"])
    elif best_none is None:
        baseline = "the champion's configuration without its knowledge terms (the sweep has no labels-only trial)"
        configs["none"] = labels_only(configs["champion"])
    else:
        st = best_none.data.tags.get(TAG_STATUS, "").replace("_", " ")
        ep = best_none.data.tags.get("kdray.epochs", "?")
        baseline = f"labels-only trial {best_none.data.tags.get('mlflow.runName', best_none.info.run_id)} ({st}" + (
            "" if st == "completed" else f" after {ep} epochs: no labels-only trial ran to the end") + ")"
    say(f"baseline: {baseline}")
    champ_cfg = RunConfig.model_validate(configs["champion"])
    if champ_is_none and best_none is not None:
        say("the champion is itself a labels-only trial: its 'gain' is measured against the best other none trial")
    refs, teacher_acc = final_teacher(champ_cfg, storage, uri, say, goal)
    seed_list = list(range(1, seeds + 1))  # fresh seeds: the sweep's trials all used the space's seed
    jobs = seed_jobs(configs, seed_list)
    say(f"retraining {champ_cfg.knowledge_label} (champion) and none (best labels-only) with seeds {seed_list}: "
        f"{len(jobs)} runs")
    outputs = run_job_set(jobs, refs, storage, JobLedger(c, parent, name), say, step_hook)
    rows = [{"config": j.label, "seed": j.seed, **o} for j, o in zip(jobs, outputs)]
    champ = [r[goal.test] for r in rows if r["config"] == "champion" and math.isfinite(r.get(goal.test, math.nan))]
    none = [r[goal.test] for r in rows if r["config"] == "none" and math.isfinite(r.get(goal.test, math.nan))]
    if len(champ) < 2 or len(none) < 2:
        raise FinalError(f"too many retraining runs failed (champion {len(champ)}, none {len(none)} succeeded)")
    res = FinalResult(name, seed_list, champ, none, teacher_acc, champ_cfg.knowledge_label, welch(champ, none),
                      bootstrap_ci(champ, none), baseline=baseline, rows=rows, goal=goal)
    res.run_id = log_final(c, parent, res, configs)
    return res


def log_final(c, parent, res: FinalResult, configs: dict[str, Any]) -> str:
    import pandas as pd

    exp = parent.info.experiment_id
    run = c.create_run(exp, run_name=f"final-{len(res.seeds)}-seeds", tags={
        TAG_PARENT: parent.info.run_id, TAG_KIND: "final", TAG_SWEEP: res.sweep,
        "kdray.final_summary": res.summary(), "kdray.final_baseline": res.baseline})
    rid = run.info.run_id
    log_metrics(c, rid, {  # the finite ones: an undefined test or interval is left out, and said in the summary
        "seeds": len(res.seeds), "champion_test_mean": float(np.mean(res.champion)),
        "champion_test_std": float(np.std(res.champion, ddof=1)), "none_test_mean": float(np.mean(res.none)),
        "none_test_std": float(np.std(res.none, ddof=1)), "gain": res.gain, "p_value_welch": res.p_value,
        "gain_ci_low": res.ci[0], "gain_ci_high": res.ci[1], "teacher_test_accuracy": res.teacher_test_accuracy})
    buf = io.StringIO()
    pd.DataFrame(res.rows).to_csv(buf, index=False)
    c.log_text(rid, buf.getvalue(), "final_runs.csv")
    c.log_text(rid, json.dumps(configs, indent=2, default=str), "configs.json")
    c.set_terminated(rid, "FINISHED")
    for k, v in {"kdray.final_run_id": rid, "kdray.final_summary": res.summary()}.items():
        c.set_tag(parent.info.run_id, k, v)
    model, version = parent.data.tags.get("kdray.registered_model"), parent.data.tags.get("kdray.champion_version")
    if model and version:
        for k, v in {"final_test_mean": f"{np.mean(res.champion):.6f}",
                     "final_test_std": f"{np.std(res.champion, ddof=1):.6f}",
                     "final_none_mean": f"{np.mean(res.none):.6f}", "final_gain": f"{res.gain:.6f}",
                     "final_p_value": f"{res.p_value:.6g}", "final_seeds": str(len(res.seeds))}.items():
            c.set_model_version_tag(model, version, k, v)
        c.update_model_version(model, version, description=f"kdray final over {len(res.seeds)} seeds: {res.summary()}")
    return rid


def format_table(res: FinalResult) -> str:
    g = res.goal
    scale, d = g.show(1.0), (2 if g.percent else 4)
    c, n = np.array(res.champion) * scale, np.array(res.none) * scale
    unit = "points" if g.percent else "nats"
    lines = [f"final evaluation of sweep {res.sweep} on the test split, seeds {res.seeds}",
             f"  {'':<28}{'test ' + g.label + (' (%)' if g.percent else ''):>22}",
             f"  {'teacher':<28}{res.teacher_test_accuracy * scale:>15.{d}f}",
             f"  {'labels only (none)':<28}{n.mean():>15.{d}f} ± {n.std(ddof=1):.{d}f}   baseline: {res.baseline}",
             f"  {'champion (' + res.champion_knowledge + ')':<28}{c.mean():>15.{d}f} ± {c.std(ddof=1):.{d}f}",
             f"  {'gain' if g.percent else 'difference'} {res.gain * scale:+.{d}f} {unit}; "
             f"{describe_interval((res.ci[0] * scale, res.ci[1] * scale), d)}; {describe_p(res.p_value)}"]
    return "\n".join(lines)
