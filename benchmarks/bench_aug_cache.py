"""A sweep on augmented images with teacher outputs shared per (epoch, sample), against the same sweep with the
teacher run live in every trial.

Data: CIFAR-shaped uint8 images made locally (``test_images`` with 6000 samples of 10 classes; the timing does
not need real images), random 4-pixel crops + flips as CIFAR is trained. Pair: CIFAR ResNet-20 teacher ->
small 2-D CNN (8/16 channels); the script first measures what one teacher forward pass costs per sample
against one student training step (forward + backward + SGD) on one thread (the issue asks for at least 4x).
Knowledge: none (no teacher: the same on every side), and kd, dkd, dist, ctkd, mlkd (logits) and at, fitnet, sp
(feature maps), each with loss weight 0.5 and 2 (a grid): 17 trials of 4 epochs, FIFO, 2 trials at a time on 2
CPUs, so every side runs exactly the same trials. Four sweeps in one run:

* ``off``: ``cache.teacher_outputs: off`` (every trial runs the teacher on every batch);
* ``on``: the default (all 10 classes kept: exact up to float16 rounding);
* ``topk``: ``cache.top_k: 3`` (3 of 10 classes + the remaining mass), to report what truncation changes;
* ``fp32``: ``cache.dtype: float32`` (a control: the stored rows equal the live teacher's up to the order of
  float operations, so accuracy differences left are those of float16 storage or of that order).

    python benchmarks/bench_aug_cache.py --epochs 4 --json results/aug_cache.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sweep import cost_ratio, emit, sweep_once  # noqa: E402

DATASET = {"name": "test_images", "samples": 6000, "classes": 10}
TEACHER = {"name": "resnet20"}
STUDENT = {"name": "small_cnn", "options": {"widths": [8, 16]}}
TYPES = ["kd", "dkd", "dist", "ctkd", "mlkd", "at", "fitnet", "sp"]
MODES = {"off": {"teacher_outputs": "off"}, "on": {}, "topk": {"top_k": 3}, "fp32": {"dtype": "float32"}}


def teacher_cost(batch: int = 64, reps: int = 10) -> float:
    """Seconds per sample of a teacher forward / of a student training step, on one thread."""
    import torch

    from kdray.config import DatasetConfig
    from kdray.data import describe_dataset
    from kdray.models import build_model

    info = describe_dataset(DatasetConfig.model_validate(DATASET))
    teacher = build_model(TEACHER["name"], info.num_classes, info.preprocess()).eval()
    student = build_model(STUDENT["name"], info.num_classes, info.preprocess(), STUDENT["options"])
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, info.num_classes, (batch,))
    return cost_ratio(teacher, student, opt, x, y, reps, warmup=3)


def label(outcome) -> str:
    """A trial's knowledge type and loss weight: the same trial on every side."""
    w = {k: v for k, v in outcome.params.items() if k.endswith(".weight")}
    return outcome.knowledge + "".join(f" {k}={v:g}" for k, v in sorted(w.items()))


def space(epochs: int, cache: dict) -> dict:
    return {
        "name": "aug-cache", "seed": 0, "num_samples": 1 + 2 * len(TYPES),
        "base": {
            "dataset": DATASET,
            "teacher": {"train": {"model": TEACHER, "train": {"epochs": 4, "batch_size": 128, "lr": 0.05,
                                                             "optimizer": "sgd"}}},
            "student": STUDENT,
            "train": {"epochs": epochs, "batch_size": 128, "lr": 0.05, "optimizer": "sgd"},
            "resources": {"num_workers": 1, "cpus_per_worker": 1},
            "cache": cache,
        },
        "scheduler": {"type": "fifo"},
        "searcher": {"type": "grid", "grid_points": 2},
        # Two loss weights per type (a grid: 0.5 and 2): 17 trials, the same on every side.
        "space": {"knowledge": {"none": {}, **{t: {f"{t}.weight": {"type": "float", "low": 0.5, "high": 2.0}}
                                               for t in TYPES}}},
    }


def main() -> None:
    import mlflow

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--storage", default=str(REPO / "kdray_runs" / "bench"))
    ap.add_argument("--json")
    ap.add_argument("--modes", default=",".join(MODES), help="which sweeps to run (the table needs all four)")
    args = ap.parse_args()
    modes = args.modes.split(",")
    out: dict = {"epochs": args.epochs, "dataset": DATASET, "teacher": TEACHER["name"], "student": STUDENT}
    out["teacher_to_student_cost_per_sample"] = teacher_cost()
    accs = {}
    for mode, cache in MODES.items():
        if mode not in modes:
            continue
        result, wall, tmp, _, _ = sweep_once(space(args.epochs, cache), args.storage, f"aug-cache-{mode}")
        accs[mode] = {label(o): o.val_accuracy for o in result.outcomes}
        out[f"wall_s_{mode}"] = wall
        out[f"trials_s_{mode}"] = result.timings["trials_s"]
        out[f"statuses_{mode}"] = sorted({o.status for o in result.outcomes})
        c = mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
        out[f"epoch_times_s_{mode}"] = {  # per trial, epoch by epoch: where the time of the sweep went
            label(o): [round(m.value, 2) for m in sorted(c.get_metric_history(o.run_id, "epoch_time_s"),
                                                            key=lambda m: m.step)]
            for o in result.outcomes if o.run_id}
        if mode != "off":
            run = c.get_run(result.parent_run_id).data
            out[f"cache_{mode}"] = {k.removeprefix("teacher_cache."): v for k, v in run.metrics.items()
                                    if k.startswith("teacher_cache.")}
            out[f"cache_{mode}_note"] = run.tags.get("kdray.teacher_cache")
    if modes != list(MODES):
        emit(out, args.json)
        return
    out["speedup_wall"] = out["wall_s_off"] / out["wall_s_on"]
    out["speedup_trials"] = out["trials_s_off"] / out["trials_s_on"]
    out["speedup_wall_topk"] = out["wall_s_off"] / out["wall_s_topk"]
    out["val_accuracy"] = accs
    for mode in ("on", "topk", "fp32"):
        diffs = [abs(accs[mode][k] - accs["off"][k]) for k in accs["off"] if k != "none"]
        out[f"max_val_accuracy_difference_{mode}"] = max(diffs)
        out[f"mean_val_accuracy_difference_{mode}"] = sum(diffs) / len(diffs)
    emit(out, args.json)


if __name__ == "__main__":
    main()
