"""The training loop: in-process (Train local mode), exact resume, NaN handling, and 2-worker DDP on Ray."""
from __future__ import annotations

import math

import pytest
import torch
from host_syncs import count_host_syncs
from sweep_helpers import straight_and_resumed

from kdray.config import RunConfig
from kdray.data import load_dataset
from kdray.models import model_from_record
from kdray.train.loop import STUDENT_FILE, evaluate, train_run
from kdray.train.runner import final_student, fit
from kdray.train.session import Session


def blobs_cfg(**kw) -> RunConfig:
    base = {"dataset": {"name": "test_blobs"}, "student": {"name": "test_mlp"},
            "train": {"epochs": 4, "batch_size": 32, "lr": 0.01}}
    for k, v in kw.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return RunConfig.model_validate(base)


def test_train_local_mode_learns_and_reports_every_term(tmp_path, blobs_teacher):
    """Ray Train's local mode (ScalingConfig(num_workers=0)): the real TorchTrainer path, in-process."""
    cfg = blobs_cfg(teacher={"checkpoint": "unused.pt"}, knowledge=[{"type": "kd", "temperature": 2.0},
                                                                     {"type": "rkd", "weight": 0.5}],
                    train={"epochs": 6})
    result = fit(cfg, [blobs_teacher], storage_path=str(tmp_path), name="local", local=True, progress=False)
    m = result.metrics
    assert m["epoch"] == 6 and m["val_accuracy"] > 0.6  # 3 classes: chance is 0.33
    assert {"loss_ce", "loss_kd", "loss_rkd", "train_loss", "samples_per_s", "epoch_time_s"} <= set(m)
    assert m["teacher_source"] == "live"
    student = model_from_record(final_student(result))
    val = evaluate(student, load_dataset(cfg.dataset).val, 256, torch.device("cpu"))
    assert val["accuracy"] == pytest.approx(m["val_accuracy"])



