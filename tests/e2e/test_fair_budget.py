"""Issue 14: a fair budget per knowledge type, the student's cost, the accuracy-latency front, `final --per-type`."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from mlflow import MlflowClient
from sweep_helpers import TINY_SPACE, request, write_space


# -- the fair budget's bookkeeping ----------------------------------------------------------------------------
def test_the_rungs_are_rays_asha_rungs_below_max_t():
    from ray.tune.schedulers import ASHAScheduler

    from kdray.sweep.fair import milestones

    for max_t, grace, rf in ((150, 50, 3), (8, 1, 2), (240, 60, 2), (4, 4, 2)):
        ray_rungs = sorted(m for m, _ in ASHAScheduler(max_t=max_t, grace_period=grace,
                                                        reduction_factor=rf)._brackets[0]._rungs)
        assert milestones(max_t, grace, rf) == [m for m in ray_rungs if m < max_t], (max_t, grace, rf)


def test_fair_start_goes_round_robin_over_the_choices():
    from kdray.sweep.fair import fair_start

    assert fair_start(["none", "kd", "fitnet"], 2, 24) == ["none", "kd", "fitnet"] * 2
    assert fair_start(["none", "kd", "fitnet"], 2, 4) == ["none", "kd", "fitnet", "none"]
    assert fair_start(["none", "kd"], 0, 8) == []


def test_a_late_type_is_protected_then_judged_by_its_own_kind_until_it_has_its_full_length_trials():
    from kdray.sweep.fair import FairRungs

    r = FairRungs(max_t=8, grace_period=1, reduction_factor=2, min_trials_per_type=2)  # rungs 1, 2, 4
    for t, kind in (("a1", "A"), ("a2", "A"), ("b1", "B"), ("b2", "B")):
        assert r.add(t, kind)  # the first two of each type are protected
    assert not r.add("a3", "A") and not r.add("b3", "B")
    assert r.add("a1", "A") and not r.add("a3", "A")  # added again (a retry): it keeps what it had, no new slot
    # Rung 1: A learns fast, B slowly. b1 and b2 are far below A's values but protected: they go on.
    assert r.decide("a1", 1, 0.90) and r.decide("a2", 1, 0.80)
    assert r.decide("b1", 1, 0.10) and r.decide("b2", 1, 0.20)
    # b3 meets B's own values only (median of 0.10 and 0.20 = 0.15): 0.18 continues, although it is below
    # the median of every value there (0.20 with A's), which plain ASHA would have used.
    assert r.decide("b3", 1, 0.18)
    # a3 meets A's own values (median of 0.90, 0.80 = 0.85): 0.50 stops.
    assert not r.decide("a3", 1, 0.50)
    # A's protected trials run to the end: A is settled, B is not.
    r.end("a1", True), r.end("a2", True), r.end("a3", False)
    assert r.settled("A") and not r.settled("B")
    # b1 fails (NaN loss) before its end: its protected slot goes to the next B trial.
    r.end("b1", False)
    assert r.add("b4", "B")
    r.end("b2", True), r.end("b4", True)
    assert r.settled("B")
    # Settled, B's next trial meets every recorded value at rung 1: a1 .9, a2 .8, a3 .5, b1 .1, b2 .2, b3 .18,
    # median 0.35. 0.30 now stops, where B's own values alone (median of .1, .2, .18 = 0.18) would have kept it.
    r.add("b5", "B")
    assert not r.decide("b5", 1, 0.30)
    # A trial is judged once per rung: a later epoch below the next rung changes nothing.
    r.add("a6", "A")
    assert r.decide("a6", 1, 0.95) and r.decide("a6", 1, 0.0)



def test_a_budget_in_tokens_judges_a_trial_that_generates_at_the_rungs_it_reaches_sooner():
    """``scheduler.unit: tokens``: rungs in epochs' worth of tokens (``budget_epochs``). An off-policy trial reports
    1.0, 2.0, ...; an on-policy one that also generated reaches 2.3 epochs' worth in its first epoch and is judged at
    rung 2 then, against what the off-policy trials had at their second epoch. No fair budget (0): plain ASHA, and
    nothing stops a trial at max_t, which a trial that generates passes before its last epoch."""
    from kdray.sweep.fair import FairRungs

    r = FairRungs(max_t=4, grace_period=1, reduction_factor=2, min_trials_per_type=0)  # rungs 1, 2
    for t in ("off1", "off2", "on1"):
        assert not r.add(t, "tkd" if t.startswith("off") else "on_policy+tkd")  # none protected
    assert r.decide("off1", 1.0, 0.3) and r.decide("off2", 1.0, 0.5)
    assert r.decide("off1", 2.0, 0.6) and r.decide("off2", 2.0, 0.7)
    assert r.recorded[2] == {"tkd": {"off1": 0.6, "off2": 0.7}}
    assert not r.decide("on1", 2.3, 0.5)  # judged at rung 2 (cutoff: the median 0.65 of 0.7 and 0.6), not rung 1
    assert "on1" not in r.recorded[1].get("on_policy+tkd", {})
    r.add("on2", "on_policy+tkd")
    assert r.decide("on2", 0.9, 0.0)  # below the first rung: not judged yet
    assert r.decide("on2", 4.6, 0.9)  # past max_t's worth of tokens: judged at rung 2, and never stopped for it


def test_a_budget_in_tokens_is_refused_where_it_measures_nothing_naming_the_field():
    from kdray.errors import ConfigError
    from kdray.sweep.space import SearchSpace

    lm = {"name": "t", "base": {"dataset": {"name": "lm_tasks"}, "student": {"name": "tiny_llama"}},
          "space": {"knowledge": {"none": {}}}}
    SearchSpace.model_validate({**lm, "scheduler": {"type": "asha", "unit": "tokens"}})  # accepted
    for space, why in (({**lm, "scheduler": {"type": "fifo", "unit": "tokens"}}, "fifo has none"),
                       ({**lm, "base": {**lm["base"], "dataset": {"name": "test_blobs"}},
                         "scheduler": {"unit": "tokens"}}, "classifier"),
                       ({**lm, "space": {"knowledge": {"born_again+tkd": {}}}, "scheduler": {"unit": "tokens"}},
                        "born-again")):
        with pytest.raises(ConfigError) as e:
            SearchSpace.model_validate(space)
        assert e.value.fields == ["scheduler.unit"] and why in str(e.value), str(e.value)

def test_the_best_within_a_budget_follows_the_sweeps_metric():
    from kdray.goal import GOALS
    from kdray.sweep.front import within_budget

    rows = [{"status": "completed", "trial": i, "val_accuracy": a, "val_nll": n, "latency_ms": 1.0}
            for i, (a, n) in enumerate([(0.30, 3.9), (0.20, 3.7), (0.25, 3.8)], start=1)]
    assert within_budget(rows, max_latency_ms=2.0)[0]["trial"] == 1  # the most accurate
    assert within_budget(rows, max_latency_ms=2.0, goal=GOALS["val_nll"])[0]["trial"] == 2  # the lowest NLL


def test_fair_asha_stops_the_trials_whose_nll_is_high_when_the_metric_is_minimised():
    """A language model's sweep minimises val_nll: at a rung the trials with the *highest* values stop (plain ASHA's
    rule on the negated metric), and the protected trials go on whatever their value."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from kdray.sweep.fair import FairASHA

    sched = FairASHA(metric="val_nll", mode="min", max_t=8, grace_period=1, reduction_factor=2,
                     min_trials_per_type=2)
    trials = {t: Trial(trainable_name="__fake", config={"knowledge": "tkd"}, trial_id=t, stub=True)
              for t in ("p1", "p2", "low", "high")}
    for t in trials.values():
        sched.on_trial_add(None, t)
    result = lambda v: {"epoch": 1, "val_nll": v}  # noqa: E731
    assert sched.on_trial_result(None, trials["p1"], result(3.0)) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, trials["p2"], result(5.0)) == TrialScheduler.CONTINUE  # protected
    # the cutoff is the median of 3.0 and 5.0 (4.0): lower NLL goes on, higher stops
    assert sched.on_trial_result(None, trials["low"], result(3.5)) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, trials["high"], result(4.5)) == TrialScheduler.STOP


