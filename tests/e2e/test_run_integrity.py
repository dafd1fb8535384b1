"""Runs end as they really ended: no silent resume of an old run, no failure reported as success, a sweep's
size and per-trial epochs honoured, configs that cannot work refused at check time (issue 10: 3-6, 8)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from sweep_helpers import TINY_SPACE, request

from kdray.tracking.store import TAG_STATUS, find_sweep, sweep_children

REPO = Path(__file__).resolve().parents[2]


def kdray(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "kdray", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def space_file(tmp: Path, **top) -> Path:
    """TINY_SPACE with whole top-level keys replaced."""
    space = yaml.safe_load(yaml.safe_dump(TINY_SPACE))
    space.update(top)
    return write_yaml(tmp / f"{space['name']}.yaml", space)


# -- refused at check time ---------------------------------------------------------------------------
def test_several_workers_on_a_fraction_of_a_gpu_are_refused(tmp_path):
    cfg = write_yaml(tmp_path / "frac.yaml", {
        "dataset": {"name": "test_blobs"}, "student": {"name": "test_mlp"},
        "resources": {"num_workers": 2, "gpus_per_worker": 0.5}})
    r = kdray("check", str(cfg), cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "field 'resources.gpus_per_worker'" in r.stderr and "NCCL" in r.stderr
    from kdray.config import ResourcesConfig

    # several *trials* sharing one GPU (one worker each) stay allowed
    assert ResourcesConfig(num_workers=1, gpus_per_worker=0.25).use_gpu


@pytest.mark.parametrize("key,scheduler,field", [
    ("resources.num_workers", "fifo", "space.resources.num_workers"),
    ("train.epochs", "asha", "space.train.epochs"),
])
def test_a_space_that_the_sweep_cannot_honour_is_refused_by_check(tmp_path, key, scheduler, field):
    space = yaml.safe_load(yaml.safe_dump(TINY_SPACE))
    space["scheduler"] = {"type": scheduler}
    space["space"][key] = {"type": "int", "low": 1, "high": 3}
    r = kdray("check", str(write_yaml(tmp_path / "space.yaml", space)), cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"field {field!r}" in r.stderr, r.stderr


# -- a sweep's size and its trials' own epochs ---------------------------------------------------------
@pytest.mark.ray
@pytest.mark.slow
def test_searched_epochs_are_honoured_and_a_finished_grid_sweep_resumes_as_finished(ray_cluster, tmp_path):
    from kdray.sweep.runner import run_sweep

    space = space_file(tmp_path, name="grid", searcher={"type": "grid"}, scheduler={"type": "fifo"},
                        num_samples=16,  # more than the grid's 4 points: the grid is the sweep's size
                        space={"train.epochs": {"type": "categorical", "choices": [2, 4]},
                               "knowledge": {"none": {}, "kd": {}}})
    result = run_sweep(request(tmp_path, space, "g"))
    assert not result.interrupted and result.champion is not None
    assert len(result.outcomes) == 4
    for o in result.outcomes:  # a 2-epoch trial ran its whole schedule: completed, not "stopped early"
        assert o.status == "completed" and o.epochs == o.params["train.epochs"], o
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tags = {r.data.tags[TAG_STATUS] for r in sweep_children(c, find_sweep(c, "g"), kind="trial")}
    assert tags == {"completed"}

    again = run_sweep(request(tmp_path, space, "g", resume=True))
    assert not again.interrupted and again.champion is not None


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_started_with_num_samples_resumes_without_it(ray_cluster, tmp_path):
    from kdray.sweep.runner import run_sweep

    space = space_file(tmp_path, num_samples=3)
    result = run_sweep(request(tmp_path, space, "n", num_samples=2))
    assert len(result.outcomes) == 2 and not result.interrupted
    again = run_sweep(request(tmp_path, space, "n", resume=True))  # no num_samples: the stored size is used
    assert not again.interrupted and again.champion is not None and len(again.outcomes) == 2


# -- a NaN is a failure, also through Ray Train ------------------------------------------------------------
DIVERGING = {"optimizer": "sgd", "lr": 1.0e30, "epochs": 3, "batch_size": 64, "scheduler": "none"}


@pytest.mark.ray
@pytest.mark.slow
def test_a_diverging_teacher_and_distillation_fail_loudly_on_two_gloo_workers(ray_cluster, tmp_path, capsys,
                                                                               blobs_teacher_file):
    from kdray.cli import main  # the command line itself, on this session's Ray (no --local)

    two = {"num_workers": 2, "cpus_per_worker": 1}
    teacher = write_yaml(tmp_path / "teacher.yaml", {
        "name": "nan-teacher", "dataset": {"name": "test_blobs"}, "model": {"name": "test_cnn1d"},
        "train": DIVERGING, "resources": two})
    assert main(["teacher", str(teacher), "--storage", str(tmp_path / "runs")]) == 1
    out, err = capsys.readouterr()
    assert "teacher training failed" in err and "non-finite" in err, err[-3000:]
    assert "teacher saved" not in out and not list((tmp_path / "runs").glob("teachers/*.pt"))

    distill = write_yaml(tmp_path / "kd.yaml", {
        "name": "nan-kd", "dataset": {"name": "test_blobs"}, "teacher": {"checkpoint": str(blobs_teacher_file)},
        "student": {"name": "test_mlp"}, "knowledge": [{"type": "kd"}], "train": DIVERGING, "resources": two})
    assert main(["distill", str(distill), "--storage", str(tmp_path / "runs"), "--output", str(tmp_path / "out")]) == 1
    out, err = capsys.readouterr()
    assert "the run failed" in err and "non-finite" in err, err[-3000:]
    assert "finished" not in out and not (tmp_path / "out" / "student.pt").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_a_diverging_trial_driving_a_torch_trainer_is_recorded_as_failed(ray_cluster, tmp_path):
    from kdray.sweep.runner import SweepError, run_sweep

    base = yaml.safe_load(yaml.safe_dump(TINY_SPACE["base"]))
    base["train"] = dict(DIVERGING, epochs=2)
    base["resources"]["execution"] = "train"
    space = space_file(tmp_path, name="nan", num_samples=1, base=base, scheduler={"type": "fifo"},
                        space={"knowledge": {"none": {}}})
    with pytest.raises(SweepError, match="no trial ran to the end"):
        run_sweep(request(tmp_path, space, "nan"))
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (trial,) = sweep_children(c, find_sweep(c, "nan"), kind="trial")
    assert trial.data.tags[TAG_STATUS] == "failed" and "non-finite" in trial.data.tags["kdray.failure"]


# -- a new run is new ------------------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.slow
def test_a_changed_teacher_config_trains_anew_and_resume_is_explicit(ray_cluster, tmp_path, capsys):
    from kdray.cli import main  # the command line itself, on this session's Ray (no --local)

    cfg = {"name": "t", "dataset": {"name": "test_blobs"}, "model": {"name": "test_mlp"},
           "train": {"epochs": 2, "batch_size": 64, "lr": 0.01}}
    path = write_yaml(tmp_path / "t.yaml", cfg)
    args = ["teacher", str(path), "--storage", str(tmp_path / "runs"), "--output", str(tmp_path / "t.pt")]
    assert main(args) == 0
    cfg["train"]["epochs"] = 3
    write_yaml(path, cfg)
    assert main(args) == 0
    out = capsys.readouterr().out
    record = torch.load(tmp_path / "t.pt", weights_only=True)
    # A new run, trained from epoch 1 under the new config (Ray Train would have continued the old one).
    assert record["metrics"]["epoch"] == 3 and "resumed_from_epoch" not in record["metrics"]
    assert record["config"]["train"]["epochs"] == 3

    # --resume continues the run it names: from its last checkpoint (epoch 3), to the new end (epoch 4)
    run_name = [line.split()[2] for line in out.splitlines() if line.startswith("[kdray] run ")][-1]
    cfg["train"]["epochs"] = 4
    write_yaml(path, cfg)
    assert main(args + ["--resume", "--run-name", run_name]) == 0
    record = torch.load(tmp_path / "t.pt", weights_only=True)
    assert record["metrics"]["epoch"] == 4 and record["metrics"]["resumed_from_epoch"] == 3


def test_a_teacher_trained_on_other_data_is_not_reused(tmp_path):
    from PIL import Image

    from kdray.config import RunConfig
    from kdray.teachers import teacher_records

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for split, n in (("train", 10), ("test", 2)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    cfg = RunConfig.model_validate({
        "dataset": {"name": "imagefolder", "augment": False, "options": {"root": str(root), "image_size": 8}},
        "teacher": {"train": {"model": {"name": "mlp", "options": {"hidden": [4]}}, "train": {"epochs": 1}}},
        "student": {"name": "mlp"}, "knowledge": [{"type": "kd"}]})
    said: list[str] = []
    teacher_records(cfg, str(tmp_path / "runs"), inline=True, progress=False, log=said.append)
    teacher_records(cfg, str(tmp_path / "runs"), inline=True, progress=False, log=said.append)
    assert [s.split()[0] for s in said] == ["training", "using"]  # same config and data: reused
    # Same config, same file names, new pixels (a re-exported folder): the old teacher is not the right one.
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "train" / "a" / "0.png")
    teacher_records(cfg, str(tmp_path / "runs"), inline=True, progress=False, log=said.append)
    assert said[-1].startswith("training"), said


def test_a_teacher_trained_on_another_split_is_refused_unless_allowed(tmp_path, blobs_teacher_file):
    run = {"dataset": {"name": "test_blobs", "split_seed": 1}, "teacher": {"checkpoint": str(blobs_teacher_file)},
           "student": {"name": "test_mlp"}, "knowledge": [{"type": "kd"}]}
    r = kdray("check", str(write_yaml(tmp_path / "leak.yaml", run)), cwd=tmp_path)
    assert r.returncode == 2 and "field 'teacher.checkpoint'" in r.stderr and "split_seed" in r.stderr, r.stderr
    run["teacher"]["allow_split_mismatch"] = True
    r = kdray("check", str(write_yaml(tmp_path / "allowed.yaml", run)), cwd=tmp_path)
    assert r.returncode == 0, r.stderr

    from kdray.config import RunConfig
    from kdray.models import load_record
    from kdray.train.loop import train_run
    from kdray.train.session import Session

    cfg = RunConfig.model_validate({**run, "train": {"epochs": 1}})
    s = Session()
    train_run({"run": cfg.model_dump(mode="json"), "teacher_records": [load_record(blobs_teacher_file)]}, s)
    assert s.reports[-1]["teacher_split_mismatch"] == "split_seed: 0 there, 1 here"


@pytest.mark.ray
@pytest.mark.slow
def test_final_retrains_with_the_sweeps_workers_and_says_what_a_labels_only_champion_is_compared_with(
        ray_cluster, tmp_path):
    from kdray.final import run_final
    from kdray.sweep.runner import run_sweep

    base = yaml.safe_load(yaml.safe_dump(TINY_SPACE["base"]))
    base["resources"].update(num_workers=2, execution="train")
    base["train"]["epochs"] = 2
    del base["teacher"]  # labels only: no teacher to train
    space = space_file(tmp_path, name="fin", num_samples=1, base=base, scheduler={"type": "fifo"},
                       space={"knowledge": {"none": {}}})
    run_sweep(request(tmp_path, space, "f"))
    said: list[str] = []
    res = run_final(f"sqlite:///{tmp_path / 'mlflow.db'}", "f", 2, str(tmp_path / "runs"), say=said.append)
    assert [r["workers"] for r in res.rows] == [2.0] * 4  # two DDP workers, as the trial had: same global batch
    assert "seed-to-seed noise" in res.baseline, res.baseline  # not "the best labels-only trial": that is itself


def test_welch_and_the_bootstrap_interval_on_degenerate_and_ordinary_samples():
    from scipy import stats

    from kdray.final import bootstrap_ci, welch

    a, b = [0.91, 0.93, 0.92, 0.95], [0.90, 0.90, 0.90, 0.90]  # one sample without variance
    # By hand: b adds nothing to the standard error, so t = (mean(a) - 0.9) / (s_a / 2) with 3 degrees of freedom
    # (Welch-Satterthwaite with one variance zero gives n_a - 1).
    s_a = math.sqrt(sum((x - 0.9275) ** 2 for x in a) / 3)
    assert welch(a, b) == pytest.approx(2 * stats.t.sf((0.9275 - 0.9) / (s_a / 2), 3), rel=1e-9)
    assert welch(b, a) == pytest.approx(welch(a, b), rel=1e-12)
    # Two different constants: no variance, so Welch's t is undefined; p = 0 ("significant") claimed a certainty
    # that three seeds cannot give.
    assert math.isnan(welch([0.9] * 3, [0.8] * 3))
    assert welch([0.9] * 3, [0.9] * 3) == 1.0  # the same constant: no difference at all
    lo, hi = bootstrap_ci([0.9] * 3, [0.8] * 3)
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)  # every resample has the same difference
    lo, hi = bootstrap_ci(a, b)
    assert lo < sum(a) / 4 - 0.9 < hi and lo > 0  # a's mean is above 0.90 in every resample
    # Two seeds per group: resampling two values gives three distinct means, no interval worth the name.
    assert all(math.isnan(v) for v in bootstrap_ci([0.91, 0.93], [0.90, 0.92]))


def test_the_final_report_says_when_the_test_or_the_interval_is_undefined():
    from kdray.final import FinalResult, format_table

    res = FinalResult("s", [1, 2], [0.9, 0.9], [0.8, 0.8], 0.95, "kd", float("nan"), (float("nan"), float("nan")),
                      baseline="b")
    text = format_table(res) + "\n" + res.summary()
    assert "significant" not in text.replace("not significant", "") and "Welch's t-test undefined" in text, text
    assert "bootstrap interval needs at least 3 seeds per configuration" in text, text


@pytest.mark.ray
def test_the_champion_is_tested_on_its_own_data_when_the_data_set_is_searched(ray_cluster, tmp_path):
    """``dataset.*`` may be searched (here MNIST-1D's noise): the champion's one test evaluation must use the data
    its trial trained on, not the space's base data set."""
    import mlflow
    from sweep_helpers import request

    from kdray.config import DatasetConfig
    from kdray.data import load_dataset
    from kdray.models import load_record, model_from_record
    from kdray.sweep.runner import run_sweep
    from kdray.train.loop import evaluate

    space = {"name": "noisy", "seed": 0, "num_samples": 2, "min_trials_per_type": 0,
             "base": {"dataset": {"name": "mnist1d"}, "student": {"name": "mnist1d_mlp"},
                      "train": {"epochs": 2, "batch_size": 100, "lr": 0.003},
                      "resources": {"num_workers": 1, "cpus_per_worker": 1}},
             "scheduler": {"type": "fifo"}, "searcher": {"type": "grid", "grid_points": 1},
             "space": {"dataset.options.iid_noise_scale": {"type": "categorical", "choices": [0.3, 0.6]}}}
    path = tmp_path / "noisy.yaml"
    path.write_text(yaml.safe_dump(space))
    result = run_sweep(request(tmp_path, path, "noisy", max_concurrent=1))
    champ = result.champion
    noise = champ.params["dataset.options.iid_noise_scale"]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    record = load_record(mlflow.artifacts.download_artifacts(f"runs:/{champ.run_id}/kdray/student.pt"))
    own = load_dataset(DatasetConfig(name="mnist1d", options={"iid_noise_scale": noise})).test
    base = load_dataset(DatasetConfig(name="mnist1d")).test
    model = model_from_record(record)
    on_own = evaluate(model, own, 512, torch.device("cpu"))["accuracy"]
    assert champ.test_accuracy == pytest.approx(on_own, abs=1e-9)
    assert on_own != evaluate(model, base, 512, torch.device("cpu"))["accuracy"]  # the two really differ
