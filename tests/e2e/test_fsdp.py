"""``resources.strategy: fsdp`` as users run it: the student sharded by PyTorch's FSDP2 (``fully_shard`` per decoder
layer, the training step as root) across 2 gloo ranks learns exactly what DDP learns (SGD with momentum, clipped
gradients, a cosine schedule, the teacher's token knowledge, two epochs), validates every row once though the ranks
hold different numbers of validation batches (a sharded forward is collective: a rank that stopped early would leave
the other waiting), generates greedily for exact match, checkpoints the whole student and its optimizer, and resumes
from that checkpoint to the same end; and ``kdray distill`` runs it on 2 Ray Train workers."""
from __future__ import annotations

import pytest
import torch
from test_lm_training import TINY, run_group

from kdray.config import DatasetConfig, RunConfig
from kdray.data import Batches, load_dataset
from kdray.models import Preprocess, build_model, model_record
from kdray.runfiles import STATE_FILE

BATCH = 4


def uneven_validation(tmp_path) -> dict:
    """A task set whose training split is whole batches of 2 × BATCH rows and whose validation split gives the two
    ranks different numbers of batches."""
    for n in range(200, 400):
        spec = {"name": "lm_tasks", "options": {"train_examples": n, "test_examples": 50}, "data_dir": str(tmp_path)}
        data = load_dataset(DatasetConfig.model_validate(spec))
        counts = {len(Batches(data.val, BATCH, train=False, rank=r, world=2)) for r in (0, 1)}
        if len(data.train) % (2 * BATCH) == 0 and len(counts) == 2:
            return spec
    raise AssertionError("no example count gives whole training batches and uneven validation shards")


def run(dataset: dict, strategy: str, epochs: int = 2) -> dict:
    return RunConfig.model_validate({
        "dataset": dataset, "teacher": {"checkpoint": "unused.pt"},
        "student": {"name": "tiny_llama", "options": {**TINY, "layers": 2}},
        "knowledge": [{"type": "tkd", "divergence": "jsd", "beta": 0.3, "temperature": 2.0}], "ce_weight": 0.5,
        # SGD with momentum: Adam's update divides by the root of each gradient's square, so a gradient that is zero
        # up to float rounding (an unused token's row) moves by up to lr either way, and reduction order alone parts
        # two runs; SGD's update is linear in the gradient, so the runs must agree to rounding
        "train": {"epochs": epochs, "batch_size": BATCH, "optimizer": "sgd", "momentum": 0.9, "lr": 0.3,
                  "grad_clip": 0.5, "scheduler": "cosine"},
        "resources": {"num_workers": 2, "strategy": strategy}}).model_dump(mode="json")