def test_a_resumed_run_continues_exactly_where_it_stopped(tmp_path, blobs_teacher):
    cfg = blobs_cfg(teacher={"checkpoint": "unused.pt"}, knowledge=[{"type": "fitnet"}], train={"epochs": 4,
                    "optimizer": "sgd", "scheduler": "cosine"})
    loop = {"run": cfg.model_dump(mode="json"), "teacher_records": [blobs_teacher]}
    straight, resumed, _ = straight_and_resumed(loop, tmp_path)
    assert [r["epoch"] for r in resumed.reports] == [3, 4]
    a = torch.load(straight.last_checkpoint / STUDENT_FILE, weights_only=True)["state_dict"]
    b = torch.load(resumed.last_checkpoint / STUDENT_FILE, weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert resumed.reports[-1]["val_accuracy"] == straight.reports[-1]["val_accuracy"]


def test_a_nan_loss_ends_the_run_with_the_reason():
    cfg = blobs_cfg(train={"optimizer": "sgd", "lr": 1e12, "momentum": 0.0, "scheduler": "none"})
    session = Session()
    last = train_run({"run": cfg.model_dump(mode="json")}, session)
    assert "non-finite" in last["failed"] and "ce" in last["failed"]
    assert last["val_accuracy"] == 0.0
    assert len(session.reports) == last["epoch"]  # it stopped at the first bad epoch


def schedule(**train) -> list[float]:
    """The learning rate of epochs 1..E as the loop runs them (read before each epoch, stepped after)."""
    from kdray.train.loop import make_optimizer, make_scheduler

    t = RunConfig.model_validate({"student": {"name": "test_mlp"}, "train": train}).train
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(1))], t)
    sched = make_scheduler(opt, t)
    out = []
    for _ in range(t.epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_the_lr_schedule_is_warmup_then_cosine_or_steps(warmup):
    lr, epochs = 0.1, 10
    span = epochs - warmup
    expected = [lr * e / warmup if e <= warmup else lr * 0.5 * (1 + math.cos(math.pi * (e - 1 - warmup) / span))
                for e in range(1, epochs + 1)]
    got = schedule(epochs=epochs, lr=lr, warmup_epochs=warmup, scheduler="cosine")
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    steps = schedule(epochs=epochs, lr=lr, warmup_epochs=warmup, scheduler="step", step_epochs=[5, 8], gamma=0.1)
    expected = [lr * e / warmup if e <= warmup else lr * 0.1 ** sum(e > m for m in (5, 8)) for e in range(1, 11)]
    assert steps == pytest.approx(expected, rel=1e-9)
    assert schedule(epochs=4, lr=lr, scheduler="none") == pytest.approx([lr] * 4)


def test_a_resumed_run_continues_the_schedule_where_it_stopped(tmp_path):
    from kdray.train.session import Session

    cfg = RunConfig.model_validate({"dataset": {"name": "test_blobs"}, "student": {"name": "test_mlp"},
                                    "train": {"epochs": 6, "batch_size": 64, "warmup_epochs": 2,
                                              "keep_checkpoints": 6}})
    whole = Session(checkpoint_root=tmp_path / "a")
    train_run({"run": cfg.model_dump(mode="json")}, whole)
    resumed = Session(resume_from=tmp_path / "a" / "checkpoint_000003")
    train_run({"run": cfg.model_dump(mode="json")}, resumed)
    assert [r["lr"] for r in resumed.reports] == [r["lr"] for r in whole.reports[3:]]


@pytest.mark.ray
def test_two_gloo_workers_report_the_accuracy_of_the_saved_student(ray_cluster, tmp_path, mnist1d_teacher):
    """DDP over 2 CPU workers: validation is sharded and all-reduced, so the reported accuracy is that of
    the whole split, and it equals a single-process evaluation of the checkpointed student."""
    cfg = RunConfig.model_validate({
        "dataset": {"name": "mnist1d"}, "student": {"name": "mnist1d_mlp"}, "teacher": {"checkpoint": "x.pt"},
        "knowledge": [{"type": "kd", "temperature": 4.0}, {"type": "at", "weight": 100.0}],
        "train": {"epochs": 3, "batch_size": 100, "lr": 0.002},
        "resources": {"num_workers": 2, "cpus_per_worker": 1},
    })
    result = fit(cfg, [mnist1d_teacher], storage_path=str(tmp_path), name="ddp", progress=False)
    m = result.metrics
    assert m["epoch"] == 3 and math.isfinite(m["loss_at"])
    data = load_dataset(cfg.dataset)
    single = evaluate(model_from_record(final_student(result)), data.val, 64, torch.device("cpu"))
    assert single["count"] == 400
    assert single["accuracy"] == pytest.approx(m["val_accuracy"], abs=1e-9)
    assert single["loss"] == pytest.approx(m["val_loss"], rel=1e-4)


def test_an_in_process_run_keeps_only_its_newest_checkpoints(tmp_path):
    from kdray.config import RunConfig
    from kdray.train.loop import train_run
    from kdray.train.session import Session

    cfg = RunConfig.model_validate({"dataset": {"name": "test_blobs"}, "student": {"name": "test_mlp"},
                                    "train": {"epochs": 5, "batch_size": 64, "keep_checkpoints": 2}})
    session = Session(checkpoint_root=tmp_path)
    train_run({"run": cfg.model_dump(mode="json")}, session)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_000004", "checkpoint_000005"]
    assert session.last_checkpoint == tmp_path / "checkpoint_000005"


def test_mlkd_strong_augment_trains_on_a_second_randaugment_view_of_every_batch(tmp_path):
    """MLKD's strong view: student and teacher run on RandAugment copies too, and the labels' CE covers both views."""
    from conftest import train_record

    from kdray.data.views import ViewKey, strong_view

    teacher = train_record({"dataset": {"name": "test_images"}, "student": {"name": "small_cnn",
                            "options": {"widths": [8, 16]}}, "train": {"epochs": 1, "batch_size": 64}}, tmp_path / "t")

    def first_epoch(strong: bool) -> dict:
        cfg = RunConfig.model_validate({
            "dataset": {"name": "test_images"}, "teacher": {"checkpoint": "unused.pt"},
            "student": {"name": "small_cnn", "options": {"widths": [8, 16], "dropout": 0.2}},
            "knowledge": [{"type": "mlkd", "strong_augment": strong}], "ce_weight": 0.1,
            "train": {"epochs": 1, "batch_size": 64, "lr": 1e-5}})  # lr ~0: the epoch's CE is the initial one
        session = Session()
        train_run({"run": cfg.model_dump(mode="json"), "teacher_records": [teacher]}, session)
        return session.reports[-1]

    weak, both = first_epoch(False), first_epoch(True)
    assert weak["loss_ce"] == pytest.approx(math.log(3), rel=0.1)  # an untrained 3-class model
    assert both["loss_ce"] == pytest.approx(2 * weak["loss_ce"], rel=0.1)  # CE on the weak and the strong view
    assert math.isfinite(both["loss_mlkd"])

    x = torch.rand(8, 3, 32, 32)
    a, b = strong_view(x, torch.arange(8), ViewKey(0, 1)), strong_view(x, torch.arange(8), ViewKey(0, 2))
    assert torch.equal(strong_view(x, torch.arange(8), ViewKey(0, 1)), a) and not torch.equal(a, b)  # keyed per epoch
    assert a.shape == x.shape and 0 <= a.min() and a.max() <= 1 and (a - x).abs().mean() > 0.01
    with pytest.raises(ValueError, match="image batches"):
        strong_view(torch.rand(8, 1, 40), torch.arange(8), ViewKey(0, 1))


@pytest.mark.parametrize("cached", [False, True], ids=["live-teacher", "teacher-cache"])
def test_a_training_step_never_waits_for_the_device(monkeypatch, blobs_teacher, cached):
    """Nothing between two steps of an epoch reads a tensor's value on the host (``.item()``, ``.tolist()``,
    ``float(t)``, ``bool(t)``, ``.numpy()``, ``.cpu()``): on a GPU each would stall the pipeline once per step. The
    epoch's sums are read once, after its last step (where this test stops counting)."""
    from kdray.cache import build_cache

    cfg = blobs_cfg(teacher={"checkpoint": "unused.pt"}, train={"epochs": 2, "batch_size": 16, "grad_clip": 1.0},
                    knowledge=[{"type": "kd", "temperature": 2.0}, {"type": "fitnet"}, {"type": "dkd"}])
    cache = build_cache([blobs_teacher], load_dataset(cfg.dataset), ["block2", "block1"], 2**30) if cached else None
    # torch's optimizers read their own step counters, kept on the CPU (not a device sync, and the plain PyTorch loop
    # does the same): only what kdray's code asks for counts.
    calls, hook, where = count_host_syncs(monkeypatch)

    session = Session()
    train_run({"run": cfg.model_dump(mode="json"), "teacher_records": [blobs_teacher], "teacher_cache": cache,
               "step_hook": hook}, session)
    steps = math.ceil(len(load_dataset(cfg.dataset).train) / 16)
    assert where[0] == (2, steps - 1) and len(session.reports) == 2
    # Calls made after step s began and before step s + 1 began, within one epoch: none.
    inside = [(n, w) for n, w in calls if w is not None and w[1] < steps - 1]
    assert inside == [], inside[:10]
