"""A transfer set as users run it (issue 29): digits with 90 % of the training labels hidden, a teacher trained with
every label inside the sweep, and ``final --per-type``: distillation on the unlabelled samples beats labels only on
the labelled tenth on every paired seed, and the teacher-output cache covered every training sample."""
from __future__ import annotations

import pytest
import yaml
from mlflow.tracking import MlflowClient
from sweep_helpers import request

from kdray.config import DatasetConfig
from kdray.data import load_dataset
from kdray.tracking.store import find_sweep

REPO_SPACE = "search_spaces/digits_transfer.yaml"


@pytest.mark.ray
@pytest.mark.slow
def test_distilling_on_the_transfer_set_beats_labels_only_on_every_seed(tmp_path, ray_cluster):
    from pathlib import Path

    from kdray.final import run_final_per_type
    from kdray.sweep.runner import run_sweep

    space = yaml.safe_load((Path(__file__).resolve().parents[2] / REPO_SPACE).read_text())
    space.update(num_samples=4, min_trials_per_type=1)
    space["space"]["knowledge"] = {k: v for k, v in space["space"]["knowledge"].items() if k in ("none", "kd")}
    space["base"]["train"]["epochs"] = 40
    space["base"]["teacher"]["train"]["train"]["epochs"] = 40
    path = tmp_path / "digits-transfer.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    run_sweep(request(tmp_path, path, "transfer"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = find_sweep(MlflowClient(uri), "transfer")
    # the one-pass cache holds the teacher's outputs for every training sample, labelled or not
    train = load_dataset(DatasetConfig.model_validate(space["base"]["dataset"])).train
    assert parent.data.metrics["teacher_cache.samples"] == len(train) and (train.y == -100).float().mean() > 0.85
    res = run_final_per_type(uri, "transfer", 2, str(tmp_path / "runs"), say=lambda m: None)
    acc = {e["knowledge"]: e["test_accuracy"] for e in res.table}
    assert set(acc) == {"none", "kd"}
    assert all(kd - none > 0.04 for kd, none in zip(acc["kd"], acc["none"])), acc
    assert res.teacher_test > 0.97  # the teacher saw every label
