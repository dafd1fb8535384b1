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


def test_a_transfer_set_on_two_gloo_ranks_or_accumulated_learns_what_one_process_learns_on_the_whole_batch(tmp_path):
    """With 30 % of the labels kept, the halves of a batch (two ranks, or two accumulated batches) hold different
    numbers of labelled samples: the mean of each half's labelled cross-entropy would weigh the labels of the
    sparser half more. Normalised by the labelled samples of the whole effective batch, one SGD epoch on 2 gloo
    ranks with batches of 12, or on one with 2 x 12 accumulated, ends at the weights of batches of 24."""
    import torch
    import torch.multiprocessing as mp
    from lm_ddp import run_rank

    from kdray.config import RunConfig
    from kdray.models import Preprocess, build_model, model_record

    dataset = {"name": "test_blobs", "labelled_fraction": 0.3}
    data = load_dataset(DatasetConfig.model_validate(dataset))
    assert len(data.train) % 24 == 0  # whole batches: no padding, no partial batch
    torch.manual_seed(1)
    teacher = build_model("test_mlp", data.info.num_classes, Preprocess(data.info.model_input))
    record = model_record(teacher, model_name="test_mlp", model_options={}, num_classes=data.info.num_classes,
                          dataset=dataset)

    def run(batch: int, accum: int = 1, workers: int = 1) -> dict:
        return RunConfig.model_validate({
            "dataset": dataset, "teacher": {"checkpoint": "unused.pt"}, "student": {"name": "test_mlp"},
            "knowledge": [{"type": "kd", "temperature": 2.0}], "seed": 3,
            "train": {"epochs": 1, "batch_size": batch, "optimizer": "sgd", "momentum": 0.0, "lr": 0.5,
                      "scheduler": "none", "grad_accum_steps": accum},
            "resources": {"num_workers": workers}}).model_dump(mode="json")

    def result(world: int, cfg: dict, out) -> dict:
        out.mkdir()
        if world == 1:
            run_rank(0, 1, 0, cfg, [record], str(out))
        else:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(run_rank, args=(world, port, cfg, [record], str(out)), nprocs=world, join=True)
        return torch.load(out / "result.pt", weights_only=True)

    one = result(1, run(24), tmp_path / "one")
    two = result(2, run(12, workers=2), tmp_path / "two")
    acc = result(1, run(12, accum=2), tmp_path / "acc")
    moved = max((one["state_dict"][k] - v).abs().max().item()
                for k, v in build_model("test_mlp", data.info.num_classes,
                                        Preprocess(data.info.model_input)).state_dict().items())
    assert moved > 1e-3  # the epoch did train
    for k, v in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][k], v, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(acc["state_dict"][k], v, rtol=1e-4, atol=1e-5)
