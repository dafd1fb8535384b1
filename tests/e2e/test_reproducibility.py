"""Same space + same seed -> same proposals; same trial + same seed on CPU -> same metrics."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdray.config import RunConfig
from kdray.sweep.searcher import KdraySearch, make_sampler
from kdray.sweep.space import load_space
from kdray.train.loop import train_run
from kdray.train.session import Session

DEFAULT = Path(__file__).resolve().parents[2] / "search_spaces" / "default.yaml"


def proposals(seed: int, n: int = 14) -> list[dict]:
    """Ask/tell one trial at a time with a deterministic score, through kdray's Optuna searcher."""
    space = load_space(DEFAULT)
    search = KdraySearch(space=space.define_by_run, metric="val_accuracy", mode="max",
                         sampler=make_sampler("tpe", seed, n_startup_trials=4), max_epochs=10)
    out = []
    for i in range(n):
        params = search.suggest(f"t{i}")
        out.append(params)
        score = 0.5 + (len(json.dumps(params, sort_keys=True)) % 30) / 100  # any deterministic function
        search.on_trial_result(f"t{i}", {"val_accuracy": score, "training_iteration": 10, "epoch": 10})
        search.on_trial_complete(f"t{i}", {"val_accuracy": score, "epoch": 10})
    return out


def test_the_same_space_and_seed_propose_the_same_trials():
    a, b = proposals(3), proposals(3)
    assert a == b  # including the 10 proposals TPE made after its 4 random start-up trials
    assert proposals(4) != a


@pytest.mark.ray
def test_two_sequential_sweeps_with_the_same_seed_run_the_same_trials(ray_cluster, tmp_path):
    from sweep_helpers import request, write_space

    from kdray.sweep.runner import run_sweep

    space = write_space(tmp_path, num_samples=4, searcher={"type": "tpe", "n_startup_trials": 2},
                        base={**__import__("sweep_helpers").TINY_SPACE["base"],
                              "train": {"epochs": 2, "batch_size": 64, "lr": 0.01}})
    runs = []
    for name in ("rep-a", "rep-b"):
        result = run_sweep(request(tmp_path, space, name, max_concurrent=1, register_champion=False))
        runs.append(sorted((o.number, json.dumps(o.params, sort_keys=True), round(o.val_accuracy, 6))
                           for o in result.outcomes))
    assert runs[0] == runs[1]


def test_a_cpu_trial_rerun_with_the_same_seed_gives_the_same_metrics(blobs_teacher):
    cfg = RunConfig.model_validate({"seed": 7, "dataset": {"name": "test_blobs"}, "student": {"name": "test_mlp"},
                                    "teacher": {"checkpoint": "t.pt"}, "knowledge": [{"type": "kd"}, {"type": "sp"}],
                                    "train": {"epochs": 3, "batch_size": 32}})
    runs = []
    for _ in range(2):
        s = Session()
        train_run({"run": cfg.model_dump(mode="json"), "teacher_records": [blobs_teacher]}, s)
        runs.append(s.reports)
    timing = {"epoch_time_s", "train_time_s", "samples_per_s", "report_latency_s", "checkpoint_write_s", "latency_ms",
              "latency_b64_ms"}  # wall times: never equal twice
    for a, b in zip(*runs):
        for k, v in a.items():
            if k not in timing and isinstance(v, float):
                assert b[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k


def initial_student(run: dict, teacher: dict | None) -> dict:
    """The student's weights as a run starts: one epoch of SGD at lr 1e-30 moves no float32 weight."""
    import torch

    from kdray.train.loop import STUDENT_FILE

    root = Path(__import__("tempfile").mkdtemp())
    s = Session(checkpoint_root=root)
    train_run({"run": run, "teacher_records": [teacher] if teacher else []}, s)
    record = torch.load(s.last_checkpoint / STUDENT_FILE, weights_only=True)
    return {k: v for k, v in record["state_dict"].items() if v.is_floating_point() and "running" not in k}


@pytest.mark.parametrize("seed", [1, 3])
def test_the_same_seed_starts_none_and_kd_from_the_same_student_weights(blobs_teacher, seed):
    """``final --per-type`` pairs types seed by seed: the same seed must mean the same initial student, whether or
    not a teacher is built first (building one consumed the global RNG and shifted the student's weights)."""
    import torch

    base = {"seed": seed, "dataset": {"name": "test_blobs"}, "student": {"name": "test_mlp"},
            "train": {"epochs": 1, "batch_size": 64, "optimizer": "sgd", "lr": 1e-30, "momentum": 0.0}}
    none = initial_student(RunConfig.model_validate(base).model_dump(mode="json"), None)
    kd = initial_student(RunConfig.model_validate({**base, "teacher": {"checkpoint": "t.pt"},
                                                    "knowledge": [{"type": "kd"}]}).model_dump(mode="json"),
                         blobs_teacher)
    assert none.keys() == kd.keys() and none
    for k in none:
        assert torch.equal(none[k], kd[k]), k
    other = initial_student(RunConfig.model_validate({**base, "seed": seed + 10}).model_dump(mode="json"), None)
    assert any(not torch.equal(none[k], other[k]) for k in none)  # the seed does decide the weights
