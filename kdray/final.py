"""``kdray final``: what distillation gained, with error bars, on the test split.

A sweep selects on one validation split with one seed, so its best trial is an optimistic estimate.
``final`` retrains the champion's configuration and the best labels-only (``none``) configuration with
K fresh seeds each, evaluates every run once on the test split, and reports mean ± std for both, the
teacher's own accuracy, the gain and its significance (Welch's t-test, and a bootstrap 95 % interval
of the difference of means). The result is an MLflow run under the sweep, shown by ``kdray compare``
and attached to the registered champion as tags and a description.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdray.config import RunConfig
from kdray.final_jobs import FinalJobsFailed, Job, JobLedger, run_jobs
from kdray.tracking.store import (TAG_KIND, TAG_PARENT, TAG_STATUS, TAG_SWEEP, client, find_sweep, log_metrics,
                                  metric_key, sweep_children)


class FinalError(RuntimeError):
    pass


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

    @property
    def gain(self) -> float:
        return float(np.mean(self.champion) - np.mean(self.none))

    def summary(self) -> str:
        c, n = np.array(self.champion), np.array(self.none)
        return (f"{self.champion_knowledge} {c.mean() * 100:.2f} ± {c.std(ddof=1) * 100:.2f} vs none "
                f"{n.mean() * 100:.2f} ± {n.std(ddof=1) * 100:.2f} (gain {self.gain * 100:+.2f} points, "
                f"{describe_interval(self.ci)}, {describe_p(self.p_value).strip()}); "
                f"teacher {self.teacher_test_accuracy * 100:.2f}")


def welch(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances); 1.0 for two identical constant samples, NaN
    (undefined) for two different constant samples: without any variance the test cannot say how sure it is."""
    from scipy import stats

    # Constant samples are judged by their values (max == min), not by np.std == 0: the mean of [0.9] * 3 is
    # 0.9000000000000001, so its std is a rounding error and scipy then returns 6e-31 or NaN.
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return float("nan") if a[0] != b[0] else 1.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


MIN_BOOTSTRAP_SEEDS = 3  # two values resample to three distinct means: no interval worth reporting