@pytest.mark.slow
def test_fsdp_on_two_gloo_ranks_learns_what_ddp_learns_and_resumes_to_the_same_end(tmp_path):
    dataset = uneven_validation(tmp_path)
    info = load_dataset(DatasetConfig.model_validate(dataset)).info
    assert info.prompt_len  # rows of prompt + answer: validation generates greedily for exact match
    torch.manual_seed(1)
    teacher = build_model("tiny_llama", info.num_classes, Preprocess(info.input_shape, passthrough=True), TINY)
    rec = model_record(teacher, model_name="tiny_llama", model_options=TINY, num_classes=info.num_classes,
                       dataset=dataset)
    ddp = run_group(2, run(dataset, "ddp"), [rec], tmp_path / "ddp")
    fsdp = run_group(2, run(dataset, "fsdp"), [rec], tmp_path / "fsdp")
    student = build_model("tiny_llama", info.num_classes, Preprocess(info.input_shape, passthrough=True),
                          {**TINY, "layers": 2})
    init = student.state_dict()
    assert set(fsdp["state_dict"]) == set(ddp["state_dict"]) == set(init)
    for k, v in ddp["state_dict"].items():  # whole tensors, not a rank's shard
        assert fsdp["state_dict"][k].shape == init[k].shape
        torch.testing.assert_close(fsdp["state_dict"][k], v, rtol=1e-4, atol=1e-5)
    assert max((ddp["state_dict"][k] - v).abs().max().item() for k, v in init.items() if v.is_floating_point()) > 1e-3
    assert all(r["strategy"] == "fsdp over 2 ranks" for r in fsdp["reports"])  # the workers did shard
    assert all("strategy" not in r for r in ddp["reports"])
    for a, b in zip(ddp["reports"], fsdp["reports"], strict=True):
        for key in ("train_loss", "loss_tkd", "val_nll", "val_accuracy", "val_exact_match", "val_kl_teacher"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key  # weights agree to ~1e-6
    # the checkpoint of epoch 1 holds the whole optimizer state; two ranks resumed from it end where the run ended
    first = tmp_path / "fsdp" / "rank0" / "checkpoint_000001"
    state = torch.load(first / STATE_FILE, weights_only=True)
    assert state["whole_state"]  # gathered from the shards
    moments = [s["momentum_buffer"] for s in state["optimizer"]["state"].values()]
    assert moments and all(not hasattr(m, "placements") for m in moments)
    assert sum(m.numel() for m in moments) == sum(p.numel() for p in student.parameters())  # tied head: once
    resumed = run_group(2, run(dataset, "fsdp"), [rec], tmp_path / "resumed", resume_from=first)
    assert [r["epoch"] for r in resumed["reports"]] == [2]
    for k, v in fsdp["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][k], v, rtol=1e-5, atol=1e-6)
    assert resumed["reports"][-1]["val_nll"] == pytest.approx(fsdp["reports"][-1]["val_nll"], rel=1e-5)


@pytest.mark.slow
def test_kdray_distill_shards_the_student_over_two_ray_train_workers(tmp_path):
    """As users start it: ``kdray distill`` (Ray started by kdray, no --local), 2 Ray Train workers, ``strategy:
    fsdp``. The student it delivers is whole (it loads into a plain model in this process), and that model, measured
    here without FSDP, has the validation NLL the sharded run reported for it."""
    import json
    import subprocess
    import sys

    import yaml

    from kdray.data.evaluate import evaluate_lm
    from kdray.models import load_record, model_from_record, save_model

    dataset = {"name": "lm_tasks", "options": {"tasks": ["copy"], "items": 4, "train_examples": 200,
                                               "test_examples": 20}, "data_dir": str(tmp_path / "data")}
    data = load_dataset(DatasetConfig.model_validate(dataset))
    info = data.info
    torch.manual_seed(1)
    teacher = build_model("tiny_llama", info.num_classes, Preprocess(info.input_shape, passthrough=True), TINY)
    save_model(model_record(teacher, model_name="tiny_llama", model_options=TINY, num_classes=info.num_classes,
                            dataset=dataset), tmp_path / "teacher.pt")
    cfg = {"dataset": dataset, "teacher": {"checkpoint": str(tmp_path / "teacher.pt")},
           "student": {"name": "tiny_llama", "options": {**TINY, "layers": 2}}, "knowledge": [{"type": "tkd"}],
           "train": {"epochs": 1, "batch_size": 16, "optimizer": "adamw", "lr": 0.003},
           "resources": {"num_workers": 2, "cpus_per_worker": 1, "strategy": "fsdp"}}
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "kdray", "distill", "fsdp.yaml", "--storage", str(tmp_path / "runs"),
                        "--output", str(tmp_path / "out"), "--json"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert "2 worker(s)" in r.stdout and summary["strategy"] == "fsdp over 2 ranks"  # as the workers ran it
    record = load_record(summary["student"])
    assert record["config"]["resources"]["strategy"] == "fsdp"
    student = model_from_record(record)  # strict: every whole tensor, no shard
    assert sum(p.numel() for p in student.parameters()) == sum(
        p.numel() for p in build_model("tiny_llama", info.num_classes, Preprocess(info.input_shape, passthrough=True),
                                       {**TINY, "layers": 2}).parameters())
    here = evaluate_lm(student, data.val, 16, torch.device("cpu"))
    assert here["nll"] == pytest.approx(summary["val_nll"], rel=1e-5)


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweeps_trials_shard_their_student_and_say_so(tmp_path, ray_cluster):
    """A sweep whose trials are 2-worker Ray Train runs with ``strategy: fsdp``: each trial's MLflow run says it ran
    sharded (what the workers did, not what was asked), and the champion, one of them, is tested and registered."""
    import yaml
    from mlflow.tracking import MlflowClient
    from sweep_helpers import request

    from kdray.sweep.runner import run_sweep
    from kdray.tracking.store import TAG_STATUS, find_sweep, sweep_children

    dataset = {"name": "lm_tasks", "options": {"tasks": ["copy"], "items": 4, "train_examples": 200,
                                               "test_examples": 20}, "data_dir": str(tmp_path / "data")}
    space = {
        "name": "sharded", "metric": "val_nll", "num_samples": 2, "seed": 0,
        "base": {"dataset": dataset, "student": {"name": "tiny_llama", "options": {**TINY, "layers": 2}},
                 "train": {"epochs": 1, "batch_size": 16, "optimizer": "adamw"},
                 "resources": {"num_workers": 2, "cpus_per_worker": 1, "strategy": "fsdp"}},
        "space": {"knowledge": {"none": {}}, "train.lr": {"type": "float", "low": 0.001, "high": 0.01, "log": True}},
    }
    path = tmp_path / "sharded.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    result = run_sweep(request(tmp_path, path, "sharded"))
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    trials = [t for t in sweep_children(c, find_sweep(c, "sharded"), kind="trial")
              if t.data.tags.get(TAG_STATUS) == "completed"]
    assert len(trials) == 2 and all(t.data.tags["kdray.strategy"] == "fsdp over 2 ranks" for t in trials)
    # the champion was tested after loading its whole record in the driver (one process, no FSDP)
    assert result.champion is not None and 0 <= result.champion.test_accuracy <= 1
    assert result.champion.trial_id in {t.data.tags["kdray.trial_id"] for t in trials}