# -- cost, front and budget -------------------------------------------------------------------------------------
def test_student_cost_counts_parameters_and_times_a_copy_on_cpu():
    from kdray.config import DatasetConfig
    from kdray.data import load_dataset
    from kdray.models import build_model
    from kdray.models.cost import student_cost

    data = load_dataset(DatasetConfig(name="test_blobs"))
    info, samples = data.info, data.train.x[:10]
    small = build_model("test_mlp", info.num_classes, info.preprocess(), {"width": 4}).train()
    wide = build_model("test_mlp", info.num_classes, info.preprocess(), {"width": 2048})
    threads = torch.get_num_threads()
    cs = student_cost(small, samples)
    # two hidden layers of 4 on 16 inputs, 3 classes: (16*4 + 4) + (4*4 + 4) + (4*3 + 3)
    assert cs["student_params"] == 68 + 20 + 15
    assert small.training and torch.get_num_threads() == threads  # the trained model and torch are left alone
    cw = student_cost(wide, samples)
    assert cw["student_params"] == (16 * 2048 + 2048) + (2048 * 2048 + 2048) + (2048 * 3 + 3)
    assert cw["latency_ms"] > cs["latency_ms"] and cw["latency_b64_ms"] > cs["latency_b64_ms"]


def test_the_pareto_front_and_the_best_within_a_budget():
    from kdray.sweep.front import budget_alias, pareto_front, within_budget

    pts = [(0.90, 5.0), (0.85, 1.0), (0.80, 2.0), (0.90, 6.0), (0.70, 0.5), (math.nan, 0.1), (0.85, 1.0)]
    # (0.80, 2) is beaten by (0.85, 1); (0.90, 6) by (0.90, 5); equal points are both kept; NaN never counts
    assert pareto_front(pts) == [0, 1, 4, 6]
    params = [1000, 10 ** 6, 100, 1000, 100, 1, 1000]
    rows = [{"trial": i + 1, "status": "completed", "val_accuracy": a, "latency_ms": c, "student_params": n}
            for i, ((a, c), n) in enumerate(zip(pts, params))]
    rows[0]["status"] = "stopped_early"  # a stopped trial never counts, however accurate
    best, fits = within_budget(rows, max_latency_ms=6.5)
    assert best["trial"] == 4  # 0.90 at 6.0 ms: trial 1 (also 0.90) was stopped early
    best, _ = within_budget(rows, max_latency_ms=1.5)
    assert best["trial"] == 2  # 0.85 at 1.0 ms, ties with trial 7: the earlier trial
    best, _ = within_budget(rows, max_latency_ms=1.5, max_params=10 ** 5)
    assert best["trial"] == 7  # trial 2 has 10**6 parameters; trial 7 has its accuracy with 1000
    assert best is not None and within_budget(rows, max_latency_ms=0.4)[0] is None
    assert budget_alias(2, None) == "within-2ms" and budget_alias(0.5, 1e6) == "within-0p5ms-1e06-params"