def bootstrap_ci(a: list[float], b: list[float], n: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of mean(a) - mean(b), resampling each group with replacement (scipy's
    bootstrap of two independent samples); (NaN, NaN) with fewer than 3 values in a group."""
    from scipy import stats

    if min(len(a), len(b)) < MIN_BOOTSTRAP_SEEDS:
        return float("nan"), float("nan")
    res = stats.bootstrap((np.asarray(a), np.asarray(b)), lambda x, y, axis: x.mean(axis) - y.mean(axis),
                          n_resamples=n, confidence_level=0.95, method="percentile", vectorized=True,
                          rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def describe_interval(ci: tuple[float, float]) -> str:
    if not all(map(math.isfinite, ci)):
        return f"bootstrap interval needs at least {MIN_BOOTSTRAP_SEEDS} seeds per configuration"
    return f"bootstrap 95% interval [{ci[0] * 100:+.2f}, {ci[1] * 100:+.2f}]"


def describe_p(p: float) -> str:
    if not math.isfinite(p):
        return "Welch's t-test undefined (no variance in either sample)"
    return f"Welch's t-test p = {p:.3g}" + ("  (significant at 5%)" if p < 0.05 else "  (not significant at 5%)")


def _train_and_test(run: dict[str, Any], teacher_refs: list, storage: str = "",
                    step_hook: Any = None) -> dict[str, float]:
    """One seed of one configuration, trained as the sweep trained its trials (inline in one process, or a
    TorchTrainer over the same workers, so the global batch is the same), then measured on the test split."""
    import tempfile
    from pathlib import Path

    import torch

    from kdray.data import load_dataset
    from kdray.models import load_record, model_from_record
    from kdray.ray_setup import quiet_ray_loggers
    from kdray.train.loop import STUDENT_FILE, evaluate, resolve_ref, train_run
    from kdray.train.session import Session

    quiet_ray_loggers()
    cfg = RunConfig.model_validate(run)
    records = [resolve_ref(r) for r in teacher_refs]
    if cfg.resources.resolved_execution() == "train":
        from kdray.storage import join
        from kdray.train.runner import final_student, fit, new_run_name

        result = fit(cfg, records, storage_path=join(storage, "final"), name=new_run_name(f"final-seed{cfg.seed}"),
                     progress=False, extra={"step_hook": step_hook} if step_hook else None)
        if result.failed:
            return {"val_accuracy": float("nan"), "test_accuracy": float("nan"), "failed": 1.0}
        last, record = result.metrics, final_student(result)
    else:
        with tempfile.TemporaryDirectory() as d:
            session = Session(checkpoint_root=d)
            last = train_run({"run": run, "teacher_records": records, "step_hook": step_hook}, session)
            if last.get("failed"):
                return {"val_accuracy": float("nan"), "test_accuracy": float("nan"), "failed": 1.0}
            record = load_record(Path(session.last_checkpoint) / STUDENT_FILE)
    device = torch.device("cuda" if cfg.resources.use_gpu and torch.cuda.is_available() else "cpu")
    test = evaluate(model_from_record(record).to(device), load_dataset(cfg.dataset).test, 512, device)
    return {"val_accuracy": float(last["val_accuracy"]), "test_accuracy": float(test["accuracy"]),
            "workers": float(last.get("world_size", 1))}


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
    champ_id = parent.data.tags.get("kdray.champion_run_id")
    if not champ_id:
        raise FinalError(f"sweep {name} has no champion yet (status {parent.data.tags.get(TAG_STATUS)})")
    # The champion never serves as its own baseline (a labels-only champion against itself measures noise).
    best_none = best_labels_only(sweep_children(c, parent, kind="trial"), exclude=champ_id)
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
    refs, teacher_acc = _teacher(champ_cfg, storage, uri, say)
    seed_list = list(range(1, seeds + 1))  # fresh seeds: the sweep's trials all used the space's seed
    jobs = _seed_jobs(configs, seed_list)
    say(f"retraining {champ_cfg.knowledge_label} (champion) and none (best labels-only) with seeds {seed_list}: "
        f"{len(jobs)} runs")
    outputs = _run_jobs(jobs, refs, storage, JobLedger(c, parent, name), say, step_hook)
    rows = [{"config": j.label, "seed": j.seed, **o} for j, o in zip(jobs, outputs)]
    champ = [r["test_accuracy"] for r in rows if r["config"] == "champion" and math.isfinite(r["test_accuracy"])]
    none = [r["test_accuracy"] for r in rows if r["config"] == "none" and math.isfinite(r["test_accuracy"])]
    if len(champ) < 2 or len(none) < 2:
        raise FinalError(f"too many retraining runs failed (champion {len(champ)}, none {len(none)} succeeded)")
    res = FinalResult(name, seed_list, champ, none, teacher_acc, champ_cfg.knowledge_label, welch(champ, none),
                      bootstrap_ci(champ, none), baseline=baseline, rows=rows)
    res.run_id = _log(c, parent, res, configs)
    return res


def trusted(cfg: dict[str, Any]) -> dict[str, Any]:
    """A run config read from MLflow without its ``plugins``: validating it would import the modules it names, and
    whoever can write to the tracking server would choose them. The plugins this command imported (``--plugin``,
    checked against the names by the CLI) reach every worker through the job's runtime environment."""
    return {k: v for k, v in cfg.items() if k != "plugins"}


def labels_only(cfg: dict[str, Any]) -> dict[str, Any]:
    """A run config without its knowledge terms and with nobody teaching: the same student on labels alone."""
    return {**cfg, "knowledge": [], "ce_weight": 1.0, "scheme": {"type": "distill"}}


def _teacher(cfg: RunConfig, storage: str, uri: str, say) -> tuple[list, float]:
    """The teacher records of ``cfg`` (as Ray refs when Ray runs) and the teacher's test accuracy (NaN for an
    ensemble)."""
    import ray

    from kdray.tracking.champion import test_accuracy
    from kdray.train.runner import teacher_records

    records = teacher_records(cfg, storage, log=say, inline=True, tracking_uri=uri)
    acc = test_accuracy(records[0], cfg.dataset.model_dump(mode="json")) if len(records) == 1 else float("nan")
    return ([ray.put(r) for r in records] if ray.is_initialized() else records), acc


def _seed_jobs(configs: dict[str, dict[str, Any]], seeds: list[int]) -> list[Job]:
    """One job for every configuration and seed: its run config with that seed."""
    jobs = []
    for name, cfg in configs.items():
        rc = RunConfig.model_validate(cfg)
        jobs.extend(Job(name, s, rc.model_copy(update={"seed": s}).model_dump(mode="json"), rc) for s in seeds)
    return jobs


def _run_jobs(jobs: list[Job], refs: list, storage: str, ledger: JobLedger, say,
              step_hook: Any = None) -> list[dict[str, float]]:
    """Train and test every job (Ray tasks shaped as the sweep's trials when Ray runs, else in turn), each recorded
    as it ends; a failure is named after every other run is recorded."""
    try:
        return run_jobs(jobs, refs, storage, ledger, _train_and_test, say, step_hook)
    except FinalJobsFailed as e:
        raise FinalError(str(e)) from None


def best_of_type(trials: list, knowledge: str, exclude: str | None = None) -> Any | None:
    """The sweep's best trial run of one knowledge choice: completed ones first, else the best stopped early
    (ties: the one that got further). Failed trials never serve. None when the choice has no such trial."""
    mine = [t for t in trials if t.data.tags.get("kdray.knowledge") == knowledge and t.info.run_id != exclude
            and t.data.tags.get(TAG_STATUS) in ("completed", "stopped_early")]
    if not mine:
        return None
    return max(mine, key=lambda r: (r.data.tags.get(TAG_STATUS) == "completed",
                                    r.data.metrics.get("val_accuracy", -1.0),
                                    int(r.data.tags.get("kdray.epochs", 0) or 0)))


def best_labels_only(trials: list, exclude: str | None = None) -> Any | None:
    """The sweep's best labels-only (``none``) trial run: completed ones first, else the best stopped early.

    ASHA stops ``none`` trials as readily as any other weak configuration, so a sweep may end without a
    completed one; the trial that got furthest still holds a searched configuration, and ``final``
    retrains it for the full budget anyway. Failed trials never serve. None when there is no such trial.
    """
    return best_of_type(trials, "none", exclude)


def _log(c, parent, res: FinalResult, configs: dict[str, Any]) -> str:
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
        for k, v in {"final_test_mean": f"{np.mean(res.champion):.6f}", "final_test_std": f"{np.std(res.champion, ddof=1):.6f}",
                     "final_none_mean": f"{np.mean(res.none):.6f}", "final_gain": f"{res.gain:.6f}",
                     "final_p_value": f"{res.p_value:.6g}", "final_seeds": str(len(res.seeds))}.items():
            c.set_model_version_tag(model, version, k, v)
        c.update_model_version(model, version, description=f"kdray final over {len(res.seeds)} seeds: {res.summary()}")
    return rid


def format_table(res: FinalResult) -> str:
    c, n = np.array(res.champion) * 100, np.array(res.none) * 100
    lines = [f"final evaluation of sweep {res.sweep} on the test split, seeds {res.seeds}",
             f"  {'':<28}{'test accuracy (%)':>22}",
             f"  {'teacher':<28}{res.teacher_test_accuracy * 100:>15.2f}",
             f"  {'labels only (none)':<28}{n.mean():>15.2f} ± {n.std(ddof=1):.2f}   baseline: {res.baseline}",
             f"  {'champion (' + res.champion_knowledge + ')':<28}{c.mean():>15.2f} ± {c.std(ddof=1):.2f}",
             f"  gain {res.gain * 100:+.2f} points; {describe_interval(res.ci)}; {describe_p(res.p_value)}"]
    return "\n".join(lines)


# -- final --per-type: every knowledge type's best configuration, paired over common seeds ----------------------
def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment (Holm 1979), in the input's order: the i-th smallest of m p-values is multiplied
    by (m - i + 1), made non-decreasing along that order, and capped at 1. It controls the family-wise error rate
    for any dependence between the tests."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    out = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out


def paired(a: list[float], b: list[float]) -> tuple[float, tuple[float, float], float]:
    """Mean of the differences a - b (paired by seed), its 95 % t-interval and the paired t-test's two-sided p.

    Differences that are all equal (up to rounding: 0.9 - 0.8 != 0.8 - 0.7 in floats; accuracies move in steps
    of 1/N, so a few seeds can tie) have no variance for a t-test. They get the exact sign-flip permutation
    test's p instead: only the two all-same-sign assignments reach the observed |mean|, so p = 2 / 2**n (1 when
    every difference is zero), and the interval is the single value observed."""
    from scipy import stats

    d = np.asarray(a) - np.asarray(b)
    mean = float(d.mean())
    if np.ptp(d) < 1e-12:
        return mean, (mean, mean), (min(1.0, 2.0 / 2 ** len(d)) if abs(mean) > 1e-12 else 1.0)
    res = stats.ttest_rel(a, b)
    ci = res.confidence_interval(0.95)
    return mean, (float(ci.low), float(ci.high)), float(res.pvalue)


@dataclass
class PerTypeResult:
    sweep: str
    seeds: list[int]
    table: list[dict[str, Any]]  # per knowledge type: trial, accuracies per seed, mean, std, diff, ci, p, p_holm
    rows: list[dict[str, Any]]  # every retraining run
    baseline: str
    teacher_test_accuracy: float = float("nan")
    student: str = ""  # the champion's student, on which the types are compared
    missing: list[str] = field(default_factory=list)  # types with no trial to retrain
    run_id: str = ""


def student_label(student: dict[str, Any] | None) -> str:
    """``resnet8x4`` or ``mnist1d_mlp width=256``: a student config in a few words."""
    student = student or {}
    return student.get("name", "") + "".join(f" {o}={v}" for o, v in (student.get("options") or {}).items())


def run_final_per_type(uri: str, sweep: str | None, seeds: int, storage: str, say=print,
                       step_hook: Any = None) -> PerTypeResult:
    """Retrain the best configuration of every knowledge type over the same ``seeds`` seeds, test each run once,
    and compare every type with ``none`` seed by seed (paired t-test, Holm-corrected over the types).

    Each (configuration, seed) is recorded as it ends; a rerun retrains only the runs not recorded yet."""
    import mlflow

    if seeds < 2:
        raise FinalError("--seeds must be at least 2 for a standard deviation and a test")
    c = client(uri)
    parent = find_sweep(c, sweep)
    if parent is None:
        raise FinalError(f"no sweep named {sweep!r} in {uri}" if sweep else f"no finished sweep in {uri}")
    name = parent.data.tags[TAG_SWEEP]
    trials = sweep_children(c, parent, kind="trial")
    kinds = list(dict.fromkeys(t.data.tags.get("kdray.knowledge", "none") for t in sorted(
        trials, key=lambda r: int(r.data.tags.get("kdray.trial_number", 0) or 0))))
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
                                            r.data.metrics.get("val_accuracy", -1.0))).info.run_id
    ref_student = cfg_of[ref_id].get("student")
    same = [t for t in usable if cfg_of[t.info.run_id].get("student") == ref_student]
    best = {k: best_of_type(same, k) or best_of_type(usable, k) for k in kinds}
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
    jobs = _seed_jobs(configs, seed_list)
    with_teacher = [j.config for j in jobs if j.config.teacher is not None]
    refs, teacher_acc = _teacher(with_teacher[0], storage, uri, say) if with_teacher else ([], float("nan"))
    say(f"retraining {len(configs)} configurations, the best of each knowledge type ({', '.join(configs)}), with seeds "
        f"{seed_list}: {len(jobs)} runs")
    outputs = _run_jobs(jobs, refs, storage, JobLedger(c, parent, name), say, step_hook)
    rows = [{"knowledge": j.label, "seed": j.seed, **o} for j, o in zip(jobs, outputs)]
    acc = {k: {r["seed"]: r["test_accuracy"] for r in rows if r["knowledge"] == k
               and math.isfinite(r["test_accuracy"])} for k in configs}
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
                 "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan"), "test_accuracy": vals}
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
    res = PerTypeResult(name, seed_list, table, rows, baseline, teacher_acc, student_label(ref_student), missing)
    res.run_id = _log_per_type(c, parent, res, configs)
    return res


