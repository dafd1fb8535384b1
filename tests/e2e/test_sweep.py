"""A sweep end to end on Ray (CPU) with MLflow: parent run, one child per trial, champion registered."""
from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from sweep_helpers import request, write_space

from kdray.config import DatasetConfig
from kdray.data import load_dataset
from kdray.sweep.runner import run_sweep
from kdray.tracking.store import TAG_STATUS, TAG_TRIAL, find_sweep, sweep_children

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def sweep(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    space = write_space(tmp, num_samples=3)
    result = run_sweep(request(tmp, space, "tiny-e2e"))
    return tmp, result


def test_the_sweep_records_a_parent_and_one_child_per_trial(sweep):
    tmp, result = sweep
    c = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    parent = find_sweep(c, "tiny-e2e")
    assert parent is not None and parent.info.status == "FINISHED"
    children = sweep_children(c, parent, kind="trial")
    assert len(children) == 3 == len(result.outcomes)
    assert len({ch.data.tags[TAG_TRIAL] for ch in children}) == 3
    for ch in children:
        assert ch.info.status == "FINISHED" and ch.data.tags[TAG_STATUS] == "completed"
        p = ch.data.params
        assert p["knowledge"] in ("none", "kd", "kd+fitnet") and "train.lr" in p and p["student.name"] == "test_mlp"
        assert {"dataset", "student", "teacher", "kdray.version", "kdray.git_commit"} <= set(ch.data.tags)
        if p["knowledge"] != "none":
            assert "kd.temperature" in p
            assert ch.data.tags["kdray.teacher_source"] == "cache"  # the shared teacher outputs were used
        hist = c.get_metric_history(ch.info.run_id, "val_accuracy")
        assert sorted(m.step for m in hist) == [1, 2, 3]
        assert "loss_ce" in ch.data.metrics and "samples_per_s" in ch.data.metrics and "epoch_time_s" in ch.data.metrics
    arts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    # artifacts live beside the database, not in whatever folder the process happened to run in
    assert parent.info.artifact_uri.startswith((tmp / "mlartifacts").as_uri())
    assert {"leaderboard.csv", "search_space.yaml", "plots", "champion.json"} <= arts
    plots = {a.path for a in c.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/optimization_history.html" in plots and "plots/val_accuracy_by_trial.png" in plots


def test_the_champion_is_registered_and_reproduces_its_test_accuracy(sweep):
    tmp, result = sweep
    ch = result.champion
    assert ch is not None
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(ch.alias_uri)
    data = load_dataset(DatasetConfig(name="test_blobs"))
    with torch.no_grad():  # raw inputs: preprocessing is inside
        acc = (model(data.test.x).argmax(1) == data.test.y).float().mean().item()
        val = (model(data.val.x).argmax(1) == data.val.y).float().mean().item()
    assert acc == pytest.approx(ch.test_accuracy, abs=0.005)
    # The registered model is the one whose validation accuracy was recorded, and no finished trial's
    # recorded validation accuracy (read back from MLflow, not from the sweep's memory) beats it.
    assert val == pytest.approx(ch.val_accuracy, abs=1e-6)
    c = MlflowClient(uri)
    recorded = [r.data.metrics["val_accuracy"] for r in sweep_children(c, find_sweep(c, "tiny-e2e"), kind="trial")
                if r.data.tags[TAG_STATUS] == "completed"]
    assert len(recorded) == 3 and max(recorded) == pytest.approx(ch.val_accuracy)
    version = MlflowClient(uri).get_model_version_by_alias("kdray-tiny", "champion")
    assert version.tags["kdray.sweep"] == "tiny-e2e"


def test_best_and_compare_read_the_sweep_back(sweep, tmp_path):
    tmp, result = sweep
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    run = lambda *a: subprocess.run([sys.executable, "-m", "kdray", *a, "--tracking-uri", uri], capture_output=True,
                                    text=True, timeout=120, cwd=tmp)
    r = run("best", "--json", "--export", str(tmp_path / "export"), "--onnx")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert {"run_id", "model_uri", "val_accuracy", "test_accuracy", "params"} <= set(info)
    assert info["run_id"] == result.champion.run_id
    assert info["test_accuracy"] == pytest.approx(result.champion.test_accuracy)
    from kdray.models import load_record, model_from_record

    x = load_dataset(DatasetConfig(name="test_blobs")).test.x[:8]
    mlflow.set_tracking_uri(uri)
    registered = mlflow.pytorch.load_model(info["model_uri"])
    scripted = torch.jit.load(info["exported"]["torchscript"])
    rebuilt = model_from_record(load_record(info["exported"]["kdray_record"])).eval()
    rebuilt.load_state_dict(torch.load(info["exported"]["state_dict"], weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), registered(x))
        torch.testing.assert_close(rebuilt(x), registered(x))
        expected = registered(x).numpy()
    import onnx
    from onnx.reference import ReferenceEvaluator

    onnx.checker.check_model(onnx.load(info["exported"]["onnx"]))
    got = ReferenceEvaluator(info["exported"]["onnx"]).run(None, {"x": x.numpy()})[0]
    assert abs(got - expected).max() < 1e-4
    r = run("compare", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert len(data["trials"]) == 3
    accs = [t["val_accuracy"] for t in data["trials"]]
    assert accs == sorted(accs, reverse=True)
    assert {s["knowledge"] for s in data["by_knowledge"]} <= {"none", "kd", "kd+fitnet"}


QUERY_IMPORTS = """
import json, sys
from kdray.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "heavy": sorted(m for m in ("torch", "ray", "optuna") if m in sys.modules)}),
      file=sys.stderr)
"""


@pytest.mark.parametrize("command", ["best", "compare"])
def test_the_query_commands_answer_without_importing_torch_ray_or_optuna(sweep, command):
    """``kdray best/compare --json`` are what scripts poll: they read MLflow and nothing else (each of torch and
    Ray adds seconds to every call on 2 CPUs; compare imported both through the fair-budget scheduler)."""
    tmp, _ = sweep
    r = subprocess.run([sys.executable, "-c", QUERY_IMPORTS, command, "--json", "--tracking-uri",
                        f"sqlite:///{tmp / 'mlflow.db'}"], capture_output=True, text=True, timeout=120, cwd=tmp)
    report = json.loads(r.stderr.strip().splitlines()[-1])
    assert report == {"rc": 0, "heavy": []}, r.stderr[-3000:]
    assert json.loads(r.stdout)


def test_optuna_study_is_persisted_beside_the_run(sweep):
    import optuna

    tmp, _ = sweep
    study = optuna.load_study(study_name="tiny-e2e", storage=f"sqlite:///{tmp / 'runs' / 'tiny-e2e' / 'optuna.db'}")
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE"] * 3


def test_final_retrains_champion_and_none_over_seeds_with_a_test(sweep):
    from kdray.final import run_final

    tmp, result = sweep
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    res = run_final(uri, "tiny-e2e", 3, str(tmp / "runs"), say=lambda m: None)
    assert res.seeds == [1, 2, 3] and len(res.champion) == 3 and len(res.none) == 3
    n_test = len(load_dataset(DatasetConfig(name="test_blobs")).test)
    for a in res.champion + res.none:  # accuracies on the whole test split: a count of correct samples / n
        assert a * n_test == pytest.approx(round(a * n_test), abs=1e-6)
    from scipy import stats

    assert res.gain == pytest.approx(sum(res.champion) / 3 - sum(res.none) / 3)
    assert res.p_value == pytest.approx(stats.ttest_ind(res.champion, res.none, equal_var=False).pvalue, nan_ok=True)
    assert res.ci[0] <= res.gain <= res.ci[1]
    assert res.teacher_test_accuracy > 1 / 3 + 0.2  # three classes: well above chance
    c = MlflowClient(uri)
    parent = find_sweep(c, "tiny-e2e")
    finals = sweep_children(c, parent, kind="final")
    assert len(finals) == 1 and finals[0].data.metrics["seeds"] == 3
    assert finals[0].data.metrics["gain"] == pytest.approx(res.gain)
    version = c.get_model_version_by_alias("kdray-tiny", "champion")
    assert version.tags["final_seeds"] == "3" and "kdray final over 3 seeds" in version.description
    r = subprocess.run([sys.executable, "-m", "kdray", "compare", "--tracking-uri", uri], capture_output=True,
                       text=True,
                       timeout=120, cwd=tmp)
    assert "final evaluation over 3 seeds" in r.stdout


def test_final_baseline_prefers_a_completed_labels_only_trial_else_the_best_stopped_early():
    from types import SimpleNamespace

    from kdray.final import best_labels_only

    def trial(name, knowledge, status, acc, epochs):
        return SimpleNamespace(info=SimpleNamespace(run_id=name), data=SimpleNamespace(
            tags={"mlflow.runName": name, "kdray.knowledge": knowledge, TAG_STATUS: status,
                  "kdray.epochs": str(epochs)},
            metrics={"val_accuracy": acc}))

    runs = [trial("kd", "kd", "completed", 0.99, 60), trial("n-early-20", "none", "stopped_early", 0.96, 20),
            trial("n-early-40", "none", "stopped_early", 0.96, 40), trial("n-failed", "none", "failed", 0.98, 60)]
    # ASHA stopped every labels-only trial: the best of them (ties: the one that got further) is the baseline
    assert best_labels_only(runs).info.run_id == "n-early-40"
    # a completed labels-only trial wins over a better one that was stopped early
    assert best_labels_only(runs + [trial("n-done", "none", "completed", 0.90, 60)]).info.run_id == "n-done"
    # failed trials never serve; with no labels-only trial at all, final strips the champion's knowledge
    assert best_labels_only([runs[0], runs[3]]) is None


def test_final_per_type_retrains_every_type_on_common_seeds_and_corrects_with_holm(sweep):
    import numpy as np

    from kdray.final import run_final_per_type, train_and_test

    tmp, result = sweep
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    res = run_final_per_type(uri, "tiny-e2e", 2, str(tmp / "runs"), say=lambda m: None)
    assert {e["knowledge"] for e in res.table} == {o.knowledge for o in result.outcomes} == {"none", "kd", "kd+fitnet"}
    acc = {(r["knowledge"], r["seed"]): r["test_accuracy"] for r in res.rows}
    assert sorted(acc) == sorted((k, s) for k in ("none", "kd", "kd+fitnet") for s in (1, 2))  # the same seeds
    tested = [e for e in res.table if e["knowledge"] != "none"]
    for e in tested:  # the paired difference, from the runs themselves
        assert e["diff"] == pytest.approx(np.mean([acc[(e["knowledge"], s)] - acc[("none", s)] for s in (1, 2)]))
    lo, hi = sorted(tested, key=lambda e: e["p"])  # Holm with two tests: 2 x the smaller, then the running max
    assert lo["p_holm"] == pytest.approx(min(1.0, 2 * lo["p"]))
    assert hi["p_holm"] == pytest.approx(max(lo["p_holm"], min(1.0, hi["p"])))
    # Common random numbers: a seed's run is the same whenever it is made (data order, views, initial weights)
    c = MlflowClient(uri)
    final = c.get_run(res.run_id)
    with open(c.download_artifacts(res.run_id, "configs.json", str(tmp))) as f:
        configs = json.load(f)
    again = train_and_test({**configs["none"], "seed": 2}, [], str(tmp / "runs"))
    assert again["test_accuracy"] == acc[("none", 2)]
    assert final.data.tags["kdray.final_mode"] == "per_type" and final.data.metrics["seeds"] == 2
    arts = {a.path for a in c.list_artifacts(res.run_id)} | {a.path for a in c.list_artifacts(res.run_id, "plots")}
    assert {"per_type.md", "final_runs.csv", "plots/per_type_test_accuracy.png"} <= arts
    for e in tested:
        assert final.data.metrics[f"{e['knowledge'].replace('+', '_')}.p_holm"] == pytest.approx(e["p_holm"])


def test_final_records_each_run_as_it_ends_and_a_rerun_trains_only_the_failed_one(sweep):
    """One retraining run raises: the others are in MLflow, the error names the run, and the same command again
    trains that run alone (seeds 1-2 of every type are recorded by the tests above; seed 3 is new)."""
    from fault_hooks import FailOneRunOfSeed

    from kdray.final import KIND_SEED, FinalError, run_final_per_type

    tmp, _ = sweep
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    c = MlflowClient(uri)
    parent = find_sweep(c, "tiny-e2e")
    said: list[str] = []
    with pytest.raises(FinalError) as err:
        run_final_per_type(uri, "tiny-e2e", 3, str(tmp / "runs"), say=said.append,
                           step_hook=FailOneRunOfSeed(3, tmp / "failed-once"))
    failed = [r for r in sweep_children(c, parent, kind=KIND_SEED) if r.info.status == "FAILED"]
    assert len(failed) == 1, [r.data.tags.get("mlflow.runName") for r in failed]
    label = failed[0].data.tags["kdray.final_label"]
    assert failed[0].data.tags["kdray.seed"] == "3"
    assert f"1 of 9 retraining runs failed ({label} seed 3: RuntimeError: simulated out of memory" in str(err.value)
    finished = sum(r.info.status == "FINISHED" for r in sweep_children(c, parent, kind=KIND_SEED))
    said.clear()
    res = run_final_per_type(uri, "tiny-e2e", 3, str(tmp / "runs"), say=said.append)
    assert "8 of 9 runs are already recorded from an earlier `kdray final`: retraining the other 1" in said
    trained = [m for m in said if m.startswith("[")]
    assert len(trained) == 1 and trained[0].startswith(f"[9/9] {label} seed 3: test accuracy"), trained
    assert sorted((r["knowledge"], r["seed"]) for r in res.rows) == sorted(
        (k, s) for k in ("none", "kd", "kd+fitnet") for s in (1, 2, 3))
    assert sum(r.info.status == "FINISHED" for r in sweep_children(c, parent, kind=KIND_SEED)) == finished + 1
