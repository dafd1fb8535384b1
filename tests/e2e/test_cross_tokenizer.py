"""A teacher of another tokenizer as users run one: ``teacher: {name: hf-lm/<folder>}`` whose folder ships its own
tokenizer. Two gloo ranks distilling it by ``uld`` learn exactly what one process learns from the same network on
the data's own tokens (the teacher is that network with its vocabulary renumbered, so the rows re-read in its tokens
and the aligned answers must give the very same loss); and a sweep searches uld's temperatures against no
distillation, each trial saying it runs the teacher live on its own tokens, and registers a champion that loads."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from sweep_helpers import request
from test_lm_training import run_group
from test_on_policy_lm import whole_batches
from tokenizer_helpers import renumbered_teacher

from kdray.config import DatasetConfig, RunConfig
from kdray.data import load_dataset
from kdray.models import model_record
from kdray.teachers import load_teacher_records
from kdray.tracking.store import TAG_STATUS, find_sweep, sweep_children

TINY = {"layers": 1, "hidden": 32, "heads": 2}


@pytest.mark.slow
def test_two_gloo_ranks_distilling_a_renumbered_teacher_learn_what_one_process_learns_from_the_original(tmp_path):
    dataset = whole_batches(tmp_path)
    info = load_dataset(DatasetConfig.model_validate(dataset)).info
    original, folder = renumbered_teacher(tmp_path, info)
    same = model_record(original, model_name="tiny_llama", model_options={**TINY, "layers": 2},
                        num_classes=info.num_classes, dataset=dataset)

    def run(batch: int, workers: int) -> dict:
        return RunConfig.model_validate({
            "dataset": dataset, "teacher": {"name": f"hf-lm/{folder}"},
            "student": {"name": "tiny_llama", "options": TINY},
            "knowledge": [{"type": "uld", "teacher_temperature": 2.0}], "ce_weight": 0.5,
            "train": {"epochs": 1, "batch_size": batch, "optimizer": "sgd", "momentum": 0.0, "lr": 0.5,
                      "scheduler": "none"},
            "resources": {"num_workers": workers}}).model_dump(mode="json")

    cross = load_teacher_records(RunConfig.model_validate(run(8, 1)))
    assert cross[0]["tokenizer"] and cross[0]["num_classes"] == info.num_classes
    one = run_group(1, run(8, 1), [same], tmp_path / "one")  # the original network, the data's own tokens
    two = run_group(2, run(4, 2), cross, tmp_path / "two")  # renumbered, its own tokenizer, 2 ranks
    for k, v in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][k], v, rtol=1e-4, atol=1e-5)
    a, b = one["reports"][-1], two["reports"][-1]
    # the logged epoch value weighs each batch's mean by its target tokens: halves weigh a little otherwise
    assert a["loss_uld"] == pytest.approx(b["loss_uld"], rel=2e-3) and a["loss_uld"] > 0.01
    assert a["val_nll"] == pytest.approx(b["val_nll"], rel=1e-5)
    # the teacher reads the validation rows only in the data's tokens: no agreement with it is measured
    assert "val_kl_teacher" in a and "val_kl_teacher" not in b


@pytest.fixture(scope="module")
def cross_sweep(tmp_path_factory, ray_cluster):
    from kdray.sweep.runner import run_sweep

    tmp = tmp_path_factory.mktemp("crosssweep")
    dataset = {"name": "lm_tasks", "options": {"tasks": ["copy"], "items": 4, "train_examples": 300,
                                               "test_examples": 50}}
    info = load_dataset(DatasetConfig.model_validate(dataset)).info
    _, folder = renumbered_teacher(tmp, info)
    space = {
        "name": "cross", "metric": "val_exact_match", "num_samples": 3, "seed": 0, "min_trials_per_type": 1,
        "base": {"dataset": dataset, "teacher": {"name": f"hf-lm/{folder}"},
                 "student": {"name": "tiny_llama", "options": TINY},
                 "train": {"epochs": 2, "batch_size": 32, "optimizer": "adamw", "lr": 0.003}},
        "space": {"knowledge": {"none": {}, "uld": {"teacher_temperature": {"type": "float", "low": 1.0,
                                                                             "high": 3.0}}}},
    }
    path = tmp / "cross.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return tmp, run_sweep(request(tmp, path, "cross"))


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_searches_uld_with_a_teacher_of_another_tokenizer_and_registers_a_champion(cross_sweep, tmp_path):
    tmp, result = cross_sweep
    c = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    trials = [t for t in sweep_children(c, find_sweep(c, "cross"), kind="trial")
              if t.data.tags.get(TAG_STATUS) == "completed"]
    uld = [t for t in trials if t.data.tags["kdray.knowledge"] == "uld"]
    assert uld and {t.data.tags["kdray.knowledge"] for t in trials} == {"none", "uld"}
    for t in uld:
        assert t.data.metrics["loss_uld"] > 0 and "own tokenizer" in t.data.tags["kdray.teacher_reason"]
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    p = subprocess.run([sys.executable, "-m", "kdray", "best", "--sweep", "cross", "--json", "--tracking-uri", uri],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