def format_per_type(res: PerTypeResult, markdown: bool = False) -> str:
    """The table: test accuracy mean ± std per type, and the paired difference to ``none`` with its interval,
    its p-value and the Holm-corrected one (significant at 5 % after correction: marked *)."""
    head = ["knowledge", "trial", "test accuracy % (mean ± std)", "Δ vs none (points) [95% CI]", "p (paired t)",
            "p (Holm)"]
    lines = []
    for e in _ordered(res.table):
        acc = f"{e['mean'] * 100:.2f} ± {e['std'] * 100:.2f}" if e["n"] > 1 else "(failed)"
        if "diff" in e:
            star = " *" if e["p_holm"] < 0.05 else ""
            diff = f"{e['diff'] * 100:+.2f} [{e['ci_low'] * 100:+.2f}, {e['ci_high'] * 100:+.2f}]"
            ps = [f"{e['p']:.3g}", f"{e['p_holm']:.3g}{star}"]
            if e.get("baseline", "none") != "none":
                diff += f" vs {e['baseline']}"
        else:
            diff, ps = ("baseline" if e["knowledge"].startswith("none") else "-"), ["", ""]
        lines.append([e["knowledge"], str(e["trial"]), acc, diff, *ps])
    if len({e["student"] for e in res.table}) > 1:  # a searched student: which one each type's best used
        head.insert(2, "student")
        for cells, e in zip(lines, _ordered(res.table)):
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
             + (f"; teacher {res.teacher_test_accuracy * 100:.2f}" if math.isfinite(res.teacher_test_accuracy) else "")
             + (f"; no trial to retrain: {', '.join(res.missing)}" if res.missing else ""))
    return title + "\n" + "\n".join(out)


