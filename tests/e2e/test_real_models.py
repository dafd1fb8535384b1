"""Models as they are used: BatchNorm under DDP, dropout and crop+flip augmentation across a resume
(issue 16, items 2-3). CIFAR-shaped uint8 images made here (``test_images``), 2 gloo workers, Ray Train."""
from __future__ import annotations

import pytest
import torch

from kdray.config import RunConfig
from kdray.data import load_dataset
from kdray.models import model_from_record
from kdray.train.loop import evaluate
from kdray.train.runner import final_student, fit

pytestmark = [pytest.mark.ray, pytest.mark.slow]
TWO_WORKERS = {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 2}


def test_reported_val_accuracy_of_a_batchnorm_student_is_that_of_the_saved_model(ray_cluster, tmp_path):
    cfg = RunConfig.model_validate({
        "dataset": {"name": "test_images"}, "student": {"name": "resnet8"},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.05, "optimizer": "sgd"}, "resources": TWO_WORKERS})
    result = fit(cfg, storage_path=str(tmp_path), name="bn", progress=False)
    record = final_student(result)
    # One process, the checkpointed weights and BatchNorm statistics, the whole validation split.
    alone = evaluate(model_from_record(record), load_dataset(cfg.dataset).val, 256, torch.device("cpu"))
    assert result.metrics["val_accuracy"] == alone["accuracy"]
    assert result.metrics["val_loss"] == pytest.approx(alone["loss"], rel=1e-5)


def test_a_run_with_dropout_and_augmentation_resumed_mid_run_reaches_the_same_weights(ray_cluster, tmp_path):
    """What a killed run does after its restart: start from the last checkpoint (epoch 2 of 4) on the same
    two workers. The epochs it replays must draw the same dropout masks and crops as the run that went on."""
    import json

    cfg = RunConfig.model_validate({
        "dataset": {"name": "test_images"}, "student": {"name": "small_cnn", "options": {"widths": [8, 16],
                                                                                          "dropout": 0.3}},
        "train": {"epochs": 4, "batch_size": 16, "lr": 0.01, "keep_checkpoints": 4}, "resources": TWO_WORKERS})
    assert not load_dataset(cfg.dataset).deterministic  # random crops and flips
    whole = fit(cfg, storage_path=str(tmp_path), name="whole", progress=False)
    ckpts = sorted(p for p in (tmp_path / "whole").glob("checkpoint_*") if p.is_dir())
    assert len(ckpts) == 4
    epoch2 = next(c for c in ckpts if torch.load(c / "train_state.pt", weights_only=True)["epoch"] == 2)
    resumed = fit(cfg, storage_path=str(tmp_path), name="resumed", progress=False, resume_from=str(epoch2))
    assert resumed.metrics["resumed_from_epoch"] == 2 and resumed.metrics["epoch"] == 4
    a, b = final_student(resumed)["state_dict"], final_student(whole)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert json.dumps(resumed.metrics["val_accuracy"]) == json.dumps(whole.metrics["val_accuracy"])