def test_the_pareto_front_and_the_best_within_a_budget_with_params():
    from kdray.sweep.front import within_budget

    rows = [{"trial": 1, "status": "completed", "val_accuracy": 0.9, "latency_ms": 1.0, "student_params": 5000},
            {"trial": 2, "status": "completed", "val_accuracy": 0.8, "latency_ms": 2.0, "student_params": 500}]
    assert within_budget(rows, max_params=1000)[0]["trial"] == 2
    assert within_budget(rows, max_latency_ms=1.5, max_params=1000)[0] is None


def test_two_objectives_need_fifo_and_accuracy_first(tmp_path):
    from kdray.config import ConfigError
    from kdray.sweep.space import load_space

    p = write_space(tmp_path, objectives=["val_accuracy", "latency_ms"], scheduler={"type": "asha"})
    with pytest.raises(ConfigError) as e:
        load_space(p)
    assert "scheduler.type" in str(e.value) and str(p) in str(e.value)
    p = write_space(tmp_path, objectives=["latency_ms", "val_accuracy"])
    with pytest.raises(ConfigError) as e:
        load_space(p)
    assert "objectives" in str(e.value)
    assert load_space(write_space(tmp_path, objectives=["val_accuracy", "student_params"])).modes == ["max", "min"]


# -- statistics of final --per-type -----------------------------------------------------------------------------
def test_holm_and_the_paired_interval_against_hand_values():
    from scipy import stats

    from kdray.final import holm, paired

    # sorted: 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04, raised to the running 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    # differences 1, 2, 3: mean 2, sd 1, se 1/sqrt(3); t(0.975, 2) = 4.302653
    mean, (lo, hi), p = paired([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    half = 4.302653 / math.sqrt(3)
    assert mean == 2.0 and lo == pytest.approx(2 - half, rel=1e-5) and hi == pytest.approx(2 + half, rel=1e-5)
    assert p == pytest.approx(2 * stats.t.sf(2 * math.sqrt(3), 2))
    # equal differences: no variance for t; the exact sign-flip test (2 of 2**n assignments reach |mean|)
    same = paired([0.9, 0.8, 0.7], [0.8, 0.7, 0.6])
    assert same[0] == pytest.approx(0.1) and same[1] == (pytest.approx(0.1), pytest.approx(0.1)) and same[2] == 0.25
    assert paired([0.9] * 5, [0.8] * 5)[2] == pytest.approx(2 / 32)
    assert paired([0.9, 0.8], [0.9, 0.8])[2] == 1.0


# -- end to end ---------------------------------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.slow
def test_a_weak_type_gets_its_full_length_trials_stopped_ones_are_pruned_and_the_budget_is_reported(
        ray_cluster, tmp_path):
    import optuna

    from kdray.sweep.runner import run_sweep
    from kdray.tracking.store import TAG_STATUS, find_sweep, sweep_children

    space = write_space(tmp_path, name="fair", num_samples=8, searcher={"type": "tpe", "n_startup_trials": 8},
                        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
                        base={**TINY_SPACE["base"], "train": {"epochs": 4, "batch_size": 64}},
                        space={"train.lr": 0.03,
                               # kd here cannot learn (lr 1e-7): plain ASHA stops it at epoch 1 behind `none`
                               "knowledge": {"none": {}, "kd": {"train.lr": 1.0e-7, "kd.temperature": 4.0}}})
    result = run_sweep(request(tmp_path, space, "fair", max_concurrent=1))
    by_number = sorted(result.outcomes, key=lambda o: o.number)
    assert [o.knowledge for o in by_number[:4]] == ["none", "kd", "none", "kd"]  # the stratified start
    kd = [o for o in by_number if o.knowledge == "kd"]
    nones = [o for o in by_number if o.knowledge == "none"]
    # kd's first two trials ran all 4 epochs although both ended far below every none trial at epoch 1
    assert [o.status for o in kd[:2]] == ["completed", "completed"] and all(o.epochs == 4 for o in kd[:2])
    assert max(o.val_accuracy for o in kd[:2]) < min(o.val_accuracy for o in nones[:2])
    # once kd has them, its trials meet everyone's at the rungs, and ASHA stops them: PRUNED in Optuna, not COMPLETE
    stopped = [o for o in result.outcomes if o.status == "stopped_early"]
    assert stopped and all(o.epochs < 4 for o in stopped)
    study = optuna.load_study(study_name="fair", storage=f"sqlite:///{tmp_path / 'runs' / 'fair' / 'optuna.db'}")
    states = {t.number + 1: t.state.name for t in study.trials}
    for o in result.outcomes:  # Optuna's trial numbers follow the sweep's, one trial at a time
        assert states[o.number] == ("PRUNED" if o.status == "stopped_early" else "COMPLETE"), (o, states)
    # the budget, read back from MLflow and counted from the trial runs themselves
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    parent = find_sweep(c, "fair")
    runs = sweep_children(c, parent, kind="trial")
    import pandas as pd

    budget = pd.read_csv(c.download_artifacts(parent.info.run_id, "budget_by_type.csv", str(tmp_path)))
    for kind in ("none", "kd"):
        mine = [r for r in runs if r.data.tags["kdray.knowledge"] == kind]
        row = budget[budget["knowledge"] == kind].iloc[0]
        assert row["trials"] == len(mine)
        assert row["epochs"] == sum(int(r.data.tags["kdray.epochs"]) for r in mine)
        full = [r for r in mine if r.data.tags[TAG_STATUS] == "completed"]
        assert row["full_length"] == len(full) >= 2
        assert row["best_val_accuracy"] == pytest.approx(max(r.data.metrics["val_accuracy"] for r in full))
        assert parent.data.metrics[f"budget.{kind}.trials"] == len(mine)
    # every trial logged what its student costs
    assert all(r.data.metrics["student_params"] == 235 and r.data.metrics["latency_ms"] > 0 for r in runs)


@pytest.mark.ray
@pytest.mark.slow
def test_a_two_objective_sweep_registers_the_student_that_meets_a_latency_budget(ray_cluster, tmp_path):
    import mlflow

    from kdray.sweep.runner import run_sweep

    space = write_space(tmp_path, name="front", num_samples=2, scheduler={"type": "fifo"},
                        objectives=["val_accuracy", "latency_ms"],
                        space={"train.lr": 0.03, "student.options.width": {"type": "categorical", "choices": [1, 2048]},
                               "knowledge": {"none": {}}})
    result = run_sweep(request(tmp_path, space, "front"))
    board = result.leaderboard
    assert set(board["student.options.width"]) == {1, 2048}, board  # both students tried
    wide, narrow = (board[board["student.options.width"] == w] for w in (2048, 1))
    # the wide student is the more accurate, the narrow the faster: each has a trial on the front
    assert wide["val_accuracy"].max() > narrow["val_accuracy"].max()
    assert wide["pareto"].any() and narrow["pareto"].any()
    assert result.champion.params["student.options.width"] == 2048
    budget = math.sqrt(narrow["latency_ms"].max() * wide["latency_ms"].min())  # between the two students
    assert narrow["latency_ms"].max() < budget < wide["latency_ms"].min()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = subprocess.run([sys.executable, "-m", "kdray", "best", "--sweep", "front", "--max-latency-ms", f"{budget:.6f}",
                        "--json", "--tracking-uri", uri], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(info["alias_uri"])
    # the registered student is the narrow one: two hidden layers of 1 on 16 inputs, 3 classes
    assert sum(p.numel() for p in model.parameters()) == (16 + 1) + (1 + 1) + (3 + 3)
    best_narrow = narrow.sort_values(["val_accuracy", "trial"], ascending=[False, True]).iloc[0]
    assert info["run_id"] == best_narrow["run_id"]
    c = MlflowClient(uri)
    assert c.get_model_version_by_alias("kdray-front", "champion").version != info["version"]  # @champion stays
    arts = {a.path for a in c.list_artifacts(result.parent_run_id, "plots")}
    assert "plots/pareto_front_latency_ms.png" in arts
    from kdray.sweep.front import BudgetError, register_within_budget

    with pytest.raises(BudgetError, match=r"student_params <= 10; the fastest .* and 25 parameters"):
        register_within_budget(uri, "front", max_params=10)


class _Trial:
    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


def test_with_the_fair_budget_off_a_failed_trials_report_sets_no_cutoff():
    """A NaN trial ends with val_accuracy 0.0 and `failed`: recorded at a rung, that 0.0 lowers every later cutoff.
    Here trials at 0.9 and 0.8 give the rung's cutoff 0.867 (ASHA's 2/3 quantile), which stops a trial at 0.85;
    with the failed trial's 0.0 recorded the cutoff is 0.833 and that trial would go on (as plain ASHA does)."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from kdray.sweep.fair import FailureAwareASHA

    def fate(cls) -> str:
        s = cls(time_attr="epoch", metric="val_accuracy", mode="max", max_t=9, grace_period=1, reduction_factor=3)
        trials = {n: _Trial(n) for n in ("a", "b", "nan", "c")}
        for t in trials.values():
            s.on_trial_add(None, t)
        s.on_trial_result(None, trials["a"], {"epoch": 1, "val_accuracy": 0.9})
        s.on_trial_result(None, trials["b"], {"epoch": 1, "val_accuracy": 0.8})
        failed = {"epoch": 1, "val_accuracy": 0.0, "failed": "loss term kd became non-finite (NaN or inf) in epoch 1"}
        s.on_trial_result(None, trials["nan"], failed)
        s.on_trial_complete(None, trials["nan"], failed)
        return s.on_trial_result(None, trials["c"], {"epoch": 1, "val_accuracy": 0.85})

    assert fate(ASHAScheduler) == TrialScheduler.CONTINUE  # the defect: the failure lowered the cutoff
    assert fate(FailureAwareASHA) == TrialScheduler.STOP