def _ordered(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Baselines first, then the types by mean test accuracy, best first."""
    return sorted(table, key=lambda e: (not e["knowledge"].startswith("none"),
                                        -(e["mean"] if e["mean"] == e["mean"] else -1)))


def _per_type_png(res: PerTypeResult, path: str) -> None:
    """Box per type with every seed's test accuracy on it (strip), types in the table's order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = _ordered(res.table)
    data = [[v * 100 for v in e["test_accuracy"]] for e in entries]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(entries) + 2), 4.2))
    ax.boxplot(data, widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)
    for i, vals in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(vals)), vals, s=18, zorder=3)
    ax.set_xticks(range(1, len(entries) + 1), [e["knowledge"] for e in entries], rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{res.sweep}: best configuration per knowledge type, {len(res.seeds)} seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log_per_type(c, parent, res: PerTypeResult, configs: dict[str, Any]) -> str:
    import tempfile
    from pathlib import Path

    import pandas as pd

    summary = "; ".join(f"{e['knowledge']} {e['diff'] * 100:+.2f} (p_holm {e['p_holm']:.3g})"
                        for e in res.table if "diff" in e)
    summary = f"per type over {len(res.seeds)} seeds vs none: {summary}"
    run = c.create_run(parent.info.experiment_id, run_name=f"final-per-type-{len(res.seeds)}-seeds", tags={
        TAG_PARENT: parent.info.run_id, TAG_KIND: "final", TAG_SWEEP: res.sweep, "kdray.final_mode": "per_type",
        "kdray.final_summary": summary, "kdray.final_baseline": res.baseline})
    rid = run.info.run_id
    metrics = {"seeds": len(res.seeds), "teacher_test_accuracy": res.teacher_test_accuracy}
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
        _per_type_png(res, str(Path(d) / "per_type_test_accuracy.png"))
        c.log_artifact(rid, str(Path(d) / "per_type_test_accuracy.png"), "plots")
    c.set_terminated(rid, "FINISHED")
    c.set_tag(parent.info.run_id, "kdray.final_per_type_run_id", rid)
    return rid
